"""Execution of compiled graphs: backends, input checks, artifacts. Imports `ir` and `codegen`."""

from .inputs import InputError, bind_inputs
from .reference import ExecutionError, ReferenceExecutor
from .artifact import ArtifactError, ArtifactInfo, check_artifact, load, save

BACKENDS = {"reference": ReferenceExecutor}

__all__ = ["BACKENDS", "ExecutionError", "InputError", "ReferenceExecutor", "bind_inputs"]
__all__ += ["ArtifactError", "ArtifactInfo", "check_artifact", "load", "save"]
