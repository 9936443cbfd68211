"""reorder: golden IR texts for each way a permutation is folded (norm, producer rows,
elementwise ops of producers, gathers where nothing can absorb it), the weights against an
independently computed permutation, function preservation on the goldens and the tiny
Llama, the outlier channels ending up last, one permutation per shared producer; and the
quantize pass's mixed precision inside one tensor for the reordered layers (IR shape,
exact int8 outlier codes, GPTQ with the split Hessian, report bits/bytes), the compiled
tiny Llama with outliers against without, and the errors for bad options.

Golden files live in tests/golden/reorder/: `X.before.mxir` is parsed, given seeded random
weights and abs-maxima, reordered with `OUTLIERS[X]` and printed; the text must equal
`X.after.mxir`. To accept a deliberate change run
`MXC_UPDATE_GOLDEN=1 pytest tests/passes/test_reorder.py` and review the diff.
"""

from __future__ import annotations

import dataclasses
import types
import warnings
from pathlib import Path

import pytest
import torch

import mxc
from mxc.driver import QUANT_PIPELINE
from mxc.ir import Graph, parse, parse_format, verify
from mxc.passes.calibrate import calibrate
from mxc.passes.canonicalize import canonicalize
from mxc.passes.manager import PASSES, run_pipeline
from mxc.ir.packing import packed_words
from mxc.passes.quantize import format_bytes, layer_path, quantize
from mxc.passes.reorder import gather_indices, outlier_count, reorder
from mxc.runtime import ReferenceExecutor
from golden_files import check_golden, golden_before
from graph_helpers import fresh, golden_inputs, input_amax, linears, outlier_norm_llama, seeded

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "reorder"
CASES = sorted(p.name.removesuffix(".before.mxir") for p in GOLDEN.glob("*.before.mxir"))

#: The outlier counts each golden case asks for.
OUTLIERS = {
    "qkv_norm": {"attn.q_proj": 3, "attn.k_proj": 2},  # v_proj: no count, one permutation all the same
    "mlp": {"mlp.gate_proj": 2, "mlp.up_proj": 2, "mlp.down_proj": 3},
    "attention_gqa": {"attn.q_proj": 2, "attn.k_proj": 2, "attn.v_proj": 2, "attn.o_proj": 4},
    "layer_norm_gelu": {"fc1": 2, "fc2": 3},
    "weightless_norm": {"head": 2},
    "fallbacks": {"fc": 2, "proj": 2, "head": 2, "lm_head": 2, "out": 1},
}


def perm_ref(amax: torch.Tensor, k: int) -> torch.Tensor:
    """The expected order, written out independently of the pass: the k largest channels
    last in increasing order (of equal ones, the lower index counts as larger), the rest
    in their order."""
    order = sorted(range(amax.numel()), key=lambda j: (float(amax[j]), -j))
    top = order[len(order) - k:]
    return torch.tensor([j for j in range(amax.numel()) if j not in top] + top)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5, msg: str = "") -> None:
    err = rel_err(got, want)
    assert err <= rtol, f"{msg}: relative error {err:.3g} > {rtol}"


# --------------------------------------------------------------------------- goldens


def golden_graph(case: str) -> tuple[Graph, dict[str, torch.Tensor]]:
    """The parsed before file with seeded weights, and abs-maxima with outliers and a dead
    channel 0 per activation (the layers reading one activation get one tensor)."""
    graph, text = golden_before(GOLDEN, case)
    gen = seeded(case)
    weights = {n.get("name"): torch.randn(n.types[0].shape, generator=gen) for n in graph.nodes if n.op == "const"}
    graph = verify(graph.replace(weights=weights))
    by_value: dict = {}
    for n in linears(graph):
        k = n.inputs[1].type.shape[1]
        if n.inputs[0] not in by_value:
            a = torch.rand(k, generator=gen) + 0.05
            a[torch.randperm(k, generator=gen)[:2]] *= 40.0
            a[0] = 0.0
            by_value[n.inputs[0]] = a
    return graph, {layer_path(n, n.inputs[1].node): by_value[n.inputs[0]] for n in linears(graph)}


