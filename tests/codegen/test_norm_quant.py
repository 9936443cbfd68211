"""The norm_quant template (fused gather + rms_norm / layer_norm + activation quantizes, and
the act_quant / plain quantize kernels: norm "none") against the reference numerics, under
the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).

The oracle is the reference backend's own op rules (`mxc.runtime.reference.IMPLS`: gather,
rms_norm, layer_norm, quantize). What must hold, per case:

* Quantized outputs are bit for bit the reference quantize of the row the kernel computed:
  codes (storage convention: int8 / uint8 values, float bit patterns), scales and zero points
  all EQUAL `fmt.quantize(y[..., start:end])` (`fmt.encode` for static scales), y being the
  kernel's float row (the spec's float output).
* Without a norm the row is x (gathered), so every output EQUALS the reference's.
* With a norm the float row agrees with the reference within float32 rounding: rms_norm
  |y - ref| <= 2^-20 |ref| (8 ulp; torch's vectorised CPU rsqrt alone is up to 2 ulp off
  and its sum order differs; measured <= 0.32 of this), layer_norm |y - ref| <= 2^-19
  (|x - mean| + |mean|) rstd |w| + 2^-20 |b| (the mean's few-ulp error is absolute, not
  relative, where x is near it; the kernel and torch are each <= 0.27 of this from a float64
  layer_norm, <= 0.41 from each other).
  For f16 x the reference runs on x.float() and is rounded to f16 as the kernel's row is:
  the two then agree within one f16 ulp (2^-10 relative) plus the f32 tolerance.
  End to end, >= 99% of the codes then equal the reference's codes too (measured: all 111138
  codes of the norm cases equal; a code can differ only where a value or a scale sits on a
  rounding boundary that a last-ulp difference of the row crosses).

Shapes are not multiples of the tiles (D = 72, 100, 200, 10; ranges D - 3, groups of 32 and
128 that do not divide them); M in {1, 3, 17, 64}, with leading dims.
"""

from __future__ import annotations

import re
import textwrap
import zlib
from pathlib import Path

import pytest
import torch

from mxc.codegen import KernelSpec, LaunchError, Tiles, load
from mxc.codegen.templates import norm_quant
from mxc.ir import FloatFormat, IntFormat, parse, parse_format
from mxc.ir.printer import region_of
from mxc.ir.formats import QTensor
from mxc.ir.quant import decode_bits
from mxc.runtime.reference import IMPLS, ReferenceExecutor

from kernel_helpers import compile_for_sm90, kernel_cache, SM90_PRELUDE, storage  # noqa: F401 (kernel_cache: autouse fixture)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "fuse"
TORCH = {"f16": torch.float16, "f32": torch.float32}


# --------------------------------------------------------------------------- reference


def ref_quantize(fmt, row: torch.Tensor, static=None) -> list[torch.Tensor]:
    """The reference `quantize` rule on `row` (static: the given scale [, zero]), as stored."""
    parts = IMPLS["quantize"]([row, *(static or ())], {"format": fmt}, None)
    return [storage(fmt, parts[0]), *parts[1:]]


def ref_row(x, idx, w, b, norm, eps):
    """The reference backend's gather and norm rules on x (float32), as the region orders them."""
    x = x.float()
    if idx is not None:
        x = IMPLS["gather"]([x, idx], {"axis": x.dim() - 1}, None)
    ins = [x] + [t.float() for t in (w, b) if t is not None]
    if norm == "rms":
        return IMPLS["rms_norm"](ins, {"eps": eps}, None)
    if norm == "layer":
        return IMPLS["layer_norm"](ins, {"eps": eps}, None)
    return x


def row_tolerance(x, idx, w, b, norm, ref):
    """The allowed |kernel row - reference row| (module docstring)."""
    if norm == "rms":
        return 2.0**-20 * ref.abs() + 1e-30
    g = x.float() if idx is None else x.float()[..., idx]
    mean = g.mean(-1, keepdim=True)
    rstd = torch.rsqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-5)
    bound = ((g - mean).abs() + mean.abs()) * rstd * (w.float().abs() if w is not None else 1.0)
    return 2.0**-19 * bound + 2.0**-20 * (b.float().abs() if b is not None else 0.0) + 1e-30


# --------------------------------------------------------------------------- cases

