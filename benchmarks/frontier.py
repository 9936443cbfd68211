"""The frontier of automatic bit allocation on SmolLM2-135M (issue 6): perplexity against
model size, automatic plans against uniform plans, and how far the solver's additive error
model can be trusted.

    python benchmarks/frontier.py [--budgets 2.5 3 3.25 w4a16-g128 ...] [--windows 8] [--method gptq|rtn]

1. Sensitivity: every linear weight but lm_head (which stays float, as in the presets), each
   of `CANDIDATES` (formats, and "fmt+16": the layer's 16 input channels of largest
   activation abs-max kept in int8), the increase of KL(float ‖ quantized) of the logits with
   only that weight quantized, on `--sens-windows` × `--sens-len` tokens of text held out
   from the compile's calibration windows (`mxc.sensitivity.measure`), each candidate
   quantized as the plans will be compiled: `--method gptq` (default): clipping search +
   GPTQ on Hessians from the compile's calibration text; `--method rtn`: round to nearest.
   `--objective fisher` estimates that KL to second order from one backward per window
   instead (`mxc.sensitivity`, objective "fisher"), which affords far more text.
   Saved as JSON in `--cache` and reused by later runs.
2. Uniform plans (`UNIFORM`: one candidate for every linear but lm_head, with and without
   outlier channels) and automatic plans (`Plan.auto(model, budget, measured=...)` per
   budget: average bits, or for a budget named after a uniform plan that plan's model bytes)
   are compiled alike, reference backend, with the 8×512 calibration tokens from the end of
   the text: `--method gptq`: GPTQ + clipping search; `--method rtn`: round to nearest (the
   calibration data then only ranks outlier channels). Each gets its size, its perplexity
   over `--windows`×512 tokens from the start of the text, and its measured KL against
   float on the first `--kl-windows` sensitivity windows (default: all of them; 2 for
   `--objective fisher`). Rows are cached in `--cache` too: a rerun continues
   where the last one stopped (`--fresh` starts over).
3. Additivity: for every automatic plan, the predicted KL (the sum of its tensors' measured
   errors: what the solver minimises) against the KL the compiled plan measures on the same
   windows, and its perplexity increase.
   `--tune N`: every plan, uniform and automatic, also gets N steps of end-to-end scale tuning
   (`mxc.Plan(tune=N)`, `mxc.passes.tune`) on 33×512 tokens from the end of the text (its
   first 8 windows are GPTQ's, never the perplexity windows nor the KL windows).
4. Writes `benchmarks/frontier-<method>.png` and appends the tables, the goals (met or not),
   the machine and the date to benchmarks/RESULTS.md.

Goals (issue 6): at every budget the automatic plan has lower perplexity than every uniform
plan of the same or larger size; at the size of uniform W4A16 g128 it has at most half that
plan's perplexity increase over float; at 3.25 average bits it is at least as good as
uniform W4A16 g128.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import time
import warnings
from pathlib import Path

from _results import publish  # benchmarks/, the script's own folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
#: "fmt+16": the layer's 16 input channels of largest activation abs-max kept in int8 (the
#: reorder pass's outlier channels), the others in fmt.
#: The objective "fisher" prices a candidate at one GPTQ run per weight and a dot product
#: per window, so the list is long: int2 to int8, group sizes 32 to 128, 16 or 32 outliers.
CANDIDATES = ["int2<asym,g64>", "int2<asym,g64>+16", "int3<asym,g128>", "int3<asym,g128>+16", "int3<asym,g128>+32",
              "int3<asym,g64>", "int3<asym,g64>+16", "int3<asym,g32>", "int4<asym,g128>", "int4<asym,g128>+16",
              "int4<asym,g128>+32", "int4<asym,g64>", "int4<asym,g64>+16", "int4<asym,g32>", "int5<asym,g128>",
              "int5<asym,g128>+16", "int6<asym,g128>", "int8<sym,channel>"]
#: Uniform plans: name -> the candidate every linear but lm_head takes. The ":outliers=16"
#: ones are uniform plans too (one format everywhere, each layer's 16 largest channels in
#: int8): the automatic plans are held to them as well.
UNIFORM = {
    "w2a16-g64": "int2<asym,g64>", "w3a16-g128": "int3<asym,g128>", "w3a16-g128:outliers=16": "int3<asym,g128>+16",
    "w3a16-g32": "int3<asym,g32>", "w4a16-g128": "int4<asym,g128>", "w4a16-g64": "int4<asym,g64>",
    "w4a16-g128:outliers=16": "int4<asym,g128>+16", "w4a16-g32": "int4<asym,g32>", "w5a16-g128": "int5<asym,g128>",
    "w6a16-g128": "int6<asym,g128>", "w8a16": "int8<sym,channel>",
}
#: Average bits per weight, or a uniform plan's name: that plan's model bytes as the budget
#: (every uniform plan but the smallest, whose size only itself fits).
BUDGETS = ["2.5", "2.75", "3", "3.25", "3.5", "4", "5", "6", "8", *list(UNIFORM)[1:]]
#: The compile's calibration windows (GPTQ's Hessians, the outlier channels' abs-max): the
#: last 8 × 512 tokens of the text; the sensitivity windows are held out from them.
CALIBRATION = (8, 512)


def uniform_plan(name: str):
    import mxc
    from mxc.sensitivity import Candidate

    c = Candidate.parse(UNIFORM[name])
    rule = mxc.Rule(weight=c.fmt, options={"outliers": c.outliers} if c.outliers else {})
    return mxc.Plan(rules=(mxc.Rule("lm_head"),), default=rule, name=name)


def has_outliers(plan) -> bool:
    return any(r.options.get("outliers") for r in (*plan.rules, plan.default))


def compiled_as(plan, method: str):
    """`plan` as `--method` compiles it: "gptq" keeps the plan's own method ("auto": GPTQ +
    clipping search with calibration data); "rtn" rounds to nearest without clipping search
    (calibration data then only ranks outlier channels, for plans that keep some)."""
    import dataclasses

    return plan if method == "gptq" else dataclasses.replace(plan, method="rtn", clip_search=False)


def tuned(plan, steps: int):
    """`plan` with `steps` of end-to-end scale tuning (0: as it is)."""
    import dataclasses

    return dataclasses.replace(plan, tune=steps) if steps else plan


class Bench:
    """The model, its tokenizer, the text windows, and the float reference; `row(plan)`
    compiles and measures one plan."""

    def __init__(self, args):
        import torch

        import mxc
        from mxc.calibrate import text_batches

        torch.set_num_threads(args.threads)
        self.args = args
        self.model, self.tok = mxc.models.load_smollm2()
        n, seq_len = CALIBRATION
        self.calibration = text_batches(self.tok, n=n, seq_len=seq_len)  # what the compile calibrates on
        # scored text held out from it: GPTQ is fitted to the calibration windows
        self.sens_windows = text_batches(self.tok, n=args.sens_windows, seq_len=args.sens_len, skip=n * seq_len)
        self.kl_windows = self.sens_windows[:args.kl_windows]  # the text each plan's KL is measured on
        with torch.no_grad():
            self.float_logp = self.model(input_ids=torch.stack(self.kl_windows)).logits.double().log_softmax(-1)
        self.float_ppl = mxc.eval.perplexity(self.model, self.tok, windows=args.windows)

    def sensitivity(self, path: Path):
        from mxc import sensitivity

        if path.exists() and not self.args.fresh:
            got = sensitivity.Sensitivity.from_dict(json.loads(path.read_text()))
            have = {str(sensitivity.Candidate(c.fmt, c.outliers)) for row in got.values() for c in row}
            want = {str(sensitivity.Candidate.parse(c)) for c in self.args.candidates}
            if have != want:
                raise SystemExit(f"{path} measured the candidates {sorted(have)}, not --candidates {sorted(want)}: "
                                 "pass --fresh to measure again, or another --cache")
            return got
        got = sensitivity.measure(self.model, {"lm_head:weight": [], "weight": self.args.candidates}, self.sens_windows,
                                  objective=self.args.objective, quantizer=self.args.method,
                                  hessian_calibration=self.calibration)
        path.write_text(json.dumps(got.to_dict(), indent=1))
        return got

    def row(self, plan, kind: str, label: str) -> dict:
        import torch

        import mxc

        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            calibrated = self.args.method == "gptq" or has_outliers(plan) or self.args.tune
            # tuning: the tokenizer, which gives GPTQ the same 8×512 windows and the tune pass 33×512
            calibration = (self.tok if self.args.tune else self.calibration) if calibrated else None
            compiled = mxc.compile(self.model, tuned(compiled_as(plan, self.args.method), self.args.tune),
                                   calibration=calibration)
        seconds = time.perf_counter() - start
        report = compiled.report()
        ppl = mxc.eval.perplexity(compiled, self.tok, windows=self.args.windows)
        logp = compiled(torch.stack(self.kl_windows)).logits.double().log_softmax(-1)
        kl = float(torch.nn.functional.kl_div(logp, self.float_logp, reduction="sum", log_target=True))
        kl /= self.float_logp.shape[0] * self.float_logp.shape[1]
        row = {"kind": kind, "label": label, "bits": report.avg_bits, "mb": report.weight_bytes / 1e6,
               "bytes": report.weight_bytes, "ppl": ppl, "kl": kl, "seconds": round(seconds, 1)}
        if report.tuned:
            row["tuned"] = report.tuned
        allocation = plan.notes.get("allocation")
        if allocation:
            row["predicted"] = allocation["predicted_error"]
            chosen = [t["chosen"] for t in allocation["tensors"].values()]
            row["mix"] = {f: chosen.count(f) for f in sorted(set(chosen), key=chosen.index)}
        del compiled
        gc.collect()
        return row


def goals(rows: list[dict], float_ppl: float) -> list[str]:
    """The goals of issue 6, met or not. "Lower perplexity than any uniform plan of the same
    or larger size" is checked per uniform plan U against the automatic plan allocated at U's
    model bytes (budget named after U; without one, the automatic plan of the largest size
    at most U's). Where the allocation at U's size IS U (every layer in U's candidate: the
    top of the candidates, int8 everywhere), equal perplexity counts as not worse. Taken
    literally — every automatic plan against every larger uniform plan, int8 included — it
    could not hold below 8 bits, since uniform int8 is within noise of float."""
    uniform = sorted((r for r in rows if r["kind"] == "uniform"), key=lambda r: r["mb"])
    auto = sorted((r for r in rows if r["kind"] == "auto"), key=lambda r: r["mb"])
    checks, out = [], []
    for u in uniform:
        same = next((a for a in auto if a["label"] == u["label"]), None)
        below = [a for a in auto if a["mb"] <= u["mb"] + 1e-9]
        if same is None and not below:
            out.append(f"  - uniform {u['label']} ({u['mb']:.1f} MB): no automatic plan at or below its size")
            continue
        a = same or below[-1]
        identical = list(a.get("mix", {})) == [UNIFORM.get(u["label"])]
        ok = a["ppl"] < u["ppl"] or (identical and a["ppl"] <= u["ppl"])
        checks.append(ok)
        verdict = "lower" if a["ppl"] < u["ppl"] else "the same plan" if ok else "NOT lower"
        out.append(f"  - uniform {u['label']} ({u['mb']:.1f} MB, {u['ppl']:.3f}) against auto "
                   f"{'at its size' if same else a['label']} ({a['mb']:.1f} MB, {a['ppl']:.3f}): {verdict}")
    out.insert(0, f"- auto lower than every uniform plan of the same or larger size: {sum(checks)}/{len(checks)} "
                  f"uniform plans beaten by the automatic plan at their size — "
                  f"{'met' if checks and all(checks) else 'NOT met'}")
    w4 = next((u for u in uniform if u["label"] == "w4a16-g128"), None)
    at_w4 = next((a for a in auto if a["label"] == "w4a16-g128"), None)
    if w4 and at_w4:
        ratio = (at_w4["ppl"] - float_ppl) / (w4["ppl"] - float_ppl)
        out.append(f"- at the size of uniform W4A16 g128 ({w4['mb']:.1f} MB): auto +{100 * (at_w4['ppl'] / float_ppl - 1):.1f}% "
                   f"vs uniform +{100 * (w4['ppl'] / float_ppl - 1):.1f}%, {ratio:.2f} of its increase (goal ≤ 0.5) — "
                   f"{'met' if ratio <= 0.5 else 'NOT met'}")
    at_325 = next((a for a in auto if a["label"] == "3.25"), None)
    if w4 and at_325:
        ok = at_325["ppl"] <= w4["ppl"]
        out.append(f"- auto at 3.25 bits ({at_325['ppl']:.3f}) at least as good as uniform W4A16 g128 "
                   f"({w4['ppl']:.3f}) — {'met' if ok else 'NOT met'}")
    return out


def plot(rows: list[dict], float_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5))
    auto = sorted((r for r in rows if r["kind"] == "auto"), key=lambda r: r["mb"])
    uniform = sorted((r for r in rows if r["kind"] == "uniform"), key=lambda r: r["mb"])
    ax.plot([r["mb"] for r in auto], [r["ppl"] for r in auto], "o-", color="tab:blue", label="auto (mxc.Plan.auto)")
    ax.plot([r["mb"] for r in uniform], [r["ppl"] for r in uniform], "s--", color="tab:orange", label="uniform")
    for r in uniform:
        ax.annotate(r["label"], (r["mb"], r["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for r in auto:
        ax.annotate(f"{r['bits']:.2f}b", (r["mb"], r["ppl"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=7, color="tab:blue")
    ax.axhline(float_ppl, color="gray", linestyle=":", label=f"float ({float_ppl:.2f})")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # 15.5, not a second "16"
    ax.set_xlabel("model weights (MB; embeddings and lm_head float)")
    ax.set_ylabel("perplexity (pydoc_data.topics)")
    ax.set_title("SmolLM2-135M: automatic bit allocation against uniform plans")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def command(args, ap: argparse.ArgumentParser) -> str:
    """The command line that measures these rows again: the options that differ from the
    parser's defaults, with the method, the objective and the sensitivity windows always named."""
    words = [f"--method {args.method}", f"--objective {args.objective}", f"--sens-windows {args.sens_windows}",
             f"--sens-len {args.sens_len}"]
    if args.kl_windows != (2 if args.objective == "fisher" else args.sens_windows):
        words.append(f"--kl-windows {args.kl_windows}")
    for name in ("budgets", "uniform", "candidates", "windows", "tune"):
        value = getattr(args, name)
        if value != ap.get_default(name):
            words.append(" ".join([f"--{name.replace('_', '-')}", *map(shlex.quote, map(str, value if isinstance(value, list) else [value]))]))
    return " ".join(words)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", nargs="+", default=BUDGETS)
    ap.add_argument("--candidates", nargs="+", default=CANDIDATES)
    ap.add_argument("--uniform", nargs="*", default=list(UNIFORM))
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens")
    # objective kl: 2×512 carried over better than 4×128 or 8×128 tokens (benchmarks/RESULTS.md,
    # "Scored text" probe)
    ap.add_argument("--sens-windows", type=int, default=None, help="sensitivity windows (default: 64 for fisher, 2 for kl)")
    ap.add_argument("--sens-len", type=int, default=512, help="tokens per sensitivity window")
    # fisher on 64×512 tokens: at W4A16 g128's size its allocation carried over to the
    # perplexity text better than the KL measured on 2×512 (benchmarks/RESULTS.md)
    ap.add_argument("--objective", default="fisher", choices=["kl", "fisher"],
                    help="kl: measured per (weight, candidate); fisher: its second-order estimate")
    ap.add_argument("--kl-windows", type=int, default=None,
                    help="each plan's KL on this many sensitivity windows (default: all; 2 for fisher)")
    ap.add_argument("--method", default="gptq", choices=["rtn", "gptq"],
                    help="how every plan is compiled and every candidate measured")
    ap.add_argument("--tune", type=int, default=0, metavar="STEPS",
                    help="steps of end-to-end scale tuning for every plan (default 0: none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=HERE / "out", help="sensitivity JSON and finished rows")
    ap.add_argument("--fresh", action="store_true", help="measure everything again")
    ap.add_argument("--plot", type=Path, default=None, help="default: benchmarks/frontier-<method>.png")
    ap.add_argument("--no-write", action="store_true", help="print the tables only")
    args = ap.parse_args()
    args.plot = args.plot or HERE / f"frontier-{args.method}.png"
    if args.sens_windows is None:
        args.sens_windows = 64 if args.objective == "fisher" else 2
    if args.kl_windows is None:
        args.kl_windows = 2 if args.objective == "fisher" else args.sens_windows
    if not 0 < args.kl_windows <= args.sens_windows:
        ap.error(f"--kl-windows must be 1 to --sens-windows ({args.sens_windows}), got {args.kl_windows}")
    for budget in args.budgets:  # a uniform plan's name sizes the budget: that plan is measured first
        if budget in UNIFORM and budget not in args.uniform:
            ap.error(f"budget {budget!r} is the size of a uniform plan, which --uniform must then list "
                     f"(got --uniform {' '.join(args.uniform)})")

    import torch

    import mxc

    args.cache.mkdir(parents=True, exist_ok=True)
    # the objective kl's files keep their earlier names
    scored = f"{'' if args.objective == 'kl' else args.objective + '-'}heldout-{args.sens_windows}x{args.sens_len}"
    kl_text = "" if args.kl_windows == args.sens_windows else f"-kl{args.kl_windows}"
    tune_text = f"-tune{args.tune}" if args.tune else ""
    rows_path = args.cache / f"frontier-rows-{args.method}-{scored}{kl_text}-w{args.windows}{tune_text}.json"
    done: dict[str, dict] = {} if args.fresh or not rows_path.exists() else json.loads(rows_path.read_text())
    bench = Bench(args)
    measured = bench.sensitivity(args.cache / f"sensitivity-smollm2-{args.method}-{scored}.json")
    print(measured.describe(), flush=True)

    def keep(key: str, row: dict) -> None:
        done[key] = row
        rows_path.write_text(json.dumps(done, indent=1))
        print(json.dumps(row), flush=True)

    for name in args.uniform:
        if f"uniform {name}" not in done:
            keep(f"uniform {name}", bench.row(uniform_plan(name), "uniform", name))
    for budget in args.budgets:
        key = f"auto {budget}"
        if key in done:
            continue
        # a uniform plan's name: its model bytes, as the compiled model stores them
        value = f"{done[f'uniform {budget}']['bytes']}B" if budget in UNIFORM else float(budget)
        plan = mxc.Plan.auto(bench.model, value, measured=measured)
        keep(key, bench.row(plan, "auto", budget))

    rows = [done[f"uniform {n}"] for n in args.uniform] + [done[f"auto {b}"] for b in args.budgets]
    fp = bench.float_ppl
    plot(rows, fp, args.plot)
    when = datetime.date.today().isoformat()
    machine = f"{platform.machine()} CPU ({os.cpu_count()} cores), {args.threads} threads, torch {torch.__version__}"
    lines = [
        f"## Frontier: automatic bit allocation on SmolLM2-135M, {args.method}"
        f"{f', scales tuned {args.tune} steps' if args.tune else ''} ({when})",
        "",
        f"{machine}, reference backend. Command: `python benchmarks/frontier.py {command(args, ap)}`. "
        f"{measured.describe()}, held out from the calibration windows (candidates: {', '.join(args.candidates)}; "
        "\"+16\": the layer's 16 input channels of largest activation abs-max in int8; lm_head float). Every plan "
        "compiled with "
        + ("GPTQ + clipping search on 8×512 calibration tokens" if args.method == "gptq" else
           "round to nearest (no clipping search; the 8×512 calibration tokens only rank outlier channels)")
        + (f", then {args.tune} steps of end-to-end scale tuning (`mxc.passes.tune`) on 32×512 tokens from the end "
           "of the text (one more window held out)" if args.tune else "")
        + f"; perplexity over {args.windows}×512 tokens "
        f"(float: {fp:.3f}); KL against float on {args.kl_windows}×{args.sens_len} of the sensitivity tokens. "
        f"Plot: `benchmarks/{args.plot.name}`.",
        "",
        "| plan | avg bits | size MB | perplexity | vs float | KL measured | KL predicted | formats chosen | compile s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in sorted(rows, key=lambda r: (r["mb"], r["kind"])):
        mix = ", ".join(f"{n}× {f}" for f, n in r.get("mix", {}).items())
        pred = f"{r['predicted']:.4f}" if "predicted" in r else ""
        lines.append(f"| {r['kind']} {r['label']} | {r['bits']:.3f} | {r['mb']:.1f} | {r['ppl']:.3f} | "
                     f"{100 * (r['ppl'] / fp - 1):+.1f}% | {r['kl']:.4f} | {pred} | {mix} | {r['seconds']:.0f} |")
    auto = [r for r in rows if r["kind"] == "auto"]
    if len(auto) > 1:
        ratios = [r["kl"] / r["predicted"] for r in auto if r["predicted"] > 0]
        corr = mxc.sensitivity.spearman([r["predicted"] for r in auto], [r["kl"] for r in auto])
        lines += ["", f"Additivity: measured KL / predicted KL over the automatic plans: "
                      f"{min(ratios):.2f} to {max(ratios):.2f} (median {sorted(ratios)[len(ratios) // 2]:.2f}); "
                      f"Spearman correlation of predicted KL with measured KL {corr:.3f}, with perplexity "
                      f"{mxc.sensitivity.spearman([r['predicted'] for r in auto], [r['ppl'] for r in auto]):.3f}."]
    lines += ["", "Goals (issue 6):", "", *goals(rows, fp)]
    text = "\n".join(lines) + "\n"
    publish(text, write=not args.no_write)


if __name__ == "__main__":
    main()
