"""The pipeline driver: capture, passes, backend.

    compiled = mxc.compile(model, example_inputs={"input_ids": ids}, dump_ir="dumps/")

`compile` captures the model with `torch.export` (batch and sequence dims dynamic), runs the
pass pipeline (verifying after every pass in debug mode, dumping the IR after every pass
when asked) and binds the final graph to a backend.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from .compiled import CompiledModel
from .frontends.onnx import is_onnx, load_onnx
from .frontends.torch_export import capture
from .ir import flags
from .passes import run_pipeline
from .calibrate import CALIBRATION_WINDOWS, executor as calibration_executor, text_batches
from .plan import Plan
from .signature import CallSpec
from .runtime import BACKENDS

#: The passes run for a model with no plan, in order.
FLOAT_PIPELINE = ["canonicalize"]
#: The passes run for a plan, in order (DESIGN.md); a plan may switch some off
#: (`Plan(passes={"reorder": False})`, see `mxc.plan.SWITCHABLE_PASSES`).
QUANT_PIPELINE = ["canonicalize", "calibrate", "smooth", "reorder", "quantize", "tune", "fold", "layout", "fuse"]
#: Windows of 512 tokens of real text a tokenizer gives the tune pass: the text before the
#: last `TUNE_SKIP` tokens, which are the calibration windows GPTQ fits the layers to (on them
#: the quantized model's error is smaller than on any other text); the first window is held
#: out to check the result. Token-id calibration batches are used as given.
TUNE_WINDOWS = 33
TUNE_SKIP = CALIBRATION_WINDOWS[0] * CALIBRATION_WINDOWS[1]  # what `text_batches(tokenizer)` gives calibration


def compile(  # noqa: A001 - the public name mirrors torch.compile
    model: "torch.nn.Module | str | os.PathLike | onnx.ModelProto",
    plan: "Plan | str | dict | None" = None,
    *,
    example_inputs: Any = None,
    dynamic_shapes: Any = None,
    backend: str = "reference",
    dump_ir: str | os.PathLike | None = None,
    debug: bool | None = None,
    device: torch.device | str | None = None,
    calibration: Any = None,
) -> CompiledModel:
    """Compile `model` to a `CompiledModel`. `model` is an `nn.Module`, or an ONNX model (a
    path ending in `.onnx` or an `onnx.ModelProto`, imported by `mxc.frontends.onnx`;
    `example_inputs` and `dynamic_shapes` do not apply to it).

    `example_inputs`: a tensor, a tuple of positional arguments or a dict of keyword
    arguments (default for Hugging Face models: random `input_ids` of shape [2, 16]).
    `dynamic_shapes`: passed to `torch.export` (default: dims 0 and 1 of every input vary).
    `backend`: one of `mxc.runtime.BACKENDS`, or "auto": "triton" when torch sees a CUDA GPU,
    else "reference" (a warning says which, once per process). `dump_ir`: a directory for
    `NN-pass.mxir` dumps (default: the `MXC_DUMP_IR` flag). `debug`: verify the IR after every pass and
    check every node's result shape at run time (default: the `MXC_DEBUG` flag).
    `calibration`: a tokenizer (windows of real text are cut from `mxc.eval.default_text()`,
    never overlapping the perplexity windows) or a list of token-id tensors; it enables GPTQ
    and the clipping search of plans whose method is "auto". A plan "auto:3.5" (average bits
    per weight) or "auto:90MB" (model bytes) is `Plan.auto(model, budget, calibration=...)`:
    formats allocated from sensitivity measured on the calibration data, which it needs.
    """
    if isinstance(plan, str) and plan.startswith("auto:") and not os.path.exists(plan):
        plan = Plan.auto(model, plan.removeprefix("auto:"), calibration=calibration, example_inputs=example_inputs)
    plan = None if plan is None else Plan.coerce(plan)
    if backend == "auto":
        backend = auto_backend()
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)} or auto")
    debug = flags.DEBUG.get() if debug is None else debug
    if is_onnx(model):  # an .onnx path or a ModelProto: the ONNX frontend instead of torch.export
        captured = load_onnx(model)
    else:
        captured = capture(model, example_inputs, dynamic_shapes=dynamic_shapes)
    if plan is None:
        pipeline = {name: True for name in FLOAT_PIPELINE}
        result = run_pipeline(captured.graph, FLOAT_PIPELINE, verify=debug, dump_dir=dump_ir)
    else:
        # "tune" runs only when the plan asks for it (steps > 0), and is not listed otherwise
        pipeline = {name: plan.runs(name) for name in QUANT_PIPELINE if name != "tune" or plan.tune}
        plan = plan.resolved(calibrated=calibration is not None)
        # a pass switched off asks for nothing (and no warning says it is missing)
        alphas = plan.smoothing(_linear_paths(captured.graph)) if pipeline["smooth"] else {}
        outliers = _outlier_counts(plan, captured.graph) if pipeline["reorder"] else {}
        if calibration is None:
            skipped = [what for what, on in [("weights are rounded to nearest (no GPTQ, no clipping search)",
                                              any(r.weight is not None for r in (*plan.rules, plan.default))),
                                             ("activations are not smoothed", bool(alphas)),
                                             ("outlier channels are not reordered (no mixed precision)",
                                              bool(outliers))] if on]
            if skipped:
                warnings.warn(
                    f"plan {plan.name or '(custom)'}: no calibration data, so {' and '.join(skipped)}; "
                    "pass calibration=tokenizer for better accuracy",
                    stacklevel=2,
                )
            alphas, outliers = {}, {}
        plan.check_matches(_linear_paths(captured.graph))
        batches = None if calibration is None else calibration_inputs(calibration, captured.call_spec)
        options = {
            "calibrate": {"batches": batches, "executor": calibration_executor},
            "smooth": {"alpha": alphas, "layers": alphas.__contains__},
            "reorder": {"outliers": outliers},
            "quantize": {"plan": plan},
            "tune": {"teacher": captured.graph, "steps": plan.tune, "executor": calibration_executor,
                     "batches": None if not plan.tune else tune_inputs(calibration, captured.call_spec)},
        }
        names = [name for name in QUANT_PIPELINE if pipeline.get(name)]
        result = run_pipeline(captured.graph, names, options=options, verify=debug, dump_dir=dump_ir)
    executor = BACKENDS[backend](result.graph, device=device, check_shapes=debug)
    return CompiledModel(result.graph, captured.call_spec, executor, backend, result.timings, plan, pipeline)


def auto_backend() -> str:
    """The backend "auto" stands for: "triton" when `torch.cuda.is_available()`, else
    "reference". Warns which it picked: the same text from the same line (in `compile`) each
    time, so Python's default warning filter shows it once per process."""
    picked = "triton" if torch.cuda.is_available() else "reference"
    why = "a CUDA GPU is available" if picked == "triton" else "no CUDA GPU is available"
    warnings.warn(f"backend 'auto' picked {picked!r}: {why}", stacklevel=2)
    return picked


