"""GPTQ (Frantar et al., 2022): round a linear layer's weight column by column, feeding each
column's rounding error forward onto the columns not yet rounded so that the layer's output
on the calibration inputs (not its weight) stays close. Pure torch on CPU, no graph code;
the quantize pass calls it per layer.

    acc = HessianAccumulator()
    for x in batches: acc.add(x)                      # x: [..., K] inputs of the layer
    wq = gptq(W, acc.H, parse_format("int4<sym,g128>"))   # float32 [N, K], on the grid
    q = gptq_quantize(W, acc.H, fmt)                  # the same as a QTensor: fmt.dequantize(q, K) == wq

Scales: each block of columns (`fmt.scaling.block(K)`: a group, the whole row per channel,
the whole tensor) gets its scales when the quantizer reaches its first column, from the
weights as error feedback has left them; with `act_order` (columns in decreasing Hessian
diagonal order) all scales are fixed up front from W ("static groups"), so that permuting
the columns keeps each column in its own group. A two-level format's global scale is always
W's own. The fixed-scale rounding is `block_scales` / `quantize_fixed`: with W's own scales
it is `fmt.quantize` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..ir import quant as Q
from ..ir.formats import FloatFormat, IntFormat, NumberFormat, QTensor

#: Damping ratios tried, in order, after `damp` when the damped Hessian is still singular.
DAMP_RETRIES = (1e-3, 1e-2, 1e-1, 1.0)


class HessianAccumulator:
    """The Hessian of a linear layer's squared output error, `H = XᵀX / rows`, accumulated in
    float64 over batches of its inputs `X` ([..., K]; leading axes are rows)."""

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if self._sum is None:
            self._sum = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        elif self._sum.shape[0] != x.shape[1]:
            raise ValueError(
                f"HessianAccumulator: inputs have {x.shape[1]} channels, earlier ones had {self._sum.shape[0]}"
            )
        self._sum += x.T @ x
        self.rows += x.shape[0]

    @property
    def H(self) -> torch.Tensor:
        if self._sum is None or self.rows == 0:
            raise ValueError("HessianAccumulator: no inputs added")
        return self._sum / self.rows


def hessian(x: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    """`XᵀX / rows` in float64 of one input tensor [..., K] or of an iterable of batches."""
    acc = HessianAccumulator()
    for batch in [x] if isinstance(x, torch.Tensor) else x:
        acc.add(batch)
    return acc.H


@dataclass(frozen=True)
class BlockScales:
    """A format's scales fixed for a weight [N, K]: `scale` [N, n_blocks] as stored ([1, 1]
    per tensor), `zero` point codes (asymmetric integers), the `global_scale` [1] of
    two-level formats, and `block` columns per scale (None: one scale for the tensor)."""

    scale: torch.Tensor
    zero: torch.Tensor | None
    global_scale: torch.Tensor | None
    block: int | None

    def full(self) -> torch.Tensor:
        """The scale a code is multiplied by (block scale times global scale), per block."""
        return self.scale * (self.global_scale if self.global_scale is not None else 1.0)

    def column(self, j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Full scale and zero point of column `j`, per row ([N], or [1] per tensor)."""
        b = 0 if self.block is None else j // self.block
        return self.full()[:, b], None if self.zero is None else self.zero[:, b]

    def columns(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Full scale and zero point of every column, broadcastable to [N, k]."""
        if self.block is None:
            return self.full(), self.zero
        expand = lambda t: t.repeat_interleave(self.block, dim=-1)[:, :k]  # noqa: E731
        return expand(self.full()), None if self.zero is None else expand(self.zero)


def block_scales(
    w: torch.Tensor, fmt: NumberFormat, clip: float | torch.Tensor = 1.0, global_scale: torch.Tensor | None = None
) -> BlockScales:
    """The scales `fmt` gives `w` [N, K] with clipping ratio `clip` (a float, or per block
    [N, n_blocks]); a two-level format keeps `global_scale` (default: `w`'s own, unclipped)
    and clips only its block scales. Otherwise these are `fmt.quantize(w, clip)`'s scales."""
    w = w.detach().float()
    block = fmt.scaling.block(w.shape[-1])
    if not (isinstance(fmt, FloatFormat) and fmt.global_):
        q = fmt.quantize(w, clip)
        return BlockScales(q.scale, q.zero, None, block)
    glob = fmt.quantize(w).global_scale if global_scale is None else global_scale
    xb = w.reshape(1, 1, -1) if block is None else Q.blocks(w, block)
    amax = Q.nan_amax(xb) * clip / glob
    emax = fmt.spec.max
    raw = amax / 2.0 ** math.floor(math.log2(emax)) if fmt.scaling.scale == "e8m0" else amax / emax
    return BlockScales(fmt._store_scale(raw), None, glob, block)  # the format's own scale rounding


def round_codes(x: torch.Tensor, fmt: NumberFormat, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Codes of `x` on `fmt`'s grid with fixed full `scale` (and `zero`), broadcast
    elementwise: the same float32 operations as `fmt.quantize`."""
    x = x.float()
    if isinstance(fmt, IntFormat):
        if zero is None:
            return Q.round_int(x / scale, fmt.bits, True)
        return Q.round_int(x / scale + zero, fmt.bits, False)
    return Q.round_float(x / scale, fmt.spec)


def code_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Float32 values of `codes`: the same operations as `fmt.dequantize`."""
    return (codes - zero) * scale if zero is not None else codes * scale


def quantize_fixed(w: torch.Tensor, fmt: NumberFormat, scales: BlockScales) -> QTensor:
    """`w` [N, K] rounded onto the grid of fixed `scales` (codes, with those scales)."""
    s, z = scales.columns(w.shape[-1])
    return QTensor(round_codes(w, fmt, s, z), scales.scale, scales.zero, scales.global_scale)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of `(H + λI)⁻¹`, λ = damp·mean(diag H), as float32; a still
    singular H is damped further (`DAMP_RETRIES`) before giving up."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    mean = h.diagonal().mean()
    tried = []
    for ratio in (damp, *(r for r in DAMP_RETRIES if r > damp)):
        tried.append(ratio)
        low, info = torch.linalg.cholesky_ex(h + ratio * mean * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if info == 0:
                return upper.float()
    raise ValueError(f"gptq: Hessian [{h.shape[0]}x{h.shape[0]}] is not positive definite with damp in {tried}")


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    fmt: NumberFormat,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    clip: float | torch.Tensor | None = None,
    factors: dict | None = None,
) -> QTensor:
    """GPTQ of `w` [N, K] (out, in) under the Hessian `h` [K, K] of its inputs: codes and the
    scales GPTQ chose, in `fmt.quantize`'s layout (`fmt.dequantize(q, K)` is the weight).

    `block_size` columns are updated lazily together; `damp` adds damp·mean(diag H) to the
    diagonal; a dead input channel (H's diagonal 0) gets weight 0; `act_order` rounds the
    columns with the largest diagonal first, with static scales; `clip` (a float or per
    block [N, n_blocks]) shrinks the block scales as in `block_scales`. `factors`, a dict
    kept with the Hessian, caches its column order and inverse Cholesky factor for the
    layers that share it (q/k/v, gate/up)."""
    if w.dim() != 2 or h.shape != (w.shape[1], w.shape[1]):
        raise ValueError(
            f"gptq: expected a weight [N, K] and a Hessian [K, K], got {list(w.shape)} and {list(h.shape)}"
        )
    w = w.detach().float().clone()
    h = h.detach().to(torch.float64).clone()
    n, k = w.shape
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    clip = 1.0 if clip is None else clip
    block = fmt.scaling.block(k)
    glob = block_scales(w, fmt).global_scale
    dynamic = not act_order and block is not None and block < k
    if dynamic:  # filled group by group as the quantizer reaches each group
        nb = -(-k // block)
        asym = isinstance(fmt, IntFormat) and not fmt.symmetric
        scales = BlockScales(torch.ones(n, nb), torch.zeros(n, nb) if asym else None, glob, block)
    else:
        scales = block_scales(w, fmt, clip, glob)

    key = (damp, act_order)
    if factors is not None and key in factors:
        perm, u = factors[key]
    else:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(k)
        u = _inverse_cholesky(h[perm][:, perm], damp).float()  # float64 factorisation, float32 updates
        if factors is not None:
            factors[key] = (perm, u)
    # columns as contiguous rows: the loop reads and updates one column at a time
    wt = w[:, perm].T.contiguous()  # [k, n]
    codes = torch.zeros(k, n)
    rnd = _Rounder(fmt)
    if not dynamic:  # every column's scale is known: read them in the permuted order once
        full, zero = scales.columns(k)
        full = full.expand(n, k)[:, perm].T.contiguous()
        zero = None if zero is None else zero.expand(n, k)[:, perm].T.contiguous()
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1, u1 = wt[i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros(i2 - i1, n)
        for i in range(i2 - i1):
            if dynamic:
                j = i1 + i  # no act_order: perm is the identity
                if j % block == 0:
                    _fill_group(scales, fmt, _current(wt, w1, err, u, i1, i, i2, j + block), clip, j // block)
                s, z = scales.column(j)
            else:
                s, z = full[i1 + i], None if zero is None else zero[i1 + i]
            x = w1[i]
            c, v = rnd(x, s, z)
            codes[i1 + i] = c
            e = err[i]
            torch.sub(x, v, out=e).div_(u1[i, i])
            w1[i + 1 :].addr_(u1[i, i + 1 :], e, alpha=-1.0)
        wt[i2:].addmm_(u[i1:i2, i2:].T, err, alpha=-1.0)
    codes = codes.T
    return QTensor(codes[:, torch.argsort(perm)], scales.scale, scales.zero, scales.global_scale)


class _Rounder:
    """`round_codes` and `code_values` of one column in one call, with the format's
    constants looked up once (the GPTQ column loop runs it K times per layer)."""

    def __init__(self, fmt: NumberFormat):
        self.fmt = fmt
        self.int = isinstance(fmt, IntFormat)
        if self.int:
            self.lo, self.hi = Q.int_range(fmt.bits, fmt.symmetric)

    def __call__(self, x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.int:
            y = x / s if z is None else x / s + z
            c = torch.round(y).clamp_(self.lo, self.hi)
            return c, (c * s if z is None else (c - z) * s)
        c = Q.round_float(x / s, self.fmt.spec)
        return c, c * s


def _current(wt, w1, err, u, i1: int, i: int, i2: int, end: int) -> torch.Tensor:
    """Columns i1+i .. end of the weight ([n, cols]) as error feedback has left them so far:
    those in the current lazy block from `w1`, later ones with the block's pending update
    applied (`wt`, `w1`, `err` hold columns as rows)."""
    end = min(end, wt.shape[0])
    cur = w1[i : min(end, i2) - i1]
    if end > i2:
        cur = torch.cat([cur, wt[i2:end] - u[i1 : i1 + i, i2:end].T @ err[:i]], dim=0)
    return cur.T


def _fill_group(scales: BlockScales, fmt: NumberFormat, cols: torch.Tensor, clip, g: int) -> None:
    group_clip = clip[..., g : g + 1] if isinstance(clip, torch.Tensor) and clip.dim() > 0 else clip
    got = block_scales(cols, fmt, group_clip, scales.global_scale)
    scales.scale[:, g] = got.scale[:, 0]
    if scales.zero is not None:
        scales.zero[:, g] = got.zero[:, 0]


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    fmt: NumberFormat,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    clip: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """The GPTQ-rounded weight, float32 [N, K], every block exactly on `fmt`'s grid with the
    scales GPTQ chose (see `gptq_quantize`, which also returns those scales).

        Before: W  f32[N, K]     (any values)
        After:  Wq f32[N, K]     (Wq = dequantize(codes, GPTQ's scales))"""
    q = gptq_quantize(w, h, fmt, block_size=block_size, damp=damp, act_order=act_order, clip=clip)
    return fmt.dequantize(q, w.shape[-1])
