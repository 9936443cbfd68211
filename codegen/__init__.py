"""mxc's code generator: kernel specs, parameterised Triton templates, the source emitter
and the kernel cache.

    from mxc.codegen import KernelSpec, load
    spec = KernelSpec.dequant_gemm(n=4096, k=4096, weight="int4<sym,g128>", x_dtype="f16")
    y = load(spec).launch(x, packed_weight, scale)

Imports only `mxc.ir` (and torch / triton)."""

from .cache import cache_dir, kernel_path, load
from .emit import emit, versions
from .spec import EPILOGUE_STEPS, FAMILIES, M_CLASSES, KernelSpec, Tiles, choose_tiles
from .templates.checks import LaunchError

__all__ = [
    "EPILOGUE_STEPS", "FAMILIES", "KernelSpec", "LaunchError", "M_CLASSES", "Tiles", "cache_dir",
    "choose_tiles", "emit", "kernel_path", "load", "versions",
]
