"""The fused norm + activation-quantize template (family "norm_quant"; also the fuse pass's
`act_quant` groups and plain per-row quantizes: norm "none").

For each row of x [M, D] (leading dims flattened):

    row = x[m, index]                     # optional: the reorder pass's channel permutation
    row = rms_norm(row, w?) | layer_norm(row, w?, b?) | row     # optional norm, in float32
    y   = row                             # optional float output (x's dtype)
    for each output k: codes_k, scale_k[, zero_k] = quantize(row[start_k:end_k], fmt_k)

one program per block of ROWS rows. Each output quantizes one channel range of the row (the
whole row, or the reorder pass's main / outlier slice) into its format: dynamically per
token, per group or per microscaling block along the range (a last group may be shorter), or
statically with a given per-tensor scale (`fmt.encode`).

    spec = norm_quant.spec(4096, ["int8<sym,token>"], norm="rms", eps=1e-6, has_weight=True)
    y_codes, y_scale = load(spec).launch(x, weight=w)

Numerics (the reference is `runtime/reference.py`: `_rms_norm`, `_layer_norm`, `_quantize`):

* The quantization is exact: codes, scales and zero points are bit for bit
  `fmt.quantize(row[..., start:end])` (`fmt.encode` for static scales) of the row the kernel
  computed (see `quantize_source`). Without a norm the row is x itself, so the outputs equal
  the reference's exactly.
* rms_norm as the reference orders it: ms = sum(x^2) / D, r = 1 / sqrt(ms + eps) (each step
  IEEE-rounded: `tl.math.div_rn`, `tl.sqrt_rn`), y = x * r, then w * y. The sum runs in
  another order than torch's, and torch's vectorised CPU rsqrt is itself approximate (up to
  2 ulp, and differs between tensors of 1-7 rows and longer ones), so rows agree within a
  few float32 ulps (the tests allow 8), not bit for bit.
* layer_norm: mean = sum(x) / D, var = sum((x - mean)^2) / D (two passes), rstd =
  1 / sqrt(var + eps), y = (x * rstd + (-rstd * mean)) * w + b: torch's CPU formula; torch's
  moments come from a Welford merge, so rows agree within a few ulps of |x * rstd| +
  |mean * rstd| (cancellation near the mean is absolute, not relative).
* f16 x: the row is computed in float32 and rounded once to float16 (the float output);
  the quantizes read that rounded row, as the reference's quantize reads the norm's f16
  result. (The reference backend on an f16 graph rounds every intermediate to f16 instead.)
* Float mul-add contraction is off (`enable_fp_fusion=False`) so a compiled GPU kernel
  rounds like the interpreter; the row sums still reduce in another order on a GPU.

The tiles (one configuration): `block_m` rows per program, `block_n` channels per chunk (a
power of two; rows longer than a chunk are read in a loop), `block_k` unused.
"""

from __future__ import annotations

from string import Template
from typing import Sequence

import numpy as np

from ...ir import NumberFormat

from ..spec import KernelSpec, Tiles
from .common import indent
from .quantize_source import QuantOut, check_format, next_pow2
from .rows import check_row_spec, float_block, module_fields, quant_blocks, row_tiles

FAMILY = "norm_quant"
NORMS = ("rms", "layer", "none")
OPTIONS = ("eps", "float_out", "gather", "has_bias", "has_weight", "norm", "ranges")


