"""The ONNX route against eager torch and the torch route on the real models.

    OMP_NUM_THREADS=1 python benchmarks/onnx_equivalence.py [--windows 4] [--seq-len 256] [--no-write]

SmolLM2-135M and all-MiniLM-L6-v2 are exported with `torch.onnx.export(dynamo=True)`
(batch and sequence dims dynamic) and compiled from the .onnx file:

- with no plan, against eager torch (largest error relative to the largest output), at a
  shape other than the exported one;
- SmolLM2 with a round-to-nearest plan (`--plan`, no calibration on either route) and with a
  calibrated plan (`--calibrated-plan`: GPTQ and the clipping search, the same calibration
  windows on both routes), from ONNX and from torch: the perplexity of both on the same
  windows (`mxc.eval.perplexity`), which the issue asks to agree to 3 significant digits;
- MiniLM with `--plan` from both routes: the same layers in the same formats, and the
  largest difference between the two routes' outputs.

Appends the figures to benchmarks/RESULTS.md with the date, machine and command (not with
`--no-write`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import mxc  # noqa: E402
from mxc import models  # noqa: E402
from mxc.calibrate import text_batches  # noqa: E402
from mxc.eval import perplexity  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def export(model, inputs: dict, path: Path, outputs: list[str]) -> Path:
    """`model` (called with `inputs` by name) exported by the dynamo exporter with outputs
    named `outputs`, dims 0 and 1 of every tensor input dynamic."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    dims = {k: ({0: batch, 1: seq} if isinstance(v, torch.Tensor) else None) for k, v in inputs.items()}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), kwargs=inputs, dynamo=True, dynamic_shapes=dims,
                          output_names=outputs, verbose=False).save(str(path))
    return path


def max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def same_layers(a, b) -> str:
    """Whether two compiled models quantize the same layers to the same formats."""
    la, lb = a.report().layers, b.report().layers
    fa, fb = {k: str(v["format"]) for k, v in la.items()}, {k: str(v["format"]) for k, v in lb.items()}
    return f"the same {len(la)} layers in the same formats" if fa == fb else f"DIFFERENT layers/formats: {fa} vs {fb}"


