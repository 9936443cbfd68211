"""mxc's typed IR: dtypes, number formats, layouts, symbolic shapes, graphs, printer,
parser and verifier. Imports nothing else of mxc."""

from .dtypes import BF16, BOOL, DTYPES, F16, F32, F64, I8, I32, I64, DType
from .formats import FloatFormat, IntFormat, Layout, NumberFormat, Scaling, parse_format, parse_layout
from .graph import DEVICE, DimRange, Graph, Node, Ref, RuntimeDevice, TorchConst, Value
from .ops import OPS, OpDef
from .parser import ParseError, parse, parse_attr
from .printer import format_attr, print_graph
from .types import Dim, TensorType, dims_equal, parse_expr, parse_type, sym
from .verifier import VerificationError, verify

__all__ = [
    "BF16", "BOOL", "DEVICE", "DTYPES", "F16", "F32", "F64", "I8", "I32", "I64",
    "Dim", "DimRange", "DType", "FloatFormat", "Graph", "IntFormat", "Layout", "Node",
    "NumberFormat", "OPS", "OpDef", "ParseError", "Ref", "RuntimeDevice", "Scaling",
    "TensorType", "TorchConst", "Value", "VerificationError", "dims_equal", "format_attr",
    "parse", "parse_attr", "parse_expr", "parse_format", "parse_layout", "parse_type",
    "print_graph", "sym", "verify",
]
