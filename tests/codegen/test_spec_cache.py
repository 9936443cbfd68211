"""Kernel specs (equality, hashing, canonical JSON and its key, validation), tile choice, the
emitter's text, and the kernel cache (atomic writes, hit checks, two processes at once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

from mxc.codegen import KernelSpec, Tiles, cache_dir, choose_tiles, emit, kernel_path, load, versions
from mxc.codegen import cache as cache_mod
from mxc.ir import IntFormat, Layout, Scaling, parse_format

FORMATS = ["int4<sym,g128>", "int3<asym,g32>", "int8<sym,channel>", "fp8e5m2<g64>", "mxfp4", "mxfp6", "nvfp4",
           "int4<sym,tensor>"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty kernel cache directory (MXC_CACHE_DIR), forgotten by this process after."""
    d = tmp_path / "kernels"
    monkeypatch.setenv("MXC_CACHE_DIR", str(d))
    yield d
    cache_mod.forget()


def spec(**over) -> KernelSpec:
    args = dict(n=96, k=200, weight="int4<sym,g32>", x_dtype="f16", epilogue=("bias", "silu"))
    args.update(over)
    return KernelSpec.dequant_gemm(**args)


# ---------------------------------------------------------------- specs


class TestSpec:
    @pytest.mark.parametrize("fmt", FORMATS)
    def test_json_round_trip(self, fmt):
        s = spec(weight=fmt, epilogue=("bias", "gelu", "residual"), x_dtype="f32", out_dtype="f16")
        back = KernelSpec.from_json(s.to_json())
        assert back == s and hash(back) == hash(s) and back.key() == s.key()
        assert back.fmt("weight") == parse_format(fmt)
        assert back.layout("weight") == Layout(bits=parse_format(fmt).bits, axis=1)
        assert back.to_json() == s.to_json()

    def test_canonical_json_and_key(self):
        s = spec()
        d = json.loads(s.to_json())
        assert d["formats"] == {"weight": "int4<sym,g32>"}
        assert d["layouts"] == {"weight": "packed<bits=4,word=i32,axis=1>"}
        assert d["dims"] == {"k": 200, "n": 96} and d["dtypes"] == {"out": "f16", "x": "f16"}
        assert s.to_json() == json.dumps(d, sort_keys=True, separators=(",", ":"))
        import hashlib

        assert s.key() == hashlib.sha256(s.to_json().encode()).hexdigest()

    def test_order_of_roles_does_not_matter(self):
        fmt = IntFormat(4, True, Scaling("group", 32))
        tiles = spec().tiles
        a = KernelSpec("dequant_gemm", {"n": 96, "k": 200}, {"weight": fmt}, {"weight": "packed<bits=4,word=i32,axis=1>"},
                       {"x": "f16", "out": "f16"}, ("bias", "silu"), tiles)
        b = KernelSpec("dequant_gemm", [("k", 200), ("n", 96)], [("weight", "int4<sym,g32>")],
                       [("weight", Layout(bits=4, axis=1))], [("out", "f16"), ("x", "f16")], ["bias", "silu"],
                       [t.to_dict() for t in tiles])
        assert a == b and hash(a) == hash(b) and a.key() == b.key() == spec().key()
        assert {a: 1}[b] == 1

    @pytest.mark.parametrize(
        "change",
        [
            dict(n=97), dict(k=201), dict(weight="int4<sym,g64>"), dict(weight="int4<asym,g32>"), dict(x_dtype="f32"),
            dict(out_dtype="f32"), dict(epilogue=("silu", "bias")), dict(epilogue=("bias",)),
            dict(tiles=(Tiles(max_m=None, block_m=16, block_n=16, block_k=16),)),
        ],
        ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())[:40],
    )
    def test_every_field_changes_the_key(self, change):
        assert spec(**change).key() != spec().key()
        assert spec(**change) != spec()

    def test_lookups(self):
        s = spec()
        assert s.dim("n") == 96 and s.dim("k") == 200 and s.dtype("x") == "f16"
        assert s.fmt("weight") == parse_format("int4<sym,g32>")
        with pytest.raises(KeyError, match=r"has no dim 'm'; it has \['k', 'n'\]"):
            s.dim("m")
        assert s.tiles_for(1).max_m == 16 and s.tiles_for(16).max_m == 16 and s.tiles_for(17).max_m is None
        assert str(s) == "dequant_gemm[k=200,n=96 weight=int4<sym,g32> +bias+silu]"

    @pytest.mark.parametrize(
        "bad, message",
        [
            (dict(family="gemm"), "unknown kernel family 'gemm'"),
            (dict(dims={"n": 0, "k": 8}), "positive integer, got 0"),
            (dict(formats={"weight": "int9<sym,g32>"}), "integer format bits must be in 1..8"),
            (dict(dtypes={"x": "f17", "out": "f16"}), "unknown dtype 'f17'"),
            (dict(epilogue=("bias", "relu")), "unknown epilogue step 'relu'"),
            (dict(epilogue=("bias", "bias")), "must not repeat"),
            (dict(epilogue=("silu", "gelu")), "at most one activation"),
            (dict(tiles=()), "at least one tile configuration"),
            (dict(tiles=(Tiles(None, 16, 16, 16), Tiles(None, 16, 16, 16))), "max_m must ascend"),
            (dict(tiles=(Tiles(32, 16, 16, 16), Tiles(16, 16, 16, 16), Tiles(None, 16, 16, 16))), "max_m must ascend"),
        ],
    )
    def test_invalid(self, bad, message):
        base = dict(family="dequant_gemm", dims={"n": 8, "k": 8}, formats={"weight": "int4<sym,g32>"},
                    layouts={"weight": "packed<bits=4,word=i32,axis=1>"}, dtypes={"x": "f16", "out": "f16"},
                    epilogue=(), tiles=(Tiles(None, 16, 16, 16),))
        base.update(bad)
        with pytest.raises(ValueError, match=message):
            KernelSpec(**base)

    @pytest.mark.parametrize(
        "kw, message",
        [
            (dict(block_k=8), r"block_k must be a power of two >= 16"),
            (dict(block_n=48), r"block_n must be a power of two >= 16"),
            (dict(split_k=0), "split_k must be a positive integer"),
            (dict(num_warps=3), "num_warps must be a power of two"),
            (dict(max_m=0), "max_m must be a positive integer or None"),
        ],
    )
    def test_invalid_tiles(self, kw, message):
        args = dict(max_m=None, block_m=16, block_n=16, block_k=16)
        args.update(kw)
        with pytest.raises(ValueError, match=message):
            Tiles(**args)

    @pytest.mark.parametrize(
        "text, message",
        [
            ("{", "malformed JSON"),
            ("[1]", "expected a JSON object"),
            ('{"schema": 99}', "schema 99 is not the supported 1"),
            ('{"schema": 1, "family": "dequant_gemm"}', "missing fields"),
            ('{"schema": 1, "family": "dequant_gemm", "dims": {}, "formats": {}, "layouts": {}, "dtypes": {}, '
             '"epilogue": [], "tiles": [{"block": 16}]}', "malformed tiles"),
        ],
    )
    def test_from_json_errors(self, text, message):
        with pytest.raises(ValueError, match=message):
            KernelSpec.from_json(text)


