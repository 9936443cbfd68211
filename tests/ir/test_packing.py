"""Packing codes into int32 words (`mxc.ir.packing`) and the bit patterns of the float element
formats (`mxc.ir.quant.encode_bits` / `decode_bits`).

The layout is checked against an independent definition, a Python big integer per row
(`stream_words`: element i at bits [i·b, (i+1)·b) of a little-endian stream), at every width
1..8 and at K that are not multiples of anything (1, 7, 33, 100, 577); interleaving against
a gather of the natural layout, tiles against a block reshuffle. Float bit patterns are
checked on every grid value and every code, against torch's own float8 casts and the OCP
tables. Codes are random and fresh per example."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mxc.ir import FloatFormat, IntFormat, Layout, Scaling
from mxc.ir import quant as Q
from mxc.ir.packing import (
    check_layout, from_codes, pack, packed_bytes, packed_shape, packed_words, super_group, to_codes, unpack,
)

SETTINGS = settings(max_examples=60, deadline=None)
ODD_K = [1, 7, 33, 100, 577]
F8 = {"fp8e4m3": torch.float8_e4m3fn, "fp8e5m2": torch.float8_e5m2}


def random_codes(shape, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, tuple(shape), generator=g, dtype=torch.int64).to(torch.uint8)


def stream_words(row: list[int], bits: int) -> list[int]:
    """The layout's definition, one row: a little-endian bit stream cut into 32-bit words."""
    n = sum(c << (i * bits) for i, c in enumerate(row))
    return [(n >> (32 * j)) & 0xFFFFFFFF for j in range(math.ceil(bits * len(row) / 32))]


def unsigned(words: torch.Tensor) -> list[list[int]]:
    return [[w & 0xFFFFFFFF for w in r] for r in words.tolist()]


# --------------------------------------------------------------------------- the dense stream


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", ODD_K)
def test_pack_is_the_dense_bit_stream(bits, k):
    codes = random_codes((3, k), bits, seed=bits * 1000 + k)
    lay = Layout(bits=bits, axis=1)
    words = pack(codes, lay)
    assert words.dtype == torch.int32 and tuple(words.shape) == (3, math.ceil(bits * k / 32))
    assert words.numel() * 4 == packed_bytes((3, k), lay) == 3 * math.ceil(bits * k / 32) * 4
    assert unsigned(words) == [stream_words(r, bits) for r in codes.tolist()]
    back = unpack(words, lay, k)
    assert back.dtype == torch.uint8 and torch.equal(back, codes)


