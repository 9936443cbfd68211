"""Triton source snippets shared by the templates: reading packed codes, decoding number
format elements, the fused epilogue and the constants block.

Each function returns the source text of one `@triton.jit` helper (or block) specialised to
its parameters, so a generated module holds only the code its spec needs: a 4-bit weight
has no straddling-word load, a symmetric integer no zero point, a float format its own bit
layout. The helpers read the module's `tl.constexpr` globals (`BITS`, `CODE_MASK`, `N`, ...)
that `constants` declares; every decode is exact (integer bit arithmetic and products with
powers of two), never a float8 / bfloat16 cast.
"""

from __future__ import annotations

import textwrap
from typing import Any

from ...ir import IntFormat, NumberFormat
from ...ir.quant import FloatSpec, has_nan_code


def constants(items: list[tuple[str, Any, str]]) -> str:
    """`NAME = tl.constexpr(value)  # what it is` lines (Triton kernels may read module
    globals only when they are `tl.constexpr`)."""
    width = max(len(f"{name} = tl.constexpr({value!r})") for name, value, _ in items)
    return "\n".join(f"{f'{name} = tl.constexpr({value!r})':<{width}}  # {doc}" for name, value, doc in items)


def code_constants(fmt: NumberFormat) -> list[tuple[str, Any, str]]:
    """The constants `load_codes_source` and `decode_source` read for elements of `fmt`."""
    items: list[tuple[str, Any, str]] = [
        ("BITS", fmt.bits, "bits per element in the packed stream"),
        ("CODE_MASK", (1 << fmt.bits) - 1, "the low BITS bits"),
    ]
    if isinstance(fmt, IntFormat):
        if fmt.symmetric:
            items.append(("CODE_OFFSET", 1 << (fmt.bits - 1), "symmetric codes store value + 2^(BITS-1)"))
        return items
    s: FloatSpec = fmt.spec
    return items + [
        ("EBITS", s.ebits, f"{fmt.name}: exponent bits"),
        ("MBITS", s.mbits, f"{fmt.name}: mantissa bits"),
        ("EXP_BIAS", s.bias, f"{fmt.name}: exponent bias"),
        ("EXP_MASK", (1 << s.ebits) - 1, "all-ones exponent field"),
        ("MAN_MASK", (1 << s.mbits) - 1, "all-ones mantissa field"),
        ("HIDDEN_BIT", 1 << s.mbits, "the implicit leading 1 of a normal significand"),
        ("SIGN_SHIFT", s.ebits + s.mbits, "the sign bit's position"),
    ]


def load_codes_source(bits: int) -> str:
    """`_load_codes(row_ptrs, offs_k, mask)`: the codes of elements `offs_k` of packed rows.
    Rows are dense little-endian bit streams of int32 words (`mxc.ir.packing`); a width that
    does not divide 32 (3, 5, 6, 7) straddles words and needs the next word's low bits."""
    straddle = 32 % bits != 0
    spill = (
        """
    # A field that crosses a word boundary takes its high bits from the next word's low bits.
    spill = mask & (shift > 32 - BITS)
    high = tl.load(row_ptrs + word + 1, mask=spill, other=0).to(tl.uint32, bitcast=True)
    codes = codes | tl.where(spill, high << ((32 - shift) & 31), 0)"""
        if straddle
        else "\n    # BITS divides 32: no field crosses a word boundary."
    )
    return f'''@triton.jit
def _load_codes(row_ptrs, offs_k, mask):
    """The BITS-bit codes of elements `offs_k` ([BLOCK_K, 1]) of the packed rows whose first
    words are at `row_ptrs` ([1, BLOCK_N]), as int32 [BLOCK_K, BLOCK_N] (0 where `mask` is off).
    Element i of a row is stream bits [i*BITS, (i+1)*BITS): word (i*BITS) // 32, shift (i*BITS) % 32."""
    bit = offs_k * BITS
    word = bit // 32
    shift = (bit % 32).to(tl.uint32)
    codes = tl.load(row_ptrs + word, mask=mask, other=0).to(tl.uint32, bitcast=True) >> shift{spill}
    return (codes & CODE_MASK).to(tl.int32)
'''


