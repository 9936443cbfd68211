"""The kernel cache: generated modules as `.py` files on disk, imported from there.

    module = load(spec)          # emit, write (once), import
    module.launch(x, weight, scale)

Files live in `MXC_CACHE_DIR` (default `~/.cache/mxc/kernels`), named by the family and a
sha256 of the spec key plus the mxc and triton versions. A miss writes the source to a
temporary file in the same directory and renames it into place (`os.replace`, atomic), so
concurrent processes never see a partial file and the last writer's identical text wins. A
hit compares the stored text with the freshly emitted one and rewrites it (with a warning)
when they differ. Modules are imported with importlib from the file itself: `@triton.jit`
reads the kernels' source through `inspect`, which needs a real file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

from ..ir.flags import CACHE_DIR

from .emit import emit, versions
from .spec import KernelSpec

#: Modules imported by this process: (path, interpreted) -> (source text, module).
_LOADED: dict[tuple[str, bool], tuple[str, ModuleType]] = {}


def interpreting() -> bool:
    """Whether `@triton.jit` makes interpreted functions now (TRITON_INTERPRET): Triton
    decides when the module is imported, so the interpreted and compiled imports of one
    kernel file are separate modules."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # a Triton without knobs reads the variable itself
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


def cache_dir() -> Path:
    """The kernel cache directory (read at each call: `MXC_CACHE_DIR`, else the default)."""
    raw = CACHE_DIR.get()
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "mxc" / "kernels"


def cache_key(spec: KernelSpec) -> str:
    """sha256 (hex) of the spec key and the mxc and triton versions."""
    v = versions()
    return hashlib.sha256(f"{spec.key()}|mxc={v['mxc']}|triton={v['triton']}".encode()).hexdigest()


def kernel_path(spec: KernelSpec) -> Path:
    """Where `spec`'s module lives in the cache: `<dir>/<family>_<key[:32]>.py`."""
    return cache_dir() / f"{spec.family}_{cache_key(spec)[:32]}.py"


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same directory and `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def load(spec: KernelSpec) -> ModuleType:
    """The imported module of `spec`'s kernels (see the module docstring for the cache).
    Repeated calls in one process return the same module while the file is unchanged and the
    interpreter setting (`interpreting`) is the same."""
    text = emit(spec)
    path = kernel_path(spec)
    stored = _read(path)
    if stored is None:
        _write_atomic(path, text)
    elif stored != text:
        warnings.warn(
            f"kernel cache: {path} differs from the source mxc emits for {spec} (edited or corrupt); rewriting it",
            RuntimeWarning,
            stacklevel=2,
        )
        _write_atomic(path, text)
    memo = (str(path), interpreting())
    hit = _LOADED.get(memo)
    if hit is not None and hit[0] == text:
        return hit[1]
    name = f"mxc_kernels_{path.stem}" + ("_interpreted" if memo[1] else "")
    mod_spec = importlib.util.spec_from_file_location(name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise ImportError(f"kernel cache: cannot import {path}")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    try:
        mod_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    _LOADED[memo] = (text, module)
    return module


def forget() -> None:
    """Drop this process's record of imported kernel modules (the files stay)."""
    for _, module in _LOADED.values():
        sys.modules.pop(module.__name__, None)
    _LOADED.clear()
