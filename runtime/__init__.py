"""Execution of compiled graphs: backends, input checks, artifacts. Imports `ir` and `codegen`."""

from .inputs import InputError, bind_inputs
from .reference import ExecutionError, ReferenceExecutor

BACKENDS = {"reference": ReferenceExecutor}

__all__ = ["BACKENDS", "ExecutionError", "InputError", "ReferenceExecutor", "bind_inputs"]
