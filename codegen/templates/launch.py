"""Plain-Python launch glue that generated modules import at run time (the kernels
themselves stay in the generated file): the GEMMs' tile configuration for M, the strides of
optional operands, the output and the split-K workspace and reduction; the row kernels'
output tensors.

    cfg = pick_config(CONFIGS, m)
    part = splitk_workspace(cfg, m, N, dev)        # None with one split
    gemm_kernel[grid](..., part, ..., *strides(res2), ...)
    reduce_splitk(splitk_reduce_kernel, grid, cfg, m, part, bias, res2, mul2, out2)
"""

from __future__ import annotations

import torch

from .checks import LaunchError, expect


def pick_config(configs: list[dict], m: int) -> dict:
    """The first configuration whose MAX_M >= m (MAX_M None: any m)."""
    return next(c for c in configs if c["MAX_M"] is None or m <= c["MAX_M"])


def strides(t: torch.Tensor | None) -> tuple[int, int]:
    """(stride(0), stride(1)) of a 2-d operand; (0, 0) for an absent one (None)."""
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def splitk_workspace(cfg: dict, m: int, n: int, device: torch.device) -> torch.Tensor | None:
    """The float32 [SPLIT_K, m, n] partial sums of a split-K launch; None with one split."""
    split = cfg["SPLIT_K"]
    return torch.empty((split, m, n), dtype=torch.float32, device=device) if split > 1 else None


def reduce_splitk(kernel, grid, cfg: dict, m: int, part, bias, res2, mul2, out2) -> None:
    """Launch the generated `splitk_reduce_kernel` over the (M, N) tiles of `grid`: out2 =
    epilogue(sum of the partial sums in `part`). Nothing to do without a workspace (one split)."""
    if part is None:
        return
    kernel[grid[:2]](
        part, bias, res2, mul2, out2, m, *strides(res2), *strides(mul2), *strides(out2),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], SPLIT_K=cfg["SPLIT_K"],
        num_warps=cfg["num_warps"],
    )


def output_tensor(kernel: str, out, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`out` once checked (shape, dtype, device, contiguous), or a new tensor when None."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    expect(kernel, "out", out, shape, (dtype,), device, contiguous=True)
    return out


def as_rows(t: torch.Tensor | None, m: int, n: int) -> torch.Tensor | None:
    """An optional [..., n] operand (residual, multiplier) as [m, n] rows; None stays None."""
    return t.reshape(m, n) if t is not None else None


def output_tensors(kernel: str, want: list[tuple], outs, device: torch.device) -> list[torch.Tensor]:
    """The output tensors of a row kernel's launch, in order. `want`: (name, shape, dtype,
    given) per output, `given` an input tensor returned as it is (a static scale) or None;
    `outs`: None, or one entry per output (None: allocate; a tensor: checked and written)."""
    if outs is None:
        outs = [None] * len(want)
    if not isinstance(outs, (list, tuple)) or len(outs) != len(want):
        raise LaunchError(f"{kernel}: outs must be a list of {len(want)} entries (None: allocate), got {outs!r:.80}")
    results = []
    for (name, shape, dt, given), out in zip(want, outs):
        if given is not None:  # a static scale / zero: an input, returned as given
            if out is not None:
                raise LaunchError(f"{kernel}: outs entry for {name} must be None (the static scale is an input)")
            results.append(given)
        elif out is None:
            results.append(torch.empty(shape, dtype=dt, device=device))
        else:
            expect(kernel, f"out {name}", out, shape, (dt,), device, contiguous=True)
            results.append(out)
    return results
