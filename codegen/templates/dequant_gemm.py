"""The weight-only dequant GEMM / GEMV template (family "dequant_gemm").

    y[M, N] = epilogue(x[M, K] @ dequant(W)[N, K]^T)

for every weight format of the IR (int1..int8 symmetric or asymmetric, the float elements
fp8e4m3 / fp8e5m2 / fp6e3m2 / fp6e2m3 / fp4e2m1, per tensor, channel, group or microscaling
block, with a global scale for nvfp4), packed the way the layout pass packs it: int32 words,
each row of K codes one dense little-endian bit stream (`mxc.ir.packing`). Scales arrive as
the quantize pass stores them: float values ([N, ceil(K/g)], or [N, 1] per channel, [1, 1]
per tensor; e8m0 and fp8e4m3 scales are float32 tensors holding powers of two / fp8 values),
zero points as float codes of the same shape, the global scale as float32 [1].

Numerics (the reference is `fmt.dequantize` then an fp32 linear):

* Element values are decoded exactly (integer bit arithmetic; `common.decode_source`).
  Every element value of every format is exact in float16 too (|int| <= 255; fp8e5m2 is a
  truncated float16; the others are narrower), so an f16 dot of x and the *unscaled*
  elements is exact per product and accumulates in fp32.
* Scales never round through f16. When a K tile lies inside one scale group (the group is a
  multiple of BLOCK_K, or one group spans K), the kernel dots the unscaled elements and
  multiplies the fp32 partial sum by the group's scale (per channel: once, after the K
  loop): `SCALE_IN_ACC`. Otherwise (a group size that is not a multiple of 16), it scales
  each element in fp32 and runs an fp32 ("ieee") dot. Either way the result differs from
  the reference only by fp32 summation order, for f16 and f32 x alike.
* Small M splits K over `SPLIT_K` programs that write fp32 partial sums to a workspace; a
  second kernel adds them in a fixed order (deterministic) and applies the epilogue, which
  may be nonlinear and so cannot run on partial sums.
"""

from __future__ import annotations

from string import Template

from ...ir import FloatFormat, IntFormat
from ...ir.ops import scale_shape
from ...ir.packing import packed_words

from ..spec import KernelSpec
from .common import (
    TL_DTYPES, TORCH_DTYPES, cdiv, code_constants, configs_source, constants, decode_source, epilogue_checks,
    epilogue_source, gemm_tail_source, load_codes_source, splitk_reduce_source,
)

FAMILY = "dequant_gemm"
X_DTYPES = ("f16", "f32")
OUT_DTYPES = ("f16", "f32")


def check(spec: KernelSpec) -> None:
    """Raise ValueError naming what this template cannot generate for `spec`."""
    if spec.family != FAMILY:
        raise ValueError(f"the dequant_gemm template cannot generate a {spec.family!r} kernel")
    for what, want, got in (
        ("dims", {"k", "n"}, {k for k, _ in spec.dims}),
        ("formats", {"weight"}, {k for k, _ in spec.formats}),
        ("layouts", {"weight"}, {k for k, _ in spec.layouts}),
        ("dtypes", {"out", "x"}, {k for k, _ in spec.dtypes}),
    ):
        if want != got:
            raise ValueError(f"{spec}: a dequant_gemm spec has {what} {sorted(want)}, got {sorted(got)}")
    fmt, lay = spec.fmt("weight"), spec.layout("weight")
    if fmt.scaling.kind == "token":
        raise ValueError(f"{spec}: weight format {fmt} scales per token (activations only); expected tensor, channel, group or block")
    if lay.bits != fmt.bits:
        raise ValueError(f"{spec}: layout {lay} packs {lay.bits}-bit codes but {fmt} has {fmt.bits} bits")
    if lay.axis not in (1, -1) or lay.word != "i32" or lay.order or lay.tile:
        raise ValueError(
            f"{spec}: the dequant_gemm template reads packed<bits={fmt.bits},word=i32,axis=1> (natural order, "
            f"row-major), got {lay}"
        )
    if spec.dtype("x") not in X_DTYPES:
        raise ValueError(f"{spec}: x must be one of {', '.join(X_DTYPES)}, got {spec.dtype('x')}")
    if spec.dtype("out") not in OUT_DTYPES:
        raise ValueError(f"{spec}: out must be one of {', '.join(OUT_DTYPES)}, got {spec.dtype('out')}")


def _group(spec: KernelSpec) -> int:
    """Elements along K that share one scale (K for per-channel and per-tensor scaling)."""
    k = spec.dim("k")
    block = spec.fmt("weight").scaling.block(k)
    return k if block is None else min(block, k)