NORMS = [  # (norm, gather, weight, bias)
    ("rms", False, True, False), ("rms", True, True, False), ("rms", False, False, False),
    ("layer", False, True, True), ("layer", True, True, True), ("layer", False, False, False),
    ("layer", True, True, False), ("none", True, False, False), ("none", False, False, False),
]
MS = (1, 3, 17, 64)
DS = (72, 100, 200)
#: Quantized outputs: (format, range) with range "all", "main" ([0, D-3)) or "outl" ([D-3, D)).
OUTPUTS = [
    [("int8<sym,token>", "all")],
    [("int8<sym,token>", "main"), ("int8<sym,token>", "outl")],  # the reorder pass's slices
    [("int4<sym,token>", "all")],
    [("int4<asym,token>", "main"), ("int8<asym,token>", "outl")],
    [("fp8e4m3<token>", "all")],
    [("fp8e5m2<token>", "main")],
    [("int4<sym,g32>", "main")],
    [("int4<sym,g128>", "all")],
    [("int4<asym,g32>", "all"), ("int8<sym,token>", "all")],
    [("fp4e2m1<g32>", "main"), ("fp8e4m3<token>", "outl")],
    [("mxfp4", "all")],
    [("mxfp8", "main")],
    [("mxfp6", "all")],
    [("fp4e2m1<block16,scale=fp8e4m3>", "all")],  # nvfp4's block scales without the global scale
    [("int8<sym,token,scale=f16>", "all")],
    [("int8<sym,tensor>", "all")],
    [("fp8e4m3<tensor>", "main"), ("int8<sym,token>", "outl")],
    [("int8<asym,tensor>", "all")],
    [("int3<asym,g16>", "main"), ("int2<sym,token>", "all")],
    [("int6<sym,g48>", "all")],
]


def case(i: int, outputs, **over) -> dict:
    """Case `i`: norms, M, D, dtypes and leading dims rotate with different periods."""
    norm, gather, weight, bias = NORMS[i % len(NORMS)]
    c = dict(norm=norm, gather=gather, weight=weight, bias=bias, m=MS[i % 4], d=DS[i % 3],
             x=("f32", "f32", "f16")[i % 3], lead=i % 2, outputs=outputs, eps=(1e-5, 1e-6)[i % 2])
    c.update(over)
    return c


def case_id(c: dict) -> str:
    norm = c["norm"] + ("+gather" if c["gather"] else "") + ("+w" if c["weight"] else "") + ("+b" if c["bias"] else "")
    outs = ",".join(f"{f}[{r}]" for f, r in c["outputs"])
    return f"{norm}-m{c['m']}-d{c['d']}-{c['x']}-{outs}"


CASES = [case(i, outs) for i, outs in enumerate(OUTPUTS)] + [case(i + 3, outs) for i, outs in enumerate(OUTPUTS[::2])]


def ranges_of(c: dict) -> list[tuple[int, int]]:
    d = c["d"]
    return [{"all": (0, d), "main": (0, d - 3), "outl": (d - 3, d)}[r] for _, r in c["outputs"]]


def make_inputs(c: dict):
    """Fresh random operands (seeded by the case id): x with per-row magnitudes and offsets
    (so rows' statistics and scales vary), a permutation, weight, bias, static scales."""
    g = torch.Generator().manual_seed(zlib.crc32(case_id(c).encode()))
    d, m = c["d"], c["m"]
    shape = (2, m, d) if c["lead"] else (m, d)
    x = (torch.randn(shape, generator=g) * torch.exp(torch.randn(*shape[:-1], 1, generator=g))
         + 0.5 * torch.randn(*shape[:-1], 1, generator=g))
    x = x.to(TORCH[c["x"]])
    idx = torch.randperm(d, generator=g) if c["gather"] else None
    w = 1.0 + 0.3 * torch.randn(d, generator=g) if c["weight"] else None
    b = 0.2 * torch.randn(d, generator=g) if c["bias"] else None
    static = []
    for fmt_text, _ in c["outputs"]:
        fmt = parse_format(fmt_text)
        if fmt.scaling.kind != "tensor":
            static.append(None)
            continue
        # a calibrated bound below the largest values: the largest codes saturate
        q = fmt.quantize(torch.tensor([[1.5 + torch.rand(1, generator=g).item()]]))
        scale = q.scale.reshape(1, 1)
        static.append(scale if q.zero is None else (scale, q.zero.reshape(1, 1) - 3.0))
    return x, idx, w, b, static


