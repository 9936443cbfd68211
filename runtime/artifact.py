"""Ahead-of-time artifacts: `save(compiled, path)` writes a directory that `load(path)` turns
back into a `CompiledModel`, with neither the model's Python class nor calibration data, and
without unpickling anything.

    mxc.save(compiled, "smollm2-w4/", tokenizer=tok)
    model = mxc.load("smollm2-w4/")             # the saved backend, else "reference"
    model(ids).logits                            # equal (torch.equal) to compiled(ids).logits

The directory:

    manifest.json        format and format version; mxc, torch and triton versions; target
                         (backend, device kind, GPU arch); graph name; created (UTC); the
                         sha256 and byte size of every other file
    graph.mxir           the final IR text, read back with `mxc.ir.parse`
    plan.json            the resolved plan (`Plan.to_json`); absent for a float compile
    call_spec.json       how a call binds to the graph's inputs and how the outputs are rebuilt
                         (`CallSpec.to_dict`)
    meta.json            `graph.meta`'s records for the report (tuples tagged `{"__tuple__": [...]}`)
                         and the compile's pass timings
    weights.safetensors  every weight the graph uses, by name (packed int32 words, scales, floats)
    kernels/             generated kernel sources, from an executor's `kernel_sources()`;
    kernels/bin/         compiled kernel binaries for the target GPU, from `kernel_binaries()`
    tokenizer/           the tokenizer's files (`save(..., tokenizer=tok)`), for `mxc run`

`load` refuses, with an `ArtifactError` naming the file and the failed check: a missing or
malformed manifest, an unsupported format version, another mxc major.minor, a listed file that
is missing, has another size (truncated) or another sha256 (tampered), and any file the
manifest does not list (the manifest is the artifact's complete inventory: `save` writes the
directory at once, so an unlisted file was added later). Other torch or triton versions are
refused only when the artifact holds compiled GPU binaries; otherwise `load` warns.

This is the one runtime module that knows the compiler's objects (`CompiledModel`, `CallSpec`,
`Plan`); it imports them when called, so `mxc.runtime` still imports only `ir`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..ir import DType, Graph, ParseError, TensorType, VerificationError, parse, verify
from ..ir.packing import packed_shape

FORMAT = "mxc-artifact"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)

MANIFEST = "manifest.json"
GRAPH = "graph.mxir"
PLAN = "plan.json"
CALL_SPEC = "call_spec.json"
META = "meta.json"
WEIGHTS = "weights.safetensors"
KERNELS = "kernels"
BINARIES = "kernels/bin"
TOKENIZER = "tokenizer"
REQUIRED_FILES = (GRAPH, CALL_SPEC, META, WEIGHTS)

#: `graph.meta` keys that hold runtime objects (calibration statistics bound to an executor),
#: never saved. Any other key must be JSON data, or `save` names it.
RUNTIME_META_KEYS = frozenset({"calibration"})

_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_TUPLE = "__tuple__"


class ArtifactError(ValueError):
    """An artifact cannot be written or read: the message names the file and the check."""


@dataclass
class ArtifactInfo:
    """A checked artifact: its directory, its manifest, and notes (version differences that
    do not prevent loading)."""

    path: Path
    manifest: dict
    notes: list[str] = field(default_factory=list)

    @property
    def kernel_files(self) -> list[str]:
        """The listed files under `kernels/` (sources and binaries), sorted."""
        return sorted(f for f in self.manifest["files"] if f.startswith(KERNELS + "/"))

    @property
    def has_tokenizer(self) -> bool:
        """Whether the artifact stores a tokenizer (`tokenizer/`), as `mxc run` needs."""
        return any(f.startswith(TOKENIZER + "/") for f in self.manifest["files"])


# ------------------------------------------------------------------------------------ save
def save(compiled: Any, path: str | os.PathLike, *, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write `compiled` (a `CompiledModel`) as an artifact directory at `path` and return it.

    The files are written into a temporary sibling directory that is renamed into place, so
    `path` never holds half an artifact. An existing artifact at `path` is replaced only with
    `overwrite=True`; an existing directory that is not an artifact (and not empty) is never
    touched. `tokenizer` (a Hugging Face tokenizer) is saved to `tokenizer/` for `mxc run`."""
    dest = Path(path)
    check_destination(dest, overwrite)
    graph = compiled.graph
    text = str(graph)
    if str(parse(text)) != text:
        raise ArtifactError(
            f"{GRAPH}: the IR of graph @{graph.name} does not print back to the same text after parsing, "
            "so it could not be loaded; this is a printer/parser bug (see mxc.ir.parse)"
        )
    executor = compiled.executor
    sources = _named_files(executor, "kernel_sources", str)
    binaries = _named_files(executor, "kernel_binaries", bytes)
    records = {
        GRAPH: text,
        CALL_SPEC: _json(_call_spec_dict(compiled.call_spec)),
        META: _json({"graph_meta": _encode_meta(graph.meta), "timings": dict(compiled.timings)}),
        **({} if compiled.plan is None else {PLAN: compiled.plan.to_json()}),
        **{f"{KERNELS}/{name}": src for name, src in sources.items()},
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for rel, content in records.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(content, encoding="utf-8")
        for name, blob in binaries.items():
            (tmp / BINARIES).mkdir(parents=True, exist_ok=True)
            (tmp / BINARIES / name).write_bytes(blob)
        save_file(_weights_for_saving(graph), str(tmp / WEIGHTS))
        shutil.copymode(tmp / GRAPH, tmp / WEIGHTS)  # safetensors creates it owner-only
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER))
        listing = _listing(tmp)
        for rel in listing:
            _check_relative(rel, f"{dest}: file {rel!r} (e.g. of the tokenizer)")
        files = {rel: {"sha256": _sha256(tmp / rel), "bytes": (tmp / rel).stat().st_size} for rel in listing}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "versions": _versions(),
            "target": _target(compiled.backend, executor, graph),
            "graph": graph.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": files,
        }
        (tmp / MANIFEST).write_text(_json(manifest), encoding="utf-8")
        _install(tmp, dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def check_destination(dest: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse a destination that is a file, a non-empty directory that is not an artifact, or
    an artifact when `overwrite` is False (`save` checks this before and after writing; the
    CLI checks it before it compiles)."""
    dest = Path(dest)
    if not dest.exists():
        return
    if not dest.is_dir():
        raise ArtifactError(f"{dest} exists and is not a directory; refusing to replace it with an artifact")
    if not any(dest.iterdir()):
        return
    if not _is_artifact(dest):
        raise ArtifactError(f"{dest} exists and is not an mxc artifact (no valid {MANIFEST}); refusing to overwrite it")
    if not overwrite:
        raise ArtifactError(f"{dest} already holds an artifact; pass overwrite=True (mxc compile --overwrite) to replace it")


def _is_artifact(path: Path) -> bool:
    """Whether `path` holds a manifest.json of format "mxc-artifact" (no other check)."""
    try:
        return json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _install(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` directory to `dest`; an existing `dest` is moved aside first
    and removed only once the new one is in place."""
    check_destination(dest, overwrite)  # again: something may have appeared meanwhile
    if not dest.exists():
        tmp.rename(dest)
        return
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    shutil.rmtree(old)


def _named_files(executor: Any, method: str, kind: type) -> dict[str, Any]:
    """`executor.<method>()` (file name -> text or bytes) when the backend has it, else {}.
    Names must be plain file names."""
    fn = getattr(executor, method, None)
    files = dict(fn()) if fn is not None else {}
    for name, content in files.items():
        if not _SAFE_NAME.fullmatch(name):
            raise ArtifactError(f"{method}() returned file name {name!r}; expected a plain name like 'gemm_w4.py'")
        if not isinstance(content, kind):
            raise ArtifactError(f"{method}() returned {type(content).__name__} for {name!r}; expected {kind.__name__}")
    return files


def _call_spec_dict(spec: Any) -> dict:
    """`spec.to_dict()`, its ValueError (a constant or output JSON cannot hold) as an ArtifactError."""
    try:
        return spec.to_dict()
    except ValueError as e:
        raise ArtifactError(f"{CALL_SPEC}: {e}") from None


def _weights_for_saving(graph: Graph) -> dict[str, torch.Tensor]:
    """The used weights on the CPU, contiguous, none sharing memory (safetensors refuses
    shared storage: a tensor whose storage an earlier one already uses is copied)."""
    out, seen = {}, set()
    for name, t in sorted(graph.used_weights().items()):
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _encode_meta(meta: dict) -> dict:
    """`meta` as JSON data, without the `RUNTIME_META_KEYS`; tuples are tagged so they load
    back as tuples (the report compares equal)."""
    return {k: _encode(v, f"graph.meta[{k!r}]") for k, v in meta.items() if k not in RUNTIME_META_KEYS}


def _encode(value: Any, where: str) -> Any:
    """`value` as JSON data: scalars, lists, string-keyed dicts; tuples as `{"__tuple__": [...]}`.
    Anything else raises, naming `where` it is."""
    if value is None:
        return None
    for kind in (str, bool, int, float):  # subclasses (numpy floats, str enums) as the plain type
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str) or k == _TUPLE]
        if bad:
            raise ArtifactError(f"{META}: {where} has key {bad[0]!r}; expected string keys")
        return {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise ArtifactError(
        f"{META}: {where} is a {type(value).__name__}, which JSON cannot hold; if it is runtime-only, "
        "add its key to mxc.runtime.artifact.RUNTIME_META_KEYS"
    )


def _decode(value: Any) -> Any:
    """The value `_encode` wrote: tagged tuples become tuples again."""
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TUPLE}:
            return tuple(_decode(v) for v in value[_TUPLE])
        return {k: _decode(v) for k, v in value.items()}
    return value


