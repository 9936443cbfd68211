"""Packing quantized codes into int32 words, for every bit width 1..8.

A `Layout` (`packed<bits=3,word=i32,axis=1>`) fixes how the codes of a quantized tensor lie
in memory; `pack` and `unpack` are its definition:

    words = pack(codes, Layout(bits=3, axis=1))          # uint8 [N, K] -> int32 [N, ceil(3K/32)]
    codes = unpack(words, Layout(bits=3, axis=1), K)     # and back, exactly

**Codes** are the non-negative integers an element is stored as (`to_codes` / `from_codes`):
an integer value offset by 2^(bits-1) for symmetric formats (int4: -8..7 -> 0..15), the
value itself for asymmetric ones (0..2^bits-1), and for float formats the element's bit
pattern sign|exponent|mantissa (`mxc.ir.quant.encode_bits`).

**Dense bit stream.** Along `axis` (the reduction axis K), each row of K codes is one
little-endian bit stream: element i takes stream bits [i·b, (i+1)·b), bit t of the stream is
bit t % 32 of word t // 32. Widths that do not divide 32 (3, 5, 6, 7) straddle word
boundaries; nothing is wasted but the tail of the last word, so a row takes exactly
ceil(b·K/32) words (ceil(b·K/32)·4 bytes) and the stream's padding bits are zero.

**Super-groups.** Every lcm(b, 32)/b = G elements fill W = lcm(b, 32)/32 words exactly
(`super_group(b)`: b=4 -> 8 elements in 1 word, b=3 -> 32 in 3, b=6 -> 16 in 3). Word
boundaries repeat with this period, so a kernel unpacks a super-group from W aligned words.

**order** (interleaving): a permutation of range(G), or () for the natural order. Slot p of
each super-group (stream bits [p·b, (p+1)·b) within its W words) holds the super-group's
element order[p]. For b in 1, 2, 4, 8 the super-group is one word, so this is the classic
element order inside a word (int4 tensor-core kernels use [0, 2, 4, 6, 1, 3, 5, 7], so one
shift-and-mask yields the even and odd elements as pairs). A layout with an order needs K to
be a multiple of G (a partial super-group has no well-defined interleave).

**tile** (tile order of a 2-D packed weight [N, Kw] words, axis 1): (tn, tw), or () for row
major. The word matrix is stored tile by tile: tiles of tn rows by tw words in row-major
tile order, each tile contiguous and row-major inside, so a kernel's tile is one contiguous
load. The storage tensor keeps the shape [N, Kw]; N must be a multiple of tn and Kw of tw.

Every function is vectorised over the whole tensor (no Python loop per element); packing
works in slabs of rows to bound the int64 temporaries.
"""

from __future__ import annotations

import math

import sympy
import torch

from . import quant as Q
from .formats import FloatFormat, IntFormat, Layout, NumberFormat

#: The only storage word (the word of every `Layout` this module packs).
WORD_BITS = {"i32": 32}
_SLAB = 1 << 22  # elements per slab of rows while packing (bounds the int64 temporaries)


def super_group(bits: int) -> tuple[int, int]:
    """(G, W): the fewest elements (G) of `bits` bits that fill whole 32-bit words (W)."""
    g = math.gcd(bits, 32)
    return 32 // g, bits // g