def make_spec(c: dict, float_out: bool = True, tiles=None) -> KernelSpec:
    return norm_quant.spec(
        c["d"], [f for f, _ in c["outputs"]], ranges_of(c), norm=c["norm"], eps=c["eps"], gather=c["gather"],
        has_weight=c["weight"], has_bias=c["bias"], float_out=float_out, x_dtype=c["x"], tiles=tiles,
    )


def split(results, fmts, float_out=True):
    """launch's tuple -> (float row or None, [parts of each output])."""
    results = list(results)
    y = results.pop(0) if float_out else None
    parts = []
    for f in fmts:
        n = 3 if isinstance(f, IntFormat) and not f.symmetric else 2
        parts.append(results[:n])
        results = results[n:]
    assert not results
    return y, parts


def check_case(c: dict, tiles=None, min_agreement: float = 0.99):
    """Run case `c` and check the contract of the module docstring."""
    x, idx, w, b, static = make_inputs(c)
    fmts = [parse_format(f) for f, _ in c["outputs"]]
    spec = make_spec(c, tiles=tiles)
    got = load(spec).launch(x, idx, w, b, scales=static if any(s is not None for s in static) else None)
    y, parts = split(got, fmts)
    assert y.dtype == x.dtype and y.shape == x.shape

    ref = ref_row(x, idx, w, b, c["norm"], c["eps"])
    if c["norm"] == "none":
        assert torch.equal(y, x[..., idx] if idx is not None else x)
    else:
        err = (y.float() - ref).abs()
        allowed = row_tolerance(x, idx, w, b, c["norm"], ref)
        if c["x"] == "f16":
            allowed = allowed + 2.0**-10 * ref.abs() + 2.0**-24
        worst = (err / allowed).max().item()
        assert worst <= 1.0, f"{case_id(c)}: float row off by {err.max().item():.3g}, {worst:.2f}x the tolerance"
    ref_in = ref.to(x.dtype).float()  # the reference's norm result in x's dtype, as quantize reads it
    for fmt, (start, end), st, mine in zip(fmts, ranges_of(c), static, parts):
        want = ref_quantize(fmt, y.float()[..., start:end], (st if isinstance(st, tuple) else (st,)) if st is not None else None)
        assert len(mine) == len(want)
        for k, (a, e) in enumerate(zip(mine, want)):
            assert a.dtype == e.dtype and a.shape == e.shape, (fmt, k, a.dtype, a.shape, e.dtype, e.shape)
            assert torch.equal(a, e), f"{case_id(c)}: {fmt} part {k} differs from quantize(kernel row) at {(a != e).sum()} places"
        end_to_end = ref_quantize(fmt, ref_in[..., start:end], (st if isinstance(st, tuple) else (st,)) if st is not None else None)
        agree = (mine[0] == end_to_end[0]).float().mean().item()
        if c["norm"] == "none":
            assert all(torch.equal(a, e) for a, e in zip(mine, end_to_end)), f"{case_id(c)}: {fmt} differs from the reference"
        else:
            assert agree >= min_agreement, f"{case_id(c)}: {fmt}: only {agree:.4f} of the codes equal the reference's"


@pytest.mark.parametrize("c", CASES, ids=[case_id(c) for c in CASES])
def test_matches_reference(c):
    check_case(c)


def test_cases_cover_the_contract():
    """The parametrisation reaches every norm variant, format kind and scale dtype."""
    fmts = [parse_format(f) for c in CASES for f, _ in c["outputs"]]
    assert {(c["norm"], c["gather"], c["weight"], c["bias"]) for c in CASES} == set(NORMS)
    kinds = {(type(f).__name__, getattr(f, "symmetric", None), f.scaling.kind, f.scaling.scale) for f in fmts}
    for want in [("IntFormat", True, "token", "f32"), ("IntFormat", False, "token", "f32"), ("IntFormat", True, "group", "f16"),
                 ("IntFormat", False, "group", "f16"), ("FloatFormat", None, "token", "f32"),
                 ("FloatFormat", None, "group", "f16"), ("FloatFormat", None, "block", "e8m0"),
                 ("FloatFormat", None, "block", "fp8e4m3"), ("IntFormat", True, "tensor", "f32"),
                 ("IntFormat", False, "tensor", "f32"), ("FloatFormat", None, "tensor", "f32"),
                 ("IntFormat", True, "token", "f16")]:
        assert want in kinds, want
    assert {c["m"] for c in CASES} == set(MS) and {c["d"] for c in CASES} == set(DS) and {c["x"] for c in CASES} == {"f16", "f32"}
    assert {f.name for f in fmts if isinstance(f, FloatFormat)} == {"fp8e4m3", "fp8e5m2", "fp6e2m3", "fp4e2m1"}


