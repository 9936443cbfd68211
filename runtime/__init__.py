"""Execution of compiled graphs: backends, input checks, artifacts. Imports `ir` and `codegen`."""

from .inputs import InputError, bind_inputs
from .reference import ExecutionError, ReferenceExecutor
from .kernels import BackendError, InterpretExecutor, KernelExecutor, TritonExecutor
from .kernels import unavailable as kernel_backend_unavailable
from .artifact import ArtifactError, ArtifactInfo, check_artifact, load, save

BACKENDS = {"reference": ReferenceExecutor, "interpret": InterpretExecutor, "triton": TritonExecutor}


def unavailable(backend: str) -> str | None:
    """Why `backend` (a name in `BACKENDS`) cannot run in this process, None when it can."""
    return None if backend == "reference" else kernel_backend_unavailable(backend == "interpret")

__all__ = ["BACKENDS", "ExecutionError", "InputError", "ReferenceExecutor", "bind_inputs"]
__all__ += ["ArtifactError", "ArtifactInfo", "check_artifact", "load", "save"]
__all__ += ["BackendError", "InterpretExecutor", "KernelExecutor", "TritonExecutor", "unavailable"]
