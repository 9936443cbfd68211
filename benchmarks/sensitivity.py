"""Cost of measuring sensitivity on the real SmolLM2-135M: every linear's weight, 4 candidate
formats, KL of the logits on real calibration text (issue 6's goal: at most 10 minutes on 2
CPU cores).

    python benchmarks/sensitivity.py [--sequences 2] [--seq-len 128] [--threads 2] [--objective kl]
    python benchmarks/sensitivity.py --objective fisher --sequences 64 --seq-len 512

Calibration windows come from the end of `mxc.eval.default_text()` (as `mxc.compile` cuts
them). Prints the wall time of `mxc.sensitivity.measure` (capture included, model loading
not), the tokens it saw, the most and least sensitive tensors per format, and one line to
paste into benchmarks/RESULTS.md. Weights are rounded to nearest per candidate.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CANDIDATES = ["int3<asym,g128>", "int4<asym,g128>", "int5<asym,g128>", "int8<sym,channel>"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=2, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--objective", default="kl", choices=["kl", "ce", "proxy", "fisher"])
    ap.add_argument("--candidates", nargs="+", default=CANDIDATES)
    args = ap.parse_args()

    import torch

    import mxc
    from mxc import sensitivity
    from mxc.calibrate import text_batches

    torch.set_num_threads(args.threads)
    model, tokenizer = mxc.models.load_smollm2()
    batches = text_batches(tokenizer, n=args.sequences, seq_len=args.seq_len)
    start = time.perf_counter()
    result = sensitivity.measure(model, args.candidates, batches, objective=args.objective)
    seconds = time.perf_counter() - start

    print(result.describe())
    for i, fmt in enumerate(args.candidates):
        ranked = sorted(result.items(), key=lambda kv: kv[1][i].error)
        lo, hi = ranked[0], ranked[-1]
        print(f"  {fmt:>18}: least {lo[0]} {lo[1][i].error:.2e}, most {hi[0]} {hi[1][i].error:.2e}, "
              f"sum {sum(row[i].error for row in result.values()):.3e} nats/token")
    runs = sum(1 for row in result.values() for c in row if c.fmt is not None)
    when = datetime.date.today().isoformat()
    machine = f"{platform.machine()}, {args.threads} threads of {os.cpu_count()} CPUs, torch {torch.__version__}"
    print(f"| {when} | sensitivity ({args.objective}) SmolLM2-135M | {len(result)} tensors × {len(args.candidates)} "
          f"formats ({runs} {'estimates' if args.objective == 'fisher' else 'runs'}) | {args.sequences}×{args.seq_len} tokens | {seconds:.0f} s | {machine} |")


if __name__ == "__main__":
    main()