@pytest.mark.parametrize(
    "tiles",
    [Tiles(max_m=None, block_m=16, block_n=16, block_k=16), Tiles(max_m=None, block_m=32, block_n=64, block_k=16)],
    ids=["chunks16", "rows32-chunks64"],
)
@pytest.mark.parametrize("i", [0, 3, 8])
def test_long_rows_in_chunks(tiles, i):
    """Rows longer than a chunk: the statistics, the float row and per-row scales loop over
    chunks; groups of 32 and 48 loop a few (or one) at a time."""
    c = case(i, [("int4<sym,g32>", "main"), ("int8<sym,token>", "all"), ("int4<asym,g48>", "outl"),
                 ("int8<sym,tensor>", "main")], d=200, m=17)
    check_case(c, tiles=(tiles,))


def test_float_out_off_gives_the_same_outputs():
    """Without the float row the quantized outputs are the same bits."""
    c = case(1, [("int4<sym,g32>", "main"), ("int8<asym,token>", "outl"), ("mxfp4", "all")], m=17, d=100)
    x, idx, w, b, _ = make_inputs(c)
    fmts = [parse_format(f) for f, _ in c["outputs"]]
    _, with_y = split(load(make_spec(c, float_out=True)).launch(x, idx, w, b), fmts)
    _, without = split(load(make_spec(c, float_out=False)).launch(x, idx, w, b), fmts, float_out=False)
    for p, q in zip(with_y, without):
        assert all(torch.equal(a, e) for a, e in zip(p, q))


# --------------------------------------------------------------------------- exact grids


def _grid_row(fmt) -> torch.Tensor:
    """Every grid value of `fmt` (both signs), the midpoints of neighbours (ties), and
    random values in between, scaled so the row's own scale is exactly 1."""
    grid = fmt.grid()
    if isinstance(fmt, IntFormat) and fmt.symmetric:
        grid = grid[1:]  # amax 2^(b-1) - 1: scale 1
    elif isinstance(fmt, IntFormat):
        grid = grid - (2**fmt.bits - 1) / 2  # [-q/2, q/2]: scale 1, zero round(q/2), every x + zero a tie
    mids = (grid[1:] + grid[:-1]) / 2
    g = torch.Generator().manual_seed(len(grid))
    between = grid[:-1] + (grid[1:] - grid[:-1]) * torch.rand(len(grid) - 1, generator=g)
    return torch.cat([grid, mids, between, -grid, -mids])


@pytest.mark.parametrize("fmt", ["fp8e4m3<token>", "fp8e5m2<token>", "fp6e3m2<token>", "fp6e2m3<token>",
                                 "fp4e2m1<token>", "int8<sym,token>", "int4<sym,token>", "int4<asym,token>",
                                 "int8<asym,token>"])
def test_every_grid_value_and_tie(fmt):
    """A row holding every grid value, every tie between neighbours and values between
    (scale exactly 1 by construction): codes equal the reference's — nearest-even ties,
    subnormals, signed zeros."""
    f = parse_format(fmt)
    row = _grid_row(f)
    x = torch.stack([row, row.flip(0) * 0.5, row[torch.randperm(len(row), generator=torch.Generator().manual_seed(1))]])
    spec = norm_quant.spec(len(row), [f])
    got = load(spec).launch(x)
    want = ref_quantize(f, x)
    if f.scaling.kind == "token":
        assert want[1][0].item() == 1.0  # the construction above
    for a, e in zip(got, want):
        assert torch.equal(a, e)


@pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")  # 3e38 / 0.37: inf, as in torch
@pytest.mark.parametrize("fmt", ["fp8e4m3<tensor>", "fp8e5m2<tensor>", "fp4e2m1<tensor>", "int8<sym,tensor>",
                                 "int5<asym,tensor>"])