def _target(backend: str, executor: Any, graph: Graph) -> dict:
    """Where the model ran when saved: backend, device kind and, on CUDA, the GPU's arch."""
    device = getattr(executor, "device", None)
    if device is None:
        weights = graph.used_weights()
        device = next(iter(weights.values())).device if weights else torch.device("cpu")
    device = torch.device(device)
    arch = None
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        arch = f"sm_{major}{minor}"
    return {"backend": backend, "device": device.type, "gpu_arch": arch}


# ------------------------------------------------------------------------------------ load
def load(path: str | os.PathLike, device: torch.device | str | None = None, backend: str | None = None) -> Any:
    """The `CompiledModel` saved at `path`, on `backend` (default: the saved one when it is
    available here, else "reference") and `device` (default: the CPU, as loaded). Checks
    everything `check_artifact` checks first; its notes become warnings."""
    from ..compiled import CompiledModel
    from ..plan import Plan
    from ..signature import CallSpec
    from . import BACKENDS, unavailable

    info = check_artifact(path)
    root, manifest = info.path, info.manifest
    saved = manifest["target"].get("backend")
    if backend is None:
        backend = saved if saved in BACKENDS and unavailable(saved) is None else "reference"
        if backend != saved:
            info.notes.append(f"saved for backend {saved!r}, which is not available here; running on 'reference'")
    elif backend not in BACKENDS:
        raise ArtifactError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    for note in info.notes:
        warnings.warn(f"artifact {root}: {note}", stacklevel=2)
    graph = _load_graph(root)
    meta = _read_json(root, META)
    graph = graph.with_meta(**_decode(meta.get("graph_meta", {})))
    try:
        spec = CallSpec.from_dict(_read_json(root, CALL_SPEC))
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{root / CALL_SPEC}: not a valid call spec: {e}") from None
    plan = None
    if PLAN in manifest["files"]:
        try:
            plan = Plan.from_json((root / PLAN).read_text(encoding="utf-8"))
        except (ValueError, TypeError) as e:
            raise ArtifactError(f"{root / PLAN}: not a valid plan: {e}") from None
    executor = BACKENDS[backend](graph, device=device)
    return CompiledModel(graph, spec, executor, backend, meta.get("timings", {}), plan)


