"""layout: golden IR before/after packing (every element format and width 1..8, a weight read
by an embedding and a tied lm_head, and near misses that must stay as they are), bit-exact
function preservation on the goldens and on the tiny Llama quantized with several plans,
the packed storage and its recorded bytes, the report's byte counts, the print/parse round
trip of a packed graph, and the verifier's layout rules.

Golden files live in tests/golden/layout/: `X.before.mxir` is parsed, given the quantized
weights of fresh random matrices (`quantized_weights`), packed and printed; the text must
equal `X.after.mxir`. To accept a deliberate change, run
`MXC_UPDATE_GOLDEN=1 pytest tests/passes/test_layout.py` and review the diff. `near_miss_*`
cases must come back as the same graph object.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mxc.compiled import CompiledModel
from mxc.ir import Graph, Layout, Node, VerificationError, parse, verify
from mxc.ir.ops import quant_parts
from mxc.ir.packing import pack, packed_words, to_codes, unpack
from mxc.passes import PASSES, run_pipeline
from mxc.passes.canonicalize import canonicalize
from mxc.passes.layout import choose_layout, kernel_family, layout
from mxc.passes.quantize import storage
from mxc.plan import Plan, Rule
from mxc.runtime import ExecutionError, ReferenceExecutor
from golden_files import check_golden, golden_before
from graph_helpers import input_shapes

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "layout"
CASES = sorted(p.name.removesuffix(".before.mxir") for p in GOLDEN.glob("*.before.mxir"))
SIZES = [{"b": 1, "s": 1}, {"b": 2, "s": 7}, {"b": 3, "s": 5}]


def weight_parts(graph: Graph) -> list[tuple[Node, object, tuple]]:
    """(reader, format, part values) of every quantized weight: the const operands of a weight
    `dequantize`, and a `qlinear`'s weight parts."""
    out = []
    for node in graph.nodes:
        if node.op == "dequantize" and node.inputs[0].node.op == "const":
            out.append((node, node.get("format"), node.inputs))
        elif node.op == "qlinear":
            fmt, na = node.get("weight"), len(quant_parts(node.get("act")))
            out.append((node, fmt, node.inputs[na : na + len(quant_parts(fmt))]))
    return out


def quantized_weights(graph: Graph) -> Graph:
    """`graph` with weights: every quantized weight's parts are those of `fmt.quantize` of a
    fresh random matrix (codes in their `storage` dtype, packed where the type says so);
    other consts are random floats."""
    weights = {}
    for _, fmt, values in weight_parts(graph):
        t = values[0].type
        w = torch.randn(t.shape) * torch.exp(torch.randn(t.shape[0], 1))
        q = fmt.quantize(w)
        parts = {"codes": storage(q.codes, fmt), "scale": q.scale, "zero": q.zero, "global": q.global_scale}
        for part, v in zip(quant_parts(fmt), values):
            if part == "codes" and t.layout is not None:
                parts[part] = pack(to_codes(parts[part], fmt), t.layout)
            weights[v.node.get("name")] = parts[part]
    for node in graph.nodes:
        if node.op == "const" and node.get("name") not in weights:
            weights[node.get("name")] = torch.randn(node.types[0].shape)
    return graph.replace(weights=weights)


def random_inputs(graph: Graph, sizes: dict[str, int]) -> list[torch.Tensor]:
    return [torch.randint(0, 50, shape) if t.dtype.kind == "int" else torch.randn(shape) for t, shape in input_shapes(graph, sizes)]


def assert_same_function(before: Graph, after: Graph) -> None:
    """Bit-identical outputs on fresh random inputs at each size binding."""
    run_before = ReferenceExecutor(before, check_shapes=True)
    run_after = ReferenceExecutor(after, check_shapes=True)
    for sizes in SIZES:
        inputs = random_inputs(before, sizes)
        for i, (x, y) in enumerate(zip(run_before(inputs), run_after(inputs))):
            assert torch.equal(x, y), f"output {i} differs at {sizes}"


# --------------------------------------------------------------------------- goldens


def test_golden_cases_exist():
    assert {"linear_int3", "mlp_mixed", "widths", "embedding_tied", "qlinear_mixed"} <= set(CASES)
    assert sum(c.startswith("near_miss") for c in CASES) >= 2