def test_static_scale_saturates_and_specials(fmt):
    """Static scales smaller than the row's range: codes saturate at the grid's ends;
    infinities saturate (fp8e5m2 keeps them), NaN gets the fp8 NaN code."""
    f = parse_format(fmt)
    g = torch.Generator().manual_seed(3)
    row = torch.cat([torch.randn(40, generator=g) * 30, torch.tensor([1e6, -1e6, 3e38, -3e38, float("inf"), float("-inf")])])
    if isinstance(f, FloatFormat) and f.name.startswith("fp8"):
        row = torch.cat([row, torch.tensor([float("nan")])])
    x = torch.stack([row, -row])
    scale = torch.tensor([[0.37]])
    static = (scale, torch.tensor([[9.0]])) if isinstance(f, IntFormat) and not f.symmetric else scale
    got = load(norm_quant.spec(len(row), [f])).launch(x, scales=[static])
    want = ref_quantize(f, x, static if isinstance(static, tuple) else (static,))
    assert torch.equal(got[0], want[0])
    assert got[1] is want[1] or got[1] is static or got[1] is static[0]


@pytest.mark.parametrize("fmt", ["int4<sym,g32>", "int4<asym,g32>", "mxfp4", "mxfp8", "fp4e2m1<block16,scale=fp8e4m3>",
                                 "int8<sym,token>", "int8<sym,token,scale=f16>", "fp8e4m3<g32,scale=e8m0>"])
def test_scale_storage_over_the_whole_range(fmt):
    """Rows and groups of magnitudes 1e-40 (float32 subnormal) to 1e30, and all-zero rows
    and groups: f16 scales round to subnormals, underflow to 0 (then 1) and clamp at 65504;
    e8m0 and fp8e4m3 scales round exactly as `_store_scale` does."""
    d = 96
    g = torch.Generator().manual_seed(5)
    mags = torch.tensor([1e-40, 1e-30, 1e-12, 3e-8, 1e-5, 1.0, 7.0, 1e4, 1e5, 3e6, 1e12, 1e30])
    x = torch.randn(len(mags), d, generator=g) * mags[:, None]
    x[2, 32:64] = 0.0  # an all-zero group
    x = torch.cat([x, torch.zeros(1, d), x[:, torch.randperm(d, generator=g)] * 1.7])
    f = parse_format(fmt)
    got = load(norm_quant.spec(d, [f], [(0, d - 5)])).launch(x)
    want = ref_quantize(f, x[:, : d - 5])
    for k, (a, e) in enumerate(zip(got, want)):
        assert torch.equal(a, e), f"{fmt} part {k}: {(a != e).sum()} differ"


# --------------------------------------------------------------------------- golden groups


def read_region(body):
    """A norm_quant / act_quant region of the fuse pass read as a lowering would: the spec, the
    region arguments that are x / index / weight / bias, and the quantize nodes in order (the
    kernel's outputs out0, out1, ...)."""
    arg = {a: i for i, a in enumerate(body.inputs)}
    gather = next((n for n in body.nodes if n.op == "gather"), None)
    norm = next((n for n in body.nodes if n.op in ("rms_norm", "layer_norm")), None)
    head = norm or gather
    quants = [n for n in body.nodes if n.op == "quantize"]
    d = int(head.types[0].shape[-1])
    ranges = []
    for q in quants:
        src = q.inputs[0].node
        ranges.append((int(src.get("start")), int(src.get("end"))) if src.op == "slice" else (0, d))
    spec = norm_quant.spec(
        d, [q.get("format") for q in quants], ranges,
        norm={"rms_norm": "rms", "layer_norm": "layer", None: "none"}[norm.op if norm else None],
        eps=norm.get("eps") if norm else 1e-5, gather=gather is not None,
        has_weight=norm is not None and len(norm.inputs) > 1, has_bias=norm is not None and len(norm.inputs) > 2,
        float_out=True,  # the row is checked too; the region may or may not yield it
    )
    x = (gather or norm).inputs[0].node
    operands = dict(x=arg[x], index=arg[gather.inputs[1].node] if gather else None,
                    weight=arg[norm.inputs[1].node] if norm and len(norm.inputs) > 1 else None,
                    bias=arg[norm.inputs[2].node] if norm and len(norm.inputs) > 2 else None)
    return spec, operands, head, quants