def cols(w, p):
    return w[:, p]


def expected_qkv_norm(w, amax, meta):
    p = perm_ref(amax["attn.q_proj"], 3)
    shared = ["attn.q_proj", "attn.k_proj", "attn.v_proj"]
    for path, k in [("attn.q_proj", 3), ("attn.k_proj", 2), ("attn.v_proj", 0)]:
        assert meta[path] == {
            "outliers": k, "channels": p[10 - k:].tolist(), "via": "norm", "producer": "rms_norm attn_norm",
            "shared": shared, "folded": ["attn_norm.weight", "gather rms_norm attn_norm"],
        }
    return {"attn_norm.weight": w["attn_norm.weight"][p], "attn.q_proj.reorder_index": p,
            **{f"attn.{x}_proj.weight": cols(w[f"attn.{x}_proj.weight"], p) for x in "qkv"}}


def expected_mlp(w, amax, meta):
    p1, p2 = perm_ref(amax["mlp.gate_proj"], 2), perm_ref(amax["mlp.down_proj"], 3)
    assert meta["mlp.down_proj"]["via"] == "mul" and meta["mlp.down_proj"]["folded"] == [
        "mlp.gate_proj.weight", "mlp.up_proj.weight"]
    assert meta["mlp.up_proj"]["via"] == "norm" and meta["mlp.up_proj"]["channels"] == p1[-2:].tolist()
    return {
        "mlp_norm.weight": w["mlp_norm.weight"][p1], "mlp.gate_proj.reorder_index": p1,
        "mlp.gate_proj.weight": w["mlp.gate_proj.weight"][p2][:, p1],
        "mlp.up_proj.weight": w["mlp.up_proj.weight"][p2][:, p1],
        "mlp.down_proj.weight": cols(w["mlp.down_proj.weight"], p2),
    }


def expected_attention_gqa(w, amax, meta):
    p1, p2 = perm_ref(amax["attn.q_proj"], 2), perm_ref(amax["attn.o_proj"], 4)
    assert {meta[f"attn.{x}_proj"]["why"] for x in "qkv"} == {"the activation is the graph input %x"}
    assert meta["attn.o_proj"]["via"] == "gather" and meta["attn.o_proj"]["why"].startswith(
        "the producer reshape attn is the attention output")
    return {
        **{f"attn.{x}_proj.weight": cols(w[f"attn.{x}_proj.weight"], p1) for x in "qkv"},
        "attn.o_proj.weight": cols(w["attn.o_proj.weight"], p2),
        "attn.q_proj.reorder_index": p1, "attn.o_proj.reorder_index": p2,
    }


def expected_layer_norm_gelu(w, amax, meta):
    p1, p2 = perm_ref(amax["fc1"], 2), perm_ref(amax["fc2"], 3)
    assert meta["fc1"]["folded"] == ["ln.weight", "ln.bias", "gather layer_norm ln"]
    assert meta["fc2"]["via"] == "gelu" and meta["fc2"]["folded"] == ["fc1.weight", "fc1.bias"]
    return {
        "ln.weight": w["ln.weight"][p1], "ln.bias": w["ln.bias"][p1], "fc1.reorder_index": p1,
        "fc1.weight": w["fc1.weight"][p2][:, p1], "fc1.bias": w["fc1.bias"][p2],
        "fc2.weight": cols(w["fc2.weight"], p2),
    }


def expected_weightless_norm(w, amax, meta):
    p = perm_ref(amax["head"], 2)
    assert meta["head"]["via"] == "norm" and meta["head"]["folded"] == ["gather rms_norm final_norm"]
    return {"head.weight": cols(w["head.weight"], p), "head.reorder_index": p}


