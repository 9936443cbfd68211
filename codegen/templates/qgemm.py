"""The quantized GEMM template (family "qgemm"): the fold pass's `qlinear` as one kernel.

    y[M, N] = epilogue(Σ_g (Σ_{k in g} xq·wq - z_g·Σ_{k in g} xq) · s_w,g · s_x,g  · s_x · s_w · globals)

(epilogue: qlinear's bias, then the steps the fuse pass groups after it — silu / gelu, the
residual `add`, SwiGLU's `mul` of the up projection by silu(gate) — `common.epilogue_source`).

Both operands arrive quantized: the activation codes `xq` as a kernel (norm + quantize)
stores them at run time, never packed (symmetric integers: int8 tensors holding the value;
float elements fp8/fp6/fp4: uint8 bit patterns), with per-token `[.., 1]`, per-tensor
`[1, 1]` (static) or per-group `[.., ceil(K/g)]` float32 scales (and a float32 global scale
for two-level formats); the weight as the layout pass packs it (int32 words, each row one
dense little-endian bit stream of codes, `mxc.ir.packing`) with its scales, zero points
and global scale as the quantize pass stores them. Every pair the fold pass forms
(`mxc.passes.fold._why_not`) is supported: a symmetric integer or float activation format
scaled per token, per tensor or per group / microscaling block, times any weight format
(int1..int8 symmetric or asymmetric, the float elements, mx* and nvfp4) scaled per tensor,
channel, group or block, the groups of both aligned when both have them. The presets form
W8A8 (int8<sym,token> or int8<sym,tensor> x int8<sym,channel>), W4A8 (int8<sym,token> x
int4<asym,g128>), W4A4 (int4<sym,g128> x int4<asym,g128>) and fp8 (fp8e4m3<token> x
fp8e4m3<channel>); plans may name others, e.g. fp8e4m3<block16> x nvfp4, mxfp8 x mxfp4.

Blocks. Scales are shared by the *block* of K the reference (`runtime/reference.py::
_qlinear`) sums exactly: the activation's group if it has one shorter than K, else the
weight's, else all of K (`GROUP`; the last block may be shorter). The kernel walks K block
by block, each block in ceil(GROUP / BLOCK_K) tiles of BLOCK_K masked to the block's end (a
group that is not a multiple of BLOCK_K wastes the masked lanes, never mixes two blocks),
scales the block's partial sum once and adds it to a float32 accumulator. Scales that do
not change along K (per token, tensor, channel; the global scales) multiply once, after the
loop.

Numerics:

* Integer x integer (`INT_DOT`): an int8 x int8 -> int32 `tl.dot`. Weight codes become
  int8 values `code - 2^(b-1)`: the value itself for a symmetric weight; for an asymmetric
  one (codes 0..2^b-1, which do not fit int8 at b = 8) the zero point shifts by the same
  offset, and `(z - 2^(b-1)) · Σ_k xq` (int32; z is an integer code) is subtracted from
  the block's sum. Every block sum is exact: |xq·w| <= 2^14, so int32 holds any block of up
  to 2^16 elements (`check` refuses longer ones; K per channel, g per group). The exact
  block sum is then converted to float32 (exact below 2^24) and scaled.
* A float operand (`not INT_DOT`): both operands are decoded exactly (integer bit
  arithmetic, `common.decode_source`; never an fp8 cast) and converted to float16, which
  holds every element value of every format exactly (int8 values, asymmetric `code - z`
  in -255..255, fp8e4m3 2^-9..448, fp8e5m2 2^-16..57344, fp6, fp4), then an f16 x f16 ->
  fp32 `tl.dot`. Every product is exact in fp32: e4m3 significands have 4 bits, so an
  fp8e4m3 product has at most 8 significant bits (an int8 x fp8 one 12, a 9-bit
  asymmetric weight value x fp8 13) with exponents far inside fp32's range — though not
  always inside float16's (448² > 65504), which is why the products are never formed in
  f16: the dot multiplies into fp32. Only the accumulation rounds: sums of such products
  span more binades than fp32's 24 bits, so a block sum differs from the exact one by fp32
  summation rounding (≤ ~K·2^-24 of Σ|x·w|, far less in practice). The fp8 tensor-core dot
  (`tl.float8e4nv` operands, twice the f16 rate on an H100) is not used: Hopper's fp8 MMA
  accumulates with fewer bits than fp32 (about 14, as the DeepSeek-V3 report measured),
  which this bound does not allow; it would be a speed option, unverified without a GPU.
* Scales multiply the block sums in fp32: no division anywhere, so the compiled kernel
  rounds like the interpreter. Against the reference (float64, then cast to the output
  dtype) the result agrees within a few fp32 roundings of the block terms (integer pairs)
  or fp32 summation rounding (float pairs); the epilogue adds its own fp32 steps.
* Small M splits K over `SPLIT_K` programs — over blocks when there are several, over the
  tiles of the one block otherwise (scaling is linear, so each split scales its own part)
  — that write fp32 partial sums to a workspace; a second kernel adds them in split order
  (deterministic) and applies the epilogue.
"""

