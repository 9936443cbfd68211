"""The reference numerics of the number formats (`mxc.ir.quant`, `IntFormat`, `FloatFormat`):
the oracle every kernel is tested against, so it is checked here against independent
formulas, against torch's own float8 casts, and against the properties the OCP MX and NVFP4
specifications state. Data is random and fresh per test, and the reduction axis is not a
multiple of the group size (K = 200 with groups of 64, K = 72 with groups of 32)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mxc.ir import FloatFormat, IntFormat, Scaling, parse_format
from mxc.ir import quant as Q
from mxc.ir.formats import ALIASES, FLOAT_ELEMENTS, QTensor
from mxc.ir.ops import quant_parts, scale_shape

SETTINGS = settings(max_examples=40, deadline=None)

INT_SCALINGS = [Scaling("tensor"), Scaling("channel"), Scaling("token"), Scaling("group", 64), Scaling("group", 32)]
FLOAT_SCALINGS = [Scaling("tensor"), Scaling("channel"), Scaling("token"), Scaling("group", 64), Scaling("block", 32)]
INT_FORMATS = [IntFormat(b, sym, sc) for b in range(2, 9) for sym in (True, False) for sc in INT_SCALINGS]
FLOAT_FORMATS = [FloatFormat(n, sc) for n in FLOAT_ELEMENTS for sc in FLOAT_SCALINGS] + [
    parse_format(a) for a in ALIASES
]
ALL_FORMATS = INT_FORMATS + FLOAT_FORMATS
F8 = {"fp8e4m3": torch.float8_e4m3fn, "fp8e5m2": torch.float8_e5m2}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def weights(n: int, k: int, seed: int) -> torch.Tensor:
    """Gaussian rows whose magnitudes span a few orders of magnitude, plus a few outliers."""
    g = gen(seed)
    x = torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g) * 1.5)
    x[torch.rand(n, k, generator=g) < 0.01] *= 8.0
    return x


def per_element(t: torch.Tensor, fmt, k: int) -> torch.Tensor:
    """A per-block tensor ([..., n_blocks], or [1, 1] per tensor) spread over the elements [..., k]."""
    block = fmt.scaling.block(k)
    if block is None:
        return t.reshape(-1)[0]
    return t.repeat_interleave(block, dim=-1)[..., :k]


def full_scale(q: QTensor, fmt, k: int) -> torch.Tensor:
    s = per_element(q.scale, fmt, k)
    return s * q.global_scale if q.global_scale is not None else s


def bits_of(x: torch.Tensor) -> torch.Tensor:
    return x.float().view(torch.int32)


# --------------------------------------------------------------------------- grids


def test_int_grids():
    for bits in range(1, 9):
        assert torch.equal(IntFormat(bits, False, Scaling("channel")).grid(), torch.arange(0, 2**bits).float())
    for bits in range(2, 9):
        half = 2 ** (bits - 1)
        assert torch.equal(IntFormat(bits, True, Scaling("channel")).grid(), torch.arange(-half, half).float())


def test_fp4_grid_is_the_e2m1_table():
    want = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    grid = parse_format("mxfp4").grid()
    assert grid.tolist() == [-v for v in reversed(want[1:])] + want


@pytest.mark.parametrize("name", ["fp8e4m3", "fp8e5m2"])
def test_fp8_grid_is_every_finite_torch_float8_value(name):
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(F8[name]).float()
    every = torch.unique(every[torch.isfinite(every)])  # ±0 once, sorted
    assert torch.equal(FloatFormat(name, Scaling("tensor")).grid(), every)
    assert FloatFormat(name, Scaling("tensor")).spec.max == torch.finfo(F8[name]).max


def test_fp6_grids():
    for name, top, n in [("fp6e3m2", 28.0, 63), ("fp6e2m3", 7.5, 63)]:
        grid = FloatFormat(name, Scaling("tensor")).grid()
        assert len(grid) == n and grid.max() == top and grid.min() == -top
        assert torch.equal(grid, torch.unique(grid))


@pytest.mark.parametrize("name", sorted(FLOAT_ELEMENTS))
def test_every_grid_value_is_a_fixed_point_of_round_float(name):
    spec = Q.FLOAT_SPECS[name]
    grid = FloatFormat(name, Scaling("tensor")).grid()
    assert torch.equal(bits_of(Q.round_float(grid, spec)), bits_of(grid))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_grid_value_is_a_fixed_point_of_round_int(bits, symmetric):
    grid = IntFormat(bits, symmetric, Scaling("channel")).grid()
    assert torch.equal(Q.round_int(grid, bits, symmetric), grid)
    # one past either end clamps onto the end
    assert Q.round_int(grid[:1] - 1, bits, symmetric).item() == grid[0]
    assert Q.round_int(grid[-1:] + 1, bits, symmetric).item() == grid[-1]


def grid_tensor(fmt, n: int, k: int, seed: int, unit: float) -> torch.Tensor:
    """Random grid values times `unit` (a power of two) whose every block holds the value that
    makes its scale exactly `unit` (the symmetric grid's top, or both ends asymmetric)."""
    g = gen(seed)
    grid = fmt.grid()
    if isinstance(fmt, IntFormat) and fmt.symmetric:
        grid = grid[1:]  # -2^(b-1) has no positive partner: amax is the top code
    idx = torch.randint(0, len(grid), (n, k), generator=g)
    x = grid[idx]
    block = fmt.scaling.block(k) or n * k
    flat = x.reshape(-1) if fmt.scaling.kind == "tensor" else None
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        # codes 0..qmax around a zero point z: values -z..qmax-z, the range [lo, hi] exactly
        z = int(torch.randint(0, 2**fmt.bits, (), generator=g))
        x = x - z
        lo, hi = -z, 2**fmt.bits - 1 - z
        if flat is not None:
            x.view(-1)[:2] = torch.tensor([lo, hi], dtype=torch.float32)
        else:
            for j in range(0, k, block):
                x[:, j] = lo
                x[:, min(j + 1, k - 1)] = hi
        return x * unit
    top = grid.abs().max()
    if flat is not None:
        x.view(-1)[0] = top
    else:
        for j in range(0, k, block):
            x[:, j] = top * (1 - 2 * (j // block % 2))  # ±top: the sign does not matter
    if isinstance(fmt, FloatFormat) and fmt.global_:
        unit = unit * 448.0  # global scale `unit`, every block scale 448 (fp8e4m3's max)
    return x * unit


@SETTINGS
@given(
    st.sampled_from(ALL_FORMATS),
    st.integers(1, 6),
    st.sampled_from([72, 200, 64, 35]),
    st.integers(-6, 6),
    st.integers(0, 2**31 - 1),
)
def test_grid_values_with_scale_one_unit_are_fixed_points_of_fake(fmt, n, k, log_unit, seed):
    # A tensor of grid values whose blocks each contain the value that sets their scale to the
    # power of two `unit` (nvfp4: 448·unit, whose global scale is unit and block scale 448)
    # comes back unchanged, and its codes are the grid values themselves.
    unit = 2.0**log_unit
    x = grid_tensor(fmt, n, k, seed, unit)
    q = fmt.quantize(x)
    if isinstance(fmt, FloatFormat) and fmt.global_:
        assert q.global_scale.item() == unit
        assert (q.scale == 448.0).all()
    else:
        assert (q.scale == unit).all(), (fmt, q.scale.unique())
    assert torch.equal(fmt.fake(x), x)
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        assert torch.equal(q.codes - per_element(q.zero, fmt, k), x / unit)
    else:
        assert torch.isin(q.codes, fmt.grid()).all()


# --------------------------------------------------------------------------- integer numerics


def ref_int_fake(x: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """An independent loop over rows and blocks: the scale in its storage dtype, codes rounded
    half to even and clamped, (codes - zero) · scale."""
    n, k = x.shape
    out = torch.empty_like(x)
    rows = [x.reshape(1, -1)] if fmt.scaling.kind == "tensor" else [x[i : i + 1] for i in range(n)]
    block = fmt.scaling.block(k) or n * k
    outs = []
    for row in rows:
        pieces = []
        for j in range(0, row.shape[1], block):
            seg = row[0, j : j + block]
            if fmt.symmetric:
                qmax = 2 ** (fmt.bits - 1) - 1
                s = store(seg.abs().max() / qmax, fmt.scaling.scale)
                c = torch.clamp(torch.round(seg / s), -qmax - 1, qmax)
                pieces.append(c * s)
            else:
                qmax = 2**fmt.bits - 1
                lo, hi = torch.clamp(seg.min(), max=0.0), torch.clamp(seg.max(), min=0.0)
                s = store((hi - lo) / qmax, fmt.scaling.scale)
                z = torch.clamp(torch.round(-lo / s), 0, qmax)
                c = torch.clamp(torch.round(seg / s + z), 0, qmax)
                pieces.append((c - z) * s)
        outs.append(torch.cat(pieces))
    out = torch.stack(outs).reshape(n, k)
    return out


def store(s: torch.Tensor, dtype: str) -> torch.Tensor:
    if dtype == "f16":
        s = s.clamp(max=65504.0).half().float()
    assert dtype in ("f16", "f32")
    return s if s > 0 else torch.ones_like(s)


@pytest.mark.parametrize("fmt", INT_FORMATS, ids=str)
def test_int_fake_equals_an_independent_reference(fmt):
    for n, k, seed in [(9, 200, 1), (4, 72, 2)]:
        x = weights(n, k, seed)
        assert torch.equal(fmt.fake(x), ref_int_fake(x, fmt))


@pytest.mark.parametrize("fmt", INT_FORMATS, ids=str)
def test_int_error_is_at_most_half_a_step_inside_the_range(fmt):
    n, k = 11, 200
    x = weights(n, k, seed=zlib.crc32(str(fmt).encode()))
    q = fmt.quantize(x)
    lo, hi = fmt.grid()[0], fmt.grid()[-1]
    assert torch.equal(q.codes, q.codes.round()) and q.codes.min() >= lo and q.codes.max() <= hi
    s = full_scale(q, fmt, k)
    z = per_element(q.zero, fmt, k) if q.zero is not None else 0.0
    y = fmt.dequantize(q, k)
    assert torch.equal(y, fmt.fake(x))
    err = (y - x).abs()
    inside = (x >= (lo - z) * s) & (x <= (hi - z) * s)
    assert inside.float().mean() > 0.8  # the rounded zero point of int2 leaves the most out
    assert (err[inside] <= s.expand_as(x)[inside] * (0.5 + 1e-6)).all(), float((err / s)[inside].max())
    # outside the representable range (only where the f16 scale or the rounded zero point
    # shrank it) a value lands on the nearest end: still within a step
    assert (err <= s * 1.0).all(), float((err / s).max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_int_represents_zero_exactly(bits):
    fmt = IntFormat(bits, False, Scaling("group", 64))
    x = weights(6, 200, bits) + 0.3  # mostly positive, so lo is near 0 and the zero point small
    x[:, 5] = 0.0
    x[:, 199] = 0.0
    assert (fmt.fake(x)[:, [5, 199]] == 0).all()


# --------------------------------------------------------------------------- float numerics


def neighbours(y: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid values just below and just above each |y| <= max (equal when y is on the grid)."""
    i = torch.searchsorted(grid, y.contiguous())
    hi = grid[i.clamp(max=len(grid) - 1)]
    lo = grid[(i - 1).clamp(min=0)]
    on = hi == y
    return torch.where(on, hi, lo), hi


@pytest.mark.parametrize("fmt", FLOAT_FORMATS, ids=str)
def test_float_codes_are_the_nearest_grid_value(fmt):
    # Within the element range: the nearest grid value (at most half an ulp of the element grid
    # away); beyond it: ±max. The dequantized value is that code times the scale.
    for n, k, seed in [(9, 200, 3), (5, 72, 4)]:
        x = weights(n, k, seed)
        q = fmt.quantize(x)
        s = full_scale(q, fmt, k)
        y = (x / s).double()
        codes = q.codes.double()
        grid = fmt.grid().double()
        assert torch.isin(q.codes, fmt.grid()).all()
        emax = fmt.spec.max
        inside = y.abs() <= emax
        below, above = neighbours(y[inside], grid)
        d = (codes[inside] - y[inside]).abs()
        assert (d <= torch.minimum(y[inside] - below, above - y[inside]) + 1e-12 * y[inside].abs()).all()
        assert (d <= (above - below) / 2 * (1 + 1e-9)).all()
        assert torch.equal(q.codes[~inside], torch.sign(x[~inside]) * emax)
        assert torch.equal(fmt.fake(x), q.codes * s)


# the bit patterns between which a value's rounding is decided: grid values, their midpoints
# (ties, exact in f32), and the f32 numbers just beside each midpoint
def fp8_probe_values(name: str, seed: int) -> torch.Tensor:
    grid = FloatFormat(name, Scaling("tensor")).grid()
    pos = grid[grid >= 0].double()
    mids = ((pos[1:] + pos[:-1]) / 2).float()
    beside = torch.cat([torch.nextafter(mids, torch.zeros_like(mids)), torch.nextafter(mids, mids * 2)])
    top = float(pos.max())
    g = gen(seed)
    lo_exp = math.log2(float(pos[1])) - 2  # below the smallest subnormal
    rand = torch.exp2(torch.rand(4000, generator=g) * (math.log2(top) - lo_exp) + lo_exp)
    vals = torch.cat([pos.float(), mids, beside, rand]).clamp(max=top)
    return torch.cat([vals, -vals])


@pytest.mark.parametrize("name", ["fp8e4m3", "fp8e5m2"])
def test_round_float_agrees_with_torch_float8_bit_for_bit(name):
    x = fp8_probe_values(name, seed=11)
    got = Q.round_float(x, Q.FLOAT_SPECS[name])
    want = x.to(F8[name]).float()
    assert torch.equal(bits_of(got), bits_of(want)), x[bits_of(got) != bits_of(want)][:8]
    # ties to even among subnormals: the midpoint between 0 and the smallest subnormal goes to 0
    tiny = Q.FLOAT_SPECS[name].min_subnormal
    assert Q.round_float(torch.tensor([tiny / 2, 1.5 * tiny, -tiny / 2]), Q.FLOAT_SPECS[name]).tolist() == [0.0, 2 * tiny, -0.0]


@SETTINGS
@given(st.sampled_from(["fp8e4m3", "fp8e5m2"]), st.lists(st.floats(-448.0, 448.0, width=32), min_size=1, max_size=64))
def test_round_float_agrees_with_torch_float8_on_any_float(name, values):
    x = torch.tensor(values, dtype=torch.float32)
    got = Q.round_float(x, Q.FLOAT_SPECS[name])
    assert torch.equal(bits_of(got), bits_of(x.to(F8[name]).float()))


@pytest.mark.parametrize("name", sorted(FLOAT_ELEMENTS))
def test_round_float_saturates_and_keeps_nan(name):
    spec = Q.FLOAT_SPECS[name]
    x = torch.tensor([spec.max * 1.01, -spec.max * 1.5, 1e30, -1e30, float("nan"), float("inf"), float("-inf")])
    got = Q.round_float(x, spec)
    assert got[:4].tolist() == [spec.max, -spec.max, spec.max, -spec.max]
    assert torch.isnan(got[4])
    if spec.has_inf:  # e5m2 keeps its infinities
        assert got[5:].tolist() == [math.inf, -math.inf]
    else:  # the fn formats and fp6/fp4 have none: ±inf saturates
        assert got[5:].tolist() == [spec.max, -spec.max]


@pytest.mark.parametrize("fmt", ["int4<sym,g64>", "int3<asym,g32>", "fp8e4m3<channel>", "mxfp4", "nvfp4", "int8<sym,token>"])
def test_nan_stays_nan_and_leaves_its_block_alone(fmt):
    fmt = parse_format(fmt)
    x = weights(5, 200, seed=5)
    x[2, 70] = float("nan")
    got = fmt.fake(x)
    assert torch.isnan(got[2, 70]) and torch.isnan(got).sum() == 1
    x0 = x.clone()
    x0[2, 70] = 0.0  # the NaN counts for nothing in its block's scale
    want = fmt.fake(x0)
    want[2, 70] = float("nan")
    assert torch.allclose(got, want, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- microscaling


@pytest.mark.parametrize("name", ["mxfp4", "mxfp6", "mxfp6e3m2", "mxfp8"])
def test_mx_block_scales_are_powers_of_two_per_ocp(name):
    fmt = parse_format(name)
    k = 200  # 6 full blocks of 32 and one of 8
    x = weights(13, k, seed=6) * torch.exp2(torch.randint(-20, 20, (13, 1)).float())
    q = fmt.quantize(x)
    assert q.scale.shape == (13, 7) and q.global_scale is None and q.zero is None
    mant, _ = torch.frexp(q.scale)
    assert (mant == 0.5).all()  # e8m0: a power of two
    emax_elem = math.floor(math.log2(fmt.spec.max))
    for i in range(13):
        for b in range(7):
            blk = x[i, 32 * b : 32 * b + 32]
            amax = float(blk.abs().max())
            want = 2.0 ** (math.floor(math.log2(amax)) - emax_elem)  # OCP MX: shared exponent
            assert q.scale[i, b].item() == want
            # the block's largest element lands in the top binade [2^emax, 2^(emax+1)), or saturates
            top = float(q.codes[i, 32 * b : 32 * b + 32].abs().max())
            assert 2.0**emax_elem <= top <= fmt.spec.max
            assert 2.0**emax_elem <= amax / want < 2.0 ** (emax_elem + 1)


def test_mxfp4_block_largest_element_saturates_above_six():
    fmt = parse_format("mxfp4")
    x = torch.randn(1, 32) * 0.1
    x[0, 3] = 7.5  # 7.5 / 4 = binade [4, 8): the scale is 1 and 7.5 saturates to 6
    q = fmt.quantize(x)
    assert q.scale.item() == 1.0 and q.codes[0, 3].item() == 6.0
    x[0, 3] = 3.9  # binade [2, 4): scale 2^-1... largest code 3.9 / 0.5 = 7.8 -> 6 (saturates)
    q = fmt.quantize(x)
    assert q.scale.item() == 0.5 and q.codes[0, 3].item() == 6.0


def test_nvfp4_scales_are_fp8e4m3_values_and_the_global_scale_is_f32():
    fmt = parse_format("nvfp4")
    k = 200  # 12 blocks of 16 and one of 8
    x = weights(9, k, seed=7)
    q = fmt.quantize(x)
    assert q.scale.shape == (9, 13) and q.zero is None
    assert q.global_scale.dtype == torch.float32 and q.global_scale.shape == (1,)
    assert q.global_scale.item() == (x.abs().max() / (6.0 * 448.0)).item()
    assert torch.equal(q.scale.to(torch.float8_e4m3fn).float(), q.scale)
    assert (q.scale > 0).all() and (q.scale <= 448.0).all()
    # the block scale is the fp8e4m3 value nearest to amax / (6 · global)
    amax = Q.nan_amax(Q.blocks(x, 16))
    raw = amax / q.global_scale / 6.0
    assert torch.equal(q.scale, raw.to(torch.float8_e4m3fn).float())
    # the tensor's largest element uses the largest block scale exactly
    assert q.scale.max().item() == 448.0


# --------------------------------------------------------------------------- blocks and shapes


@pytest.mark.parametrize(
    "text, k, g",
    [
        ("int4<sym,g64>", 200, 64), ("int4<asym,g64>", 200, 64), ("int3<asym,g32>", 72, 32),
        ("int8<sym,g64>", 200, 64), ("fp8e4m3<g64>", 200, 64), ("fp6e2m3<g32>", 72, 32),
        ("mxfp4", 200, 32), ("mxfp8", 72, 32), ("nvfp4", 200, 16), ("nvfp4", 72, 16),
    ],
)
def test_a_shorter_last_group_equals_quantizing_the_tail_alone(text, k, g):
    fmt = parse_format(text)
    x = weights(7, k, seed=k + g)
    cut = k // g * g
    assert cut < k
    if isinstance(fmt, FloatFormat) and fmt.global_:
        x[0, k - 1] = x.abs().max() * 2  # the global scale is the tensor's: put its max in the tail
    head, tail = fmt.fake(x)[:, :cut], fmt.fake(x)[:, cut:]
    assert torch.equal(tail, fmt.fake(x[:, cut:]))
    if not (isinstance(fmt, FloatFormat) and fmt.global_):
        assert torch.equal(head, fmt.fake(x[:, :cut]))
    q = fmt.quantize(x)
    assert q.scale.shape[-1] == math.ceil(k / g)
    assert torch.equal(q.scale[:, -1:], fmt.quantize(x[:, cut:]).scale)


def test_blocks_pad_with_nan_and_unblocks_inverts():
    x = torch.randn(3, 200)
    b = Q.blocks(x, 64)
    assert b.shape == (3, 4, 64)
    assert torch.isnan(b[:, -1, 8:]).all() and not torch.isnan(b[:, :, :8]).any()
    assert torch.equal(Q.unblocks(b, 200), x)
    assert torch.equal(Q.nan_amax(b)[:, -1], x[:, 192:].abs().amax(-1))


@pytest.mark.parametrize(
    "text, want",
    [
        ("int4<sym,g128>", 4.125), ("int4<asym,g128>", 4.15625), ("mxfp4", 4.25), ("nvfp4", 4.5),
        ("mxfp8", 8.25), ("mxfp6", 6.25), ("int3<asym,g64>", 3 + 19 / 64), ("int8<sym,g32>", 8.5),
        ("int2<asym,g64>", 2 + 18 / 64), ("int4<sym,g32,scale=f32>", 5.0), ("fp8e4m3<tensor>", 8.0),
        ("int8<sym,token>", 8.0), ("int8<asym,tensor>", 8.0),
    ],
)
def test_effective_bits(text, want):
    assert parse_format(text).effective_bits() == want


def test_effective_bits_per_channel_needs_k():
    assert parse_format("int8<sym,channel>").effective_bits(4096) == 8 + 16 / 4096
    assert parse_format("int4<asym,channel>").effective_bits(1000) == 4 + 20 / 1000
    assert parse_format("fp8e4m3<channel>").effective_bits(512) == 8 + 16 / 512
    assert parse_format("int4<sym,g128>").effective_bits(4096) == 4.125


@pytest.mark.parametrize("fmt", ["int4<sym,g64>", "int4<asym,g64>", "int8<sym,channel>", "fp8e4m3<channel>", "int3<asym,tensor>"])
def test_clipping_shrinks_scales(fmt):
    fmt = parse_format(fmt)
    x = weights(8, 200, seed=8)
    full, clipped = fmt.quantize(x), fmt.quantize(x, 0.7)
    assert (clipped.scale < full.scale).all()
    # the clipped tensor saturates its largest values: its error on them grows
    a = x.abs()
    big = a == (a.max() if fmt.scaling.kind == "tensor" else a.amax(-1, keepdim=True))
    assert ((fmt.fake(x, 0.7) - x).abs()[big] >= (fmt.fake(x) - x).abs()[big]).all()
    # a clip per block: blocks with ratio 1 keep their scale
    nb = full.scale.shape[-1]
    if fmt.scaling.block(200) is not None:
        ratio = torch.where(torch.rand(8, nb) < 0.5, 1.0, 0.6)
        per = fmt.quantize(x, ratio)
        assert torch.equal(per.scale[ratio == 1], full.scale[ratio == 1])
        assert (per.scale[ratio < 1] < full.scale[ratio < 1]).all()


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "mxfp8"])
def test_clipping_does_not_grow_block_scales(fmt):
    fmt = parse_format(fmt)
    x = weights(8, 200, seed=9)
    full, clipped = fmt.quantize(x), fmt.quantize(x, 0.6)
    assert (clipped.scale <= full.scale).all() and (clipped.scale < full.scale).any()
    if fmt.global_:  # the global scale is the unclipped tensor's
        assert torch.equal(clipped.global_scale, full.global_scale)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=str)
def test_qtensor_shapes_agree_with_scale_shape(fmt):
    for shape in [(5, 200), (2, 3, 72), (1, 7)]:
        x = torch.randn(*shape)
        q = fmt.quantize(x)
        want = tuple(int(d) for d in scale_shape(fmt, shape))
        assert q.codes.shape == x.shape and q.codes.dtype == torch.float32
        assert q.scale.shape == want and q.scale.dtype == torch.float32
        parts = quant_parts(fmt)
        assert (q.zero is not None) == ("zero" in parts)
        assert (q.global_scale is not None) == ("global" in parts)
        if q.zero is not None:
            assert q.zero.shape == want
        if q.global_scale is not None:
            assert q.global_scale.shape == (1,)
        assert fmt.dequantize(q).shape == x.shape


def test_format_identity_survives_text_and_hashing():
    for fmt in ALL_FORMATS:
        assert parse_format(str(fmt)) == fmt and hash(parse_format(str(fmt))) == hash(fmt)
    with pytest.raises(ValueError, match="unknown number format 'int9x'.*mxfp4"):
        parse_format("int9x<sym,g64>")