def _load_graph(root: Path) -> Graph:
    """graph.mxir parsed with the weights of weights.safetensors; checks that the text prints
    back identically, that the weights are exactly those the graph names, with the declared
    shapes and dtypes, and that the graph verifies."""
    text = (root / GRAPH).read_text(encoding="utf-8")
    # Copied into fresh allocations: safetensors aligns tensors to 8 bytes only, and CPU
    # kernels (the GEMV of a 1-token call) may sum in another order on less aligned memory,
    # which would make a loaded model differ from the saved one in the last bit.
    weights = {k: t.clone() for k, t in load_file(str(root / WEIGHTS), device="cpu").items()}
    try:
        graph = parse(text, weights=weights)
    except ParseError as e:
        raise ArtifactError(f"{root / GRAPH}: does not parse: {e}") from None
    if str(graph) != text:
        raise ArtifactError(f"{root / GRAPH}: does not print back to the same text after parsing (IR round trip)")
    consts = {n.get("name"): n.types[0] for n in graph.nodes if n.op == "const"}
    missing, extra = sorted(set(consts) - set(weights)), sorted(set(weights) - set(consts))
    problems = ([f"missing {missing[:5]}"] if missing else []) + ([f"unused {extra[:5]}"] if extra else [])
    if problems:
        raise ArtifactError(f"{root / WEIGHTS}: does not match {GRAPH}: {'; '.join(problems)}")
    for name, t in consts.items():
        w = weights[name]
        shape, dtype = _storage(t)
        if list(w.shape) != shape or (dtype is not None and w.dtype != dtype):
            raise ArtifactError(
                f"{root / WEIGHTS}: tensor {name!r} is {w.dtype} {list(w.shape)}, but {GRAPH} declares {t} "
                f"(stored as {dtype or 'codes'} {shape})"
            )
    try:
        return verify(graph)
    except VerificationError as e:
        raise ArtifactError(f"{root / GRAPH}: fails verification: {e}") from None


