"""Accuracy of quantization plans on the real SmolLM2-135M: perplexity on real text.

    python benchmarks/accuracy.py [--plans w8a8 w4a16-g128 ...] [--calibration 8] [--windows 8]

For each plan (a preset name, optionally with `:rtn` to force round-to-nearest) it compiles
the model with the reference backend, measures perplexity over `--windows` windows of 512
tokens of `pydoc_data.topics` (calibration windows come from the other end of the text),
and appends a table (plan, method, average bits, size, perplexity, change against float,
compile seconds, peak RSS) with the date and machine to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import resource
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import mxc  # noqa: E402
from mxc.calibrate import text_batches  # noqa: E402

DEFAULT_PLANS = [
    "w8a8:rtn", "w8a8", "w4a16-g128:rtn", "w4a16-g128", "w4a16-g32:rtn", "w4a16-g32",
    "w3a16-g128:rtn", "w3a16-g128", "nvfp4", "mxfp4", "fp8",  # the list RESULTS.md was made with
]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", nargs="*", default=DEFAULT_PLANS)
    ap.add_argument("--calibration", type=int, default=8, help="calibration windows of 512 tokens")
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()

    model, tok = mxc.models.load_smollm2()
    calib = text_batches(tok, n=args.calibration, seq_len=512)
    t = time.perf_counter()
    base = mxc.compile(model)
    seconds = time.perf_counter() - t
    float_ppl = mxc.eval.perplexity(base, tok, windows=args.windows)
    float_mb = base.report().weight_bytes / 1e6
    rows = [("float (f32)", "-", 32.0, float_mb, float_ppl, 0.0, seconds, peak_rss_mb())]
    print(rows[-1], flush=True)
    del base
    for name in args.plans:
        preset, _, method = name.partition(":")
        plan = mxc.Plan.preset(preset)
        if method:
            plan = dataclasses.replace(plan, method=method, clip_search=False)
        t = time.perf_counter()
        compiled = mxc.compile(model, plan, calibration=None if method == "rtn" else calib)
        seconds = time.perf_counter() - t
        report = compiled.report()
        ppl = mxc.eval.perplexity(compiled, tok, windows=args.windows)
        used = compiled.plan.method + ("+clip" if compiled.plan.clip_search else "")
        rows.append((name, used, report.avg_bits, report.weight_bytes / 1e6, ppl, 100 * (ppl / float_ppl - 1), seconds, peak_rss_mb()))
        print(rows[-1], flush=True)
        del compiled

    table = [
        f"## Accuracy: SmolLM2-135M, perplexity over {args.windows}x512 tokens of pydoc_data.topics",
        "",
        f"{datetime.date.today()}, {platform.machine()} CPU ({os.cpu_count()} cores), torch {torch.__version__}, "
        f"reference backend, calibration {args.calibration}x512 tokens from the other end of the text. "
        "Command: `python benchmarks/accuracy.py`. Averages bits over the quantized linears (lm_head and "
        "embeddings stay f32); size counts every weight (packed bits + scales). Peak RSS is the process's "
        "maximum so far. Compile seconds include capture and calibration.",
        "",
        "| plan | method | avg bits | size MB | perplexity | vs float | compile s | peak RSS MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for plan, method, bits, mb, ppl, delta, secs, rss in rows:
        table.append(f"| {plan} | {method} | {bits:.3f} | {mb:.1f} | {ppl:.3f} | {delta:+.1f}% | {secs:.1f} | {rss:.0f} |")
    text = "\n".join(table) + "\n"
    print(text)
    if not args.no_write:
        with RESULTS.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
