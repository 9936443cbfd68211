"""Automatic plans (`Plan.auto`, presets "auto:3.5" / "auto:90MB") on the tiny Llama: the
plan meets its budget and is the solver's optimum for the measured errors, prints, round-trips
through JSON with its sensitivity figures, and compiles. The sensitivity measurement is
replaced by a fake (random errors, falling with bits) except in the last, end-to-end test."""

import math
import warnings

import pytest
import torch

import mxc
from mxc import autoplan, sensitivity
from mxc.passes.allocate import BudgetError, Choice, solve, total_error

CANDIDATES = autoplan.DEFAULT_CANDIDATES["weight"]


_GRAPHS: dict[int, object] = {}  # id(model) -> its canonical graph, captured once


@pytest.fixture
def fake_measure(monkeypatch):
    """`sensitivity.measure` with its measurement replaced: the real targets, candidates,
    bytes, bits and gather-index shares (`sensitivity.targets`, `formats_for`, `_indices`,
    `_choices`), and fresh random errors ~ 2^-bits in place of the KL; each call is recorded."""
    from mxc.frontends.torch_export import capture
    from mxc.passes import run_pipeline

    calls = []
    seed = int(torch.randint(0, 2**31 - 1, ()))

    def bits(t, c):
        if t.kind == "weight":
            return sensitivity.candidate_size(c, t.shape)[1]
        return 32.0 if c.fmt is None else float(c.fmt.effective_bits(t.k))

    def measure(model, candidates, calibration, *, objective="kl", tensors=("weight",), progress=True,
                example_inputs=None, quantizer="rtn", windows=None):
        calls.append({"candidates": candidates, "calibration": calibration, "objective": objective, "tensors": tensors,
                      "windows": windows})
        if id(model) not in _GRAPHS:
            _GRAPHS[id(model)] = run_pipeline(capture(model).graph, ["canonicalize"]).graph
        graph = _GRAPHS[id(model)]
        plan = {t: sensitivity.formats_for(candidates, t) for t in sensitivity.targets(graph, tensors)}
        plan = {t: cands for t, cands in plan.items() if cands}
        gen = torch.Generator().manual_seed(seed)
        errors = {}
        for t, cands in plan.items():
            scale = float(torch.rand((), generator=gen)) + 0.01
            errors[t] = [scale * 2.0 ** -bits(t, c) * float(torch.rand((), generator=gen) + 0.5) for c in cands]
        indices = sensitivity._indices(graph, plan)
        return sensitivity.Sensitivity(sensitivity._choices(plan, errors, indices), objective=objective, tokens=48,
                                       seconds=0.5, indices=indices)

    monkeypatch.setattr(sensitivity, "measure", measure)
    return calls


def batches(n=2, seq=24):
    return [torch.randint(0, 131, (seq,)) for _ in range(n)]


def linear_weights(model):
    return {p: m.weight for p, m in model.named_modules() if isinstance(m, torch.nn.Linear) and p != "lm_head"}


def chosen(plan, path):
    """The candidate a plan's rule gives layer `path`: its weight format and outlier count."""
    rule = plan.rule_for(path)
    return sensitivity.Candidate(rule.weight, rule.options.get("outliers", 0))


def plan_average_bits(plan, model):
    """Σ bits·numel / Σ numel over the allocated linears, read off the plan's rules."""
    weights = linear_weights(model)
    total = sum(sensitivity.candidate_size(chosen(plan, p), tuple(w.shape))[1] * w.numel() for p, w in weights.items())
    return total / sum(w.numel() for w in weights.values())


