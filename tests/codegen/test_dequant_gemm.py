"""The dequant GEMM / GEMV template against the reference numerics, under the Triton
interpreter (tests/conftest.py sets TRITON_INTERPRET=1).

Every case quantizes a fresh random weight with the format's own `quantize`, packs its codes
the way the layout pass does (`pack(to_codes(q.codes, fmt), Layout(bits, axis=1))`), runs the
generated kernel and compares with the reference: `fmt.dequantize(q)` (as
`runtime/reference.py::_dequantize`), an fp32 `F.linear` and the epilogue in fp32.

Tolerance, per element: 1e-5 of the magnitude bound |x| @ |W|^T (fp32 summation order; the
kernels measure ~2e-7, while rounding the scaled weights to f16 would already show ~3e-5),
plus 1e-6 of |pre-activation| + |reference| for the epilogue's own float32 math, plus half an
f16 ulp of the reference when the output is f16. The same bound holds for f16 x: x is exact
in fp32 and the kernel never rounds a scaled weight to f16.

Shapes are not multiples of the tiles (K = 72, 100, 200; N = 33, 40, 96); M in {1, 3, 17, 64}
covers the split-K GEMV class (M <= 16) and the GEMM class. A last test compiles generated
kernels for sm_90 (no GPU needed) so the GPU-only checks of `tl.dot` and the types run too.
"""

from __future__ import annotations

import re
import textwrap
import zlib

import pytest
import torch
import torch.nn.functional as F

from mxc.codegen import KernelSpec, LaunchError, Tiles, load
from mxc.ir import FloatFormat, IntFormat, Layout, parse_format
from mxc.ir.packing import pack, to_codes

from kernel_helpers import compile_for_sm90, kernel_cache, SM90_PRELUDE  # noqa: F401 (kernel_cache: autouse fixture)

MS = (1, 3, 17, 64)
KS = (72, 100, 200)
NS = (40, 96, 33)
EPILOGUES = (
    (),
    ("bias",),
    ("silu",),
    ("bias", "gelu"),
    ("residual",),
    ("bias", "gelu_tanh", "residual"),
    ("silu", "residual"),
)
GROUPS = ("g32", "g64", "g128")


def case(fmt: str, i: int, **over) -> dict:
    """Case `i` of a format: M, K, N, dtypes and epilogue rotate with different periods, so
    every value meets many formats; `over` pins some of them."""
    c = dict(
        fmt=fmt, m=MS[i % 4], k=KS[i % 3], n=NS[(i // 3) % 3],
        x=("f16", "f32")[i % 2], out=("f32", "f16", "f32")[i % 3], epilogue=EPILOGUES[i % 7],
    )
    c.update(over)
    return c


def case_id(c: dict) -> str:
    epi = "+".join(c["epilogue"]) or "plain"
    return f"{c['fmt']}-m{c['m']}-k{c['k']}-n{c['n']}-x{c['x']}-o{c['out']}-{epi}"


def int_cases() -> list[dict]:
    """Every width 1..8, symmetric and asymmetric (int1: asymmetric only), per channel and
    per group (group size rotating through 32, 64, 128)."""
    cases = []
    for bits in range(1, 9):
        for sym in (True, False) if bits > 1 else (False,):
            for j, scaling in enumerate(("channel", GROUPS[(bits + sym) % 3])):
                cases.append(f"int{bits}<{'sym' if sym else 'asym'},{scaling}>")
    return [case(f, i) for i, f in enumerate(cases)]


def float_cases() -> list[dict]:
    """Every float element per channel and per group, the microscaling formats (e8m0 block
    scales) and nvfp4 (fp8e4m3 block scales and a global scale)."""
    names = ["fp8e4m3", "fp8e5m2", "fp6e3m2", "fp6e2m3", "fp4e2m1"]
    fmts = [f"{n}<channel>" for n in names] + [f"{n}<{GROUPS[i % 3]}>" for i, n in enumerate(names)]
    fmts += ["mxfp4", "mxfp6", "mxfp6e3m2", "mxfp8", "nvfp4"]
    return [case(f, i + 3) for i, f in enumerate(fmts)]


def edge_cases() -> list[dict]:
    """K that is not a multiple of the group or of 32 with g32, g64 and per channel; groups
    that are not powers of two (48: tiles of 16 in one group; 100, 24: scaled per element);
    per-tensor scales; and M on both sides of the split-K class."""
    cases = []
    for i, (k, scaling) in enumerate((k, s) for k in KS for s in ("g32", "g64", "channel")):
        cases.append(case(f"int3<asym,{scaling}>", i, k=k))
        cases.append(case(f"fp6e2m3<{scaling}>", i + 1, k=k))
    for i, f in enumerate(["int6<asym,g48>", "int3<sym,g100>", "fp4e2m1<g24>", "int4<sym,tensor>",
                           "int5<asym,tensor>", "fp8e4m3<tensor>"]):
        cases.append(case(f, i, m=MS[(i + 1) % 4]))
    return cases


def make_inputs(c: dict):
    """Fresh random operands for case `c` (seeded by its id): W with per-row magnitudes and
    offsets (so scales and zero points vary), its quantized parts, x, bias, residual."""
    g = torch.Generator().manual_seed(zlib.crc32(case_id(c).encode()))
    fmt = parse_format(c["fmt"])
    n, k, m = c["n"], c["k"], c["m"]
    w = torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g)) + 0.3 * torch.randn(n, 1, generator=g)
    q = fmt.quantize(w)
    packed = pack(to_codes(q.codes, fmt), Layout(bits=fmt.bits, axis=1))
    xdt = {"f16": torch.float16, "f32": torch.float32}
    x = torch.randn(m, k, generator=g).to(xdt[c["x"]])
    bias = torch.randn(n, generator=g) if "bias" in c["epilogue"] else None
    res = torch.randn(m, n, generator=g) if "residual" in c["epilogue"] else None
    return fmt, q, packed, x, bias, res