def _configs(spec: KernelSpec) -> str:
    """The launch configurations, one line per M class: the spec's tiles plus what follows
    from them, the K tiles each split runs and whether scales multiply partial sums
    (`SCALE_IN_ACC`: every K tile inside one scale group)."""
    k, group = spec.dim("k"), _group(spec)
    one_group = group >= k
    return configs_source([
        (t, {"TILES_PER_SPLIT": cdiv(cdiv(k, t.block_k), t.split_k),
             "SCALE_IN_ACC": one_group or group % t.block_k == 0})
        for t in spec.tiles
    ])


def render(spec: KernelSpec) -> str:
    """The Python module source of `spec`'s kernels and its `launch` (the emitter adds the
    header comment)."""
    check(spec)
    fmt, n, k = spec.fmt("weight"), spec.dim("n"), spec.dim("k")
    x_dt, out_dt = spec.dtype("x"), spec.dtype("out")
    group = _group(spec)
    words = packed_words(k, fmt.bits)
    has_zero = isinstance(fmt, IntFormat) and not fmt.symmetric
    has_global = isinstance(fmt, FloatFormat) and fmt.global_
    sshape = tuple(int(d) for d in scale_shape(fmt, (n, k)))
    consts = constants(
        [
            ("N", n, "output features: rows of W"),
            ("K", k, "reduction length: codes per row of W"),
            ("WORDS", words, f"int32 words per packed row: ceil({fmt.bits}*K/32)"),
            ("GROUP", group, "elements along K per scale" + (" (one scale per row)" if group >= k else "")),
            ("ONE_GROUP", group >= k, "one scale per row: applied once, after the K loop"),
            ("HAS_ZERO", has_zero, "asymmetric integers: a zero point per scale"),
            ("HAS_GLOBAL", has_global, "a float32 tensor scale above the block scales"),
            *code_constants(fmt),
        ]
    )
    if x_dt == "f16":
        dot_exact = "tl.dot(x, w.to(tl.float16))  # exact f16 products, fp32 accumulation"
    else:
        dot_exact = 'tl.dot(x, w, input_precision="ieee")'
    zero_check = (
        'expect(KERNEL, "zero", zero, SCALE_SHAPE, FLOATS, dev, note="zero point codes")'
        if has_zero
        else f'expect_none(KERNEL, "zero", zero, "{fmt} has no zero point")'
    )
    global_check = (
        'expect(KERNEL, "global_scale", global_scale, (1,), (torch.float32,), dev)'
        if has_global
        else f'expect_none(KERNEL, "global_scale", global_scale, "{fmt} has no global scale")'
    )
    return _MODULE.substitute(
        title=f"{fmt} weight, y[M, {n}] = x[M, {k}] @ dequant(W)[{n}, {k}]^T"
        + (f", then {', '.join(spec.epilogue)}" if spec.epilogue else ""),
        kernel_name=str(spec),
        constants=consts,
        load_codes=load_codes_source(fmt.bits),
        decode=decode_source(fmt),
        epilogue=epilogue_source(spec.epilogue),
        dot_exact=dot_exact,
        tail=gemm_tail_source(spec.epilogue, TL_DTYPES[out_dt]),
        splitk_reduce=splitk_reduce_source(spec.epilogue, TL_DTYPES[out_dt]),
        configs=_configs(spec),
        n=n,
        k=k,
        words=words,
        fmt=str(fmt),
        layout=str(spec.layout("weight")),
        scale_shape=repr(sshape),
        x_torch=TORCH_DTYPES[x_dt],
        out_torch=TORCH_DTYPES[out_dt],
        checks="\n    ".join([zero_check, global_check, *epilogue_checks(spec.epilogue, n)]),
    )