def decode_source(fmt: NumberFormat) -> str:
    """`_decode(codes, zero)`: float32 element values of int32 codes of `fmt`, exactly as
    `mxc.ir.packing.from_codes` gives them (before scaling). `zero` is the zero point
    (float32, broadcastable to the codes) of asymmetric integers, unused otherwise."""
    if isinstance(fmt, IntFormat):
        if fmt.symmetric:
            body = f'''    """{fmt.name} symmetric elements: code - CODE_OFFSET (exact in float32). `zero` is unused."""
    return (codes - CODE_OFFSET).to(tl.float32)'''
        else:
            body = f'''    """{fmt.name} asymmetric elements: code - zero point (integers, exact in float32)."""
    return codes.to(tl.float32) - zero'''
        return f"@triton.jit\ndef _decode(codes, zero):\n{body}\n"
    s = fmt.spec
    special = ""
    if s.has_inf:
        special = """
    # IEEE-style specials: the all-ones exponent is infinity (mantissa 0) or NaN.
    value = tl.where(exponent == EXP_MASK, tl.where(mantissa == 0, float("inf"), float("nan")), value)"""
    elif has_nan_code(s):
        special = """
    # OCP 'fn' format: only S.1111.111 is NaN; every other code is finite.
    value = tl.where((exponent == EXP_MASK) & (mantissa == MAN_MASK), float("nan"), value)"""
    else:
        special = "\n    # Every code is finite: this format has no infinity and no NaN."
    return f'''@triton.jit
def _decode(codes, zero):
    """{fmt.name} elements from their bit patterns sign|exponent({s.ebits})|mantissa({s.mbits}), exactly:
    |value| = significand * 2^(max(e, 1) - EXP_BIAS - MBITS), significand = mantissa (+ HIDDEN_BIT
    when e > 0; e == 0 is subnormal). The power of two is assembled as float32 bits (biased
    exponent field, zero mantissa) and the product is exact. `zero` is unused."""
    sign = (codes >> SIGN_SHIFT) & 1
    exponent = (codes >> MBITS) & EXP_MASK
    mantissa = codes & MAN_MASK
    significand = tl.where(exponent > 0, mantissa + HIDDEN_BIT, mantissa)
    pow2 = ((tl.maximum(exponent, 1) - EXP_BIAS - MBITS + 127) << 23).to(tl.float32, bitcast=True)
    value = significand.to(tl.float32) * pow2{special}
    return tl.where(sign != 0, -value, value)
'''


#: The code of each epilogue step (one or a few lines), on `acc` (float32 [BLOCK_M, BLOCK_N]).
EPILOGUE_CODE = {
    "bias": "acc = acc + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]",
    # sigmoid from exp(-|x|) <= 1: no overflow for large |x|
    "silu": "e = tl.exp(-tl.abs(acc))\nacc = acc * tl.where(acc >= 0, 1.0 / (1.0 + e), e / (1.0 + e))",
    "gelu": "acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))",
    # tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|) <= 1, u = sqrt(2/pi) (x + 0.044715 x^3)
    "gelu_tanh": (
        "u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)\n"
        "e = tl.exp(-2.0 * tl.abs(u))\n"
        "t = (1.0 - e) / (1.0 + e)\n"
        "acc = 0.5 * acc * (1.0 + tl.where(u >= 0, t, -t))"
    ),
    "residual": (
        "acc = acc + tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, "
        "mask=mask, other=0.0).to(tl.float32)"
    ),
    "mul": (
        "acc = acc * tl.load(mul_ptr + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn, "
        "mask=mask, other=0.0).to(tl.float32)"
    ),
}
#: The `_epilogue` parameters a step needs beyond the fixed ones, appended in this order.
EPILOGUE_PARAMS = {"mul": ("mul_ptr", "stride_mm", "stride_mn")}


def epilogue_params(steps: tuple[str, ...]) -> str:
    """The `_epilogue` parameters after `stride_rn` that `steps` need, each after ", "
    ("" when none does): a template appends this text to its `_epilogue(...)` calls, whose
    kernels name those arguments alike (today only "mul": `mul_ptr, stride_mm, stride_mn`)."""
    return "".join(f", {p}" for s in steps for p in EPILOGUE_PARAMS.get(s, ()))


def epilogue_source(steps: tuple[str, ...]) -> str:
    """`_epilogue(acc, offs_m, offs_n, mask, bias_ptr, res_ptr, stride_rm, stride_rn)` (plus
    `epilogue_params(steps)`): the fused steps in order on the float32 accumulator tile
    (reads the global `N`)."""
    what = ", then ".join(steps) if steps else "nothing (no fused epilogue)"
    lines = "\n".join(indent(EPILOGUE_CODE[s]) for s in steps)
    return f'''@triton.jit
def _epilogue(acc, offs_m, offs_n, mask, bias_ptr, res_ptr, stride_rm, stride_rn{epilogue_params(steps)}):
    """The fused epilogue on the float32 accumulator [BLOCK_M, BLOCK_N]: {what}."""
{lines + chr(10) if lines else ""}    return acc
'''


def indent(text: str, prefix: str = "    ") -> str:
    """`text` indented by `prefix` (blank lines stay blank)."""
    return textwrap.indent(text, prefix)
