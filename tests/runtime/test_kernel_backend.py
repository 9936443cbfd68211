"""The kernel backends (`interpret` here: the generated Triton kernels under the interpreter,
tests/conftest.py sets TRITON_INTERPRET=1) against the reference backend, end to end.

The tiny Llama (hidden 72, intermediate 100, vocab 131: no size is a tile multiple) is
compiled once per plan; its logits on backend "interpret" must match backend "reference" for
M = b·s in {1, 3, 17} (b = s = 1 is a decode step; 1 and 3 take the split-K GEMV tiles, 17
the GEMM tiles). The kernels compute in f32 like the graph (x f32, fp32 accumulation, f32
out), so they differ from the reference by fp32 summation order only. Tolerance: the error's
norm within 1e-5 of the logits' norm, and every element within 1e-5 of the largest logit
(measured: ~3e-7 for both, through two layers).

Also: the storage convention's conversions (`mxc.runtime.storage`), errors (inputs, launch
arguments, unavailable backends), the generated sources `mxc.save` stores, a saved artifact
loaded on "interpret", and `backend="auto"`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mxc
from mxc import Plan, Rule
from mxc.codegen import KernelSpec, LaunchError, kernel_path
from mxc.codegen.lower import lower
from mxc.ir import FloatFormat, IntFormat, flags, parse, parse_format
from mxc.ir.quant import decode_bits, encode_bits
from mxc.passes import run_pipeline
from mxc.runtime import BackendError, InputError, InterpretExecutor, ReferenceExecutor, TritonExecutor
from mxc.runtime.storage import from_storage, storage_dtype, to_storage
from graph_helpers import with_random_weights

RTOL = 1e-5
SHAPES = [(1, 1), (3, 1), (1, 17)]  # (b, s): M = 1, 3, 17
WEIGHT_ONLY = {
    "w4a16-g128": "w4a16-g128",
    "w3a16-g128": "w3a16-g128",
    "nvfp4": "nvfp4",
    # a different format per layer kind, lm_head too (so a graph output comes from a kernel)
    "mixed": Plan(
        rules=(
            Rule("*.self_attn.q_proj", weight="int2<sym,g32>"),
            Rule("*.self_attn.k_proj", weight="int5<asym,channel>"),
            Rule("*.self_attn.v_proj", weight="fp6e2m3<block32>"),
            Rule("*.self_attn.o_proj", weight="int8<sym,channel>"),
            Rule("*.mlp.gate_proj", weight="int3<asym,g32>"),
            Rule("*.mlp.up_proj", weight="fp4e2m1<g32>"),
            Rule("*.mlp.down_proj", weight="int7<sym,g64>"),
            Rule("lm_head", weight="fp8e4m3<channel>"),
        ),
        method="rtn",
        clip_search=False,
    ),
}


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    """The module's kernels go to one fresh cache directory."""
    with flags.CACHE_DIR.override(str(tmp_path_factory.mktemp("kernels"))):
        yield


@pytest.fixture(scope="module")
def compiled(tiny_llama):
    """plan name -> the tiny Llama compiled with it on backend "interpret" (once per module)."""
    cache = {}

    def get(name):
        if name not in cache:
            plan = WEIGHT_ONLY.get(name, name)
            with warnings.catch_warnings():  # no calibration data: compile warns that it rounds to nearest
                warnings.simplefilter("ignore")
                cache[name] = mxc.compile(tiny_llama, plan, backend="interpret")
        return cache[name]

    return get


def ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 131, (b, s), generator=torch.Generator().manual_seed(seed + 7 * b + s))


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    rel = ((got - want).norm() / want.norm()).item()
    worst = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= RTOL and worst <= RTOL, f"{what}: relative error {rel:.2e} (norm), {worst:.2e} (max); tolerance {RTOL}"


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("plan", list(WEIGHT_ONLY))
def test_tiny_llama_matches_reference(compiled, plan):
    c = compiled(plan)
    ex = c.executor
    assert isinstance(ex, InterpretExecutor) and c.backend == "interpret"
    # every group of a weight-only plan is a dequant GEMM or a SwiGLU: all run as kernels
    kinds = [n.get("kind") for n in c.graph.nodes if n.op == "fused"]
    assert set(kinds) == {"dequant_gemm", "swiglu"} and ex.fallbacks() == {}
    assert ex.kernels() and all(k.startswith("dequant_gemm[") for k in ex.kernels())
    assert any(k.endswith("+silu]") for k in ex.kernels()) and any(k.endswith("+mul]") for k in ex.kernels())
    per_call = len(ex.calls())
    assert per_call == len(kinds) + kinds.count("swiglu")  # a SwiGLU is two kernels
    ref = ReferenceExecutor(c.graph)
    for b, s in SHAPES:
        before = ex.launches
        (got,) = ex([ids(b, s)])
        assert ex.launches - before == per_call, "some lowered group did not run as kernels"
        (want,) = ref([ids(b, s)])
        assert_logits_close(got, want, f"{plan} (b, s) = {(b, s)}")


def test_outputs_survive_the_next_call(compiled):
    """Kernel results are written into pooled buffers reused by the next call of the same
    shape; what the caller receives is never one of them (here lm_head's kernel writes the
    logits: a graph output gets its own buffer)."""
    ex = compiled("mixed").executor
    assert ex.schedule()[-1].startswith('kernel %') and 'loc("lm_head")' in ex.schedule()[-1]
    (first,) = ex([ids(1, 3, seed=1)])
    kept = first.clone()
    (second,) = ex([ids(1, 3, seed=2)])
    assert torch.equal(first, kept) and not torch.equal(first, second)
    (again,) = ex([ids(1, 3, seed=1)])
    assert torch.equal(again, kept)  # the pooled buffers hold nothing stale: same input, same output


@pytest.mark.parametrize("plan", ["w8a8", "w4a4-kv4"])
def test_quantized_activations_cross_between_kernels_and_fallbacks(compiled, plan):
    """Plans that quantize activations (and the KV cache): the norm + quantize groups, the
    integer GEMMs (qgemm, also both GEMMs of a SwiGLU), the rotary + KV-quantize groups and
    the attention over the quantized KV cache run as kernels, which write and read codes in
    the storage convention; the standalone quantizes (the attention output's, the SwiGLU
    output's, the values' of the KV cache) run op by op on float grid values, so their codes
    are converted to storage where a kernel reads them. The logits match the reference."""
    c = compiled(plan)
    ex = c.executor
    groups = [n for n in c.graph.nodes if n.op == "fused"]
    lowered = {n.get("kind") for n in groups if lower(n) is not None}
    assert {"dequant_gemm", "norm_quant", "swiglu"} <= lowered and ("rope_kv" in lowered) == plan.endswith("kv4")
    assert ("attention" in lowered) == plan.endswith("kv4")  # w8a8 has no quantized KV cache: no attention group
    assert any(k.startswith("qgemm[") for k in ex.kernels()) and any(k.startswith("norm_quant[") for k in ex.kernels())
    assert ex.fallbacks() == {}
    assert any(k.startswith("attention[") for k in ex.kernels()) == plan.endswith("kv4")
    lines = ex.schedule()
    assert any("[to_storage" in line for line in lines)
    ref = ReferenceExecutor(c.graph)
    for b, s in SHAPES[1:]:
        (got,), (want,) = ex([ids(b, s)]), ref([ids(b, s)])
        assert_logits_close(got, want, f"{plan} (b, s) = {(b, s)}")


