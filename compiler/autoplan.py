"""Automatic plans: measured sensitivity, then the exact allocation under a budget.

    plan = mxc.Plan.auto(model, 3.5, calibration=tokenizer)      # 3.5 average bits per weight
    plan = mxc.Plan.auto(model, "90MB", calibration=tokenizer)   # the whole model in 90 MB
    q = mxc.compile(model, "auto:3.5", calibration=tokenizer)    # the same, as a preset
    print(plan.explain())                                        # per tensor: each candidate's error, the chosen one

`auto_plan` measures every candidate on every tensor (`mxc.sensitivity.measure`), solves the
multiple-choice knapsack exactly (`mxc.passes.allocate.solve`) and returns an ordinary `Plan`:
one exact-path rule per layer, float by default, and the figures that chose each format in
`plan.notes["allocation"]` (saved with the plan's JSON, shown by `plan.explain()`). A weight
candidate "int3<asym,g128>+16" keeps the layer's 16 input channels of largest activation in
int8 (the rule's option `outliers`; compiling such a plan needs calibration data, which
ranks the channels).

Budgets: a number, or text such as "3.5" or "3.5bits", is average bits per weight over the
allocated weights (Σ bits·numel / Σ numel, scales included); text with a byte unit ("90MB",
"85.5MiB", "2GB", "120000000B"; MB = 10⁶ bytes, MiB = 2²⁰) is the model's weight bytes: the
allocated weights plus every constant of the captured graph left in float (embeddings, norms,
lm_head, rotary tables) at its size (`Sensitivity.float_bytes`; a module buffer the graph
never reads does not count). Weights count as the compiled model stores them (`stored_bytes`): each row's
codes in whole int32 words, ceil(bits·K/32), plus scales and zero points; a weight with
outlier channels counts both parts and the int64 gather index [K] the reorder pass keeps
for its group (q, k, v share one; down_proj needs none: `mxc.sensitivity.INDEX_BYTES`).
"""

from __future__ import annotations

import re
from typing import Any

#: The candidates of `Plan.auto` when none are given: weight formats from 2 to 8 bits for
#: every linear but lm_head, which stays float as in the presets (it dominates the error of
#: small models), 3 and 4 bits also with the layer's 16 input channels of largest activation
#: kept in int8 ("+16"; on SmolLM2, compiled with GPTQ, the allocation gives them to 40-55%
#: of the layers between 3 and 4.3 bits: benchmarks/RESULTS.md); activations and the KV cache
#: stay float. Keys as `mxc.sensitivity.measure` reads them: a tensor kind or a glob over
#: tensor names, the first match wins ([]: not allocated).
DEFAULT_CANDIDATES: dict[str, list[str]] = {
    "lm_head:weight": [],
    "weight": ["int2<asym,g64>", "int3<asym,g128>", "int3<asym,g128>+16", "int4<asym,g128>", "int4<asym,g128>+16",
               "int4<asym,g32>", "int8<sym,channel>"],
}
KINDS = ("weight", "act", "kv")
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_BUDGET = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*([a-zA-Z/]*)\s*")


def parse_budget(budget: Any) -> tuple[str, float]:
    """("bits", average bits per weight) or ("bytes", model bytes) from a number or text.

        parse_budget(3.5) -> ("bits", 3.5)      parse_budget("90MB") -> ("bytes", 90000000.0)
    """
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        kind, value = "bits", float(budget)
    elif isinstance(budget, str) and (m := _BUDGET.fullmatch(budget)):
        value = float(m[1]) * 10 ** int(m[2] or 0)
        unit = m[3].lower()
        if unit in ("", "bit", "bits", "b/w"):
            kind = "bits"
        elif unit in _UNITS:
            kind, value = "bytes", value * _UNITS[unit]
        else:
            raise ValueError(f"budget {budget!r}: unknown unit {m[3]!r}; expected bits (\"3.5\", \"3.5bits\") "
                             f"or bytes ({', '.join(u.upper().replace('I', 'i') for u in _UNITS)})")
    else:
        raise ValueError(f"budget {budget!r}: expected average bits per weight (3.5, \"3.5bits\") or model bytes "
                         "(\"90MB\", \"85MiB\")")
    if not value > 0:
        raise ValueError(f"budget {budget!r} must be positive")
    return kind, value


def measured_kinds(candidates: Any) -> tuple[str, ...]:
    """The tensor kinds a candidates list or dict asks to measure: a list is for weights; a
    dict's keys are kinds or globs over tensor names ending in ":<kind>"."""
    if not isinstance(candidates, dict):
        return ("weight",)
    kinds = set()
    for key, fmts in candidates.items():
        kind = key if key in KINDS else key.rpartition(":")[2] if key.rpartition(":")[2] in KINDS else "weight"
        if fmts:
            kinds.add(kind)
    return tuple(k for k in KINDS if k in kinds)


