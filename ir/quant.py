"""Reference numerics of the number formats: the oracle every kernel is tested against.

Element grids:

    round_float(x, FLOAT_SPECS["fp4e2m1"])   # nearest fp4 e2m1 value, ties to even, saturating
    round_int(x, bits=4, symmetric=True)      # integer codes in [-8, 7]

Scales per block of elements along the last axis (`blocks` reshapes [.., K] into
[.., ceil(K/g), g], padding a shorter last block with NaN that every reduction ignores):

    amax = block_amax(x, 128)                 # [.., ceil(K/128)]

Everything here works on float32 tensors and returns float32, so that dequantized values
are exact (every grid value of every format is a float32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class FloatSpec:
    """A small float element: exponent and mantissa bits, bias, largest finite value, and
    whether it has infinities (e5m2 does; the `fn` formats and fp6/fp4 saturate)."""

    ebits: int
    mbits: int
    bias: int
    max: float
    has_inf: bool = False

    @property
    def min_normal_exp(self) -> int:
        return 1 - self.bias

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.min_normal_exp - self.mbits)

    def grid(self) -> torch.Tensor:
        """Every non-negative finite value, ascending."""
        vals = {0.0}
        for e in range(self.min_normal_exp, self.min_normal_exp + 2**self.ebits):
            for m in range(2**self.mbits):
                vals.add(2.0**e * (1 + m / 2**self.mbits))
        for m in range(1, 2**self.mbits):
            vals.add(2.0**self.min_normal_exp * m / 2**self.mbits)
        return torch.tensor(sorted(v for v in vals if v <= self.max), dtype=torch.float32)


FLOAT_SPECS: dict[str, FloatSpec] = {
    "fp8e4m3": FloatSpec(4, 3, 7, 448.0),
    "fp8e5m2": FloatSpec(5, 2, 15, 57344.0, has_inf=True),
    "fp6e3m2": FloatSpec(3, 2, 3, 28.0),
    "fp6e2m3": FloatSpec(2, 3, 1, 7.5),
    "fp4e2m1": FloatSpec(2, 1, 1, 6.0),
}


def round_float(x: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
    """`x` rounded to the nearest value of `spec`'s grid, ties to even, saturating at ±max.
    NaN stays NaN; ±inf saturates to ±max (or stays ±inf for a format with infinities)."""
    x = x.float()
    a = x.abs()
    _, exp = torch.frexp(a)  # a = m * 2**exp, m in [0.5, 1): the binade of a is exp - 1
    e = torch.clamp(exp - 1, min=spec.min_normal_exp)
    step = torch.ldexp(torch.ones_like(a), (e - spec.mbits).to(torch.int32))
    q = torch.round(a / step) * step  # torch.round: half to even
    q = torch.clamp(q, max=spec.max)
    if spec.has_inf:
        q = torch.where(torch.isinf(a), a, q)
    q = torch.where(torch.isnan(a), a, q)
    return torch.copysign(q, x)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The codes of a `bits`-bit integer: [-2^(b-1), 2^(b-1)-1] symmetric, [0, 2^b-1] asymmetric."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def round_int(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """`x` rounded half to even and clamped to the codes of a `bits`-bit integer (as float32)."""
    lo, hi = int_range(bits, symmetric)
    return torch.clamp(torch.round(x.float()), lo, hi)


def blocks(x: torch.Tensor, size: int, fill: float = math.nan) -> torch.Tensor:
    """[..., K] -> [..., ceil(K/size), size]; a shorter last block is padded with `fill`."""
    k = x.shape[-1]
    n = math.ceil(k / size)
    if n * size != k:
        x = torch.nn.functional.pad(x.float(), (0, n * size - k), value=fill)
    return x.reshape(*x.shape[:-1], n, size)


def unblocks(x: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `blocks`: [..., n, size] -> [..., k]."""
    return x.reshape(*x.shape[:-2], -1)[..., :k]