@pytest.mark.parametrize("budget", [2.5, 3.5, 4.25, 6.0])
def test_auto_plan_meets_the_bits_budget_at_the_solvers_optimum(tiny_llama, fake_measure, budget):
    cal = batches()
    plan = mxc.Plan.auto(tiny_llama, budget, calibration=cal)
    assert fake_measure[0]["calibration"] is cal and fake_measure[0]["tensors"] == ("weight",)
    weights = linear_weights(tiny_llama)
    assert sorted(r.match for r in plan.rules) == sorted(weights)  # one exact-path rule per layer
    assert plan.rule_for("lm_head").weight is None and plan.default.weight is None
    assert plan_average_bits(plan, tiny_llama) <= budget
    assert plan.name == f"auto:{budget:g}"
    notes = plan.notes["allocation"]
    assert math.isclose(notes["average_bits"], plan_average_bits(plan, tiny_llama), rel_tol=1e-12)
    # the chosen formats are the solver's optimum for the measured errors
    measured = sensitivity.measure(tiny_llama, autoplan.DEFAULT_CANDIDATES, cal)
    best = solve(measured, budget_bits=budget)
    assert {p: chosen(plan, p) for p in weights} == {t[:-7]: sensitivity.Candidate(c.fmt, c.outliers)
                                                     for t, c in best.items()}
    assert notes["predicted_error"] == pytest.approx(total_error(best), rel=1e-12)


def test_more_bits_never_predict_more_error(tiny_llama, fake_measure):
    cal = batches()
    errors = [mxc.Plan.auto(tiny_llama, b, calibration=cal).notes["allocation"]["predicted_error"]
              for b in (2.5, 3.0, 3.5, 4.0, 5.0, 8.25)]
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1]


def test_auto_plan_prints_and_round_trips_through_json(tiny_llama, fake_measure, tmp_path):
    plan = mxc.Plan.auto(tiny_llama, "3.5bits", calibration=batches())
    path = tmp_path / "plan.json"
    plan.to_json(path)
    again = mxc.Plan.from_json(path)
    assert again == plan and again.notes == plan.notes
    assert mxc.Plan.coerce(str(path)) == plan
    text = plan.explain(tiny_llama)
    assert "allocation under 3.5 average bits per weight" in text
    for tensor, row in plan.notes["allocation"]["tensors"].items():
        line = next(line for line in text.splitlines() if line.strip().startswith(tensor + " "))
        starred = [c["format"] for c in row["candidates"] if f"{c['error']:.3e}*" in line]
        assert starred == [str(chosen(plan, tensor[:-7]))]
    assert all(f"{f:>18}" in text for f in CANDIDATES)


def test_compile_auto_preset_meets_its_budget(tiny_llama, fake_measure, tmp_path):
    compiled = mxc.compile(tiny_llama, "auto:3.5", calibration=batches())
    report = compiled.report()
    assert report.plan == "auto:3.5" and report.avg_bits <= 3.5
    plan = compiled.plan
    for path in linear_weights(tiny_llama):
        c = chosen(plan, path)
        assert report.layers[path]["format"] == (f"{c.fmt} + {c.outliers} int8<sym,channel>" if c.outliers else str(c.fmt))
    ids = torch.randint(0, 131, (1, 12))
    assert torch.isfinite(compiled(ids).logits).all()
    mxc.save(compiled, tmp_path / "artifact")
    assert mxc.load(tmp_path / "artifact").plan == plan  # the sensitivity figures travel with the artifact


def test_compile_auto_bytes_budget(tiny_llama, fake_measure):
    cal = batches()
    float_bytes = sum(t.numel() * t.element_size() for t in (*tiny_llama.parameters(), *tiny_llama.buffers()))
    cheapest = mxc.Plan.auto(tiny_llama, 3.0, calibration=cal)  # a small feasible plan
    budget = cheapest.notes["allocation"]["bytes"] + 20_000
    assert budget < float_bytes
    compiled = mxc.compile(tiny_llama, f"auto:{budget}B", calibration=cal)
    notes = compiled.plan.notes["allocation"]
    assert notes["bytes"] <= budget and notes["budget"] == {"bytes": budget}
    # the allocation counts codes as the layout pass stores them (N·ceil(bits·K/32) int32
    # words, `stored_bytes`), as the report does; buffers the graph does not keep (Llama's
    # original_inv_freq) count in the allocation's float bytes
    unused = notes["bytes"] - compiled.report().weight_bytes
    assert 0 <= unused <= sum(b.numel() * b.element_size() for b in tiny_llama.buffers())
    assert notes["predicted_error"] < cheapest.notes["allocation"]["predicted_error"]


