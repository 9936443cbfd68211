"""The `mxc` command line: compile a model to an artifact, inspect it, run it, time it.

    mxc compile MODEL --plan w4a16-g128 -o out/   # MODEL: a Hugging Face directory, a .gguf or an .onnx file
    mxc inspect out/                              # layers, formats, bits, bytes, kernels, fallbacks
    mxc run out/ --prompt "def fib(n):" --max-new-tokens 32
    mxc bench out/ --batch 1 --seq 128 --iters 20

Also `python -m mxc.cli ...`. A user's mistake (a missing directory, something that is not an
artifact, an unknown preset, an input the model cannot take) prints one line, `mxc: error:
...`, on stderr with no traceback: exit status 2 for bad arguments (as argparse's own usage
errors), 1 for a bad artifact or input, or a pass that fails (its message names the pass, the
layer and the cause). Anything else is a bug and keeps its traceback.
Progress goes to stderr; bars show on a terminal only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from .calibrate import text_batches
from .compiled import CompiledModel
from .driver import compile as mxc_compile
from .frontends.onnx import OnnxImportError, load_onnx
from .ir import DType, Graph
from .passes import PassError
from .plan import PRESETS, Plan
from .runtime import BACKENDS, ArtifactError, ArtifactInfo, InputError, load, save
from .runtime.artifact import MANIFEST, TOKENIZER, check_destination
from .signature import CallError

#: Files whose presence in a model directory means it has a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command `argv` (default: `sys.argv[1:]`) and return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as e:
        print(f"mxc: error: {e}", file=sys.stderr)
        return 2
    except (ArtifactError, InputError, CallError, PassError) as e:  # a pass names the layer and the cause
        print(f"mxc: error: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per command."""
    parser = argparse.ArgumentParser(prog="mxc", description="Compile language models to mixed-precision code.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="compile a model and save it as an artifact directory",
                       description="Compile MODEL with a plan and save the artifact to DIR; prints the report.")
    p.add_argument("model", metavar="MODEL",
                   help="a Hugging Face model directory (config.json + safetensors), a .gguf or an .onnx file")
    p.add_argument("--plan", metavar="PRESET|FILE",
                   help=f"a preset ({', '.join(PRESETS)}) or a plan .json file; default: no plan (float)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="the artifact directory to write")
    p.add_argument("--calibration", type=int, metavar="N",
                   help="windows of real text to calibrate on, cut with the model's tokenizer "
                        "(default: 8 when the model has a tokenizer, else 0; 0: no calibration)")
    p.add_argument("--calibration-seq-len", type=int, default=512, metavar="L",
                   help="tokens per calibration window (default: 512)")
    p.add_argument("--tune", type=int, metavar="STEPS",
                   help="steps of end-to-end scale tuning after quantization, on the calibration windows (the "
                        "first held out to check it); sets the plan's tune (default: the plan's, 0 for presets)")
    p.add_argument("--backend", default="reference", choices=[*sorted(BACKENDS), "auto"],
                   help="the backend (default: reference; auto: triton with a CUDA GPU, else reference)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing artifact at DIR")
    p.set_defaults(run=cmd_compile)

    p = sub.add_parser("inspect", help="show an artifact's layers, formats, bytes, kernels and versions",
                       description="Check the artifact in DIR and print its report, kernels and versions.")
    p.add_argument("dir", metavar="DIR", help="an artifact directory")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser(
        "run", help="greedy generation from a causal LM artifact (no KV cache: recomputes the prefix each step)",
        description="Greedy generation from the causal LM in DIR with the tokenizer stored in it. There is no KV "
                    "cache yet: every step runs the whole sequence again (the prefix is recomputed each step).",
    )
    p.add_argument("dir", metavar="DIR", help="an artifact directory with a tokenizer/ folder")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default: 32)")
    _add_target_args(p)
    p.set_defaults(run=cmd_run)

    p = sub.add_parser("bench", help="time an artifact's forward pass",
                       description="Time the forward pass of the model in DIR on random inputs: median of "
                                   "ITERS runs after WARMUP, in ms and tokens/s.")
    p.add_argument("dir", metavar="DIR", help="an artifact directory")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="batch size (default: 1)")
    p.add_argument("--seq", type=int, default=128, metavar="S", help="sequence length (default: 128)")
    p.add_argument("--iters", type=int, default=10, metavar="N", help="timed runs (default: 10)")
    p.add_argument("--warmup", type=int, default=2, metavar="W", help="untimed runs first (default: 2)")
    _add_target_args(p)
    p.set_defaults(run=cmd_bench)
    return parser


