"""Argument checks for generated `launch` functions: every error names the kernel, the
argument, what was expected and what came.

    expect(KERNEL, "weight", w, (96, 25), (torch.int32,), x.device, contiguous=True)
    # LaunchError: dequant_gemm[k=200,n=96 weight=int4<sym,g32>]: weight must be int32 [96, 25]
    #              on cpu (contiguous), got float32 [96, 200] on cpu
"""

from __future__ import annotations

from typing import Sequence

import torch

#: Float dtypes an optional float operand (bias, residual, scales) may come in.
FLOATS = (torch.float32, torch.float16)


class LaunchError(ValueError):
    """A kernel was launched with an argument of the wrong shape, dtype, device or layout."""


def describe(t: torch.Tensor) -> str:
    """`float32 [96, 200] on cpu`."""
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)} on {t.device}"


def expect(
    kernel: str,
    name: str,
    t: object,
    shape: Sequence[int] | None,
    dtypes: Sequence[torch.dtype],
    device: torch.device | None,
    *,
    contiguous: bool = False,
    note: str = "",
) -> None:
    """Raise `LaunchError` unless `t` is a tensor of `shape` (None: any), one of `dtypes`,
    on `device` (None: any) and, if asked, contiguous. `note` says what the argument holds."""
    want_dtype = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
    want = f"{want_dtype} {list(shape) if shape is not None else '[...]'}"
    if device is not None:
        want += f" on {device}"
    if contiguous:
        want += " (contiguous)"
    if note:
        want += f" ({note})"
    if not isinstance(t, torch.Tensor):
        raise LaunchError(f"{kernel}: {name} must be a tensor: {want}, got {type(t).__name__}")
    ok = (
        (shape is None or tuple(t.shape) == tuple(shape))
        and t.dtype in dtypes
        and (device is None or t.device == device)
        and (not contiguous or t.is_contiguous())
    )
    if not ok:
        got = describe(t) + ("" if not contiguous or t.is_contiguous() else " (not contiguous)")
        raise LaunchError(f"{kernel}: {name} must be {want}, got {got}")


def expect_none(kernel: str, name: str, t: object, why: str) -> None:
    """Raise `LaunchError` if an operand the kernel does not take was given."""
    if t is not None:
        got = describe(t) if isinstance(t, torch.Tensor) else type(t).__name__
        raise LaunchError(f"{kernel}: takes no {name} ({why}), got {got}")