from __future__ import annotations

from string import Template

from ...ir import FloatFormat, IntFormat, Layout, NumberFormat, parse_format, parse_layout
from ...ir.ops import scale_shape
from ...ir.packing import packed_words

from ..spec import M_CLASSES, KernelSpec, Tiles
from .common import (
    TL_DTYPES, TORCH_DTYPES, cdiv, code_constants, configs_source, constants, decode_source, epilogue_checks,
    epilogue_source, float_constants, float_values_source, gemm_tail_source, load_codes_source, splitk_reduce_source,
)

FAMILY = "qgemm"
#: The epilogue steps the kernels take arguments for (`mxc.codegen.spec.EPILOGUE_STEPS`).
STEPS = ("bias", "silu", "gelu", "gelu_tanh", "residual", "mul")
OUT_DTYPES = ("f16", "f32")
#: Elements an int32 block sum may hold exactly: |xq · w| <= 128 · 128 = 2^14, and with a zero
#: point correction |z - 2^(b-1)| · |Σ xq| adds as much again.
MAX_INT_BLOCK = 1 << 16


# --------------------------------------------------------------------------- spec and tiles


def _grouped(fmt: NumberFormat, k: int) -> bool:
    """Whether `fmt` has several scales along K (a group or block shorter than K)."""
    block = fmt.scaling.block(k)
    return block is not None and block < k


def block_of(act: NumberFormat, weight: NumberFormat, k: int) -> int:
    """The elements along K that share every scale: the reference's block (the activation's
    group if shorter than K, else the weight's, else K)."""
    if _grouped(act, k):
        return act.scaling.block(k)
    if _grouped(weight, k):
        return weight.scaling.block(k)
    return k


