"""The ONNX frontend on encoders: a tiny random BERT exported with `torch.onnx.export(dynamo=True)`
(padding mask, position ids sliced from a fixed buffer, biases, LayerNorm, GELU, pooler) against
eager torch and the torch route, and the tanh form of GELU recognised as one `gelu` node."""

from __future__ import annotations

import warnings

import pytest
import torch

import mxc
from mxc.frontends.onnx import load_onnx
from mxc.frontends.torch_export import capture
from mxc.passes.canonicalize import canonicalize
from mxc.runtime.inputs import InputError

VOCAB, MAX_POSITIONS = 131, 40


def make_tiny_bert(seed: int = 0):
    """A random BERT with non-power-of-two sizes: hidden 72 (6 heads of 12), 2 layers, and
    position embeddings for 40 tokens only (the bound the importer must find)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=72, num_hidden_layers=2, num_attention_heads=6,
                     intermediate_size=100, max_position_embeddings=MAX_POSITIONS, type_vocab_size=2)
    model = BertModel(cfg).eval()
    with torch.no_grad():  # BERT initialises biases to zero (the exporter drops a zero bias) and norms to one
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def bert_inputs(b: int, s: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids and a padding mask whose last row ends with `s // 3` padded positions."""
    g = torch.Generator().manual_seed(seed + 31 * b + s)
    mask = torch.ones(b, s, dtype=torch.int64)
    mask[-1, s - s // 3:] = 0
    return {"input_ids": torch.randint(0, VOCAB, (b, s), generator=g), "attention_mask": mask}


def export(model: torch.nn.Module, inputs: dict, path, **kw) -> str:
    """`model` called with `inputs` by name, exported by the dynamo exporter with dims 0 and 1
    of every input dynamic."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dims = {k: {0: batch, 1: seq} for k in inputs}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), kwargs=inputs, dynamo=True, dynamic_shapes=dims, verbose=False,
                          **kw).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_bert():
    return make_tiny_bert()


@pytest.fixture(scope="module")
def bert_onnx(tiny_bert, tmp_path_factory):
    return export(tiny_bert, bert_inputs(2, 7), tmp_path_factory.mktemp("onnx") / "bert.onnx",
                  output_names=["last_hidden_state", "pooler_output"])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def test_bert_float_matches_eager_and_bounds_the_sequence(tiny_bert, bert_onnx):
    """The position ids are `buffer[:, :s]` of a [1, 40] buffer, added to [b, s, 72] values:
    the import records s <= 40 (as torch.export does) and the model refuses longer inputs."""
    compiled = mxc.compile(bert_onnx)
    assert [str(d) for d in compiled.graph.dims] == ["b in [1, oo]", f"s in [1, {MAX_POSITIONS}]"]
    assert "Min(" not in str(compiled.graph)  # the slice is typed [1, s]
    for b, s in [(2, 7), (3, 11), (1, MAX_POSITIONS)]:
        x = bert_inputs(b, s, seed=1)
        with torch.no_grad():
            want = tiny_bert(**x)
        got = compiled(**x)
        assert rel_err(got.last_hidden_state, want.last_hidden_state) <= 1e-5, (b, s)
        assert rel_err(got.pooler_output, want.pooler_output) <= 1e-5, (b, s)
    with pytest.raises(InputError, match=rf"expected a size in \[1, {MAX_POSITIONS}\], got {MAX_POSITIONS + 1}"):
        compiled(**bert_inputs(1, MAX_POSITIONS + 1))


def test_bert_has_the_torch_routes_layers_and_quantizes_alike(tiny_bert, bert_onnx):
    """The same linear paths and weights as the torch route; w8a16 from ONNX quantizes the same
    layers to the same formats and computes what the torch route computes."""
    x = bert_inputs(2, 7)
    g_onnx = canonicalize(load_onnx(bert_onnx).graph)
    g_torch = canonicalize(capture(tiny_bert, x).graph)

    def linears(g):
        return sorted((n.loc, n.inputs[1].node.get("name")) for n in g.nodes if n.op == "linear")

    assert linears(g_onnx) == linears(g_torch) and len(linears(g_onnx)) == 2 * 6 + 1  # + the pooler
    weights = g_onnx.used_weights()
    for name, w in tiny_bert.named_parameters():  # every parameter, by its state-dict name
        assert torch.equal(weights[name], w), name
    assert g_onnx.op_counts().get("gelu") == g_torch.op_counts().get("gelu") == 2
    with warnings.catch_warnings():  # no calibration data: both round to nearest
        warnings.simplefilter("ignore")
        via_onnx = mxc.compile(bert_onnx, "w8a16")
        via_torch = mxc.compile(tiny_bert, "w8a16", example_inputs=x)
    layers_onnx, layers_torch = via_onnx.report().layers, via_torch.report().layers
    assert set(layers_onnx) == set(layers_torch) and len(layers_torch) >= 12
    assert {k: str(v["format"]) for k, v in layers_onnx.items()} == {k: str(v["format"]) for k, v in layers_torch.items()}
    y = bert_inputs(3, 9, seed=2)
    got, want = via_onnx(**y).last_hidden_state, via_torch(**y).last_hidden_state
    assert rel_err(got, want) <= 1e-5
    with torch.no_grad():
        assert rel_err(got, tiny_bert(**y).last_hidden_state) > 1e-4  # the plan did quantize


class _Mlp(torch.nn.Module):
    """Linear -> GELU (tanh form) -> Linear, as in GPT-2 style blocks."""

    def __init__(self, act: torch.nn.Module):
        super().__init__()
        self.up, self.act, self.down = torch.nn.Linear(13, 29), act, torch.nn.Linear(29, 11)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize("form", ["nn.GELU(tanh), opset 18", "NewGELUActivation"])
def test_gelu_tanh_form_becomes_one_gelu(form, tmp_path):
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), as the exporter decomposes nn.GELU("tanh")
    below opset 20 and as Hugging Face's "gelu_new" writes it, is `gelu {approximate="tanh"}`."""
    from transformers.activations import NewGELUActivation

    torch.manual_seed(3)
    if form == "NewGELUActivation":
        model, kw = _Mlp(NewGELUActivation()).eval(), {}
    else:
        model, kw = _Mlp(torch.nn.GELU(approximate="tanh")).eval(), {"opset_version": 18}
    x = torch.randn(2, 5, 13) * 3
    path = export(model, {"x": x}, tmp_path / "mlp.onnx", **kw)
    graph = load_onnx(path).graph
    gelus = [n for n in graph.nodes if n.op == "gelu"]
    assert [n.get("approximate") for n in gelus] == ["tanh"]
    assert not [n for n in graph.nodes if n.op == "tanh" or n.get("target") == "aten.pow.Tensor_Scalar"]
    compiled = mxc.compile(path)
    y = torch.randn(3, 4, 13) * 3
    with torch.no_grad():
        assert rel_err(compiled(y)[0], model(y)) <= 1e-5