_MODULE = Template('''"""dequant_gemm: $title.

Weight $fmt in $layout; x $x_torch; fp32 accumulation; out $out_torch.
See `mxc.codegen.templates.dequant_gemm` for the numerics.
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

$decode

$epilogue

# ---------------------------------------------------------------- kernels
@triton.jit
def dequant_gemm_kernel(
    x_ptr, w_ptr, scale_ptr, zero_ptr, global_ptr, bias_ptr, res_ptr, mul_ptr, out_ptr, part_ptr,
    M, stride_xm, stride_xk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_rm, stride_rn, stride_mm, stride_mn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, TILES_PER_SPLIT: tl.constexpr, SCALE_IN_ACC: tl.constexpr,
):
    """Tile (pid_m, pid_n) of y over the K tiles of split pid_k: TILES_PER_SPLIT tiles of
    BLOCK_K starting at pid_k * TILES_PER_SPLIT (tiles past K are fully masked). With one
    split the epilogue runs here; otherwise the fp32 partial sum goes to part[pid_k]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n[None, :] * WORDS  # [1, BLOCK_N]: first word of each row of W
    glob = 1.0
    if HAS_GLOBAL:
        glob = tl.load(global_ptr).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, TILES_PER_SPLIT):
        k0 = (pid_k * TILES_PER_SPLIT + i) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        wmask = k_mask[:, None] & n_mask[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        codes = _load_codes(w_rows, offs_k[:, None], wmask)  # [BLOCK_K, BLOCK_N]
        if SCALE_IN_ACC:
            # The K tile lies inside one scale group g: dot the exact element values and
            # scale the fp32 partial sum per column.
            g = k0 // GROUP
            col_mask = n_mask & (k0 < K)
            zero = 0.0
            if HAS_ZERO:
                zero = tl.load(zero_ptr + offs_n * stride_zn + g * stride_zg, mask=col_mask, other=0.0)
                zero = zero.to(tl.float32)[None, :]
            w = _decode(codes, zero)
            part = $dot_exact
            if ONE_GROUP:
                acc += part
            else:
                s = tl.load(scale_ptr + offs_n * stride_sn + g * stride_sg, mask=col_mask, other=0.0)
                acc += part * (s.to(tl.float32) * glob)[None, :]
        else:
            # Scale groups change inside the K tile: scale each element in fp32, fp32 dot.
            g = offs_k[:, None] // GROUP
            zero = 0.0
            if HAS_ZERO:
                zero = tl.load(zero_ptr + offs_n[None, :] * stride_zn + g * stride_zg, mask=wmask, other=0.0)
                zero = zero.to(tl.float32)
            s = tl.load(scale_ptr + offs_n[None, :] * stride_sn + g * stride_sg, mask=wmask, other=0.0)
            w = _decode(codes, zero) * (s.to(tl.float32) * glob)
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
    if ONE_GROUP:
        s = tl.load(scale_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)
        acc = acc * (s.to(tl.float32) * glob)[None, :]
$tail


$splitk_reduce


# ---------------------------------------------------------------- launch
$configs
#: The shape the scale (and zero point) tensors have.
SCALE_SHAPE = $scale_shape


def launch(x, weight, scale, zero=None, global_scale=None, bias=None, residual=None, out=None, multiplier=None):
    """y[..., $n] = x[..., $k] @ dequant(weight)^T (+ the epilogue), into `out` (allocated
    when None) and returned.

    x: $x_torch [..., $k]; weight: int32 [$n, $words] ($fmt codes, $layout);
    scale: float32/float16 SCALE_SHAPE; zero: zero point codes (asymmetric integers only);
    global_scale: float32 [1] (two-level formats only); bias: [$n]; residual: [..., $n];
    out: $out_torch [..., $n], contiguous; multiplier: [..., $n] (the "mul" step). All on
    x's device."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise LaunchError(f"{KERNEL}: x must be a $x_torch tensor [..., $k], got {x!r:.80}")
    lead = tuple(x.shape[:-1])
    dev = x.device
    expect(KERNEL, "x", x, (*lead, $k), ($x_torch,), dev)
    expect(KERNEL, "weight", weight, ($n, $words), (torch.int32,), dev, contiguous=True,
           note="$fmt codes, $layout")
    expect(KERNEL, "scale", scale, SCALE_SHAPE, FLOATS, dev)
    $checks
    out = output_tensor(KERNEL, out, (*lead, $n), $out_torch, dev)
    m = x.numel() // $k
    if m == 0:
        return out
    x2 = x.reshape(m, $k)
    out2 = out.view(m, $n)
    res2, mul2 = as_rows(residual, m, $n), as_rows(multiplier, m, $n)
    scale2 = scale.expand($n, SCALE_SHAPE[1])  # a per-tensor [1, 1] scale: stride 0 over rows
    zero2 = zero.expand($n, SCALE_SHAPE[1]) if zero is not None else None
    cfg = pick_config(CONFIGS, m)
    part = splitk_workspace(cfg, m, $n, dev)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv($n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    dequant_gemm_kernel[grid](
        x2, weight, scale2, zero2, global_scale, bias, res2, mul2, out2, part,
        m, *strides(x2), *strides(scale2), *strides(zero2), *strides(res2), *strides(mul2), *strides(out2),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=cfg["SPLIT_K"],
        TILES_PER_SPLIT=cfg["TILES_PER_SPLIT"], SCALE_IN_ACC=cfg["SCALE_IN_ACC"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    reduce_splitk(splitk_reduce_kernel, grid, cfg, m, part, bias, res2, mul2, out2)
    return out
''')
