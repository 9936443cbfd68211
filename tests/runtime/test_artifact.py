"""Artifacts: `mxc.save` / `mxc.load` of the tiny Llama, float and quantized, give exactly the
same outputs and report; the directory holds what the manifest lists, hashed, and no pickle;
`load` refuses a flipped byte, a truncated, deleted or unlisted file, another mxc version
or format version, and GPU binaries built with another torch; writes are atomic."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

import mxc
from mxc.compiled import CompiledModel
from mxc.runtime import ArtifactError, ReferenceExecutor, check_artifact
from mxc.runtime.artifact import _sha256
from mxc.signature import Outputs

PLANS = [None, "w4a16-g128", "w8a8", "w3a16-g128", "nvfp4"]


def compile_tiny(model, plan):
    """`mxc.compile` of `model` with `plan`; a plan without calibration data warns (checked)."""
    ids = torch.randint(0, 131, (2, 11))
    if plan is None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = mxc.compile(model, example_inputs=ids)
        assert not [w for w in caught if "calibration" in str(w.message)]  # nothing to calibrate
        return compiled
    with pytest.warns(UserWarning, match="no calibration data"):
        return mxc.compile(model, plan, example_inputs=ids)


@pytest.fixture(scope="module")
def compiled(tiny_llama):
    """The tiny Llama compiled with each plan, compiled once per module."""
    return {plan: compile_tiny(tiny_llama, plan) for plan in PLANS}


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory):
    """The w4a16-g128 model saved once; tests that damage it work on a copy (`fresh`)."""
    return mxc.save(compiled["w4a16-g128"], tmp_path_factory.mktemp("art") / "w4")


@pytest.fixture
def fresh(saved, tmp_path):
    """A copy of the saved artifact to tamper with."""
    return Path(shutil.copytree(saved, tmp_path / "copy"))


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def rewrite_manifest(path: Path, edit) -> None:
    m = manifest(path)
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


def rehash(path: Path, rel: str) -> None:
    """Record `rel`'s current size and sha256 in the manifest (a consistent edit, not damage)."""
    def edit(m):
        m["files"][rel] = {"sha256": _sha256(path / rel), "bytes": (path / rel).stat().st_size}
    rewrite_manifest(path, edit)


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("plan", PLANS)
def test_round_trip_gives_the_same_outputs_and_report(compiled, plan, tmp_path):
    model = compiled[plan]
    loaded = mxc.load(mxc.save(model, tmp_path / "a"))
    assert isinstance(loaded, CompiledModel) and loaded.backend == "reference"
    for shape in [(1, 1), (3, 17)]:
        ids = torch.randint(0, 131, shape)
        want, got = model(ids), loaded(ids)
        assert type(got) is type(want)  # transformers' CausalLMOutputWithPast, rebuilt by name
        assert torch.equal(got.logits, want.logits)
    assert loaded.ir == model.ir
    assert loaded.report() == model.report() and str(loaded.report()) == str(model.report())
    assert loaded.plan == model.plan
    spec, want_spec = loaded.call_spec, model.call_spec
    assert (spec.params, spec.inputs, spec.constants, spec.out_spec) == (
        want_spec.params, want_spec.inputs, want_spec.constants, want_spec.out_spec
    )


def test_the_directory_holds_what_the_manifest_lists(compiled, saved, tmp_path):
    m = manifest(saved)
    assert m["format"] == "mxc-artifact" and m["format_version"] == 1 and m["graph"] == "LlamaForCausalLM"
    assert m["versions"] == {"mxc": mxc.__version__, "torch": str(torch.__version__),
                             "triton": m["versions"]["triton"]}
    assert m["target"] == {"backend": "reference", "device": "cpu", "gpu_arch": None}
    on_disk = sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file())
    assert on_disk == sorted([*m["files"], "manifest.json"])
    assert set(m["files"]) == {"graph.mxir", "plan.json", "call_spec.json", "meta.json", "weights.safetensors"}
    for rel, entry in m["files"].items():
        assert entry == {"sha256": _sha256(saved / rel), "bytes": (saved / rel).stat().st_size}
    assert (saved / "graph.mxir").read_text() == compiled["w4a16-g128"].ir
    assert mxc.Plan.from_json((saved / "plan.json").read_text()) == compiled["w4a16-g128"].plan
    from safetensors.torch import load_file

    weights = load_file(str(saved / "weights.safetensors"))
    used = compiled["w4a16-g128"].graph.used_weights()
    assert weights.keys() == used.keys() and all(torch.equal(weights[k], used[k]) for k in used)
    assert "plan.json" not in manifest(mxc.save(compiled[None], tmp_path / "float"))["files"]


