"""The attention template against the reference (`torch.nn.functional.scaled_dot_product_attention`
on keys and values dequantized with the formats' own numerics), under the Triton interpreter:
float and quantized KV caches (int8 and int4 per token, asymmetric, fp8, per group of the head
dim), keys and values in different formats, no mask / causal / boolean / float masks, grouped
query heads, a head dim (12) and lengths (1, 5, 17, 3x9) that are not tile multiples.

Tolerance: float32 sums in another order (online softmax), so |got - want| <= 2e-6 * max|want|
(measured about 1e-7)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mxc.codegen import LaunchError, load
from mxc.codegen.templates import attention
from mxc.ir import FloatFormat, IntFormat, parse_format
from mxc.ir.quant import encode_bits

HEADS, KV_HEADS, D = 6, 2, 12
FORMATS = [None, "int8<sym,token>", "int4<asym,token>", "fp8e4m3<token>", "int4<sym,g8>", "fp8e5m2<token>"]


def storage(q, fmt):
    """Codes in the kernel backends' storage convention."""
    if isinstance(fmt, FloatFormat):
        return encode_bits(q.codes, fmt.spec).to(torch.uint8)
    return q.codes.to(torch.int8 if fmt.symmetric else torch.uint8)


def operands(x: torch.Tensor, fmt, role: str):
    """(tensor for the kernel, launch kwargs, dequantized reference) of keys or values `x`."""
    if fmt is None:
        return x, {}, x
    q = fmt.quantize(x)
    kw = {f"{role}_scale": q.scale.float()}
    if q.zero is not None:
        kw[f"{role}_zero"] = q.zero.float()
    return storage(q, fmt), kw, fmt.dequantize(q)


def reference(q, k, v, mask, causal, scale):
    rep = HEADS // KV_HEADS
    k, v = (t.repeat_interleave(rep, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def make_mask(kind: str, b: int, s: int, t: int, gen: torch.Generator):
    if kind == "bool":
        m = torch.rand(b, 1, s, t, generator=gen) > 0.4
        m[..., 0] = True  # every query keeps a key
        return m
    if kind == "float":
        return torch.randn(b, 1, s, t, generator=gen)
    return None


CASES = [
    # (k format, v format, mask, causal, b, s, t)
    *[(f, f, "none", True, 2, 17, 17) for f in FORMATS],
    *[(f, f, "bool", False, 2, 5, 5) for f in FORMATS],
    ("int8<sym,token>", "int4<asym,token>", "float", False, 1, 17, 17),
    ("int4<asym,token>", None, "none", True, 3, 1, 1),  # one token: decode-like
    ("fp8e4m3<token>", "int8<sym,token>", "bool", False, 2, 3, 9),  # queries over a longer cache
    (None, None, "float", True, 2, 5, 5),  # a float mask and causal together
]


@pytest.mark.parametrize("kf, vf, mask_kind, causal, b, s, t", CASES)
def test_attention_matches_the_reference(kf, vf, mask_kind, causal, b, s, t):
    gen = torch.Generator().manual_seed(hash((kf, vf, mask_kind, causal, b, s, t)) % 2**31)
    fk, fv = (parse_format(f) if f else None for f in (kf, vf))
    q = torch.randn(b, HEADS, s, D, generator=gen)
    k = torch.randn(b, KV_HEADS, t, D, generator=gen) * 2
    v = torch.randn(b, KV_HEADS, t, D, generator=gen)
    kk, kkw, kd = operands(k, fk, "k")
    vv, vkw, vd = operands(v, fv, "v")
    mask = make_mask(mask_kind, b, s, t, gen)
    sp = attention.spec(HEADS, KV_HEADS, D, k=fk, v=fv, causal=causal, mask=mask_kind)
    got = load(sp).launch(q, kk, vv, mask=mask, **kkw, **vkw)
    want = reference(q, kd, vd, mask, causal, sp.option("scale"))
    assert got.shape == want.shape and not torch.isnan(got).any()
    assert (got - want).abs().max() <= 2e-6 * want.abs().max(), float((got - want).abs().max())


def test_strided_queries_and_a_row_with_no_key():
    """q as the transpose the graph hands over (not contiguous); a query whose boolean mask
    keeps no key gives 0, as torch's attention does."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 5, HEADS, D, generator=gen).transpose(1, 2)
    k, v = (torch.randn(2, KV_HEADS, 5, D, generator=gen) for _ in range(2))
    mask = torch.rand(2, 1, 5, 5, generator=gen) > 0.5
    mask[..., 0] = True
    mask[1, 0, 3] = False
    sp = attention.spec(HEADS, KV_HEADS, D, mask="bool")
    got = load(sp).launch(q, k, v, mask=mask)
    want = reference(q, k, v, mask, False, sp.option("scale"))
    assert torch.equal(want[1, :, 3], torch.zeros(HEADS, D)) and torch.equal(got[1, :, 3], want[1, :, 3])
    assert (got - want).abs().max() <= 2e-6 * want.abs().max()


def test_errors_name_what_was_expected():
    fmt = parse_format("int4<asym,token>")
    mod = load(attention.spec(HEADS, KV_HEADS, D, k=fmt, v=fmt))
    q = torch.randn(1, HEADS, 3, D)
    codes = torch.randint(0, 16, (1, KV_HEADS, 3, D), dtype=torch.uint8)
    scale, zero = torch.rand(1, KV_HEADS, 3, 1), torch.rand(1, KV_HEADS, 3, 1)
    with pytest.raises(LaunchError, match=r"k must be uint8 \[1, 2, 3, 12\] on cpu \(int4<asym,token> values\), got int8"):
        mod.launch(q, codes.to(torch.int8), codes, scale, zero, scale, zero)
    with pytest.raises(LaunchError, match=r"v_zero must be a tensor: float32 \[1, 2, 3, 1\]"):
        mod.launch(q, codes, codes, scale, zero, scale, None)
    with pytest.raises(LaunchError, match=r"takes no mask \(the spec has no mask\)"):
        mod.launch(q, codes, codes, scale, zero, scale, zero, mask=torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"7 query heads do not group over 2 KV heads"):
        attention.spec(7, 2, D)
    with pytest.raises(ValueError, match=r"must scale per token or per group of the head dim"):
        attention.spec(HEADS, KV_HEADS, D, k=parse_format("int8<sym,tensor>"))
    assert isinstance(fmt, IntFormat)
