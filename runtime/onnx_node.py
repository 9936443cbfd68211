"""Run an `onnx` node (an ONNX op the ONNX frontend left unmapped) with `onnx.reference`.

    %7 = onnx(%5, %6) {op_type="GatherND", domain="", opset=20, attributes={"batch_dims": 0},
                       operands=[0, 1]} : i64[b, 1, s, 1]

The node becomes a one-node ONNX model (inputs `in0..`, outputs `out0..`, the op's
attributes rebuilt from the node's `attributes`), evaluated by `ReferenceEvaluator` on the
operands converted to numpy; the results come back as torch tensors. Evaluators are cached
by the node's text, so a graph builds each once.

Attribute values: ints, floats, strings and lists of them are stored as they are; any other
attribute (a tensor, a graph, an empty list whose element type the value cannot say) is
stored as `{"proto": BASE64}`, the serialized `onnx.AttributeProto`.
"""

from __future__ import annotations

import base64
import functools
from typing import Any

import numpy as np
import torch

from ..ir import DType

#: IR dtype name -> ONNX element type (`onnx.TensorProto` values): the one table of the ONNX
#: frontend (`mxc.frontends.onnx.values`), `mxc.export_onnx` and `onnx` fallback nodes.
ONNX_TYPES = {
    "f32": 1, "u8": 2, "i8": 3, "u16": 4, "i16": 5, "i32": 6, "i64": 7, "bool": 9, "f16": 10, "f64": 11,
    "u32": 12, "u64": 13, "bf16": 16, "f8e4m3": 17, "f8e5m2": 19,
}


def attribute_value(name: str, value: Any) -> Any:
    """The `onnx.AttributeProto` for one stored attribute value (see the module docstring)."""
    import onnx

    if isinstance(value, dict):
        attr = onnx.AttributeProto()
        attr.ParseFromString(base64.b64decode(value["proto"]))
        return attr
    if isinstance(value, tuple):
        value = list(value)
    return onnx.helper.make_attribute(name, value)


def stored_attribute(attr: Any) -> Any:
    """The stored form of an `onnx.AttributeProto`: a plain value where it has one, else the proto."""
    import onnx

    plain = {onnx.AttributeProto.INT, onnx.AttributeProto.FLOAT, onnx.AttributeProto.STRING}
    lists = {onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS, onnx.AttributeProto.STRINGS}
    if attr.type in plain or (attr.type in lists and len(onnx.helper.get_attribute_value(attr))):
        v = onnx.helper.get_attribute_value(attr)
        if isinstance(v, bytes):
            return v.decode("utf-8")
        if isinstance(v, list):
            return tuple(x.decode("utf-8") if isinstance(x, bytes) else x for x in v)
        return v
    return {"proto": base64.b64encode(attr.SerializeToString()).decode("ascii")}


@functools.lru_cache(maxsize=512)
def _evaluator(op_type: str, domain: str, opset: int, attributes: str, operands: tuple, in_types: tuple, n_out: int):
    import json

    import onnx
    from onnx.reference import ReferenceEvaluator

    attrs = json.loads(attributes)
    names = [f"in{i}" if k is not None else "" for i, k in enumerate(operands)]
    node = onnx.helper.make_node(op_type, names, [f"out{i}" for i in range(n_out)], domain=domain)
    node.attribute.extend(attribute_value(k, tuple(v) if isinstance(v, list) else v) for k, v in attrs.items())
    inputs = [onnx.helper.make_tensor_value_info(f"in{i}", in_types[k], None)
              for i, k in enumerate(operands) if k is not None]
    outputs = [onnx.helper.make_tensor_value_info(f"out{i}", 0, None) for i in range(n_out)]
    graph = onnx.helper.make_graph([node], f"mxc_{op_type}", inputs, outputs)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(domain, opset)])
    return ReferenceEvaluator(model)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy array with `t`'s values (bfloat16 and float8 through `ml_dtypes`)."""
    t = t.detach().cpu()
    special = {torch.bfloat16: ("bfloat16", torch.int16), torch.float8_e4m3fn: ("float8_e4m3fn", torch.int8),
               torch.float8_e5m2: ("float8_e5m2", torch.int8)}
    if t.dtype in special:
        import ml_dtypes

        name, view = special[t.dtype]
        return t.view(view).numpy().view(getattr(ml_dtypes, name))
    return t.numpy()


def to_torch(a: Any, device: torch.device) -> torch.Tensor:
    """A torch tensor with the values of numpy array (or scalar) `a`."""
    a = np.asarray(a)
    name = a.dtype.name
    views = {"bfloat16": (np.int16, torch.bfloat16), "float8_e4m3fn": (np.int8, torch.float8_e4m3fn),
             "float8_e5m2": (np.int8, torch.float8_e5m2)}
    if name in views:
        raw, dtype = views[name]
        return torch.from_numpy(np.ascontiguousarray(a).view(raw)).view(dtype).to(device)
    return torch.from_numpy(np.array(a, copy=True, order="C")).to(device)


def run_onnx_node(ins: list[torch.Tensor], a: dict, node: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Evaluate an `onnx` node's op on `ins` (see the module docstring)."""
    import json

    in_types = tuple(ONNX_TYPES[v.type.dtype.name] if isinstance(v.type.dtype, DType) else 0 for v in node.inputs)
    attributes = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in a["attributes"].items()})
    ev = _evaluator(a["op_type"], a["domain"], a["opset"], attributes, tuple(a["operands"]), in_types, len(node.types))
    feeds = {f"in{i}": to_numpy(ins[k]) for i, k in enumerate(a["operands"]) if k is not None}
    results = ev.run(None, feeds)
    return tuple(to_torch(r, device) for r in results)
