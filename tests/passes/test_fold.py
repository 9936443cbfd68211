"""fold: dequantization scales into `qlinear` epilogues, requantization dropped.

`qlinear`'s reference numerics are checked against an independent float64 computation from
the dequantized operands (they agree to rounding: the integer sums are exact); the folded
tiny Llama against the unfolded one; and the cases that must not fold."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

import mxc
from mxc.ir import parse, parse_format, verify
from mxc.passes import run_pipeline
from mxc.passes.fold import fold
from mxc.runtime import ReferenceExecutor

PAIRS = [
    ("int8<sym,token>", "int8<sym,channel>"),
    ("int8<sym,token>", "int4<asym,g32>"),
    ("int8<sym,tensor>", "int4<sym,g16>"),
    ("int4<sym,g32>", "int4<asym,g32>"),
    ("int4<sym,g32>", "int8<sym,channel>"),
    ("fp8e4m3<token>", "fp8e4m3<channel>"),
    ("fp8e4m3<block16>", "nvfp4"),
    ("int8<sym,token>", "int3<asym,tensor>"),
]


@pytest.mark.parametrize("act, weight", PAIRS)
def test_qlinear_equals_the_dequantized_product(act, weight):
    """`qlinear` on random codes equals linear(dequant(x), dequant(w)) in float64, for K
    that is not a multiple of the groups (a shorter last block)."""
    from mxc.runtime.reference import IMPLS, Frame

    gen = torch.Generator().manual_seed(hash((act, weight)) % 2**31)
    af, wf = parse_format(act), parse_format(weight)
    k, n = 77, 19
    x = torch.randn(2, 5, k, generator=gen) * (1 + 4 * torch.rand(k, generator=gen))
    w = torch.randn(n, k, generator=gen) * 0.1
    qx, qw = af.quantize(x), wf.quantize(w)
    bias = torch.randn(n, generator=gen)
    parts = lambda f, q: [t for p, t in [("codes", q.codes), ("scale", q.scale), ("zero", q.zero), ("global", q.global_scale)] if p in __import__("mxc.ir.ops", fromlist=["quant_parts"]).quant_parts(f)]  # noqa: E731
    got = IMPLS["qlinear"]([*parts(af, qx), *parts(wf, qw), bias], {"act": af, "weight": wf, "dtype": mxc.ir.F32}, Frame({}, torch.device("cpu")))
    want = af.dequantize(qx, k).double() @ wf.dequantize(qw, k).double().T + bias.double()
    assert got.dtype == torch.float32 and got.shape == (2, 5, n)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


GOLDEN_IN = """graph @g(%x: f32[b, 40]) {
  dim b in [1, oo]
  %0 = const() {name="fc.weight"} : int4<asym,g16>[8, 40]
  %1 = const() {name="fc.weight.scale"} : f32[8, 3]
  %2 = const() {name="fc.weight.zero"} : f32[8, 3]
  %3:2 = quantize(%x) {format=int8<sym,token>} : (int8<sym,token>[b, 40], f32[b, 1])
  %4 = dequantize(%3#0, %3#1) {format=int8<sym,token>, dtype=f32} : f32[b, 40] loc("fc")
  %5 = dequantize(%0, %1, %2) {format=int4<asym,g16>, dtype=f32} : f32[8, 40] loc("fc")
  %6 = linear(%4, %5) : f32[b, 8] loc("fc")
  %7 = const() {name="odd.weight"} : int4<sym,g16>[8, 40]
  %8 = const() {name="odd.weight.scale"} : f32[8, 3]
  %9:2 = quantize(%x) {format=int4<sym,g8>} : (int4<sym,g8>[b, 40], f32[b, 5])
  %10 = dequantize(%9#0, %9#1) {format=int4<sym,g8>, dtype=f32} : f32[b, 40] loc("odd")
  %11 = dequantize(%7, %8) {format=int4<sym,g16>, dtype=f32} : f32[8, 40] loc("odd")
  %12 = linear(%10, %11) : f32[b, 8] loc("odd")
  %13 = add(%6, %12) : f32[b, 8]
  return %13
}"""


def test_golden_fold():
    g = parse(GOLDEN_IN)
    out = verify(fold(g))
    text = str(out)
    assert "qlinear(" in text and text.count("dequantize(") == 2  # only the unaligned layer keeps them
    line = next(l for l in text.splitlines() if "qlinear" in l)
    assert line.strip().startswith("%") and '{act=int8<sym,token>, weight=int4<asym,g16>, dtype=f32}' in line
    assert 'loc("fc")' in line
    assert out.meta["folded"] == {"fc": "qlinear", "odd": "activation groups of 8 and weight groups of 16 do not align"}
    assert str(parse(text)) == text
    assert fold(parse(str(g).replace("int4<sym,g8>", "int4<sym,g16>").replace("f32[b, 5]", "f32[b, 3]"))).meta["folded"]["odd"] == "qlinear"


def test_requantization_is_removed():
    text = """graph @g(%x: f32[b, 40]) {
  dim b in [1, oo]
  %0 = const() {name="s"} : f32[1, 1]
  %1:2 = quantize(%x, %0) {format=int8<sym,tensor>} : (int8<sym,tensor>[b, 40], f32[1, 1])
  %2 = dequantize(%1#0, %1#1) {format=int8<sym,tensor>, dtype=f32} : f32[b, 40]
  %3:2 = quantize(%2, %1#1) {format=int8<sym,tensor>} : (int8<sym,tensor>[b, 40], f32[1, 1])
  %4 = dequantize(%3#0, %3#1) {format=int8<sym,tensor>, dtype=f32} : f32[b, 40]
  return %4
}"""
    g = parse(text, weights={"s": torch.tensor([[0.03]])})
    out = verify(fold(g))
    assert out.op_counts()["quantize"] == 1 and out.op_counts()["dequantize"] == 1
    x = torch.randn(3, 40) * 2
    assert torch.equal(ReferenceExecutor(out)([x])[0], ReferenceExecutor(g)([x])[0])


@pytest.mark.parametrize("plan", ["w8a8", "w4a8", "fp8", "w4a4-kv4"])
def test_folded_tiny_llama_keeps_the_function(tiny_llama, plan):
    ids = torch.randint(0, 131, (2, 11), generator=torch.Generator().manual_seed(3))
    from mxc.frontends.torch_export import capture

    p = mxc.Plan.coerce(plan)
    captured = capture(tiny_llama, ids)
    unfolded = run_pipeline(captured.graph, ["canonicalize", "quantize"], options={"quantize": {"plan": p.resolved(False)}}).graph
    folded = run_pipeline(unfolded, ["fold"], verify=True).graph
    n_linear = sum(1 for n in unfolded.nodes if n.op == "linear" and n.loc != "lm_head")
    assert folded.op_counts().get("qlinear", 0) == n_linear == 14
    assert all(v == "qlinear" for v in folded.meta["folded"].values())
    # q, k, v quantize one norm output, gate and up another: one quantize each is left (per layer
    # 4 of the 7: qkv, o, gate/up, down), and the merged copies are counted
    assert unfolded.op_counts()["quantize"] - folded.op_counts()["quantize"] == 3 * 2
    assert folded.op_counts()["quantize"] == 4 * 2 + (2 * 2 if p.rules[-1].kv is not None else 0)
    assert folded.meta["merged"] >= 3 * 2
    # mxc.compile runs fold: the same graph
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no calibration: round to nearest
        unpacked = dataclasses.replace(p, passes={"layout": False, "fuse": False})  # the passes after fold
        assert str(mxc.compile(tiny_llama, unpacked, example_inputs=ids).graph) == str(folded)
    want = ReferenceExecutor(unfolded)([ids])[0]
    got = ReferenceExecutor(folded)([ids])[0]
    err = float((got - want).norm() / want.norm())
    assert err < 1e-5, err
    assert not math.isnan(err)


def test_weight_only_graphs_are_left_alone(tiny_llama):
    ids = torch.randint(0, 131, (1, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = mxc.compile(tiny_llama, "w4a16-g128", example_inputs=ids)
    assert fold(c.graph) is c.graph and "qlinear" not in c.graph.op_counts()
