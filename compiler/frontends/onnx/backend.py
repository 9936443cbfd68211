"""mxc as an ONNX backend (`onnx.backend.base.Backend`), for ONNX's own conformance tests.

    rep = MxcBackend.prepare(model_proto)
    outputs = rep.run([x, y])              # numpy arrays, one per graph output

`prepare` checks the model and `run` imports it with the ONNX frontend and runs it with the
reference backend. mxc, like `torch.export`, needs shapes that follow from the input shapes:
an integer input that a node reads as a shape, axes or bounds (Reshape's `shape`, Slice's
`starts`...) is bound at `run` time as an initializer (the model is imported once per such
value), which is how a compiler with static shape tensors meets tests that pass them as inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from onnx.backend.base import Backend, BackendRep

from ...runtime.onnx_node import to_numpy, to_torch
from ...runtime.reference import ReferenceExecutor
from . import load_onnx
from .importer import check

#: op -> input slots read as shapes, axes or bounds (static for mxc).
SHAPE_OPERANDS = {
    "Reshape": (1,), "Expand": (1,), "Slice": (1, 2, 3, 4), "Unsqueeze": (1,), "Squeeze": (1,),
    "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "CumSum": (1,), "Tile": (1,), "Pad": (1, 3), "TopK": (1,), "Split": (1,),
}


class MxcRep(BackendRep):
    """A prepared model: imported per value of its shape inputs, run by the reference backend."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        inits = {i.name for i in model.graph.initializer}
        self.inputs = [vi.name for vi in model.graph.input if vi.name not in inits]
        self.static = sorted({n.input[i] for n in model.graph.node for i in SHAPE_OPERANDS.get(n.op_type, ())
                              if i < len(n.input) and n.input[i] in self.inputs})
        self.compiled: dict[bytes, tuple[ReferenceExecutor, list[str]]] = {}

    def _bound(self, feeds: dict[str, np.ndarray]) -> tuple[ReferenceExecutor, list[str]]:
        key = b"".join(np.ascontiguousarray(feeds[n]).tobytes() + str(feeds[n].shape).encode() for n in self.static)
        if key not in self.compiled:
            m = onnx.ModelProto()
            m.CopyFrom(self.model)
            keep = [vi for vi in m.graph.input if vi.name not in self.static]
            del m.graph.input[:]
            m.graph.input.extend(keep)
            m.graph.initializer.extend(onnx.numpy_helper.from_array(np.asarray(feeds[n]), n) for n in self.static)
            imported = load_onnx(m)
            self.compiled[key] = (ReferenceExecutor(imported.graph, check_shapes=True), list(imported.graph.input_names))
        return self.compiled[key]

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        if isinstance(inputs, dict):
            feeds = dict(inputs)
        else:
            feeds = dict(zip(self.inputs, inputs if isinstance(inputs, (list, tuple)) else [inputs]))
        executor, names = self._bound(feeds)
        by_ident = {n: feeds[n] for n in self.inputs if n not in self.static}
        args = [to_torch(np.asarray(v), torch.device("cpu")) for v in by_ident.values()]
        if len(args) != len(names):
            raise ValueError(f"the model takes inputs {names}, got {len(args)} tensors")
        return tuple(to_numpy(t) for t in executor(args))


class MxcBackend(Backend):
    """The ONNX backend API over the mxc frontend and reference backend (CPU)."""

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> MxcRep:
        super().prepare(model, device, **kwargs)
        check(model)
        return MxcRep(model)

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU", **kwargs: Any):
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"