def test_infeasible_budgets_name_the_least(tiny_llama, fake_measure):
    weights = linear_weights(tiny_llama)
    least_bits = sum(mxc.ir.parse_format(CANDIDATES[0]).effective_bits(w.shape[1]) * w.numel() for w in weights.values())
    least_bits /= sum(w.numel() for w in weights.values())
    with pytest.raises(BudgetError, match="smallest feasible budget is") as info:
        mxc.Plan.auto(tiny_llama, 1.5, calibration=batches())
    assert least_bits <= info.value.least < least_bits + 1e-4
    mxc.Plan.auto(tiny_llama, info.value.least, calibration=batches())  # the figure named is feasible
    with pytest.raises(BudgetError, match=r"smallest feasible budget is \d+ bytes") as info:
        mxc.compile(tiny_llama, "auto:0.01MB", calibration=batches())
    assert mxc.Plan.auto(tiny_llama, f"{info.value.least}B", calibration=batches()).notes["allocation"]["bytes"] == info.value.least


def test_auto_needs_calibration_and_a_model():
    with pytest.raises(ValueError, match="calibration=tokenizer"):
        mxc.compile(torch.nn.Linear(4, 4), "auto:3.5")
    with pytest.raises(ValueError, match=r"Plan.auto\(model, '3.5'"):
        mxc.Plan.coerce("auto:3.5")


@pytest.mark.parametrize("text, expected", [
    (3.5, ("bits", 3.5)), ("3.5", ("bits", 3.5)), ("4bits", ("bits", 4.0)), ("90MB", ("bytes", 90e6)),
    ("1.5 MiB", ("bytes", 1.5 * 2**20)), ("2e6B", ("bytes", 2e6)), ("3kb", ("bytes", 3000.0)),
])
def test_parse_budget(text, expected):
    assert autoplan.parse_budget(text) == expected


@pytest.mark.parametrize("text", ["90 parsecs", "-3", "0", "many", True])
def test_parse_budget_rejects(text):
    with pytest.raises(ValueError, match="budget"):
        autoplan.parse_budget(text)


def test_end_to_end_real_sensitivity(tiny_llama_factory):
    """The real measurement on a fresh tiny Llama with random calibration tokens: the plan
    meets the budget, its errors are the measured ones, and it compiles to that size."""
    model = tiny_llama_factory(seed=int(torch.randint(0, 2**31 - 1, ())))
    cal = batches(n=2, seq=32)
    candidates = {"lm_head:weight": [], "weight": ["int2<asym,g32>", "int4<asym,g32>", "int8<sym,channel>"]}
    plan = mxc.Plan.auto(model, 4.0, candidates=candidates, calibration=cal, progress=False)
    assert plan_average_bits(plan, model) <= 4.0
    rows = plan.notes["allocation"]["tensors"]
    assert sorted(t[:-7] for t in rows) == sorted(linear_weights(model))
    assert all(row["candidates"][0]["error"] > row["candidates"][2]["error"] >= 0 for row in rows.values())
    chosen = {row["chosen"] for row in rows.values()}
    assert len(chosen) > 1  # a mix: 4 average bits is neither all int2 nor all int8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = mxc.compile(model, plan, calibration=cal)
    assert compiled.report().avg_bits <= 4.0
    # the bytes the plan counts are the compiled model's: the graph's float constants, not the
    # module's (its spare rotary buffer `original_inv_freq` is never read)
    assert plan.notes["allocation"]["bytes"] == compiled.report().weight_bytes
    # so at uniform int8's exact size every weight takes int8 (the least error of each)
    measured = sensitivity.Sensitivity.from_dict(sensitivity.measure(model, candidates, cal, progress=False).to_dict())
    uniform = mxc.compile(model, mxc.Plan(rules=(mxc.Rule("lm_head"),), default=mxc.Rule(weight="int8<sym,channel>")))
    at_int8 = mxc.Plan.auto(model, f"{uniform.report().weight_bytes}B", measured=measured)
    assert {row["chosen"] for row in at_int8.notes["allocation"]["tensors"].values()} == {"int8<sym,channel>"}


