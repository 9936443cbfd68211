"""Kernel benchmark: mxc's generated GEMM kernels against torch's fp16 matmul, on a CUDA GPU.

    python benchmarks/kernel_bench.py [--m 1 16 128 4096] [--nk 4096 8192] [--no-write]

For each kernel family (W4A16 g128, W8A16 per channel: the weight-only dequant GEMM; W8A8
int8 and fp8 per token x per channel: the qgemm family) at M in {1, 16, 128, 4096} and
N = K in {4096, 8192}: the median time over `triton.testing.do_bench` repeats (fresh random
inputs, never zeros; the kernel's output checked against the reference numerics first),
the speedup over `torch.matmul` of fp16 operands of the same shape, and the effective
bandwidth (the fewest bytes the kernel must move: packed weight words, scales, activations
in, output out) against the device-to-device copy bandwidth measured here the same way.
Appends a table with the device name, versions and date to benchmarks/RESULTS.md, and the
goals of issue 5 met or not. Without CUDA it measures nothing and says so (exit code 2):
no figure is ever estimated.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
#: Issue 5's goals on an H100: (family, M) -> least speedup over fp16, and least fraction
#: of the measured copy bandwidth.
GOALS = {("w4a16-g128", 1): (3.7, 0.85), ("w4a16-g128", 16): (3.2, None), ("w8a8-int8", 4096): (1.7, None),
         ("w8a8-fp8", 4096): (1.7, None)}


def copy_bandwidth(do_bench) -> float:
    """Device-to-device copy bandwidth in bytes/s: bytes read plus bytes written over the
    median time of copying 1 GiB."""
    src = torch.randn(256 * 2**20, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=500, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def weight_only(name: str, fmt_text: str, m: int, nk: int):
    """(run, reference, bytes moved) of the dequant GEMM for `fmt_text` weights at M=m, N=K=nk."""
    from mxc.codegen import KernelSpec, load
    from mxc.ir import Layout, parse_format
    from mxc.ir.packing import pack, to_codes
    from mxc.passes.quantize import storage

    fmt = parse_format(fmt_text)
    w = torch.randn(nk, nk, device="cuda")
    q = fmt.quantize(w)
    layout = Layout(bits=fmt.bits, axis=1)
    words = pack(to_codes(storage(q.codes, fmt), fmt), layout).cuda()
    scale = q.scale.float().cuda()
    zero = None if q.zero is None else q.zero.float().cuda()
    x = torch.randn(m, nk, device="cuda", dtype=torch.float16)
    kernel = load(KernelSpec.dequant_gemm(nk, nk, fmt, x_dtype="f16", out_dtype="f16"))
    out = torch.empty(m, nk, device="cuda", dtype=torch.float16)

    def run():
        return kernel.launch(x, words, scale, zero, out=out)

    def reference():
        return torch.nn.functional.linear(x.float(), fmt.dequantize(q).cuda())

    moved = words.numel() * 4 + scale.numel() * 4 + (0 if zero is None else zero.numel() * 4) + x.numel() * 2 + m * nk * 2
    return run, reference, moved


def quantized_gemm(act_text: str, weight_text: str, m: int, nk: int):
    """(run, reference, bytes moved) of the qgemm kernel (int8 or fp8 activations per token x
    weights per channel) at M=m, N=K=nk; activations are quantized before timing, as the
    fused norm + quantize kernel hands them over."""
    from mxc.codegen import load
    from mxc.codegen.templates import qgemm
    from mxc.ir import Layout, parse_format
    from mxc.ir.packing import pack, to_codes
    from mxc.passes.quantize import storage
    from mxc.runtime.storage import to_storage

    act, wf = parse_format(act_text), parse_format(weight_text)
    w = torch.randn(nk, nk, device="cuda")
    qw = wf.quantize(w)
    words = pack(to_codes(storage(qw.codes, wf), wf), Layout(bits=wf.bits, axis=1)).cuda()
    w_scale = qw.scale.float().cuda()
    x = torch.randn(m, nk, device="cuda")
    qx = act.quantize(x)
    codes, x_scale = to_storage(qx.codes, act).cuda(), qx.scale.float().cuda()
    kernel = load(qgemm.spec(nk, nk, act, wf, out_dtype="f16"))
    out = torch.empty(m, nk, device="cuda", dtype=torch.float16)

    def run():
        return kernel.launch(codes, x_scale, words, w_scale, out=out)

    def reference():
        return torch.nn.functional.linear(act.dequantize(qx).cuda(), wf.dequantize(qw).cuda())

    moved = words.numel() * 4 + w_scale.numel() * 4 + codes.numel() + x_scale.numel() * 4 + m * nk * 2
    return run, reference, moved


CASES = {
    "w4a16-g128": lambda m, nk: weight_only("w4a16-g128", "int4<asym,g128>", m, nk),
    "w8a16": lambda m, nk: weight_only("w8a16", "int8<sym,channel>", m, nk),
    "w8a8-int8": lambda m, nk: quantized_gemm("int8<sym,token>", "int8<sym,channel>", m, nk),
    "w8a8-fp8": lambda m, nk: quantized_gemm("fp8e4m3<token>", "fp8e4m3<channel>", m, nk),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 128, 4096])
    ap.add_argument("--nk", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernel_bench.py: no CUDA device here; nothing measured (the kernel benchmark needs a GPU)")
        return 2
    import triton
    from triton.testing import do_bench

    device = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth(do_bench)
    rows, results = [], {}
    for name in args.cases:
        for nk in args.nk:
            for m in args.m:
                run, reference, moved = CASES[name](m, nk)
                got, want = run().float(), reference()
                err = float((got - want).norm() / want.norm())
                if not err < 2e-3:  # f16 output rounding; NaN fails
                    raise SystemExit(f"{name} M={m} N=K={nk}: relative error {err:.2e} against the reference")
                a = torch.randn(m, nk, device="cuda", dtype=torch.float16)
                b = torch.randn(nk, nk, device="cuda", dtype=torch.float16)
                t_fp16 = do_bench(lambda: torch.matmul(a, b.T), warmup=25, rep=200, return_mode="median")
                t = do_bench(run, warmup=25, rep=200, return_mode="median")
                bw = moved / (t * 1e-3)
                results[(name, m, nk)] = (t_fp16 / t, bw / bandwidth)
                rows.append(f"| {name} | {m} | {nk} | {t * 1e3:.1f} | {t_fp16 * 1e3:.1f} | {t_fp16 / t:.2f}x | "
                            f"{bw / 1e9:.0f} | {100 * bw / bandwidth:.0f}% | {err:.1e} |")
    lines = [
        f"## Kernels: mxc GEMMs against torch fp16 matmul ({datetime.date.today()})", "",
        f"{device}, torch {torch.__version__}, triton {triton.__version__}, {platform.machine()}. Command: "
        f"`python benchmarks/kernel_bench.py`. Median of `triton.testing.do_bench`; bandwidth: fewest bytes moved over time, "
        f"against a measured device-to-device copy of {bandwidth / 1e9:.0f} GB/s.", "",
        "| kernel | M | N=K | time us | fp16 us | speedup | GB/s | of copy | rel err |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows, "", "Goals (issue 5, H100):", "",
    ]
    for (name, m), (speed, frac) in GOALS.items():
        got = [v for (n_, m_, _), v in results.items() if (n_, m_) == (name, m)]
        if not got:
            continue
        worst_speed, worst_frac = min(s for s, _ in got), min(f for _, f in got)
        ok = worst_speed >= speed and (frac is None or worst_frac >= frac)
        want = f">= {speed}x" + (f" and >= {frac:.0%} of copy bandwidth" if frac else "")
        lines.append(f"- {name} at M={m}: {want}: worst {worst_speed:.2f}x, {worst_frac:.0%} — {'met' if ok else 'NOT met'}")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        with RESULTS.open("a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