def _storage(t: TensorType) -> tuple[list, torch.dtype | None]:
    """The shape and dtype a const of type `t` is stored with: int32 words for packed codes,
    else its own shape and dtype (None: codes of a number format, in whatever dtype holds them)."""
    if t.layout is not None:
        return list(packed_shape(tuple(t.shape), t.layout)), torch.int32
    return list(t.shape), t.dtype.torch if isinstance(t.dtype, DType) else None


def check_artifact(path: str | os.PathLike) -> ArtifactInfo:
    """Check the artifact at `path` without loading it: manifest, format version, mxc version,
    the inventory (no listed file missing, no unlisted file), sizes, sha256s, and torch/triton
    versions (refused when it holds GPU binaries, else a note). Raises `ArtifactError`."""
    root = Path(path)
    if not root.exists():
        raise ArtifactError(f"{root}: no such directory")
    if not root.is_dir():
        raise ArtifactError(f"{root}: not a directory; an mxc artifact is a directory with a {MANIFEST}")
    if not (root / MANIFEST).is_file():
        raise ArtifactError(f"{root}: not an mxc artifact: {MANIFEST} is missing")
    manifest = _read_json(root, MANIFEST)
    _check_manifest(root, manifest)
    versions, here = manifest["versions"], _versions()
    if _major_minor(versions["mxc"]) != _major_minor(here["mxc"]):
        raise ArtifactError(
            f"{root / MANIFEST}: written by mxc {versions['mxc']}, but this is mxc {here['mxc']}; "
            "artifacts load only with the same mxc major.minor version: compile the model again"
        )
    files = manifest["files"]
    unlisted = sorted(set(_listing(root)) - set(files))
    if unlisted:
        raise ArtifactError(
            f"{root / unlisted[0]}: unlisted file: {MANIFEST} does not list it "
            f"({len(unlisted)} unlisted file(s) in all); an artifact holds only the files its manifest lists"
        )
    for rel, entry in files.items():
        f = root / rel
        if f.is_symlink():
            raise ArtifactError(f"{f}: a symbolic link; an artifact holds plain files only")
        if not f.is_file():
            raise ArtifactError(f"{f}: missing: {MANIFEST} lists it")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"{f}: size mismatch (truncated or altered): {size} bytes, {MANIFEST} records {entry['bytes']}")
    for rel, entry in files.items():
        if _sha256(root / rel) != entry["sha256"]:
            raise ArtifactError(f"{root / rel}: sha256 mismatch: the file is not the one {MANIFEST} records (corrupt or tampered)")
    notes = []
    binaries = [f for f in files if f.startswith(BINARIES + "/")]
    for lib in ("torch", "triton"):
        if versions.get(lib) != here[lib]:
            what = f"written with {lib} {versions.get(lib)}, this is {lib} {here[lib]}"
            if binaries:
                raise ArtifactError(
                    f"{root / MANIFEST}: {what}, and the artifact holds compiled GPU kernels ({binaries[0]}, ...) "
                    f"that need the same {lib}; compile the model again"
                )
            notes.append(what + " (no compiled kernels are stored, so this is harmless)")
    return ArtifactInfo(root, manifest, notes)


