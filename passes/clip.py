"""Clipping-ratio search: per block, the ratio (<= 1) that shrinks the block's range before
rounding so that the layer's output error — not its weight error — is smallest. Pure torch
on CPU, no graph code; the quantize pass calls it per layer.

    clip = search_clip(W, fmt, H=H)         # [N, n_blocks] ratios from DEFAULT_GRID
    q = quantize_clipped(W, fmt, clip)      # QTensor; fmt.dequantize(q, K) is the weight
    output_error(W, fmt.dequantize(q, K), H)   # sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))

The error of block b of row n is `ΔW[n, b] H_bb ΔW[n, b]ᵀ` (the block-diagonal part of H;
the plain squared error without H). Each row's choice is then checked against the exact
error `ΔW[n] H ΔW[n]ᵀ` without clipping, and a row that came out worse keeps the full
range: the search never does worse than no clipping. A per-tensor format gets the one
ratio with the least exact error.
"""

from __future__ import annotations

import math

import torch

from ..ir.formats import NumberFormat, QTensor
from .gptq import block_scales, code_values, hessian, quantize_fixed

#: The clipping ratios tried, 1.0 (no clipping) first so that ties keep the full range.
DEFAULT_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor | None = None) -> float:
    """Relative output error `sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))` of `wq` for `w` [N, K]
    (the relative Frobenius error when `h` is None)."""
    w = w.detach().to(torch.float64)
    d = w - wq.detach().to(torch.float64)
    if h is None:
        num, den = (d * d).sum(), (w * w).sum()
    else:
        h = h.detach().float()  # float32 products, float64 sums: ample for a relative error
        num, den = ((d.float() @ h) * d).sum(dtype=torch.float64), ((w.float() @ h) * w).sum(dtype=torch.float64)
    num, den = max(float(num), 0.0), float(den)
    if den <= 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


def quantize_clipped(w: torch.Tensor, fmt: NumberFormat, clip: float | torch.Tensor = 1.0) -> QTensor:
    """`w` [N, K] quantized with clipping ratios `clip` (a float or [N, n_blocks]); equals
    `fmt.quantize(w, clip)` except that a two-level format (nvfp4) keeps `w`'s unclipped
    global scale and clips its block scales (`fmt.quantize` takes no per-block clip there)."""
    return quantize_fixed(w.float(), fmt, block_scales(w, fmt, clip))


def search_clip(
    w: torch.Tensor,
    fmt: NumberFormat,
    X: torch.Tensor | None = None,
    H: torch.Tensor | None = None,
    grid: tuple[float, ...] = DEFAULT_GRID,
    per_block: bool = True,
) -> torch.Tensor:
    """The clipping ratio per block of `w` [N, K] ([N, n_blocks], float32) from `grid` that
    minimises the output error under `H` (or `hessian(X)`; the weight error without either).
    A per-tensor format, or `per_block=False`, gets one ratio (a 0-d tensor)."""
    if X is not None and H is not None:
        raise ValueError("search_clip: give calibration inputs X or their Hessian H, not both")
    if X is not None:
        H = hessian(X)
    if not grid or any(not 0.0 < c <= 1.0 for c in grid):
        raise ValueError(f"search_clip: clipping ratios must lie in (0, 1], got {list(grid)}")
    grid = (1.0, *(c for c in grid if c != 1.0))
    w = w.detach().float()
    k = w.shape[-1]
    block = fmt.scaling.block(k)
    glob = block_scales(w, fmt).global_scale
    h = None if H is None else H.detach().float()  # float32: 2-4x faster, ample for ranking errors

    deltas = _deltas(w, fmt, grid, glob)  # [G, N, K]
    if block is None or not per_block:
        errors = torch.stack([_row_errors(d, h).sum() for d in deltas])
        return torch.tensor(grid[int(errors.argmin())], dtype=torch.float32)

    blocks = _block_errors(deltas, h, block)  # [G, N, nb]
    ratios = torch.tensor(grid, dtype=torch.float32)
    clip = ratios[blocks.argmin(0)]  # argmin takes the first minimum: ties keep the larger ratio
    # the blocks' choices interact through H's off-diagonal blocks: a row whose exact error
    # came out worse than without clipping keeps the full range
    chosen = _row_errors(_delta(w, fmt, block_scales(w, fmt, clip, glob)), h)
    clip[chosen > _row_errors(deltas[0], h)] = 1.0
    return clip


def _deltas(w: torch.Tensor, fmt: NumberFormat, grid: tuple[float, ...], glob) -> torch.Tensor:
    """`w - fake(w)` at every clipping ratio of `grid` ([G, N, K]): one broadcast
    `fmt.quantize` with the ratios on a leading axis (the same operations per ratio)."""
    if glob is not None or fmt.scaling.block(w.shape[-1]) is None:  # two-level formats clip only
        # their block scales (see block_scales); one scale per tensor has no block axis
        return torch.stack([_delta(w, fmt, block_scales(w, fmt, c, glob)) for c in grid])
    ratios = torch.tensor(grid, dtype=torch.float32).reshape(-1, 1, 1)
    return w - fmt.dequantize(fmt.quantize(w, ratios), w.shape[-1])


def _delta(w: torch.Tensor, fmt: NumberFormat, scales) -> torch.Tensor:
    q = quantize_fixed(w, fmt, scales)
    s, z = scales.columns(w.shape[-1])
    return w - code_values(q.codes, s, z)


def _row_errors(d: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
    """`ΔW[n] H ΔW[n]ᵀ` per row."""
    return (d * d).sum(1) if h is None else ((d @ h) * d).sum(1)


def _block_errors(d: torch.Tensor, h: torch.Tensor | None, block: int) -> torch.Tensor:
    """`ΔW[n, b] H_bb ΔW[n, b]ᵀ` per row and block ([..., N, n_blocks]) of `d` [..., N, K]."""
    k = d.shape[-1]
    nb = -(-k // block)
    db = torch.nn.functional.pad(d, (0, nb * block - k)).reshape(*d.shape[:-1], nb, block)
    if h is None:
        return (db * db).sum(-1)
    hp = torch.nn.functional.pad(h, (0, nb * block - k, 0, nb * block - k))
    hb = torch.stack([hp[b * block : (b + 1) * block, b * block : (b + 1) * block] for b in range(nb)])
    rows = db.reshape(-1, nb, block).transpose(0, 1)  # [nb, rows, block]
    out = (torch.bmm(rows, hb) * rows).sum(-1)  # [nb, rows]
    return out.T.reshape(*d.shape[:-1], nb)