def expected_fallbacks(w, amax, meta):
    p = {path: perm_ref(amax[path], k) for path, k in OUTLIERS["fallbacks"].items()}
    assert meta["lm_head"] == {"skipped": "weight 'embed.weight' is tied (also read elsewhere)"}
    assert meta["fc"]["via"] == "gather" and meta["fc"]["why"] == "the activation (rms_norm norm) is also read by add"
    assert meta["proj"]["via"] == "tanh" and meta["proj"]["folded"] == ["fc.weight"]
    assert meta["head"]["via"] == "gather" and meta["head"]["why"] == "the activation (add) is also a graph output"
    assert meta["out"]["why"] == "the activation is the graph input %y"
    return {
        "fc.weight": w["fc.weight"][p["proj"]][:, p["fc"]], "proj.weight": cols(w["proj.weight"], p["proj"]),
        "head.weight": cols(w["head.weight"], p["head"]), "out.weight": cols(w["out.weight"], p["out"]),
        **{f"{x}.reorder_index": p[x] for x in ("fc", "head", "out")},
    }


EXPECTED = {name.removeprefix("expected_"): fn for name, fn in globals().items() if name.startswith("expected_")}


def test_golden_cases_exist():
    assert set(CASES) == set(EXPECTED) == set(OUTLIERS)


@pytest.mark.parametrize("case", CASES)
def test_golden(case):
    before, amax = golden_graph(case)
    original = {k: v.clone() for k, v in before.weights.items()}
    after = verify(reorder(before, outliers=OUTLIERS[case], amax=amax))
    check_golden(GOLDEN / f"{case}.after.mxir", str(after))
    assert after is not before and "reordered" not in before.meta, "the input graph is left as it was"
    assert str(verify(parse(str(after), weights=after.weights))) == str(after)
    meta = after.meta["reordered"]
    want = EXPECTED[case](original, amax, meta)
    assert set(after.weights) == set(original) | set(want)
    for name, t in after.weights.items():
        ref = want.get(name, original.get(name))
        assert t.dtype == ref.dtype and torch.equal(t, ref), name  # a permutation moves values exactly
        assert torch.equal(before.weights.get(name, t), original.get(name, t)), f"the input graph's {name} changed"
    gen = seeded(case + "/inputs")
    run_before, run_after = ReferenceExecutor(before, check_shapes=True), ReferenceExecutor(after, check_shapes=True)
    for sizes in ({"b": 1, "s": 1}, {"b": 3, "s": 7}):
        inputs = golden_inputs(before, sizes, gen)
        for i, (x, y) in enumerate(zip(run_before(inputs), run_after(inputs))):
            assert_close_rel(y, x, msg=f"{case} output {i} at {sizes}")


def test_gather_op_type_rule_and_reference():
    """The `gather` op the pass inserts: `x.index_select(axis, index)`, typed by its index."""
    text = """graph @g(%x: f32[b, 5, 7]) {
  dim b in [1, oo]
  %0 = const() {name="i"} : i64[4]
  %1 = gather(%x, %0) {axis=1} : f32[b, 4, 7]
  %2 = const() {name="j"} : i64[7]
  %3 = gather(%1, %2) {axis=-1} : f32[b, 4, 7]
  return %3
}
"""
    i, j = torch.tensor([4, 0, 0, 2]), torch.randperm(7)
    g = verify(parse(text, weights={"i": i, "j": j}))
    assert str(g) == text
    x = torch.randn(3, 5, 7)
    assert torch.equal(ReferenceExecutor(g, check_shapes=True)([x])[0], x[:, i][..., j])
    with pytest.raises(Exception, match=r"gather's index must be a rank-1 integer tensor, got f32\[4\]"):
        verify(parse(text.replace("i64[4]", "f32[4]"), weights={"i": i.float(), "j": j}))
    with pytest.raises(Exception, match=r"result 0 declared f32\[b, 5, 7\], but gather of these operands gives"):
        verify(parse(text.replace("f32[b, 4, 7]\n  %2", "f32[b, 5, 7]\n  %2"), weights={"i": i, "j": j}))


def test_nothing_asked_returns_the_graph_and_all_skipped_records():
    graph, amax = golden_graph("fallbacks")
    assert reorder(graph) is graph and reorder(graph, outliers={"fc": 0}) is graph
    assert reorder(graph, outliers={"lm_head": 3}, amax=amax) is graph
    assert graph.meta["reordered"] == {"lm_head": {"skipped": "weight 'embed.weight' is tied (also read elsewhere)"}}


