"""The ONNX frontend on the tiny Llama exported with `torch.onnx.export(dynamo=True)`:
the same IR as the torch route, equal outputs with no plan and with quantized plans,
artifacts, the `interpret` backend, the CLI, fallbacks and errors."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch

import mxc
from mxc.cli import main
from mxc.frontends.onnx import OnnxImportError, load_onnx
from mxc.frontends.torch_export import capture
from mxc.ir import flags, parse, print_graph
from mxc.passes.canonicalize import canonicalize

VOCAB = 131


def export(model: torch.nn.Module, path) -> str:
    """`model` exported with the dynamo exporter, batch and sequence dims dynamic."""
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    dims = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}, "use_cache": None}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(model, (), kwargs={"input_ids": ids, "use_cache": False}, dynamo=True,
                                 dynamic_shapes=dims, output_names=["logits"], verbose=False)
    prog.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_onnx(tiny_llama, tmp_path_factory):
    return export(tiny_llama, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed + 31 * b + s))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def quiet_compile(model, plan=None, **kw):
    with warnings.catch_warnings():  # no calibration data: the driver warns it rounds to nearest
        warnings.simplefilter("ignore")
        return mxc.compile(model, plan, **kw)


# ------------------------------------------------------------------------------ import


def test_same_layers_and_weights_as_the_torch_route(tiny_llama, tiny_onnx):
    """Linear paths, parameter names, weight shapes ([out, in]) and the compound ops after
    canonicalize are those of the torch route."""
    g_onnx = canonicalize(load_onnx(tiny_onnx).graph)
    g_torch = canonicalize(capture(tiny_llama).graph)

    def linears(g):
        return sorted((n.loc, n.inputs[1].node.get("name")) for n in g.nodes if n.op == "linear")

    assert linears(g_onnx) == linears(g_torch) and len(linears(g_onnx)) == 15
    w_onnx, w_torch = g_onnx.used_weights(), g_torch.used_weights()
    assert set(w_torch) <= set(w_onnx)
    # beyond the parameters, only the one-element constants of the exporter's causal mask
    assert all(w_onnx[k].numel() == 1 for k in set(w_onnx) - set(w_torch))
    for name, w in w_torch.items():
        assert w_onnx[name].shape == w.shape and torch.equal(w_onnx[name], w), name
    core = ("linear", "rms_norm", "rope", "attention", "silu", "embedding", "mul", "add")
    assert {k: g_onnx.op_counts().get(k) for k in core} == {k: g_torch.op_counts().get(k) for k in core}
    assert [str(d) for d in g_onnx.dims] == ["b in [1, oo]", "s in [1, oo]"]
    assert str(g_onnx.inputs[0].types[0]) == "i64[b, s]"


def test_float_compile_matches_eager_at_other_shapes(tiny_llama, tiny_onnx):
    compiled = mxc.compile(tiny_onnx)
    for b, s in [(2, 7), (1, 11), (3, 4)]:  # exported with [2, 7]: the dims are symbolic
        x = ids(b, s)
        with torch.no_grad():
            want = tiny_llama(input_ids=x).logits
        got = compiled(x)
        assert rel_err(got.logits, want) <= 1e-5 and torch.equal(got[0], got.logits)


def test_fallbacks_print_parse_and_are_reported(tiny_onnx):
    """The exporter's causal-mask GatherND has no mapping: an `onnx` node, listed in the report,
    whose text parses back identically."""
    compiled = mxc.compile(tiny_onnx)
    report = compiled.report()
    assert report.fallbacks.get("onnx:ai.onnx.GatherND") == 4
    text = print_graph(compiled.graph)
    assert 'onnx(' in text and 'op_type="GatherND"' in text
    assert print_graph(parse(text, weights=compiled.graph.weights)) == text


# ------------------------------------------------------------------------------ plans


@pytest.mark.parametrize("plan", ["w8a16", "w4a16-g128"])
def test_quantized_plan_equals_the_torch_route(tiny_llama, tiny_onnx, plan):
    via_onnx = quiet_compile(tiny_onnx, plan)
    via_torch = quiet_compile(tiny_llama, plan)
    layers_onnx, layers_torch = via_onnx.report().layers, via_torch.report().layers
    assert set(layers_onnx) == set(layers_torch) and len(layers_onnx) >= 14
    assert all(str(layers_onnx[k]["format"]) == str(layers_torch[k]["format"]) for k in layers_torch)
    x = ids(2, 9)
    want, got = via_torch(x).logits, via_onnx(x).logits
    assert rel_err(got, want) <= 1e-5
    with torch.no_grad():
        eager = tiny_llama(input_ids=x).logits
    assert rel_err(got, eager) > 1e-4  # the plan did quantize


def test_quantized_artifact_round_trip_and_interpret_backend(tiny_onnx, tmp_path):
    compiled = quiet_compile(tiny_onnx, "w4a16-g128")
    x = ids(1, 5)
    want = compiled(x).logits
    mxc.save(compiled, tmp_path / "art")
    loaded = mxc.load(tmp_path / "art")
    assert torch.equal(loaded(x).logits, want)
    with flags.CACHE_DIR.override(str(tmp_path / "kernels")):
        kernels = quiet_compile(tiny_onnx, "w4a16-g128", backend="interpret")
        got = kernels(x).logits
    assert kernels.backend == "interpret" and any(n.op == "fused" for n in kernels.graph.nodes)
    assert rel_err(got, want) <= 1e-4


def test_cli_compiles_an_onnx_file(tiny_onnx, tmp_path, capsys):
    assert main(["compile", tiny_onnx, "--plan", "w8a16", "-o", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "onnx:ai.onnx.GatherND" in printed and "model.layers.1.mlp.down_proj" in printed
    loaded = mxc.load(tmp_path / "out")
    x = ids(2, 6)
    assert torch.equal(loaded(x).logits, quiet_compile(tiny_onnx, "w8a16")(x).logits)


# ------------------------------------------------------------------------------ errors


def _model(nodes, inputs, outputs, opset=20, domain=""):
    graph = onnx.helper.make_graph(nodes, "g", inputs, outputs)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(domain, opset)])


def test_unknown_op_and_domain_are_refused_naming_the_node():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    bad = _model([onnx.helper.make_node("Frobnicate", ["x"], ["y"], name="f0")], [x], [y])
    with pytest.raises(OnnxImportError, match=r"node 'f0' \(Frobnicate\): op 'Frobnicate' is not defined in opset 20"):
        load_onnx(bad)
    custom = _model([onnx.helper.make_node("Relu", ["x"], ["y"], name="r0", domain="com.example")], [x], [y])
    custom.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    with pytest.raises(OnnxImportError, match=r"node 'r0' \(com.example.Relu\) uses domain 'com.example'"):
        load_onnx(custom)


def test_malformed_model_is_refused():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    dangling = _model([onnx.helper.make_node("Relu", ["nowhere"], ["y"], name="r1")], [x], [y])
    with pytest.raises(OnnxImportError, match="malformed ONNX model"):
        load_onnx(dangling)
