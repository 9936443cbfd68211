"""`mxc.export_onnx` on the real models: exported, checked by onnx.checker and run by onnx.reference.

    OMP_NUM_THREADS=1 python benchmarks/onnx_export.py [--seq-len 19] [--no-write]

SmolLM2-135M compiled with `w4a16-g128` and `w8a8` and all-MiniLM-L6-v2 with `w8a16` and
`w8a8` (round to nearest: no calibration data, so the plans' method is rtn), each:

1. exported with `mxc.export_onnx(compiled, path)`;
2. checked by path with `onnx.checker.check_model(path, full_check=True)` (by path, so a
   model saved with external data is checked as well);
3. run by `onnx.reference.ReferenceEvaluator` on fresh token ids of shape [1, --seq-len]
   and compared with the compiled model (reference backend) on the same ids: the largest
   |difference| relative to the largest |output|, per output;
4. set against what float32 rounding alone does to the reference backend: the same ids with
   the input of every norm and activation quantization moved by one ulp (each element up or
   down at random), the largest change of the first output relative to its largest |value|
   over three draws. With quantized
   activations an activation code can round to its neighbour, and a deep model carries that
   on (SmolLM2 w8a8: a few percent); the export is read against this figure.

Prints the file size, the initializers counted by element type, and the seconds each step
took; appends the block to benchmarks/RESULTS.md (not with `--no-write`).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import mxc  # noqa: E402
from mxc import models  # noqa: E402
from mxc.runtime.reference import ReferenceExecutor  # noqa: E402
from onnx_equivalence import Results  # noqa: E402  (benchmarks/ is this script's folder)


class Timer:
    """Seconds per named step, in the order they ran: `with timer("export"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, step: str) -> "Timer":
        self.step = step
        return self

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self.step] = time.perf_counter() - self.start

    def __str__(self) -> str:
        return ", ".join(f"{step} {s:.1f} s" for step, s in self.seconds.items())


def initializer_types(model: onnx.ModelProto) -> str:
    """The initializers counted by element type, most first: `UINT4: 210, FLOAT: 213, ...`."""
    counts = collections.Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer)
    return ", ".join(f"{name}: {n}" for name, n in counts.most_common())


#: The nodes whose float input `ulp_sensitivity` moves: where float32 rounding decides what
#: comes next (an activation code, a normalised row).
NUDGED = ("quantize", "rms_norm", "layer_norm")


def ulp_sensitivity(compiled: mxc.CompiledModel, ids: torch.Tensor, draws: int = 3) -> float:
    """The largest change of the reference backend's first output on `ids` when the float
    input of every `quantize`, `rms_norm` and `layer_norm` node is moved by one float32 ulp,
    each element up or down at random, relative to the output's largest |value|: the largest
    over `draws` draws. It is the size of difference float32 rounding alone causes."""
    executor = ReferenceExecutor(compiled.graph)
    inputs = compiled.call_spec.bind((ids,), {})
    base = executor(inputs)[0]
    gen = torch.Generator().manual_seed(1)

    def nudge(node, operands):  # an observer: may return the operands to run `node` with instead
        if node.op not in NUDGED:
            return None
        x = operands[0]
        away = torch.where(torch.rand(x.shape, generator=gen) < 0.5, -torch.inf, torch.inf)
        return [torch.nextafter(x, away), *operands[1:]]

    worst = 0.0
    for _ in range(draws):
        nudged = executor(inputs, observer=nudge)[0]
        worst = max(worst, ((nudged - base).abs().max() / base.abs().max()).item())
    return worst


def check_export(label: str, model: torch.nn.Module, plan: str, ids: torch.Tensor, folder: Path) -> str:
    """Compile `model` with `plan`, export, check and run it by onnx.reference on `ids`; one line."""
    timer = Timer()
    with timer("compile"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no calibration data": round to nearest is what is exported
        compiled = mxc.compile(model, plan)
    path = folder / f"{label}-{plan}.onnx"
    with timer("export"):
        mxc.export_onnx(compiled, path)
    with timer("check_model(full_check=True)"):
        onnx.checker.check_model(str(path), full_check=True)
    size = sum(p.stat().st_size for p in folder.glob(f"{path.name}*"))  # the .onnx file and any .data beside it
    exported = onnx.load(str(path))
    with timer("ReferenceEvaluator init"):
        evaluator = ReferenceEvaluator(exported)
    with timer(f"ReferenceEvaluator run {list(ids.shape)}"):
        got = evaluator.run(None, {"input_ids": ids.numpy()})
    with timer(f"compiled model run {list(ids.shape)}"):
        want = compiled(ids)
    nudged = ulp_sensitivity(compiled, ids)
    errors = []
    for out, value in zip(exported.graph.output, got):
        ref = getattr(want, out.name).numpy()
        errors.append(f"{out.name} {np.abs(value - ref).max() / np.abs(ref).max():.2e}")
    opset = exported.opset_import[0].version
    return (f"{label} {plan} (method {compiled.plan.method}): max |diff| / max |output| {', '.join(errors)} "
            f"(the reference backend against itself with the inputs of its norms and activation quantizations "
            f"moved by one ulp: {nudged:.2e}, the largest of 3 draws); "
            f"opset {opset}, {size / 1e6:.1f} MB, {len(exported.graph.node)} nodes; initializers "
            f"{initializer_types(exported)}; {timer}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plans", nargs="+", default=["w4a16-g128", "w8a8"], help="SmolLM2 plans")
    ap.add_argument("--encoder-plans", nargs="+", default=["w8a16", "w8a8"], help="all-MiniLM-L6-v2 plans")
    ap.add_argument("--seq-len", type=int, default=19, help="token ids [1, seq-len] for both runs")
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    results = Results("mxc.export_onnx on the real models: onnx.checker and onnx.reference against the reference "
                      "backend")

    with tempfile.TemporaryDirectory() as tmp:
        llm, _ = models.load_smollm2()
        ids = torch.randint(0, llm.config.vocab_size, (1, args.seq_len), generator=gen)
        for plan in args.plans:
            results.say(check_export("SmolLM2-135M", llm, plan, ids, Path(tmp)))
        del llm
        enc, _ = models.load_minilm()
        ids = torch.randint(0, enc.config.vocab_size, (1, args.seq_len), generator=gen)
        for plan in args.encoder_plans:
            results.say(check_export("all-MiniLM-L6-v2", enc, plan, ids, Path(tmp)))

    command = (f"python benchmarks/onnx_export.py --plans {' '.join(args.plans)} "
               f"--encoder-plans {' '.join(args.encoder_plans)} --seq-len {args.seq_len}")
    results.finish(command, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