class TestChooseTiles:
    @pytest.mark.parametrize("fmt", ["int4<sym,g32>", "int4<sym,g64>", "int4<sym,g128>", "mxfp4", "nvfp4", "int6<asym,g48>"])
    @pytest.mark.parametrize("m_class", ["small", "large"])
    def test_k_tile_inside_one_group(self, fmt, m_class):
        f = parse_format(fmt)
        t = choose_tiles("dequant_gemm", {"n": 4096, "k": 4096}, {"weight": f}, m_class)
        assert f.scaling.size % t.block_k == 0 and t.block_k >= 16

    @pytest.mark.parametrize("k", [1, 16, 72, 100, 200, 1000, 4096, 11008])
    @pytest.mark.parametrize("n", [33, 4096])
    def test_small_m_splits_k_without_empty_splits(self, k, n):
        t = choose_tiles("dequant_gemm", {"n": n, "k": k}, {"weight": parse_format("int4<sym,channel>")}, "small")
        k_tiles = -(-k // t.block_k)
        per_split = -(-k_tiles // t.split_k)
        assert t.max_m == 16 and t.block_m == 16 and 1 <= t.split_k <= min(16, k_tiles)
        assert (t.split_k - 1) * per_split < k_tiles  # the last split has a tile
        large = choose_tiles("dequant_gemm", {"n": n, "k": k}, {"weight": parse_format("int4<sym,channel>")}, "large")
        assert large.max_m is None and large.split_k == 1

    def test_gemv_fills_the_gpu(self):
        t = choose_tiles("dequant_gemm", {"n": 4096, "k": 4096}, {"weight": parse_format("int4<sym,g128>")}, "small")
        assert t.split_k > 1 and (4096 // t.block_n) * t.split_k >= 128

    def test_errors(self):
        with pytest.raises(ValueError, match="unknown M class 'tiny'"):
            choose_tiles("dequant_gemm", {"n": 8, "k": 8}, {"weight": parse_format("int4<sym,g32>")}, "tiny")
        with pytest.raises(ValueError, match="no tile rule for kernel family 'attention'"):
            choose_tiles("attention", {"n": 8, "k": 8}, {"weight": parse_format("int4<sym,g32>")}, "small")


# ---------------------------------------------------------------- emitter


class TestEmit:
    def test_header_and_determinism(self):
        s = spec()
        text = emit(s)
        v = versions()
        lines = text.splitlines()
        assert lines[2] == f"# spec: {s.to_json()}"
        assert lines[3] == f"# spec key: {s.key()}"
        assert lines[4] == f"# mxc {v['mxc']}, triton {v['triton']}"
        assert KernelSpec.from_json(lines[2].removeprefix("# spec: ")) == s
        assert emit(KernelSpec.from_json(s.to_json())) == text
        compile(text, "<generated>", "exec")

    def test_source_is_specialised_not_copied(self):
        """Widths that straddle words read the next word, aligned widths do not; only
        asymmetric formats subtract a zero point; only float formats decode bit fields; the
        epilogue holds just its steps. Two widths differ only in constants and names."""
        int3, int4 = emit(spec(weight="int3<sym,g32>")), emit(spec(weight="int4<sym,g32>"))
        assert "spill" in int3 and "spill" not in int4
        assert "- zero" in emit(spec(weight="int4<asym,g32>")) and "- zero" not in int4
        fp = emit(spec(weight="fp6e3m2<g32>"))
        assert "EXP_BIAS = tl.constexpr(3)" in fp and "EXP_BIAS" not in int4
        assert "float(\"inf\")" in emit(spec(weight="fp8e5m2<g32>")) and "float(\"inf\")" not in fp
        assert "tl.erf" not in int4 and "tl.erf" in emit(spec(epilogue=("gelu",)))
        int5 = emit(spec(weight="int5<sym,g32>"))
        diff = [(a, b) for a, b in zip(emit(spec(weight="int3<sym,g32>")).splitlines(), int5.splitlines()) if a != b]
        assert all(("int3" in a or "tl.constexpr" in a or "# spec" in a or "packed<" in a or "words" in a) for a, _ in diff), diff

    def test_f32_x_uses_ieee_dot(self):
        assert 'tl.dot(x, w, input_precision="ieee")' in emit(spec(x_dtype="f32"))
        assert "tl.dot(x, w.to(tl.float16))" in emit(spec(x_dtype="f16"))

    @pytest.mark.parametrize(
        "build, message",
        [
            (lambda: spec(weight="int4<sym,token>"), "scales per token"),
            (lambda: spec(layout="packed<bits=3,word=i32,axis=1>"), "packs 3-bit codes but int4<sym,g32> has 4 bits"),
            (lambda: spec(layout="packed<bits=4,word=i32,axis=1,order=[0,2,4,6,1,3,5,7]>"), "natural order"),
            (lambda: spec(layout="packed<bits=4,word=i32,axis=0>"), "natural order"),
            (lambda: spec(x_dtype="bf16"), "x must be one of f16, f32, got bf16"),
            (lambda: spec(out_dtype="i8"), "out must be one of f16, f32, got i8"),
            (lambda: replace(spec(), family="qgemm"), r"a qgemm spec has formats \['act', 'weight'\], got \['weight'\]"),
            (lambda: replace(spec(), dims=(("k", 8), ("m", 8), ("n", 8))), r"has dims \['k', 'n'\]"),
        ],
    )
    def test_unsupported_specs(self, build, message):
        with pytest.raises(ValueError, match=message):
            emit(build())


def test_a_family_without_a_template_is_named(monkeypatch):
    from mxc.codegen import templates

    monkeypatch.delitem(templates.TEMPLATES, "qgemm")
    with pytest.raises(ValueError, match=r"no Triton template for kernel family 'qgemm' yet; templates exist for dequant_gemm"):
        emit(replace(spec(), family="qgemm"))


# ---------------------------------------------------------------- cache


def run_int4(module, seed: int = 0) -> torch.Tensor:
    """Run a 96x200 int4<sym,g32> + silu module once: (y, reference) (proves the imported kernel works)."""
    from mxc.ir.packing import pack, to_codes

    fmt = parse_format("int4<sym,g32>")
    g = torch.Generator().manual_seed(seed)
    q = fmt.quantize(torch.randn(96, 200, generator=g))
    x = torch.randn(3, 200, generator=g).half()
    y = module.launch(x, pack(to_codes(q.codes, fmt), Layout(bits=4, axis=1)), q.scale)
    ref = torch.nn.functional.silu(torch.nn.functional.linear(x.float(), fmt.dequantize(q)))
    return y, ref


class TestCache:
    def test_directory_from_env_and_default(self, cache, monkeypatch):
        assert cache_dir() == cache
        assert kernel_path(spec()).parent == cache
        monkeypatch.delenv("MXC_CACHE_DIR")
        assert cache_dir() == __import__("pathlib").Path.home() / ".cache" / "mxc" / "kernels"

    def test_miss_writes_one_file_and_imports_it(self, cache):
        s = spec(epilogue=("silu",))
        mod = load(s)
        files = sorted(p.name for p in cache.iterdir())
        assert files == [kernel_path(s).name] and kernel_path(s).name.startswith("dequant_gemm_")
        assert kernel_path(s).read_text() == emit(s)
        assert mod.__file__ == str(kernel_path(s))
        y, ref = run_int4(mod)
        assert ((y.float() - ref).abs() <= 2e-3 * ref.abs() + 1e-3).all()

    def test_hit_returns_the_module_and_leaves_the_file(self, cache):
        s = spec()
        mod = load(s)
        path = kernel_path(s)
        before = path.stat().st_mtime_ns
        assert load(s) is mod
        assert path.stat().st_mtime_ns == before

    def test_interpreted_and_compiled_imports_are_separate(self, cache, monkeypatch):
        """Triton fixes interpreted vs compiled when the module is imported: one file, two modules."""
        s = spec()
        interpreted = load(s)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        compiled = load(s)
        assert compiled is not interpreted and load(s) is compiled
        assert type(interpreted.dequant_gemm_kernel).__name__ == "InterpretedFunction"
        assert type(compiled.dequant_gemm_kernel).__name__ == "JITFunction"
        assert [p.name for p in cache.iterdir()] == [kernel_path(s).name]

    def test_key_covers_versions(self, cache, monkeypatch):
        s = spec()
        p1 = kernel_path(s)
        monkeypatch.setattr(cache_mod, "versions", lambda: {"mxc": "0.1.0", "triton": "0.0.1"})
        assert kernel_path(s) != p1
        assert kernel_path(spec(n=97)) != kernel_path(s)

    def test_tampered_file_is_rewritten_with_a_warning(self, cache):
        s = spec(epilogue=("silu",))
        load(s)
        path = kernel_path(s)
        path.write_text(emit(s).replace("acc = acc * tl.where", "acc = -acc * tl.where"))
        cache_mod.forget()
        with pytest.warns(RuntimeWarning, match="differs from the source mxc emits"):
            mod = load(s)
        assert path.read_text() == emit(s)
        y, ref = run_int4(mod, seed=1)
        assert ((y.float() - ref).abs() <= 2e-3 * ref.abs() + 1e-3).all()

    def test_failed_write_leaves_nothing(self, cache, monkeypatch):
        def boom(src, dst):
            raise OSError("disk full")

        monkeypatch.setattr(cache_mod.os, "replace", boom)
        with pytest.raises(OSError, match="disk full"):
            load(spec())
        assert list(cache.iterdir()) == []

    def test_two_processes_at_once(self, cache, tmp_path):
        """Two interpreters compile the same spec into the same empty cache at the same
        moment (both wait on a start file): both succeed, run the kernel, and the cache holds
        exactly one file, equal to the emitted source, and no temporary files."""
        s = spec(epilogue=("silu",))
        script = textwrap.dedent(
            """
            import os, sys, time
            from pathlib import Path
            import torch
            from mxc.codegen import KernelSpec, load, kernel_path
            spec = KernelSpec.from_json(sys.argv[1])
            Path(sys.argv[2]).touch()                 # ready
            while not Path(sys.argv[3]).exists():     # wait for the start signal
                time.sleep(0.002)
            mod = load(spec)
            from mxc.ir import parse_format, Layout
            from mxc.ir.packing import pack, to_codes
            fmt = parse_format("int4<sym,g32>")
            q = fmt.quantize(torch.randn(96, 200))
            x = torch.randn(2, 200).half()
            y = mod.launch(x, pack(to_codes(q.codes, fmt), Layout(bits=4, axis=1)), q.scale)
            ref = torch.nn.functional.silu(torch.nn.functional.linear(x.float(), fmt.dequantize(q)))
            assert ((y.float() - ref).abs() <= 2e-3 * ref.abs() + 1e-3).all()
            print(kernel_path(spec))
            """
        )
        env = dict(os.environ, MXC_CACHE_DIR=str(cache), TRITON_INTERPRET="1")
        go = tmp_path / "go"
        procs = []
        for i in range(2):
            ready = tmp_path / f"ready{i}"
            procs.append((ready, subprocess.Popen(
                [sys.executable, "-c", script, s.to_json(), str(ready), str(go)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )))
        import time

        deadline = time.monotonic() + 120
        while not all(r.exists() for r, _ in procs):
            assert time.monotonic() < deadline and all(p.poll() is None for _, p in procs), [
                p.communicate() for _, p in procs if p.poll() is not None
            ]
            time.sleep(0.01)
        go.touch()
        outs = [p.communicate(timeout=120) for _, p in procs]
        for (_, p), (out, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
        assert {out.strip() for out, _ in outs} == {str(kernel_path(s))}
        assert [p.name for p in cache.iterdir()] == [kernel_path(s).name]
        assert kernel_path(s).read_text() == emit(s)