def reference(fmt, q, x, bias, res, epilogue):
    """(pre-activation, result) in fp32: `fmt.dequantize`, F.linear, then the epilogue."""
    w = fmt.dequantize(q)
    y = F.linear(x.float(), w)
    pre = y
    for step in epilogue:
        if step == "bias":
            y = y + bias.float()
        elif step == "residual":
            y = y + res.float()
        else:
            pre = y
            y = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[step](y)
    return pre, y, (x.float().abs() @ w.abs().T)


def assert_close(y, c, fmt, q, x, bias, res):
    """`y` matches the reference within the tolerance of the module docstring."""
    pre, ref, bound = reference(fmt, q, x, bias, res, c["epilogue"])
    assert y.dtype == {"f16": torch.float16, "f32": torch.float32}[c["out"]]
    assert torch.isfinite(ref).all()
    lip = 1.2 if any(s in ("silu", "gelu", "gelu_tanh") for s in c["epilogue"]) else 1.0
    allowed = 1e-5 * lip * bound + 1e-6 * (pre.abs() + ref.abs()) + 1e-30
    if c["out"] == "f16":
        allowed = allowed + ref.abs() * 2.0**-11 + 2.0**-25
    err = (y.float() - ref).abs()
    worst = (err / allowed).max().item()
    assert worst <= 1.0, (
        f"{case_id(c)}: max error {err.max().item():.3g} is {worst:.2f}x the tolerance "
        f"(output magnitude {ref.abs().max().item():.3g})"
    )


def run_case(c: dict, tiles=None):
    fmt, q, packed, x, bias, res = make_inputs(c)
    spec = KernelSpec.dequant_gemm(c["n"], c["k"], fmt, x_dtype=c["x"], out_dtype=c["out"],
                                   epilogue=c["epilogue"], tiles=tiles)
    y = load(spec).launch(x, packed, q.scale, q.zero, q.global_scale, bias=bias, residual=res)
    assert y.shape == (c["m"], c["n"])
    assert_close(y, c, fmt, q, x, bias, res)


ALL = int_cases() + float_cases() + edge_cases()


@pytest.mark.parametrize("c", ALL, ids=[case_id(c) for c in ALL])
def test_matches_reference(c):
    run_case(c)


