"""The attention template (family "attention"): scaled dot-product attention that reads a
quantized KV cache, dequantizing keys and values as it loads them.

    out[b, h, s, :] = softmax(q[b, h, s] · k[b, h // G, t]ᵀ · scale (+ mask)) · v[b, h // G, t]

for `h` in `HEADS` query heads sharing `KV_HEADS` key/value heads (grouped-query attention:
G = HEADS // KV_HEADS), exactly the function of `runtime/reference.py::_attention`
(`torch.nn.functional.scaled_dot_product_attention` with `attn_mask` and `is_causal`). Keys
and values are float, or codes in the kernel backends' storage convention (symmetric
integers: int8 values; asymmetric: uint8 values with a float32 zero point; float formats:
uint8 bit patterns, decoded exactly by `common.decode_source`) with float32 scales per token
(`[b, hkv, t, 1]`) or per group of the head dim (`[b, hkv, t, ceil(D/g)]`): the value of an
element is `(code - zero) · scale`, the format's `dequantize`.

The kernel is a flash-attention loop: one program per (query block, batch·head), over key
blocks with an online softmax (running max and sum in float32); products are float32 dots
(`input_precision="ieee"`), so the result differs from the reference only by the order of
float32 sums (and exp's last bit). A boolean mask keeps True entries, a float mask is added
to the scores, and `causal` keeps key t <= query s (torch's top-left alignment); a query row
that keeps no key yields 0, as torch's `scaled_dot_product_attention` gives.
"""

from __future__ import annotations

import re
from string import Template

from ...ir import FloatFormat, IntFormat, NumberFormat
from ..spec import KernelSpec, Tiles
from .common import code_constants, constants, decode_source

FAMILY = "attention"
MASKS = ("none", "bool", "float")


def spec(
    heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    k: NumberFormat | str | None = None,
    v: NumberFormat | str | None = None,
    causal: bool = False,
    mask: str = "none",
    scale: float | None = None,
) -> KernelSpec:
    """The spec of attention over `heads` query heads and `kv_heads` key/value heads of
    `head_dim`, keys and values in formats `k` / `v` (None: float32), with a `mask` kind
    ("none", "bool", "float"), `causal`, and the score `scale` (default 1/sqrt(head_dim))."""
    formats = {role: f for role, f in (("k", k), ("v", v)) if f is not None}
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    tiles = (Tiles(max_m=None, block_m=16, block_n=32, block_k=block_d, num_warps=4, num_stages=2),)
    out = KernelSpec(
        FAMILY, {"heads": heads, "kv_heads": kv_heads, "d": head_dim}, formats, {}, {"q": "f32", "out": "f32"},
        (), tiles, {"causal": bool(causal), "mask": mask, "scale": float(scale if scale is not None else head_dim**-0.5)},
    )
    check(out)
    return out


def check(spec: KernelSpec) -> None:
    """Raise ValueError naming what this template cannot generate for `spec`."""
    if spec.family != FAMILY:
        raise ValueError(f"the attention template cannot generate a {spec.family!r} kernel")
    dims = {k for k, _ in spec.dims}
    if dims != {"heads", "kv_heads", "d"}:
        raise ValueError(f"{spec}: an attention spec has dims ['d', 'heads', 'kv_heads'], got {sorted(dims)}")
    if spec.dim("heads") % spec.dim("kv_heads"):
        raise ValueError(f"{spec}: {spec.dim('heads')} query heads do not group over {spec.dim('kv_heads')} KV heads")
    roles = {k for k, _ in spec.formats}
    if not roles <= {"k", "v"} or spec.layouts:
        raise ValueError(f"{spec}: keys and values are float or unpacked codes of formats 'k' / 'v', got {sorted(roles)}")
    for role, fmt in spec.formats:
        if fmt.scaling.kind not in ("token", "group"):
            raise ValueError(f"{spec}: {role} format {fmt} must scale per token or per group of the head dim")
        if isinstance(fmt, FloatFormat) and fmt.global_:
            raise ValueError(f"{spec}: {role} format {fmt} has a global scale; KV caches scale per token or group")
    if spec.option("mask") not in MASKS:
        raise ValueError(f"{spec}: mask must be one of {', '.join(MASKS)}, got {spec.option('mask')!r}")
    if spec.dtype("q") != "f32" or spec.dtype("out") != "f32":
        raise ValueError(f"{spec}: q and out are f32")


