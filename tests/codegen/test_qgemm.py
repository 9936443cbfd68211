"""The quantized GEMM template (`qlinear` as a Triton kernel) against THE oracle: the
reference executor running a small graph `qlinear(x parts.., W parts.. [, bias])` (+ the
epilogue's silu / gelu, residual `add` and SwiGLU `mul` as nodes), under the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1).

Operands are built the way the compiler builds them: activations from a fresh random x
with the format's `quantize` (or `encode` with a static per-tensor scale), weights from a
random W with `quantize`, packed like the layout pass (`pack(to_codes(codes), Layout(bits,
axis=1))`). The kernel reads the activation codes in the run-time storage convention
(symmetric int: int8 values; float elements: uint8 bit patterns) and the packed words; the
oracle reads the reference's float32 codes and the same packed words.

Tolerance, per element (u = 2^-24, `absdot` = Σ_k |xq·(wq - z)| · |scales| in float64):
* integer pairs: (blocks + 8) · u · absdot — the block sums are exact int32; what rounds is
  each block sum's conversion to fp32, its scaling, and the sum over blocks;
* pairs with a float operand: (K + 8) · u · absdot — the worst-case bound of fp32
  summation of exact products (the kernels measure far less);
plus 1e-6 · (|pre-activation| + |reference|) for the epilogue's own fp32 steps (the bound
x1.2 through an activation, x|multiplier| through "mul") and half an f16 ulp when the output
is f16. Measured: at most ~1.3 u · absdot over every case. A separate test
checks the integer paths bit-exactly: with unit scales every block sum and their total stay
below 2^24, so the kernel must equal the oracle's exact integer sums.

Shapes are not multiples of the tiles (K = 72, 100, 200; N = 40, 96, 33); M in {1, 3, 17,
64} covers the split-K GEMV class (M <= 16) and the GEMM class. A last test compiles
generated kernels for sm_90 (no GPU needed) so the GPU-only checks of `tl.dot` (int8
operands need BLOCK_K >= 32) and the types run too.
"""

from __future__ import annotations

import math
import re
import textwrap
import zlib

import pytest
import torch

import mxc
from mxc.codegen import LaunchError, Tiles, load
from mxc.codegen.templates import qgemm
from mxc.ir import F32, OPS, FloatFormat, Graph, IntFormat, Layout, Node, TensorType, parse_format, verify
from mxc.ir.ops import quant_parts, scale_shape
from mxc.ir.packing import pack, to_codes
from mxc.ir.quant import encode_bits
from mxc.runtime import ReferenceExecutor

from kernel_helpers import compile_for_sm90, kernel_cache, SM90_PRELUDE  # noqa: F401 (kernel_cache: autouse fixture)

MS = (1, 3, 17, 64)
KS = (72, 100, 200)
NS = (40, 96, 33)
#: Epilogues in rotation: qlinear's bias, the activations, the residual add (the fuse pass's
#: `add` after a qlinear) and SwiGLU's "mul" of the up projection by silu(gate).
EPILOGUES = ((), ("bias",), ("residual",), ("bias", "residual"), ("bias", "silu"), ("gelu_tanh", "residual"),
             ("bias", "gelu", "residual"), ("mul",), ("bias", "mul"))
U = 2.0**-24


# --------------------------------------------------------------------------- cases