def _add_target_args(p: argparse.ArgumentParser) -> None:
    """--backend and --device, for the commands that run a loaded model."""
    p.add_argument("--backend", choices=sorted(BACKENDS), help="the backend (default: the saved one)")
    p.add_argument("--device", help="the device to run on, e.g. cpu or cuda (default: cpu)")


# ------------------------------------------------------------------------------------ compile
def cmd_compile(args: argparse.Namespace) -> int:
    """Load MODEL, compile it with the plan (calibrated on text cut with its tokenizer),
    save the artifact with the tokenizer, print the report. Arguments, the plan and the
    destination are checked before the model is loaded."""
    plan = parse_plan(args.plan)
    if args.tune is not None:
        if plan is None or args.tune < 0:
            raise UsageError(f"--tune {args.tune}: expected a count of steps >= 0 and a --plan whose scales it tunes")
        plan = dataclasses.replace(plan, tune=args.tune)
    out = Path(args.output)
    check_destination(out, args.overwrite)
    source = check_model_path(args.model)
    n = args.calibration if args.calibration is not None else (8 if has_tokenizer(source) else 0)
    if n < 0 or args.calibration_seq_len < 1:
        raise UsageError(f"--calibration {n} --calibration-seq-len {args.calibration_seq_len}: expected N >= 0, L >= 1")
    calibrated = plan is not None and n > 0
    if calibrated and not has_tokenizer(source):
        raise UsageError(f"--calibration {n}: {source} has no tokenizer to cut calibration text with; "
                         "pass --calibration 0 to compile without calibration")
    if plan is not None:
        try:
            plan.resolved(calibrated=calibrated)  # e.g. GPTQ without calibration data
        except ValueError as e:
            raise UsageError(f"--plan {args.plan}: {e}") from None
    model, tokenizer = load_model(source)
    batches = None
    if calibrated:
        try:
            batches = text_batches(tokenizer, n=n, seq_len=args.calibration_seq_len)
        except ValueError as e:
            raise UsageError(f"--calibration {n} --calibration-seq-len {args.calibration_seq_len}: {e}") from None
    what = "float" if plan is None else f"plan {plan.name or args.plan}"
    cal = f", calibrated on {n} windows of {args.calibration_seq_len} tokens" if batches else ""
    _progress(f"compiling ({what}{cal}, backend {args.backend})")
    try:
        compiled = mxc_compile(model, plan, backend=args.backend, calibration=batches)
    except OnnxImportError as e:  # a malformed .onnx file or one with ops/opsets mxc does not know
        raise UsageError(str(e)) from None
    save(compiled, out, tokenizer=tokenizer, overwrite=args.overwrite)
    print(compiled.report())
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"saved {out} ({size / 2**20:.2f} MiB{', with tokenizer' if tokenizer is not None else ''})")
    return 0


def parse_plan(text: str | None) -> Plan | None:
    """The plan a `--plan` value names: a preset, a JSON file, or None for a float compile."""
    if text is None:
        return None
    if text in PRESETS:
        return PRESETS[text]
    if text.endswith(".json") or Path(text).is_file():
        if not Path(text).is_file():
            raise UsageError(f"--plan {text}: no such plan file")
        try:
            return Plan.from_json(Path(text))
        except ValueError as e:
            raise UsageError(f"--plan {text}: {e}") from None
    raise UsageError(f"--plan {text}: unknown preset; expected one of {', '.join(PRESETS)}, or a plan .json file")