@pytest.mark.parametrize("case", CASES)
def test_golden(case):
    before, text = golden_before(GOLDEN, case, quantized_weights)
    after = verify(layout(before))
    check_golden(GOLDEN / f"{case}.after.mxir", str(after))
    assert (after is before) == case.startswith("near_miss"), f"{case}: rewritten iff not a near miss"
    assert layout(after) is after  # a fixed point
    reparsed = parse(str(after), weights=after.weights)
    assert str(reparsed) == str(after) and layout(verify(reparsed)) is reparsed
    assert_same_function(before, after)
    assert_same_function(before, reparsed)


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("near_miss")])
def test_golden_packs_every_weight_code_tensor(case):
    """Every codes const becomes int32 words [N, ceil(bits·K/32)] with its layout recorded;
    scales and zero points keep their tensors; the input graph keeps its own weights."""
    before = quantized_weights(parse((GOLDEN / f"{case}.before.mxir").read_text()))
    after = layout(before)
    codes = weight_parts(after)
    assert codes
    assert set(after.meta["layout"]) == {values[0].node.get("name") for _, _, values in codes}
    for _, _, values in codes:
        const = values[0].node
        name, t = const.get("name"), const.types[0]
        assert t.layout == Layout(bits=t.dtype.bits, axis=1)
        n, k = t.shape
        words = after.weights[name]
        assert words.dtype == torch.int32 and tuple(words.shape) == (n, -(-t.dtype.bits * k // 32))
        assert after.meta["layout"][name] == {"layout": str(t.layout), "bytes": n * packed_words(k, t.dtype.bits) * 4}
        assert before.weights[name].dtype in (torch.int8, torch.uint8, torch.float16)
        assert torch.equal(unpack(words, t.layout, k), to_codes(before.weights[name], t.dtype))
        for v in values[1:]:
            assert after.weights[v.node.get("name")] is before.weights[v.node.get("name")]
    assert "layout" not in before.meta


def test_golden_after_files_say_what_they_should():
    int3 = parse((GOLDEN / "linear_int3.after.mxir").read_text())
    assert str(int3.nodes[0].types[0]) == "int3<asym,g32>[40, 72] packed<bits=3,word=i32,axis=1>"
    widths = parse((GOLDEN / "widths.after.mxir").read_text())
    bits = [n.types[0].layout.bits for n in widths.nodes if n.op == "const" and n.types[0].layout is not None]
    assert bits == [1, 2, 4, 6, 7, 8, 8, 8, 6, 4]
    mlp = parse((GOLDEN / "mlp_mixed.after.mxir").read_text())
    # the activation's quantize result is a run-time value: not packed
    assert all(t.layout is None for n in mlp.nodes if n.op == "quantize" for t in n.types)


def test_kernel_family():
    g = parse((GOLDEN / "embedding_tied.before.mxir").read_text())
    users = g.users()
    assert kernel_family([g.nodes[2]], users) == "dequant"  # an embedding and a tied lm_head read it
    g = parse((GOLDEN / "linear_int3.before.mxir").read_text())
    assert kernel_family([g.nodes[3]], g.users()) == "dequant_gemm"
    g = parse((GOLDEN / "qlinear_mixed.before.mxir").read_text())
    assert kernel_family([g.nodes[3]], g.users()) == "qgemm"
    with pytest.raises(ValueError, match="unknown kernel family 'mma'"):
        choose_layout(g.nodes[0].types[0], "mma")


def test_options_and_errors():
    g = quantized_weights(parse((GOLDEN / "linear_int3.before.mxir").read_text()))
    assert PASSES["layout"] is layout
    with pytest.raises(ValueError, match="unknown storage word 'i64'; expected one of i32"):
        layout(g, word="i64")
    with pytest.raises(ValueError, match="weight 'fc.weight'.*no tensor"):
        layout(g.replace(weights={k: v for k, v in g.weights.items() if k != "fc.weight"}))
    bad = dict(g.weights, **{"fc.weight": torch.full((40, 72), 9, dtype=torch.uint8)})
    with pytest.raises(ValueError, match=r"weight 'fc.weight'.*int3<asym,g32> values must be integers in \[0, 7\], got 9"):
        layout(g.replace(weights=bad))


# --------------------------------------------------------------------------- verifier rules


def _packed_int3() -> Graph:
    return layout(quantized_weights(parse((GOLDEN / "linear_int3.before.mxir").read_text())))


@pytest.mark.parametrize(
    "layout_text, message",
    [
        ("packed<bits=4,word=i32,axis=1>", "packed codes of int3<asym,g32> must have layout bits=3, got int3<asym,g32>[40, 72] packed<bits=4"),
        ("packed<bits=3,word=i32,axis=0>", "packed along their last (reduction) axis 1"),
        ("packed<bits=3,word=i64,axis=1>", "word must be one of i32, got 'i64'"),
        ("packed<bits=3,word=i32,axis=1,order=[1,0]>", "order must permute the 32 elements of a super-group"),
        ("packed<bits=3,word=i32,axis=1,tile=[3,7]>", "40 rows are not a multiple of the tile's 3"),
    ],
)
def test_verifier_rejects_bad_layouts(layout_text, message):
    text = str(_packed_int3()).replace("packed<bits=3,word=i32,axis=1>", layout_text, 1)
    with pytest.raises(VerificationError, match=re.escape(message)):
        verify(parse(text))


def test_verifier_checks_packed_storage():
    g = _packed_int3()
    verify(g)
    wrong = dict(g.weights, **{"fc.weight": g.weights["fc.weight"].to(torch.int64)})
    with pytest.raises(VerificationError, match=r"is torch.int64 \[40, 7\]; packed .* is stored as int32 words \[40, 7\]"):
        verify(g.replace(weights=wrong))
    short = dict(g.weights, **{"fc.weight": g.weights["fc.weight"][:, :6].contiguous()})
    with pytest.raises(VerificationError, match=r"is torch.int32 \[40, 6\]; packed .* is stored as int32 words \[40, 7\]"):
        verify(g.replace(weights=short))
    # IR-level graphs may keep a packed type's codes unpacked; running a dequantize of them says what it wants
    unpacked = verify(g.replace(weights=dict(g.weights, **{"fc.weight": torch.zeros(40, 72, dtype=torch.uint8)})))
    with pytest.raises(ExecutionError, match="packed words must be int32 \\(word=i32\\), got torch.uint8"):
        ReferenceExecutor(unpacked)([torch.randn(1, 2, 72)])


# --------------------------------------------------------------------------- the tiny Llama

PLANS = {
    "int3<asym,g32>": Plan(default=Rule(weight="int3<asym,g32>"), method="rtn", clip_search=False),
    "int5<sym,channel>": Plan(default=Rule(weight="int5<sym,channel>"), method="rtn", clip_search=False),
    "int4<asym,g64>": Plan(default=Rule(weight="int4<asym,g64>"), method="rtn", clip_search=False),
    "fp6e2m3<block32>": Plan(default=Rule(weight="fp6e2m3<block32>"), method="rtn", clip_search=False),
    "nvfp4": Plan(default=Rule(weight="nvfp4"), method="rtn", clip_search=False),
    "mxfp4": Plan(default=Rule(weight="mxfp4"), method="rtn", clip_search=False),
    "mixed": Plan(
        rules=(
            Rule("*.self_attn.q_proj", weight="int2<sym,g16>", act="int8<sym,token>"),
            Rule("*.self_attn.k_proj", weight="int6<asym,channel>"),
            Rule("*.self_attn.v_proj", weight="int7<sym,g32>"),
            Rule("*.self_attn.o_proj", weight="fp8e5m2<channel>"),
            Rule("*.mlp.gate_proj", weight="int1<asym,g32>"),
            Rule("*.mlp.up_proj", weight="fp6e3m2<channel>"),
            Rule("*.mlp.down_proj", weight="int8<asym,g64>", act="fp8e4m3<token>"),
            Rule("lm_head", weight="fp8e4m3<channel>"),
            Rule("*", op="attention", kv="int4<sym,token>"),
        ),
        method="rtn",
        clip_search=False,
    ),
}


@pytest.fixture(scope="module")
def canonical(captured_tiny_llama):
    return canonicalize(captured_tiny_llama.graph)


@pytest.fixture(scope="module")
def quantized(canonical):
    """`quantized(plan name)`: the canonical tiny Llama quantized with that plan, then packed."""
    cache: dict = {}

    def get(name):
        if name not in cache:
            q = run_pipeline(canonical, ["quantize"], options={"quantize": {"plan": PLANS[name]}}, verify=True).graph
            cache[name] = (q, run_pipeline(q, ["layout"], verify=True).graph)
        return cache[name]

    return get


@pytest.mark.parametrize("plan", list(PLANS))
def test_tiny_llama_packed_logits_equal_unpacked(tiny_llama, quantized, plan):
    q, packed = quantized(plan)
    consts = [n for n in packed.nodes if n.op == "const" and n.types[0].layout is not None]
    assert len(consts) == 7 * tiny_llama.config.num_hidden_layers + 1  # every linear's weight, lm_head too
    assert all(packed.weights[n.get("name")].dtype == torch.int32 for n in consts)
    run_q, run_packed = ReferenceExecutor(q, check_shapes=True), ReferenceExecutor(packed, check_shapes=True)
    for b, s in [(2, 13), (1, 5)]:
        ids = torch.randint(0, tiny_llama.config.vocab_size, (b, s))
        (want,), (got,) = run_q([ids]), run_packed([ids])
        assert torch.equal(got, want), f"{plan}: logits differ at (b, s) = {(b, s)}"


@pytest.mark.parametrize("weight", ["int4<asym,g24>", "int5<sym,channel>", "fp8e4m3<channel>"])
def test_tiny_llama_folded_qlinear_weights_pack(tiny_llama, canonical, weight):
    """After fold, the integer GEMMs (`qlinear`) read the weight codes themselves: those pack
    too (kernel family "qgemm"), and the logits stay bit-identical."""
    act = "fp8e4m3<token>" if weight.startswith("fp8") else "int8<sym,token>"
    plan = Plan(default=Rule(weight=weight, act=act), method="rtn", clip_search=False)
    folded = run_pipeline(canonical, ["quantize", "fold"], options={"quantize": {"plan": plan}}, verify=True).graph
    packed = run_pipeline(folded, ["layout"], verify=True).graph
    gemms = [n for n in packed.nodes if n.op == "qlinear"]
    assert len(gemms) == 7 * tiny_llama.config.num_hidden_layers + 1  # lm_head too
    for g in gemms:
        w = g.inputs[len(quant_parts(g.get("act")))]
        assert w.type.layout is not None and packed.weights[w.node.get("name")].dtype == torch.int32
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 11))
    assert torch.equal(ReferenceExecutor(packed, check_shapes=True)([ids])[0], ReferenceExecutor(folded)([ids])[0])


