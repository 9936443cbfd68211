"""Calibration: windows of real text, and the calibrate pass bound to the reference backend.

    batches = text_batches(tokenizer, n=8, seq_len=512)   # token ids [512] each
    mxc.compile(model, "w4a16-g128", calibration=batches)
    stats = collect(graph, graph_inputs)                   # every linear's statistics at once

Windows are cut from the END of `mxc.eval.default_text()`, so that they never overlap the
windows perplexity is measured on (which come from the start). The statistics themselves
are gathered by `mxc.passes.calibrate`; here its executor is the reference backend.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from .ir import Graph
from .passes.calibrate import PERCENTILES
from .passes.calibrate import Calibration as _Calibration, calibrate as _calibrate, collect as _collect
from .runtime import ReferenceExecutor

__all__ = ["CALIBRATION_WINDOWS", "PERCENTILES", "Calibration", "calibrate", "collect", "executor", "text_batches"]


def executor(graph: Graph) -> ReferenceExecutor:
    """The executor calibration runs batches on: the reference backend, no shape checks."""
    return ReferenceExecutor(graph, check_shapes=False)


def Calibration(graph: Graph, batches: Iterable[Sequence[torch.Tensor]], **kw: Any) -> _Calibration:  # noqa: N802
    """`mxc.passes.calibrate.Calibration` on the reference backend."""
    return _Calibration(graph, batches, executor=kw.pop("executor", executor), **kw)


def calibrate(graph: Graph, **kw: Any) -> Graph:
    """The calibrate pass on the reference backend."""
    return _calibrate(graph, executor=kw.pop("executor", executor), **kw)


def collect(graph: Graph, batches: Iterable[Sequence[torch.Tensor]], **kw: Any) -> dict[str, dict]:
    """Every linear's statistics at once (see `mxc.passes.calibrate.collect`)."""
    return _collect(graph, batches, executor=kw.pop("executor", executor), **kw)


#: (count, tokens) of the windows a tokenizer gives calibration by default: the last 8 × 512
#: tokens of the text, which GPTQ fits the layers to (sensitivity and tuning text is held out
#: from them).
CALIBRATION_WINDOWS = (8, 512)


def text_batches(tokenizer: Any, *, n: int = CALIBRATION_WINDOWS[0], seq_len: int = CALIBRATION_WINDOWS[1],
                 text: str | None = None, skip: int = 0) -> list[torch.Tensor]:
    """`n` windows of `seq_len` tokens of real text, from the end of the default text, the
    last `skip` tokens left out: `text_batches(tok, n=4, seq_len=128, skip=8 * 512)` is text
    held out from the default calibration windows (8 × 512, the last 4096 tokens)."""
    from .eval import default_text

    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise ValueError(f"skip must be a count of tokens >= 0, got {skip!r}")
    ids = tokenizer.encode(text if text is not None else default_text(), add_special_tokens=False)
    need = n * seq_len
    if len(ids) < need + skip:
        raise ValueError(f"calibration text has {len(ids)} tokens, but {n} windows of {seq_len} need {need}"
                         + (f" after the last {skip} are left out" if skip else ""))
    tail = torch.tensor(ids[len(ids) - skip - need:len(ids) - skip], dtype=torch.long).reshape(n, seq_len)
    return list(tail)