def spec(
    d: int,
    formats: Sequence[NumberFormat | str] = (),
    ranges: Sequence[tuple[int, int]] | None = None,
    *,
    norm: str = "none",
    eps: float = 1e-5,
    gather: bool = False,
    has_weight: bool = False,
    has_bias: bool = False,
    float_out: bool = False,
    x_dtype: str = "f32",
    tiles: tuple[Tiles, ...] | None = None,
) -> KernelSpec:
    """The spec of a norm_quant kernel over rows of `d` channels: quantized outputs in
    `formats` ("out0", "out1", ...), each of the channel range in `ranges` ([start, end)
    pairs; default: every output the whole row), `norm` ("rms", "layer" or "none") with `eps`
    and an optional weight / bias, the optional `gather` of the row's channels by an index,
    and `float_out` (the normed row is an output too). `eps` is kept only for a norm."""
    fmts = list(formats)
    if ranges is None:
        ranges = [(0, d)] * len(fmts)
    flat = [int(v) for r in ranges for v in r]
    options = {"norm": norm, "gather": bool(gather), "has_weight": bool(has_weight), "has_bias": bool(has_bias),
               "ranges": flat, "float_out": bool(float_out)}
    if norm != "none":
        options["eps"] = float(eps)
    s = KernelSpec(FAMILY, {"d": d}, {f"out{i}": f for i, f in enumerate(fmts)}, {}, {"x": x_dtype}, (),
                   tiles if tiles is not None else row_tiles(d), options)
    check(s)
    return s


def quant_outputs(spec: KernelSpec) -> list[QuantOut]:
    """The quantized outputs of `spec`, in order (out0, out1, ...)."""
    r = spec.option("ranges", ())
    return [QuantOut(f"out{i}", spec.fmt(f"out{i}"), r[2 * i], r[2 * i + 1]) for i in range(len(spec.formats))]


def check(spec: KernelSpec) -> None:
    """Raise ValueError naming what this template cannot generate for `spec`."""
    check_row_spec(spec, FAMILY, OPTIONS, ("gather", "has_weight", "has_bias", "float_out"),
                   "a quantized range or float_out")
    norm = spec.option("norm")
    if norm not in NORMS:
        raise ValueError(f"{spec}: option norm must be one of {', '.join(NORMS)}, got {norm!r}")
    eps = spec.option("eps")
    if norm == "none":
        if spec.option("has_weight") or spec.option("has_bias") or eps is not None:
            raise ValueError(f"{spec}: norm 'none' takes no weight, bias or eps")
    elif not isinstance(eps, float) or not eps >= 0:
        raise ValueError(f"{spec}: option eps must be a float >= 0 for a {norm} norm, got {eps!r}")
    if norm == "rms" and spec.option("has_bias"):
        raise ValueError(f"{spec}: rms_norm has no bias")
    if norm == "layer" and spec.option("has_bias") and not spec.option("has_weight"):
        raise ValueError(f"{spec}: layer_norm's bias comes with its weight (layer_norm(x, w, b): no bias-only form)")
    roles = sorted(k for k, _ in spec.formats)
    d = spec.dim("d")
    ranges = spec.option("ranges", ())
    if not isinstance(ranges, tuple) or len(ranges) != 2 * len(roles):
        raise ValueError(f"{spec}: option ranges must hold a [start, end) pair per quantized output ({len(roles)}), got {ranges!r}")
    for i in range(len(roles)):
        start, end = ranges[2 * i], ranges[2 * i + 1]
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= d):
            raise ValueError(f"{spec}: out{i}'s channel range [{start}, {end}) must satisfy 0 <= start < end <= d = {d}")
        check_format(spec.fmt(f"out{i}"), f"{spec}: out{i}", static_ok=True)


# --------------------------------------------------------------------------- source