def int_dot(act: NumberFormat, weight: NumberFormat) -> bool:
    """Whether both operands are integers: an int8 x int8 -> int32 dot (else f16 -> fp32)."""
    return isinstance(act, IntFormat) and isinstance(weight, IntFormat)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def choose_tiles(n: int, k: int, act: NumberFormat, weight: NumberFormat, m_class: str) -> Tiles:
    """The tile configuration of a qgemm for M class `m_class` ("small": M <= 16; "large").

    `spec.choose_tiles` looks at the weight's group only; here the block is the pair's
    (`block_of`) and an int8 dot needs BLOCK_K >= 32 on NVIDIA GPUs (16 for f16). BLOCK_K is
    the largest power of two <= 128 (small M) / 64 (large M) dividing the block when the
    block is a multiple of the minimum, else the block rounded up to a power of two (the
    tail lanes masked). Small M takes a 16-row tile and splits K — over blocks, or over the
    tiles of a single block — over up to 16 programs until ~128 programs run, none empty."""
    if m_class not in M_CLASSES:
        raise ValueError(f"unknown M class {m_class!r}; expected one of {', '.join(M_CLASSES)}")
    small = m_class == "small"
    cap = 128 if small else 64
    least = 32 if int_dot(act, weight) else 16
    block = block_of(act, weight, k)
    bk = min(cap, max(least, _next_pow2(block)))
    if block < k and block % least == 0:
        while block % bk:
            bk //= 2
    bn = min(64, max(16, _next_pow2(n)))
    if not small:
        return Tiles(max_m=None, block_m=64, block_n=bn, block_k=bk, split_k=1, num_warps=4, num_stages=3)
    groups = -(-k // block)
    units = groups if groups > 1 else -(-k // bk)  # what split-K divides: blocks, or one block's tiles
    split = max(1, min(units, 16, 128 // -(-n // bn)))
    split = -(-units // -(-units // split))  # no empty split
    return Tiles(max_m=M_CLASSES["small"], block_m=16, block_n=bn, block_k=bk, split_k=split, num_warps=4, num_stages=2)


def spec(
    n: int,
    k: int,
    act: NumberFormat | str,
    weight: NumberFormat | str,
    *,
    out_dtype: str = "f32",
    epilogue: tuple[str, ...] = (),
    has_bias: bool = False,
    layout: Layout | str | None = None,
    tiles: tuple[Tiles, ...] | None = None,
) -> KernelSpec:
    """The spec of `y[M, n] = qlinear(xq[M, k] in format act, W[n, k] in format weight)`
    (+ `epilogue`): W packed with `layout` (default `packed<bits=B,word=i32,axis=1>`, what
    the layout pass writes), y of `out_dtype`. `has_bias` puts "bias" first in the epilogue
    (qlinear's own bias, added before any activation or residual) unless it is listed.
    Tiles per M class from `choose_tiles` unless given.

        spec(1536, 576, "int8<sym,token>", "int8<sym,channel>", epilogue=("residual",))"""
    a = parse_format(act) if isinstance(act, str) else act
    w = parse_format(weight) if isinstance(weight, str) else weight
    steps = tuple(epilogue)
    if has_bias and "bias" not in steps:
        steps = ("bias", *steps)
    if tiles is None:
        tiles = tuple(choose_tiles(n, k, a, w, m) for m in M_CLASSES)
    lay = parse_layout(layout) if isinstance(layout, str) else layout
    if lay is None:
        lay = Layout(bits=w.bits, axis=1)
    out = KernelSpec(FAMILY, {"n": n, "k": k}, {"act": a, "weight": w}, {"weight": lay}, {"out": out_dtype},
                     steps, tiles)
    check(out)
    return out


def check(spec: KernelSpec) -> None:
    """Raise ValueError naming what this template cannot generate for `spec`."""
    if spec.family != FAMILY:
        raise ValueError(f"the qgemm template cannot generate a {spec.family!r} kernel")
    for what, want, got in (
        ("dims", {"k", "n"}, {k for k, _ in spec.dims}),
        ("formats", {"act", "weight"}, {k for k, _ in spec.formats}),
        ("layouts", {"weight"}, {k for k, _ in spec.layouts}),
        ("dtypes", {"out"}, {k for k, _ in spec.dtypes}),
    ):
        if want != got:
            raise ValueError(f"{spec}: a qgemm spec has {what} {sorted(want)}, got {sorted(got)}")
    act, weight, lay, k = spec.fmt("act"), spec.fmt("weight"), spec.layout("weight"), spec.dim("k")
    if isinstance(act, IntFormat) and not act.symmetric:
        raise ValueError(f"{spec}: activation format {act} has a zero point; qgemm reads symmetric activations "
                         f"(the fold pass keeps such pairs dequantized)")
    if act.scaling.kind not in ("token", "tensor", "group", "block"):
        raise ValueError(f"{spec}: activation format {act} scales per {act.scaling.kind}; expected token, tensor, "
                         f"group or block")
    if weight.scaling.kind == "token":
        raise ValueError(f"{spec}: weight format {weight} scales per token (activations only); expected tensor, "
                         f"channel, group or block")
    if _grouped(act, k) and _grouped(weight, k) and act.scaling.block(k) != weight.scaling.block(k):
        raise ValueError(f"{spec}: activation groups of {act.scaling.block(k)} and weight groups of "
                         f"{weight.scaling.block(k)} do not align")
    if lay.bits != weight.bits:
        raise ValueError(f"{spec}: layout {lay} packs {lay.bits}-bit codes but {weight} has {weight.bits} bits")
    if lay.axis not in (1, -1) or lay.word != "i32" or lay.order or lay.tile:
        raise ValueError(f"{spec}: the qgemm template reads packed<bits={weight.bits},word=i32,axis=1> (natural "
                         f"order, row-major), got {lay}")
    if spec.dtype("out") not in OUT_DTYPES:
        raise ValueError(f"{spec}: out must be one of {', '.join(OUT_DTYPES)}, got {spec.dtype('out')}")
    unknown = [s for s in spec.epilogue if s not in STEPS]
    if unknown:
        raise ValueError(f"{spec}: the qgemm template has no epilogue step {', '.join(unknown)}; it has {', '.join(STEPS)}")
    if int_dot(act, weight):
        if block_of(act, weight, k) > MAX_INT_BLOCK:
            raise ValueError(f"{spec}: blocks of {block_of(act, weight, k)} elements may overflow the int32 sums "
                             f"of an int8 dot; at most {MAX_INT_BLOCK} are exact")
        small = [t.block_k for t in spec.tiles if t.block_k < 32]
        if small:
            raise ValueError(f"{spec}: an int8 tl.dot needs BLOCK_K >= 32 on NVIDIA GPUs, got {small}")


# --------------------------------------------------------------------------- render


def _configs(spec: KernelSpec) -> str:
    """One launch configuration per M class: the spec's tiles and the loop trip counts that
    follow (`GROUPS_PER_SPLIT` blocks per program, `TILES_PER_STEP` tiles per block)."""
    k = spec.dim("k")
    block = block_of(spec.fmt("act"), spec.fmt("weight"), k)
    groups = cdiv(k, block)
    rows = []
    for t in spec.tiles:
        tiles_per_group = cdiv(block, t.block_k)
        if groups == 1:  # split-K shares the one block's tiles
            per_split, per_step = 1, cdiv(tiles_per_group, t.split_k)
        else:  # split-K shares the blocks
            per_split, per_step = cdiv(groups, t.split_k), tiles_per_group
        rows.append((t, {"GROUPS_PER_SPLIT": per_split, "TILES_PER_STEP": per_step}))
    return configs_source(rows)


def act_constants(fmt: NumberFormat) -> list[tuple[str, object, str]]:
    """The constants `act_values_source` reads (the weight's own use unprefixed names)."""
    if isinstance(fmt, IntFormat):
        return [("X_BITS", fmt.bits, f"{fmt}: int8 storage of values in [-2^(X_BITS-1), 2^(X_BITS-1)-1]")]
    return float_constants(fmt.spec, f"activation {fmt.name}", "X_")


def act_values_source(fmt: NumberFormat) -> str:
    """`_act_values(codes)`: float32 values of activation codes in their storage (int8
    values of a symmetric integer format; uint8 bit patterns of a float element), exactly."""
    if isinstance(fmt, IntFormat):
        return f'''@triton.jit
def _act_values(codes):
    """{fmt} activations: the int8 codes are the values (exact in float32)."""
    return codes.to(tl.float32)
'''
    s = fmt.spec
    return f'''@triton.jit
def _act_values(codes):
    """{fmt.name} activations from their uint8 bit patterns sign|exponent({s.ebits})|mantissa({s.mbits}), exactly:
    |value| = significand * 2^(max(e, 1) - X_EXP_BIAS - X_MBITS) (e == 0: subnormal), the power
    of two assembled as float32 bits (the product is exact)."""
    codes = codes.to(tl.int32)  # uint8 zero-extends
{float_values_source(s, "X_")}'''


def render(spec: KernelSpec) -> str:
    """The Python module source of `spec`'s kernels and its `launch` (the emitter adds the
    header comment)."""
    check(spec)
    act, weight, n, k = spec.fmt("act"), spec.fmt("weight"), spec.dim("n"), spec.dim("k")
    out_dt = spec.dtype("out")
    block = block_of(act, weight, k)
    words = packed_words(k, weight.bits)
    is_int = int_dot(act, weight)
    has_zero = isinstance(weight, IntFormat) and not weight.symmetric
    w_global = isinstance(weight, FloatFormat) and weight.global_
    x_global = isinstance(act, FloatFormat) and act.global_
    w_shape = tuple(int(d) for d in scale_shape(weight, (n, k)))
    x_cols = 1 if act.scaling.kind in ("token", "tensor") else cdiv(k, act.scaling.block(k))
    items = [
        ("N", n, "output features: rows of W"),
        ("K", k, "reduction length"),
        ("WORDS", words, f"int32 words per packed row: ceil({weight.bits}*K/32)"),
        ("GROUP", block, "elements along K per block of shared scales" + (" (all of K)" if block >= k else "")),
        ("NUM_GROUPS", cdiv(k, block), "blocks along K (the last may be shorter)"),
        ("ONE_GROUP", block >= k, "one block: split-K shares its tiles"),
        ("X_GROUPED", _grouped(act, k), "activation scales per block (else per token / tensor, after the loop)"),
        ("W_GROUPED", _grouped(weight, k), "weight scales per block (else per row / tensor, after the loop)"),
        ("HAS_ZERO", has_zero, "asymmetric weight: a zero point per weight scale"),
        ("W_GLOBAL", w_global, "a float32 tensor scale above the weight's block scales"),
        ("X_GLOBAL", x_global, "a float32 tensor scale above the activation's block scales"),
        ("INT_DOT", is_int, "int8 x int8 -> int32 dot" if is_int else "f16 x f16 -> fp32 dot of exact element values"),
        *code_constants(weight),
        *act_constants(act),
    ]
    if is_int:
        items.append(("W_MID", 1 << (weight.bits - 1), "int8 weight value = code - W_MID (asymmetric: zero too)"))
    x_torch = "torch.int8" if isinstance(act, IntFormat) else "torch.uint8"
    x_what = "signed values" if isinstance(act, IntFormat) else "bit patterns"
    x_shape = "(1, 1)" if act.scaling.kind == "tensor" else f"(*lead, {x_cols})"
    checks = [
        'expect(KERNEL, "w_zero", w_zero, W_SCALE_SHAPE, FLOATS, dev, note="zero point codes")'
        if has_zero else f'expect_none(KERNEL, "w_zero", w_zero, "{weight} has no zero point")',
        'expect(KERNEL, "w_global", w_global, (1,), (torch.float32,), dev)'
        if w_global else f'expect_none(KERNEL, "w_global", w_global, "{weight} has no global scale")',
        'expect(KERNEL, "x_global", x_global, (1,), (torch.float32,), dev)'
        if x_global else f'expect_none(KERNEL, "x_global", x_global, "{act} has no global scale")',
        *epilogue_checks(spec.epilogue, n),
    ]
    return _MODULE.substitute(
        title=f"{act} x {weight}, y[M, {n}] = qlinear(x[M, {k}], W[{n}, {k}])"
        + (f", then {', '.join(spec.epilogue)}" if spec.epilogue else ""),
        kernel_name=str(spec),
        constants=constants(items),
        load_codes=load_codes_source(weight.bits),
        decode="" if is_int else decode_source(weight) + "\n",
        act_values="" if is_int else act_values_source(act) + "\n",
        epilogue=epilogue_source(spec.epilogue),
        tail=gemm_tail_source(spec.epilogue, TL_DTYPES[out_dt]),
        splitk_reduce=splitk_reduce_source(spec.epilogue, TL_DTYPES[out_dt]),
        configs=_configs(spec),
        n=n,
        k=k,
        words=words,
        act=str(act),
        weight=str(weight),
        layout=str(spec.layout("weight")),
        w_scale_shape=repr(w_shape),
        x_scale_shape=x_shape,
        x_torch=x_torch,
        x_what=x_what,
        out_torch=TORCH_DTYPES[out_dt],
        dot="int8 x int8 -> int32 tl.dot, exact block sums" if is_int
        else "exact f16 element values, f16 x f16 -> fp32 tl.dot",
        checks="\n    ".join(checks),
    )


_MODULE = Template('''"""qgemm: $title.

Activation $act ($x_torch $x_what); weight $weight in $layout;
$dot; out $out_torch. See `mxc.codegen.templates.qgemm` for the numerics.
"""

import torch
import triton
import triton.language as tl

from mxc.codegen.templates.checks import FLOATS, LaunchError, expect, expect_none
from mxc.codegen.templates.launch import (
    as_rows, output_tensor, pick_config, reduce_splitk, splitk_workspace, strides,
)

KERNEL = "$kernel_name"

# ---------------------------------------------------------------- constants of this spec
$constants


# ---------------------------------------------------------------- codes and elements
$load_codes
$decode$act_values
$epilogue

# ---------------------------------------------------------------- kernels
@triton.jit
def qgemm_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, wz_ptr, wg_ptr, xg_ptr, bias_ptr, res_ptr, mul_ptr, out_ptr, part_ptr,
    M, stride_xm, stride_xk, stride_xsm, stride_xsg, stride_wsn, stride_wsg, stride_wzn, stride_wzg,
    stride_rm, stride_rn, stride_mm, stride_mn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUPS_PER_SPLIT: tl.constexpr, TILES_PER_STEP: tl.constexpr,
):
    """Tile (pid_m, pid_n) of y over split pid_k of K: blocks pid_k * GROUPS_PER_SPLIT + i
    (several blocks), or tiles pid_k * TILES_PER_STEP + j of the one block. Each block's sum
    is formed over its tiles (masked to the block's end), scaled by its block scales and
    added to the fp32 accumulator. With one split the epilogue runs here; otherwise the fp32
    partial sum goes to part[pid_k]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n[None, :] * WORDS  # [1, BLOCK_N]: first word of each row of W
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, GROUPS_PER_SPLIT):
        if ONE_GROUP:
            g = 0
            t0 = pid_k * TILES_PER_STEP
        else:
            g = pid_k * GROUPS_PER_SPLIT + i
            t0 = 0
        g0 = g * GROUP
        live = g < NUM_GROUPS  # a split's blocks past the last are fully masked
        wg = g if W_GROUPED else 0  # the weight scale (zero point) column of this block
        if HAS_ZERO:
            zero = tl.load(wz_ptr + offs_n * stride_wzn + wg * stride_wzg, mask=n_mask & live, other=0.0)
            zero = zero.to(tl.float32)
        if INT_DOT:
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            x_sum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        else:
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j in range(0, TILES_PER_STEP):
            offs_k = g0 + (t0 + j) * BLOCK_K + tl.arange(0, BLOCK_K)
            k_mask = (offs_k < K) & (offs_k < g0 + GROUP)
            wmask = k_mask[:, None] & n_mask[None, :]
            xc = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=m_mask[:, None] & k_mask[None, :], other=0)
            codes = _load_codes(w_rows, offs_k[:, None], wmask)  # int32 [BLOCK_K, BLOCK_N]
            if INT_DOT:
                w = tl.where(wmask, codes - W_MID, 0).to(tl.int8)
                part = tl.dot(xc, w, acc=part)  # exact int32 block sum
                if HAS_ZERO:
                    x_sum += tl.sum(xc.to(tl.int32), axis=1)
            else:
                if HAS_ZERO:
                    w = _decode(codes, zero[None, :])
                else:
                    w = _decode(codes, 0.0)
                w = tl.where(wmask, w, 0.0).to(tl.float16)  # exact: every element value is an f16
                x = _act_values(xc).to(tl.float16)
                part = tl.dot(x, w, acc=part)  # exact products, fp32 accumulation
        if INT_DOT and HAS_ZERO:
            # Σ xq·(code - z) = Σ xq·(code - W_MID) - (z - W_MID)·Σ xq; z is an integer code.
            part = part - x_sum[:, None] * (zero.to(tl.int32) - W_MID)[None, :]
        scaled = part.to(tl.float32)
        if W_GROUPED:
            sw = tl.load(ws_ptr + offs_n * stride_wsn + g * stride_wsg, mask=n_mask & live, other=0.0)
            scaled = scaled * sw.to(tl.float32)[None, :]
        if X_GROUPED:
            sx = tl.load(xs_ptr + offs_m * stride_xsm + g * stride_xsg, mask=m_mask & live, other=0.0)
            scaled = scaled * sx.to(tl.float32)[:, None]
        acc += scaled
    # Scales constant along K: per row / tensor of W, per token / tensor of x, the globals.
    if not W_GROUPED:
        sw = tl.load(ws_ptr + offs_n * stride_wsn, mask=n_mask, other=0.0)
        acc = acc * sw.to(tl.float32)[None, :]
    if not X_GROUPED:
        sx = tl.load(xs_ptr + offs_m * stride_xsm, mask=m_mask, other=0.0)
        acc = acc * sx.to(tl.float32)[:, None]
    if W_GLOBAL:
        acc = acc * tl.load(wg_ptr).to(tl.float32)
    if X_GLOBAL:
        acc = acc * tl.load(xg_ptr).to(tl.float32)
$tail


$splitk_reduce


# ---------------------------------------------------------------- launch
$configs
#: The shape of the weight's scale (and zero point) tensors.
W_SCALE_SHAPE = $w_scale_shape


def launch(x_codes, x_scale, w_words, w_scale, w_zero=None, w_global=None, x_global=None, bias=None,
           residual=None, out=None, multiplier=None):
    """y[..., $n] = qlinear(x_codes[..., $k], w_words) (+ the epilogue), into `out`
    (allocated when None) and returned.

    x_codes: $x_torch [..., $k] ($act $x_what); x_scale: float32/float16 $x_scale_shape;
    w_words: int32 [$n, $words] ($weight codes, $layout); w_scale: W_SCALE_SHAPE;
    w_zero: zero point codes, W_SCALE_SHAPE (asymmetric weights only); w_global, x_global:
    float32 [1] (two-level formats only); bias: [$n]; residual: [..., $n];
    out: $out_torch [..., $n], contiguous; multiplier: [..., $n] (the "mul" step: SwiGLU's
    up projection times silu(gate)). All on x_codes' device."""
    if not isinstance(x_codes, torch.Tensor) or x_codes.dim() < 1:
        raise LaunchError(f"{KERNEL}: x_codes must be a $x_torch tensor [..., $k], got {x_codes!r:.80}")
    lead = tuple(x_codes.shape[:-1])
    dev = x_codes.device
    expect(KERNEL, "x_codes", x_codes, (*lead, $k), ($x_torch,), dev, note="$act $x_what")
    expect(KERNEL, "x_scale", x_scale, $x_scale_shape, FLOATS, dev)
    expect(KERNEL, "w_words", w_words, ($n, $words), (torch.int32,), dev, contiguous=True,
           note="$weight codes, $layout")
    expect(KERNEL, "w_scale", w_scale, W_SCALE_SHAPE, FLOATS, dev)
    $checks
    out = output_tensor(KERNEL, out, (*lead, $n), $out_torch, dev)
    m = x_codes.numel() // $k
    if m == 0:
        return out
    x2 = x_codes.reshape(m, $k)
    xs2 = x_scale.reshape(-1, x_scale.shape[-1]).expand(m, x_scale.shape[-1])  # per tensor: stride 0
    out2 = out.view(m, $n)
    res2, mul2 = as_rows(residual, m, $n), as_rows(multiplier, m, $n)
    ws2 = w_scale.expand($n, W_SCALE_SHAPE[1])  # a per-tensor [1, 1] scale: stride 0 over rows
    wz2 = w_zero.expand($n, W_SCALE_SHAPE[1]) if w_zero is not None else None
    cfg = pick_config(CONFIGS, m)
    part = splitk_workspace(cfg, m, $n, dev)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv($n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    qgemm_kernel[grid](
        x2, xs2, w_words, ws2, wz2, w_global, x_global, bias, res2, mul2, out2, part,
        m, *strides(x2), *strides(xs2), *strides(ws2), *strides(wz2), *strides(res2), *strides(mul2), *strides(out2),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=cfg["SPLIT_K"],
        GROUPS_PER_SPLIT=cfg["GROUPS_PER_SPLIT"], TILES_PER_STEP=cfg["TILES_PER_STEP"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    reduce_splitk(splitk_reduce_kernel, grid, cfg, m, part, bias, res2, mul2, out2)
    return out
''')
