"""The rope_kv template (rotary embedding + KV-cache quantize) against the reference
numerics, under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).

The oracle is the reference backend's op rules (`mxc.runtime.reference.IMPLS["rope"]`, then
`IMPLS["quantize"]`). Everything must be EQUAL, no tolerance: the float result (f32, and f16
with torch's per-op f16 rounding), the codes in the storage convention (int8 / uint8 values,
float bit patterns), scales and zero points.

Shapes: x [b, h, s, d] as the attention reads it — a transposed view of [b, s, h, d] (not
contiguous) or contiguous; cos / sin [1, 1, s, d], [b, 1, s, d] or [s, d]; d = 64, 80, 10 and
7 (odd: rotate_half splits 3 | 4); b*h*s rows not a multiple of the 16-row tile.
"""

from __future__ import annotations

import re
import textwrap
import zlib
from pathlib import Path

import pytest
import torch

from mxc.codegen import LaunchError, Tiles, load
from mxc.codegen.templates import rope_kv
from mxc.ir import FloatFormat, parse, parse_format
from mxc.ir.printer import region_of
from mxc.runtime.reference import IMPLS, ReferenceExecutor

from kernel_helpers import compile_for_sm90, kernel_cache, SM90_PRELUDE, storage  # noqa: F401 (kernel_cache: autouse fixture)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "fuse"
TORCH = {"f16": torch.float16, "f32": torch.float32}


def reference(x, cos, sin, fmts):
    """The reference rules: rope, then each quantize (parts as stored)."""
    y = IMPLS["rope"]([x, cos, sin], {}, None)
    parts = []
    for f in fmts:
        q = IMPLS["quantize"]([y], {"format": f}, None)
        parts.append([storage(f, q[0]), *q[1:]])
    return y, parts


FORMATS = [
    ["int8<sym,token>"],
    ["int4<asym,token>"],
    ["fp8e4m3<token>"],
    ["int4<sym,token>", "int8<sym,token>"],
    ["fp8e5m2<token>"],
    ["int4<sym,g32>"],
    ["int8<asym,g16>"],
    ["mxfp4"],
    ["int2<asym,token>", "fp8e4m3<g32,scale=e8m0>"],
    ["int8<sym,token,scale=f16>"],
    ["fp4e2m1<block16,scale=fp8e4m3>"],
]
SHAPES = [(1, 2, 5, 64), (2, 3, 7, 80), (1, 1, 1, 10), (2, 2, 9, 7), (3, 2, 17, 64)]


def case(i: int, fmts, **over) -> dict:
    c = dict(fmts=fmts, shape=SHAPES[i % len(SHAPES)], x=("f32", "f16", "f32")[i % 3], layout=("bshd", "bhsd")[i % 2],
             table=("1 1 s d", "b 1 s d", "s d")[i % 3], float_out=i % 2 == 0)
    c.update(over)
    return c


def case_id(c: dict) -> str:
    return f"{','.join(c['fmts'])}-{'x'.join(map(str, c['shape']))}-{c['x']}-{c['layout']}-cos[{c['table']}]" + (
        "-y" if c["float_out"] else "")


CASES = [case(i, f) for i, f in enumerate(FORMATS)] + [case(i + 1, f) for i, f in enumerate(FORMATS[::2])]


def make_inputs(c: dict):
    """x [b, h, s, d] (a transposed view for "bshd"), cos / sin of the case's broadcast shape."""
    g = torch.Generator().manual_seed(zlib.crc32(case_id(c).encode()))
    b, h, s, d = c["shape"]
    dt = TORCH[c["x"]]
    if c["layout"] == "bshd":
        x = (torch.randn(b, s, h, d, generator=g) * 2).to(dt).transpose(1, 2)
    else:
        x = (torch.randn(b, h, s, d, generator=g) * 2).to(dt)
    tshape = {"1 1 s d": (1, 1, s, d), "b 1 s d": (b, 1, s, d), "s d": (s, d)}[c["table"]]
    angle = torch.rand(tshape, generator=g) * 6.3
    return x, angle.cos().to(dt), angle.sin().to(dt)


