"""The fused rotary-embedding + KV-cache-quantize template (family "rope_kv").

For x [b, h, s, d] (fewer leading dims are taken as size 1) and cos / sin broadcastable to it:

    y = x * cos + rotate_half(x) * sin    # rotate_half(x) = cat(-x[..., d//2:], x[..., :d//2])
    y                                     # optional float output (x's dtype)
    for each format k: codes_k, scale_k[, zero_k] = quantize(y, fmt_k)   # along d

one program per block of ROWS rows (b*h*s rows of d channels). The formats scale per token
(one scale per (b, h, s) row: "per head and token"), per group or per microscaling block of
d; int4<asym,token> keeps zero points.

    spec = rope_kv.spec(128, ["int8<sym,token>"])
    k_codes, k_scale = load(spec).launch(k, cos, sin)

Numerics (the reference is `runtime/reference.py::_rope`, then `fmt.quantize`): bit for bit.
y is computed with the reference's operations in its order (x * cos, rotated * sin, their
sum), each IEEE-rounded; for f16 x each is rounded to float16, as torch does on the CPU
(an fp32 product or sum of f16 values rounded once to f16 is the f16 operation: fp32 has
more than 2 * 11 + 2 bits). Mul-add contraction is off (`enable_fp_fusion=False`), so a
compiled GPU kernel rounds the same way. The quantization is exact (`quantize_source`).

The tiles (one configuration): `block_m` rows per program, `block_n` channels per chunk (a
power of two; longer rows are read in a loop), `block_k` unused.
"""

from __future__ import annotations

from string import Template
from typing import Sequence

from ...ir import NumberFormat

from ..spec import KernelSpec, Tiles
from .quantize_source import QuantOut, check_format
from .rows import check_row_spec, float_block, module_fields, quant_blocks, row_tiles

FAMILY = "rope_kv"


def spec(
    d: int,
    formats: Sequence[NumberFormat | str] = (),
    *,
    float_out: bool = False,
    x_dtype: str = "f32",
    tiles: tuple[Tiles, ...] | None = None,
) -> KernelSpec:
    """The spec of a rope_kv kernel over rows of `d` channels: the rotary embedding, quantized
    into each of `formats` ("out0", "out1", ...; each over the whole row), and the float
    result too when `float_out`."""
    s = KernelSpec(FAMILY, {"d": d}, {f"out{i}": f for i, f in enumerate(formats)}, {}, {"x": x_dtype}, (),
                   tiles if tiles is not None else row_tiles(d), {"float_out": bool(float_out)})
    check(s)
    return s


def quant_outputs(spec: KernelSpec) -> list[QuantOut]:
    """The quantized outputs of `spec`, in order: each the whole row."""
    d = spec.dim("d")
    return [QuantOut(f"out{i}", spec.fmt(f"out{i}"), 0, d) for i in range(len(spec.formats))]


def check(spec: KernelSpec) -> None:
    """Raise ValueError naming what this template cannot generate for `spec`."""
    check_row_spec(spec, FAMILY, ("float_out",), ("float_out",), "a format or float_out")
    if spec.dim("d") < 2:
        raise ValueError(f"{spec}: rope rotates halves of the last dim; d must be >= 2, got {spec.dim('d')}")
    for role, fmt in spec.formats:
        check_format(fmt, f"{spec}: {role}", static_ok=False)


def _values_source(spec: KernelSpec) -> str:
    f16 = spec.dtype("x") == "f16"
    r = ".to(tl.float16).to(tl.float32)" if f16 else ""
    note = "; each product and the sum rounded to float16 (torch's f16 ops)" if f16 else ""
    return f'''@triton.jit
def _values(x_row, c_row, s_row, ch, cmask, rmask, sxd, scd, ssd):
    """Channels `ch` of rope(x) for the rows at `x_row` / `c_row` / `s_row`, as float32:
    x * cos + rotate_half(x) * sin, where rotate_half(x)[j] = -x[j + HALF] for j < D - HALF
    and x[j - (D - HALF)] after{note}."""
    m = rmask & cmask
    first = ch < D - HALF
    pair = tl.where(first, ch + HALF, ch - (D - HALF))
    x = tl.load(x_row + ch * sxd, mask=m, other=0.0).to(tl.float32)
    xp = tl.load(x_row + pair * sxd, mask=m, other=0.0).to(tl.float32)
    rot = tl.where(first, -xp, xp)
    a = (x * tl.load(c_row + ch * scd, mask=m, other=0.0).to(tl.float32)){r}
    b = (rot * tl.load(s_row + ch * ssd, mask=m, other=0.0).to(tl.float32)){r}
    return (a + b){r}
'''