def decoded(fmt, parts):
    """Kernel parts (storage convention) dequantized with the reference numerics."""
    codes = parts[0].float() if isinstance(fmt, IntFormat) else decode_bits(parts[0], fmt.spec)
    return fmt.dequantize(QTensor(codes, *parts[1:]))


GOLDEN_REGIONS = [("norm_quant", "norm_quant", 0), ("norm_quant", "norm_quant", 1), ("reordered", "norm_quant", 0),
                  ("reordered", "norm_quant", 1), ("reordered", "act_quant", 0), ("swiglu", "norm_quant", 0),
                  ("swiglu_qlinear", "norm_quant", 0)]


@pytest.mark.parametrize("name, kind, which", GOLDEN_REGIONS, ids=[f"{n}-{k}{w}" for n, k, w in GOLDEN_REGIONS])
def test_golden_fused_region(name, kind, which):
    """Each norm_quant / act_quant region of the fuse goldens, run by the reference executor
    and by the kernel its contents specify: every yield agrees — the norm's row within the
    float tolerance, a quantize's codes and zero points exactly and its scales within 2^-20
    (exactly without a norm), a dequantize of them likewise."""
    graph = parse((GOLDEN / f"{name}.after.mxir").read_text())
    body = [region_of(n) for n in graph.nodes if n.op == "fused" and n.get("kind") == kind][which]
    spec, where, head, quants = read_region(body)
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}{kind}{which}".encode()))
    args = []
    for a in body.inputs:
        t = a.types[0]
        shape = [2, 3, *t.shape[2:]] if t.rank == 3 else list(t.shape)
        args.append(torch.randperm(int(shape[0]), generator=g) if t.dtype.name == "i64" else torch.randn(shape, generator=g))
    want = ReferenceExecutor(body)(args)
    pick = {k: (args[i] if i is not None else None) for k, i in where.items()}
    y, parts = split(load(spec).launch(pick["x"], pick["index"], pick["weight"], pick["bias"]), [q.get("format") for q in quants])
    exact = spec.option("norm") == "none"
    for v, ref in zip(body.outputs, want):
        node = v.node
        if node is head:  # the float row
            ok = torch.equal(y, ref) if exact else bool(((y - ref).abs() <= row_tolerance(
                pick["x"], pick["index"], pick["weight"], pick["bias"], spec.option("norm"), ref)).all())
        elif node.op == "quantize":
            k = quants.index(node)
            mine = parts[k][v.index]
            ref = storage(node.get("format"), ref) if v.index == 0 else ref
            ok = torch.equal(mine, ref) if exact or v.index != 1 else torch.allclose(mine, ref, rtol=2.0**-20, atol=0)
        else:
            assert node.op == "dequantize", node
            k = quants.index(node.inputs[0].node)
            mine = decoded(node.get("format"), parts[k])
            ok = torch.equal(mine, ref) if exact else torch.allclose(mine, ref, rtol=2.0**-20, atol=1e-30)
        assert ok, f"{name} {kind}#{which}: yield {node.op}#{v.index} differs"
    for q, p in zip(quants, parts):  # and the codes are exactly those of the kernel's own row
        s, e = spec.option("ranges")[2 * quants.index(q): 2 * quants.index(q) + 2]
        assert all(torch.equal(a, b) for a, b in zip(p, ref_quantize(q.get("format"), y[..., s:e])))


# --------------------------------------------------------------------------- edges and errors


def test_empty_m_and_strided_x():
    spec = norm_quant.spec(72, ["int8<sym,token>"], norm="rms", float_out=True)
    y, codes, scale = load(spec).launch(torch.empty(0, 4, 72))
    assert y.shape == (0, 4, 72) and codes.shape == (0, 4, 72) and scale.shape == (0, 4, 1)
    x = torch.randn(5, 144)[:, ::2]
    assert not x.is_contiguous()
    y, codes, scale = load(spec).launch(x)
    assert torch.equal(codes, ref_quantize(parse_format("int8<sym,token>"), y)[0])
    assert ((y - ref_row(x, None, None, None, "rms", 1e-5)).abs() <= 2.0**-20 * y.abs()).all()