def test_fisher_objective_allocates_gptq_candidates_and_compiles(tiny_llama_factory):
    """objective="fisher" (the KL to second order) with GPTQ candidates: a plan in budget,
    recorded as such, whose errors fall as bits grow, and that compiles to its counted bytes."""
    model = tiny_llama_factory(seed=int(torch.randint(0, 2**31 - 1, ())))
    cal = batches(n=6, seq=40)
    candidates = {"lm_head:weight": [], "weight": ["int2<asym,g32>", "int4<asym,g32>", "int8<sym,channel>"]}
    plan = mxc.Plan.auto(model, 4.0, candidates=candidates, calibration=cal, objective="fisher", quantizer="gptq",
                         progress=False)
    allocation = plan.notes["allocation"]
    assert (allocation["objective"], allocation["quantizer"]) == ("fisher", "gptq")
    assert allocation["measured"]["tokens"] == 6 * 40
    rows = allocation["tensors"]
    assert sorted(t[:-7] for t in rows) == sorted(linear_weights(model))
    assert all(row["candidates"][0]["error"] > row["candidates"][2]["error"] > 0 for row in rows.values())
    assert len({row["chosen"] for row in rows.values()}) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = mxc.compile(model, plan, calibration=cal)
    assert compiled.report().avg_bits <= 4.0
    assert allocation["bytes"] == compiled.report().weight_bytes


def test_a_saved_measurement_allocates_other_budgets_without_measuring(tiny_llama, fake_measure):
    """`Sensitivity.to_dict` → JSON → `from_dict` keeps every choice; `Plan.auto(measured=...)`
    measures nothing and gives the plan a fresh measurement would."""
    import json

    cal = batches()
    measured = sensitivity.measure(tiny_llama, autoplan.DEFAULT_CANDIDATES, cal)
    again = sensitivity.Sensitivity.from_dict(json.loads(json.dumps(measured.to_dict())))
    assert again == measured and (again.objective, again.tokens, again.seconds) == ("kl", 48, 0.5)
    calls = len(fake_measure)
    for budget in (3.0, "4bits"):
        plan = mxc.Plan.auto(tiny_llama, budget, measured=again)
        assert plan == mxc.Plan.auto(tiny_llama, budget, calibration=cal)
    assert len(fake_measure) == calls + 2  # only the two comparison plans measured
    tuned = mxc.Plan.auto(tiny_llama, 3.0, measured=again, tune=16)
    assert tuned.tune == 16 and tuned.rules == mxc.Plan.auto(tiny_llama, 3.0, measured=again).rules
    with pytest.raises(ValueError, match="either a measured sensitivity or candidates"):
        mxc.Plan.auto(tiny_llama, 3.0, calibration=cal, measured=again)


def test_outlier_candidates_become_rules_that_compile_within_the_budget(tiny_llama_factory):
    """Candidates "fmt+k" (k input channels kept int8): the chosen ones become rules with the
    option `outliers`, the plan prints them and round-trips through JSON, and the compiled
    model meets the bits budget and the byte total the allocation predicted, exactly."""
    model = tiny_llama_factory(seed=int(torch.randint(0, 2**31 - 1, ())))
    cal = batches(n=2, seq=32)
    candidates = {"lm_head:weight": [], "weight": ["int2<asym,g32>", "int2<asym,g32>+6", "int4<asym,g32>",
                                                   "int4<asym,g32>+6"]}
    measured = sensitivity.measure(model, candidates, cal, progress=False)
    assert all([c.outliers for c in row] == [0, 6, 0, 6] for row in measured.values())
    budget = 3.4
    plan = mxc.Plan.auto(model, budget, measured=measured)
    rules = {r.match: r for r in plan.rules}
    notes = plan.notes["allocation"]["tensors"]
    with_outliers = [p for p, r in rules.items() if r.options.get("outliers")]
    assert with_outliers and len(with_outliers) < len(rules)  # a mix, at this budget
    for path, rule in rules.items():
        k = rule.options.get("outliers", 0)
        assert notes[f"{path}:weight"]["chosen"] == (f"{rule.weight}+{k}" if k else str(rule.weight))
    text = plan.explain()
    assert all(f"{p} " in line and line.endswith("  outliers=6") for p in with_outliers
               for line in text.splitlines() if line.strip().startswith(p + " "))
    assert "int4<asym,g32>+6" in text and mxc.Plan.from_json(plan.to_json()) == plan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = mxc.compile(model, plan, calibration=cal)
    report = compiled.report()
    assert report.avg_bits <= budget
    assert report.avg_bits == pytest.approx(plan.notes["allocation"]["average_bits"], abs=1e-9)
    assert {p for p, r in report.layers.items() if r.get("outliers")} == set(with_outliers)
    # exact, gather indices included; the float part is the graph's constants (Llama's unread
    # buffer original_inv_freq does not count)
    assert plan.notes["allocation"]["bytes"] == report.weight_bytes
    # a byte budget just fitting that model bytes gives the same plan, and one byte less another
    same = mxc.Plan.auto(model, f"{plan.notes['allocation']['bytes']}B", measured=measured)
    assert same.notes["allocation"]["bytes"] <= plan.notes["allocation"]["bytes"]
    assert same.notes["allocation"]["predicted_error"] <= plan.notes["allocation"]["predicted_error"]