def _row_helpers(spec: KernelSpec) -> str:
    """`_load_x` (the row's channels, gathered) and `_values` (the normed row)."""
    norm, gather = spec.option("norm"), spec.option("gather")
    load_doc = "x[row, index[ch]]" if gather else "x[row, ch]"
    src = "src = tl.load(idx_ptr + ch, mask=cmask, other=0)\n    " if gather else "src = ch\n    "
    steps = {
        "rms": ["v = x * rstd  # rms_norm: x * rsqrt(mean(x^2) + eps)"],
        "layer": ["v = x * rstd + shift  # layer_norm (torch's CPU form): x * rstd + (-rstd * mean)"],
        "none": ["v = x"],
    }[norm]
    if spec.option("has_weight"):
        steps.append("v = tl.load(w_ptr + ch, mask=cmask, other=0.0).to(tl.float32) * v  # weight * y")
    if spec.option("has_bias"):
        steps.append("v = v + tl.load(b_ptr + ch, mask=cmask, other=0.0).to(tl.float32)  # + bias")
    if spec.dtype("x") == "f16" and norm != "none":
        steps.append("v = v.to(tl.float16).to(tl.float32)  # the norm's result is float16")
    what = {"rms": "rms_norm", "layer": "layer_norm", "none": "no norm"}[norm]
    body = "\n    ".join(steps)
    return f'''@triton.jit
def _load_x(x_rows, ch, cmask, rmask, idx_ptr, stride_xd):
    """{load_doc} as float32 for the rows at `x_rows` (0 where masked)."""
    {src}return tl.load(x_rows + src * stride_xd, mask=rmask & cmask, other=0.0).to(tl.float32)


@triton.jit
def _values(x_rows, ch, cmask, rmask, idx_ptr, w_ptr, b_ptr, stride_xd, rstd, shift):
    """Channels `ch` of the rows' result ({what}) as float32, given the rows' statistics."""
    x = _load_x(x_rows, ch, cmask, rmask, idx_ptr, stride_xd)
    {body}
    return v
'''


def _stats(spec: KernelSpec, block_d: int) -> tuple[str, str]:
    """(kernel-body lines computing `rstd` / `shift` per row, the `_values` call format)."""
    norm, d = spec.option("norm"), spec.dim("d")
    call = "_values(x_rows{r}, {ch}, {cmask}, {rmask}, idx_ptr, w_ptr, b_ptr, stride_xd, %s)"
    if norm == "none":
        return "", call % "0.0, 0.0"
    chunk = min(block_d, next_pow2(d))
    loop = d > chunk

    def over_row(step: list[str]) -> list[str]:
        """`step` for each chunk of the row (inline when one chunk holds it)."""
        load = [
            f"ch = ({'c0 + ' if loop else ''}tl.arange(0, {chunk}))[None, :]",
            "cmask = ch < D",
            "x = _load_x(x_rows[:, None], ch, cmask, row_mask[:, None], idx_ptr, stride_xd)",
        ]
        return [f"for c0 in range(0, D, {chunk}):", *["    " + b for b in load + step]] if loop else load + step

    if norm == "rms":
        lines = [
            "# rms_norm statistics: ms = sum(x^2) / D, rstd = 1 / sqrt(ms + eps), each step IEEE-rounded",
            "acc = tl.zeros([ROWS], dtype=tl.float32)",
            *over_row(["acc += tl.sum(x * x, axis=1)"]),
            "rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(acc, D_F) + EPS))",
        ]
        return "\n".join(lines), call % "rstd{r}, 0.0"
    lines = [
        "# layer_norm statistics (two passes): mean = sum(x) / D, var = sum((x - mean)^2) / D,",
        "# rstd = 1 / sqrt(var + eps), shift = -rstd * mean",
        "acc = tl.zeros([ROWS], dtype=tl.float32)",
        *over_row(["acc += tl.sum(x, axis=1)"]),
        "mean = tl.math.div_rn(acc, D_F)",
        "acc = tl.zeros([ROWS], dtype=tl.float32)",
        *over_row([
            "dev = tl.where(row_mask[:, None] & cmask, x - mean[:, None], 0.0)",
            "acc += tl.sum(dev * dev, axis=1)",
        ]),
        "rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(acc, D_F) + EPS))",
        "shift = -(rstd * mean)",
    ]
    return "\n".join(lines), call % "rstd{r}, shift{r}"


