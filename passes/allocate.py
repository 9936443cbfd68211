"""allocate: automatic bit allocation — one format per tensor, the least summed sensitivity
under a budget.

    choices = mxc.sensitivity.measure(model, candidates, calibration)   # {tensor: [Choice, ...]}

A `Choice` is one candidate format for one tensor with what it costs (bytes, bits) and the
measured increase of the objective when only that tensor takes the format. `solve` picks one
choice per tensor minimising the summed error under a budget, exactly:

    plan = solve(choices, budget_bits=3.5)     # {tensor: Choice}; Σ bits·numel / Σ numel <= 3.5
    plan = solve(choices, budget_bytes=40e6)   # Σ bytes <= 40 MB
    plan = solve(choices, budget_bits=4, budget_seconds=4e-4)   # and Σ seconds <= 0.4 ms

This is the multiple-choice knapsack. It is solved by dynamic programming over an integer
cost grid, so the optimum is exact (errors are summed in float64): bytes are integers, and
bits·numel is an integer for every format (N·(bits·K + scale and zero bits·ceil(K/block))),
so an average-bits budget b becomes the integer limit floor(b·Σnumel) on Σ bits·numel, with b
read as the decimal the user wrote (3.3 is 33/10, not the binary float below it). Costs are
shifted by each tensor's cheapest candidate and divided by the gcd of all cost steps (24
bytes for SmolLM2's linears and the default candidates), which keeps the grid small. Where
the grid would still be too large to fill (over `DP_CELLS` cells: thousands of tensors, or
costs with no common divisor), the same problem goes to `scipy.optimize.milp` as below,
exact as well; there, among solutions of equal summed error, HiGHS picks one.

Activations and the KV cache cost no model bytes (`bytes` and `numel` 0): their choices
count in neither budget, so each takes its least-error candidate (keep float out of their
candidates to force quantization). Ties in summed error go to the cheaper solution.

A latency budget (`budget_seconds`, on `Choice.seconds`, alone or with a bytes or bits
budget) makes it a knapsack with two constraints, one of them on real numbers: that is solved
as a 0/1 integer program with `scipy.optimize.milp` (HiGHS, branch and bound run to a gap of
0, the objective scaled so that HiGHS' absolute gap is 10⁻¹² of the largest error), and the
solution is checked against both budgets exactly; among equal errors HiGHS picks one. Times
are real numbers, so "exact" holds up to rounding at the boundary: a solution whose summed
seconds is within ~10⁻¹² (relative) of the latency budget may be missed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ..ir.formats import NumberFormat


#: The most cells (tensors × grid points) the dynamic program fills: its walk-back table
#: takes a byte per cell. Past it (many tensors, or costs whose steps share no large
#: divisor: a grid of one cell per byte) `solve` hands the knapsack to `scipy.optimize.milp`.
DP_CELLS = 2 * 10**8


@dataclass(frozen=True)
class Choice:
    """One candidate format for one tensor.

    `tensor`: "<module path>:weight", "<module path>:act" or "<attention module path>:kv".
    `fmt`: the format, None to keep float. `bytes`: what the tensor takes in this format
    (`format_bytes`; float: 4 · numel; act and kv: 0, they cost no model bytes). `bits`: bits
    per element, scales included (`fmt.effective_bits(k)`; float: 32). `numel`: elements of
    a weight (for average-bits budgets); 0 for act and kv. `error`: the measured increase of
    the objective (KL of the logits, nats/token) when only this tensor takes `fmt`.
    `outliers`: for a weight, k > 0 keeps its k input channels of largest calibrated abs-max
    in the outlier format (int8 per channel: the reorder pass moves them last and the
    quantize pass splits the weight), the other K - k in `fmt`; `bytes` and `bits` count both.
    `seconds`: the predicted time of the tensor's op in this format, from a cost model
    (`mxc.cost`); 0 where none priced it. Only a latency budget reads it.
    """

    tensor: str
    fmt: NumberFormat | None
    bytes: int
    bits: float
    numel: int
    error: float
    outliers: int = 0
    seconds: float = 0.0


class BudgetError(ValueError):
    """No choice of formats meets the budget; `least` is the smallest budget that does (in
    the budget's unit: bytes, or average bits per weight)."""

    def __init__(self, message: str, least: float) -> None:
        super().__init__(message)
        self.least = least


class LatencyBudgetError(BudgetError):
    """The latency budget cannot be met; `least` is the least predicted latency (seconds)
    that fits the size budget."""


def solve(
    choices: dict[str, list[Choice]],
    *,
    budget_bytes: int | float | None = None,
    budget_bits: float | None = None,
    budget_seconds: float | None = None,
) -> dict[str, Choice]:
    """One choice per tensor with the least summed `error` such that Σ bytes <= `budget_bytes`
    or Σ bits·numel / Σ numel <= `budget_bits` (average bits per weight over the tensors
    with numel > 0), and Σ seconds <= `budget_seconds` when given. No budget: each tensor's
    least-error choice. Without a latency budget, of solutions of equal summed error the one
    of least cost wins.

    Raises `BudgetError` (a ValueError) naming the smallest feasible budget when none fits.

        solve({"a:weight": [Choice("a:weight", int2, 10, 2.0, 40, 0.5),
                            Choice("a:weight", int4, 20, 4.0, 40, 0.1)]}, budget_bytes=15)
        -> {"a:weight": <the int2 choice>}
    """
    if budget_bytes is not None and budget_bits is not None:
        raise ValueError("solve: give one budget, budget_bytes or budget_bits, not both")
    names = list(choices)
    for name in names:
        if not choices[name]:
            raise ValueError(f"solve: tensor {name!r} has no candidate choices")
        if any(c.tensor != name for c in choices[name]):
            raise ValueError(f"solve: the choices under {name!r} name other tensors: "
                             f"{sorted({c.tensor for c in choices[name]} - {name})}")
        if len({c.numel for c in choices[name]}) > 1:
            raise ValueError(f"solve: the choices for {name!r} disagree on numel: {[c.numel for c in choices[name]]}")
    if budget_bits is not None:
        cost = {n: [_bit_cost(c) for c in choices[n]] for n in names}
        numel = sum(choices[n][0].numel for n in names)
        if numel == 0:
            raise ValueError("solve: an average-bits budget needs weights (choices with numel > 0)")
        # the decimal the user wrote, so that 3.3 bits is 33/10 exactly
        limit = math.floor(Fraction(repr(float(budget_bits))) * numel)
    else:
        cost = {n: [int(c.bytes) for c in choices[n]] for n in names}
        limit = None if budget_bytes is None else math.floor(budget_bytes)
    errors = {n: [float(c.error) for c in choices[n]] for n in names}
    if budget_seconds is not None:
        return _solve_with_latency(choices, cost, errors, limit, float(budget_seconds), budget_bits)
    if limit is None:
        picked = {n: _best(errors[n], cost[n], range(len(choices[n]))) for n in names}
        return {n: choices[n][picked[n]] for n in names}

    _check_fits(cost, limit, budget_bits, numel if budget_bits is not None else 0)
    picked = _knapsack(names, cost, errors, limit - sum(min(cost[n]) for n in names))
    if picked is None:  # a grid too large to fill: the same optimum from HiGHS
        picked = _milp(names, errors, {n: [0.0] * len(choices[n]) for n in names}, cost, limit, None)
    return {n: choices[n][picked[n]] for n in names}


def _check_fits(cost: dict[str, list[int]], limit: int, budget_bits: float | None, numel: int) -> None:
    """BudgetError naming the smallest feasible size budget when even the cheapest choices exceed `limit`."""
    least = sum(min(row) for row in cost.values())
    if limit < least:
        if budget_bits is not None:
            shown = math.ceil(least / numel * 10**4) / 10**4  # rounded up: the shown figure is feasible
            raise BudgetError(f"budget of {budget_bits} average bits per weight is infeasible: the smallest "
                              f"feasible budget is {shown} bits (every tensor at its smallest candidate)", shown)
        raise BudgetError(f"budget of {limit} bytes is infeasible: the smallest feasible budget is {least} bytes "
                          "(every tensor at its smallest candidate)", least)


def _solve_with_latency(choices: dict[str, list[Choice]], cost: dict[str, list[int]], errors: dict[str, list[float]],
                        limit: int | None, budget_seconds: float, budget_bits: float | None) -> dict[str, Choice]:
    """The least summed error under Σ seconds <= `budget_seconds` and, when `limit` is not
    None, Σ cost <= `limit`: a 0/1 program solved by `scipy.optimize.milp` (see the module
    docstring). An infeasible latency budget raises `LatencyBudgetError` with the least
    latency that fits the size budget (in seconds)."""
    if not (math.isfinite(budget_seconds) and budget_seconds > 0):
        raise ValueError(f"solve: budget_seconds must be a positive number of seconds, got {budget_seconds!r}")
    names = list(choices)
    seconds = {n: [float(c.seconds) for c in choices[n]] for n in names}
    for n in names:
        if not all(math.isfinite(t) and t >= 0 for t in seconds[n]):
            raise ValueError(f"solve: the choices for {n!r} have seconds {seconds[n]}: expected finite times >= 0")
    if limit is not None:
        _check_fits(cost, limit, budget_bits, sum(choices[n][0].numel for n in names))
    fastest = _milp(names, seconds, seconds, cost, limit, None)
    least = sum(seconds[n][fastest[n]] for n in names)
    if least > budget_seconds:
        within = " within the size budget" if limit is not None else ""
        raise LatencyBudgetError(f"latency budget of {show_seconds(budget_seconds)} is infeasible: the least predicted "
                          f"latency{within} is {show_seconds(least)} ({least!r} s)", least)
    picked = _milp(names, errors, seconds, cost, limit, budget_seconds)
    return {n: choices[n][picked[n]] for n in names}


def _milp(names: list[str], objective: dict[str, list[float]], seconds: dict[str, list[float]],
          cost: dict[str, list[int]], limit: int | None, budget_seconds: float | None) -> dict[str, int]:
    """Indices minimising Σ objective with one choice per tensor, Σ cost <= `limit` (None: no
    size budget) and Σ seconds <= `budget_seconds` (None: no latency budget), exactly: costs
    count above each tensor's least, a choice whose excess alone is over the slack is fixed
    to 0, rows are scaled to a right-hand side of 1 for HiGHS, and where the returned
    solution exceeds a budget within HiGHS' feasibility tolerance, that solution is cut off
    (its choices may not all be taken again), that slack is tightened by the excess, and it
    solves again: the cut keeps this exact even where the excess is below what HiGHS can
    tell from 0. Raises ValueError if HiGHS fails or finds the program infeasible (the
    callers check feasibility first)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array, vstack

    starts = np.cumsum([0, *(len(objective[n]) for n in names)])
    width = int(starts[-1])
    c = np.concatenate([objective[n] for n in names])
    scale = float(np.abs(c).max()) or 1.0
    c = c / scale * 1e6  # HiGHS' absolute gap (1e-6) is then 1e-12 of the largest error
    one = csr_array((np.ones(width), (np.repeat(np.arange(len(names)), np.diff(starts)), np.arange(width))),
                    shape=(len(names), width))  # one choice per tensor: sparse, for thousands of tensors
    rows = []  # (coefficients above each tensor's least, the slack, the exact excess of a solution)
    if limit is not None:
        rows.append((np.concatenate([np.subtract(cost[n], min(cost[n])) for n in names]).astype(float),
                     float(limit - sum(min(cost[n]) for n in names)),
                     lambda p: sum(cost[n][p[n]] for n in names) - limit))
    if budget_seconds is not None:
        rows.append((np.concatenate([np.subtract(seconds[n], min(seconds[n])) for n in names]),
                     budget_seconds - sum(min(seconds[n]) for n in names),
                     lambda p: sum(seconds[n][p[n]] for n in names) - budget_seconds))
    slacks = [slack for _, slack, _ in rows]
    magnitudes = [float(np.abs(coef).sum()) + abs(slack) for coef, slack, _ in rows]  # of each row's sums
    cuts: list[np.ndarray] = []  # solutions HiGHS returned over a budget: excluded
    for _ in range(32):
        constraints = [LinearConstraint(one, 1.0, 1.0)]
        if cuts:
            constraints.append(LinearConstraint(vstack([csr_array(c[None, :]) for c in cuts]), -np.inf,
                                                len(names) - 1.0))
        upper = np.ones(width)
        for (coef, _, _), slack, size in zip(rows, slacks, magnitudes):
            room = slack + 1e-12 * size  # sums of floats round: the exact check below decides at the boundary
            over = coef > room
            upper[over] = 0.0  # a choice above the slack alone cannot be taken: fixed, not left to tolerances
            if room > 0:  # the others' coefficients scaled into [0, 1]
                constraints.append(LinearConstraint(np.where(over, 0.0, coef / room)[None, :], -np.inf, 1.0))
        res = milp(c, constraints=constraints, integrality=np.ones(width), bounds=Bounds(0, upper),
                   options={"mip_rel_gap": 0.0})
        if res.x is None:
            raise ValueError(f"solve: scipy.optimize.milp found no solution: {res.message}")
        picked = {n: int(np.argmax(res.x[a:b])) for n, a, b in zip(names, starts[:-1], starts[1:])}
        over_by = [excess(picked) for _, _, excess in rows]
        if all(e <= 0 for e in over_by):
            return picked
        cuts.append(np.round(res.x))
        for i, e in enumerate(over_by):  # within HiGHS' tolerance but over the budget: ask for that much less
            if e > 0:
                slacks[i] -= max(e * (1 + 1e-9), 2e-12 * magnitudes[i])
    raise ValueError("solve: scipy.optimize.milp's solutions kept exceeding a budget by its feasibility tolerance")


def average_bits(solution: dict[str, Choice]) -> float:
    """Σ bits·numel / Σ numel over the weights (choices with numel > 0) of a solution."""
    numel = sum(c.numel for c in solution.values())
    return sum(c.bits * c.numel for c in solution.values()) / numel if numel else float("nan")


def total_bytes(solution: dict[str, Choice]) -> int:
    """Σ bytes of a solution (activations and KV cache count 0)."""
    return sum(c.bytes for c in solution.values())


def total_error(solution: dict[str, Choice]) -> float:
    """The predicted increase of the objective: Σ error (assumes the errors add up)."""
    return sum(c.error for c in solution.values())


def show_seconds(seconds: float) -> str:
    """A time for people: "412.3 µs", "1.250 ms"."""
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} µs"


def _bit_cost(c: Choice) -> int:
    """bits·numel as the integer it is for every format (see the module docstring)."""
    exact = c.bits * c.numel
    cost = round(exact)
    if abs(exact - cost) > 1e-6 * max(1.0, abs(exact)):
        raise ValueError(f"solve: {c.tensor} in {c.fmt}: bits·numel = {c.bits}·{c.numel} = {exact} is not a "
                         "whole number of bits")
    return cost


def _best(errors: list[float], costs: list[int], among) -> int:
    """The index of the least error, then the least cost, then the first."""
    return min(among, key=lambda j: (errors[j], costs[j], j))


def _knapsack(names: list[str], cost: dict[str, list[int]], errors: dict[str, list[float]],
              slack: int) -> dict[str, int] | None:
    """Exact multiple-choice knapsack: indices minimising Σ error with Σ (cost - the
    tensor's least cost) <= slack.

    Tensors whose candidates all cost the same are decided alone. For the others, a choice
    dominated by a cheaper-or-equal one of no larger error is dropped, steps are divided by
    their gcd g, and `table[c]` holds the least error of the tensors so far at exactly c·g
    above their least cost; each tensor keeps its argmin per cell for the walk back.
    Time Σ_tensors candidates · cells, memory Σ_tensors cells bytes; None (not solved) when
    that is over `DP_CELLS`.
    """
    picked: dict[str, int] = {}
    items = []  # (name, candidate indices, steps)
    for n in names:
        base = min(cost[n])
        keep = _undominated(errors[n], cost[n])
        if len({cost[n][j] for j in keep}) == 1:
            picked[n] = keep[0]
        else:
            items.append((n, keep, [cost[n][j] - base for j in keep]))
    if not items:
        return picked
    # a budget that fits every tensor's least-error choice needs no search
    if sum(max(steps) for _, _, steps in items) <= slack:
        picked.update({n: keep[-1] for n, keep, _ in items})  # undominated: the costliest has the least error
        return picked
    g = 0
    for _, _, steps in items:
        for d in steps:
            g = math.gcd(g, d)
    cells = slack // g
    if cells * len(items) > DP_CELLS:
        return None
    table = np.zeros(1)  # least error at exactly c·g above the least cost
    argmins = []
    dtype = np.uint8 if max(len(keep) for _, keep, _ in items) <= 256 else np.uint16
    cand, better = np.empty(cells + 1), np.empty(cells + 1, dtype=bool)
    for n, keep, steps in items:
        reach = min(cells, len(table) - 1 + max(steps) // g)
        new = np.full(reach + 1, np.inf)
        arg = np.zeros(reach + 1, dtype=dtype)
        for i, (j, d) in enumerate(zip(keep, steps)):
            d //= g
            if d > reach:
                continue
            m = min(len(table), reach + 1 - d)
            np.add(table[:m], errors[n][j], out=cand[:m])
            np.less(cand[:m], new[d:d + m], out=better[:m])  # strict: the cheaper candidate keeps a tie
            np.copyto(new[d:d + m], cand[:m], where=better[:m])
            np.copyto(arg[d:d + m], i, where=better[:m])
        table = new
        argmins.append(arg)
    c = int(np.argmin(table))  # the first minimum: of equal errors, the least cost
    for (n, keep, steps), arg in zip(reversed(items), reversed(argmins)):
        i = int(arg[c])
        picked[n] = keep[i]
        c -= steps[i] // g
    assert c == 0, "allocate: the walk back did not return to the least cost"
    return picked


def _undominated(errors: list[float], costs: list[int]) -> list[int]:
    """Candidate indices in increasing cost, each of strictly less error than every cheaper
    one (of equal cost and error, the first is kept)."""
    order = sorted(range(len(costs)), key=lambda j: (costs[j], errors[j], j))
    keep: list[int] = []
    for j in order:
        if not keep or errors[j] < errors[keep[-1]]:
            keep.append(j)
    return keep