def test_latency_budget_prices_each_linear_and_binds(tiny_llama, fake_measure, tmp_path):
    """`latency=`: each choice priced by the bandwidth model for its layer's shape, the
    allocation the solver's optimum under both budgets, the latency within its budget and
    shown (as an estimate) by explain(), the plan round-tripping through JSON."""
    from mxc.cost import BandwidthModel

    cal = batches()
    slow = BandwidthModel(bandwidth=1e9, launch=1e-6)  # a slow memory: bytes dominate the time
    free = mxc.Plan.auto(tiny_llama, 6.0, calibration=cal)
    weights = linear_weights(tiny_llama)
    measured = sensitivity.measure(tiny_llama, autoplan.DEFAULT_CANDIDATES, cal)
    shapes = {p + ":weight": tuple(w.shape) for p, w in weights.items()}
    time_of = {t: {(str(c.fmt), c.outliers): slow.seconds(c, shapes[t]) for c in row} for t, row in measured.items()}
    at_free = sum(time_of[t][(str(chosen(free, t[:-7]).fmt), chosen(free, t[:-7]).outliers)] for t in measured)
    budget = 0.8 * at_free
    plan = mxc.Plan.auto(tiny_llama, 6.0, calibration=cal, latency=budget, cost=slow)
    notes = plan.notes["allocation"]
    took = sum(time_of[t][(str(chosen(plan, t[:-7]).fmt), chosen(plan, t[:-7]).outliers)] for t in measured)
    assert took <= budget and notes["latency"]["predicted_seconds"] == pytest.approx(took, rel=1e-12)
    assert notes["latency"]["cost"]["measured"] is False and plan_average_bits(plan, tiny_llama) <= 6.0
    priced = {t: [Choice(**{**c.__dict__, "seconds": time_of[t][(str(c.fmt), c.outliers)]}) for c in row]
              for t, row in measured.items()}
    best = solve(priced, budget_bits=6.0, budget_seconds=budget)
    assert notes["predicted_error"] == pytest.approx(total_error(best), rel=1e-9)
    assert notes["predicted_error"] > free.notes["allocation"]["predicted_error"]  # the latency budget binds
    text = plan.explain(tiny_llama)
    assert "of predicted latency" in text and "bandwidth model (an estimate, not measured)" in text
    plan.to_json(tmp_path / "plan.json")
    assert mxc.Plan.from_json(tmp_path / "plan.json").notes == plan.notes
    alone = mxc.Plan.auto(tiny_llama, None, calibration=cal, latency=f"{budget * 1e3}ms", cost=slow)
    assert alone.notes["allocation"]["latency"]["predicted_seconds"] <= budget * (1 + 1e-9)


