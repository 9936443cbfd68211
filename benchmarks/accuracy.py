"""Accuracy of quantization plans on the real SmolLM2-135M: perplexity on real text.

    python benchmarks/accuracy.py [--plans w8a8 w4a16-g128:rtn ...] [--calibration 8] [--windows 8]

Each plan is a preset name with optional modifiers after colons: `rtn` (round to nearest,
no clipping search, no calibration data), `nosmooth` (no smoothing), `alpha=0.65`
(smoothing strength), `outliers=32` (or a fraction, `outliers=0.05`: that many input channels of
every quantized linear reordered last and kept at `int8` — the reorder pass — or at f32 with
`outliers=32:outfmt=float`). Every plan runs in its own process, so that its compile time and
peak RSS are its own (the process loads the model, compiles, measures perplexity over
`--windows` windows of 512 tokens of `pydoc_data.topics`; calibration windows come from the
other end of the text). The table (plan, method, average bits, size, perplexity, change
against float, compile seconds, peak RSS) and the goals of issue 3, met or not, are
appended to benchmarks/RESULTS.md with the date and machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

from _results import publish  # benchmarks/, the script's own folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_PLANS = [
    "float", "w8a8:rtn:nosmooth", "w8a8:nosmooth", "w8a8", "w8a8-static",
    "w4a16-g128:rtn", "w4a16-g128", "w4a16-g32:rtn", "w4a16-g32", "w3a16-g128:rtn", "w3a16-g128",
    "w4a8", "w4a4-kv4", "nvfp4", "mxfp4", "fp8", "fp8-kv8",
]
#: Issue 3's goals: plan -> largest perplexity change against float (percent).
GOALS = {"w8a8": 1.0, "w4a16-g128": 15.0, "w4a16-g32": 8.0, "w3a16-g128": 100.0}
GPTQ_SECONDS = 60.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_plan(spec: str):
    import mxc

    name, *mods = spec.split(":")
    plan = mxc.Plan.preset(name)
    for m in mods:
        if m == "rtn":
            plan = dataclasses.replace(plan, method="rtn", clip_search=False)
        elif m == "nosmooth":
            plan = dataclasses.replace(plan, smooth=None)
        elif m.startswith("alpha="):
            plan = dataclasses.replace(plan, smooth=float(m.split("=", 1)[1]))
        elif m.startswith(("outliers=", "outfmt=")):
            key, value = m.split("=", 1)
            if key == "outliers":
                option = ("outliers", float(value) if "." in value else int(value))
            else:
                option = ("outlier_format", value)
            plan = dataclasses.replace(plan, rules=tuple(_with_option(r, *option) for r in plan.rules),
                                       default=_with_option(plan.default, *option))
        else:
            raise SystemExit(
                f"unknown plan modifier {m!r} in {spec!r}; expected rtn, nosmooth, alpha=A, outliers=K or outfmt=F"
            )
    return plan, "rtn" in mods


def _with_option(rule, key: str, value):
    """`rule` with `options[key] = value` when it quantizes a linear (float rules stay as they are)."""
    if rule.op != "linear" or (rule.weight is None and rule.act is None):
        return rule
    return dataclasses.replace(rule, options={**rule.options, key: value})


def run_one(spec: str, calibration: int, windows: int) -> dict:
    """Compile and measure one plan in this process; the row as a dict."""
    import torch  # noqa: F401

    import mxc
    from mxc.calibrate import text_batches

    model, tok = mxc.models.load_smollm2()
    loaded_rss = peak_rss_mb()
    t = time.perf_counter()
    if spec == "float":
        compiled, method = mxc.compile(model), "-"
    else:
        plan, rtn = make_plan(spec)
        calib = None if rtn else text_batches(tok, n=calibration, seq_len=512)
        compiled = mxc.compile(model, plan, calibration=calib)
        p = compiled.plan
        method = p.method + ("+clip" if p.clip_search else "") + (f"+smooth {p.smooth}" if p.smooth is not None and not rtn else "")
    seconds = time.perf_counter() - t
    compile_rss = peak_rss_mb()
    report = compiled.report()
    ppl = mxc.eval.perplexity(compiled, tok, windows=windows)
    return {
        "plan": spec, "method": method, "bits": report.avg_bits or 32.0, "mb": report.weight_bytes / 1e6,
        "ppl": ppl, "seconds": seconds, "loaded_rss": loaded_rss, "compile_rss": compile_rss,
        "timings": {k: round(v, 2) for k, v in compiled.timings.items()},
    }


def goals(rows: list[dict]) -> list[str]:
    by = {r["plan"]: r for r in rows}
    out = []
    for name, limit in GOALS.items():
        if name in by:
            d = by[name]["delta"]
            out.append(f"- {name} within +{limit:g}%: {d:+.1f}% — {'met' if d <= limit else 'NOT met'}")
    for name in GOALS:
        rtn = by.get(f"{name}:rtn") or by.get(f"{name}:rtn:nosmooth")
        if name in by and rtn:
            better = by[name]["ppl"] < rtn["ppl"]
            out.append(f"- {name}: {by[name]['method']} better than round-to-nearest: "
                       f"{by[name]['ppl']:.3f} vs {rtn['ppl']:.3f} — {'met' if better else 'NOT met'}")
    slow = [(r["plan"], r["seconds"]) for r in rows if r["method"].startswith("gptq")]
    if slow:
        worst = max(slow, key=lambda x: x[1])
        out.append(f"- GPTQ compile within {GPTQ_SECONDS:g} s: slowest {worst[0]} {worst[1]:.1f} s — "
                   f"{'met' if worst[1] <= GPTQ_SECONDS else 'NOT met'}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", nargs="*", default=DEFAULT_PLANS)
    ap.add_argument("--calibration", type=int, default=8, help="calibration windows of 512 tokens")
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one plan here, print its row as JSON
    args = ap.parse_args()
    if args.one:
        print("ROW " + json.dumps(run_one(args.one, args.calibration, args.windows)), flush=True)
        return

    plans = args.plans if "float" in args.plans else ["float", *args.plans]
    rows, failed = [], []
    for spec in plans:
        cmd = [sys.executable, __file__, "--one", spec, "--calibration", str(args.calibration), "--windows", str(args.windows)]
        got = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in got.stdout.splitlines() if l.startswith("ROW ")), None)
        if got.returncode != 0 or line is None:
            print(f"plan {spec} FAILED:\n{got.stderr[-3000:]}", file=sys.stderr, flush=True)
            failed.append(spec)
            continue
        rows.append(json.loads(line[4:]))
        print(rows[-1], flush=True)
    base = rows[0]["ppl"]
    for r in rows:
        r["delta"] = 100 * (r["ppl"] / base - 1)

    import torch

    table = [
        f"## Accuracy: SmolLM2-135M, perplexity over {args.windows}x512 tokens of pydoc_data.topics",
        "",
        f"{datetime.date.today()}, {platform.machine()} CPU ({os.cpu_count()} cores), torch {torch.__version__}, "
        f"reference backend, calibration {args.calibration}x512 tokens from the other end of the text. "
        "Command: `python benchmarks/accuracy.py`. Each plan ran in its own process. Average bits over the "
        "quantized linears, scales included (lm_head and embeddings stay f32); size counts every weight "
        "(packed bits + scales). Compile seconds include capture, calibration and smoothing. Peak RSS: the "
        "process's maximum after loading the model (fp32, from GGUF) and after compiling.",
        "",
        "| plan | method | avg bits | size MB | perplexity | vs float | compile s | RSS loaded MB | RSS compiled MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        table.append(
            f"| {r['plan']} | {r['method']} | {r['bits']:.3f} | {r['mb']:.1f} | {r['ppl']:.3f} | {r['delta']:+.1f}% | "
            f"{r['seconds']:.1f} | {r['loaded_rss']:.0f} | {r['compile_rss']:.0f} |"
        )
    table += ["", "Goals (issue 3):", "", *goals(rows)]
    if failed:
        table += ["", f"Failed to run (see stderr): {', '.join(failed)}"]
    text = "\n".join(table) + "\n"
    publish(text, write=not args.no_write)


if __name__ == "__main__":
    main()
