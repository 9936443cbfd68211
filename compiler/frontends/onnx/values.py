"""What an ONNX value is while importing: an IR tensor, or a `Static` known at import time.

A `Static` is a constant (an initializer, a `Constant` node) or the result of a shape
computation (`Shape`, `Gather`, `Concat`, ... on shapes): a numpy array whose entries are
numbers or, for shapes that depend on the inputs, sympy expressions in the size symbols
(object dtype). Shape arithmetic is folded here, on the symbols, instead of being run:

    Shape(x: f32[b, s, 72]) -> Static([b, s, 72]);  Gather(that, 1) -> Static(s)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import sympy

from ...ir import DType
from ...ir.dtypes import DTYPES
from ...runtime.onnx_node import ONNX_TYPES

#: IR dtype -> ONNX element type (the runtime's table, which `onnx` fallback nodes use too).
ONNX_OF = ONNX_TYPES
#: ONNX element type -> IR dtype.
DTYPE_OF = {v: k for k, v in ONNX_OF.items()}
#: IR integer/bool dtype -> numpy dtype (for folded shape values).
NUMPY_OF = {"i64": np.int64, "i32": np.int32, "i16": np.int16, "i8": np.int8, "u8": np.uint8, "bool": np.bool_,
            "u16": np.uint16, "u32": np.uint32, "u64": np.uint64}


def ir_dtype(elem_type: int, where: str) -> DType:
    """The IR dtype of an ONNX element type; `where` names the value for the error."""
    name = DTYPE_OF.get(elem_type)
    if name is None:
        got = onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() else elem_type
        raise ValueError(f"{where}: element type {got} has no IR dtype; expected one of "
                         + ", ".join(onnx.TensorProto.DataType.Name(k) for k in DTYPE_OF))
    return DTYPES[name]


@dataclass(frozen=True, eq=False)
class Static:
    """A value known at import time: `array` of numbers (or sympy expressions, object dtype),
    its IR `dtype`, and the initializer it is (None for computed ones)."""

    array: np.ndarray
    dtype: DType
    init: str | None = None

    @property
    def symbolic(self) -> bool:
        return self.array.dtype == object and any(isinstance(x, sympy.Expr) and not x.is_Integer
                                                   for x in self.array.flat)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def numeric(self) -> np.ndarray:
        """The entries as a numeric numpy array (symbolic entries must have become integers)."""
        if self.array.dtype != object:
            return self.array
        if self.symbolic:
            raise ValueError(f"value {self.dims()} depends on the input sizes; expected numbers")
        return np.array([int(x) for x in self.array.flat], dtype=np.int64).reshape(self.array.shape).astype(
            NUMPY_OF.get(self.dtype.name, np.int64))

    def dims(self) -> tuple:
        """The entries as a tuple of ints and sympy expressions (a shape, a list of starts...)."""
        return tuple(_dim(x) for x in self.array.reshape(-1))

    def scalar(self):
        """The single entry as a Python number or sympy expression."""
        if self.array.size != 1:
            raise ValueError(f"expected a single value, got shape {list(self.array.shape)}")
        x = self.array.reshape(-1)[0]
        if isinstance(x, sympy.Expr):
            return _dim(x)
        return x.item() if hasattr(x, "item") else x


def _dim(x):
    if isinstance(x, sympy.Expr):
        x = sympy.simplify(x)
        return int(x) if x.is_Integer else x
    return int(x)


def symbolic_array(values, shape=None) -> np.ndarray:
    """An object array of sympy-or-int entries."""
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = sympy.Integer(v) if isinstance(v, (int, np.integer)) else v
    return arr.reshape(shape if shape is not None else (len(values),))
