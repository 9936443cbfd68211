"""canonicalize: golden IR texts before/after each rewrite (and near misses that must stay
as they are), function preservation on every golden and on a captured Llama, and the
fixed point (an already canonical graph comes back as the same object).

Golden files live in tests/golden/canonicalize/: `X.before.mxir` is parsed, canonicalized
and printed; the text must equal `X.after.mxir`. To accept a deliberate change, run
`MXC_UPDATE_GOLDEN=1 pytest tests/passes/test_canonicalize.py`, which writes the after files
instead of comparing, and review the diff. `near_miss_*` cases must come back unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mxc.ir import DType, Graph, parse, verify
from mxc.passes.canonicalize import canonicalize
from mxc.runtime import ReferenceExecutor
from golden_files import check_golden, golden_before
from graph_helpers import input_shapes

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "canonicalize"
CASES = sorted(p.name.removesuffix(".before.mxir") for p in GOLDEN.glob("*.before.mxir"))


def random_tensor(shape, dtype: DType) -> torch.Tensor:
    """Fresh random data of a type: normal floats, small integers, booleans with some True per row."""
    if dtype.kind == "float":
        return torch.randn(shape).to(dtype.torch)
    if dtype.kind == "bool":
        t = torch.rand(shape) < 0.6
        if t.dim():
            t[..., 0] = True
        return t
    return torch.randint(0, 10, shape, dtype=dtype.torch)


def with_random_weights(graph: Graph) -> Graph:
    weights = {n.get("name"): random_tensor(n.types[0].shape, n.types[0].dtype) for n in graph.nodes if n.op == "const"}
    return graph.replace(weights=weights)


def random_inputs(graph: Graph, sizes: dict[str, int]) -> list[torch.Tensor]:
    return [random_tensor(shape, t.dtype) for t, shape in input_shapes(graph, sizes)]


def assert_same_function(before: Graph, after: Graph, sizes_list) -> None:
    """Both graphs give bit-identical outputs on fresh random inputs at each size binding."""
    run_before = ReferenceExecutor(before, check_shapes=True)
    run_after = ReferenceExecutor(after, check_shapes=True)
    for sizes in sizes_list:
        inputs = random_inputs(before, sizes)
        for i, (x, y) in enumerate(zip(run_before(inputs), run_after(inputs))):
            # exact, NaN where NaN (a near miss like mean(x^3) can go negative under rsqrt)
            torch.testing.assert_close(y, x, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"output {i} at {sizes}: {m}")


def test_golden_cases_exist():
    assert {"noop", "rms_norm", "rope", "gqa", "identity", "near_miss_identity"} <= set(CASES)
    assert sum(c.startswith("near_miss") for c in CASES) >= 3


@pytest.mark.parametrize("case", CASES)
def test_golden(case):
    before, text = golden_before(GOLDEN, case, with_random_weights)
    after = verify(canonicalize(before))
    check_golden(GOLDEN / f"{case}.after.mxir", str(after))
    # a pass that changes nothing returns the same graph, and only then
    assert (after is before) == (str(after) == text)
    if case.startswith("near_miss"):
        assert after is before, f"{case} must not be rewritten"
    else:
        assert after is not before, f"{case} should be rewritten"
    # the result is a fixed point, also after a round trip through the text form
    assert canonicalize(after) is after
    reparsed = parse(str(after))
    assert canonicalize(reparsed) is reparsed
    # and the rewrite preserves the function, bit for bit
    assert_same_function(before, after, [{"b": 1, "s": 1}, {"b": 3, "s": 7}, {"b": 2, "s": 13}])


def test_golden_rewrites_what_it_says():
    """The golden after files contain the compound ops and none of the patterns they replace."""
    def after(case):
        return parse((GOLDEN / f"{case}.after.mxir").read_text())

    noop = after("noop").op_counts()
    assert noop == {"silu": 1, "cast": 1}, noop
    rms = after("rms_norm")
    assert [n.op for n in rms.nodes] == ["const", "const", "rms_norm", "linear"]
    norm = rms.nodes[2]
    assert norm.attr == {"eps": 1e-05} and norm.inputs[1].node.get("name") == "model.norm.weight"
    assert norm.loc == "model.norm"
    rope = after("rope").op_counts()
    assert rope.get("rope") == 2 and "cat" not in rope and "torch:aten.neg.default" not in rope
    ident = after("identity")
    assert [n.op for n in ident.nodes] == ["torch", "unsqueeze"]  # arange, then unsqueeze: + 0, - 0, * 1.0, / 1 gone
    gqa = after("gqa")
    heads = [n.inputs[1].type.shape[1] for n in gqa.nodes if n.op == "attention"]
    assert heads == [2, 2] and not {"expand", "reshape", "unsqueeze", "slice"} & set(gqa.op_counts())


def test_unused_pattern_rules_can_be_selected():
    """`rules=` restricts the table: with only the no-op rules the RMSNorm pattern stays."""
    from mxc.passes.canonicalize import RULES

    g = parse((GOLDEN / "rms_norm.before.mxir").read_text())
    only_noops = [(op, rule) for op, rule in RULES if rule.__name__ == "noop"]
    got = canonicalize(g, rules=only_noops)
    assert "rms_norm" not in got.op_counts() and "cast" not in got.op_counts()
    assert got.op_counts()["torch:aten.rsqrt.default"] == 1


# --------------------------------------------------------------------------- the tiny Llama


LAYERS = 2


@pytest.fixture(scope="module")
def canonical(captured_tiny_llama):
    return canonicalize(captured_tiny_llama.graph)


def test_tiny_llama_op_counts(tiny_llama, captured_tiny_llama, canonical):
    assert tiny_llama.config.num_hidden_layers == LAYERS
    verify(canonical)
    counts = canonical.op_counts()
    assert counts["rms_norm"] == 2 * LAYERS + 1
    assert counts["rope"] == 2 * LAYERS
    assert counts["attention"] == LAYERS
    assert counts["linear"] == 7 * LAYERS + 1
    for target in ("aten.pow.Tensor_Scalar", "aten.rsqrt.default", "aten.neg.default", "aten.mean.dim"):
        assert f"torch:{target}" not in counts, counts
    # every norm carries its weight; attention reads the 2 grouped key/value heads
    for n in canonical.nodes:
        if n.op == "rms_norm":
            assert len(n.inputs) == 2 and n.inputs[1].node.op == "const"
            assert n.inputs[1].node.get("name").endswith("norm.weight")
        if n.op == "attention":
            assert [v.type.shape[1] for v in n.inputs[:3]] == [6, 2, 2]
    assert len(canonical.nodes) < len(captured_tiny_llama.graph.nodes)


def test_tiny_llama_canonicalize_preserves_the_function_bit_for_bit(tiny_llama, captured_tiny_llama, canonical):
    run_before = ReferenceExecutor(captured_tiny_llama.graph, check_shapes=True)
    run_after = ReferenceExecutor(canonical, check_shapes=True)
    vocab = tiny_llama.config.vocab_size
    for b, s in [(1, 1), (2, 7), (3, 13), (1, 29)]:
        ids = torch.randint(0, vocab, (b, s))
        (before,) = run_before([ids])
        (after,) = run_after([ids])
        assert after.shape == (b, s, vocab)
        assert torch.equal(before, after), f"logits differ at (b, s) = {(b, s)}"
        with torch.no_grad():
            eager = tiny_llama(ids).logits
        torch.testing.assert_close(after, eager, rtol=1e-5, atol=1e-5)


def test_canonical_graph_is_a_fixed_point(captured_tiny_llama, canonical):
    assert canonical is not captured_tiny_llama.graph
    assert canonicalize(canonical) is canonical
    reparsed = parse(str(canonical), weights=canonical.weights)
    assert canonicalize(reparsed) is reparsed
    # the input graph is untouched by the pass
    assert "torch:aten.rsqrt.default" in captured_tiny_llama.graph.op_counts()