def packed_words(length: int | sympy.Expr, bits: int) -> int | sympy.Expr:
    """Words a row of `length` codes of `bits` bits takes: ceil(bits·length/32)."""
    if isinstance(length, int):
        return -(-bits * length // 32)
    return sympy.ceiling(bits * sympy.sympify(length) / 32)


def packed_shape(shape: tuple, layout: Layout) -> tuple:
    """The shape of the int32 storage of codes of `shape` packed with `layout`."""
    axis = layout.axis % len(shape)
    return (*shape[:axis], packed_words(shape[axis], layout.bits), *shape[axis + 1 :])


def packed_bytes(shape: tuple[int, ...], layout: Layout) -> int:
    """Bytes of the storage: rows · ceil(bits·K/32) · 4."""
    return math.prod(packed_shape(tuple(shape), layout)) * 4


def check_layout(layout: Layout, shape: tuple) -> str | None:
    """Why `layout` cannot pack codes of `shape` (None if it can): the word, the axis, the
    order's length and K's multiple of the super-group, the tile's rank and divisibility."""
    if layout.word not in WORD_BITS:
        return f"layout {layout}: word must be one of {', '.join(WORD_BITS)}, got {layout.word!r}"
    rank = len(shape)
    if not -rank <= layout.axis < rank:
        return f"layout {layout}: axis {layout.axis} out of range for codes of rank {rank}"
    axis = layout.axis % rank
    k = shape[axis]
    g, _ = super_group(layout.bits)
    if layout.order:
        if len(layout.order) != g:
            return (
                f"layout {layout}: order must permute the {g} elements of a super-group of {layout.bits}-bit "
                f"codes (lcm({layout.bits}, 32)/{layout.bits}), got {len(layout.order)} entries"
            )
        if isinstance(k, int) and k % g:
            return f"layout {layout}: an interleaved order needs K a multiple of {g}, got K={k}"
    if layout.tile:
        if len(layout.tile) != 2 or min(layout.tile) < 1:
            return f"layout {layout}: tile must be (rows, words), both positive, got {list(layout.tile)}"
        if rank != 2 or axis != 1:
            return f"layout {layout}: a tile order needs 2-D codes packed along axis 1, got rank {rank}, axis {axis}"
        n, kw = shape[0], packed_words(k, layout.bits)
        tn, tw = layout.tile
        if isinstance(n, int) and n % tn:
            return f"layout {layout}: {n} rows are not a multiple of the tile's {tn}"
        if isinstance(kw, int) and kw % tw:
            return f"layout {layout}: {kw} words per row are not a multiple of the tile's {tw}"
    return None


def _checked(layout: Layout, shape: tuple) -> int:
    problem = check_layout(layout, tuple(shape))
    if problem is not None:
        raise ValueError(problem)
    return layout.axis % len(shape)


def _geometry(bits: int, device: torch.device) -> tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """G, W and, per slot of a super-group: its first word, bit shift, and whether it straddles."""
    g, w = super_group(bits)
    offset = torch.arange(g, dtype=torch.int64, device=device) * bits
    return g, w, offset // 32, offset % 32, (offset % 32) + bits > 32


def pack(codes: torch.Tensor, layout: Layout) -> torch.Tensor:
    """`codes` (integers in [0, 2^bits)) packed into int32 words along `layout.axis` as the
    module docstring defines; the result has ceil(bits·K/32) words where `codes` has K."""
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"pack: codes must be an integer tensor (uint8 codes in [0, 2^bits)), got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("pack: codes must have at least one axis, got a scalar")
    axis = _checked(layout, tuple(codes.shape))
    bits = layout.bits
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= 2**bits:
            bad = lo if lo < 0 else hi
            raise ValueError(f"pack: codes must be in [0, {2**bits - 1}] for {bits}-bit layout {layout}, got {bad}")
    x = codes.movedim(axis, -1)
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    g, w, word0, shift, straddle = _geometry(bits, codes.device)
    nsg, nwords = -(-k // g), packed_words(k, bits)
    order = torch.tensor(layout.order, dtype=torch.int64, device=codes.device) if layout.order else None
    out = torch.empty(rows.shape[0], nwords, dtype=torch.int32, device=codes.device)
    slab = max(1, _SLAB // max(1, nsg * g))
    for r0 in range(0, rows.shape[0], slab):  # slabs of rows, not elements
        c = torch.nn.functional.pad(rows[r0 : r0 + slab].to(torch.int64), (0, nsg * g - k)).reshape(-1, nsg, g)
        if order is not None:
            c = c[..., order]
        words = torch.zeros(c.shape[0], nsg, w, dtype=torch.int64, device=codes.device)
        words.index_add_(2, word0, (c << shift) & 0xFFFFFFFF)  # disjoint bits: add is or
        if bool(straddle.any()):
            idx = straddle.nonzero().squeeze(1)
            words.index_add_(2, word0[idx] + 1, c[..., idx] >> (32 - shift[idx]))
        words = words.reshape(c.shape[0], nsg * w)[:, :nwords]
        out[r0 : r0 + slab] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    if layout.tile:
        out = _tile(out, layout.tile)
    return out.reshape(*lead, nwords).movedim(-1, axis).contiguous()


def unpack(words: torch.Tensor, layout: Layout, length: int) -> torch.Tensor:
    """The uint8 codes that `pack(codes, layout)` stored in `words`; `length` is K, the
    number of codes along `layout.axis` (a row's word count does not determine it)."""
    if words.dtype != torch.int32:
        raise TypeError(f"unpack: packed words must be int32 (word=i32), got {words.dtype}")
    if words.dim() == 0:
        raise ValueError("unpack: packed words must have at least one axis, got a scalar")
    if not -words.dim() <= layout.axis < words.dim():
        raise ValueError(f"unpack: layout {layout}: axis {layout.axis} out of range for words of rank {words.dim()}")
    shape = list(words.shape)
    shape[layout.axis] = length
    axis = _checked(layout, tuple(shape))
    bits = layout.bits
    nwords = packed_words(length, bits)
    if words.shape[axis] != nwords:
        raise ValueError(
            f"unpack: {length} codes of {bits} bits take {nwords} words along axis {axis}, "
            f"got {words.shape[axis]} (words shape {list(words.shape)})"
        )
    x = words.movedim(axis, -1)
    lead = x.shape[:-1]
    rows = x.reshape(-1, nwords)
    if layout.tile:
        rows = _untile(rows, layout.tile)
    g, w, word0, shift, straddle = _geometry(bits, words.device)
    nsg = -(-length // g)
    stream = torch.nn.functional.pad(rows.to(torch.int64) & 0xFFFFFFFF, (0, nsg * w - nwords)).reshape(-1, nsg, w)
    lo = stream[..., word0] >> shift
    hi = torch.where(straddle, stream[..., (word0 + 1).clamp(max=w - 1)] << (32 - shift), 0)
    slots = (lo | hi) & (2**bits - 1)
    if layout.order:
        slots = slots[..., torch.argsort(torch.tensor(layout.order, device=words.device))]
    codes = slots.reshape(-1, nsg * g)[:, :length].to(torch.uint8)
    return codes.reshape(*lead, length).movedim(-1, axis)


def _tile(words: torch.Tensor, tile: tuple[int, ...]) -> torch.Tensor:
    n, kw = words.shape
    tn, tw = tile
    return words.reshape(n // tn, tn, kw // tw, tw).permute(0, 2, 1, 3).reshape(n, kw)


def _untile(words: torch.Tensor, tile: tuple[int, ...]) -> torch.Tensor:
    n, kw = words.shape
    tn, tw = tile
    return words.reshape(n // tn, kw // tw, tn, tw).permute(0, 2, 1, 3).reshape(n, kw)


def to_codes(values: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """The uint8 codes of element `values` of `fmt` (integer values, or float grid values
    as `round_float` gives them; any dtype that holds them exactly, e.g. the int8 / uint8 /
    float16 storage of `mxc.passes.quantize.storage`). Raises for a value off the grid."""
    if isinstance(fmt, FloatFormat):
        return Q.encode_bits(values, fmt.spec).to(torch.uint8)
    if not isinstance(fmt, IntFormat):
        raise TypeError(f"to_codes: expected a number format, got {fmt!r}")
    lo, hi = Q.int_range(fmt.bits, fmt.symmetric)
    v = values.to(torch.float64) if values.dtype.is_floating_point else values.to(torch.int64)
    bad = (v < lo) | (v > hi)
    if v.dtype.is_floating_point:
        bad |= v != torch.round(v)  # NaN too
    if bool(bad.any()):
        raise ValueError(f"to_codes: {fmt} values must be integers in [{lo}, {hi}], got {v[bad].reshape(-1)[0].item()}")
    return (v - lo).to(torch.uint8)


def from_codes(codes: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """The float32 element values of uint8 `codes` of `fmt`: the inverse of `to_codes`."""
    if isinstance(fmt, FloatFormat):
        return Q.decode_bits(codes, fmt.spec)
    lo, _ = Q.int_range(fmt.bits, fmt.symmetric)
    return codes.to(torch.float32) + lo
