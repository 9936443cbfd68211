"""ONNX's own backend node tests (`onnx.backend.test`) for every op the ONNX frontend maps,
run through `MxcBackend` (import with the frontend, run with the reference backend).

Every node test of a mapped op is included, except variants whose tensors have element
types the IR has no dtype for (strings, 4-bit and 2-bit integers, float4, the FNUZ float8
kinds); the frontend refuses those with an error naming the type (tested below)."""

import os

import numpy as np
import onnx
import onnx.backend.test
import pytest

from mxc.frontends.onnx import OnnxImportError, load_onnx
from mxc.frontends.onnx.backend import MxcBackend

#: The node tests of the mapped ops (`mapping.MAPPED_OPS`), by test-name prefix.
MAPPED_TESTS = [
    "add", "sub", "mul", "div", "pow", "neg", "sqrt", "reciprocal", "erf", "exp", "log", "sigmoid", "abs", "sin",
    "cos", "tanh", "relu", "not", "isnan", "equal", "less", "less_equal", "greater", "greater_equal", "and", "or",
    "xor", "max", "min", "where", "identity", "softmax", "gelu", "layer_normalization", "cast", "reshape",
    "transpose", "slice", "concat", "unsqueeze", "squeeze", "expand", "gather", "matmul", "gemm", "range",
    "constantofshape", "cumsum", "reduce_mean", "shape", "size", "constant",
]
#: Other ops that share a prefix with a mapped one (e.g. `test_gather_elements_*` is GatherElements).
OTHER_OPS = r"(max_?pool|min_?pool|maxunpool|maxroipool|gather_?elements|gathernd|matmulinteger|expand_?dims|"
OTHER_OPS += r"constant_?pad|reduce_mean_?square|sinh|cosh|logsoftmax|castlike|softmax_cross|exp_?and|"
OTHER_OPS += r"log_?softmax|reciprocal_?sqrt|shape_?inference|sizes)"
#: Element types with no IR dtype, and optional/sequence values (the IR has tensors only): the
#: frontend refuses them (see `test_unsupported_dtype_is_refused`).
NO_IR_DTYPE = r"(identity_opt|identity_sequence|string|INT4|UINT4|INT2|UINT2|FLOAT4E2M1|FNUZ|FLOAT8E8M0|int4|uint4|float4|e8m0|fnuz|int2|uint2)"

backend_test = onnx.backend.test.BackendTest(MxcBackend, __name__)
for op in MAPPED_TESTS:
    backend_test.include(rf"^test_{op}(_.*)?_cpu$")
backend_test.exclude(rf"^test_{OTHER_OPS}")
backend_test.exclude(rf".*{NO_IR_DTYPE}.*")
#: Range's function body is a Loop (control flow), which the IR has no form for.
backend_test.exclude(r"^test_range_.*_expanded")

def _selected(cases: dict) -> dict:
    """The generated test classes with only the included tests (the runner would list every
    other ONNX test as skipped)."""
    for cls in cases.values():
        for name in [n for n in dir(cls) if n.startswith("test_")]:
            if getattr(getattr(cls, name), "__unittest_skip__", False):
                delattr(cls, name)
    return cases


globals().update(_selected(backend_test.test_cases))


def test_unsupported_dtype_is_refused():
    """A string tensor has no IR dtype: the import names the input and the type."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.STRING, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.BOOL, [2])
    node = onnx.helper.make_node("Equal", ["x", "x"], ["y"], name="eq0")
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y]))
    with pytest.raises(OnnxImportError, match="graph input 'x': element type STRING has no IR dtype"):
        load_onnx(model)