def render(spec: KernelSpec) -> str:
    """The Python module source of `spec`'s kernel and its `launch` (the emitter adds the
    header comment)."""
    check(spec)
    d, norm, x_dt = spec.dim("d"), spec.option("norm"), spec.dtype("x")
    outs = quant_outputs(spec)
    tiles = spec.tiles[0]
    block_d = tiles.block_n
    items = [
        ("D", d, "channels per row"),
        ("D_F", float(d), "D as a float (the mean's divisor)"),
        ("ROWS", tiles.block_m, "rows per program"),
    ]
    if norm != "none":
        eps32 = float(np.float32(spec.option("eps")))
        items.append(("EPS", eps32, f"eps = {spec.option('eps')!r} rounded to float32 (torch adds it in float32)"))
    stats, value = _stats(spec, block_d)
    blocks, args = quant_blocks(outs, value, block_d)
    body = "\n\n".join(b for b in (indent(stats), float_block(spec, value, "the float row (every channel)"), *blocks) if b)
    what = {"rms": "rms_norm", "layer": "layer_norm", "none": "no norm"}[norm]
    gather = spec.option("gather")
    title_parts = (["gather"] if gather else []) + ([what] if norm != "none" else [])
    title_parts += [f"{o.fmt}[{o.start}:{o.end}]" for o in outs]
    if spec.option("float_out"):
        title_parts.append("float row")
    return _MODULE.substitute(
        module_fields(spec, outs, items, args, "the float row"),
        title=", ".join(title_parts),
        row_helpers=_row_helpers(spec),
        what=what,
        body=body,
        gather=gather,
        has_weight=spec.option("has_weight"),
        has_bias=spec.option("has_bias"),
    )