def test_latency_budget_prices_kv_reads_and_activation_quantizes(tiny_llama, fake_measure):
    """With KV and activation candidates and a context, each KV choice costs its cache's reads
    (W = k_proj + v_proj outputs per token) and each quantized activation its quantize pass;
    without a latency budget both stay float (least error), under one below the float KV
    caches' reads the plan quantizes KV caches, at the optimum of the independently priced
    choices, and the attention rules carry the chosen formats."""
    from mxc.cost import BandwidthModel

    cal = batches()
    candidates = {"lm_head:weight": [], "weight": ["int4<asym,g32>", "int8<sym,channel>"],
                  "act": [None, "int8<sym,token>"], "kv": [None, "int4<sym,token>", "int8<sym,token>"]}
    cost = BandwidthModel(bandwidth=1e9, launch=1e-7, context=4096)
    free = mxc.Plan.auto(tiny_llama, 8.5, candidates=candidates, calibration=cal)
    measured = sensitivity.measure(tiny_llama, candidates, cal, tensors=("weight", "act", "kv"))
    assert {t.rpartition(":")[2] for t in measured} == {"weight", "act", "kv"}
    assert all(free.notes["allocation"]["tensors"][t]["chosen"] == "float" for t in measured if not t.endswith(":weight"))
    attn = [p for p, m in tiny_llama.named_modules() if p.endswith("self_attn")]
    width = 2 * tiny_llama.config.num_key_value_heads * (tiny_llama.config.hidden_size // tiny_llama.config.num_attention_heads)

    def shape(t):
        path, _, what = t.rpartition(":")
        w = tiny_llama.get_submodule(path).weight if what != "kv" else None
        return tuple(w.shape) if what == "weight" else (w.shape[1],) if what == "act" else (width,)

    priced = {t: [Choice(**{**c.__dict__, "seconds": cost.seconds(c, shape(t))}) for c in row] for t, row in measured.items()}
    kv_float = sum(row[0].seconds for t, row in priced.items() if t.endswith(":kv"))
    assert kv_float == pytest.approx(len(attn) * 4096 * width * 2 / 1e9, rel=1e-12)  # fp16 cache reads
    at_free = sum(c.seconds for c in solve(priced, budget_bits=8.5).values())
    budget = at_free - 0.5 * kv_float
    plan = mxc.Plan.auto(tiny_llama, 8.5, candidates=candidates, calibration=cal, latency=budget, cost=cost)
    notes = plan.notes["allocation"]
    best = solve(priced, budget_bits=8.5, budget_seconds=budget)
    assert notes["predicted_error"] == pytest.approx(total_error(best), rel=1e-9)
    assert notes["latency"]["predicted_seconds"] <= budget and notes["latency"]["cost"]["context"] == 4096
    kv = {t: notes["tensors"][t]["chosen"] for t in measured if t.endswith(":kv")}
    assert any(f != "float" for f in kv.values())  # the budget is met by quantizing KV caches
    for t, f in kv.items():
        rule = plan.rule_for(t.rpartition(":")[0], op="attention")
        assert (str(rule.kv) if rule.kv is not None else "float") == f


def test_windows_size_the_measured_text_and_not_a_saved_measurement(tiny_llama, fake_measure):
    cal = batches()
    plan = mxc.Plan.auto(tiny_llama, 4.0, calibration=cal, windows=(3, 256))
    assert fake_measure[-1]["windows"] == (3, 256) and plan.notes["allocation"]["average_bits"] <= 4.0
    measured = sensitivity.measure(tiny_llama, CANDIDATES, cal)
    with pytest.raises(ValueError, match="pass either a measured sensitivity or candidates and calibration"):
        mxc.Plan.auto(tiny_llama, 4.0, measured=measured, windows=(3, 256))


def test_latency_budget_errors_name_what_was_expected(tiny_llama, fake_measure):
    from mxc.cost import BandwidthModel, parse_latency

    cal = batches()
    with pytest.raises(BudgetError, match="latency budget of 1.0 µs is infeasible: the least predicted latency is"):
        mxc.Plan.auto(tiny_llama, None, calibration=cal, latency="1us")
    with pytest.raises(ValueError, match="needs a budget"):
        mxc.Plan.auto(tiny_llama, None, calibration=cal)
    with pytest.raises(ValueError, match="pass latency= with cost="):
        mxc.Plan.auto(tiny_llama, 4.0, calibration=cal, cost=BandwidthModel())
    with pytest.raises(ValueError, match="expected seconds as a number or text with a unit"):
        parse_latency("fast")
    with pytest.raises(ValueError, match="expected a positive time"):
        parse_latency(0)
    with pytest.raises(ValueError, match="bandwidth must be a positive number"):
        BandwidthModel(bandwidth=-1)
    assert parse_latency("350us") == pytest.approx(350e-6) and parse_latency("2e-4s") == pytest.approx(2e-4)
