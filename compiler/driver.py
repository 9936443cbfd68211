"""The pipeline driver: capture, passes, backend.

    compiled = mxc.compile(model, example_inputs={"input_ids": ids}, dump_ir="dumps/")

`compile` captures the model with `torch.export` (batch and sequence dims dynamic), runs the
pass pipeline (verifying after every pass in debug mode, dumping the IR after every pass
when asked) and binds the final graph to a backend.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .compiled import CompiledModel
from .frontends.torch_export import capture
from .ir import flags
from .passes import run_pipeline
from .runtime import BACKENDS

#: The passes run for a model with no plan, in order.
FLOAT_PIPELINE = ["canonicalize"]


def compile(  # noqa: A001 - the public name mirrors torch.compile
    model: torch.nn.Module,
    plan: Any = None,
    *,
    example_inputs: Any = None,
    dynamic_shapes: Any = None,
    backend: str = "reference",
    dump_ir: str | os.PathLike | None = None,
    debug: bool | None = None,
    device: torch.device | str | None = None,
) -> CompiledModel:
    """Compile `model` to a `CompiledModel`.

    `example_inputs`: a tensor, a tuple of positional arguments or a dict of keyword
    arguments (default for Hugging Face models: random `input_ids` of shape [2, 16]).
    `dynamic_shapes`: passed to `torch.export` (default: dims 0 and 1 of every input vary).
    `backend`: one of `mxc.runtime.BACKENDS`. `dump_ir`: a directory for `NN-pass.mxir`
    dumps (default: the `MXC_DUMP_IR` flag). `debug`: verify the IR after every pass and
    check every node's result shape at run time (default: the `MXC_DEBUG` flag).
    """
    if plan is not None:
        raise NotImplementedError(
            f"quantization plans are not implemented yet (got {plan!r}); compile with plan=None for the float graph"
        )
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    debug = flags.DEBUG.get() if debug is None else debug
    captured = capture(model, example_inputs, dynamic_shapes=dynamic_shapes)
    result = run_pipeline(captured.graph, FLOAT_PIPELINE, verify=debug, dump_dir=dump_ir)
    executor = BACKENDS[backend](result.graph, device=device, check_shapes=debug)
    return CompiledModel(result.graph, captured.call_spec, executor, backend, result.timings)
