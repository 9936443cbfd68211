"""End to end: `mxc.compile` on the tiny Llama, the real SmolLM2-135M and all-MiniLM-L6-v2
against eager PyTorch, the IR it exposes, and the errors a user sees."""

from __future__ import annotations

import pytest
import torch

import mxc
from mxc.ir import parse, verify

REL = 1e-5


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.fixture(scope="module")
def tiny_compiled(tiny_llama):
    ids = torch.randint(0, 131, (2, 9))
    return mxc.compile(tiny_llama, example_inputs=ids, debug=True)


@pytest.mark.parametrize("shape", [(2, 9), (1, 1), (1, 23), (5, 3), (3, 64)])
def test_tiny_llama_matches_eager(tiny_llama, tiny_compiled, shape):
    ids = torch.randint(0, 131, shape)
    with torch.no_grad():
        want = tiny_llama(input_ids=ids, use_cache=False).logits
    out = tiny_compiled(ids)
    assert type(out).__name__ == "CausalLMOutputWithPast"
    assert out.logits.shape == want.shape
    assert rel_err(out.logits, want) <= REL


def test_tiny_llama_called_by_name_and_with_captured_constant(tiny_llama, tiny_compiled):
    ids = torch.randint(0, 131, (2, 5))
    a = tiny_compiled(input_ids=ids).logits
    b = tiny_compiled(ids, use_cache=False).logits
    assert torch.equal(a, b)


def test_tiny_llama_ir_is_canonical_and_round_trips(tiny_compiled):
    g = tiny_compiled.graph
    counts = g.op_counts()
    assert counts["rms_norm"] == 5 and counts["rope"] == 4 and counts["attention"] == 2
    assert counts["linear"] == 15 and counts["embedding"] == 1 and counts["silu"] == 2
    assert not any(k in counts for k in ("torch:aten.pow.Tensor_Scalar", "torch:aten.rsqrt.default"))
    text = tiny_compiled.ir
    assert str(parse(text)) == text
    verify(parse(text, weights=g.weights))
    names = [n.get("name") for n in g.nodes if n.op == "const"]
    assert "model.layers.1.mlp.down_proj.weight" in names
    locs = {n.loc for n in g.nodes if n.op == "linear"}
    assert "model.layers.0.self_attn.q_proj" in locs and "lm_head" in locs
    assert g.input_names == ("input_ids",)
    assert [str(d) for d in g.dims] == ["b in [1, oo]", "s in [1, oo]"]


def test_report_lists_fallbacks(tiny_compiled, tiny_llama_factory):
    report = tiny_compiled.report()
    assert report.fallbacks == {
        k.removeprefix("torch:"): v for k, v in tiny_compiled.graph.op_counts().items() if k.startswith("torch:")
    }
    assert report.fallbacks["aten.arange.default"] >= 1
    text = str(report)
    assert "torch fallbacks" in text and "aten.arange.default" in text and "rms_norm" in text
    model = tiny_llama_factory()
    params = sum(p.numel() * 4 for p in model.parameters())
    assert report.weight_bytes == params + model.model.rotary_emb.inv_freq.numel() * 4  # + the rotary buffer


