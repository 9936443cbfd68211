"""Calibration data: windows of real text for the calibrate pass (`mxc.passes.calibrate`).

    batches = text_batches(tokenizer, n=8, seq_len=512)   # token ids [512] each
    mxc.compile(model, "w4a16-g128", calibration=batches)

Windows are cut from the END of `mxc.eval.default_text()`, so that they never overlap the
windows perplexity is measured on (which come from the start).
"""

from __future__ import annotations

from typing import Any

import torch

from .passes.calibrate import PERCENTILES, Calibration, calibrate, collect

__all__ = ["PERCENTILES", "Calibration", "calibrate", "collect", "text_batches"]


def text_batches(tokenizer: Any, *, n: int = 16, seq_len: int = 512, text: str | None = None) -> list[torch.Tensor]:
    """`n` windows of `seq_len` tokens of real text, from the end of the default text."""
    from .eval import default_text

    ids = tokenizer.encode(text if text is not None else default_text(), add_special_tokens=False)
    need = n * seq_len
    if len(ids) < need:
        raise ValueError(f"calibration text has {len(ids)} tokens, but {n} windows of {seq_len} need {need}")
    tail = torch.tensor(ids[-need:], dtype=torch.long).reshape(n, seq_len)
    return list(tail)
