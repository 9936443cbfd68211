"""The exact multiple-choice knapsack of `allocate.solve` against brute force: the optimum on
many small random instances, a feasible answer on every budget from the least to the most,
ties to the cheaper solution, and errors naming the least feasible budget."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import mxc.passes.allocate as allocate
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


@settings(max_examples=150, deadline=None)
@given(instances(), st.floats(0.0, 1.0))
def test_a_grid_too_large_for_the_dynamic_program_goes_to_milp_with_the_same_optimum(choices, where):
    lo, hi = byte_range(choices)
    budget = lo + round(where * (hi - lo))
    dp = solve(choices, budget_bytes=budget)
    with pytest.MonkeyPatch.context() as mp:  # hypothesis runs many examples per test call
        mp.setattr(allocate, "DP_CELLS", 0)  # every grid is now too large to fill
        got = solve(choices, budget_bytes=budget)
    assert total_bytes(got) <= budget
    best = min(e for e, _, _ in brute(choices, lambda combo: sum(c.bytes for c in combo) <= budget))
    assert math.isclose(total_error(got), best, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(total_error(got), total_error(dp), rel_tol=1e-9, abs_tol=1e-9)


def test_thousands_of_tensors_with_byte_costs_solve_exactly_past_the_grid(monkeypatch):
    """2,000 tensors whose byte costs share no divisor: a grid of ~10⁷ cells per tensor (over
    `DP_CELLS`), solved by HiGHS; checked against the Lagrangian bound, which a multiple-choice
    knapsack with this many items meets to within one item's error."""
    rng = np.random.default_rng(7)
    choices = {}
    for t in range(2000):
        name = f"layers.{t}.proj:weight"
        sizes = np.sort(rng.integers(1000, 20000, size=5)) + np.arange(5)  # distinct
        errs = np.sort(rng.random(5))[::-1] * rng.uniform(0.1, 10.0)  # more bytes, less error
        choices[name] = [Choice(name, None, int(b), 8.0 * int(b) / 4096, 4096, float(e)) for b, e in zip(sizes, errs)]
    lo, hi = byte_range(choices)
    budget = lo + (hi - lo) // 3
    calls = []
    milp = allocate._milp
    monkeypatch.setattr(allocate, "_milp", lambda *a: calls.append(1) or milp(*a))
    got = solve(choices, budget_bytes=budget)
    assert calls, "the grid was small enough for the dynamic program: the instance tests nothing"
    assert set(got) == set(choices) and total_bytes(got) <= budget
    # the Lagrangian dual: for any price λ, Σ min_c (error + λ·(bytes)) - λ·budget is a lower bound
    bound = max(sum(min(c.error + lam * c.bytes for c in row) for row in choices.values()) - lam * budget
                for lam in np.geomspace(1e-7, 1e-2, 400))
    assert bound <= total_error(got) <= bound + max(c.error for row in choices.values() for c in row)


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


# -- a latency budget: two constraints, solved by scipy.optimize.milp ------------------------


@st.composite
def timed_instances(draw):
    """`instances` whose choices also take random predicted seconds (microseconds)."""
    import dataclasses

    return {n: [dataclasses.replace(c, seconds=draw(st.floats(0.5e-6, 20e-6))) for c in cs]
            for n, cs in draw(instances()).items()}


def seconds_range(choices):
    return (sum(min(c.seconds for c in cs) for cs in choices.values()),
            sum(max(c.seconds for c in cs) for cs in choices.values()))


@settings(max_examples=200, deadline=None)
@given(timed_instances(), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.booleans())
def test_latency_budget_optimal_against_brute_force(choices, where_bytes, where_seconds, with_bytes):
    lo, hi = byte_range(choices)
    budget = lo + round(where_bytes * (hi - lo)) if with_bytes else None
    slo, shi = seconds_range(choices)
    seconds = slo + where_seconds * (shi - slo)
    feasible = brute(choices, lambda combo: (budget is None or sum(c.bytes for c in combo) <= budget)
                     and sum(c.seconds for c in combo) <= seconds)
    if not feasible:  # the fastest choices may not fit the bytes: named, with the least latency that does
        with pytest.raises(BudgetError, match="latency budget of .* is infeasible") as e:
            solve(choices, budget_bytes=budget, budget_seconds=seconds)
        fits = brute(choices, lambda combo: sum(c.bytes for c in combo) <= budget)
        assert math.isclose(e.value.least, min(sum(c.seconds for c in s.values()) for _, _, s in fits), rel_tol=1e-9)
        return
    got = solve(choices, budget_bytes=budget, budget_seconds=seconds)
    assert set(got) == set(choices) and all(got[n] in choices[n] for n in choices)
    assert sum(c.seconds for c in got.values()) <= seconds
    assert budget is None or total_bytes(got) <= budget
    # optimal: no worse than any solution clear of the latency budget by rounding (1e-9 of
    # it), and as good as the best that fits at all, since it fits
    clear = [e for e, _, s in feasible if sum(c.seconds for c in s.values()) <= seconds * (1 - 1e-9)]
    assert total_error(got) >= min(e for e, _, _ in feasible) - 1e-12
    assert not clear or total_error(got) <= min(clear) + 1e-12