def test_cases_cover_every_format_width_and_epilogue():
    """The parametrisation above reaches what the numerics contract asks for."""
    fmts = [parse_format(c["fmt"]) for c in ALL]
    for bits in range(2, 9):
        for sym in (True, False):
            kinds = {f.scaling.kind for f in fmts if isinstance(f, IntFormat) and f.bits == bits and f.symmetric == sym}
            assert {"channel", "group"} <= kinds, (bits, sym, kinds)
    groups = {f.scaling.size for f in fmts if f.scaling.kind == "group"}
    assert {32, 64, 128} <= groups
    floats = {(f.name, f.scaling.kind, f.scaling.scale, f.global_) for f in fmts if isinstance(f, FloatFormat)}
    for name in ("fp8e4m3", "fp8e5m2", "fp6e3m2", "fp6e2m3", "fp4e2m1"):
        assert (name, "channel", "f16", False) in floats and (name, "tensor" if name == "fp8e4m3" else "channel", "f32" if name == "fp8e4m3" else "f16", False) in floats
        assert any(f[0] == name and f[1] == "group" for f in floats)
        assert name == "fp8e5m2" or (name, "block", "e8m0", False) in floats  # mxfp4 / mxfp6 (both) / mxfp8
    assert ("fp4e2m1", "block", "fp8e4m3", True) in floats  # nvfp4
    assert {c["m"] for c in ALL} == set(MS) and {c["k"] for c in ALL} == set(KS)
    assert {s for c in ALL for s in c["epilogue"]} == {"bias", "silu", "gelu", "gelu_tanh", "residual"}
    assert {(c["x"], c["out"]) for c in ALL} == {("f16", "f16"), ("f16", "f32"), ("f32", "f16"), ("f32", "f32")}


@pytest.mark.parametrize(
    "tiles",
    [
        # several M and N tiles; K split 4 ways over 7 tiles (the last split has one tile)
        (Tiles(max_m=None, block_m=16, block_n=16, block_k=32, split_k=4),),
        # a split that would be empty (8 splits of 7 tiles): masked tiles add nothing
        (Tiles(max_m=None, block_m=16, block_n=32, block_k=32, split_k=8),),
        # three M classes, the middle one without split-K
        (Tiles(max_m=2, block_m=16, block_n=16, block_k=16, split_k=3),
         Tiles(max_m=20, block_m=32, block_n=16, block_k=64),
         Tiles(max_m=None, block_m=16, block_n=64, block_k=128, split_k=2)),
    ],
    ids=["split4", "split8-empty", "three-classes"],
)
@pytest.mark.parametrize("fmt", ["int5<asym,g32>", "fp4e2m1<g64>", "int7<sym,g100>"])
@pytest.mark.parametrize("m", [1, 17, 40])
def test_tile_configurations(tiles, fmt, m):
    run_case(case(fmt, m, m=m, k=200, n=40, epilogue=("bias", "silu")), tiles=tiles)


def test_leading_dims_strided_x_f16_scales_and_out():
    """x [2, 3, K] taken as a strided view, f16 scale tensors (the f16 scaling stores
    f16-exact values), a residual [2, 3, N] and a caller-given `out` that is returned."""
    fmt = parse_format("int4<asym,g32>")
    g = torch.Generator().manual_seed(7)
    n, k = 40, 100
    w = torch.randn(n, k, generator=g)
    q = fmt.quantize(w)
    packed = pack(to_codes(q.codes, fmt), Layout(bits=4, axis=1))
    x = torch.randn(2, 3, 2 * k, generator=g).half()[..., ::2]
    assert not x.is_contiguous()
    res = torch.randn(2, 3, n, generator=g)
    out = torch.empty(2, 3, n)
    spec = KernelSpec.dequant_gemm(n, k, fmt, x_dtype="f16", out_dtype="f32", epilogue=("residual",))
    y = load(spec).launch(x, packed, q.scale.half(), q.zero.half(), residual=res, out=out)
    assert y is out
    ref = F.linear(x.float(), fmt.dequantize(q)) + res
    bound = x.float().abs() @ fmt.dequantize(q).abs().T
    assert ((y - ref).abs() <= 1e-5 * bound + 1e-6 * ref.abs()).all()


def test_empty_m():
    fmt = parse_format("int4<sym,channel>")
    q = fmt.quantize(torch.randn(33, 72))
    packed = pack(to_codes(q.codes, fmt), Layout(bits=4, axis=1))
    y = load(KernelSpec.dequant_gemm(33, 72, fmt, x_dtype="f32")).launch(torch.empty(0, 72), packed, q.scale)
    assert y.shape == (0, 33) and y.dtype == torch.float32