def auto_plan(model: Any, budget: Any, candidates: Any = None, calibration: Any = None, objective: str = "kl",
              *, progress: bool = True, example_inputs: Any = None, measured: Any = None, quantizer: str = "rtn",
              latency: Any = None, cost: Any = None, windows: tuple[int, int] | None = None, tune: int = 0):
    """The plan of least predicted error under `budget` (see the module docstring).
    `measured`: a `mxc.sensitivity.Sensitivity` measured before (e.g. once for several
    budgets); then nothing is measured and `candidates`, `calibration`, `objective` are unused.
    `quantizer`: how candidate weights are quantized while measuring ("rtn" or "gptq", see
    `mxc.sensitivity`). `latency`: a latency budget too (seconds, or "0.4ms"), on the sum of
    each allocated tensor's time as `cost` predicts it (default `mxc.cost.BandwidthModel()`,
    an estimate: each linear, plus what quantizing an activation or the KV cache adds);
    `budget` may then be None (latency alone). `windows`: (count, tokens) of the held-out text
    a tokenizer gives the measurement (`mxc.sensitivity.measure`). `tune`: the plan's steps of
    end-to-end scale tuning when it is compiled (`Plan.tune`; the allocation does not see it)."""
    from . import sensitivity
    from .cost import BandwidthModel, parse_latency
    from .passes.allocate import (BudgetError, LatencyBudgetError, average_bits, show_seconds, solve, total_bytes,
                                  total_error)
    from .plan import Plan, Rule

    if budget is None and latency is None:
        raise ValueError("an automatic plan needs a budget: average bits (3.5), model bytes (\"90MB\") or latency=")
    kind, value = parse_budget(budget) if budget is not None else (None, None)
    seconds = None if latency is None else parse_latency(latency)
    if cost is not None and latency is None:
        raise ValueError("auto_plan: a cost model prices a latency budget; pass latency= with cost=")
    cost = BandwidthModel() if cost is None and latency is not None else cost
    if measured is not None:
        if candidates is not None or calibration is not None or windows is not None:
            raise ValueError("auto_plan: pass either a measured sensitivity or candidates and calibration (and "
                             "windows) to measure, not both")
        objective = getattr(measured, "objective", objective)
    elif calibration is None:
        raise ValueError(f"an automatic plan (budget {budget!r}) is allocated from sensitivity measured on calibration "
                         "text: pass calibration=tokenizer (real text) or a list of token-id tensors")
    else:
        candidates = DEFAULT_CANDIDATES if candidates is None else candidates
        measured = sensitivity.measure(model, candidates, calibration, objective=objective, progress=progress,
                                       tensors=measured_kinds(candidates), example_inputs=example_inputs,
                                       quantizer=quantizer, windows=windows)
    if not measured:
        raise ValueError(f"no tensor of the model matches the candidates {candidates!r}")
    fixed = getattr(measured, "float_bytes", None)
    if fixed is None:  # a measurement that did not record it: the model's own tensors, an upper bound
        fixed = _unallocated_bytes(model, measured)
    stored = getattr(measured, "stored_bytes", total_bytes)  # gather indices counted once per group
    choices = measured if cost is None else _priced(model, measured, cost)
    if kind != "bytes":
        solution = solve(choices, budget_bits=value, budget_seconds=seconds)
    else:
        target = limit = int(value) - fixed
        try:
            solution = solve(choices, budget_bytes=limit, budget_seconds=seconds)
            # choices are charged shares of gather indices, exact when a whole group takes
            # outlier channels: where a part of one does, the index costs more than its shares
            # and the allocation runs again with that much less
            while (over := stored(solution) - target) > 0:
                limit -= over
                solution = solve(choices, budget_bytes=limit, budget_seconds=seconds)
        except LatencyBudgetError:
            raise
        except BudgetError as e:
            least = e.least + fixed
            raise BudgetError(f"budget of {int(value)} model bytes is infeasible: the smallest feasible budget is "
                              f"{least} bytes ({least / 1e6:.3f} MB: every allocated tensor at its smallest candidate, "
                              f"{fixed} bytes of float tensors left as they are)", least) from None
    layers: dict[tuple[str, str], dict] = {}
    options: dict[tuple[str, str], dict] = {}
    for tensor, choice in solution.items():
        path, _, what = tensor.rpartition(":")
        op = "attention" if what == "kv" else "linear"
        layers.setdefault((path, op), {})[what] = choice.fmt
        if choice.outliers:
            options[(path, op)] = {"outliers": choice.outliers}
    rules = tuple(Rule(path, op=op, **fmts, options=options.get((path, op), {})) for (path, op), fmts in layers.items())
    shown = f"{value:g}" if kind == "bits" else str(budget).replace(" ", "") if kind else ""
    if seconds is not None:
        shown += f"{',' if shown else ''}latency={show_seconds(seconds).replace(' ', '')}"
    notes = {"allocation": {
        "budget": {"bits": value} if kind == "bits" else {"bytes": int(value)} if kind else {},
        "float_bytes": fixed,  # the model's tensors left out of the allocation, at their size
        "objective": objective,
        "quantizer": getattr(measured, "quantizer", quantizer),
        "predicted_error": total_error(solution),
        "average_bits": average_bits(solution),
        "bytes": stored(solution) + fixed,  # the model's weight bytes
        "measured": {"tokens": getattr(measured, "tokens", None), "seconds": round(getattr(measured, "seconds", 0.0), 3)},
        "tensors": {
            tensor: {
                "chosen": _text(solution[tensor]),
                "candidates": [{"format": _text(c), "bits": c.bits, "bytes": c.bytes, "error": c.error,
                                **({"seconds": c.seconds} if cost is not None else {})}
                               for c in row],
            }
            for tensor, row in choices.items()
        },
    }}
    if cost is not None:
        notes["allocation"]["latency"] = {"budget_seconds": seconds,
                                          "predicted_seconds": sum(c.seconds for c in solution.values()),
                                          "cost": cost.to_dict(), "cost_model": cost.describe()}
    return Plan(rules=rules, default=Rule(), name=f"auto:{shown}", notes=notes, tune=tune)