_MODULE = Template('''"""norm_quant: $title.

See `mxc.codegen.templates.norm_quant` for the numerics (quantization bit-exact, the norm's
float32 row within a few ulps of the reference).
"""

import torch
import triton
import triton.language as tl

from mxc.codegen.templates.checks import FLOATS, LaunchError, describe, expect, expect_none
from mxc.codegen.templates.launch import output_tensors

KERNEL = "$kernel_name"

# ---------------------------------------------------------------- constants of this spec
$constants


# ---------------------------------------------------------------- exact quantization
$grid

$formats


# ---------------------------------------------------------------- the row
$row_helpers

# ---------------------------------------------------------------- kernel
@triton.jit
def norm_quant_kernel(x_ptr, idx_ptr, w_ptr, b_ptr, y_ptr, ${out_args}M, stride_xm, stride_xd):
    """Rows [pid * ROWS, pid * ROWS + ROWS) of x: $what, then every output."""
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    row_mask = rows < M
    x_rows = x_ptr + rows * stride_xm

$body


# ---------------------------------------------------------------- launch
#: The quantized outputs: channel range [start, end), codes dtype, scales per row, zero
#: points, static (given per-tensor) scales.
QUANT_OUTPUTS = $quant_outputs
GATHER = $gather
HAS_WEIGHT = $has_weight
HAS_BIAS = $has_bias
FLOAT_OUT = $float_out


def _static_parts(scales, dev):
    """Per quantized output: None (dynamic) or the (scale, zero) tensors given for it."""
    n = len(QUANT_OUTPUTS)
    if scales is None:
        scales = [None] * n
    if isinstance(scales, torch.Tensor) or not isinstance(scales, (list, tuple)) or len(scales) != n:
        got = describe(scales) if isinstance(scales, torch.Tensor) else repr(scales)[:80]
        raise LaunchError(f"{KERNEL}: scales must be a list with one entry per quantized output ({n}): None "
                          f"(dynamic), a [1, 1] scale, or (scale, zero) (static asymmetric); got {got}")
    parts = []
    for i, (o, given) in enumerate(zip(QUANT_OUTPUTS, scales)):
        if not o["static"]:
            if given is not None:
                raise LaunchError(f"{KERNEL}: scales[{i}] must be None: {o['name']} ({o['format']}) computes "
                                  f"its scales, got {describe(given) if isinstance(given, torch.Tensor) else given!r}")
            parts.append(None)
            continue
        if o["zero"]:
            if not isinstance(given, (list, tuple)) or len(given) != 2:
                raise LaunchError(f"{KERNEL}: scales[{i}] must be (scale, zero), the static [1, 1] tensors of "
                                  f"{o['name']} ({o['format']}), got {type(given).__name__}")
            scale, zero = given
            expect(KERNEL, f"scales[{i}][1]", zero, (1, 1), FLOATS, dev, note=f"{o['format']} zero point")
        else:
            scale, zero = given, None
        expect(KERNEL, f"scales[{i}]" + ("[0]" if o["zero"] else ""), scale, (1, 1), FLOATS, dev,
               note=f"the static {o['format']} scale")
        parts.append((scale, zero))
    return parts


def _results(lead, dtype, dev, static, outs):
    """The output tensors in launch's order (`outs` entries used where given)."""
    want = []  # (name, shape, dtype, given input or None)
    if FLOAT_OUT:
        want.append(("y", (*lead, $d), dtype, None))
    for o, st in zip(QUANT_OUTPUTS, static):
        width = o["end"] - o["start"]
        want.append((f"{o['name']} codes", (*lead, width), o["codes"], None))
        want.append((f"{o['name']} scale", (*lead, o["n_scales"]), torch.float32, st[0] if st else None))
        if o["zero"]:
            want.append((f"{o['name']} zero", (*lead, o["n_scales"]), torch.float32, st[1] if st else None))
    return output_tensors(KERNEL, want, outs, dev)


def launch(x, index=None, weight=None, bias=None, scales=None, outs=None):
    """The rows of x [..., $d] ($x_torch): gathered by `index` (int64 [$d], a permutation of
    the channels: x[..., index]) if the spec gathers, normed with `weight` / `bias` ([$d])
    if it has them, then quantized. `scales`: one entry per quantized output, None for a
    dynamic one, the [1, 1] scale (or (scale, zero)) of a static one. `outs`: tensors to
    write, in the order below (None entries are allocated). All on x's device; `index` is
    not range-checked (it is a const of the model).

    Returns a tuple:
    $results"""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise LaunchError(f"{KERNEL}: x must be a $x_name tensor [..., $d], got {x!r:.80}")
    lead = tuple(x.shape[:-1])
    dev = x.device
    expect(KERNEL, "x", x, (*lead, $d), ($x_torch,), dev)
    if GATHER:
        expect(KERNEL, "index", index, ($d,), (torch.int64,), dev, contiguous=True, note="channel order: x[..., index]")
    else:
        expect_none(KERNEL, "index", index, "the spec has no gather")
    if HAS_WEIGHT:
        expect(KERNEL, "weight", weight, ($d,), FLOATS, dev, contiguous=True)
    else:
        expect_none(KERNEL, "weight", weight, "the spec has no norm weight")
    if HAS_BIAS:
        expect(KERNEL, "bias", bias, ($d,), FLOATS, dev, contiguous=True)
    else:
        expect_none(KERNEL, "bias", bias, "the spec has no norm bias")
    static = _static_parts(scales, dev)
    results = _results(lead, x.dtype, dev, static, outs)
    m = x.numel() // $d
    if m == 0:
        return tuple(results)
    x2 = x.reshape(m, $d)
    it = iter(results)
    y = next(it) if FLOAT_OUT else None
    out_ptrs = [next(it) for o in QUANT_OUTPUTS for _ in range(3 if o["zero"] else 2)]
    norm_quant_kernel[(triton.cdiv(m, $rows),)](
        x2, index, weight, bias, y, *out_ptrs, m, x2.stride(0), x2.stride(1),
        num_warps=$num_warps, num_stages=$num_stages, enable_fp_fusion=False,
    )
    return tuple(results)
''')