def test_outs_are_written_and_returned():
    spec = norm_quant.spec(100, ["int4<asym,g32>"], norm="none", float_out=True)
    x = torch.randn(3, 100)
    outs = [torch.empty(3, 100), torch.empty(3, 100, dtype=torch.uint8), None, torch.empty(3, 4)]
    got = load(spec).launch(x, outs=outs)
    assert got[0] is outs[0] and got[1] is outs[1] and got[3] is outs[3]
    want = ref_quantize(parse_format("int4<asym,g32>"), x)
    assert all(torch.equal(a, e) for a, e in zip(got[1:], want))


class TestLaunchErrors:
    """Bad arguments fail before any kernel runs, naming the kernel, the argument, what was
    expected and what came."""

    @pytest.fixture
    def mod(self):
        return load(norm_quant.spec(72, ["int8<sym,token>", "int8<sym,tensor>"], [(0, 70), (70, 72)], norm="rms",
                                    gather=True, has_weight=True))

    def test_x(self, mod):
        with pytest.raises(LaunchError, match=r"x must be float32 \[3, 72\].*got float16 \[3, 72\]"):
            mod.launch(torch.randn(3, 72).half(), torch.arange(72), torch.ones(72), scales=[None, torch.ones(1, 1)])
        with pytest.raises(LaunchError, match=r"x must be float32 \[3, 72\].*got float32 \[3, 70\]"):
            mod.launch(torch.randn(3, 70), torch.arange(72), torch.ones(72), scales=[None, torch.ones(1, 1)])

    def test_index_and_weight(self, mod):
        with pytest.raises(LaunchError, match=r"index must be a tensor: int64 \[72\].*got NoneType"):
            mod.launch(torch.randn(3, 72), None, torch.ones(72), scales=[None, torch.ones(1, 1)])
        with pytest.raises(LaunchError, match=r"index must be int64 \[72\].*got int32 \[72\]"):
            mod.launch(torch.randn(3, 72), torch.arange(72, dtype=torch.int32), torch.ones(72), scales=[None, torch.ones(1, 1)])
        with pytest.raises(LaunchError, match=r"takes no bias \(the spec has no norm bias\)"):
            mod.launch(torch.randn(3, 72), torch.arange(72), torch.ones(72), torch.ones(72), scales=[None, torch.ones(1, 1)])

    def test_scales(self, mod):
        x, idx, w = torch.randn(3, 72), torch.arange(72), torch.ones(72)
        with pytest.raises(LaunchError, match=r"scales must be a list with one entry per quantized output \(2\)"):
            mod.launch(x, idx, w, scales=torch.ones(1, 1))
        with pytest.raises(LaunchError, match=r"scales\[1\] must be a tensor: .*\[1, 1\].*static int8<sym,tensor> scale.*got NoneType"):
            mod.launch(x, idx, w)
        with pytest.raises(LaunchError, match=r"scales\[1\] must be float32 or float16 \[1, 1\].*got float32 \[1\]"):
            mod.launch(x, idx, w, scales=[None, torch.ones(1)])
        with pytest.raises(LaunchError, match=r"scales\[0\] must be None: out0 \(int8<sym,token>\) computes its scales"):
            mod.launch(x, idx, w, scales=[torch.ones(1, 1), torch.ones(1, 1)])

    def test_outs(self, mod):
        x, idx, w, s = torch.randn(3, 72), torch.arange(72), torch.ones(72), [None, torch.ones(1, 1)]
        with pytest.raises(LaunchError, match=r"outs must be a list of 4 entries"):
            mod.launch(x, idx, w, scales=s, outs=[None])
        with pytest.raises(LaunchError, match=r"out out0 codes must be int8 \[3, 70\].*got uint8 \[3, 70\]"):
            mod.launch(x, idx, w, scales=s, outs=[torch.empty(3, 70, dtype=torch.uint8), None, None, None])
        with pytest.raises(LaunchError, match=r"outs entry for out1 scale must be None \(the static scale is an input\)"):
            mod.launch(x, idx, w, scales=s, outs=[None, None, None, torch.empty(1, 1)])

    def test_message_names_the_kernel(self, mod):
        with pytest.raises(LaunchError, match=re.escape("norm_quant[d=72 out0=int8<sym,token>,out1=int8<sym,tensor>")):
            mod.launch(torch.randn(3, 72), None, torch.ones(72))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(formats=["nvfp4"]), r"global scale from the amax of the whole tensor"),
        (dict(formats=["int8<sym,channel>"]), r"scales per channel \(weights only\)"),
        (dict(formats=["int8<sym,token>"], ranges=[(0, 73)]), r"0 <= start < end <= d = 72"),
        (dict(formats=["int8<sym,token>"], ranges=[(5, 5)]), r"0 <= start < end <= d = 72"),
        (dict(formats=["int8<sym,token>"], norm="rms", has_bias=True), r"rms_norm has no bias"),
        (dict(formats=["int8<sym,token>"], norm="layer", has_bias=True), r"layer_norm's bias comes with its weight"),
        (dict(formats=["int8<sym,token>"], has_weight=True), r"norm 'none' takes no weight, bias or eps"),
        (dict(formats=["int8<sym,token>"], norm="batch"), r"option norm must be one of rms, layer, none"),
        (dict(), r"needs an output: a quantized range or float_out"),
        (dict(formats=["int8<sym,token>"], x_dtype="bf16"), r"dtypes \{'x': one of f16, f32\}"),
        (dict(formats=["int8<sym,token>"], tiles=(Tiles(8, 16, 16, 16), Tiles(None, 16, 16, 16))),
         r"one tile configuration"),
    ],
)
def test_spec_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        norm_quant.spec(72, **kwargs)