def test_dump_ir_writes_every_pass(tiny_llama, tmp_path):
    compiled = mxc.compile(tiny_llama, example_inputs=torch.randint(0, 131, (2, 4)), dump_ir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00-capture.mxir", "01-canonicalize.mxir"]
    assert (tmp_path / "01-canonicalize.mxir").read_text() == compiled.ir
    assert str(parse((tmp_path / "00-capture.mxir").read_text())) == (tmp_path / "00-capture.mxir").read_text()


# ----------------------------------------------------------------------------- errors


def test_wrong_inputs_are_named(tiny_compiled):
    ids = torch.randint(0, 131, (2, 5))
    with pytest.raises(mxc.CallError, match=r"missing input\(s\) 'input_ids'"):
        tiny_compiled()
    with pytest.raises(mxc.CallError, match=r"unexpected argument 'pixels'"):
        tiny_compiled(ids, pixels=ids)
    with pytest.raises(mxc.CallError, match=r"'use_cache' was captured as False, got True"):
        tiny_compiled(ids, use_cache=True)
    with pytest.raises(mxc.CallError, match=r"'attention_mask' was not given at capture"):
        tiny_compiled(ids, attention_mask=torch.ones_like(ids))
    with pytest.raises(mxc.InputError, match=r"argument 'input_ids': expected rank 2 .*got rank 1"):
        tiny_compiled(ids[0])
    with pytest.raises(mxc.InputError, match=r"argument 'input_ids': expected dtype i64 .*got torch.int32"):
        tiny_compiled(ids.int())
    with pytest.raises(mxc.InputError, match=r"argument 'input_ids': expected a tensor on cpu, got one on meta"):
        tiny_compiled(ids.to("meta"))
    with pytest.raises(mxc.InputError, match=r"argument 'input_ids': expected a tensor i64\[b, s\], got list"):
        tiny_compiled([[1, 2]])


def test_unknown_backend_and_plan(tiny_llama_factory):
    model = tiny_llama_factory(layers=1)
    with pytest.raises(ValueError, match=r"unknown backend 'cuda-magic'; expected one of reference"):
        mxc.compile(model, backend="cuda-magic")
    with pytest.raises(ValueError, match=r"unknown plan 'w5a17'.*expected .*w4a16-g128"):
        mxc.compile(model, "w5a17")


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        if self.lin(x).sum() > 0:  # control flow on data: not capturable
            return x * 2
        return x


def test_capture_error_names_source_line():
    with pytest.raises(mxc.CaptureError) as info:
        mxc.compile(DataDependent(), example_inputs=torch.randn(3, 8))
    msg = str(info.value)
    assert "torch.export could not capture DataDependent" in msg
    assert "test_compile.py" in msg and "if self.lin(x).sum() > 0" in msg


def test_example_inputs_are_checked():
    with pytest.raises(TypeError, match=r"example_inputs must be a tensor, a tuple .* got str"):
        mxc.compile(DataDependent(), example_inputs="x")
    with pytest.raises(TypeError, match=r"example_inputs are needed to capture DataDependent"):
        mxc.compile(DataDependent())


# ----------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def smollm2_compiled(smollm2):
    model, _ = smollm2
    return mxc.compile(model)


def test_smollm2_matches_eager(smollm2, smollm2_compiled):
    model, tok = smollm2
    for text in ["The capital of France is", "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)"]:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            want = model(input_ids=ids, use_cache=False).logits
        assert rel_err(smollm2_compiled(ids).logits, want) <= REL
    batch = torch.randint(0, model.config.vocab_size, (3, 37))
    with torch.no_grad():
        want = model(input_ids=batch, use_cache=False).logits
    assert rel_err(smollm2_compiled(batch).logits, want) <= REL


def test_smollm2_structure(smollm2_compiled):
    counts = smollm2_compiled.graph.op_counts()
    assert counts["rms_norm"] == 61 and counts["rope"] == 60 and counts["attention"] == 30
    assert counts["linear"] == 30 * 7 + 1
    attn = next(n for n in smollm2_compiled.graph.nodes if n.op == "attention")
    q, k = attn.inputs[0].type.shape, attn.inputs[1].type.shape
    assert (q[1], k[1]) == (9, 3)  # grouped-query attention reads the 3 KV heads directly
    text = smollm2_compiled.ir
    assert str(parse(text)) == text
    verify(parse(text, weights=smollm2_compiled.graph.weights))


def test_smollm2_perplexity_matches_eager(smollm2, smollm2_compiled):
    _, tok = smollm2
    ppl = mxc.eval.perplexity(smollm2_compiled, tok)
    assert f"{ppl:.4g}" == "14.7"  # eager fp32 gives 14.70 (4 significant digits)
    assert abs(ppl - 14.7045) < 5e-4


def test_smollm2_greedy_generation_matches_eager(smollm2, smollm2_compiled):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=8, do_sample=False)
    got = ids
    for _ in range(8):
        nxt = smollm2_compiled(got).logits[:, -1].argmax(-1, keepdim=True)
        got = torch.cat([got, nxt], dim=1)
    assert torch.equal(got, want)


def test_minilm_matches_eager(minilm):
    model, tok = minilm
    sentences = ["The cat sat on the mat.", "Compilers lower graphs to kernels, one pass at a time, carefully."]
    enc = tok(sentences, padding=True, return_tensors="pt")
    compiled = mxc.compile(model, example_inputs=dict(enc))
    for batch in (enc, tok(["one", "two words", "and three words here", "x"], padding=True, return_tensors="pt")):
        with torch.no_grad():
            want = model(**batch)
        got = compiled(**batch)
        assert type(got).__name__ == type(want).__name__
        assert rel_err(got.last_hidden_state, want.last_hidden_state) <= REL
        assert rel_err(got.pooler_output, want.pooler_output) <= REL
    assert str(parse(compiled.ir)) == compiled.ir
    counts = compiled.graph.op_counts()
    assert counts["layer_norm"] == 13 and counts["attention"] == 6 and counts["gelu"] == 6
    too_long = torch.ones(1, 600, dtype=torch.long)
    with pytest.raises(mxc.InputError, match=r"argument 'input_ids' dim 1 \(s\): expected a size in \[1, 512\], got 600"):
        compiled(input_ids=too_long, token_type_ids=too_long, attention_mask=too_long)
