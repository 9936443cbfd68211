"""Fold ONNX nodes whose operands are all known at import time into `Static` values.

Shape computations (`Shape`, `Gather`, `Concat`, `Slice`, arithmetic ... on sizes) are folded
on sympy expressions (`SYMBOLIC`); a node whose operands are all plain numbers (and small)
is folded by running it once with `onnx.reference`.

    Shape(x: f32[b, s, 72]) -> [b, s, 72];  Concat([b], [s], [-1], [12]) -> [b, s, -1, 12]
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx
import sympy

from ...ir import DTYPES, Value
from .importer import one_node_model
from .values import Static, ir_dtype, symbolic_array

#: Ops never folded: their result is not a function of their operands alone.
NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
#: Largest Static (in elements) folded numerically instead of emitted as ops.
FOLD_LIMIT = 4096


def _ints(e: Static | None, default=None):
    return default if e is None else [int(x) for x in e.numeric().reshape(-1)]


def _obj(e: Static) -> np.ndarray:
    return e.array if e.array.dtype == object else symbolic_array([int(x) for x in e.array.reshape(-1)], e.array.shape)


def _slice(ins, a):
    data = _obj(ins[0])
    starts, ends = _ints(ins[1]), _ints(ins[2])
    axes = _ints(ins[3] if len(ins) > 3 else None, list(range(len(starts))))
    steps = _ints(ins[4] if len(ins) > 4 else None, [1] * len(starts))
    index = [slice(None)] * data.ndim
    for s, e, ax, st in zip(starts, ends, axes, steps):
        index[ax % data.ndim] = slice(s, e, st)
    return data[tuple(index)]


def _gather(ins, a):
    idx = ins[1].numeric()
    axis = a.get("axis", 0)
    data = _obj(ins[0])
    return np.take(data, np.where(idx < 0, idx + data.shape[axis], idx), axis=axis)


def _reshape(ins, a):
    data, shape = _obj(ins[0]), _ints(ins[1])
    shape = [data.shape[i] if d == 0 and not a.get("allowzero") else d for i, d in enumerate(shape)]
    return data.reshape(shape)


def _unsqueeze(ins, a):
    axes = _ints(ins[1]) if len(ins) > 1 else list(a["axes"])
    out = _obj(ins[0])
    rank = out.ndim + len(axes)
    for ax in sorted(x % rank for x in axes):
        out = np.expand_dims(out, ax)
    return out


def _squeeze(ins, a):
    axes = _ints(ins[1] if len(ins) > 1 else None, a.get("axes"))
    data = _obj(ins[0])
    return data.squeeze(tuple(x % data.ndim for x in axes) if axes is not None else None)


def _div(ins, a):
    x, y = _obj(ins[0]), _obj(ins[1])
    return np.vectorize(lambda p, q: sympy.floor(p / q) if (p / q).is_nonnegative else sympy.ceiling(p / q),
                        otypes=[object])(x, y)


def _binary(fn) -> Callable:
    return lambda ins, a: fn(_obj(ins[0]), _obj(ins[1]))


def _nary(fn) -> Callable:
    def rule(ins, a):
        out = _obj(ins[0])
        for e in ins[1:]:
            out = np.vectorize(fn, otypes=[object])(out, _obj(e))
        return out

    return rule


#: ONNX op -> fold on object arrays of sympy sizes (integer results only).
SYMBOLIC: dict[str, Callable[[list[Static], dict], np.ndarray]] = {
    "Concat": lambda ins, a: np.concatenate([_obj(e) for e in ins], axis=a["axis"]),
    "Slice": _slice,
    "Gather": _gather,
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Identity": lambda ins, a: _obj(ins[0]),
    "Cast": lambda ins, a: _obj(ins[0]),
    "Add": _binary(lambda x, y: x + y),
    "Sub": _binary(lambda x, y: x - y),
    "Mul": _binary(lambda x, y: x * y),
    "Div": _div,
    "Neg": lambda ins, a: -_obj(ins[0]),
    "Max": _nary(sympy.Max),
    "Min": _nary(sympy.Min),
}
_INT_TYPES = {"i64", "i32", "i16", "i8"}


def shape_of(v: Value, a: dict) -> Static:
    """`Shape(v)` with its `start`/`end` attributes: the sizes, as a Static."""
    dims = list(v.type.shape)[slice(a.get("start", 0), a.get("end", None))]
    return Static(symbolic_array(dims), DTYPES["i64"])


def fold(node: onnx.NodeProto, entries: list[Any], attrs: dict, opsets) -> list[Static] | None:
    """`node`'s results if they can be computed now, else None."""
    if node.op_type == "Shape" and isinstance(entries[0], Value):
        return [shape_of(entries[0], attrs)]
    if node.op_type == "Size" and isinstance(entries[0], Value):
        return [Static(symbolic_array([sympy.Mul(*entries[0].type.shape)], ()), DTYPES["i64"])]
    if node.op_type in NO_FOLD or any(not isinstance(e, Static) for n, e in zip(node.input, entries) if n):
        return None
    statics = [e for e in entries if e is not None]
    if any(e.symbolic for e in statics):
        rule = SYMBOLIC.get(node.op_type)
        if rule is None or len(node.output) != 1:
            return None
        if node.op_type == "Cast" and ir_dtype(attrs["to"], "Cast").name not in _INT_TYPES:
            return None
        dtype = statics[0].dtype if node.op_type != "Cast" else ir_dtype(attrs["to"], "Cast")
        try:
            return [Static(np.asarray(rule(entries, attrs), dtype=object), dtype)]
        except ValueError:  # e.g. a Slice of a constant up to a size `s`: imported as ops instead
            return None
    if sum(e.array.size for e in statics) > FOLD_LIMIT:
        return None
    return _evaluate(node, entries, opsets)


def _evaluate(node: onnx.NodeProto, entries: list[Any], opsets) -> list[Static] | None:
    """Run `node` once on its numeric operands with `onnx.reference`."""
    from onnx.reference import ReferenceEvaluator

    feeds, inputs = {}, []
    for i, (n, e) in enumerate(zip(node.input, entries)):
        present = bool(n) and e is not None
        inputs.append(onnx.helper.make_tensor_value_info(f"in{i}", 0, None) if present else None)
        if present:
            feeds[f"in{i}"] = e.numeric()
    outputs = [onnx.helper.make_tensor_value_info(f"out{i}", 0, None) if o else None for i, o in enumerate(node.output)]
    ev = ReferenceEvaluator(one_node_model(node, inputs, outputs, opsets))
    out = []
    for r in ev.run(None, feeds):
        arr = np.asarray(r)
        tp = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
        out.append(Static(arr, ir_dtype(tp, f"folded {node.op_type}")))
    return out
