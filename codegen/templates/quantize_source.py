"""Triton source for exact run-time quantization of rows into any activation / KV format.

A row kernel (`norm_quant`, `rope_kv`) computes float values of channels and quantizes
channel ranges of each row: dynamically (scales from the range's own values: per token, or
per group / microscaling block along the range) or statically (a given per-tensor scale).
This module writes the Triton source that does it, bit for bit as the reference numerics
(`mxc.ir.formats`: `fmt.quantize`, `fmt.encode`, `_store_scale`; `mxc.ir.quant`):

    out = QuantOut("out0", parse_format("int4<sym,g32>"), start=0, end=200)
    grid_source()           # the format-independent @triton.jit helpers
    format_source(out)      # _scale_out0 / _codes_out0 (/ _zero_out0) for this output
    block_source(out, {"codes": "q0_ptr", "scale": "s0_ptr"}, "_values(...)", 256)
                            # kernel-body lines: values, reductions, scales, codes, stores

Numerics (every step is one IEEE-rounded float32 operation, like torch on the CPU):

* scale = amax / qmax (`tl.math.div_rn`: correctly rounded, also compiled; plain `/` in
  compiled Triton is approximate), then rounded to its storage dtype exactly as
  `_store_scale` does: f16 and fp8e4m3 by `_round_grid` (nearest-even, saturating — the
  reference clamps f16 at 65504 first, which gives the same values), e8m0 by keeping the
  float32 exponent field; an all-zero block keeps scale 1.
* integer codes = round-half-even(v / scale [+ zero]) clamped, by `_rint` (1.5 * 2^23 added
  and subtracted: IEEE nearest-even, like torch.round; the value is clamped to the code
  range first, so |v| <= 2^22 always holds).
* float codes = `round_float(v / scale)` onto the element grid by `_round_grid` and their
  bit patterns (`encode_bits`) by `_grid_bits`: integer arithmetic on the float32 bits and
  products with powers of two, never a float8 cast (wrong in the interpreter).

Storage (the kernel-backend convention): codes of symmetric integers as int8 holding the
signed value, of asymmetric integers as uint8 holding 0..2^b-1, of float formats as uint8
holding the element's bit pattern; scales and zero points float32, one per row ([.., 1]) or
one per group ([.., ceil(width / g)]); static scales are the caller's [1, 1] tensors.

Not supported (`check_format` says so): per-channel scaling (weights only), global scales
(nvfp4's tensor-wide amax is a reduction over every row), and dynamic per-tensor scaling
(likewise); static scales exist only per tensor (`passes/quantize.py`). NaN inputs to a
dynamic quantize: the reference's amax skips them, the kernel's reductions do not (static
scales handle NaN and infinities as the reference does).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ...ir import FloatFormat, IntFormat, NumberFormat
from ...ir.quant import FLOAT_SPECS, FloatSpec, has_nan_code, int_range

#: Float grids scales are stored on (`_Format._store_scale`): f16 as an IEEE half with the
#: reference's clamp at 65504 (a saturating grid), fp8e4m3 as the element format.
SCALE_GRIDS = {"f16": FloatSpec(5, 10, 15, 65504.0), "fp8e4m3": FLOAT_SPECS["fp8e4m3"]}


def next_pow2(v: int) -> int:
    """The least power of two >= v (1 for v <= 1)."""
    return 1 << max(0, (v - 1).bit_length())


def check_format(fmt: NumberFormat, where: str, *, static_ok: bool) -> None:
    """Raise ValueError (prefixed by `where`) unless a row kernel can quantize into `fmt`:
    per token, group or block (dynamic), or per tensor with given scales when `static_ok`."""
    if not isinstance(fmt, (IntFormat, FloatFormat)):
        raise ValueError(f"{where}: expected a number format, got {fmt!r}")
    kind = fmt.scaling.kind
    if isinstance(fmt, FloatFormat) and fmt.global_:
        raise ValueError(
            f"{where}: {fmt} has a global scale from the amax of the whole tensor, a reduction over "
            "every row; a row kernel quantizes into token, group or block scaled formats without one"
        )
    if kind == "channel":
        raise ValueError(f"{where}: {fmt} scales per channel (weights only); activations scale per token, group or block")
    if kind == "tensor" and not static_ok:
        raise ValueError(
            f"{where}: {fmt} scales per tensor; computed at run time that is the amax of every row, which a "
            "row kernel does not see; use per-token, group or block scaling"
        )


@dataclass(frozen=True)
class QuantOut:
    """One quantized output of a row kernel: channels [start, end) of each row in `fmt`.
    `name` (e.g. "out0") names its helpers."""

    name: str
    fmt: NumberFormat
    start: int
    end: int

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def static(self) -> bool:
        """Per-tensor scales are given (static, from calibration), not computed."""
        return self.fmt.scaling.kind == "tensor"

    @property
    def has_zero(self) -> bool:
        return isinstance(self.fmt, IntFormat) and not self.fmt.symmetric

    @property
    def group(self) -> int | None:
        """Channels per scale when the range holds several groups / blocks, else None
        (one scale per row: per token, or a group at least as long as the range)."""
        g = self.fmt.scaling.size if self.fmt.scaling.kind in ("group", "block") else None
        return g if g is not None and g < self.width else None

    @property
    def n_scales(self) -> int:
        """Scales per row (the reference's last scale dim); 1 per row, or ceil(width / g)."""
        return -(-self.width // self.group) if self.group else 1

    @property
    def codes_dtype(self) -> str:
        """The storage dtype of the codes: "int8" (symmetric integers) or "uint8"."""
        return "int8" if isinstance(self.fmt, IntFormat) and self.fmt.symmetric else "uint8"


# --------------------------------------------------------------------------- helpers


def grid_source() -> str:
    """The format-independent `@triton.jit` helpers: `_rint`, `_round_grid`, `_grid_bits`, `_e8m0`."""
    return '''@triton.jit
def _rint(v):
    """Round half to even of float32 `v`, |v| <= 2^22 (callers clamp first): adding and
    subtracting 1.5 * 2^23 leaves the nearest integer under IEEE nearest-even rounding,
    exactly torch.round (libdevice's rint does not run in the interpreter)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _round_grid(v, MBITS: tl.constexpr, MIN_EXP: tl.constexpr, MAXV: tl.constexpr, HAS_INF: tl.constexpr):
    """`mxc.ir.quant.round_float`: float32 `v` rounded to the nearest value of the float grid
    with MBITS mantissa bits and smallest normal exponent MIN_EXP, ties to even, saturating
    at +-MAXV (an infinity stays one when HAS_INF), NaN kept, the sign kept (also of zero).
    Exact: the binade is v's float32 exponent field (at least MIN_EXP, where the grid is
    subnormal), and v / step and back are products with powers of two made from their bits."""
    a = tl.abs(v)
    e = (a.to(tl.int32, bitcast=True) >> 23) - 127
    e = tl.minimum(tl.maximum(e, MIN_EXP), 127)
    up = ((MBITS - e + 127) << 23).to(tl.float32, bitcast=True)  # 1 / step = 2^(MBITS - e)
    step = ((e - MBITS + 127) << 23).to(tl.float32, bitcast=True)  # the grid step of the binade
    q = tl.minimum(_rint(a * up) * step, MAXV)
    if HAS_INF:
        q = tl.where(a == float("inf"), a, q)
    q = tl.where(a != a, a, q)
    return tl.where(v.to(tl.int32, bitcast=True) < 0, -q, q)


@triton.jit
def _grid_bits(q, EBITS: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, SUB_SCALE: tl.constexpr,
               HAS_INF: tl.constexpr, NAN_CODE: tl.constexpr):
    """`mxc.ir.quant.encode_bits`: the bit pattern sign|exponent(EBITS)|mantissa(MBITS), as
    int32, of grid values `q` (`_round_grid` output). A normal element takes its exponent
    and mantissa from q's float32 fields; a subnormal one (exponent field 0) has mantissa
    q * SUB_SCALE = q / 2^(1 - BIAS - MBITS), an exact integer. Infinity (HAS_INF) and NaN
    (NAN_CODE: the format reserves the all-ones code) get their IEEE / OCP codes."""
    a = tl.abs(q)
    bits = a.to(tl.int32, bitcast=True)
    binade = (bits >> 23) - 127
    normal = binade >= 1 - BIAS
    field = tl.where(normal, binade + BIAS, 0)
    sub = (tl.where(normal, 0.0, a) * SUB_SCALE).to(tl.int32)
    mant = tl.where(normal, (bits >> (23 - MBITS)) & ((1 << MBITS) - 1), sub)
    if HAS_INF:
        inf = a == float("inf")
        field = tl.where(inf, (1 << EBITS) - 1, field)
        mant = tl.where(inf, 0, mant)
    if NAN_CODE:
        nan = a != a
        field = tl.where(nan, (1 << EBITS) - 1, field)
        mant = tl.where(nan, (1 << MBITS) - 1, mant)
    sign = (q.to(tl.int32, bitcast=True) < 0).to(tl.int32)
    return (sign << (EBITS + MBITS)) | (field << MBITS) | mant


@triton.jit
def _e8m0(s):
    """`mxc.ir.quant.e8m0` of float32 s >= 0: 2^floor(log2 s), i.e. s with its mantissa
    cleared; 2^-127 for 0 and for subnormal s (the reference clamps the exponent at -127)."""
    bits = s.to(tl.int32, bitcast=True)
    return tl.where((bits >> 23) > 0, bits & 2139095040, 4194304).to(tl.float32, bitcast=True)
'''


def _grid_args(spec: FloatSpec) -> str:
    """The constexpr arguments of `_round_grid` for a float grid."""
    return f"{spec.mbits}, {1 - spec.bias}, {spec.max!r}, {spec.has_inf}"


def _store_scale(fmt: NumberFormat) -> tuple[str, str]:
    """(statement, what it does) that rounds `s` to the format's scale storage dtype."""
    dtype = fmt.scaling.scale
    if dtype == "f32":
        return "", "kept in float32"
    if dtype == "e8m0":
        return "    s = _e8m0(s)\n", "rounded down to a power of two (e8m0)"
    return f"    s = _round_grid(s, {_grid_args(SCALE_GRIDS[dtype])})\n", f"rounded to {dtype} (nearest even, saturating)"


def format_source(out: QuantOut) -> str:
    """The `@triton.jit` helpers of one output, named after `out.name`:

    - `_codes_NAME(v, scale, zero)`: the stored codes of float32 values `v`, given their
      block's scale (and zero point; unused by symmetric and float formats);
    - dynamic outputs also `_scale_NAME(amax)` (symmetric integers, float formats) or
      `_scale_NAME(lo, hi)` and `_zero_NAME(lo, scale)` (asymmetric integers): the scale as
      stored (and the zero point) of a block from its values' reductions."""
    fmt, name = out.fmt, out.name
    store, stored = _store_scale(fmt)
    parts = []
    if isinstance(fmt, IntFormat) and fmt.symmetric:
        lo, hi = int_range(fmt.bits, True)
        if not out.static:
            parts.append(f'''@triton.jit
def _scale_{name}(amax):
    """{fmt} scale of a block: amax / {hi} (IEEE-rounded), {stored}; 1 for an all-zero block."""
    s = tl.math.div_rn(amax, {float(hi)!r})
{store}    return tl.where(s > 0, s, 1.0)
''')
        parts.append(f'''@triton.jit
def _codes_{name}(v, scale, zero):
    """{fmt} codes: round-half-even(v / scale) clamped to [{lo}, {hi}], as int8. `zero` is unused."""
    q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), {float(lo)!r}), {float(hi)!r})
    return _rint(q).to(tl.int8)
''')
    elif isinstance(fmt, IntFormat):
        qmax = 2**fmt.bits - 1
        if not out.static:
            parts.append(f'''@triton.jit
def _scale_{name}(lo, hi):
    """{fmt} scale of a block from its range [lo, hi] (lo <= 0 <= hi): (hi - lo) / {qmax}
    (IEEE-rounded), {stored}; 1 for an all-zero block."""
    s = tl.math.div_rn(hi - lo, {float(qmax)!r})
{store}    return tl.where(s > 0, s, 1.0)


@triton.jit
def _zero_{name}(lo, scale):
    """{fmt} zero point: round-half-even(-lo / scale) clamped to [0, {qmax}] (a float code)."""
    return _rint(tl.minimum(tl.maximum(tl.math.div_rn(-lo, scale), 0.0), {float(qmax)!r}))
''')
        parts.append(f'''@triton.jit
def _codes_{name}(v, scale, zero):
    """{fmt} codes: round-half-even(v / scale + zero) clamped to [0, {qmax}], as uint8."""
    q = tl.minimum(tl.maximum(tl.math.div_rn(v, scale) + zero, 0.0), {float(qmax)!r})
    return _rint(q).to(tl.uint8)
''')
    else:
        spec: FloatSpec = fmt.spec
        if not out.static:
            # OCP MX (e8m0 scales) puts the block's largest value in the top binade.
            emax = 2.0 ** math.floor(math.log2(spec.max)) if fmt.scaling.scale == "e8m0" else spec.max
            parts.append(f'''@triton.jit
def _scale_{name}(amax):
    """{fmt} scale of a block: amax / {emax!r} (IEEE-rounded), {stored}; 1 for an all-zero block."""
    s = tl.math.div_rn(amax, {emax!r})
{store}    return tl.where(s > 0, s, 1.0)
''')
        sub_scale = 2.0 ** (spec.mbits - (1 - spec.bias))
        parts.append(f'''@triton.jit
def _codes_{name}(v, scale, zero):
    """{fmt} codes: the bit patterns (uint8) of round_float(v / scale) on the {fmt.name} grid
    (nearest even, saturating at {spec.max!r}). `zero` is unused."""
    q = _round_grid(tl.math.div_rn(v, scale), {_grid_args(spec)})
    return _grid_bits(q, {spec.ebits}, {spec.mbits}, {spec.bias}, {sub_scale!r}, {spec.has_inf}, {has_nan_code(spec)}).to(tl.uint8)
''')
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- kernel body


def _plus(start: int, term: str) -> str:
    """`start + term` without a `0 + `."""
    return f"{start} + {term}" if start else term


def _minus(term: str, start: int) -> str:
    """`(term - start)` without a `- 0`."""
    return f"({term} - {start})" if start else term


def _indent(lines: list[str], prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line else "" for line in lines)


#: The block-local variables of `block_source`, renamed per output (`scale` -> `scale0`):
#: compiled Triton keeps one type per name across a loop, and blocks differ in shapes.
_LOCALS = re.compile(r"\b(ch|cmask|m|v|scale|zero|lo|hi|amax|gi|j|smask)\b")


def _own_names(lines: list[str], tag: str) -> list[str]:
    """`lines` with the block-local variables suffixed by `tag` (comments untouched)."""
    out = []
    for line in lines:
        code, sep, note = line.partition("  # ")
        if code.lstrip().startswith("#"):
            out.append(line)
        else:
            out.append(_LOCALS.sub(lambda mt: mt[1] + tag, code) + sep + note)
    return out


def block_source(out: QuantOut, ptrs: dict[str, str], value: str, block_d: int) -> str:
    """Kernel-body lines (indented for a kernel body) that quantize channels
    [out.start, out.end) of each row of the program's tile and store codes, scales (and zero
    points) through the pointers `ptrs` ("codes", "scale", "zero": kernel argument names).

    The kernel provides `rows` (int64 [ROWS], the tile's row indices), `row_mask` ([ROWS])
    and `ROWS`. `value` is a call returning the float32 values of channel positions `{ch}`
    (int [1, C] or [1, GB, GP]) where `{cmask}` is on, for the rows where `{rmask}` is on;
    `{r}` is the suffix that shapes a per-row tensor like them (`[:, None]`, `[:, None, None]`).
    Chunks of the range are at most `block_d` channels (a power of two); a range that fits in
    one chunk is read once, a longer one twice (reductions, then codes)."""
    s, e, w = out.start, out.end, out.width
    name = out.name
    tag = re.sub(r"^\D*", "", name) or "_" + name
    head = f"# {name}: {out.fmt} codes of channels [{s}, {e})"
    codes, scale, zero = ptrs["codes"], ptrs["scale"], ptrs.get("zero")
    lines: list[str] = []

    def val(ch: str, cmask: str, rmask: str, r: str) -> str:
        return value.format(ch=ch, cmask=cmask, rmask=rmask, r=r)

    if out.static:
        chunk = min(next_pow2(w), block_d)
        lines += [head + ", static per-tensor scale" + (" and zero point" if out.has_zero else "")]
        lines += [f"scale = tl.load({scale}).to(tl.float32)"]
        lines += [f"zero = tl.load({zero}).to(tl.float32)" if out.has_zero else "zero = 0.0"]
        loop = w > chunk
        body = [
            f"ch = ({'c0 + ' if loop else (f'{s} + ' if s else '')}tl.arange(0, {chunk}))[None, :]",
            f"cmask = ch < {e}",
            f"v = {val('ch', 'cmask', 'row_mask[:, None]', '[:, None]')}",
            f"tl.store({codes} + rows[:, None] * {w} + {_minus('ch', s)}, _codes_{name}(v, scale, zero),",
            "         mask=row_mask[:, None] & cmask)",
        ]
        lines += [f"for c0 in range({s}, {e}, {chunk}):", *["    " + b for b in body]] if loop else body
        return _indent(_own_names(lines, tag))

    if out.group is None:
        chunk = min(next_pow2(w), block_d)
        loop = w > chunk
        lines += [head + ", one scale per row"]
        load = [
            f"ch = ({'c0 + ' if loop else (f'{s} + ' if s else '')}tl.arange(0, {chunk}))[None, :]",
            f"cmask = ch < {e}",
            f"m = row_mask[:, None] & cmask",
            f"v = tl.where(m, {val('ch', 'cmask', 'row_mask[:, None]', '[:, None]')}, 0.0)",
        ]
        if out.has_zero:
            reduce_ = [
                "lo = tl.minimum(lo, tl.min(v, axis=1))",
                "hi = tl.maximum(hi, tl.max(v, axis=1))",
            ]
            init = ["lo = tl.zeros([ROWS], dtype=tl.float32)  # the range always holds 0",
                    "hi = tl.zeros([ROWS], dtype=tl.float32)"]
            params = [f"scale = _scale_{name}(lo, hi)", f"zero = _zero_{name}(lo, scale)"]
        else:
            reduce_ = ["amax = tl.maximum(amax, tl.max(tl.abs(v), axis=1))"]
            init = ["amax = tl.zeros([ROWS], dtype=tl.float32)"]
            params = [f"scale = _scale_{name}(amax)"]
        stores = [f"tl.store({scale} + rows, scale, mask=row_mask)"]
        if out.has_zero:
            stores.append(f"tl.store({zero} + rows, zero, mask=row_mask)")
        zero_arg = "zero[:, None]" if out.has_zero else "0.0"
        put = [
            f"tl.store({codes} + rows[:, None] * {w} + {_minus('ch', s)}, _codes_{name}(v, scale[:, None], {zero_arg}), mask=m)",
        ]
        if not loop:
            lines += init + load + reduce_ + params + stores + put
        else:
            lines += init + [f"for c0 in range({s}, {e}, {chunk}):"] + ["    " + x for x in load + reduce_]
            lines += params + stores
            lines += [f"for c0 in range({s}, {e}, {chunk}):"] + ["    " + x for x in load + put]
        return _indent(_own_names(lines, tag))

    g = out.group
    lanes = next_pow2(g)
    n = out.n_scales
    per_step = min(max(1, block_d // lanes), next_pow2(n))
    loop = n > per_step
    lines += [head + f", one scale per group of {g} ({n} groups; {per_step} per step, {lanes} lanes each)"]
    body = [
        f"gi = {'g0 + ' if loop else ''}tl.arange(0, {per_step})",
        f"j = tl.arange(0, {lanes})[None, None, :]",
        f"ch = {_plus(s, f'gi[None, :, None] * {g} + j')}",
        f"cmask = (j < {g}) & (ch < {e})",
        "m = row_mask[:, None, None] & cmask",
        f"v = tl.where(m, {val('ch', 'cmask', 'row_mask[:, None, None]', '[:, None, None]')}, 0.0)",
    ]
    if out.has_zero:
        body += [
            "lo = tl.minimum(tl.min(v, axis=2), 0.0)",
            "hi = tl.maximum(tl.max(v, axis=2), 0.0)",
            f"scale = _scale_{name}(lo, hi)",
            f"zero = _zero_{name}(lo, scale)",
        ]
    else:
        body += [f"scale = _scale_{name}(tl.max(tl.abs(v), axis=2))"]
    body += [
        f"smask = row_mask[:, None] & (gi < {n})[None, :]",
        f"tl.store({scale} + rows[:, None] * {n} + gi[None, :], scale, mask=smask)",
    ]
    if out.has_zero:
        body.append(f"tl.store({zero} + rows[:, None] * {n} + gi[None, :], zero, mask=smask)")
    body.append(
        f"tl.store({codes} + rows[:, None, None] * {w} + {_minus('ch', s)}, "
        f"_codes_{name}(v, scale[:, :, None], {'zero[:, :, None]' if out.has_zero else '0.0'}), mask=m)"
    )
    lines += [f"for g0 in range(0, {n}, {per_step}):"] + ["    " + b for b in body] if loop else body
    return _indent(_own_names(lines, tag))


def outputs_table(outs: list[QuantOut]) -> str:
    """The generated module's `QUANT_OUTPUTS`: one dict per quantized output, read by `launch`."""
    rows = []
    for o in outs:
        rows.append(
            f"    dict(name={o.name!r}, format={str(o.fmt)!r}, start={o.start}, end={o.end}, "
            f"codes=torch.{o.codes_dtype}, n_scales={o.n_scales}, zero={o.has_zero}, static={o.static}),"
        )
    return "[\n" + "\n".join(rows) + "\n]" if rows else "[]"