@pytest.mark.parametrize(
    "fmt, m, epilogue",
    [
        ("int4<asym,g32>", 1, ("mul",)),
        ("fp4e2m1<g64>", 3, ("silu", "mul")),
        ("int3<sym,channel>", 17, ("bias", "mul")),
        ("nvfp4", 64, ("silu", "mul")),
        ("int6<asym,g48>", 3, ("gelu", "mul", "residual")),
    ],
)
def test_mul_epilogue(fmt, m, epilogue):
    """The "mul" step multiplies the tile elementwise by an [M, N] operand (`multiplier`),
    in the epilogue's order, in both M classes (split-K: the reduce kernel applies it).
    Tolerance: the module's bound for the steps before "mul", scaled by |multiplier|, plus
    1e-6 of |reference| for the product itself."""
    c = case(fmt, m, m=m, k=100, n=40, x="f32", out="f32", epilogue=tuple(s for s in epilogue if s != "mul"))
    fmt_, q, packed, x, bias, res = make_inputs(c)
    mult = torch.randn(m, 40, generator=torch.Generator().manual_seed(m)) * 3
    spec = KernelSpec.dequant_gemm(40, 100, fmt_, x_dtype="f32", out_dtype="f32", epilogue=epilogue)
    y = load(spec).launch(x, packed, q.scale, q.zero, q.global_scale, bias=bias, residual=res, multiplier=mult)
    before = tuple(epilogue[: epilogue.index("mul")])
    pre, ref, bound = reference(fmt_, q, x, bias, None, before)
    ref = ref * mult
    lip = 1.2 if any(s in ("silu", "gelu") for s in before) else 1.0
    allowed = (1e-5 * lip * bound + 1e-6 * (pre.abs() + (ref / mult).abs())) * mult.abs() + 1e-6 * ref.abs()
    if "residual" in epilogue:
        ref = ref + res
        allowed = allowed + 1e-6 * ref.abs()
    err = (y - ref).abs()
    assert (err <= allowed + 1e-30).all(), f"{fmt} m={m} {epilogue}: max error {err.max().item():.3g}"