def _role_source(role: str, fmt: NumberFormat | None, d: int) -> tuple[str, str]:
    """(constants, `_load_<role>` helper) for keys or values stored as `fmt` (None: float)."""
    name = f"_load_{role}"
    if fmt is None:
        return "", f'''@triton.jit
def {name}(ptr, scale_ptr, zero_ptr, rows, offs_d, mask, stride_t, stride_d, stride_st, stride_sg):
    """Float {role} rows `rows` ([BLOCK_T, 1]) at head-dim offsets `offs_d` ([1, BLOCK_D])."""
    return tl.load(ptr + rows * stride_t + offs_d * stride_d, mask=mask, other=0.0).to(tl.float32)
'''
    upper = role.upper()
    group = fmt.scaling.block(d)
    if isinstance(fmt, IntFormat):
        if fmt.symmetric:
            value = "codes.to(tl.float32)"  # int8 storage holds the signed value
        else:
            value = "codes.to(tl.float32) - tl.load(zero_ptr + srow, mask=mask, other=0.0)"
        helpers = ""
    else:
        value = f"{upper}_decode((codes.to(tl.int32) & 0xFF), 0.0)"  # uint8 bit patterns, decoded exactly
        helpers = decode_source(fmt).replace("def _decode(", f"def {upper}_decode(")
        for const, _, _ in code_constants(fmt):  # keys and values may differ: prefix each constant
            helpers = re.sub(rf"\b{const}\b", f"{upper}_{const}", helpers)
    consts = [(f"{upper}_GROUP", group, f"{fmt}: head-dim elements per scale")]
    if isinstance(fmt, FloatFormat):
        consts += [(f"{upper}_{c}", v, doc) for c, v, doc in code_constants(fmt)]
    return constants(consts), f'''{helpers}
@triton.jit
def {name}(ptr, scale_ptr, zero_ptr, rows, offs_d, mask, stride_t, stride_d, stride_st, stride_sg):
    """{fmt} {role} rows `rows` ([BLOCK_T, 1]) at head-dim offsets `offs_d` ([1, BLOCK_D]):
    (code - zero) * scale, the format's dequantize (scales [.., t, ceil(D / {upper}_GROUP)])."""
    codes = tl.load(ptr + rows * stride_t + offs_d * stride_d, mask=mask, other=0)
    srow = rows * stride_st + (offs_d // {upper}_GROUP) * stride_sg
    scale = tl.load(scale_ptr + srow, mask=mask, other=0.0)
    return ({value}) * scale
'''