def test_meta_keeps_report_records_and_skips_runtime_only_keys(compiled, tmp_path):
    model = compiled["w8a8"]
    graph = model.graph.with_meta(calibration=object())  # runtime-only: statistics bound to an executor
    with_cal = CompiledModel(graph, model.call_spec, model.executor, model.backend, model.timings, model.plan)
    meta = json.loads((mxc.save(with_cal, tmp_path / "a") / "meta.json").read_text())
    assert "calibration" not in meta["graph_meta"]
    assert set(meta["graph_meta"]) == set(model.graph.meta) and "quantized" in model.graph.meta
    assert meta["timings"] == model.timings
    odd = graph.with_meta(probe=torch.ones(2))  # unknown and not JSON: named, never dropped silently
    bad = CompiledModel(odd, model.call_spec, model.executor, model.backend, model.timings, model.plan)
    with pytest.raises(ArtifactError, match=r"meta.json: graph.meta\['probe'\] is a Tensor"):
        mxc.save(bad, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_no_pickle_anywhere(saved, monkeypatch):
    for f in saved.rglob("*"):
        if f.is_file():
            head = f.read_bytes()[:4]
            assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), f
            assert head != b"PK\x03\x04", f"{f} is a zip (torch.save format)"

    def refuse(*args, **kwargs):
        raise AssertionError("an artifact is never unpickled")

    for mod, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(mod, name, refuse)
    ids = torch.randint(0, 131, (2, 5))
    assert mxc.load(saved)(ids).logits.shape == (2, 5, 131)


# --------------------------------------------------------------------------- refused artifacts
def test_a_flipped_byte_is_a_sha256_mismatch(fresh):
    f = fresh / "weights.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights\.safetensors: sha256 mismatch"):
        mxc.load(fresh)


def test_a_truncated_file_is_refused(fresh):
    f = fresh / "graph.mxir"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"graph\.mxir: size mismatch \(truncated or altered\)"):
        mxc.load(fresh)


def test_a_deleted_file_is_refused(fresh):
    (fresh / "call_spec.json").unlink()
    with pytest.raises(ArtifactError, match=r"call_spec\.json: missing: manifest\.json lists it"):
        mxc.load(fresh)


def test_an_unlisted_file_is_refused(fresh, saved):
    shutil.copy(saved / "weights.safetensors", fresh / "extra.safetensors")
    with pytest.raises(ArtifactError, match=r"extra\.safetensors: unlisted file"):
        mxc.load(fresh)
    (fresh / "extra.safetensors").unlink()
    (fresh / "kernels").mkdir()
    (fresh / "kernels" / "notes.txt").write_text("added later")
    with pytest.raises(ArtifactError, match=r"kernels/notes\.txt: unlisted file"):
        mxc.load(fresh)


def test_another_mxc_version_is_refused_naming_both(fresh):
    rewrite_manifest(fresh, lambda m: m["versions"].update(mxc="0.9.0"))
    with pytest.raises(ArtifactError, match=rf"written by mxc 0\.9\.0, but this is mxc {mxc.__version__}"):
        mxc.load(fresh)
    rewrite_manifest(fresh, lambda m: m["versions"].update(mxc=mxc.__version__.rsplit(".", 1)[0] + ".99"))
    mxc.load(fresh)  # another patch release of the same major.minor loads


def test_an_unsupported_format_version_is_refused(fresh):
    rewrite_manifest(fresh, lambda m: m.update(format_version=2))
    with pytest.raises(ArtifactError, match="artifact format version 2 is not supported"):
        mxc.load(fresh)


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "manifest.json").unlink(), "not an mxc artifact: manifest.json is missing"),
    (lambda p: (p / "manifest.json").write_text("{not json"), r"manifest\.json: not valid JSON"),
    (lambda p: rewrite_manifest(p, lambda m: m["files"].update({"../evil": m["files"]["meta.json"]})),
     "not a plain relative path"),
    (lambda p: rewrite_manifest(p, lambda m: m["files"].pop("weights.safetensors")),
     "does not list the required file"),
])
def test_a_broken_manifest_is_refused(fresh, damage, message):
    damage(fresh)
    with pytest.raises(ArtifactError, match=message):
        mxc.load(fresh)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no such directory"):
        mxc.load(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="not a directory"):
        mxc.load(tmp_path / "file")


