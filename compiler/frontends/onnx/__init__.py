"""The ONNX frontend: an ONNX model (a `ModelProto` or a path) into the IR.

    imported = load_onnx("model.onnx")
    imported.graph      # IR: linear, embedding, attention, ... `torch` and `onnx` fallbacks
    imported.call_spec  # call it with the graph inputs by position or by name

`mxc.compile("model.onnx", plan)` runs this instead of the torch capture; everything after
(passes, plans, backends, artifacts) is the same. See `importer.py` for how values are named
and typed, `mapping.py` for the op rules, `patterns.py` for the compound patterns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch.utils._pytree as pytree

from ...ir import Graph
from ...signature import CallSpec, Outputs
from .importer import Importer, OnnxImportError
from .mapping import MAPPED_OPS


@dataclass
class Imported:
    """The IR of an ONNX model, how to call it, and the (checked) model it came from."""

    graph: Graph
    call_spec: CallSpec
    model: onnx.ModelProto


def is_onnx(model: object) -> bool:
    """Whether `mxc.compile` should import `model` with this frontend: a `ModelProto`, or a
    path (str or `os.PathLike`) ending in `.onnx`."""
    if isinstance(model, onnx.ModelProto):
        return True
    return isinstance(model, (str, os.PathLike)) and str(model).lower().endswith(".onnx")


def load_onnx(model: "onnx.ModelProto | str | os.PathLike", *, name: str | None = None) -> Imported:
    """Import `model` (see the module docstring). Its outputs come back by name: the compiled
    model returns an `Outputs` (`out.logits`, `out["logits"]`, `out[0]`)."""
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {str(path)!r} does not exist")
        name = name or path.stem
        try:
            model = onnx.load(str(path))
        except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError
            raise OnnxImportError(f"{path}: not a readable ONNX model: {e}") from None
    graph, inputs, outputs = Importer(model, name).run()
    spec = CallSpec(tuple(inputs), tuple(inputs), {},
                    pytree.TreeSpec(Outputs, list(outputs), [pytree.treespec_leaf() for _ in outputs]))
    return Imported(graph, spec, model)


def onnx_fallbacks(graph: Graph) -> dict[str, int]:
    """The ONNX ops left as `onnx` nodes (run by `onnx.reference`), with their counts."""
    out: dict[str, int] = {}
    for n in graph.walk():
        if n.op == "onnx":
            key = f"onnx:{n.get('domain') or 'ai.onnx'}.{n.get('op_type')}"
            out[key] = out.get(key, 0) + 1
    return out


__all__ = ["Imported", "MAPPED_OPS", "OnnxImportError", "is_onnx", "load_onnx", "onnx_fallbacks"]
