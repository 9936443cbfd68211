"""Triton source snippets shared by the templates: reading packed codes, decoding number
format elements, the fused epilogue, the constants block and the split-K GEMM pieces (the
kernel's output store, the reduce kernel, the `CONFIGS` table, the epilogue operand checks).

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

from ..spec import Tiles

#: The source text of the float dtypes the templates read and write, by spec dtype name.
TORCH_DTYPES = {"f16": "torch.float16", "f32": "torch.float32"}
TL_DTYPES = {"f16": "tl.float16", "f32": "tl.float32"}


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive integers."""
    return -(-a // b)


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
    return items + [("EBITS", s.ebits, f"{fmt.name}: exponent bits"), *float_constants(s, fmt.name)]


def float_constants(s: FloatSpec, what: str, prefix: str = "") -> list[tuple[str, Any, str]]:
    """The constants `float_values_source(s, prefix)` reads, each name prefixed by `prefix`
    (a kernel decoding two float formats tells them apart: "" for the weight, "X_" for the
    activation); `what` names the format in the comments."""
    return [
        (f"{prefix}MBITS", s.mbits, f"{what}: mantissa bits"),
        (f"{prefix}EXP_BIAS", s.bias, f"{what}: exponent bias"),
        (f"{prefix}EXP_MASK", (1 << s.ebits) - 1, "all-ones exponent field"),
        (f"{prefix}MAN_MASK", (1 << s.mbits) - 1, "all-ones mantissa field"),
        (f"{prefix}HIDDEN_BIT", 1 << s.mbits, "the implicit leading 1 of a normal significand"),
        (f"{prefix}SIGN_SHIFT", s.ebits + s.mbits, "the sign bit's position"),
    ]


def float_values_source(s: FloatSpec, prefix: str = "") -> str:
    """The body lines (indented for a `@triton.jit` function, ending in `return`) that turn
    int32 bit patterns `codes` of a float element of spec `s` into their float32 values,
    exactly: |value| = significand * 2^(max(e, 1) - EXP_BIAS - MBITS), the power of two
    assembled as float32 bits, then the format's specials. Reads `float_constants(s, ..., prefix)`."""
    p = prefix
    if s.has_inf:
        special = f"""
    # IEEE-style specials: the all-ones exponent is infinity (mantissa 0) or NaN.
    value = tl.where(exponent == {p}EXP_MASK, tl.where(mantissa == 0, float("inf"), float("nan")), value)"""
    elif has_nan_code(s):
        special = f"""
    # OCP 'fn' format: only S.1111.111 is NaN; every other code is finite.
    value = tl.where((exponent == {p}EXP_MASK) & (mantissa == {p}MAN_MASK), float("nan"), value)"""
    else:
        special = "\n    # Every code is finite: this format has no infinity and no NaN."
    return f"""    sign = (codes >> {p}SIGN_SHIFT) & 1
    exponent = (codes >> {p}MBITS) & {p}EXP_MASK
    mantissa = codes & {p}MAN_MASK
    significand = tl.where(exponent > 0, mantissa + {p}HIDDEN_BIT, mantissa)
    pow2 = ((tl.maximum(exponent, 1) - {p}EXP_BIAS - {p}MBITS + 127) << 23).to(tl.float32, bitcast=True)
    value = significand.to(tl.float32) * pow2{special}
    return tl.where(sign != 0, -value, value)
"""


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
    return f'''@triton.jit
def _decode(codes, zero):
    """{fmt.name} elements from their bit patterns sign|exponent({s.ebits})|mantissa({s.mbits}), exactly:
    |value| = significand * 2^(max(e, 1) - EXP_BIAS - MBITS), significand = mantissa (+ HIDDEN_BIT
    when e > 0; e == 0 is subnormal). The power of two is assembled as float32 bits (biased
    exponent field, zero mantissa) and the product is exact. `zero` is unused."""
{float_values_source(s)}'''


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


# ---------------------------------------------------------------- split-K GEMM pieces
# The GEMM templates (dequant_gemm, qgemm) end their kernel alike and share the reduce kernel:
# a program computes the float32 tile `acc` of y over its split of K; with one split it
# applies the epilogue and stores y, otherwise it stores `acc` to part[pid_k] (a float32
# [SPLIT_K, M, N] workspace) and `splitk_reduce_kernel` sums the splits and applies it.


def gemm_tail_source(steps: tuple[str, ...], out_tl: str) -> str:
    """The last lines of a split-K GEMM kernel's body (indented for it): the epilogue and the
    store of y (`out_tl` elements), or the store of the partial sum. The kernel has `acc`,
    `offs_m`, `offs_n`, `m_mask`, `n_mask`, `pid_k`, `M` and the arguments `bias_ptr`,
    `res_ptr`, `out_ptr`, `part_ptr`, `stride_rm`, `stride_rn`, `stride_om`, `stride_on`
    (plus `epilogue_params(steps)`)."""
    return f"""    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        acc = _epilogue(acc, offs_m, offs_n, mask, bias_ptr, res_ptr, stride_rm, stride_rn{epilogue_params(steps)})
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to({out_tl}), mask=mask)
    else:
        rows = pid_k.to(tl.int64) * M + offs_m[:, None]
        tl.store(part_ptr + rows * N + offs_n[None, :], acc, mask=mask)"""


def splitk_reduce_source(steps: tuple[str, ...], out_tl: str) -> str:
    """`splitk_reduce_kernel`: y = epilogue(the sum of the SPLIT_K partial sums, in split
    order: deterministic), stored as `out_tl`. `mxc.codegen.templates.launch.reduce_splitk`
    launches it."""
    return f'''@triton.jit
def splitk_reduce_kernel(
    part_ptr, bias_ptr, res_ptr, mul_ptr, out_ptr, M, stride_rm, stride_rn, stride_mm, stride_mn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """y tile (pid_m, pid_n) = epilogue(sum of the SPLIT_K partial sums), summed in split order."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in range(0, SPLIT_K):
        rows = split * M + offs_m[:, None].to(tl.int64)
        acc += tl.load(part_ptr + rows * N + offs_n[None, :], mask=mask, other=0.0)
    acc = _epilogue(acc, offs_m, offs_n, mask, bias_ptr, res_ptr, stride_rm, stride_rn{epilogue_params(steps)})
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to({out_tl}), mask=mask)'''


def configs_source(rows: list[tuple[Tiles, dict[str, Any]]]) -> str:
    """The generated module's `CONFIGS` table: per M class, a tile configuration with the
    template's own loop parameters (`extra`, after SPLIT_K) for each `(tiles, extra)`."""
    lines = []
    for t, extra in rows:
        more = "".join(f"{k}={v!r}, " for k, v in extra.items())
        lines.append(
            f"    dict(MAX_M={t.max_m!r}, BLOCK_M={t.block_m}, BLOCK_N={t.block_n}, BLOCK_K={t.block_k}, "
            f"SPLIT_K={t.split_k}, {more}num_warps={t.num_warps}, num_stages={t.num_stages}),"
        )
    return "\n".join([
        "#: Tile configurations by M class: the first whose MAX_M >= M (None: any M) runs.",
        "CONFIGS = [", *lines, "]",
    ])


def epilogue_checks(steps: tuple[str, ...], n: int) -> list[str]:
    """`launch` lines checking the epilogue's operands (`bias`, `residual`, `multiplier`):
    each is required with its step and refused without it. `lead` is y's leading shape."""
    return [
        f'expect(KERNEL, "bias", bias, ({n},), FLOATS, dev)'
        if "bias" in steps else 'expect_none(KERNEL, "bias", bias, "the epilogue has no bias")',
        f'expect(KERNEL, "residual", residual, (*lead, {n}), FLOATS, dev)'
        if "residual" in steps else 'expect_none(KERNEL, "residual", residual, "the epilogue has no residual")',
        f'expect(KERNEL, "multiplier", multiplier, (*lead, {n}), FLOATS, dev)'
        if "mul" in steps else 'expect_none(KERNEL, "multiplier", multiplier, "the epilogue has no mul")',
    ]
