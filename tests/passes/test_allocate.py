"""The exact multiple-choice knapsack of `allocate.solve` against brute force: the optimum on
many small random instances, a feasible answer on every budget from the least to the most,
ties to the cheaper solution, and errors naming the least feasible budget."""

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from mxc.ir import parse_format
from mxc.passes.allocate import BudgetError, Choice, average_bits, solve, total_bytes, total_error
from mxc.passes.quantize import format_bytes

# integer-valued errors make equal sums exactly equal, so ties are real ties
ERRORS = st.one_of(st.integers(0, 12).map(float), st.floats(0.0, 10.0, allow_nan=False))


@st.composite
def instances(draw, integer_errors: bool = False):
    """{tensor: [Choice]}: 1 to 5 tensors of 1 to 4 candidates with random bytes and errors;
    bits·numel = 8·bytes, as for formats whose codes and scales fill whole bytes."""
    out = {}
    for t in range(draw(st.integers(1, 5))):
        name = f"layers.{t}.proj:weight"
        numel = draw(st.integers(1, 64))
        out[name] = [
            Choice(name, None, b, 8 * b / numel, numel, draw(st.integers(0, 12).map(float) if integer_errors else ERRORS))
            for b in draw(st.lists(st.integers(0, 40), min_size=1, max_size=4))
        ]
    return out


def brute(choices, fits):
    """Every combination that `fits`, as (summed error, bytes, solution)."""
    names = list(choices)
    return [
        (sum(c.error for c in combo), sum(c.bytes for c in combo), dict(zip(names, combo)))
        for combo in itertools.product(*choices.values())
        if fits(combo)
    ]


def byte_range(choices):
    return sum(min(c.bytes for c in cs) for cs in choices.values()), sum(max(c.bytes for c in cs) for cs in choices.values())


@settings(max_examples=300, deadline=None)
@given(instances(), st.floats(0.0, 1.0))
def test_optimal_against_brute_force(choices, where):
    lo, hi = byte_range(choices)
    budget = lo + round(where * (hi - lo))
    got = solve(choices, budget_bytes=budget)
    assert set(got) == set(choices) and all(got[n] in choices[n] for n in choices)
    assert total_bytes(got) <= budget
    best = min(e for e, _, _ in brute(choices, lambda combo: sum(c.bytes for c in combo) <= budget))
    assert math.isclose(total_error(got), best, rel_tol=1e-12, abs_tol=1e-12)


@settings(max_examples=100, deadline=None)
@given(instances(integer_errors=True))
def test_every_budget_feasible_optimal_and_ties_go_to_the_cheaper(choices):
    lo, hi = byte_range(choices)
    for budget in range(lo, hi + 1):
        got = solve(choices, budget_bytes=budget)
        assert total_bytes(got) <= budget
        feasible = brute(choices, lambda combo: sum(c.bytes for c in combo) <= budget)
        best = min(e for e, _, _ in feasible)
        assert total_error(got) == best  # integer errors: exact
        assert total_bytes(got) == min(b for e, b, _ in feasible if e == best)


def test_equal_errors_take_the_least_bytes():
    choices = {f"l{i}:weight": [Choice(f"l{i}:weight", None, b, 8.0 * b, 1, 1.0) for b in (30, 10, 20)] for i in range(3)}
    got = solve(choices, budget_bytes=1000)
    assert {c.bytes for c in got.values()} == {10}
    assert solve(choices)["l0:weight"].bytes == 10  # no budget: the least error, then the least bytes


@settings(max_examples=200, deadline=None)
@given(instances(), st.integers(0, 10))
def test_infeasible_names_the_least_budget(choices, short):
    lo, _ = byte_range(choices)
    if lo == 0:
        return
    with pytest.raises(BudgetError, match=f"smallest feasible budget is {lo} bytes") as info:
        solve(choices, budget_bytes=max(lo - 1 - short, 0))
    assert info.value.least == lo
    assert total_bytes(solve(choices, budget_bytes=info.value.least)) == lo


FORMATS = ["int2<asym,g64>", "int3<asym,g128>", "int4<asym,g128>", "int4<asym,g32>", "int8<sym,channel>", "float"]