def case(act: str, weight: str, i: int, **over) -> dict:
    """Case `i` of a pair: M, K, N, output dtype and epilogue rotate with different periods
    so every value meets many pairs; `over` pins some of them."""
    c = dict(act=act, weight=weight, m=MS[i % 4], k=KS[i % 3], n=NS[(i // 3) % 3], out=("f32", "f32", "f16")[i % 3],
             epilogue=EPILOGUES[i % len(EPILOGUES)], static=False)
    c.update(over)
    return c


def case_id(c: dict) -> str:
    epi = "+".join(c["epilogue"]) or "plain"
    static = "-static" if c["static"] else ""
    return f"{c['act']}{static}-x-{c['weight']}-m{c['m']}-k{c['k']}-n{c['n']}-o{c['out']}-{epi}"


def w8a8_cases() -> list[dict]:
    """int8 per token (dynamic) or per tensor (a static calibration scale that clips) x
    int8 per channel (and per tensor)."""
    pairs = [("int8<sym,token>", "int8<sym,channel>", False), ("int8<sym,tensor>", "int8<sym,channel>", True),
             ("int8<sym,token>", "int8<sym,tensor>", False), ("int8<sym,tensor>", "int8<sym,channel>", False)]
    return [case(a, w, i, static=s) for i, (a, w, s) in enumerate(pairs)]


def lowbit_cases() -> list[dict]:
    """int8 per-token activations x weights of 2, 3, 4, 5 and 8 bits, symmetric and
    asymmetric, per channel and in groups of 32 and 64 (K = 72, 100, 200: never a multiple);
    and the w4a8 preset's int4<asym,g128>."""
    cases = []
    for bits in (2, 3, 4, 5, 8):
        for sym in ("sym", "asym"):
            for scaling in ("channel", "g32", "g64"):
                cases.append(case("int8<sym,token>", f"int{bits}<{sym},{scaling}>", len(cases)))
    cases.append(case("int8<sym,token>", "int4<asym,g128>", 2, k=200))  # the w4a8 preset
    return cases


def w4a4_cases() -> list[dict]:
    """Grouped activations with aligned weight groups (W4A4 and neighbours), grouped
    activations with one weight scale per row, a static per-tensor int4 activation."""
    pairs = [("int4<sym,g128>", "int4<asym,g128>"), ("int4<sym,g32>", "int4<asym,g32>"),
             ("int4<sym,g64>", "int4<sym,g64>"), ("int4<sym,g32>", "int8<sym,channel>"),
             ("int8<sym,g64>", "int3<asym,g64>"), ("int6<sym,g32>", "int4<asym,channel>"),
             ("int4<sym,g64>", "int2<asym,tensor>")]
    cases = [case(a, w, i + 1) for i, (a, w) in enumerate(pairs)]
    cases.append(case("int4<sym,tensor>", "int4<asym,g32>", 5, static=True))
    return cases


def float_cases() -> list[dict]:
    """fp8 x fp8 (per token, per tensor, e5m2), fp8 x the block-scaled fp4 weights (nvfp4
    with fp8 block16 or per-token activations, mxfp4 with mxfp8 or per-token activations),
    nvfp4 x nvfp4 (two global scales), and the mixed pairs int8 x fp8, fp8 x int4 / fp6."""
    pairs = [("fp8e4m3<token>", "fp8e4m3<channel>"), ("fp8e4m3<tensor>", "fp8e4m3<channel>"),
             ("fp8e5m2<token>", "fp8e4m3<channel>"), ("fp8e4m3<token>", "fp8e5m2<g32>"),
             ("fp8e4m3<block16>", "nvfp4"), ("fp8e4m3<token>", "nvfp4"), ("mxfp8", "mxfp4"),
             ("fp8e4m3<token>", "mxfp4"), ("nvfp4", "nvfp4"), ("int8<sym,token>", "fp8e4m3<channel>"),
             ("fp8e4m3<token>", "int4<asym,g32>"), ("fp8e4m3<token>", "int8<sym,channel>"),
             ("fp8e4m3<token>", "fp6e2m3<g64>"), ("mxfp8", "int5<asym,channel>")]
    cases = [case(a, w, i) for i, (a, w) in enumerate(pairs)]
    cases.append(case("fp8e4m3<tensor>", "fp8e4m3<channel>", 4, static=True))
    return cases


def edge_cases() -> list[dict]:
    """Blocks that are not multiples of the tile (48, 100, 8: masked tile lanes), per-tensor
    weights, and both M classes for each."""
    pairs = [("int8<sym,token>", "int6<asym,g48>"), ("int8<sym,token>", "int3<sym,g100>"),
             ("int8<sym,token>", "int4<asym,g8>"), ("int4<sym,g8>", "int5<sym,g8>"),
             ("fp8e4m3<token>", "int3<asym,g100>"), ("fp8e4m3<token>", "fp4e2m1<g24>"),
             ("int8<sym,token>", "int7<asym,tensor>"), ("int8<sym,g100>", "int4<sym,channel>")]
    return [case(a, w, i, m=MS[(i + 1) % 4], k=KS[i % 2 + 1]) for i, (a, w) in enumerate(pairs)]


ALL = w8a8_cases() + lowbit_cases() + w4a4_cases() + float_cases() + edge_cases()


# --------------------------------------------------------------------------- operands and oracle


def storage(fmt, codes: torch.Tensor) -> torch.Tensor:
    """Reference activation codes (float32 grid values) in the kernels' storage convention."""
    if isinstance(fmt, IntFormat):
        assert fmt.symmetric
        return codes.to(torch.int8)
    out = encode_bits(codes, fmt.spec)
    assert out.dtype == torch.int32  # bit patterns as int32: narrowed to the uint8 storage
    return out.to(torch.uint8)


def make_operands(c: dict, lead: tuple[int, ...] | None = None) -> dict:
    """Fresh random operands for case `c` (seeded by its id): x with per-channel magnitudes
    and W with per-row magnitudes and offsets (so every scale and zero point varies), their
    quantized parts, the packed weight, bias and residual."""
    g = torch.Generator().manual_seed(zlib.crc32(case_id(c).encode()))
    act, weight = parse_format(c["act"]), parse_format(c["weight"])
    m, n, k = c["m"], c["n"], c["k"]
    lead = lead or (m,)
    x = torch.randn(*lead, k, generator=g) * (1 + 4 * torch.rand(k, generator=g))
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
    w = w + 0.3 * torch.randn(n, 1, generator=g)
    if c["static"]:  # a calibrated per-tensor scale, 20% below the run's range: codes clip
        full = act.quantize(x)
        qx = act.encode(x, full.scale * 0.8, None, full.global_scale)
    else:
        qx = act.quantize(x)
    qw = weight.quantize(w)
    return dict(
        act=act, weight=weight, qx=qx, qw=qw,
        words=pack(to_codes(qw.codes, weight), Layout(bits=weight.bits, axis=1)),
        bias=torch.randn(n, generator=g) if "bias" in c["epilogue"] else None,
        residual=torch.randn(*lead, n, generator=g) if "residual" in c["epilogue"] else None,
        multiplier=torch.randn(*lead, n, generator=g) if "mul" in c["epilogue"] else None,
    )


def parts(fmt, q) -> list[torch.Tensor]:
    """A quantized tensor's parts in `quant_parts` order (the qlinear operand order)."""
    have = {"codes": q.codes, "scale": q.scale, "zero": q.zero, "global": q.global_scale}
    return [have[p] for p in quant_parts(fmt)]


def oracle(act, weight, xparts, words, wparts, bias, residual, epilogue, k, multiplier=None):
    """(pre-activation, result) from the reference executor on the graph

        y = qlinear(x parts.., W parts.. [, bias]) {act, weight, dtype=f32}
        y = silu(y) / gelu(y)            (the epilogue's activation, if any)
        y = add(y, residual)             (if the epilogue has one)
        y = mul(y, multiplier)           (if the epilogue has one)

    with the activation's parts as graph inputs and W's parts (codes packed) as weights."""
    inputs, feeds, consts, weights = [], [], [], {}

    def input_(name, t, value):
        inputs.append(Node.create("input", (), {"name": name, "index": len(inputs)}, [t]))
        feeds.append(value)
        return inputs[-1].out

    def const(name, t, value):
        consts.append(Node.create("const", (), {"name": name}, [t]))
        weights[name] = value
        return consts[-1].out

    xv = [input_(f"x.{p}", TensorType(tuple(t.shape), act if p == "codes" else F32), t)
          for p, t in zip(quant_parts(act), xparts)]
    n = words.shape[0]
    wv = [const("w.codes", TensorType((n, k), weight, Layout(bits=weight.bits, axis=1)), words)]
    wv += [const(f"w.{p}", TensorType(tuple(t.shape), F32), t) for p, t in zip(quant_parts(weight)[1:], wparts[1:])]
    if "bias" in epilogue:
        wv.append(const("bias", TensorType((n,), F32), bias))
    nodes = []

    def op(name, ins, attrs=None):
        attrs = dict(attrs or {})
        nodes.append(Node.create(name, ins, attrs, OPS[name].infer([v.type for v in ins], attrs)))
        return nodes[-1].out

    y = op("qlinear", [*xv, *wv], {"act": act, "weight": weight, "dtype": F32})
    pre_v = y
    for step in epilogue:
        if step in ("silu", "gelu", "gelu_tanh"):
            pre_v = y
            if step == "silu":
                y = op("silu", [y])
            else:
                y = op("gelu", [y], {"approximate": "tanh" if step == "gelu_tanh" else "none"})
        elif step == "residual":
            y = op("add", [y, input_("residual", TensorType(tuple(residual.shape), F32), residual)])
        elif step == "mul":
            y = op("mul", [y, input_("multiplier", TensorType(tuple(multiplier.shape), F32), multiplier)])
    graph = verify(Graph("qlinear_oracle", tuple(inputs), (*consts, *nodes), (y, pre_v), (), weights))
    ref, pre = ReferenceExecutor(graph, check_shapes=True)(feeds)
    return pre, ref


def absdot(act, weight, qx, qw, k) -> torch.Tensor:
    """Σ_k |xq·(wq - z)| · |s_x| · |s_w| · |globals| in float64: the magnitude bound of the
    terms the kernel sums (scales expanded to every element along K)."""

    def per_element(fmt, q, rows):
        s = q.scale.double().abs()
        z = q.zero.double() if q.zero is not None else None
        block = fmt.scaling.block(k)
        cols = (torch.arange(k) // block) if block is not None and block < k else torch.zeros(k, dtype=torch.long)
        s = s.reshape(-1, s.shape[-1]).expand(rows, s.shape[-1])[:, cols]
        z = None if z is None else z.reshape(-1, z.shape[-1]).expand(rows, z.shape[-1])[:, cols]
        values = q.codes.double().reshape(rows, k)
        if z is not None:
            values = values - z
        glob = q.global_scale.double().abs() if q.global_scale is not None else 1.0
        return values.abs() * s * glob

    xa = per_element(act, qx, qx.codes.numel() // k)
    wa = per_element(weight, qw, qw.codes.shape[0])
    return (xa @ wa.T).reshape(*qx.codes.shape[:-1], -1)


def assert_close(y: torch.Tensor, c: dict, ops: dict, *, what: str = "") -> None:
    """`y` matches the oracle within the tolerance of the module docstring."""
    act, weight, qx, qw, k = ops["act"], ops["weight"], ops["qx"], ops["qw"], c["k"]
    pre, ref = oracle(act, weight, parts(act, qx), ops["words"], parts(weight, qw), ops["bias"], ops["residual"],
                      c["epilogue"], k, ops["multiplier"])
    assert y.dtype == {"f16": torch.float16, "f32": torch.float32}[c["out"]]
    assert y.shape == ref.shape
    assert torch.isfinite(ref).all()
    blocks = math.ceil(k / qgemm.block_of(act, weight, k))
    terms = blocks if qgemm.int_dot(act, weight) else k
    lip = 1.2 if any(s in ("silu", "gelu", "gelu_tanh") for s in c["epilogue"]) else 1.0
    if "mul" in c["epilogue"]:  # the GEMM's error scales with the multiplier
        lip = lip * ops["multiplier"].abs()
    allowed = (terms + 8) * U * lip * absdot(act, weight, qx, qw, k).float() + 1e-6 * (pre.abs() + ref.abs()) + 1e-30
    if c["out"] == "f16":
        allowed = allowed + ref.abs() * 2.0**-11 + 2.0**-25
    err = (y.float() - ref).abs()
    worst = (err / allowed).max().item()
    assert worst <= 1.0, (
        f"{what or case_id(c)}: max error {err.max().item():.3g} is {worst:.2f}x the tolerance "
        f"(output magnitude {ref.abs().max().item():.3g})"
    )


def run_case(c: dict, tiles=None, lead=None) -> None:
    ops = make_operands(c, lead)
    act, weight, qx, qw = ops["act"], ops["weight"], ops["qx"], ops["qw"]
    spec = qgemm.spec(c["n"], c["k"], act, weight, out_dtype=c["out"], epilogue=c["epilogue"], tiles=tiles)
    y = load(spec).launch(storage(act, qx.codes), qx.scale, ops["words"], qw.scale, qw.zero, qw.global_scale,
                          qx.global_scale, bias=ops["bias"], residual=ops["residual"], multiplier=ops["multiplier"])
    assert_close(y, c, ops)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("c", ALL, ids=[case_id(c) for c in ALL])
def test_matches_the_reference(c):
    run_case(c)


def test_cases_cover_the_pairs_the_fold_pass_forms():
    """The parametrisation reaches what the brief and the numerics contract ask for."""
    from mxc.passes.fold import _why_not

    for c in ALL:
        assert _why_not(parse_format(c["act"]), parse_format(c["weight"]), c["k"]) is None, case_id(c)
    pairs = {(c["act"], c["weight"]) for c in ALL}
    for preset in ("w8a8", "w8a8-static", "w4a8", "w4a4-kv4", "fp8"):
        rule = mxc.Plan.preset(preset).default
        assert (str(rule.act), str(rule.weight)) in pairs, preset
    lows = [parse_format(c["weight"]) for c in ALL if c["act"] == "int8<sym,token>"]
    for bits in (2, 3, 4, 5, 8):
        for sym in (True, False):
            kinds = {(f.scaling.kind, f.scaling.size) for f in lows if isinstance(f, IntFormat) and f.bits == bits
                     and f.symmetric == sym}
            assert {("channel", None), ("group", 32), ("group", 64)} <= kinds, (bits, sym)
    assert {c["m"] for c in ALL} == set(MS) and {c["k"] for c in ALL} == set(KS)
    assert {s for c in ALL for s in c["epilogue"]} == {"bias", "silu", "gelu", "gelu_tanh", "residual", "mul"}
    assert {c["out"] for c in ALL} == {"f16", "f32"}
    floats = [parse_format(c["weight"]) for c in ALL]
    assert any(isinstance(f, FloatFormat) and f.global_ for f in floats)  # nvfp4
    assert any(isinstance(f, FloatFormat) and f.scaling.scale == "e8m0" for f in floats)  # mxfp4


@pytest.mark.parametrize(
    "act, weight, m",
    [("int8<sym,token>", f"int{b}<{s},{g}>", m) for b, s, g, m in
     [(2, "sym", "g32", 1), (3, "asym", "g64", 17), (4, "asym", "channel", 3), (5, "sym", "g32", 64),
      (7, "asym", "g32", 1), (8, "sym", "channel", 17), (8, "asym", "g64", 64), (1, "asym", "channel", 3)]]
    + [("int4<sym,g32>", "int4<asym,g32>", 17), ("int8<sym,tensor>", "int8<sym,channel>", 1),
       ("int2<sym,g64>", "int6<asym,channel>", 64)],
)
def test_integer_sums_are_exact(act, weight, m):
    """Codes over each format's whole range (int8 -128..127, every weight code, every zero
    point) with unit scales: every block sum and the total stay below 2^24, so the kernel's
    output must equal the oracle's exact integer sums bit for bit."""
    af, wf = parse_format(act), parse_format(weight)
    n, k = 40, 200
    g = torch.Generator().manual_seed(zlib.crc32(f"{act}{weight}{m}".encode()))
    ax = 2 ** (af.bits - 1)
    xq = torch.randint(-ax, ax, (m, k), generator=g).float()
    w_codes = torch.randint(0, 2**wf.bits, (n, k), generator=g).to(torch.uint8)
    words = pack(w_codes, Layout(bits=wf.bits, axis=1))
    ws_shape = tuple(int(d) for d in scale_shape(wf, (n, k)))
    xs_shape = tuple(int(d) for d in scale_shape(af, (m, k)))
    ws, xs = torch.ones(ws_shape), torch.ones(xs_shape)
    zero = None if wf.symmetric else torch.randint(0, 2**wf.bits, ws_shape, generator=g).float()
    wparts = [None, ws] + ([zero] if zero is not None else [])
    _, ref = oracle(af, wf, [xq, xs], words, wparts, None, None, (), k)
    y = load(qgemm.spec(n, k, af, wf)).launch(xq.to(torch.int8), xs, words, ws, zero)
    assert 2**10 < ref.abs().max() < 2**24  # sums of many codes, still exact in fp32
    assert torch.equal(y, ref), f"max difference {(y - ref).abs().max().item()}"


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # inf · 0 in masked lanes
@pytest.mark.parametrize("act", ["fp8e4m3<token>", "fp8e5m2<token>", "fp6e3m2<token>", "fp6e2m3<token>",
                                 "fp4e2m1<token>", "int8<sym,token>"])
def test_every_activation_code_decodes_exactly(act):
    """Row m of x holds activation code m alone (K = 1, unit scales, weight 1): y must equal
    the reference decoding exactly (subnormals, signed zeros, e5m2 infinities, NaN codes)."""
    from mxc.ir.packing import from_codes

    af, wf = parse_format(act), parse_format("int8<sym,channel>")
    if isinstance(af, FloatFormat):
        codes = torch.arange(2**af.bits, dtype=torch.uint8)[:, None]
        values = from_codes(codes, af)
    else:
        codes = torch.arange(-128, 128, dtype=torch.int8)[:, None]
        values = codes.float()
    m = codes.shape[0]
    words = pack(torch.full((1, 1), 129, dtype=torch.uint8), Layout(bits=8, axis=1))  # value 1
    y = load(qgemm.spec(1, 1, af, wf)).launch(codes, torch.ones(m, 1), words, torch.ones(1, 1))
    torch.testing.assert_close(y[:, 0], values[:, 0], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "tiles",
    [
        # several M and N tiles, K split 4 ways: over blocks, or over the one block's tiles
        (Tiles(max_m=None, block_m=16, block_n=16, block_k=32, split_k=4),),
        # more splits than blocks / tiles: the empty ones add nothing
        (Tiles(max_m=None, block_m=16, block_n=32, block_k=32, split_k=8),),
        # three M classes, the middle one without split-K; a tile longer than the group
        (Tiles(max_m=2, block_m=16, block_n=16, block_k=32, split_k=3),
         Tiles(max_m=20, block_m=32, block_n=16, block_k=64),
         Tiles(max_m=None, block_m=16, block_n=64, block_k=128, split_k=2)),
    ],
    ids=["split4", "split8-empty", "three-classes"],
)
@pytest.mark.parametrize(
    "act, weight",
    [("int8<sym,token>", "int5<asym,g32>"), ("int8<sym,token>", "int4<sym,channel>"),
     ("fp8e4m3<token>", "fp8e4m3<channel>"), ("int4<sym,g64>", "int4<asym,g64>")],
)
@pytest.mark.parametrize("m", [1, 17, 40])
def test_tile_configurations(tiles, act, weight, m):
    run_case(case(act, weight, m, m=m, k=200, n=40, out="f32", epilogue=("bias", "silu")), tiles=tiles)


def test_leading_dims_strided_codes_f16_scales_and_out():
    """x codes [2, 3, K] taken as a strided view, f16 scale tensors (the f16 scaling stores
    f16-exact values), a residual [2, 3, N] and a caller-given `out` that is returned."""
    c = case("int8<sym,token>", "int4<asym,g32>", 0, m=6, k=100, n=40, epilogue=("bias", "residual"))
    ops = make_operands(c, lead=(2, 3))
    qx, qw = ops["qx"], ops["qw"]
    wide = torch.zeros(2, 3, 2 * c["k"], dtype=torch.int8)
    wide[..., ::2] = storage(ops["act"], qx.codes)
    x_codes = wide[..., ::2]
    assert not x_codes.is_contiguous()
    out = torch.empty(2, 3, c["n"])
    mod = load(qgemm.spec(c["n"], c["k"], ops["act"], ops["weight"], has_bias=True, epilogue=("residual",)))
    y = mod.launch(x_codes, qx.scale, ops["words"], qw.scale.half(), qw.zero.half(), bias=ops["bias"].half(),
                   residual=ops["residual"], out=out)
    assert y is out
    ops["bias"] = ops["bias"].half().float()
    assert_close(y, c, ops)


def test_empty_m():
    spec = qgemm.spec(33, 72, "int8<sym,token>", "int4<sym,channel>")
    w = pack(torch.zeros(33, 72, dtype=torch.uint8), Layout(bits=4, axis=1))
    y = load(spec).launch(torch.empty(0, 72, dtype=torch.int8), torch.empty(0, 1), w, torch.ones(33, 1))
    assert y.shape == (0, 33) and y.dtype == torch.float32


# --------------------------------------------------------------------------- specs and tiles


def test_spec_round_trips_and_bias_goes_first():
    s = qgemm.spec(96, 200, "int8<sym,token>", "int4<asym,g64>", epilogue=("silu", "residual"), has_bias=True)
    assert s.family == "qgemm" and s.epilogue == ("bias", "silu", "residual")
    assert str(s.fmt("act")) == "int8<sym,token>" and str(s.layout("weight")) == "packed<bits=4,word=i32,axis=1>"
    assert type(s).from_json(s.to_json()) == s and s.dtype("out") == "f32"


@pytest.mark.parametrize(
    "act, weight, k, block, least",
    [("int8<sym,token>", "int4<asym,g128>", 4096, 128, 32), ("int4<sym,g32>", "int8<sym,channel>", 4096, 32, 32),
     ("int8<sym,token>", "int8<sym,channel>", 200, 200, 32), ("fp8e4m3<block16>", "nvfp4", 4096, 16, 16),
     ("int8<sym,token>", "int6<asym,g48>", 4096, 48, 32), ("int8<sym,token>", "int5<sym,g8>", 100, 8, 32)],
)
def test_tile_rule(act, weight, k, block, least):
    """BLOCK_K divides the block (the pair's shared group) when the block is a multiple of
    the dot's minimum (32 for int8, 16 for f16), else covers it; no split is empty."""
    a, w = parse_format(act), parse_format(weight)
    assert qgemm.block_of(a, w, k) == block
    for m_class in ("small", "large"):
        t = qgemm.choose_tiles(4096, k, a, w, m_class)
        assert t.block_k >= least
        if block < k and block % least == 0:
            assert block % t.block_k == 0
        elif block < k:
            assert t.block_k >= block
        units = math.ceil(k / block) if block < k else math.ceil(k / t.block_k)
        assert math.ceil(units / math.ceil(units / t.split_k)) == t.split_k  # every split has work


@pytest.mark.parametrize(
    "act, weight, tiles, match",
    [
        ("int8<asym,token>", "int8<sym,channel>", None, r"activation format int8<asym,token> has a zero point"),
        ("int4<sym,g32>", "int4<sym,g64>", None, r"activation groups of 32 and weight groups of 64 do not align"),
        ("int8<sym,channel>", "int8<sym,channel>", None, r"scales per channel; expected token, tensor, group or block"),
        ("int8<sym,token>", "int8<sym,token>", None, r"weight format int8<sym,token> scales per token"),
        ("int8<sym,token>", "int4<sym,channel>", (Tiles(max_m=None, block_m=16, block_n=16, block_k=16),),
         r"an int8 tl.dot needs BLOCK_K >= 32 on NVIDIA GPUs, got \[16\]"),
    ],
)
def test_spec_refuses_what_it_cannot_generate(act, weight, tiles, match):
    with pytest.raises(ValueError, match=match):
        qgemm.spec(40, 200, act, weight, tiles=tiles)


def test_spec_refuses_int_blocks_that_overflow_int32():
    with pytest.raises(ValueError, match=r"blocks of 70000 elements may overflow the int32 sums"):
        qgemm.spec(40, 70000, "int8<sym,token>", "int8<sym,channel>")
    assert qgemm.spec(40, 70000, "fp8e4m3<token>", "fp8e4m3<channel>")  # fp32 sums: no such limit


class TestLaunchErrors:
    """Bad arguments fail before any kernel runs, naming the argument, what was expected
    and what came."""

    @pytest.fixture
    def kit(self):
        c = case("int8<sym,token>", "int3<asym,g32>", 0, m=3, k=100, n=40, epilogue=("bias",))
        ops = make_operands(c)
        mod = load(qgemm.spec(40, 100, ops["act"], ops["weight"], has_bias=True))
        return mod, storage(ops["act"], ops["qx"].codes), ops["qx"].scale, ops["words"], ops["qw"], ops["bias"]

    def test_activation_storage_dtype(self, kit):
        mod, xc, xs, words, qw, bias = kit
        want = re.escape("x_codes must be int8 [3, 100] on cpu (int8<sym,token> signed values), got uint8 [3, 100]")
        with pytest.raises(LaunchError, match=want):
            mod.launch(xc.to(torch.uint8), xs, words, qw.scale, qw.zero, bias=bias)
        with pytest.raises(LaunchError, match=r"x_codes must be int8 \[3, 100\].*got float32 \[3, 100\]"):
            mod.launch(xc.float(), xs, words, qw.scale, qw.zero, bias=bias)

    def test_scale_shapes(self, kit):
        mod, xc, xs, words, qw, bias = kit
        with pytest.raises(LaunchError, match=r"x_scale must be float32 or float16 \[3, 1\].*got float32 \[1, 1\]"):
            mod.launch(xc, xs[:1], words, qw.scale, qw.zero, bias=bias)
        with pytest.raises(LaunchError, match=r"w_scale must be float32 or float16 \[40, 4\].*got float32 \[40, 1\]"):
            mod.launch(xc, xs, words, qw.scale[:, :1], qw.zero, bias=bias)

    def test_packed_weight(self, kit):
        mod, xc, xs, words, qw, bias = kit
        want = re.escape("w_words must be int32 [40, 10]") + r".*got float32 \[40, 100\]"
        with pytest.raises(LaunchError, match=want):
            mod.launch(xc, xs, qw.codes, qw.scale, qw.zero, bias=bias)

    def test_missing_and_extra_operands(self, kit):
        mod, xc, xs, words, qw, bias = kit
        with pytest.raises(LaunchError, match=r"w_zero must be a tensor.*got NoneType"):
            mod.launch(xc, xs, words, qw.scale, None, bias=bias)
        with pytest.raises(LaunchError, match=r"bias must be a tensor.*got NoneType"):
            mod.launch(xc, xs, words, qw.scale, qw.zero)
        with pytest.raises(LaunchError, match=r"takes no residual \(the epilogue has no residual\)"):
            mod.launch(xc, xs, words, qw.scale, qw.zero, bias=bias, residual=torch.zeros(3, 40))
        with pytest.raises(LaunchError, match=r"takes no x_global \(int8<sym,token> has no global scale\)"):
            mod.launch(xc, xs, words, qw.scale, qw.zero, x_global=torch.ones(1), bias=bias)

    def test_float_activations_are_bit_patterns(self):
        mod = load(qgemm.spec(8, 32, "fp8e4m3<token>", "fp8e4m3<channel>"))
        with pytest.raises(LaunchError, match=re.escape("qgemm[k=32,n=8 act=fp8e4m3<token>,weight=fp8e4m3<channel>]: "
                                                        "x_codes must be uint8 [2, 32] on cpu (fp8e4m3<token> bit "
                                                        "patterns), got int8 [2, 32]")):
            mod.launch(torch.zeros(2, 32, dtype=torch.int8), torch.ones(2, 1), torch.zeros(8, 8, dtype=torch.int32),
                       torch.ones(8, 1))


# --------------------------------------------------------------------------- GPU compile

_SM90 = SM90_PRELUDE + textwrap.dedent(
    """
    from mxc.ir import IntFormat

    done = []
    for text in json.loads(sys.argv[1]):
        spec = KernelSpec.from_json(text)
        mod = load(spec)
        f32 = torch.float32
        out = {"f16": torch.float16, "f32": f32}[spec.dtype("out")]
        for cfg in mod.CONFIGS:
            split = cfg["SPLIT_K"]
            ptrs = dict(x_ptr=torch.int8 if isinstance(spec.fmt("act"), IntFormat) else torch.uint8, xs_ptr=f32,
                        w_ptr=torch.int32, ws_ptr=torch.float16, wz_ptr=f32 if mod.HAS_ZERO.value else None,
                        wg_ptr=f32 if mod.W_GLOBAL.value else None, xg_ptr=f32 if mod.X_GLOBAL.value else None,
                        bias_ptr=torch.float16 if "bias" in spec.epilogue else None,
                        res_ptr=f32 if "residual" in spec.epilogue else None,
                        mul_ptr=f32 if "mul" in spec.epilogue else None, out_ptr=out, part_ptr=f32 if split > 1 else None)
            ints = {name: "i32" for name in mod.qgemm_kernel.arg_names if name == "M" or name.startswith("stride")}
            keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "GROUPS_PER_SPLIT", "TILES_PER_STEP")
            assert build(mod.qgemm_kernel, {**ptrs, **ints}, {k: cfg[k] for k in keys}, cfg) > 0
            if split > 1:
                assert build_reduce(mod, ptrs, cfg) > 0
            done.append(f"{spec} max_m={cfg['MAX_M']}")
    print("\\n".join(done))
    """
)


def test_compiles_for_sm90(tmp_path):
    """The generated kernels pass Triton's GPU compiler (to an sm_90 cubin, no GPU needed),
    which checks what the interpreter does not: int8 and f16 tl.dot shapes and operand
    types, the int32 accumulator, integer widths and shifts, constexpr branches. W8A8,
    W4A8 with a zero point (also as SwiGLU's up projection, "mul"), W4A4 (grouped activation
    scales), fp8 x fp8, fp8 x nvfp4 (global scale), a straddling width in blocks that are not
    tile multiples; both M classes each."""
    specs = [
        qgemm.spec(4096, 4096, "int8<sym,token>", "int8<sym,channel>", epilogue=("bias", "silu", "residual")),
        qgemm.spec(4096, 11008, "int8<sym,token>", "int4<asym,g128>", out_dtype="f16", epilogue=("residual",)),
        qgemm.spec(11008, 4096, "int8<sym,token>", "int4<asym,g128>", epilogue=("bias", "mul")),
        qgemm.spec(4096, 4096, "int4<sym,g128>", "int4<asym,g128>", epilogue=("gelu",)),
        qgemm.spec(4096, 4096, "fp8e4m3<token>", "fp8e4m3<channel>", epilogue=("bias",)),
        qgemm.spec(1000, 4096, "fp8e4m3<block16>", "nvfp4", out_dtype="f16"),
        qgemm.spec(4096, 4000, "int8<sym,tensor>", "int6<asym,g100>"),
    ]
    assert len(compile_for_sm90(tmp_path, _SM90, specs)) == 2 * len(specs)