def render(spec: KernelSpec) -> str:
    """The Python module source of `spec`'s kernel and its `launch` (the emitter adds the
    header comment)."""
    check(spec)
    d, x_dt = spec.dim("d"), spec.dtype("x")
    outs = quant_outputs(spec)
    tiles = spec.tiles[0]
    value = "_values(x_row{r}, c_row{r}, s_row{r}, {ch}, {cmask}, {rmask}, sxd, scd, ssd)"
    blocks, args = quant_blocks(outs, value, tiles.block_n)
    blocks = [b for b in (float_block(spec, value, "the float result"), *blocks) if b]
    items = [
        ("D", d, "channels per row (the head dim)"),
        ("HALF", d // 2, "rotate_half splits the row at D // 2"),
        ("ROWS", tiles.block_m, "rows per program"),
    ]
    return _MODULE.substitute(
        module_fields(spec, outs, items, args, "the rope result"),
        title=", ".join([f"rope {x_dt}"] + [str(o.fmt) for o in outs] + (["float result"] if spec.option("float_out") else [])),
        values=_values_source(spec),
        body="\n\n".join(blocks),
    )


_MODULE = Template('''"""rope_kv: $title.

See `mxc.codegen.templates.rope_kv` for the numerics (bit for bit the reference).
"""

import torch
import triton
import triton.language as tl

from mxc.codegen.templates.checks import LaunchError, describe, expect
from mxc.codegen.templates.launch import output_tensors

KERNEL = "$kernel_name"

# ---------------------------------------------------------------- constants of this spec
$constants


# ---------------------------------------------------------------- exact quantization
$grid

$formats


# ---------------------------------------------------------------- rope
$values

# ---------------------------------------------------------------- kernel
@triton.jit
def rope_kv_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr, ${out_args}M, H, S,
    sxb, sxh, sxs, sxd, scb, sch, scs, scd, ssb, ssh, sss, ssd,
):
    """Rows [pid * ROWS, pid * ROWS + ROWS) of the b*h*s rows (row = (bi * H + hi) * S + si):
    rope, then every output. cos / sin strides are 0 along broadcast dims."""
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    row_mask = rows < M
    si = rows % S
    bh = rows // S
    hi = bh % H
    bi = bh // H
    x_row = x_ptr + bi * sxb + hi * sxh + si * sxs
    c_row = cos_ptr + bi * scb + hi * sch + si * scs
    s_row = sin_ptr + bi * ssb + hi * ssh + si * sss

$body


# ---------------------------------------------------------------- launch
#: The quantized outputs (each the whole row): codes dtype, scales per row, zero points.
QUANT_OUTPUTS = $quant_outputs
FLOAT_OUT = $float_out


def _as_4d(t):
    """`t` with leading size-1 dims up to 4 dims (a view)."""
    return t[(None,) * (4 - t.dim())]


def launch(x, cos, sin, outs=None):
    """rope(x, cos, sin) for x [..., $d] ($x_torch, 1 to 4 dims: [b, h, s, $d], any strides)
    and cos / sin of x's dtype broadcastable to x's shape, then its quantizes. `outs`:
    tensors to write, in the order below (None entries are allocated), contiguous.

    Returns a tuple:
    $results"""
    if not isinstance(x, torch.Tensor) or not 1 <= x.dim() <= 4:
        got = describe(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise LaunchError(f"{KERNEL}: x must be a $x_name tensor [b, h, s, $d] (1 to 4 dims), got {got}")
    shape = tuple(x.shape)
    dev = x.device
    expect(KERNEL, "x", x, (*shape[:-1], $d), ($x_torch,), dev)
    tables = []
    for name, t in (("cos", cos), ("sin", sin)):
        expect(KERNEL, name, t, None, ($x_torch,), dev)
        try:
            fits = t.dim() <= x.dim() and torch.broadcast_shapes(t.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise LaunchError(f"{KERNEL}: {name} must broadcast to x's shape {list(shape)}, got {describe(t)}")
        tables.append(_as_4d(t.broadcast_to(shape)))
    lead = shape[:-1]
    want = [("y", (*lead, $d), x.dtype, None)] if FLOAT_OUT else []  # (name, shape, dtype, given input)
    for o in QUANT_OUTPUTS:
        want.append((f"{o['name']} codes", (*lead, $d), o["codes"], None))
        want.append((f"{o['name']} scale", (*lead, o["n_scales"]), torch.float32, None))
        if o["zero"]:
            want.append((f"{o['name']} zero", (*lead, o["n_scales"]), torch.float32, None))
    results = output_tensors(KERNEL, want, outs, dev)
    m = x.numel() // $d
    if m == 0:
        return tuple(results)
    x4 = _as_4d(x)
    c4, s4 = tables
    y = results[0] if FLOAT_OUT else None
    out_ptrs = results[1:] if FLOAT_OUT else results
    rope_kv_kernel[(triton.cdiv(m, $rows),)](
        x4, c4, s4, y, *out_ptrs, m, x4.shape[1], x4.shape[2],
        *x4.stride(), *c4.stride(), *s4.stride(),
        num_warps=$num_warps, num_stages=$num_stages, enable_fp_fusion=False,
    )
    return tuple(results)
''')