def compare_perplexity(label: str, plan: str, path: Path, llm, tok, args, calibration=None) -> str:
    """`plan` compiled from ONNX and from torch (with `calibration` on both), perplexity of each."""
    ppl, seconds, compiled = {}, {}, {}
    with warnings.catch_warnings():  # round to nearest without calibration: the driver says so
        warnings.simplefilter("ignore")
        for route, model in (("ONNX", path), ("torch", llm)):
            t = time.perf_counter()
            compiled[route] = mxc.compile(model, plan, calibration=calibration)
            seconds[route] = time.perf_counter() - t
            ppl[route] = perplexity(compiled[route], tok, seq_len=args.seq_len, windows=args.windows)
    layers = same_layers(compiled["ONNX"], compiled["torch"])
    agree = f"{ppl['ONNX']:.3g}" == f"{ppl['torch']:.3g}"
    return (f"SmolLM2-135M {plan} ({label}, method {compiled['ONNX'].plan.method}): perplexity ONNX route "
            f"{ppl['ONNX']:.4f}, torch route {ppl['torch']:.4f} over {args.windows}x{args.seq_len} tokens "
            f"(relative difference {abs(ppl['ONNX'] - ppl['torch']) / ppl['torch']:.1e}; "
            f"{'equal' if agree else 'NOT equal'} to 3 significant digits); {layers}; compile "
            f"{seconds['ONNX']:.0f} s from ONNX, {seconds['torch']:.0f} s from torch")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", default="w8a16", help="round-to-nearest plan (no calibration)")
    ap.add_argument("--calibrated-plan", default="w4a16-g128", help="plan compiled with GPTQ calibration")
    ap.add_argument("--calibration", type=int, default=4, help="calibration windows (of --seq-len tokens)")
    ap.add_argument("--windows", type=int, default=4, help="perplexity windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = Results("ONNX frontend: equivalence with eager torch and the torch route")
    say = results.say

    with tempfile.TemporaryDirectory() as tmp:
        llm, tok = models.load_smollm2()
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, llm.config.vocab_size, (2, 16), generator=gen)
        t = time.perf_counter()
        path = export(llm, {"input_ids": ids, "use_cache": False}, Path(tmp) / "smollm2.onnx", ["logits"])
        t_export = time.perf_counter() - t
        t = time.perf_counter()
        float_onnx = mxc.compile(path)
        t_import = time.perf_counter() - t
        x = torch.randint(0, llm.config.vocab_size, (1, 37), generator=gen)  # not the exported shape
        with torch.no_grad():
            err = max_rel(float_onnx(x).logits, llm(input_ids=x).logits)
        say(f"SmolLM2-135M float: ONNX route vs eager torch, max relative error {err:.2e} at [1, 37] "
            f"(export {t_export:.0f} s, compile from ONNX {t_import:.0f} s; fallbacks "
            f"{float_onnx.report().fallbacks})")
        del float_onnx
        say(compare_perplexity("round to nearest, no calibration", args.plan, path, llm, tok, args))
        calibration = text_batches(tok, n=args.calibration, seq_len=args.seq_len)
        say(compare_perplexity(f"GPTQ, the same {args.calibration}x{args.seq_len} calibration tokens on both routes",
                               args.calibrated_plan, path, llm, tok, args, calibration))
        del llm

        enc, etok = models.load_minilm()
        batch = etok(["mxc compiles ONNX files.", "The same IR as the torch route, with fallbacks listed."],
                     padding=True, return_tensors="pt")
        inputs = dict(batch)
        outputs = ["last_hidden_state", "pooler_output"]
        path = export(enc, inputs, Path(tmp) / "minilm.onnx", outputs)
        c = mxc.compile(path)
        probe = etok(["A third sentence, longer than both of the sentences it was exported with.", "Short."],
                     padding=True, return_tensors="pt")  # another shape, with padding
        with torch.no_grad():
            want = enc(**probe)
        got = c(**probe)
        errs = ", ".join(f"{k} {max_rel(got[k], getattr(want, k)):.2e}" for k in outputs)
        say(f"all-MiniLM-L6-v2 float: ONNX route vs eager torch, max relative error {errs} at "
            f"{list(probe['input_ids'].shape)} (sizes {', '.join(map(str, c.graph.dims))}; fallbacks "
            f"{c.report().fallbacks})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q_onnx = mxc.compile(path, args.plan)
            q_torch = mxc.compile(enc, args.plan, example_inputs=inputs)
        diff = max_rel(q_onnx(**probe).last_hidden_state, q_torch(**probe).last_hidden_state)
        say(f"all-MiniLM-L6-v2 {args.plan}: ONNX route vs torch route, {same_layers(q_onnx, q_torch)}; "
            f"max relative difference of last_hidden_state {diff:.2e}")

    command = (f"python benchmarks/onnx_equivalence.py --plan {args.plan} --calibrated-plan {args.calibrated_plan} "
               f"--calibration {args.calibration} --windows {args.windows} --seq-len {args.seq_len}")
    results.finish(command, write=not args.no_write)
    return 0


class Results:
    """One RESULTS.md block: lines printed as they come (`say`), then `finish` prints the
    block (`## title`, the date, machine and command with the OMP_NUM_THREADS it ran under,
    the lines as a list) and appends it to RESULTS.md when `write`."""

    def __init__(self, title: str):
        self.title = title
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def finish(self, command: str, write: bool) -> str:
        threads = os.environ.get("OMP_NUM_THREADS", "unset")
        text = "\n".join([
            f"## {self.title}",
            "",
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()} CPU "
            f"({os.cpu_count()} cores), torch {torch.__version__}, reference backend. Command: "
            f"`OMP_NUM_THREADS={threads} {command}`.",
            "",
            *[f"- {line}" for line in self.lines],
        ]) + "\n"
        print()
        print(text)
        if write:
            with RESULTS.open("a") as f:
                f.write("\n" + text)
        return text


if __name__ == "__main__":
    sys.exit(main())