def test_reordered_channels():
    """The reorder pass's groups (tests/golden/fuse/reordered): a norm that gathers its row
    and quantizes two channel ranges, an act_quant gather, int8 outlier GEMMs added in the
    main GEMM's epilogue, and a gathered layer_norm with bias whose float row is the output:
    all kernels, matching the reference."""
    before = parse((Path(__file__).parents[1] / "golden" / "fuse" / "reordered.before.mxir").read_text())
    g = run_pipeline(with_random_weights(before), ["layout", "fuse"], verify=True).graph
    ex, ref = InterpretExecutor(g), ReferenceExecutor(g)
    assert ex.fallbacks() == {}
    kernels = ex.kernels()
    assert any("gather=True" in k and "ranges=(0, 8, 8, 10)" in k and "norm=rms" in k for k in kernels)
    assert any("norm=none" in k for k in kernels) and any("float_out=True" in k and "norm=layer" in k for k in kernels)
    gen = torch.Generator().manual_seed(1)
    for b, s in SHAPES:
        x = torch.randn(b, s, 10, generator=gen)
        (got,), (want,) = ex([x]), ref([x])
        assert_logits_close(got, want, f"reordered (b, s) = {(b, s)}")


class _MLP(nn.Module):
    """Biased linears, a tanh-GELU, a residual, and two graph outputs read from kernels."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(40, 56), nn.Linear(56, 40)
        self.fc3, self.fc4 = nn.Linear(40, 33), nn.Linear(40, 33)

    def forward(self, x):
        h = x + self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        return F.silu(self.fc3(h)), F.gelu(self.fc4(h))


def test_epilogues_bias_gelu_residual():
    """Every epilogue step the fuse pass forms (a linear's own bias, gelu, gelu_tanh, silu,
    residual) lowers into the kernel and matches the reference."""
    torch.manual_seed(3)
    x = torch.randn(2, 5, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = mxc.compile(_MLP().eval(), Plan(default=Rule(weight="int4<asym,g32>"), method="rtn", clip_search=False),
                        example_inputs=x, backend="interpret")
    assert c.executor.fallbacks() == {}
    assert c.executor.kernels() == [
        "dequant_gemm[k=40,n=56 weight=int4<asym,g32> +bias+gelu_tanh]",
        "dequant_gemm[k=56,n=40 weight=int4<asym,g32> +bias+residual]",
        "dequant_gemm[k=40,n=33 weight=int4<asym,g32> +bias+silu]",
        "dequant_gemm[k=40,n=33 weight=int4<asym,g32> +bias+gelu]",
    ]
    ref = ReferenceExecutor(c.graph)
    for shape in [(1, 1, 40), (3, 1, 40), (1, 17, 40)]:
        x = torch.randn(shape)
        for got, want in zip(c.executor([x]), ref([x])):
            assert_logits_close(got, want, f"MLP {shape}")


def test_swiglu_lowers_to_gate_then_up_times_gate(compiled):
    c = compiled("w4a16-g128")
    swiglu = next(n for n in c.graph.nodes if n.op == "fused" and n.get("kind") == "swiglu")
    low = lower(swiglu)
    gate, up = low.calls
    assert gate.spec.epilogue == ("silu",) and up.spec.epilogue == ("mul",)
    assert dict(up.args)["multiplier"].call == 0 and low.results[0].call == 1
    assert gate.loc.endswith("gate_proj") and up.loc.endswith("up_proj")


def test_lower_says_why_not():
    """Groups no template covers are not lowered, and the reason names what is missing:
    here golden fuse graphs whose weights the layout pass has not packed, and norm groups
    that yield dequantized activations (the kernel writes codes and scales)."""
    golden = Path(__file__).parents[1] / "golden" / "fuse"
    g = parse((golden / "dequant_gemm.after.mxir").read_text())
    reasons = {}
    fused = [n for n in g.nodes if n.op == "fused"]
    assert len(fused) == 2 and all(lower(n, reasons) is None for n in fused)
    assert [reasons[n] for n in fused] == [
        "the int4<asym,g4> weight codes are not packed (the layout pass packs them into int32 words)",
        "the int8<sym,channel> weight codes are not packed (the layout pass packs them into int32 words)",
    ]
    norms = [n for n in parse((golden / "norm_quant.after.mxir").read_text()).nodes if n.op == "fused"]
    assert len(norms) == 2 and all(lower(n, reasons) is None for n in norms)
    assert all(reasons[n].startswith("the group yields a dequantized activation") for n in norms)
    with pytest.raises(ValueError, match="lower: expected a fused node, got const"):
        lower(g.nodes[0])


# ------------------------------------------------------------------------------------ storage

INT_FORMATS = [f"int{b}<sym,g32>" for b in range(2, 9)] + [f"int{b}<asym,channel>" for b in range(1, 9)]
FLOAT_FORMATS = ["fp8e4m3<channel>", "fp8e5m2<channel>", "fp6e3m2<g32>", "fp6e2m3<block32>", "fp4e2m1<g32>"]


@pytest.mark.parametrize("name", INT_FORMATS + FLOAT_FORMATS)
def test_storage_round_trip(name):
    """Codes of fresh random data in the storage convention (int8 signed values, uint8
    asymmetric codes, uint8 bit patterns) and back, exactly."""
    fmt = parse_format(name)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(len(name))) * 3
    codes = fmt.quantize(x).codes
    s = to_storage(codes, fmt, check=True)
    assert s.dtype == storage_dtype(fmt) == (torch.int8 if isinstance(fmt, IntFormat) and fmt.symmetric else torch.uint8)
    if isinstance(fmt, FloatFormat):
        assert torch.equal(s, encode_bits(codes, fmt.spec).to(torch.uint8))
    else:
        assert torch.equal(s.to(torch.int64), codes.to(torch.int64))
    back = from_storage(s, fmt, check=True)
    assert back.dtype == torch.float32 and torch.equal(back, codes)


@pytest.mark.parametrize("name", FLOAT_FORMATS)
def test_storage_every_float_code(name):
    """Every bit pattern (signed zeros, subnormals, the largest values, inf and NaN codes)
    decodes like `decode_bits` and encodes back to itself."""
    fmt = parse_format(name)
    bits = torch.arange(2**fmt.bits, dtype=torch.uint8)
    values = decode_bits(bits, fmt.spec)
    torch.testing.assert_close(from_storage(bits, fmt), values, rtol=0, atol=0, equal_nan=True)
    encoded = to_storage(values, fmt, check=True)
    finite = ~torch.isnan(values)  # NaN: one code per sign (S.1111.111), as encode_bits gives it
    assert torch.equal(encoded[finite], bits[finite])
    assert torch.equal(encoded[~finite], encode_bits(values[~finite], fmt.spec).to(torch.uint8))


def test_storage_checks():
    with pytest.raises(ValueError, match=r"int4<sym,g32> codes must be integers in \[-8, 7\], got 8"):
        to_storage(torch.tensor([1.0, 8.0]), parse_format("int4<sym,g32>"), check=True)
    with pytest.raises(ValueError, match=r"value 0\.3.* is not on the grid of fp4e2m1"):
        to_storage(torch.tensor([0.5, 0.3]), parse_format("fp4e2m1<g32>"), check=True)
    with pytest.raises(ValueError, match=r"int4<asym,g32> codes are stored as torch.uint8, got torch.int8"):
        from_storage(torch.zeros(3, dtype=torch.int8), parse_format("int4<asym,g32>"))
    with pytest.raises(ValueError, match=r"fp6e2m3<g32> bit patterns have 6 bits, got 64"):
        from_storage(torch.tensor([3, 64], dtype=torch.uint8), parse_format("fp6e2m3<g32>"), check=True)


# ------------------------------------------------------------------------------------ errors


def test_input_errors(compiled):
    ex = compiled("w4a16-g128").executor
    with pytest.raises(InputError, match=r"argument 'input_ids': expected dtype i64"):
        ex([ids(1, 3).float()])
    with pytest.raises(InputError, match=r"takes 1 input\(s\) \(input_ids\), got 2"):
        ex([ids(1, 3), ids(1, 3)])


def test_launch_error_names_node_and_argument(compiled):
    """A weight that does not fit its kernel (here: packed words cut short) fails at the
    launch, naming the graph node, the kernel and the argument."""
    g = compiled("w4a16-g128").graph
    name = "model.layers.0.self_attn.k_proj.weight"
    bad = g.replace(weights={**g.weights, name: g.weights[name][:, :-1].contiguous()})
    ex = InterpretExecutor(bad)
    with pytest.raises(LaunchError) as info:
        ex([ids(1, 3)])
    text = str(info.value)
    assert 'loc("model.layers.0.self_attn.k_proj")' in text and "kernel call k0" in text
    assert "dequant_gemm[k=72,n=24 weight=int4<asym,g128>]: weight must be int32 [24, 9]" in text
    assert "got int32 [24, 8]" in text


def test_triton_backend_needs_cuda(compiled):
    if torch.cuda.is_available():
        pytest.fail("this test expects a machine without CUDA (it checks the error the triton backend gives there)")
    with pytest.raises(BackendError, match=r"backend 'triton'.*torch.cuda.is_available\(\) is False.*'interpret'"):
        TritonExecutor(compiled("w4a16-g128").graph)
    with pytest.raises(BackendError, match=r"capture: CUDA graphs need a CUDA device.*cpu"):
        compiled("w4a16-g128").executor.capture([ids(1, 3)])


def test_interpret_backend_needs_the_interpreter(tmp_path):
    """Without TRITON_INTERPRET=1 the interpret backend refuses to start and says how to run it."""
    code = (
        "import mxc\n"
        "from mxc.ir import parse\n"
        "from mxc.runtime import BACKENDS, BackendError\n"
        "g = parse('graph @g(%x: f32[4]) {\\n  return %x\\n}\\n')\n"
        "try:\n"
        "    BACKENDS['interpret'](g)\n"
        "except BackendError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "set the environment variable TRITON_INTERPRET=1 before triton is imported" in proc.stdout


# ------------------------------------------------------------------------------------ artifacts


def test_kernel_sources_have_spec_headers(compiled):
    ex = compiled("nvfp4").executor
    sources = ex.kernel_sources()
    specs = list(dict.fromkeys(c.spec for _, c in ex.calls()))
    assert sorted(sources) == sorted(kernel_path(s).name for s in specs)
    assert len(sources) == len(ex.kernels()) == len(specs)
    for spec in specs:
        text = sources[kernel_path(spec).name]
        assert text.startswith("# Generated by mxc.codegen")
        assert f"# kernel: {spec}\n" in text and f"# spec key: {spec.key()}\n" in text
        line = next(ln for ln in text.splitlines() if ln.startswith("# spec: "))
        assert KernelSpec.from_json(line.removeprefix("# spec: ")) == spec
        assert "def launch(" in text


def test_save_and_load_on_interpret(compiled, tmp_path):
    c = compiled("w3a16-g128")
    path = mxc.save(c, tmp_path / "tiny-w3")
    stored = sorted(p.name for p in (path / "kernels").iterdir())
    assert stored == sorted(c.executor.kernel_sources())
    for name, text in c.executor.kernel_sources().items():
        assert (path / "kernels" / name).read_text() == text
    loaded = mxc.load(path, backend="interpret")
    assert loaded.backend == "interpret" and loaded.executor.kernels() == c.executor.kernels()
    x = ids(1, 17, seed=5)
    assert torch.equal(loaded(x).logits, c(x).logits)


def test_auto_backend():
    """"auto" is "triton" with CUDA, else "reference", and says which it picked."""
    want = "triton" if torch.cuda.is_available() else "reference"
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU()).eval()
    with pytest.warns(UserWarning, match=f"backend 'auto' picked '{want}'"):
        c = mxc.compile(model, example_inputs=torch.randn(2, 3, 8), backend="auto")
    assert c.backend == want
    x = torch.randn(2, 4, 8)
    assert torch.equal(c(x), model(x))