def render(spec: KernelSpec) -> str:
    """The module source: the kernel and `launch` (see the module docstring)."""
    check(spec)
    d = spec.dim("d")
    fk = dict(spec.formats).get("k")
    fv = dict(spec.formats).get("v")
    kc, k_src = _role_source("k", fk, d)
    vc, v_src = _role_source("v", fv, d)
    tiles = spec.tiles[-1]
    mask_kind = spec.option("mask")
    consts = constants([
        ("HEADS", spec.dim("heads"), "query heads"),
        ("KV_HEADS", spec.dim("kv_heads"), "key/value heads (grouped-query attention)"),
        ("GROUP", spec.dim("heads") // spec.dim("kv_heads"), "query heads per key/value head"),
        ("D", d, "head dim"),
        ("BLOCK_D", tiles.block_k, "head dim, padded to a power of two >= 16"),
        ("BLOCK_S", tiles.block_m, "queries per program"),
        ("BLOCK_T", tiles.block_n, "keys per step"),
        ("CAUSAL", spec.option("causal"), "keep key t <= query s"),
        ("MASK", MASKS.index(mask_kind), "0: no mask, 1: boolean (keep True), 2: float (added)"),
        ("SCALE", spec.option("scale"), "the score scale"),
    ])
    return Template(_SOURCE).substitute(
        consts="\n".join(c for c in (consts, kc, vc) if c), load_k=k_src, load_v=v_src,
        k_quant=fk is not None, v_quant=fv is not None, k_zero=_has_zero(fk), v_zero=_has_zero(fv),
        k_dtype=_storage(fk), v_dtype=_storage(fv), k_fmt=fk or "f32", v_fmt=fv or "f32",
        k_groups=_groups(fk, d), v_groups=_groups(fv, d), kernel_name=str(spec),
    )


def _has_zero(fmt: NumberFormat | None) -> bool:
    return isinstance(fmt, IntFormat) and not fmt.symmetric


def _storage(fmt: NumberFormat | None) -> str:
    if fmt is None:
        return "torch.float32"
    return "torch.int8" if isinstance(fmt, IntFormat) and fmt.symmetric else "torch.uint8"


def _groups(fmt: NumberFormat | None, d: int) -> int:
    return 0 if fmt is None else -(-d // fmt.scaling.block(d))


_SOURCE = '''
import torch
import triton
import triton.language as tl

from mxc.codegen.templates.checks import LaunchError, expect, expect_none

KERNEL = "$kernel_name"
$consts

$load_k
$load_v

@triton.jit
def attention_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, mask_ptr, out_ptr, S, T,
    sq_b, sq_h, sq_s, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
    sks_b, sks_h, sks_t, sks_g, svs_b, svs_h, svs_t, svs_g, sm_b, sm_h, sm_s, sm_t,
):
    """One block of BLOCK_S queries of one (batch, head): an online softmax over key blocks."""
    pid_s = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HEADS
    h = bh % HEADS
    hk = h // GROUP
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_s[:, None] < S) & (offs_d[None, :] < D)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_s[:, None] * sq_s + offs_d[None, :] * sq_d, mask=q_mask, other=0.0)
    m_i = tl.full((BLOCK_S,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_S,), tl.float32)
    acc = tl.zeros((BLOCK_S, BLOCK_D), tl.float32)
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        kv_mask = (offs_t[:, None] < T) & (offs_d[None, :] < D)
        k = _load_k(k_base, ks_ptr + b * sks_b + hk * sks_h, kz_ptr + b * sks_b + hk * sks_h, offs_t[:, None],
                    offs_d[None, :], kv_mask, sk_t, sk_d, sks_t, sks_g)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * SCALE
        keep = (offs_t[None, :] < T) & (offs_s[:, None] < S)
        if CAUSAL:
            keep = keep & (offs_t[None, :] <= offs_s[:, None])
        if MASK == 1:
            m = tl.load(mask_ptr + b * sm_b + h * sm_h + offs_s[:, None] * sm_s + offs_t[None, :] * sm_t,
                        mask=keep, other=0)
            keep = keep & (m != 0)
        if MASK == 2:
            scores += tl.load(mask_ptr + b * sm_b + h * sm_h + offs_s[:, None] * sm_s + offs_t[None, :] * sm_t,
                              mask=keep, other=0.0)
        scores = tl.where(keep, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN from -inf - -inf
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_v(v_base, vs_ptr + b * svs_b + hk * svs_h, vz_ptr + b * svs_b + hk * svs_h, offs_t[:, None],
                    offs_d[None, :], kv_mask, sv_t, sv_d, svs_t, svs_g)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    # a query that kept no key (and a padding row) gives 0, as torch's attention does
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + bh * S * D + offs_s[:, None] * D + offs_d[None, :], out, mask=q_mask)


def _kv(name, t, scale, zero, quant, has_zero, groups, dtype, fmt, b, t_len, dev):
    expect(KERNEL, name, t, (b, KV_HEADS.value, t_len, D.value), (dtype,), dev,
           note=f"{fmt} values" if quant else "float keys/values")
    if not quant:
        expect_none(KERNEL, name + "_scale", scale, f"{name} is float")
        expect_none(KERNEL, name + "_zero", zero, f"{name} is float")
        return t.new_zeros(1), t.new_zeros(1), (0, 0, 0, 0)
    expect(KERNEL, name + "_scale", scale, (b, KV_HEADS.value, t_len, groups), (torch.float32,), dev)
    if has_zero:
        expect(KERNEL, name + "_zero", zero, (b, KV_HEADS.value, t_len, groups), (torch.float32,), dev)
        if zero.stride() != scale.stride():
            zero = zero.contiguous()
            scale = scale.contiguous()
    else:
        expect_none(KERNEL, name + "_zero", zero, f"{fmt} is symmetric")
        zero = scale
    return scale, zero, scale.stride()


def launch(q, k, v, k_scale=None, k_zero=None, v_scale=None, v_zero=None, mask=None, out=None):
    """Attention of q [B, HEADS, S, D] over keys k and values v [B, KV_HEADS, T, D] (${k_fmt} /
    ${v_fmt}; scales [B, KV_HEADS, T, groups], zero points likewise for asymmetric integers),
    with `mask` broadcastable to [B, HEADS, S, T] when the spec has one; into `out` (float32
    [B, HEADS, S, D], allocated when None), returned."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise LaunchError(f"{KERNEL}: q must be a float32 tensor [B, {HEADS.value}, S, {D.value}], got {q!r:.80}")
    dev = q.device
    b, _, s, _ = q.shape
    expect(KERNEL, "q", q, (b, HEADS.value, s, D.value), (torch.float32,), dev)
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise LaunchError(f"{KERNEL}: k must be a tensor [B, {KV_HEADS.value}, T, {D.value}], got {k!r:.80}")
    t_len = k.shape[2]
    ks, kz, sks = _kv("k", k, k_scale, k_zero, ${k_quant}, ${k_zero}, ${k_groups}, ${k_dtype}, "${k_fmt}", b, t_len, dev)
    vs, vz, svs = _kv("v", v, v_scale, v_zero, ${v_quant}, ${v_zero}, ${v_groups}, ${v_dtype}, "${v_fmt}", b, t_len, dev)
    if MASK.value == 0:
        expect_none(KERNEL, "mask", mask, "the spec has no mask")
        mask_t, sm = q.new_zeros(1), (0, 0, 0, 0)
    else:
        want = (torch.bool,) if MASK.value == 1 else (torch.float32,)
        expect(KERNEL, "mask", mask, None, want, dev)
        try:  # broadcast dims get stride 0: the kernel reads the mask as it is stored
            mask_t = (mask.to(torch.uint8) if MASK.value == 1 else mask).expand(b, HEADS.value, s, t_len)
        except RuntimeError:
            raise LaunchError(f"{KERNEL}: mask {list(mask.shape)} does not broadcast to {[b, HEADS.value, s, t_len]}") from None
        sm = mask_t.stride()
    if out is None:
        out = torch.empty((b, HEADS.value, s, D.value), dtype=torch.float32, device=dev)
    else:
        expect(KERNEL, "out", out, (b, HEADS.value, s, D.value), (torch.float32,), dev, contiguous=True)
    if b * s == 0:
        return out
    grid = (triton.cdiv(s, BLOCK_S.value), b * HEADS.value)
    attention_kernel[grid](
        q, k, v, ks, kz, vs, vz, mask_t, out, s, t_len, *q.stride(), *k.stride(), *v.stride(), *sks, *svs, *sm,
        num_warps=4,
    )
    return out
'''