def run_case(c: dict, tiles=None):
    x, cos, sin = make_inputs(c)
    fmts = [parse_format(f) for f in c["fmts"]]
    spec = rope_kv.spec(c["shape"][-1], fmts, float_out=c["float_out"], x_dtype=c["x"], tiles=tiles)
    got = list(load(spec).launch(x, cos, sin))
    y, want = reference(x, cos, sin, fmts)
    if c["float_out"]:
        assert got[0].dtype == y.dtype and torch.equal(got.pop(0), y), f"{case_id(c)}: rope differs"
    for f, parts in zip(fmts, want):
        mine, got = got[: len(parts)], got[len(parts):]
        for k, (a, e) in enumerate(zip(mine, parts)):
            assert a.dtype == e.dtype and a.shape == e.shape, (f, k, a.dtype, a.shape, e.dtype, e.shape)
            assert torch.equal(a, e), f"{case_id(c)}: {f} part {k} differs at {(a != e).sum()} places"
    assert not got


@pytest.mark.parametrize("c", CASES, ids=[case_id(c) for c in CASES])
def test_matches_reference(c):
    run_case(c)


def test_cases_cover_the_contract():
    fmts = [parse_format(f) for c in CASES for f in c["fmts"]]
    kinds = {(type(f).__name__, getattr(f, "symmetric", None), f.scaling.kind) for f in fmts}
    assert {("IntFormat", True, "token"), ("IntFormat", False, "token"), ("FloatFormat", None, "token"),
            ("IntFormat", True, "group"), ("IntFormat", False, "group"), ("FloatFormat", None, "block")} <= kinds
    assert {f.scaling.scale for f in fmts} == {"f32", "f16", "e8m0", "fp8e4m3"}
    for key, values in (("x", {"f16", "f32"}), ("layout", {"bshd", "bhsd"}), ("table", {"1 1 s d", "b 1 s d", "s d"}),
                        ("float_out", {True, False})):
        assert {c[key] for c in CASES} == values, key
    assert ("f16", "bshd") in {(c["x"], c["layout"]) for c in CASES}  # f16 from a strided view
    assert {c["shape"] for c in CASES} == set(SHAPES) and any(isinstance(f, FloatFormat) for f in fmts)


@pytest.mark.parametrize("fmts", [["int8<sym,token>", "int4<asym,g16>"], ["fp8e4m3<token>"]])
def test_rows_longer_than_a_chunk(fmts):
    """16-channel chunks over d = 80: per-row scales loop over the row twice, groups step."""
    run_case(case(1, fmts, shape=(2, 3, 5, 80), float_out=True), tiles=(Tiles(None, 16, 16, 16),))


def test_golden_rope_kv_region():
    """The rope_kv region of tests/golden/fuse/rope_kv (rope of the keys, int8<sym,token>),
    run by the reference executor: every yield — the codes, the scales, a dequantize of them
    or the rope result — equals the kernel's."""
    graph = parse((GOLDEN / "rope_kv.after.mxir").read_text())
    (body,) = [region_of(n) for n in graph.nodes if n.op == "fused" and n.get("kind") == "rope_kv"]
    rope = next(n for n in body.nodes if n.op == "rope")
    quants = [n for n in body.nodes if n.op == "quantize"]
    fmts = [q.get("format") for q in quants]
    g = torch.Generator().manual_seed(4)
    k = torch.randn(2, 1, 6, 8, generator=g)
    angle = torch.rand(1, 1, 6, 8, generator=g) * 6.3
    want = ReferenceExecutor(body)([k, angle.cos(), angle.sin()])
    y, *got = load(rope_kv.spec(8, fmts, float_out=True)).launch(k, angle.cos(), angle.sin())
    parts = [got[:2], got[2:]] if len(fmts) == 2 else [got]
    for v, ref in zip(body.outputs, want):
        node = v.node
        if node is rope:
            mine = y
        elif node.op == "quantize":
            mine = parts[quants.index(node)][v.index]
            ref = storage(node.get("format"), ref) if v.index == 0 else ref
        else:
            assert node.op == "dequantize", node
            codes, scale = parts[quants.index(node.inputs[0].node)]
            mine = codes.float() * scale
        assert torch.equal(mine, ref), f"yield {node.op}#{v.index} differs"


def test_empty_and_lower_rank():
    spec = rope_kv.spec(10, ["int4<asym,token>"], float_out=True)
    y, codes, scale, zero = load(spec).launch(torch.empty(2, 0, 3, 10), torch.ones(3, 10), torch.ones(3, 10))
    assert y.shape == (2, 0, 3, 10) and codes.shape == (2, 0, 3, 10) and zero.shape == (2, 0, 3, 1)
    x = torch.randn(5, 10)  # [s, d]: one batch, one head
    angle = torch.rand(5, 10)
    got = load(spec).launch(x, angle.cos(), angle.sin())
    yr, (parts,) = reference(x, angle.cos(), angle.sin(), [parse_format("int4<asym,token>")])
    assert torch.equal(got[0], yr) and all(torch.equal(a, e) for a, e in zip(got[1:], parts))