def _priced(model: Any, measured: dict, cost: Any) -> dict:
    """`measured`'s choices with `seconds` as `cost` predicts them: for each weight its shape
    [N, K], for each activation (K,), for each KV cache (W,) (`_kv_width`; None if unknown)."""
    import dataclasses

    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"a latency budget needs the model's weight shapes: expected a torch module, "
                        f"got {type(model).__name__}")
    priced = {}
    for tensor, row in measured.items():
        path, _, what = tensor.rpartition(":")
        module = model.get_submodule(path)
        if what == "weight":
            shape = tuple(module.weight.shape)
        elif what == "act":
            shape = (int(module.weight.shape[1]),)
        else:
            shape = _kv_width(module)
        priced[tensor] = [dataclasses.replace(c, seconds=float(cost.seconds(c, shape))) for c in row]
    return priced


#: The key and value projections of an attention module, by the names Llama-like (k_proj,
#: v_proj) and BERT-like (key, value) models give them.
_KV_PROJECTIONS = (("k_proj", "v_proj"), ("key", "value"))


def _kv_width(attention: Any) -> tuple[int] | None:
    """(W,): the K and V elements per token that `attention`'s KV cache holds (the output
    features of its key and value projections); None where it has no such linears."""
    import torch

    for names in _KV_PROJECTIONS:
        linears = [getattr(attention, n, None) for n in names]
        if all(isinstance(m, torch.nn.Linear) for m in linears):
            return (sum(m.out_features for m in linears),)
    return None


def _unallocated_bytes(model: Any, measured: dict) -> int:
    """The bytes of the model's parameters and buffers that no allocated weight covers (each
    tensor once, tied weights included), at their size in the model: an upper bound on what
    the compiled model keeps of them (a buffer the graph does not read counts too)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"a byte budget needs the model's tensors: expected a torch module, got {type(model).__name__}")
    allocated = {id(model.get_submodule(t.rpartition(":")[0]).weight) for t in measured if t.endswith(":weight")}
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen and id(t) not in allocated:
            total += t.numel() * t.element_size()
        seen.add(id(t))
    return total


def _text(choice: Any) -> str:
    """A choice's candidate as text: "float", "int4<asym,g128>", "int3<asym,g128>+16"."""
    from .sensitivity import Candidate

    return str(Candidate(choice.fmt, choice.outliers))


def allocation_lines(allocation: dict) -> list[str]:
    """`explain()`'s table of an automatic plan: per tensor, each candidate's measured error
    (the objective increase when only that tensor takes it), the chosen one starred; tensors
    with the same candidates share a header."""
    from .passes.allocate import show_seconds

    budget, latency = allocation["budget"], allocation.get("latency")
    limits = [f"{budget['bits']:g} average bits per weight" if "bits" in budget else f"{budget['bytes']} model bytes"
              ] if budget else []
    if latency:
        limits.append(f"{show_seconds(latency['budget_seconds'])} of predicted latency")
    lines = [
        f"  allocation under {' and '.join(limits)}: objective {allocation['objective']}, predicted increase "
        f"{allocation['predicted_error']:.4g}, {allocation['average_bits']:.3f} average bits, "
        f"{allocation['bytes']} bytes (errors: increase when only that tensor takes the format; * chosen)"
    ]
    if latency:
        lines.append(f"  predicted latency of the allocated tensors: {show_seconds(latency['predicted_seconds'])}, "
                     f"by the {latency['cost_model']}")
    header = None
    for tensor, row in allocation["tensors"].items():
        fmts = [c["format"] for c in row["candidates"]]
        if fmts != header:
            header = fmts
            lines.append(f"  {'tensor':<44} " + " ".join(f"{f:>18}" for f in fmts))
        cells = [f"{c['error']:.3e}" + ("*" if c["format"] == row["chosen"] else " ") for c in row["candidates"]]
        lines.append(f"  {tensor:<44} " + " ".join(f"{cell:>18}" for cell in cells))
    return lines