@SETTINGS
@given(
    bits=st.integers(1, 8),
    k=st.one_of(st.sampled_from(ODD_K), st.integers(1, 400)),
    rows=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_any_width_any_k(bits, k, rows, seed):
    codes = random_codes((rows, k), bits, seed)
    lay = Layout(bits=bits, axis=1)
    words = pack(codes, lay)
    assert tuple(words.shape) == (rows, packed_words(k, bits)) == packed_shape((rows, k), lay)
    assert words.shape[1] == -(-bits * k // 32)
    assert torch.equal(unpack(words, lay, k), codes)
    # codes of any integer dtype pack the same
    assert torch.equal(pack(codes.to(torch.int64), lay), words)


@SETTINGS
@given(bits=st.integers(1, 8), shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), data=st.data())
def test_round_trip_along_any_axis(bits, shape, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    codes = random_codes(shape, bits, data.draw(st.integers(0, 2**31 - 1)))
    lay = Layout(bits=bits, axis=axis)
    words = pack(codes, lay)
    assert tuple(words.shape) == packed_shape(tuple(shape), lay)
    assert torch.equal(unpack(words, lay, shape[axis]), codes)
    # the same words as packing the moved axis last
    last = pack(codes.movedim(axis, -1), Layout(bits=bits, axis=-1))
    assert torch.equal(words.movedim(axis, -1), last)


def test_super_groups():
    assert {b: super_group(b) for b in range(1, 9)} == {
        1: (32, 1), 2: (16, 1), 3: (32, 3), 4: (8, 1), 5: (32, 5), 6: (16, 3), 7: (32, 7), 8: (4, 1)
    }


def test_straddling_widths_have_no_padding_inside_a_row():
    """3-bit element 10 takes bits 30, 31 of word 0 and bit 0 of word 1."""
    codes = torch.zeros(1, 11, dtype=torch.uint8)
    codes[0, 10] = 0b101
    words = unsigned(pack(codes, Layout(bits=3, axis=1)))
    assert words == [[0b01 << 30, 0b1]]


# --------------------------------------------------------------------------- order and tile


def test_int4_interleave_known_word():
    codes = torch.arange(8, dtype=torch.uint8)[None]
    assert unsigned(pack(codes, Layout(bits=4, axis=1))) == [[0x76543210]]
    assert unsigned(pack(codes, Layout(bits=4, axis=1, order=(0, 2, 4, 6, 1, 3, 5, 7)))) == [[0x75316420]]


@SETTINGS
@given(bits=st.integers(1, 8), groups=st.integers(1, 4), rows=st.integers(1, 3), data=st.data())
def test_order_permutes_each_super_group(bits, groups, rows, data):
    g, _ = super_group(bits)
    order = tuple(data.draw(st.permutations(range(g))))
    codes = random_codes((rows, groups * g), bits, data.draw(st.integers(0, 2**31 - 1)))
    lay = Layout(bits=bits, axis=1, order=order)
    words = pack(codes, lay)
    # slot p of a super-group holds its element order[p]: the natural packing of the gathered codes
    gathered = codes.reshape(rows, groups, g)[..., list(order)].reshape(rows, groups * g)
    assert torch.equal(words, pack(gathered, Layout(bits=bits, axis=1)))
    assert torch.equal(unpack(words, lay, groups * g), codes)


@SETTINGS
@given(bits=st.integers(1, 8), tn=st.integers(1, 4), tw=st.integers(1, 3), nt=st.integers(1, 3), data=st.data())
def test_tile_stores_blocks_contiguously(bits, tn, tw, nt, data):
    n = tn * data.draw(st.integers(1, 3))
    k = (tw * nt * 32) // bits  # the most codes that take tw·nt words per row
    codes = random_codes((n, k), bits, data.draw(st.integers(0, 2**31 - 1)))
    natural = pack(codes, Layout(bits=bits, axis=1))
    kw = natural.shape[1]
    assert kw == tw * nt
    lay = Layout(bits=bits, axis=1, tile=(tn, tw))
    tiled = pack(codes, lay)
    assert tiled.shape == natural.shape
    blocks = [natural[i : i + tn, j : j + tw].reshape(-1) for i in range(0, n, tn) for j in range(0, kw, tw)]
    assert torch.equal(tiled.reshape(-1), torch.cat(blocks))
    assert torch.equal(unpack(tiled, lay, k), codes)


# --------------------------------------------------------------------------- errors


def test_errors_name_what_was_expected_and_what_came():
    lay = Layout(bits=3, axis=1)
    with pytest.raises(TypeError, match=re.escape("codes must be an integer tensor (uint8 codes in [0, 2^bits)), got torch.float32")):
        pack(torch.zeros(2, 5), lay)
    with pytest.raises(ValueError, match=re.escape("codes must be in [0, 7] for 3-bit layout packed<bits=3,word=i32,axis=1>, got 8")):
        pack(torch.tensor([[1, 8, 2]]), lay)
    with pytest.raises(ValueError, match=re.escape("codes must be in [0, 7] for 3-bit layout packed<bits=3,word=i32,axis=1>, got -1")):
        pack(torch.tensor([[1, -1]], dtype=torch.int8), lay)
    with pytest.raises(TypeError, match=re.escape("packed words must be int32 (word=i32), got torch.int64")):
        unpack(torch.zeros(2, 10, dtype=torch.int64), lay, 100)
    with pytest.raises(ValueError, match=re.escape("100 codes of 3 bits take 10 words along axis 1, got 9")):
        unpack(torch.zeros(2, 9, dtype=torch.int32), lay, 100)
    with pytest.raises(ValueError, match="word must be one of i32, got 'i16'"):
        pack(torch.zeros(2, 5, dtype=torch.uint8), Layout(bits=3, axis=1, word="i16"))
    with pytest.raises(ValueError, match="axis 2 out of range for codes of rank 2"):
        pack(torch.zeros(2, 5, dtype=torch.uint8), Layout(bits=3, axis=2))
    with pytest.raises(ValueError, match=re.escape("order must permute the 8 elements of a super-group of 4-bit codes (lcm(4, 32)/4), got 4")):
        pack(torch.zeros(2, 16, dtype=torch.uint8), Layout(bits=4, axis=1, order=(0, 2, 1, 3)))
    with pytest.raises(ValueError, match="an interleaved order needs K a multiple of 8, got K=12"):
        pack(torch.zeros(2, 12, dtype=torch.uint8), Layout(bits=4, axis=1, order=(0, 2, 4, 6, 1, 3, 5, 7)))
    with pytest.raises(ValueError, match=re.escape("tile must be (rows, words), both positive, got [2]")):
        pack(torch.zeros(2, 16, dtype=torch.uint8), Layout(bits=4, axis=1, tile=(2,)))
    with pytest.raises(ValueError, match="a tile order needs 2-D codes packed along axis 1, got rank 3, axis 2"):
        pack(torch.zeros(2, 2, 16, dtype=torch.uint8), Layout(bits=4, axis=2, tile=(1, 1)))
    with pytest.raises(ValueError, match="3 words per row are not a multiple of the tile's 2"):
        pack(torch.zeros(2, 24, dtype=torch.uint8), Layout(bits=4, axis=1, tile=(1, 2)))
    assert check_layout(Layout(bits=4, axis=1, tile=(2, 3)), (4, 24)) is None


# --------------------------------------------------------------------------- element codes

FLOAT_NAMES = list(Q.FLOAT_SPECS)


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_float_bits_round_trip_every_grid_value(name):
    spec = Q.FLOAT_SPECS[name]
    grid = FloatFormat(name, Scaling("tensor")).grid()
    values = torch.cat([grid, torch.tensor([-0.0])])
    bits = Q.encode_bits(values, spec)
    assert bits.dtype == torch.int32 and int(bits.min()) >= 0 and int(bits.max()) < 2 ** (1 + spec.ebits + spec.mbits)
    assert len(set(bits.tolist())) == len(values)  # -0.0 has its own code
    back = Q.decode_bits(bits, spec)
    assert torch.equal(back, values) and torch.equal(torch.signbit(back), torch.signbit(values))
    fmt = FloatFormat(name, Scaling("tensor"))
    assert torch.equal(from_codes(to_codes(values.half(), fmt), fmt), values)  # from the float16 storage


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_every_float_code_decodes_and_encodes_back(name):
    spec = Q.FLOAT_SPECS[name]
    n = 1 + spec.ebits + spec.mbits
    codes = torch.arange(2**n)
    values = Q.decode_bits(codes, spec)
    nan = torch.isnan(values)
    assert int(nan.sum()) == {"fp8e4m3": 2, "fp8e5m2": 6}.get(name, 0)
    assert torch.equal(Q.encode_bits(values[~nan], spec).long(), codes[~nan])
    finite = values[torch.isfinite(values)]
    assert float(finite.abs().max()) == spec.max
    grid = FloatFormat(name, Scaling("tensor")).grid()
    assert torch.equal(torch.unique(finite), grid)  # every code is a grid value, every grid value has a code


@pytest.mark.parametrize("name", list(F8))
def test_fp8_bits_match_torch(name):
    spec = Q.FLOAT_SPECS[name]
    values = FloatFormat(name, Scaling("tensor")).grid()
    values = torch.cat([values, torch.tensor([-0.0])] + ([torch.tensor([math.inf, -math.inf])] if spec.has_inf else []))
    want = values.to(F8[name]).view(torch.uint8).long()
    assert torch.equal(Q.encode_bits(values, spec).long(), want)
    assert Q.encode_bits(torch.tensor([math.nan]), spec).item() == 0x7F


def test_known_float_codes():
    """OCP MX table: e2m1 0, 0.5, 1, 1.5, 2, 3, 4, 6 are codes 0..7; the largest fp6 codes."""
    e2m1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert Q.encode_bits(e2m1, Q.FLOAT_SPECS["fp4e2m1"]).tolist() == list(range(8))
    assert Q.encode_bits(-e2m1[1:], Q.FLOAT_SPECS["fp4e2m1"]).tolist() == list(range(9, 16))
    assert Q.encode_bits(torch.tensor([7.5]), Q.FLOAT_SPECS["fp6e2m3"]).item() == 0b011111
    assert Q.encode_bits(torch.tensor([-28.0]), Q.FLOAT_SPECS["fp6e3m2"]).item() == 0b111111
    assert Q.encode_bits(torch.tensor([2.0**-3]), Q.FLOAT_SPECS["fp6e2m3"]).item() == 0b000001  # smallest subnormal


def test_float_bit_errors():
    fp4 = Q.FLOAT_SPECS["fp4e2m1"]
    with pytest.raises(ValueError, match=re.escape("value 0.30000001192092896 is not on the grid of fp4e2m1")):
        Q.encode_bits(torch.tensor([1.0, 0.3]), fp4)
    with pytest.raises(ValueError, match="not on the grid of fp4e2m1.*no NaN or infinity"):
        Q.encode_bits(torch.tensor([math.nan]), fp4)
    with pytest.raises(ValueError, match="value 7.0 is not on the grid of fp4e2m1"):
        Q.encode_bits(torch.tensor([7.0]), fp4)
    with pytest.raises(ValueError, match="value 480.0 is not on the grid of fp8e4m3"):
        Q.encode_bits(torch.tensor([480.0]), Q.FLOAT_SPECS["fp8e4m3"])
    with pytest.raises(ValueError, match=re.escape("bit pattern 16 out of range for fp4e2m1: expected 0..15 (4 bits)")):
        Q.decode_bits(torch.tensor([3, 16]), fp4)
    with pytest.raises(ValueError, match="bit patterns must be an integer tensor, got torch.float32"):
        Q.decode_bits(torch.tensor([3.0]), fp4)


@pytest.mark.parametrize("bits, symmetric", [(b, s) for b in range(1, 9) for s in (True, False) if b > 1 or not s])
def test_int_codes_cover_the_range(bits, symmetric):
    fmt = IntFormat(bits, symmetric, Scaling("channel"))
    grid = fmt.grid()
    codes = to_codes(grid, fmt)
    assert codes.dtype == torch.uint8 and codes.tolist() == list(range(2**bits))
    assert torch.equal(from_codes(codes, fmt), grid)
    storage = grid.to(torch.int8 if symmetric else torch.uint8)  # as the quantize pass stores codes
    assert torch.equal(to_codes(storage, fmt), codes)
    lo, hi = Q.int_range(bits, symmetric)
    with pytest.raises(ValueError, match=re.escape(f"values must be integers in [{lo}, {hi}], got {hi + 1}")):
        to_codes(torch.tensor([float(hi + 1)]), fmt)
    with pytest.raises(ValueError, match=re.escape(f"values must be integers in [{lo}, {hi}], got 0.5")):
        to_codes(torch.tensor([0.5]), fmt)