def _check_manifest(root: Path, manifest: Any) -> None:
    """The manifest's format, format version, keys and file list are what this mxc reads."""
    where = root / MANIFEST
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{where}: not an mxc artifact manifest (expected \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ArtifactError(
            f"{where}: artifact format version {version!r} is not supported; this mxc reads format "
            f"version(s) {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}"
        )
    missing = [k for k in ("versions", "target", "graph", "files") if not isinstance(manifest.get(k), dict if k != "graph" else str)]
    if missing or "mxc" not in manifest["versions"]:
        raise ArtifactError(f"{where}: malformed manifest: missing or wrong {missing or ['versions.mxc']}")
    for rel, entry in manifest["files"].items():
        _check_relative(rel, f"{where}: file entry {rel!r}")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("bytes"), int):
            raise ArtifactError(f"{where}: file entry {rel!r} needs \"sha256\" and \"bytes\"")
    absent = [f for f in REQUIRED_FILES if f not in manifest["files"]]
    if absent:
        raise ArtifactError(f"{where}: does not list the required file(s) {', '.join(absent)}")


# ------------------------------------------------------------------------------------ helpers
def _check_relative(rel: str, what: str) -> None:
    """Refuse a listed path that is not `name/name/...` of plain names inside the artifact
    (no `..`, no absolute path, no hidden or odd names) or that is the manifest itself."""
    if rel == MANIFEST or not all(_SAFE_NAME.fullmatch(part) for part in rel.split("/")):
        raise ArtifactError(f"{what} is not a plain relative path inside the artifact")


def _read_json(root: Path, rel: str) -> Any:
    """The JSON file `rel` of the artifact; malformed JSON is an ArtifactError naming it."""
    try:
        return json.loads((root / rel).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ArtifactError(f"{root / rel}: not valid JSON: {e}") from None


def _json(data: Any) -> str:
    """`data` as indented JSON text with a final newline (diffable)."""
    return json.dumps(data, indent=2) + "\n"


def _listing(root: Path) -> list[str]:
    """Every file under `root` but the manifest, as sorted POSIX paths relative to `root`."""
    found = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(rel for rel in found if rel != MANIFEST)


def _sha256(path: Path) -> str:
    """The hex sha256 of the file at `path`, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str | None]:
    """The versions of mxc, torch and triton (None when triton is not installed) running now."""
    from .. import __version__

    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {"mxc": __version__, "torch": str(torch.__version__), "triton": triton}


def _major_minor(version: str) -> tuple[str, ...]:
    """("0", "1") for "0.1.3": the part of a version an artifact must match."""
    return tuple(str(version).split(".")[:2])