def calibration_inputs(calibration: Any, spec: CallSpec) -> list[list[torch.Tensor]]:
    """The graph inputs of each calibration batch. `calibration` is a tokenizer (windows of
    real text) or a list of batches: token-id tensors ([seq] or [b, seq]) or dicts of
    keyword arguments. An `attention_mask` (ones) and `token_type_ids` (zeros) that the
    graph takes but a batch lacks are filled in."""
    batches = calibration if isinstance(calibration, (list, tuple)) else text_batches(calibration)
    out = []
    for b in batches:
        if isinstance(b, torch.Tensor):
            kwargs = {spec.inputs[0]: b if b.dim() == 2 else b[None]}
        elif isinstance(b, dict):
            kwargs = dict(b)
        else:
            raise TypeError(f"a calibration batch must be a tensor of token ids or a dict of inputs, got {type(b).__name__}")
        ids = next(iter(kwargs.values()))
        if "attention_mask" in spec.inputs and "attention_mask" not in kwargs:
            kwargs["attention_mask"] = torch.ones_like(ids)
        if "token_type_ids" in spec.inputs and "token_type_ids" not in kwargs:
            kwargs["token_type_ids"] = torch.zeros_like(ids)
        out.append(spec.bind((), kwargs))
    return out


def tune_inputs(calibration: Any, spec: CallSpec) -> list[list[torch.Tensor]]:
    """The graph inputs the tune pass fits scales on: `TUNE_WINDOWS` windows of 512 tokens
    from a tokenizer (from the end of the default text, before GPTQ's calibration windows,
    never the perplexity windows), or the calibration batches as given."""
    if not isinstance(calibration, (list, tuple)):
        calibration = text_batches(calibration, n=TUNE_WINDOWS, seq_len=512, skip=TUNE_SKIP)
    return calibration_inputs(calibration, spec)


def _linear_paths(graph) -> list[str]:
    from .passes.quantize import layer_path

    return [layer_path(n, n.inputs[1].node) for n in graph.nodes if n.op == "linear"]


def _outlier_counts(plan: Plan, graph) -> dict[str, int]:
    """`{path: k}` for the reorder pass: every linear whose rule quantizes something and has
    an `outliers` option (a count, or a fraction of the layer's K), where k > 0."""
    from .passes.quantize import layer_path
    from .passes.reorder import outlier_count

    out = {}
    for n in graph.nodes:
        if n.op != "linear" or n.inputs[1].node.op != "const":
            continue
        path = layer_path(n, n.inputs[1].node)
        rule = plan.rule_for(path, "linear")
        value = rule.options.get("outliers")
        if value is not None and (rule.weight is not None or rule.act is not None):
            k = outlier_count(value, n.inputs[1].type.shape[1], path)
            if k:
                out[path] = k
    return out