def nan_amax(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    return torch.where(torch.isnan(x), 0.0, x.abs()).amax(dim=dim, keepdim=keepdim)


def nan_min(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    return torch.where(torch.isnan(x), math.inf, x).amin(dim=dim, keepdim=keepdim)


def nan_max(x: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    return torch.where(torch.isnan(x), -math.inf, x).amax(dim=dim, keepdim=keepdim)


def e8m0(x: torch.Tensor) -> torch.Tensor:
    """The power of two `2^floor(log2 x)` (an e8m0 scale; 2^-127 for x == 0), as float32."""
    _, exp = torch.frexp(x.float())
    exp = torch.where(x > 0, exp - 1, torch.full_like(exp, -127)).clamp(-127, 127)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exp.to(torch.int32))


# --------------------------------------------------------------------------- bit patterns


def has_nan_code(spec: FloatSpec) -> bool:
    """Whether the all-ones exponent field is (partly) reserved: e5m2 keeps it for inf/NaN,
    e4m3fn keeps its all-ones code (S.1111.111) for NaN; the fp6/fp4 formats use every code."""
    top = 2.0 ** (2**spec.ebits - 1 - spec.bias) * (2 - 2.0**-spec.mbits)
    return spec.has_inf or spec.max < top


def encode_bits(x: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
    """The bit pattern `sign|exponent|mantissa` (1 + ebits + mbits bits, as int32) of each
    value of `x`, which must lie on `spec`'s grid (`round_float` output); exact. -0.0 keeps
    its sign bit; ±inf (e5m2) and NaN (fp8 only) get their IEEE / OCP codes.

        encode_bits(torch.tensor([1.5, -6.0]), FLOAT_SPECS["fp4e2m1"])   # tensor([3, 15])

    Raises `ValueError` naming a value that is not on the grid."""
    x = x.float()
    sign = torch.signbit(x).to(torch.int32)
    a = x.abs()
    finite = torch.isfinite(a)
    af = torch.where(finite, a, torch.zeros_like(a))
    _, exp = torch.frexp(af)  # af = m * 2**exp, m in [0.5, 1): the binade is exp - 1
    normal = (exp - 1 >= spec.min_normal_exp) & (af > 0)
    binade = torch.where(normal, exp - 1, torch.full_like(exp, spec.min_normal_exp))
    steps = torch.ldexp(af, (spec.mbits - binade).to(torch.int32))  # a / ulp: an integer on the grid
    mant = steps - torch.where(normal, 2.0**spec.mbits, 0.0)
    field = torch.where(normal, binade + spec.bias, torch.zeros_like(binade))
    emask, mmask = 2**spec.ebits - 1, 2**spec.mbits - 1
    if spec.has_inf:
        field = torch.where(torch.isinf(a), torch.full_like(field, emask), field)
        mant = torch.where(torch.isinf(a), torch.zeros_like(mant), mant)
    if has_nan_code(spec):
        field = torch.where(torch.isnan(a), torch.full_like(field, emask), field)
        mant = torch.where(torch.isnan(a), torch.full_like(mant, mmask), mant)
    bits = (sign << (spec.ebits + spec.mbits)) | (field.to(torch.int32) << spec.mbits) | mant.to(torch.int32)
    back = decode_bits(bits.clamp(0, 2 ** (1 + spec.ebits + spec.mbits) - 1), spec)
    bad = ~((back == x) | (torch.isnan(back) & torch.isnan(x))) | (steps != torch.floor(steps))
    if bool(bad.any()):
        v = float(x[bad].reshape(-1)[0])
        raise ValueError(
            f"value {v!r} is not on the grid of {_spec_name(spec)}; expected a value of round_float(x, spec)"
            f"{'' if has_nan_code(spec) else ' (this format has no NaN or infinity)'}"
        )
    return bits


def decode_bits(bits: torch.Tensor, spec: FloatSpec) -> torch.Tensor:
    """The float32 values of bit patterns `sign|exponent|mantissa` (integers in
    [0, 2^(1+ebits+mbits))): the inverse of `encode_bits`. Raises `ValueError` for a
    pattern out of range or a tensor that is not of an integer dtype."""
    n = 1 + spec.ebits + spec.mbits
    if bits.dtype.is_floating_point or bits.dtype.is_complex or bits.dtype == torch.bool:
        raise ValueError(f"bit patterns must be an integer tensor, got {bits.dtype}")
    b = bits.to(torch.int64)
    if b.numel() and (int(b.min()) < 0 or int(b.max()) >= 2**n):
        bad = int(b[(b < 0) | (b >= 2**n)].reshape(-1)[0])
        raise ValueError(f"bit pattern {bad} out of range for {_spec_name(spec)}: expected 0..{2**n - 1} ({n} bits)")
    emask, mmask = 2**spec.ebits - 1, 2**spec.mbits - 1
    sign = (b >> (spec.ebits + spec.mbits)) & 1
    field = (b >> spec.mbits) & emask
    mant = (b & mmask).float()
    subnormal = torch.ldexp(mant, torch.full_like(field, spec.min_normal_exp - spec.mbits).to(torch.int32))
    normal = torch.ldexp(mant + 2.0**spec.mbits, (field - spec.bias - spec.mbits).to(torch.int32))
    val = torch.where(field == 0, subnormal, normal)
    if spec.has_inf:
        val = torch.where(field == emask, torch.where(mant == 0, math.inf, math.nan), val)
    elif has_nan_code(spec):
        val = torch.where((field == emask) & (mant == mmask), math.nan, val)
    return torch.where(sign == 1, -val, val)


def _spec_name(spec: FloatSpec) -> str:
    return next((k for k, v in FLOAT_SPECS.items() if v == spec), str(spec))
