"""The storage convention of quantized activation values in the kernel backends, and the
conversions from and to the reference backend's form.

The reference backend holds the codes of a quantized value as float32 grid values
(`QTensor.codes`: the integer, or the element value of a float format). Generated kernels
read and write codes at run time (never packed) as:

    symmetric int{b}      torch.int8   the signed value, -2^(b-1) .. 2^(b-1)-1
    asymmetric int{b}     torch.uint8  the code, 0 .. 2^b-1
    float elements        torch.uint8  the bit pattern sign|exponent|mantissa (fp8e4m3, fp8e5m2,
                                       fp6e3m2, fp6e2m3, fp4e2m1; `mxc.ir.quant.encode_bits`)

Scales, zero points and global scales are float32 in both forms (no conversion). Packed
weights (int32 words, `mxc.ir.packing`) are read alike by both backends and never converted.

    s = to_storage(q.codes, fmt)         # int8 / uint8, exact
    from_storage(s, fmt)                 # float32, equal to q.codes (NaN codes stay NaN)

Both directions are exact and make no host synchronisation unless `check=True` (which
verifies that the input lies on the format's grid and raises ValueError naming the first
value that does not), so they may run inside a captured CUDA graph. Float formats go through
a table of the format's element values (at most 256 entries, built once per format and
device): decoding is a gather, encoding a binary search of |x| among the non-negative
values plus the sign bit.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..ir import FloatFormat, IntFormat, NumberFormat
from ..ir.quant import decode_bits, has_nan_code, int_range


def storage_dtype(fmt: NumberFormat) -> torch.dtype:
    """The torch dtype of `fmt`'s codes in storage: int8 for symmetric integers, else uint8."""
    return torch.int8 if isinstance(fmt, IntFormat) and fmt.symmetric else torch.uint8


@lru_cache(maxsize=64)
def _values(fmt: FloatFormat, device: torch.device) -> torch.Tensor:
    """float32 [2^bits]: the value of every bit pattern of `fmt`'s elements."""
    return decode_bits(torch.arange(2**fmt.bits, dtype=torch.int64), fmt.spec).to(device)


@lru_cache(maxsize=64)
def _magnitudes(fmt: FloatFormat, device: torch.device) -> tuple[torch.Tensor, int | None, int | None]:
    """The finite non-negative values of `fmt` in code order, the code of +inf and the code
    `encode_bits` gives NaN (all-ones exponent and mantissa; None when the format has no such
    code). For these formats the finite non-negative codes are 0..n-1 and ascend with the
    value (checked), so a code is the position of its value in the first."""
    half = _values(fmt, torch.device("cpu"))[: 2 ** (fmt.bits - 1)]
    finite = torch.isfinite(half)
    n = int(finite.sum())
    if not bool(finite[:n].all()) or not bool((half[:n].diff() > 0).all()):
        raise AssertionError(f"{fmt}: the finite non-negative codes are not 0..n-1 in ascending value order")
    inf = 2 ** (fmt.bits - 1) - 2**fmt.spec.mbits if fmt.spec.has_inf else None  # 0.11..1.00..0
    nan = 2 ** (fmt.bits - 1) - 1 if has_nan_code(fmt.spec) else None
    return half[:n].to(device), inf, nan


def to_storage(codes: torch.Tensor, fmt: NumberFormat, *, check: bool = False) -> torch.Tensor:
    """`codes` (float grid values of `fmt`, as `fmt.quantize(...).codes`) in the storage
    convention (see the module docstring). With `check`, a value off the grid raises."""
    if isinstance(fmt, IntFormat):
        lo, hi = int_range(fmt.bits, fmt.symmetric)
        if check:
            bad = (codes < lo) | (codes > hi) | (codes != torch.round(codes))  # NaN too
            if bool(bad.any()):
                raise ValueError(f"to_storage: {fmt} codes must be integers in [{lo}, {hi}], "
                                 f"got {codes[bad].flatten()[0].item()}")
        return codes.to(storage_dtype(fmt))
    if not isinstance(fmt, FloatFormat):
        raise TypeError(f"to_storage: expected a number format, got {fmt!r}")
    mags, inf, nan = _magnitudes(fmt, codes.device)
    x = codes.float()
    a = x.abs()
    bits = torch.searchsorted(mags, a.contiguous()).clamp_(max=len(mags) - 1)
    if inf is not None:
        bits = torch.where(torch.isinf(a), inf, bits)
    if nan is not None:
        bits = torch.where(torch.isnan(a), nan, bits)
    bits = bits | (torch.signbit(x).to(bits.dtype) << (fmt.bits - 1))
    out = bits.to(torch.uint8)
    if check:
        back = from_storage(out, fmt)
        bad = ~((back == x) & (torch.signbit(back) == torch.signbit(x)) | (torch.isnan(back) & torch.isnan(x)))
        if bool(bad.any()):
            raise ValueError(f"to_storage: value {x[bad].flatten()[0].item()!r} is not on the grid of {fmt}")
    return out


def from_storage(t: torch.Tensor, fmt: NumberFormat, *, check: bool = False) -> torch.Tensor:
    """Storage codes `t` of `fmt` as float32 grid values (the reference backend's form).
    With `check`, a tensor of the wrong dtype or a code out of range raises."""
    want = storage_dtype(fmt)
    if t.dtype != want:
        raise ValueError(f"from_storage: {fmt} codes are stored as {want}, got {t.dtype}")
    if isinstance(fmt, IntFormat):
        if check:
            lo, hi = int_range(fmt.bits, fmt.symmetric)
            bad = (t < lo) | (t > hi)
            if bool(bad.any()):
                raise ValueError(f"from_storage: {fmt} codes must lie in [{lo}, {hi}], got {t[bad].flatten()[0].item()}")
        return t.to(torch.float32)
    if not isinstance(fmt, FloatFormat):
        raise TypeError(f"from_storage: expected a number format, got {fmt!r}")
    if check and fmt.bits < 8 and bool((t >> fmt.bits).any()):  # a uint8 holds any 8-bit pattern
        raise ValueError(f"from_storage: {fmt} bit patterns have {fmt.bits} bits, got {t.max().item()}")
    return _values(fmt, t.device)[t.long()]