# --------------------------------------------------------------------------- the tiny Llama


@pytest.fixture(scope="module")
def llama(captured_tiny_llama):
    """The canonical tiny Llama with outlier channels in its norm weights (as trained models
    have), calibration batches and their abs-maxima."""
    return outlier_norm_llama(canonicalize(captured_tiny_llama.graph), seed=77, outliers=3)


K8 = 8


@pytest.fixture(scope="module")
def reordered_llama(llama):
    graph, _, amax = llama
    return verify(reorder(graph, outliers={layer_path(n, n.inputs[1].node): K8 for n in linears(graph)}, amax=amax))


def llama_logits(graph: Graph, shapes, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    run = ReferenceExecutor(graph, check_shapes=True)
    return [run([torch.randint(0, 131, shape, generator=gen)])[0] for shape in shapes]


def test_tiny_llama_function_preserved_and_outliers_last(llama, reordered_llama):
    graph, batches, amax = llama
    meta = reordered_llama.meta["reordered"]
    assert len(meta) == 15 and all(r["outliers"] == K8 for r in meta.values())
    vias = {p.rsplit(".", 1)[-1]: r["via"] for p, r in meta.items()}
    assert vias == {"q_proj": "norm", "k_proj": "norm", "v_proj": "norm", "o_proj": "gather", "gate_proj": "norm",
                    "up_proj": "norm", "down_proj": "mul", "lm_head": "norm"}
    for before, after in zip(llama_logits(graph, [(1, 1), (2, 7), (3, 13)], 5), llama_logits(reordered_llama, [(1, 1), (2, 7), (3, 13)], 5)):
        assert_close_rel(after, before, msg=f"logits {tuple(before.shape)}")
    # measured again on the reordered graph: each input is the old one permuted, and its K8
    # largest channels are the last K8, in increasing order
    after = input_amax(reordered_llama, batches)
    for path, r in meta.items():
        p = perm_ref(amax[path], K8)
        assert r["channels"] == p[-K8:].tolist()
        torch.testing.assert_close(after[path], amax[path][p], rtol=1e-5, atol=1e-6)
        a = after[path]
        assert float(a[-K8:].min()) >= float(a[:-K8].max()), path
        assert torch.equal(a[-K8:].argsort(), torch.arange(K8)), path
    # the recorded channels are the top K8 of the original abs-max
    q = "model.layers.0.self_attn.q_proj"
    assert set(meta[q]["channels"]) == set(amax[q].topk(K8).indices.tolist())


def test_tiny_llama_shared_producers_share_one_permutation(llama, reordered_llama):
    graph, _, amax = llama
    w0, w1 = graph.weights, reordered_llama.weights
    for group, norm in [(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
                        (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm")]:
        p = perm_ref(amax[f"model.layers.1.{group[0]}"], K8)
        assert torch.equal(w1[f"model.layers.1.{norm}.weight"], w0[f"model.layers.1.{norm}.weight"][p])
        for layer in group if "mlp" not in group[0] else ():  # gate/up rows also carry down_proj's: below
            name = f"model.layers.1.{layer}.weight"
            assert torch.equal(w1[name], w0[name][:, p]), name
        assert torch.equal(w1[f"model.layers.1.{group[0]}.reorder_index"], p)
    # down_proj: gate's and up's rows permuted by its permutation, their columns by the norm's
    p, pd = perm_ref(amax["model.layers.1.mlp.gate_proj"], K8), perm_ref(amax["model.layers.1.mlp.down_proj"], K8)
    for layer in ("gate_proj", "up_proj"):
        name = f"model.layers.1.mlp.{layer}.weight"
        assert torch.equal(w1[name], w0[name][pd][:, p])
    meta = reordered_llama.meta["reordered"]
    assert meta["model.layers.1.mlp.up_proj"]["shared"] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert meta["model.layers.1.mlp.gate_proj"]["channels"] == meta["model.layers.1.mlp.up_proj"]["channels"]
    # one gather per group: 3 norms feeding layers + o_proj's, per layer, and the final norm
    assert sum(n.op == "gather" for n in reordered_llama.nodes) == 2 * 3 + 1


def test_gather_indices_name_each_index_the_pass_keeps(llama, reordered_llama):
    """`gather_indices`: the linears whose outlier channels cost a gather index, by the index
    they share — what the pass does when every linear takes outliers (the reordered Llama),
    and, a group at a time, when only one member does."""
    graph, _, amax = llama
    groups = gather_indices(graph)
    meta = reordered_llama.meta["reordered"]
    assert set(groups) == {p for p, r in meta.items() if r["via"] in ("norm", "gather")}  # not down_proj
    assert len(set(groups.values())) == sum(n.op == "gather" for n in reordered_llama.nodes) == 7
    indices = {k for k in reordered_llama.weights if k.endswith(".reorder_index")}
    assert indices == {f"{g}.reorder_index" for g in groups.values()}
    for path in ("model.layers.1.self_attn.k_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"):
        alone = reorder(graph, outliers={path: 3}, amax=amax)
        kept = [k for k in alone.weights if k.endswith(".reorder_index")]
        assert len(kept) == (1 if path in groups else 0), path
        assert all(groups[p] == groups.get(path) for p, r in alone.meta["reordered"].items() if r["via"] == "norm")


def test_registered_pass_and_pipeline(llama, reordered_llama):
    graph, _, amax = llama
    assert PASSES["reorder"] is reorder
    assert QUANT_PIPELINE.index("smooth") < QUANT_PIPELINE.index("reorder") < QUANT_PIPELINE.index("quantize")
    opts = {"outliers": {layer_path(n, n.inputs[1].node): K8 for n in linears(graph)}, "amax": amax}
    got = run_pipeline(graph, ["reorder"], options={"reorder": opts}, verify=True).graph
    assert str(got) == str(reordered_llama)
    # from the calibration the calibrate pass attached (the batches run up to the last selected layer)
    cal = calibrate(graph, batches=[b for b in llama[1]], executor=ReferenceExecutor)
    got = reorder(cal, outliers={"model.layers.0.mlp.down_proj": 5})
    p = perm_ref(amax["model.layers.0.mlp.down_proj"], 5)
    assert got.meta["reordered"]["model.layers.0.mlp.down_proj"]["channels"] == p[-5:].tolist()


# --------------------------------------------------------------------------- mixed precision


def plan_of(rule: dict, **kw) -> mxc.Plan:
    return mxc.Plan.coerce({"default": rule, "method": "rtn", "clip_search": False, **kw})


W4A4 = {"weight": "int4<sym,g32>", "act": "int4<sym,g32>"}


def test_mixed_precision_ir_and_exact_outlier_codes(llama, reordered_llama):
    graph, _, amax = llama
    q = verify(quantize(reordered_llama, plan=plan_of({**W4A4, "options": {"outliers": K8}})))
    path = "model.layers.0.mlp.down_proj"
    nodes = [n for n in q.nodes if n.loc == path]
    assert [n.op for n in nodes] == ["slice", "quantize", "dequantize", "slice", "quantize", "dequantize",
                                     "dequantize", "dequantize", "linear", "linear", "add"]
    fmts = [n.get("format") for n in nodes if n.op == "quantize"]
    assert [str(f) for f in fmts] == ["int4<sym,g32>", "int8<sym,token>"]
    assert [(n.get("start"), n.get("end")) for n in nodes if n.op == "slice"] == [(0, 100 - K8), (100 - K8, 100)]
    r = q.meta["quantized"][path]
    assert r["weights"] == [f"{path}.weight", f"{path}.weight.scale", f"{path}.weight.outliers",
                            f"{path}.weight.outliers.scale"]
    # round to nearest: each part is exactly its format's quantization of the original columns
    w = graph.weights[f"{path}.weight"]
    outl = reordered_llama.meta["reordered"][path]["channels"]
    rest = [j for j in range(100) if j not in outl]
    int8 = parse_format("int8<sym,channel>")
    hi = int8.quantize(w[:, outl])
    assert torch.equal(q.weights[f"{path}.weight.outliers"].float(), hi.codes)
    assert torch.equal(q.weights[f"{path}.weight.outliers.scale"], hi.scale)
    lo = parse_format("int4<sym,g32>").quantize(w[:, rest])
    assert torch.equal(q.weights[f"{path}.weight"].float(), lo.codes)
    # bits and bytes count both parts
    n = 72
    want_bytes = format_bytes(parse_format("int4<sym,g32>"), (n, 100 - K8)) + format_bytes(int8, (n, K8))
    assert r["bytes"] == want_bytes == sum(p["bytes"] for p in r["parts"])
    bits = (parse_format("int4<sym,g32>").effective_bits(92) * 92 + int8.effective_bits(K8) * K8) / 100
    assert r["bits"] == pytest.approx(bits) and r["shape"] == (72, 100) and r["outliers"] == K8
    assert r["format"] == "int4<sym,g32> + 8 int8<sym,channel>" and r["act"] == "int4<sym,g32> + 8 int8<sym,token>"
    # and the tiny Llama, whose norms have outlier channels, is closer to float than without them
    plain = verify(quantize(graph, plan=plan_of(W4A4)))
    (ref,), (x,), (y,) = (llama_logits(g, [(2, 9)], 3) for g in (graph, q, plain))
    assert rel_err(x, ref) < 0.75 * rel_err(y, ref), (rel_err(x, ref), rel_err(y, ref))


def test_mixed_precision_float_outliers_and_weight_only(llama, reordered_llama):
    graph, _, _ = llama
    path = "model.layers.1.self_attn.o_proj"
    channels = reordered_llama.meta["reordered"][path]["channels"]
    w = graph.weights[f"{path}.weight"]
    q = verify(quantize(reordered_llama, plan=plan_of({**W4A4, "options": {"outlier_format": "float"}})))
    nodes = [n for n in q.nodes if n.loc == path]
    assert [n.op for n in nodes].count("quantize") == 1  # the outlier slice stays f32
    assert torch.equal(q.weights[f"{path}.weight.outliers"], w[:, channels])
    r = q.meta["quantized"][path]
    assert r["parts"][1] == {"format": "f32", "shape": (72, K8), "bits": 32.0, "bytes": 72 * K8 * 4,
                             "weights": [f"{path}.weight.outliers"], "columns": [72 - K8, 72]}
    assert r["act"] == "int4<sym,g32> + 8 f32"
    # weight-only: the activation's two parts both stay float; fp8 outliers per the option
    q = verify(quantize(reordered_llama, plan=plan_of({"weight": "int4<asym,g32>", "options": {
        "outlier_format": {"weight": "fp8e4m3<channel>"}}})))
    assert not [n for n in q.nodes if n.op == "quantize"]
    assert q.meta["quantized"][path]["format"] == "int4<asym,g32> + 8 fp8e4m3<channel>" and "act" not in q.meta["quantized"][path]
    # packed by the layout pass, each part at its own width: the report counts both parts' words
    from mxc.compiled import CompiledModel

    packed = verify(run_pipeline(q, ["layout"]).graph)
    lay = packed.meta["layout"]
    r = q.meta["quantized"][path]
    row = CompiledModel(packed, None, None, "reference").report().layers[path]
    dense = sum(-(-parse_format(part["format"]).bits * 72 * (part["columns"][1] - part["columns"][0]) // 8) for part in r["parts"])
    assert row["bytes"] == r["bytes"] - dense + lay[f"{path}.weight"]["bytes"] + lay[f"{path}.weight.outliers"]["bytes"]


def test_gptq_with_split_hessian(llama, one_thread):
    """GPTQ on the reordered graph: the Hessian comes in the new channel order, the low-bit
    part is solved under the Schur complement and the outlier columns absorb its error."""
    graph, batches, amax = llama
    outliers = {layer_path(n, n.inputs[1].node): K8 for n in linears(graph) if n.loc != "lm_head"}
    cal = calibrate(graph, batches=batches, executor=ReferenceExecutor)
    g = reorder(cal, outliers=outliers)
    errs, wq = {}, {}
    for method in ("rtn", "gptq"):
        for fmt in ("int8<sym,channel>", "float"):
            rule = {"weight": "int3<sym,g32>", "options": {"outliers": K8, "outlier_format": fmt}}
            q = quantize(g, plan=plan_of(rule, method=method, rules=[{"match": "lm_head"}]))
            errs[method, fmt] = {p: r["output_error"] for p, r in q.meta["quantized"].items()}
            wq[method, fmt] = q.weights
    for fmt in ("int8<sym,channel>", "float"):
        better = [p for p in outliers if errs["gptq", fmt][p] < errs["rtn", fmt][p]]
        assert len(better) == len(outliers), (fmt, errs)
    # with f32 outlier columns, GPTQ has moved them (error compensation); rounding left them
    name = "model.layers.0.mlp.down_proj.weight.outliers"
    assert torch.equal(wq["rtn", "float"][name], g.weights["model.layers.0.mlp.down_proj.weight"][:, -K8:])
    assert not torch.allclose(wq["gptq", "float"][name], wq["rtn", "float"][name])
    # int8 outliers under GPTQ are int8 codes with per-row scales
    codes = wq["gptq", "int8<sym,channel>"][name]
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 127


@pytest.fixture(scope="module")
def outlier_model(tiny_llama_factory):
    """A one-layer tiny Llama whose norms have a few outlier channels, calibration text and
    held-out inputs with the float logits."""
    model = tiny_llama_factory(seed=3, layers=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                p[torch.randperm(p.numel(), generator=gen)[:2]] *= 25.0
    calib = [torch.randint(0, 131, (48,), generator=gen) for _ in range(3)]
    ids = torch.randint(0, 131, (2, 30), generator=gen)
    with torch.no_grad():
        ref = model(ids).logits
    return model, calib, ids, ref


def test_compiled_tiny_llama_with_outliers_is_closer_to_float(outlier_model, one_thread):
    model, calib, ids, ref = outlier_model
    rule = {"weight": "int4<sym,g32>", "act": "int4<sym,g32>"}
    plain = mxc.compile(model, {"default": rule}, example_inputs=ids, calibration=calib)
    mixed = mxc.compile(model, {"default": {**rule, "options": {"outliers": 8}}}, example_inputs=ids, calibration=calib)
    assert mixed.plan.method == "gptq" and "reorder" in mixed.timings
    err_plain, err_mixed = rel_err(plain(ids).logits, ref), rel_err(mixed(ids).logits, ref)
    assert err_mixed < 0.75 * err_plain, (err_mixed, err_plain)
    assert len(mixed.graph.meta["reordered"]) == 8 and "reordered" not in plain.graph.meta
    # the report counts both parts of every layer
    rep = mixed.report()
    for path, r in rep.layers.items():
        assert r["bytes"] == sum(p["bytes"] for p in r["parts"]) and len(r["weights"]) == 4, path
        n, k = r["shape"]
        assert r["bits"] == pytest.approx(sum(p["bits"] * p["shape"][1] for p in r["parts"]) / k)
        for part, (lo, hi) in zip(r["parts"], [(0, k - 8), (k - 8, k)]):
            fmt = parse_format(part["format"])
            # the codes as the layout pass stores them: ceil(bits·K/32) int32 words per row
            packed = n * packed_words(hi - lo, fmt.bits) * 4 - -(-fmt.bits * n * (hi - lo) // 8)
            assert part["columns"] == [lo, hi] and part["bytes"] == format_bytes(fmt, (n, hi - lo)) + packed
            codes = next(c for c in mixed.graph.nodes if c.op == "const" and c.get("name") == part["weights"][0])
            assert tuple(codes.types[0].shape) == (n, hi - lo)
    row = next(line for line in str(rep).splitlines() if line.split()[:1] == ["lm_head"])
    assert "int4<sym,g32> + 8 int8<sym,channel>" in row
    assert rep.avg_bits > plain.report().avg_bits


def test_no_calibration_warns_and_skips(tiny_llama, one_thread):
    ids = torch.randint(0, 131, (1, 7))
    with pytest.warns(UserWarning, match=r"no calibration data, so .*outlier channels are not reordered"):
        c = mxc.compile(tiny_llama, {"default": {"act": "int8<sym,token>", "options": {"outliers": 4}}}, example_inputs=ids)
    assert "reordered" not in c.graph.meta and not [n for n in c.graph.walk() if n.op == "gather"]
    assert sum(n.op == "linear" for n in c.graph.walk()) == 15  # no layer split in two


# --------------------------------------------------------------------------- bad options


def test_bad_options(llama, reordered_llama):
    graph, _, amax = llama
    for bad in (-1, 1.5, -0.1, "8", True):
        with pytest.raises(ValueError, match=r"rule '\*': option outliers must be a count of input channels "
                                             r"\(an integer >= 0\) or a fraction of K in \[0, 1\), got"):
            mxc.Plan.coerce({"default": {"weight": "int4<sym,g32>", "options": {"outliers": bad}}})
    with pytest.raises(ValueError, match=r"rule 'm\.\*': outlier_format weight must be a number format text.*"
                                         r"got 'int9<sym,channel>'"):
        mxc.Plan.coerce({"rules": [{"match": "m.*", "weight": "int4<sym,g32>", "options": {"outlier_format": "int9<sym,channel>"}}]})
    with pytest.raises(ValueError, match=r"outlier_format act int8<sym,channel> scales per channel"):
        mxc.Plan.coerce({"default": {"options": {"outlier_format": {"act": "int8<sym,channel>"}}}})
    with pytest.raises(ValueError, match=r"outlier_format must be .*got \{'weights': 'int8<sym,channel>'\}"):
        mxc.Plan.coerce({"default": {"options": {"outlier_format": {"weights": "int8<sym,channel>"}}}})
    # counts against the layer's K
    q = "model.layers.0.self_attn.q_proj"
    assert outlier_count(0.1, 72, q) == 7 and outlier_count(8, 72, q) == 8
    with pytest.raises(ValueError, match=rf"layer '{q}': outliers must be a count of input channels in \[0, 72\) "
                                         r"\(K=72.*got 100"):
        outlier_count(100, 72, q)
    with pytest.raises(ValueError, match=r"got 0\.999 \(72 of 72 channels\)"):
        outlier_count(0.999, 72, q)
    with pytest.raises(ValueError, match=rf"reorder: layer '{q}': outliers must be an integer count in \[0, 72\) "
                                         r"\(weight 'model.layers.0.self_attn.q_proj.weight' has K=72.*got 72"):
        reorder(graph, outliers={q: 72}, amax=amax)
    with pytest.raises(ValueError, match=r"layer 'lm_head': outliers must be an integer count .*got -2"):
        reorder(graph, outliers={"lm_head": -2}, amax=amax)
    with pytest.raises(ValueError, match=r"outliers names \['model.layers.0.mlp.gate'\], which are no linear layers"):
        reorder(graph, outliers={"model.layers.0.mlp.gate": 4}, amax=amax)
    with pytest.raises(ValueError, match=rf"layer '{q}': amax must be a tensor of shape \[72\].*got \[71\]"):
        reorder(graph, outliers={q: 4}, amax={q: amax[q][:71]})
    with pytest.raises(ValueError, match=rf"layer '{q}' asks for outlier channels but has no amax"):
        reorder(graph, outliers={q: 4}, amax={})
    with pytest.raises(ValueError, match=r"need.*run the calibrate pass|ranked by activation statistics: run the calibrate"):
        reorder(fresh(graph), outliers={q: 4})
    # the quantize pass names the layer (a plan-like object whose rule skipped validation)
    rule = types.SimpleNamespace(weight=parse_format("int4<sym,g32>"), act=None, kv=None,
                                 options={"outlier_format": "int8<bogus>"})
    plan = types.SimpleNamespace(method="rtn", clip_search=False, rule_for=lambda path, op="linear": rule)
    with pytest.raises(ValueError, match=rf"layer '{q}': outlier_format weight must be .*got 'int8<bogus>'"):
        quantize(reordered_llama, plan=plan)