def format_choices(shapes, errors):
    """Choices with real formats: bytes from `format_bytes`, bits from `effective_bits`."""
    out = {}
    for (name, (n, k)), errs in zip(shapes.items(), errors):
        out[name] = []
        for text, e in zip(FORMATS, errs):
            fmt = None if text == "float" else parse_format(text)
            out[name].append(Choice(name, fmt, 4 * n * k if fmt is None else format_bytes(fmt, (n, k)),
                                    32.0 if fmt is None else fmt.effective_bits(k), n * k, e))
    return out


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 8), st.sampled_from([16, 64, 100, 128, 200])), min_size=1, max_size=3),
    st.data(),
)
def test_average_bits_budget_against_brute_force(shapes, data):
    shapes = {f"layers.{i}.mlp:weight": s for i, s in enumerate(shapes)}
    errors = [data.draw(st.lists(ERRORS, min_size=len(FORMATS), max_size=len(FORMATS))) for _ in shapes]
    choices = format_choices(shapes, errors)
    budget = data.draw(st.floats(2.0, 33.0).map(lambda b: round(b, 2)))
    numel = sum(n * k for n, k in shapes.values())

    def avg(combo):
        return Fraction(sum(round(c.bits * c.numel) for c in combo), numel)

    feasible = brute(choices, lambda combo: avg(combo) <= Fraction(repr(budget)))
    if not feasible:
        with pytest.raises(BudgetError) as info:
            solve(choices, budget_bits=budget)
        least = min(avg(combo) for combo in itertools.product(*choices.values()))
        assert least > Fraction(repr(budget)) and Fraction(repr(info.value.least)) >= least
        solve(choices, budget_bits=info.value.least)  # the figure it names is feasible
        return
    got = solve(choices, budget_bits=budget)
    assert average_bits(got) <= budget + 1e-12
    assert math.isclose(total_error(got), min(e for e, _, _ in feasible), rel_tol=1e-12, abs_tol=1e-12)


def test_average_bits_budget_is_the_decimal_written():
    # 10 elements at 3.3 bits: Σ bits·numel = 33 = 3.3·10 exactly, though 3.3 * 10 in binary floats is not
    choices = {"a:weight": [Choice("a:weight", None, 5, 3.3, 10, 1.0), Choice("a:weight", None, 6, 4.0, 10, 0.0)]}
    assert solve(choices, budget_bits=3.3)["a:weight"].bits == 3.3
    assert solve(choices, budget_bits=4)["a:weight"].bits == 4.0
    with pytest.raises(BudgetError, match="smallest feasible budget is 3.3 bits"):
        solve(choices, budget_bits=3.29)


def test_activations_and_kv_cost_nothing_and_take_their_least_error():
    w = [Choice("l:weight", parse_format("int4<asym,g32>"), 40, 4.5, 64, 0.5),
         Choice("l:weight", parse_format("int8<sym,channel>"), 66, 8.25, 64, 0.1)]
    act = [Choice("l:act", parse_format("int8<sym,token>"), 0, 8.0, 0, 0.2),
           Choice("l:act", parse_format("int4<sym,g32>"), 0, 4.5, 0, 0.9)]
    kv = [Choice("attn:kv", parse_format("int4<asym,token>"), 0, 4.0, 0, 0.3)]
    got = solve({"l:weight": w, "l:act": act, "attn:kv": kv}, budget_bits=4.5)
    assert got == {"l:weight": w[0], "l:act": act[0], "attn:kv": kv[0]}
    assert average_bits(got) == 4.5  # over weights only
    assert solve({"l:weight": w, "l:act": act, "attn:kv": kv}, budget_bytes=66)["l:weight"] is w[1]


def test_bad_inputs_are_named():
    c = Choice("a:weight", None, 4, 32.0, 1, 0.0)
    with pytest.raises(ValueError, match="one budget"):
        solve({"a:weight": [c]}, budget_bytes=4, budget_bits=32)
    with pytest.raises(ValueError, match="'b:weight' has no candidate"):
        solve({"a:weight": [c], "b:weight": []}, budget_bytes=4)
    with pytest.raises(ValueError, match="name other tensors"):
        solve({"b:weight": [c]}, budget_bytes=4)
    with pytest.raises(ValueError, match="not a whole number of bits"):
        solve({"a:weight": [Choice("a:weight", None, 1, 4.3, 3, 0.0)]}, budget_bits=8)
