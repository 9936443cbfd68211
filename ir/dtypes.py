"""Plain element types of IR values.

A plain dtype is one torch can hold in a tensor as is (f32, i64, ...). Quantized storage
types are *number formats* (`mxc.ir.formats`); a `TensorType` carries either.

    >>> F32.name, F32.bits, DType.parse("bf16") is BF16
    ('f32', 32, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class DType:
    """A plain element type: its IR name, bit width and kind ('float', 'int', 'uint', 'bool')."""

    name: str
    bits: int
    kind: str

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return self.name

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    @property
    def torch(self) -> torch.dtype:
        """The torch dtype that holds values of this type."""
        return _TO_TORCH[self.name]

    @staticmethod
    def parse(text: str) -> "DType":
        """The dtype named `text`; raises ValueError naming the valid names otherwise."""
        try:
            return DTYPES[text]
        except KeyError:
            raise ValueError(f"unknown dtype {text!r}; expected one of {', '.join(DTYPES)}") from None

    @staticmethod
    def from_torch(dtype: torch.dtype) -> "DType":
        """The IR dtype for a torch dtype; raises ValueError for one the IR has no name for."""
        try:
            return _FROM_TORCH[dtype]
        except KeyError:
            raise ValueError(
                f"torch dtype {dtype} has no IR dtype; expected one of "
                + ", ".join(str(t) for t in _FROM_TORCH)
            ) from None


F64 = DType("f64", 64, "float")
F32 = DType("f32", 32, "float")
F16 = DType("f16", 16, "float")
BF16 = DType("bf16", 16, "float")
F8E4M3 = DType("f8e4m3", 8, "float")
F8E5M2 = DType("f8e5m2", 8, "float")
I64 = DType("i64", 64, "int")
I32 = DType("i32", 32, "int")
I16 = DType("i16", 16, "int")
I8 = DType("i8", 8, "int")
U8 = DType("u8", 8, "uint")
U16 = DType("u16", 16, "uint")  # u16/u32/u64: ONNX tensors; torch holds them but has few ops for them
U32 = DType("u32", 32, "uint")
U64 = DType("u64", 64, "uint")
BOOL = DType("bool", 8, "bool")

DTYPES: dict[str, DType] = {
    t.name: t for t in (F64, F32, F16, BF16, F8E4M3, F8E5M2, I64, I32, I16, I8, U8, U16, U32, U64, BOOL)
}

_TO_TORCH: dict[str, torch.dtype] = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f8e4m3": torch.float8_e4m3fn,
    "f8e5m2": torch.float8_e5m2,
    "i64": torch.int64,
    "i32": torch.int32,
    "i16": torch.int16,
    "i8": torch.int8,
    "u8": torch.uint8,
    "u16": torch.uint16,
    "u32": torch.uint32,
    "u64": torch.uint64,
    "bool": torch.bool,
}
_FROM_TORCH: dict[torch.dtype, DType] = {v: DTYPES[k] for k, v in _TO_TORCH.items()}
