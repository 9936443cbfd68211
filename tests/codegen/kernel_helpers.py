"""Helpers shared by the tests of the kernel templates (dequant_gemm, qgemm, norm_quant,
rope_kv): a fresh kernel cache per test, the kernel-backend storage of reference codes, and
compiling generated kernels for sm_90 in a subprocess (no GPU needed).

    from kernel_helpers import kernel_cache, storage  # noqa: F401 (kernel_cache: autouse fixture)
    lines = compile_for_sm90(tmp_path, SM90_PRELUDE + body, specs)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mxc.ir import IntFormat
from mxc.ir.quant import encode_bits


@pytest.fixture(autouse=True)
def kernel_cache(tmp_path, monkeypatch):
    """Every test compiles into its own empty kernel cache."""
    monkeypatch.setenv("MXC_CACHE_DIR", str(tmp_path / "kernels"))


def storage(fmt, codes: torch.Tensor) -> torch.Tensor:
    """Reference codes (grid values as float32) in the kernel-backend storage convention."""
    if isinstance(fmt, IntFormat):
        return codes.to(torch.int8 if fmt.symmetric else torch.uint8)
    return encode_bits(codes, fmt.spec).to(torch.uint8)


#: The start of an sm_90 compile script: `build(fn, args, consts, cfg)` compiles a GEMM
#: kernel (args: name -> tensor dtype (a pointer), "i32", or None (an absent pointer:
#: constexpr None)) and returns the cubin's size; `build_reduce(mod, ptrs, cfg)` compiles the
#: module's `splitk_reduce_kernel` with the GEMM's epilogue pointers; `build_row(fn, ptrs,
#: tiles)` compiles a row kernel (pointers absent when None, every other argument i32) with
#: mul-add contraction off and returns it.
SM90_PRELUDE = textwrap.dedent(
    """
    import json, sys
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mxc.codegen import KernelSpec, load

    PTR = {torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32", torch.int8: "*i8", torch.uint8: "*u8",
           torch.int64: "*i64"}
    TARGET = GPUTarget("cuda", 90, 32)

    def build(fn, args, consts, cfg):
        sig, constexprs = {}, dict(consts)
        for name in fn.arg_names:
            if name in consts or args.get(name, 0) is None:
                constexprs.setdefault(name, None)
                sig[name] = "constexpr"
            else:
                sig[name] = PTR[args[name]] if isinstance(args[name], torch.dtype) else args[name]
        opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        kernel = triton.compile(ASTSource(fn, sig, constexprs), target=TARGET, options=opts)
        return len(kernel.asm["cubin"])

    def build_reduce(mod, ptrs, cfg):
        red = {k: ptrs[k] for k in ("bias_ptr", "res_ptr", "mul_ptr", "out_ptr")}
        red["part_ptr"] = torch.float32
        fn = mod.splitk_reduce_kernel
        ints = {name: "i32" for name in fn.arg_names if name == "M" or name.startswith("stride")}
        consts = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "SPLIT_K")}
        return build(fn, {**red, **ints}, consts, cfg)

    def build_row(fn, ptrs, tiles):
        sig = {n: (PTR[ptrs[n]] if ptrs.get(n) is not None else "constexpr") if n.endswith("_ptr") else "i32"
               for n in fn.arg_names}
        consts = {n: None for n, t in sig.items() if t == "constexpr"}
        opts = {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages, "enable_fp_fusion": False}
        return triton.compile(ASTSource(fn, sig, consts), target=TARGET, options=opts)
    """
)


def compile_for_sm90(tmp_path, script: str, specs) -> list[str]:
    """Run `script` (SM90_PRELUDE + a loop over `json.loads(sys.argv[1])`, the specs' JSON)
    without the Triton interpreter, in its own kernel and Triton caches under `tmp_path`;
    assert it succeeds and return the lines it printed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MXC_CACHE_DIR"] = str(tmp_path / "sm90")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps([s.to_json() for s in specs])],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().split("\n")