def test_tiny_llama_packed_graph_round_trips_through_text(tiny_llama, quantized):
    _, packed = quantized("mixed")
    text = str(packed)
    assert all(f"packed<bits={b},word=i32,axis=1>" in text for b in (1, 2, 6, 7, 8))
    reparsed = verify(parse(text, weights=packed.weights))
    assert str(reparsed) == text
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 9))
    assert torch.equal(ReferenceExecutor(reparsed)([ids])[0], ReferenceExecutor(packed)([ids])[0])
    assert layout(packed) is packed


def test_report_counts_packed_bytes(captured_tiny_llama, quantized):
    """The report's bytes of a packed layer: its int32 words plus the nominal scale and zero
    bytes; int3 rows of K=72 (216 bits) take 7 words, 8 bits more than 27 bytes."""
    q, packed = quantized("int3<asym,g32>")
    spec = captured_tiny_llama.call_spec
    before = CompiledModel(q, spec, ReferenceExecutor(q), "reference").report()
    after = CompiledModel(packed, spec, ReferenceExecutor(packed), "reference").report()
    path = "model.layers.0.self_attn.q_proj"
    assert before.layers[path]["shape"] == (72, 72)
    assert after.layers[path]["bytes"] - before.layers[path]["bytes"] == 72 * 7 * 4 - 72 * 27
    extra = 0
    for p, r in before.layers.items():
        name = r["weights"][0]
        n, k = r["shape"]
        assert after.layers[p]["bytes"] - r["bytes"] == packed.meta["layout"][name]["bytes"] - (3 * n * k + 7) // 8
        extra += after.layers[p]["bytes"] - r["bytes"]
    assert after.weight_bytes - before.weight_bytes == extra > 0
    assert "model.layers.0.self_attn.q_proj" in str(after)
