"""Graph passes: one module per pass, each a function `graph -> graph` with keyword options,
registered by name in `PASSES` and run in order by `run_pipeline`. Imports only `mxc.ir`."""

from .manager import PASSES, PassError, PipelineResult, dump, run_pipeline

__all__ = ["PASSES", "PassError", "PipelineResult", "dump", "run_pipeline"]