def check_model_path(path: str | Path) -> Path:
    """`path` if it is a Hugging Face model directory (config.json), a .gguf or an .onnx file,
    else a UsageError that says what is accepted."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file or directory")
    if p.is_file() and p.suffix == ".onnx":
        try:  # refuse a corrupt or unsupported file before anything else runs
            load_onnx(p)
        except OnnxImportError as e:
            raise UsageError(str(e)) from None
        return p
    if not (p.is_file() and p.suffix == ".gguf") and not (p / "config.json").is_file():
        raise UsageError(f"{p}: expected a Hugging Face model directory (with config.json), a .gguf or an .onnx file")
    return p


def has_tokenizer(model_path: Path) -> bool:
    """Whether the model at `model_path` comes with a tokenizer (a .gguf file always does, an
    .onnx file never)."""
    if model_path.suffix == ".onnx":
        return False
    return model_path.is_file() or any((model_path / f).is_file() for f in TOKENIZER_FILES)


def load_model(path: str | Path) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer or None) from a Hugging Face model directory or a .gguf file, fp32,
    in eval mode. A directory whose config names a `...ForCausalLM` architecture loads as a
    causal LM, any other as `AutoModel`."""
    p = check_model_path(path)
    if p.suffix == ".onnx":  # imported by mxc.compile itself (the ONNX frontend)
        return str(p), None
    try:
        import transformers
    except ImportError:
        raise UsageError("loading models needs transformers: pip install 'mxc[hf]'") from None
    _progress(f"loading {p}")
    if p.is_file():  # .gguf
        model = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
        return model.eval(), tokenizer
    config = transformers.AutoConfig.from_pretrained(p)
    causal = any(a.endswith("ForCausalLM") for a in (getattr(config, "architectures", None) or []))
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    model = auto.from_pretrained(p, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(p) if has_tokenizer(p) else None
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------------ inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    """Print the artifact's versions and target, its report (layers, formats, bits, bytes,
    torch fallbacks) and the kernel files it stores."""
    model = _load(args.dir)
    root = Path(args.dir)
    info = ArtifactInfo(root, json.loads((root / MANIFEST).read_text(encoding="utf-8")))  # checked by _load
    manifest, files = info.manifest, info.manifest["files"]
    v, t = manifest["versions"], manifest["target"]
    print(f"artifact {root}: graph @{manifest['graph']}, format {manifest['format_version']}, created {manifest['created']}")
    print(f"  written by mxc {v['mxc']}, torch {v['torch']}, triton {v.get('triton') or 'none'}")
    arch = f", {t['gpu_arch']}" if t.get("gpu_arch") else ""
    print(f"  target: backend {t['backend']} on {t['device']}{arch}; loaded on backend {model.backend}")
    print(f"  {len(files)} files, {sum(e['bytes'] for e in files.values()) / 2**20:.2f} MiB; "
          f"tokenizer: {'yes' if info.has_tokenizer else 'no'}")
    print(model.report())
    if info.kernel_files:
        print(f"  kernels: {len(info.kernel_files)}")
        for f in info.kernel_files:
            print(f"    {f:<60} {files[f]['bytes'] / 1024:>9.1f} KiB")
    else:
        print(f"  kernels: none stored (backend {t['backend']} runs PyTorch ops)")
    return 0


# ------------------------------------------------------------------------------------ run
def cmd_run(args: argparse.Namespace) -> int:
    """Greedy generation: each step runs the whole sequence (no KV cache) and appends the
    argmax of the last position's logits; stops at the tokenizer's end-of-sequence token."""
    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: expected a count >= 0")
    model = _load(args.dir, args.device, args.backend)
    tokenizer = load_tokenizer(args.dir)
    if "input_ids" not in model.call_spec.inputs:
        raise UsageError(f"{args.dir}: the model takes no input_ids, so it cannot generate text")
    fields = getattr(model.call_spec.out_spec, "context", None)  # a ModelOutput's field names
    if not isinstance(fields, list) or "logits" not in fields:
        raise UsageError(f"{args.dir}: the model's outputs have no logits; mxc run needs a causal LM")
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(model_device(model))
    if ids.shape[1] == 0:
        raise UsageError("--prompt: the prompt encodes to no tokens")
    for _ in tqdm(range(args.max_new_tokens), desc="generating", unit="token", disable=None, leave=False):
        next_id = model(**_text_inputs(model, ids)).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id.to(ids.dtype)], dim=1)
        if tokenizer.eos_token_id is not None and int(next_id) == tokenizer.eos_token_id:
            break
    print(tokenizer.decode(ids[0], skip_special_tokens=True))
    return 0


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in the artifact's `tokenizer/` folder (JSON files, never pickle)."""
    folder = Path(path) / TOKENIZER
    if not folder.is_dir():
        raise UsageError(f"{path}: the artifact holds no tokenizer; compile it from a model directory that has one "
                         "(or save it with mxc.save(compiled, dir, tokenizer=tok))")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _text_inputs(model: CompiledModel, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's tensor inputs for token ids `ids`: an attention mask of ones, token type
    ids of zeros and positions 0..s-1 where the graph takes them."""
    fill = {
        "input_ids": lambda: ids,
        "attention_mask": lambda: torch.ones_like(ids),
        "token_type_ids": lambda: torch.zeros_like(ids),
        "position_ids": lambda: torch.arange(ids.shape[1], device=ids.device).expand_as(ids),
    }
    unknown = [n for n in model.call_spec.inputs if n not in fill]
    if unknown:
        raise UsageError(f"the model takes input(s) {', '.join(unknown)}, which mxc run cannot fill from text")
    return {n: fill[n]() for n in model.call_spec.inputs}


# ------------------------------------------------------------------------------------ bench
def cmd_bench(args: argparse.Namespace) -> int:
    """Time the forward pass on random inputs of [batch, seq]: the median of `iters` runs after
    `warmup`, and tokens per second (batch·seq / median)."""
    for name in ("batch", "seq", "iters"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} {getattr(args, name)}: expected a positive number")
    model = _load(args.dir, args.device, args.backend)
    device = model_device(model)
    tensors = random_inputs(model.graph, args.batch, args.seq, device)
    inputs = dict(zip(model.call_spec.inputs, tensors))  # the graph's inputs, by the forward's names
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(max(args.warmup, 0)):
            model(**inputs)
        sync()
        times = []
        for _ in tqdm(range(args.iters), desc="timing", unit="run", disable=None, leave=False):
            start = time.perf_counter()
            model(**inputs)
            sync()
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    tokens = args.batch * args.seq
    print(f"backend {model.backend} on {device}: batch {args.batch} x seq {args.seq}, "
          f"median {median * 1e3:.2f} ms over {args.iters} runs (min {min(times) * 1e3:.2f} ms), "
          f"{tokens / median:.1f} tokens/s")
    return 0


def random_inputs(graph: Graph, batch: int, seq: int, device: torch.device) -> list[torch.Tensor]:
    """One tensor per graph input: the first size symbol is `batch`, the second `seq`.
    Token ids are drawn below the vocabulary size of the embedding they feed; an attention
    mask is ones, token type ids zeros, positions 0..seq-1; float inputs are normal."""
    sizes: dict[Any, int] = {}
    for node in graph.inputs:
        for d in node.types[0].shape:
            if not isinstance(d, int) and d not in sizes:
                if len(sizes) == 2:
                    raise UsageError(f"graph @{graph.name} has more than two size symbols; mxc bench sets batch and seq only")
                sizes[d] = (batch, seq)[len(sizes)]
    out = []
    for node in graph.inputs:
        t, name = node.types[0], node.get("name")
        shape = [d if isinstance(d, int) else sizes[d] for d in t.shape]
        dtype = t.dtype.torch if isinstance(t.dtype, DType) else torch.float32
        if dtype.is_floating_point:
            x = torch.randn(shape, dtype=dtype)
        elif name == "attention_mask":
            x = torch.ones(shape, dtype=dtype)
        elif name == "position_ids":
            x = torch.arange(shape[-1], dtype=dtype).expand(shape)
        else:
            x = torch.randint(0, _vocab_size(graph, node), shape, dtype=dtype)
        out.append(x.to(device))
    return out


def _vocab_size(graph: Graph, input_node: Any) -> int:
    """The rows of the embedding table `input_node` indexes, else 1 (ids of 0)."""
    for n in graph.nodes:
        if n.op == "embedding" and n.inputs[0].node is input_node:
            return int(n.inputs[1].type.shape[0])
    return 1


# ------------------------------------------------------------------------------------ helpers
def _load(path: str, device: str | None = None, backend: str | None = None) -> CompiledModel:
    """`mxc.load` with its notes (e.g. another torch version) printed as `mxc: note:` lines."""
    if not Path(path).exists():
        raise UsageError(f"{path}: no such artifact directory")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load(path, device=device, backend=backend)
    for w in caught:
        print(f"mxc: note: {w.message}", file=sys.stderr)
    return model


def model_device(model: CompiledModel) -> torch.device:
    """The device the model's executor runs on (the CPU when it does not say)."""
    return torch.device(getattr(model.executor, "device", "cpu"))


def _progress(message: str) -> None:
    """A progress line on stderr (stdout carries only the command's result)."""
    print(f"mxc: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
