"""fuse: golden IR texts before/after each kind of group (and near misses that must stay as
they are: a would-be cycle, SwiGLU linears that read different inputs or whose silu is read
elsewhere, weights that are not dequantized consts), function preservation bit for bit on
every golden, the `groups` option, the region's text form, verifier and reference execution,
and the tiny Llama compiled with int4 weights, int8 activations and an int8 KV cache: the
groups formed, logits equal to the unfused graph's, the text round trip and the fixed point.

Golden files live in tests/golden/fuse/: `X.before.mxir` is parsed, given random weights
(quantized constants are real quantizations of random tensors), fused and printed; the text
must equal `X.after.mxir`. To accept a deliberate change, run
`MXC_UPDATE_GOLDEN=1 pytest tests/passes/test_fuse.py`, which writes the after files instead
of comparing, and review the diff. `near_miss_*` cases must come back as the same graph.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import mxc
from mxc.ir import Graph, Node, ParseError, VerificationError, parse, verify
from mxc.passes import PASSES, run_pipeline
from mxc.passes.fuse import KINDS, fuse
from mxc.runtime import ReferenceExecutor
from mxc.runtime.reference import ExecutionError
from golden_files import check_golden, golden_before
from graph_helpers import input_shapes, with_random_weights

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "fuse"
CASES = sorted(p.name.removesuffix(".before.mxir") for p in GOLDEN.glob("*.before.mxir"))
SIZES = [{"b": 1, "s": 1}, {"b": 3, "s": 7}, {"b": 2, "s": 13}]


def random_inputs(graph: Graph, sizes: dict[str, int], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [shape for _, shape in input_shapes(graph, sizes)]
    return [torch.randn(shape, generator=gen) for shape in shapes]


def assert_same_function(before: Graph, after: Graph, sizes_list=SIZES) -> None:
    """Both graphs give bit-identical outputs on fresh random inputs at each size binding."""
    run_before = ReferenceExecutor(before, check_shapes=True)
    run_after = ReferenceExecutor(after, check_shapes=True)
    for k, sizes in enumerate(sizes_list):
        inputs = random_inputs(before, sizes, seed=k)
        for i, (x, y) in enumerate(zip(run_before(inputs), run_after(inputs))):
            torch.testing.assert_close(y, x, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"output {i} at {sizes}: {m}")


def regions(graph: Graph) -> list[tuple[str, list[str]]]:
    """(kind, ops of its region) for each fused node, in order."""
    return [(n.get("kind"), [m.op for m in n.get("body").nodes]) for n in graph.nodes if n.op == "fused"]


def golden(case: str, which: str = "before") -> Graph:
    return parse((GOLDEN / f"{case}.{which}.mxir").read_text())


# --------------------------------------------------------------------------- golden IR


def test_fuse_is_registered():
    assert PASSES["fuse"] is fuse


def test_golden_cases_exist():
    assert {"dequant_gemm", "epilogue_two_readers", "norm_quant", "swiglu", "swiglu_qlinear", "rope_kv", "reordered"} <= set(CASES)
    assert {"near_miss_cycle", "near_miss_swiglu", "near_miss_unquantized"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_golden(case):
    before, text = golden_before(GOLDEN, case, with_random_weights)
    after = verify(fuse(before))
    check_golden(GOLDEN / f"{case}.after.mxir", str(after))
    assert (after is before) == (str(after) == text)
    if case.startswith("near_miss"):
        assert after is before, f"{case} must not be fused"
        assert "fused" not in before.meta
    else:
        assert after is not before and "fused" not in before.op_counts()
        assert sum(after.meta["fused"].values()) == after.op_counts()["fused"]
    # the text form parses back to the same text, and the result is a fixed point
    reparsed = verify(parse(str(after), weights=after.weights))
    assert str(reparsed) == str(after)
    assert fuse(after) is after and fuse(reparsed) is reparsed
    # the rewrite preserves the function bit for bit, also after the round trip
    assert_same_function(before, after)
    assert_same_function(before, reparsed, SIZES[1:2])


def test_golden_reorder_gathers_join_their_quantize_kernels():
    """The reorder pass's gathers are no pass over memory of their own: a norm's joins the
    norm group (also with nothing quantized after it), the attention-side one the quantize."""
    after = golden("reordered", "after")
    assert regions(after) == [
        ("norm_quant", ["gather", "rms_norm", "slice", "quantize", "slice", "quantize"]),
        ("dequant_gemm", ["qlinear"]),  # the outlier channels' int8 GEMM
        ("dequant_gemm", ["qlinear", "add"]),  # the main GEMM adds it in its epilogue
        ("act_quant", ["gather", "slice", "quantize", "slice", "quantize"]),
        ("dequant_gemm", ["qlinear"]),
        ("dequant_gemm", ["qlinear", "add"]),
        ("norm_quant", ["gather", "layer_norm"]),
    ]
    assert "gather" not in after.op_counts()


def test_golden_fuses_what_it_says():
    assert regions(golden("dequant_gemm", "after")) == [
        ("dequant_gemm", ["dequantize", "linear", "add", "gelu", "add"]),  # bias, activation, residual
        ("dequant_gemm", ["dequantize", "linear"]),
    ]
    two = golden("epilogue_two_readers", "after")
    assert regions(two) == [("dequant_gemm", ["dequantize", "linear"])] * 2  # results read twice / returned
    assert [n.op for n in two.nodes if n.op not in ("const", "fused")] == ["silu", "mul", "silu"]
    assert regions(golden("norm_quant", "after")) == [
        ("norm_quant", ["rms_norm", "quantize", "dequantize", "quantize", "dequantize"]),
        ("norm_quant", ["layer_norm", "quantize", "dequantize"]),
    ]
    ln = [n for n in golden("norm_quant", "after").nodes if n.op == "fused"][1]
    assert [v.node.op for v in ln.get("body").outputs] == ["layer_norm", "dequantize"]  # the norm is read outside too
    mlp = golden("swiglu", "after")
    assert regions(mlp) == [
        ("norm_quant", ["rms_norm", "quantize", "dequantize", "quantize", "dequantize"]),
        ("swiglu", ["dequantize", "linear", "silu", "dequantize", "linear", "mul"]),
        ("dequant_gemm", ["dequantize", "linear", "add"]),
    ]
    assert [n.op for n in mlp.nodes if n.op not in ("const", "fused")] == ["quantize", "dequantize"]  # down_proj's input
    folded = golden("swiglu_qlinear", "after")  # the fold pass's integer GEMMs read the codes and scales
    assert regions(folded) == [
        ("norm_quant", ["rms_norm", "quantize", "quantize"]),
        ("swiglu", ["qlinear", "silu", "qlinear", "mul"]),
        ("dequant_gemm", ["qlinear", "add"]),
    ]
    assert [str(t.dtype) for t in folded.nodes[1].types] == ["int8<sym,token>", "f32"] * 2
    rope = golden("rope_kv", "after")
    # the attention kernel dequantizes the KV cache as it loads it: keys from the rope group's codes
    assert regions(rope) == [("rope_kv", ["rope", "quantize"]), ("attention", ["dequantize", "dequantize", "attention"])]
    attention = rope.nodes[-1]
    assert attention.op == "fused" and [v.node.op for v in attention.inputs] == ["fused", "fused", "quantize", "quantize", "rope"]
    assert [str(v.type.dtype) for v in attention.inputs[:4]] == ["int8<sym,token>", "f32"] * 2  # codes and scales


def test_fused_node_holds_no_const_and_keeps_locations():
    g = golden("dequant_gemm", "after")
    for node in g.nodes:
        if node.op == "fused":
            body = node.get("body")
            assert "const" not in body.op_counts()
            assert node.loc == next(n.loc for n in body.nodes if n.op == "linear")
    first = next(n for n in g.nodes if n.op == "fused")
    # tensors first, then weights, each in order of first use; the region's arguments match
    assert [v.node.get("name") for v in first.inputs] == ["x", "res", "fc1.weight", "fc1.weight.scale", "fc1.weight.zero", "fc1.bias"]
    assert [a.types[0] for a in first.get("body").inputs] == [v.type for v in first.inputs]


def test_would_be_cycle_is_the_only_obstacle():
    """near_miss_cycle's quantize scale is computed from the norm's result, so the group
    {norm, quantize, dequantize} would be its own ancestor; with a const scale it forms."""
    text = (GOLDEN / "near_miss_cycle.before.mxir").read_text()
    cycle = golden("near_miss_cycle")
    assert fuse(cycle) is cycle
    lines = text.splitlines(True)
    assert "aten.amax" in lines[3] and "aten.div" in lines[4]
    lines[3:5] = ['  %2 = const() {name="fc.input_scale"} : f32[1, 1]\n']
    static = with_random_weights(verify(parse("".join(lines))))
    fused = verify(fuse(static))
    assert regions(fused) == [("norm_quant", ["rms_norm", "quantize", "dequantize"])]
    assert_same_function(static, fused)


def test_meta_records_the_groups():
    g = fuse(with_random_weights(golden("swiglu")))
    assert g.meta["fused"] == {"swiglu": 1, "dequant_gemm": 1, "norm_quant": 1, "act_quant": 0, "attention": 0, "rope_kv": 0}
    assert fuse(with_random_weights(golden("swiglu")), groups=["rope_kv", "swiglu"]).meta["fused"] == {"swiglu": 1, "rope_kv": 0}


def test_groups_switch_kinds_off():
    before = with_random_weights(golden("swiglu"))
    only_gemm = verify(fuse(before, groups=("dequant_gemm",)))
    # without swiglu, gate/up are GEMMs of their own: gate takes the silu as epilogue
    assert regions(only_gemm) == [
        ("dequant_gemm", ["dequantize", "linear", "silu"]),
        ("dequant_gemm", ["dequantize", "linear"]),
        ("dequant_gemm", ["dequantize", "linear", "add"]),
    ]
    assert only_gemm.op_counts()["rms_norm"] == 1 and only_gemm.op_counts()["mul"] == 1
    assert_same_function(before, only_gemm)
    assert fuse(before, groups=()) is before
    assert fuse(before, groups=("rope_kv",)) is before
    assert str(fuse(before, groups="dequant_gemm")) == str(only_gemm)
    with pytest.raises(ValueError, match=r"unknown fusion group kind\(s\) \['gemm'\]; expected some of"):
        fuse(before, groups=("gemm",))
    assert set(KINDS) == {"norm_quant", "act_quant", "dequant_gemm", "swiglu", "attention", "rope_kv"}


# --------------------------------------------------------------------------- the region's text form

REGION = """\
graph @r(%x: f32[b, 8]) {
  dim b in [1, oo]
  %0 = const() {name="w"} : f32[6, 8]
  %1 = fused(%x, %0) {kind="k"} : f32[b, 6] loc("fc") {
    ^(%a0: f32[b, 8], %a1: f32[6, 8])
    %0 = linear(%a0, %a1) : f32[b, 6] loc("fc")
    %1 = silu(%0) : f32[b, 6]
    yield %1
  }
  return %1
}
"""


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(VerificationError) as e:
        verify(parse(text))
    return e.value.problems


def test_region_text_round_trips_and_runs():
    g = verify(parse(REGION))
    assert str(g) == REGION
    node = g.nodes[1]
    assert node.attr["kind"] == "k" and isinstance(node.attr["body"], Graph) and list(node.attr) == ["kind", "body"]
    w = torch.randn(6, 8)
    x = torch.randn(3, 8)
    (y,) = ReferenceExecutor(g.replace(weights={"w": w}), check_shapes=True)([x])
    assert torch.equal(y, torch.nn.functional.silu(torch.nn.functional.linear(x, w)))


def test_verifier_checks_regions():
    fused_line = '%1 = fused(%x, %0) {kind="k"} : f32[b, 6] loc("fc")'
    # the operands must match the region's arguments, the results its yields
    assert problems(REGION.replace("^(%a0: f32[b, 8]", "^(%a0: f32[b, 9]")) == [
        (fused_line, "fused: operand 0 is f32[b, 8], region argument 0 is f32[b, 9]"),
        ('%0 = linear(%a0, %a1) : f32[b, 6] loc("fc")', "in the region of %1: linear: input's last dim must be K=8, got f32[b, 9]"),
    ]
    assert problems(REGION.replace(': f32[b, 6] loc("fc") {', ': f32[b, 7] loc("fc") {')) == [
        (fused_line.replace("[b, 6]", "[b, 7]"), "result 0 declared f32[b, 7], but fused of these operands gives f32[b, 6]"),
    ]
    # weights stay outside: a region holds no const
    text = REGION.replace("    %0 = linear(", '    %9 = const() {name="v"} : f32[6, 8]\n    %0 = linear(')
    no_const = "in the region of %1: a region holds no const: weights are operands of the node that holds the region"
    assert problems(text) == [('%0 = const() {name="v"} : f32[6, 8]', no_const)]
    # a fused node needs its region; a region's yields are its own values
    g = parse(REGION)
    weight, node = g.nodes
    bad = Node.create("fused", [], {"kind": "k"}, node.types)
    with pytest.raises(VerificationError, match="fused needs attribute 'body'"):
        verify(g.replace(nodes=[weight, bad], outputs=[bad.out]))
    broken = node.replace(attrs={"kind": "k", "body": node.get("body").replace(outputs=[weight.out])})
    with pytest.raises(VerificationError, match=r"yield\n    error: in the region of %1: output 0 is not defined in the graph"):
        verify(g.replace(nodes=[weight, broken], outputs=[broken.out]))


@pytest.mark.parametrize(
    "old,new,message",
    [
        ("%0 = linear(%a0, %a1)", "%0 = linear(%x, %a1)",
         "line 6: '%x' is not a value defined above (a region reads only its ^(...) arguments)"),
        ("    ^(%a0: f32[b, 8], %a1: f32[6, 8])\n", "",
         "line 5: expected the region's arguments '^(%name: TYPE, ...)', got '%0 = linear(%a0, %a1) : f32[b, 6] loc(\"fc\")'"),
        ("    yield %1\n", "", "line 8: expected '%N = op(...) : TYPE' or 'yield', got '}'"),
        ("    yield %1\n", "    dim c in [1, oo]\n    yield %1\n", "line 8: expected '%N = op(...) : TYPE' or 'yield', got 'dim c in [1, oo]'"),
        ("    yield %1\n  }\n", "    yield %1\n    %2 = silu(%1) : f32[b, 6]\n  }\n",
         "line 9: expected '}' after yield, got '%2 = silu(%1) : f32[b, 6]'"),
        ("  }\n  return %1\n}\n", "", "line 8: unexpected end of IR text: expected 'yield ...' and '}'"),
    ],
)
def test_region_parse_errors(old, new, message):
    assert old in REGION
    with pytest.raises(ParseError) as e:
        parse(REGION.replace(old, new))
    assert str(e.value) == message


def test_reference_names_the_failing_node_in_a_region():
    g = parse(REGION).replace(weights={"w": torch.randn(6, 9)})  # not the declared [6, 8]
    with pytest.raises(ExecutionError) as e:
        ReferenceExecutor(g, check_shapes=True)([torch.randn(3, 8)])
    msg = str(e.value)
    assert 'graph @r: node %0 = linear(%a0, %a1) : f32[b, 6] loc("fc"), in the region of %1 = fused(%x, %0)' in msg
    assert "failed: RuntimeError" in msg


# --------------------------------------------------------------------------- the tiny Llama

PLAN = {
    "rules": [{"match": "*", "op": "attention", "kv": "int8<sym,token>"}],
    "default": {"weight": "int4<asym,g32>", "act": "int8<sym,token>"},
}
LAYERS = 2
#: The graph as `mxc.compile` returns it (the fold pass turned every linear into a `qlinear`
#: on the activation codes), and as the quantize pass leaves it (`quantize`->`dequantize`
#: of each activation, `dequantize` of each weight, `linear`).
FORMS = ["compiled", "unfolded"]


@pytest.fixture(scope="module")
def quantized(tiny_llama, captured_tiny_llama):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no calibration data: round to nearest, no smoothing
        # the pipeline up to fold: layout and fuse are what this file runs and checks
        plan = {**PLAN, "passes": {"layout": False, "fuse": False}}
        compiled = mxc.compile(tiny_llama, plan, example_inputs=torch.randint(0, 131, (2, 13)), calibration=None)
    plan = mxc.Plan.coerce(PLAN).resolved(calibrated=False)
    options = {"quantize": {"plan": plan}}
    unfolded = run_pipeline(captured_tiny_llama.graph, ["canonicalize", "quantize"], options=options, verify=True).graph
    return {"compiled": compiled.graph, "unfolded": unfolded}


@pytest.fixture(scope="module")
def fused(quantized):
    return {form: run_pipeline(g, ["fuse"], verify=True).graph for form, g in quantized.items()}


def inner_nodes(graph: Graph) -> list[tuple[str, Node]]:
    """(group kind, node) for every node inside a region."""
    return [(n.get("kind"), m) for n in graph.nodes if n.op == "fused" for m in n.get("body").nodes]


@pytest.mark.parametrize("form", FORMS)
def test_tiny_llama_groups(tiny_llama, quantized, fused, form):
    before, after = quantized[form], fused[form]
    assert tiny_llama.config.num_hidden_layers == LAYERS
    assert after.meta["fused"] == {"swiglu": LAYERS, "dequant_gemm": 5 * LAYERS + 1, "norm_quant": 2 * LAYERS + 1, "act_quant": 0, "attention": LAYERS, "rope_kv": LAYERS}
    gemm = "qlinear" if form == "compiled" else "linear"
    assert before.op_counts()[gemm] == 7 * LAYERS + 1 and not {"linear", "qlinear"} - {gemm} & set(before.op_counts())
    outer = after.op_counts()
    for op in ("linear", "qlinear", "rms_norm", "silu"):
        assert op not in outer, (op, outer)
    assert outer["rope"] == LAYERS  # of the queries: only keys are cached (and quantized)
    assert outer["quantize"] == 3 * LAYERS  # the values' (KV cache), o_proj's and down_proj's inputs
    # every (quantized) GEMM is in a group: gate and up in their SwiGLU, the others on their own
    inside = inner_nodes(after)
    gemms = {n.loc: kind for kind, n in inside if n.op == gemm}
    assert sorted(gemms) == sorted(n.loc for n in before.nodes if n.op == gemm)
    for path, kind in gemms.items():
        assert kind == ("swiglu" if path.endswith(("gate_proj", "up_proj")) else "dequant_gemm"), path
    wdq = ["dequantize"] if form == "unfolded" else []  # a weight dequantize joins its GEMM
    adq = ["dequantize"] if form == "unfolded" else []  # an activation dequantize joins its quantize
    for node in after.nodes:
        if node.op != "fused":
            continue
        kind, ops = node.get("kind"), [m.op for m in node.get("body").nodes]
        if kind == "dequant_gemm":  # o_proj and down_proj take the residual add
            residual = ["add"] if node.loc.endswith(("o_proj", "down_proj")) else []
            assert ops == wdq + [gemm] + residual, (node.loc, ops)
        elif kind == "swiglu":
            assert ops == (wdq + [gemm, "silu"] + wdq + [gemm, "mul"])
        elif kind == "norm_quant":  # q, k, v read the input norm; gate, up the post-attention norm; lm_head the last
            n = 3 if node.loc.endswith("input_layernorm") else 2 if node.loc.endswith("post_attention_layernorm") else 1
            n = n if form == "unfolded" else 1  # fold merged the copies: one quantize per activation
            assert ops == ["rms_norm"] + (["quantize"] + adq) * n, (node.loc, ops)
        elif kind == "rope_kv":  # the keys' codes and scales go to the attention kernel
            assert ops == ["rope", "quantize"]
            assert all(r.op == "fused" and r.get("kind") == "attention" for r in after.users()[node])
        else:  # attention, dequantizing the keys and values as it loads them
            assert kind == "attention" and ops == ["dequantize", "dequantize", "attention"], (kind, ops)
    # the input graph is left as it was
    assert "fused" not in before.op_counts() and "fused" not in before.meta


@pytest.mark.parametrize("form", FORMS)
def test_tiny_llama_fused_logits_equal_unfused(tiny_llama, quantized, fused, form):
    run_before = ReferenceExecutor(quantized[form], check_shapes=True)
    run_after = ReferenceExecutor(fused[form], check_shapes=True)
    vocab = tiny_llama.config.vocab_size
    for b, s in [(1, 1), (2, 7), (3, 13), (1, 29)]:
        ids = torch.randint(0, vocab, (b, s))
        (before,) = run_before([ids])
        (after,) = run_after([ids])
        assert after.shape == (b, s, vocab)
        assert torch.equal(before, after), f"logits differ at (b, s) = {(b, s)}"


@pytest.mark.parametrize("form", FORMS)
def test_tiny_llama_fused_text_round_trip(quantized, fused, form):
    g = fused[form]
    text = str(g)
    reparsed = verify(parse(text, weights=g.weights))
    assert str(reparsed) == text
    assert fuse(g) is g and fuse(reparsed) is reparsed
    ids = torch.randint(0, 131, (2, 9))
    assert torch.equal(ReferenceExecutor(reparsed)([ids])[0], ReferenceExecutor(quantized[form])([ids])[0])


def test_tiny_llama_fuse_after_layout(quantized):
    """In pipeline order (layout, then fuse) the GEMM groups take the packed codes as operands
    and their regions' dequantize unpacks them: the logits do not change."""
    if "layout" not in PASSES:
        pytest.skip("no layout pass")
    packed = run_pipeline(quantized["unfolded"], ["layout"], verify=True).graph
    both = run_pipeline(packed, ["fuse"], verify=True).graph
    gemms = [n for n in both.nodes if n.op == "fused" and n.get("kind") in ("dequant_gemm", "swiglu")]
    assert gemms and all(any(v.type.layout is not None for v in n.inputs) for n in gemms)
    for n in gemms:
        assert [a.types[0] for a in n.get("body").inputs] == [v.type for v in n.inputs]
    assert str(parse(str(both), weights=both.weights)) == str(both)
    ids = torch.randint(0, 131, (2, 9))
    assert torch.equal(ReferenceExecutor(both, check_shapes=True)([ids])[0], ReferenceExecutor(packed)([ids])[0])