def test_spec_json_round_trip_and_options():
    spec = norm_quant.spec(100, ["int4<sym,g32>", "int8<sym,token>"], [(0, 97), (97, 100)], norm="rms", eps=1e-6,
                           gather=True, has_weight=True)
    assert KernelSpec.from_json(spec.to_json()) == spec and spec.key() == KernelSpec.from_json(spec.to_json()).key()
    assert spec.option("ranges") == (0, 97, 97, 100) and spec.option("eps") == 1e-6 and spec.option("norm") == "rms"
    assert norm_quant.spec(100, ["int8<sym,token>"]).option("eps") is None  # no norm: eps is not part of the kernel


_SM90 = SM90_PRELUDE + textwrap.dedent(
    """

    X = {"f16": torch.float16, "f32": torch.float32}
    for text in json.loads(sys.argv[1]):
        spec = KernelSpec.from_json(text)
        mod = load(spec)
        opt = dict(spec.options)
        ptrs = {"x_ptr": X[spec.dtype("x")], "idx_ptr": torch.int64 if opt["gather"] else None,
                "w_ptr": torch.float16 if opt["has_weight"] else None, "b_ptr": torch.float32 if opt["has_bias"] else None,
                "y_ptr": X[spec.dtype("x")] if opt["float_out"] else None}
        for i, o in enumerate(mod.QUANT_OUTPUTS):
            ptrs.update({f"q{i}_ptr": o["codes"], f"s{i}_ptr": torch.float32, f"z{i}_ptr": torch.float32})
        k = build_row(mod.norm_quant_kernel, ptrs, spec.tiles[0])
        ptx = k.asm["ptx"]
        # IEEE division and square root, no contracted mul-add, the rint constant kept
        assert "div.full" not in ptx and "div.approx" not in ptx and "fma.rn.f32" not in ptx, spec
        assert "div.rn.f32" in ptx and "0f4B400000" in ptx, spec
        print(spec, len(k.asm["cubin"]))
    """
)


def test_compiles_for_sm90(tmp_path):
    """The generated kernels pass Triton's GPU compiler (to an sm_90 cubin, no GPU needed),
    which checks what the interpreter does not (one type per variable across loops, shapes
    of 3-D group tiles, constexpr helpers); the PTX keeps IEEE-rounded divisions and no
    contracted mul-adds, so a GPU quantizes like the interpreter."""
    specs = [
        norm_quant.spec(4096, ["int8<sym,token>", "int4<asym,g128>", "mxfp4", "fp8e5m2<token>", "int8<sym,tensor>"],
                        [(0, 4000), (0, 4000), (4000, 4096), (0, 4096), (0, 4096)], norm="layer", gather=True,
                        has_weight=True, has_bias=True, float_out=True, x_dtype="f16"),
        norm_quant.spec(576, ["int8<sym,token>", "fp4e2m1<block16,scale=fp8e4m3>", "int3<asym,g48>"], norm="rms",
                        has_weight=True),
        norm_quant.spec(10, ["int8<sym,token>", "int8<sym,token>"], [(0, 8), (8, 10)], gather=True),
    ]
    assert len(compile_for_sm90(tmp_path, _SM90, specs)) == len(specs)