def test_latency_budget_one_rounding_over():
    """A solution over the latency budget by one float rounding (below what HiGHS' tolerance
    tells from 0) is cut off, not returned or given up on (found by hypothesis): with a
    taking its slower choice (the only one of 0 bytes), b's error-free choice is 1 ulp over."""
    a = [Choice("a:weight", None, 0, 0.0, 1, 0.0, seconds=2.872670736908682e-06),
         Choice("a:weight", None, 1, 8.0, 1, 0.0, seconds=2.666230664395199e-06)]
    b = [Choice("b:weight", None, 0, 0.0, 1, 1.0, seconds=5e-07),
         Choice("b:weight", None, 0, 0.0, 1, 0.0, seconds=9.151102986961652e-06)]
    budget = 1.2023773723870331e-05
    assert a[0].seconds + b[1].seconds > budget >= a[0].seconds + b[1].seconds - 1e-20
    got = solve({"a:weight": a, "b:weight": b}, budget_bytes=0, budget_seconds=budget)
    assert got == {"a:weight": a[0], "b:weight": b[0]}


def test_latency_budget_with_average_bits():
    """Three tensors of int2/int4/int8-like choices, int2 slow (unpacking): under 4 bits alone
    the least error is int2, int2, int8 (8.5 µs); under 7 µs too it is int4 everywhere, as
    brute force says."""
    import dataclasses

    rows = [(2, 3e-6, 1.5), (4, 2e-6, 1.0), (8, 2.5e-6, 0.1)]  # bits, seconds, error
    choices = {f"l{i}:weight": [Choice(f"l{i}:weight", None, bits * 8, float(bits), 64, err * (1 + i / 10),
                                       seconds=sec) for bits, sec, err in rows] for i in range(3)}
    plain = solve(choices, budget_bits=4)
    timed = solve(choices, budget_bits=4, budget_seconds=7e-6)
    assert average_bits(timed) <= 4 and sum(c.seconds for c in timed.values()) <= 7e-6
    best = min(e for e, _, s in brute(choices, lambda combo: sum(c.bits for c in combo) <= 12
                                      and sum(c.seconds for c in combo) <= 7e-6))
    assert math.isclose(total_error(timed), best, rel_tol=1e-12)
    assert [c.bits for c in plain.values()] == [2.0, 2.0, 8.0] and [c.bits for c in timed.values()] == [4.0] * 3
    assert total_error(timed) > total_error(plain)  # the latency budget binds
    assert dataclasses.asdict(timed["l0:weight"])["seconds"] > 0


def test_latency_budget_errors_are_named():
    c = [Choice("a:weight", None, b, 8.0 * b, 1, e, seconds=s) for b, e, s in ((4, 1.0, 2e-6), (8, 0.0, 1e-6))]
    with pytest.raises(BudgetError, match=r"latency budget of 1.5 µs is infeasible: the least predicted latency "
                                          r"within the size budget is 2.0 µs"):
        solve({"a:weight": c}, budget_bytes=4, budget_seconds=1.5e-6)
    with pytest.raises(BudgetError, match=r"latency budget of 0.5 µs is infeasible: the least predicted latency is "
                                          r"1.0 µs"):
        solve({"a:weight": c}, budget_seconds=0.5e-6)
    with pytest.raises(ValueError, match="budget_seconds must be a positive"):
        solve({"a:weight": c}, budget_seconds=-1.0)
    bad = [Choice("a:weight", None, 4, 32.0, 1, 0.0, seconds=float("nan"))]
    with pytest.raises(ValueError, match="expected finite times"):
        solve({"a:weight": bad}, budget_seconds=1.0)