def test_mul_epilogue_composes_swiglu():
    """SwiGLU as two kernels: gate with "silu", then up with "mul" by the gate's output, equals
    silu(x @ Wg^T) * (x @ Wu^T) in fp32 (different formats for the two weights)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 72, generator=g)
    fg, fu = parse_format("int2<sym,g32>"), parse_format("fp6e2m3<channel>")
    qg, qu = fg.quantize(torch.randn(100, 72, generator=g)), fu.quantize(torch.randn(100, 72, generator=g))
    wg, wu = (pack(to_codes(q.codes, f), Layout(bits=f.bits, axis=1)) for q, f in ((qg, fg), (qu, fu)))
    gate = load(KernelSpec.dequant_gemm(100, 72, fg, x_dtype="f32", epilogue=("silu",))).launch(x, wg, qg.scale)
    y = load(KernelSpec.dequant_gemm(100, 72, fu, x_dtype="f32", epilogue=("mul",))).launch(
        x, wu, qu.scale, multiplier=gate)
    ref = F.silu(F.linear(x, fg.dequantize(qg))) * F.linear(x, fu.dequantize(qu))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


class TestLaunchErrors:
    """Bad arguments fail before any kernel runs, naming the argument, what was expected
    and what came."""

    @pytest.fixture
    def kit(self):
        fmt = parse_format("int3<asym,g32>")
        q = fmt.quantize(torch.randn(40, 100))
        packed = pack(to_codes(q.codes, fmt), Layout(bits=3, axis=1))
        spec = KernelSpec.dequant_gemm(40, 100, fmt, x_dtype="f16", epilogue=("bias",))
        return load(spec), q, packed, torch.randn(3, 100).half(), torch.randn(40)

    def test_wrong_packed_shape(self, kit):
        mod, q, packed, x, bias = kit
        with pytest.raises(LaunchError, match=re.escape("weight must be int32 [40, 10]") + r".*got int32 \[40, 9\]"):
            mod.launch(x, packed[:, :9].contiguous(), q.scale, q.zero, bias=bias)

    def test_unpacked_codes(self, kit):
        mod, q, packed, x, bias = kit
        with pytest.raises(LaunchError, match=r"weight must be int32 \[40, 10\].*got float32 \[40, 100\]"):
            mod.launch(x, q.codes, q.scale, q.zero, bias=bias)

    def test_non_contiguous_weight(self, kit):
        mod, q, packed, x, bias = kit
        wide = torch.zeros(40, 20, dtype=torch.int32)
        wide[:, :10] = packed
        with pytest.raises(LaunchError, match=r"weight must be .*\(contiguous\).*not contiguous"):
            mod.launch(x, wide[:, :10], q.scale, q.zero, bias=bias)

    def test_x_dtype_and_k(self, kit):
        mod, q, packed, x, bias = kit
        with pytest.raises(LaunchError, match=r"x must be float16 \[3, 100\].*got float32 \[3, 100\]"):
            mod.launch(x.float(), packed, q.scale, q.zero, bias=bias)
        with pytest.raises(LaunchError, match=r"x must be float16 \[3, 100\].*got float16 \[3, 99\]"):
            mod.launch(x[:, :99], packed, q.scale, q.zero, bias=bias)

    def test_scale_shape(self, kit):
        mod, q, packed, x, bias = kit
        with pytest.raises(LaunchError, match=r"scale must be float32 or float16 \[40, 4\].*got float32 \[40, 1\]"):
            mod.launch(x, packed, q.scale[:, :1], q.zero, bias=bias)

    def test_missing_and_extra_operands(self, kit):
        mod, q, packed, x, bias = kit
        with pytest.raises(LaunchError, match=r"zero must be a tensor.*got NoneType"):
            mod.launch(x, packed, q.scale, None, bias=bias)
        with pytest.raises(LaunchError, match=r"bias must be a tensor.*got NoneType"):
            mod.launch(x, packed, q.scale, q.zero)
        with pytest.raises(LaunchError, match=r"takes no residual \(the epilogue has no residual\)"):
            mod.launch(x, packed, q.scale, q.zero, bias=bias, residual=torch.zeros(3, 40))
        with pytest.raises(LaunchError, match=r"takes no global_scale \(int3<asym,g32> has no global scale\)"):
            mod.launch(x, packed, q.scale, q.zero, torch.ones(1), bias=bias)

    def test_multiplier(self, kit):
        mod, q, packed, x, bias = kit
        with pytest.raises(LaunchError, match=r"takes no multiplier \(the epilogue has no mul\)"):
            mod.launch(x, packed, q.scale, q.zero, bias=bias, multiplier=torch.ones(3, 40))
        fmt = parse_format("int3<asym,g32>")
        mul = load(KernelSpec.dequant_gemm(40, 100, fmt, x_dtype="f16", epilogue=("mul",)))
        with pytest.raises(LaunchError, match=r"multiplier must be a tensor: float32 or float16 \[3, 40\]"):
            mul.launch(x, packed, q.scale, q.zero)
        with pytest.raises(LaunchError, match=r"multiplier must be float32 or float16 \[3, 40\].*got float32 \[40\]"):
            mul.launch(x, packed, q.scale, q.zero, multiplier=torch.ones(40))

    def test_out_dtype(self, kit):
        mod, q, packed, x, bias = kit
        with pytest.raises(LaunchError, match=r"out must be float16 \[3, 40\].*got float32 \[3, 40\]"):
            mod.launch(x, packed, q.scale, q.zero, bias=bias, out=torch.empty(3, 40))

    def test_message_names_the_kernel(self, kit):
        mod, q, packed, x, bias = kit
        with pytest.raises(LaunchError, match=re.escape("dequant_gemm[k=100,n=40 weight=int3<asym,g32> +bias]: ")):
            mod.launch(x, packed.float(), q.scale, q.zero, bias=bias)


_SM90 = SM90_PRELUDE + textwrap.dedent(
    """

    done = []
    for text in json.loads(sys.argv[1]):
        spec = KernelSpec.from_json(text)
        mod = load(spec)
        xd = {"f16": torch.float16, "f32": torch.float32}
        f32 = torch.float32
        for cfg in mod.CONFIGS:
            split = cfg["SPLIT_K"]
            ptrs = dict(x_ptr=xd[spec.dtype("x")], w_ptr=torch.int32, scale_ptr=torch.float16,
                        zero_ptr=f32 if mod.HAS_ZERO.value else None, global_ptr=f32 if mod.HAS_GLOBAL.value else None,
                        bias_ptr=torch.float16 if "bias" in spec.epilogue else None,
                        res_ptr=f32 if "residual" in spec.epilogue else None,
                        mul_ptr=f32 if "mul" in spec.epilogue else None,
                        out_ptr=xd[spec.dtype("out")], part_ptr=f32 if split > 1 else None)
            ints = {name: "i32" for name in mod.dequant_gemm_kernel.arg_names if name == "M" or name.startswith("stride")}
            keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "TILES_PER_SPLIT", "SCALE_IN_ACC")
            assert build(mod.dequant_gemm_kernel, {**ptrs, **ints}, {k: cfg[k] for k in keys}, cfg) > 0
            if split > 1:
                assert build_reduce(mod, ptrs, cfg) > 0
            done.append(f"{spec} max_m={cfg['MAX_M']}")
    print("\\n".join(done))
    """
)


def test_compiles_for_sm90(tmp_path):
    """The generated kernels pass Triton's GPU compiler (to an sm_90 cubin, no GPU needed),
    which checks what the interpreter does not: tl.dot's minimum shapes and operand types,
    integer widths and shifts, constexpr globals. Straddling and aligned widths, a zero
    point, float decodes with inf/NaN codes, a global scale, per-element scaling, f16 and f32
    x, every epilogue step; both M classes each."""
    specs = [
        KernelSpec.dequant_gemm(4096, 4096, "int4<sym,g128>", x_dtype="f16", epilogue=("bias", "silu", "residual")),
        KernelSpec.dequant_gemm(4096, 11008, "int3<asym,g64>", x_dtype="f32", out_dtype="f16", epilogue=("gelu",)),
        KernelSpec.dequant_gemm(1000, 4096, "fp8e5m2<g32>", x_dtype="f16", epilogue=("mul",)),
        KernelSpec.dequant_gemm(4096, 4096, "fp8e4m3<channel>", x_dtype="f16", epilogue=("gelu_tanh",)),
        KernelSpec.dequant_gemm(4096, 4096, "nvfp4", x_dtype="f16"),
        KernelSpec.dequant_gemm(4096, 4000, "int6<sym,g100>", x_dtype="f16"),
    ]
    assert len(compile_for_sm90(tmp_path, _SM90, specs)) >= 2 * len(specs)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # 0 * inf in masked rows
@pytest.mark.parametrize("x_dtype", ["f32", "f16"])
@pytest.mark.parametrize(
    "fmt", ["fp8e4m3<channel>", "fp8e5m2<channel>", "fp6e3m2<channel>", "fp6e2m3<channel>", "fp4e2m1<channel>",
            "int8<sym,channel>", "int7<asym,channel>", "int3<asym,channel>", "int1<asym,channel>"],
)
def test_every_code_decodes_exactly(fmt, x_dtype):
    """Row n of W holds code n alone (K = 1, scale 1): y = x · value(code) must equal the
    reference decoding (`from_codes`: subnormals, signed zeros, inf and NaN codes) exactly."""
    from mxc.ir.packing import from_codes

    f = parse_format(fmt)
    codes = torch.arange(2**f.bits, dtype=torch.uint8)[:, None]
    n = codes.shape[0]
    zero = torch.randint(0, 2**f.bits, (n, 1), generator=torch.Generator().manual_seed(n)).float()
    asym = isinstance(f, IntFormat) and not f.symmetric
    spec = KernelSpec.dequant_gemm(n, 1, f, x_dtype=x_dtype, out_dtype="f32")
    x = torch.ones(1, 1, dtype={"f16": torch.float16, "f32": torch.float32}[x_dtype])
    y = load(spec).launch(x, pack(codes, Layout(bits=f.bits, axis=1)), torch.ones(n, 1), zero if asym else None)
    ref = (from_codes(codes, f) - (zero if asym else 0.0))[:, 0]
    torch.testing.assert_close(y[0], ref, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(ref).any() == (fmt.startswith("fp8"))  # the fp8 formats have NaN codes