def test_weights_that_do_not_fit_the_graph_are_refused(fresh):
    """A consistent manifest over a graph whose const was renamed: the weight is missing."""
    text = (fresh / "graph.mxir").read_text()
    (fresh / "graph.mxir").write_text(text.replace('name="lm_head.weight"', 'name="lm_head.w"'))
    rehash(fresh, "graph.mxir")
    with pytest.raises(ArtifactError, match=r"weights\.safetensors: does not match graph\.mxir: missing \['lm_head\.w'\]"):
        mxc.load(fresh)


# --------------------------------------------------------------------------- outputs, backends
def test_an_output_class_that_cannot_be_imported_becomes_outputs(fresh):
    ids = torch.randint(0, 131, (1, 4))
    want = mxc.load(fresh)(ids).logits
    for cls in ["transformers.no_such_module:CausalLMOutputWithPast", "evil_module_never_imported:Out"]:
        spec = json.loads((fresh / "call_spec.json").read_text())
        spec["outputs"]["class"] = cls
        (fresh / "call_spec.json").write_text(json.dumps(spec))
        rehash(fresh, "call_spec.json")
        out = mxc.load(fresh)(ids)
        assert type(out) is Outputs and torch.equal(out.logits, want) and torch.equal(out["logits"], out[0])
    assert "evil_module_never_imported" not in sys.modules


def test_backend_choice(fresh):
    with pytest.raises(ArtifactError, match="unknown backend 'nope'; expected one of reference"):
        mxc.load(fresh, backend="nope")
    rewrite_manifest(fresh, lambda m: m["target"].update(backend="triton"))
    with pytest.warns(UserWarning, match="saved for backend 'triton', which is not available here"):
        assert mxc.load(fresh).backend == "reference"


class KernelExecutor(ReferenceExecutor):
    """A reference executor that also reports generated kernel sources and binaries, as the
    Triton backend will."""

    def kernel_sources(self) -> dict[str, str]:
        return {"dequant_gemm_w4_g128.py": "# spec: dequant_gemm int4<asym,g128>\n"}

    def kernel_binaries(self) -> dict[str, bytes]:
        return {"dequant_gemm_w4_g128.cubin": bytes(range(256))}


def test_kernel_files_and_binaries_pin_the_torch_version(compiled, tmp_path):
    model = compiled["w4a16-g128"]
    with_kernels = CompiledModel(model.graph, model.call_spec, KernelExecutor(model.graph), "reference",
                                 model.timings, model.plan)
    path = mxc.save(with_kernels, tmp_path / "k")
    info = check_artifact(path)
    assert info.kernel_files == ["kernels/bin/dequant_gemm_w4_g128.cubin", "kernels/dequant_gemm_w4_g128.py"]
    assert (path / "kernels" / "bin" / "dequant_gemm_w4_g128.cubin").read_bytes() == bytes(range(256))
    rewrite_manifest(path, lambda m: m["versions"].update(torch="1.0.0"))
    with pytest.raises(ArtifactError, match=rf"written with torch 1\.0\.0, this is torch {re.escape(str(torch.__version__))}.*compiled GPU"):
        mxc.load(path)
    shutil.rmtree(path / "kernels" / "bin")
    rewrite_manifest(path, lambda m: [m["files"].pop(f) for f in list(m["files"]) if f.startswith("kernels/bin/")])
    with pytest.warns(UserWarning, match=r"written with torch 1\.0\.0.*harmless"):
        mxc.load(path)


# --------------------------------------------------------------------------- atomic writes
def test_overwrite_only_an_artifact_and_only_when_asked(compiled, tmp_path):
    model = compiled[None]
    path = mxc.save(model, tmp_path / "a")
    before = manifest(path)
    with pytest.raises(ArtifactError, match="already holds an artifact; pass overwrite=True"):
        mxc.save(compiled["w8a8"], path)
    assert manifest(path) == before
    mxc.save(compiled["w8a8"], path, overwrite=True)
    assert "plan.json" in manifest(path)["files"] and mxc.load(path).plan == compiled["w8a8"].plan
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="is not an mxc artifact .* refusing to overwrite it"):
        mxc.save(model, other, overwrite=True)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    mxc.load(mxc.save(model, tmp_path / "empty"))  # an empty directory is filled
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty", "mine"]  # no temporary left


def test_a_failed_save_leaves_nothing(compiled, tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        mxc.save(compiled[None], tmp_path / "a", tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []
