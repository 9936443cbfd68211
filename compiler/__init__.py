"""mxc: a graph compiler that lowers language models to mixed-precision GPU code.

    import mxc
    compiled = mxc.compile(model, example_inputs=ids)
    compiled(ids).logits
    q = mxc.compile(model, "w4a16-g128", calibration=tokenizer)   # GPTQ + clipping search
    print(q.report())
"""

from . import cost, eval, models  # noqa: A004 - `mxc.eval` is the evaluation module
from .compiled import CompiledModel, Report
from .driver import FLOAT_PIPELINE, compile  # noqa: A004
from .frontends.torch_export import CaptureError
from .plan import PRESETS, Plan, Rule
from .runtime import ExecutionError, InputError
from .runtime.artifact import ArtifactError, load, save
from .onnx_export import OnnxExportError, export_onnx
from .signature import CallError

__version__ = "0.1.0"

__all__ = [
    "CallError", "CaptureError", "CompiledModel", "ExecutionError", "FLOAT_PIPELINE", "InputError",
    "PRESETS", "Plan", "Report", "Rule", "compile", "eval", "models",
]
__all__ += ["ArtifactError", "load", "save"]
__all__ += ["OnnxExportError", "export_onnx"]