class TestLaunchErrors:
    @pytest.fixture
    def mod(self):
        return load(rope_kv.spec(8, ["int8<sym,token>"]))

    def test_x(self, mod):
        c = torch.ones(1, 1, 4, 8)
        with pytest.raises(LaunchError, match=r"x must be float32 \[2, 1, 4, 8\].*got float16"):
            mod.launch(torch.randn(2, 1, 4, 8).half(), c, c)
        with pytest.raises(LaunchError, match=r"x must be a float32 tensor \[b, h, s, 8\] \(1 to 4 dims\), got float32 \[1, 2, 1, 4, 8\]"):
            mod.launch(torch.randn(1, 2, 1, 4, 8), c, c)

    def test_tables(self, mod):
        x = torch.randn(2, 1, 4, 8)
        with pytest.raises(LaunchError, match=r"sin must broadcast to x's shape \[2, 1, 4, 8\], got float32 \[1, 1, 5, 8\]"):
            mod.launch(x, torch.ones(1, 1, 4, 8), torch.ones(1, 1, 5, 8))
        with pytest.raises(LaunchError, match=r"cos must be float32 \[...\].*got float16"):
            mod.launch(x, torch.ones(1, 1, 4, 8).half(), torch.ones(1, 1, 4, 8))

    def test_outs(self, mod):
        x, c = torch.randn(2, 1, 4, 8), torch.ones(4, 8)
        with pytest.raises(LaunchError, match=r"out out0 scale must be float32 \[2, 1, 4, 1\].*got float32 \[2, 1, 4\]"):
            mod.launch(x, c, c, outs=[None, torch.empty(2, 1, 4)])
        codes = torch.empty(2, 1, 4, 8, dtype=torch.int8)
        assert mod.launch(x, c, c, outs=[codes, None])[0] is codes

    def test_message_names_the_kernel(self, mod):
        with pytest.raises(LaunchError, match=re.escape("rope_kv[d=8 out0=int8<sym,token> float_out=False]: ")):
            mod.launch(torch.randn(2, 1, 4, 8), torch.ones(3, 8), torch.ones(4, 8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(formats=["int8<sym,tensor>"]), r"scales per tensor; computed at run time that is the amax of every row"),
        (dict(formats=["nvfp4"]), r"global scale"),
        (dict(formats=["int4<sym,channel>"]), r"scales per channel"),
        (dict(), r"needs an output: a format or float_out"),
        (dict(formats=["int8<sym,token>"], x_dtype="bf16"), r"dtypes \{'x': one of f16, f32\}"),
    ],
)
def test_spec_refusals(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rope_kv.spec(64, **kwargs)


_SM90 = SM90_PRELUDE + textwrap.dedent(
    """

    for text in json.loads(sys.argv[1]):
        spec = KernelSpec.from_json(text)
        mod = load(spec)
        x = {"f16": torch.float16, "f32": torch.float32}[spec.dtype("x")]
        ptrs = {"x_ptr": x, "cos_ptr": x, "sin_ptr": x, "y_ptr": x if spec.option("float_out") else None}
        for i, o in enumerate(mod.QUANT_OUTPUTS):
            ptrs.update({f"q{i}_ptr": o["codes"], f"s{i}_ptr": torch.float32, f"z{i}_ptr": torch.float32})
        k = build_row(mod.rope_kv_kernel, ptrs, spec.tiles[0])
        assert "fma.rn.f32" not in k.asm["ptx"] and "div.full" not in k.asm["ptx"], spec
        print(spec, len(k.asm["cubin"]))
    """
)


def test_compiles_for_sm90(tmp_path):
    """The generated kernels pass Triton's GPU compiler (sm_90 cubin, no GPU needed) and keep
    the products and the sum of rope separately rounded (no fma) and IEEE divisions."""
    specs = [
        rope_kv.spec(128, ["int8<sym,token>", "int4<asym,g32>"], float_out=True, x_dtype="f16"),
        rope_kv.spec(80, ["fp8e4m3<token>"], tiles=(Tiles(None, 16, 16, 16),)),
    ]
    assert len(compile_for_sm90(tmp_path, _SM90, specs)) == len(specs)
