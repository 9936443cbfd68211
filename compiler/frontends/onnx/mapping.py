"""One rule per ONNX op: the IR a node becomes (an op of the op set, or a `torch` node
calling the equivalent aten op, which the torch route would have produced for the same
model). A rule returns the node's results, or None for a variant it does not cover (the
node then becomes an `onnx` fallback node, run by `onnx.reference`).

    MatMul(x, val_152: f32[72, 24])  ->  linear(%x, %w) with w = const "{path}.weight" : f32[24, 72]
    Pow(x, 2.0)                      ->  torch(%x) {target="aten.pow.Tensor_Scalar", args=[$0, 2.0]}
    Reshape(x, Concat(Shape(x)[0:2], [-1, 12]))  ->  reshape(%x) {shape=[b, s, -1, 12]}

Compound patterns (linear + bias, 1/sqrt, SiLU, GELU, decomposed attention) are matched
first by `patterns.PATTERNS`; RMSNorm and rotary embeddings are left to the `canonicalize`
pass, which recognises them in the torch-node form these rules produce.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx
import sympy

from ...ir import DEVICE, DTYPES, Ref, TensorType, Value
from ...ir.ops import SLICE_END
from .fold import fold
from .importer import Importer, OnnxImportError, module_path
from .values import Static, ir_dtype

Rule = Callable[[Importer, onnx.NodeProto, list, dict], "list | None"]
#: dtypes torch holds but has (almost) no kernels for: ops on them run as `onnx` fallbacks.
NO_KERNELS = {"u16", "u32", "u64"}


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode("utf-8") if isinstance(v, bytes) else v
    return out


def _dtype(e: Any):
    return e.type.dtype if isinstance(e, Value) else e.dtype


def scalar(e: Any, other: Value) -> Any:
    """`e` as a Python number (or size expression) to pass inline next to tensor `other`:
    a one-element Static of `other`'s dtype whose rank does not widen the result; else None."""
    if not isinstance(e, Static) or e.array.size != 1 or e.array.ndim > other.type.rank or e.dtype != other.type.dtype:
        return None
    v = e.scalar()
    if isinstance(v, float) and e.dtype.bits < 64:
        return float(str(np.float32(v)))  # the shortest decimal that is this float32 (1e-06, not 9.99e-07)
    if isinstance(v, (int, bool, float, sympy.Expr)):
        return v
    return None


def _torch_out(imp: Importer, node, entries, target, inputs, args, kwargs=None):
    types = imp.infer(node, entries)
    out = imp.emit_torch(target, inputs, args, types, module_path(node), kwargs)
    return list(out) if isinstance(out, tuple) else [out]


def unary(target: str) -> Rule:
    def rule(imp, node, e, a):
        x = imp.value(e[0])
        return _torch_out(imp, node, e, target, [x], (Ref(0),))

    return rule


def ir_unary(op: str, float_only: bool = True) -> Rule:
    def rule(imp, node, e, a):
        x = imp.value(e[0])
        if float_only and not x.type.dtype.is_float:
            return None
        return [imp.emit_ir(op, [x], {}, module_path(node))]

    return rule


def binary(target: str, ir_op: str | None = None, scalar_target: str | None = None,
           rtarget: str | None = None) -> Rule:
    """A broadcasting binary op: an IR op on two tensors of one dtype; `scalar_target` with a
    scalar inline (`[$0, c]`; `rtarget` for `c op x` where the op does not commute), or
    `target` on two tensors otherwise."""

    def rule(imp, node, e, a):
        x, y = e
        if scalar_target and isinstance(x, Value) and (c := scalar(y, x)) is not None:
            return _torch_out(imp, node, e, scalar_target, [x], (Ref(0), c))
        if scalar_target and isinstance(y, Value) and (c := scalar(x, y)) is not None and (ir_op or rtarget):
            return _torch_out(imp, node, e, rtarget or scalar_target, [y], (Ref(0), c))
        xv, yv = imp.value(x, node.input[0]), imp.value(y, node.input[1])
        if ir_op and xv.type.dtype == yv.type.dtype:
            return [imp.emit_ir(ir_op, [xv, yv], {}, module_path(node))]
        return _torch_out(imp, node, e, target, [xv, yv], (Ref(0), Ref(1)))

    return rule


def _pow(imp, node, e, a):
    x, y = e
    if isinstance(x, Value) and isinstance(y, Static) and y.array.size == 1 and y.array.ndim <= x.type.rank:
        if x.type.dtype.is_float or y.dtype == x.type.dtype:
            c = y.scalar()
            c = float(str(np.float32(c))) if isinstance(c, float) and y.dtype.bits < 64 else c
            return _torch_out(imp, node, e, "aten.pow.Tensor_Scalar", [x], (Ref(0), c))
    xv, yv = imp.value(x), imp.value(y)
    if xv.type.dtype.is_float or xv.type.dtype == yv.type.dtype:
        return _torch_out(imp, node, e, "aten.pow.Tensor_Tensor", [xv, yv], (Ref(0), Ref(1)))
    return None


def _variadic(target: str) -> Rule:
    def rule(imp, node, e, a):
        vals = [imp.value(x) for x in e]
        if len(vals) == 1:
            return [vals[0]]
        if len(vals) != 2 or vals[0].type.dtype != vals[1].type.dtype:
            return None
        return _torch_out(imp, node, e, target, vals, (Ref(0), Ref(1)))

    return rule


def _where(imp, node, e, a):
    vals = [imp.value(x, n) for x, n in zip(e, node.input)]
    return _torch_out(imp, node, e, "aten.where.self", vals, (Ref(0), Ref(1), Ref(2)))


def _softmax(imp, node, e, a):
    x = imp.value(e[0])
    if imp.opset < 13 or not x.type.dtype.is_float:
        return None  # opset < 13 flattens to 2-D first: another function
    return [imp.emit_ir("softmax", [x], {"axis": a.get("axis", -1)}, module_path(node))]


def _gelu(imp, node, e, a):
    x = imp.value(e[0])
    return [imp.emit_ir("gelu", [x], {"approximate": a.get("approximate", "none")}, module_path(node))]


def _layer_norm(imp, node, e, a):
    x = imp.value(e[0])
    axis = a.get("axis", -1) % x.type.rank
    loc = module_path(node)
    params = []
    for role, p, n in zip(("weight", "bias"), e[1:], node.input[1:]):
        if p is None:
            continue
        params.append(imp.const(p, imp.weight_name(p, loc, role, n)) if isinstance(p, Static) and not p.symbolic
                      else imp.value(p, n))
    used = [o for o in node.output[1:] if o and imp.uses.get(o)]
    if axis == x.type.rank - 1 and not used and all(p.type.rank == 1 for p in params) and x.type.dtype.is_float:
        if len(params) == 2 or len(e) < 3 or e[2] is None:
            return [imp.emit_ir("layer_norm", [x, *params], {"eps": float(a.get("epsilon", 1e-5))}, loc)]
    if len(params) != 2 or not x.type.dtype.is_float or a.get("stash_type", 1) != 1 or x.type.dtype.name != "f32":
        return None
    norm_shape = tuple(x.type.shape[axis:])
    lead = tuple(x.type.shape[:axis]) + (1,) * len(norm_shape)
    types = [x.type, x.type.with_shape(lead), x.type.with_shape(lead)]
    outs = imp.emit_torch("aten.native_layer_norm.default", [x, *params],
                          (Ref(0), norm_shape, Ref(1), Ref(2), float(a.get("epsilon", 1e-5))), types, loc)
    return list(outs)[: len(node.output)]


def _cast(imp, node, e, a):
    x = imp.value(e[0])
    to = ir_dtype(a["to"], f"Cast {node.name!r} to")
    if a.get("saturate", 1) != 1 or to.name.startswith("f8") or x.type.dtype.name.startswith("f8"):
        return None  # float8 rounding/saturation rules differ from torch's .to()
    if to.name in NO_KERNELS or x.type.dtype.name in NO_KERNELS:
        return None
    return [imp.emit_ir("cast", [x], {"dtype": to}, module_path(node))]


def _reshape(imp, node, e, a):
    x = imp.value(e[0])
    if not isinstance(e[1], Static):
        return None
    shape = list(e[1].dims())
    if not a.get("allowzero", 0):
        shape = [x.type.shape[i] if isinstance(d, int) and d == 0 else d for i, d in enumerate(shape)]
    return [imp.emit_ir("reshape", [x], {"shape": tuple(shape)}, module_path(node))]


def _transpose(imp, node, e, a):
    x = imp.value(e[0])
    perm = list(a.get("perm", list(range(x.type.rank))[::-1]))
    moved = [i for i, p in enumerate(perm) if i != p]
    if not moved:
        return [x]
    if len(moved) == 2:
        return [imp.emit_ir("transpose", [x], {"dim0": moved[0], "dim1": moved[1]}, module_path(node))]
    return [imp.emit_ir("permute", [x], {"dims": tuple(perm)}, module_path(node))]


def _slice(imp, node, e, a):
    x = imp.value(e[0])
    if any(not isinstance(p, Static) for p, n in zip(e[1:], node.input[1:]) if n):
        return None
    starts, ends = e[1].dims(), e[2].dims()
    axes = e[3].dims() if len(e) > 3 and e[3] is not None else tuple(range(len(starts)))
    steps = e[4].dims() if len(e) > 4 and e[4] is not None else (1,) * len(starts)
    if any(not isinstance(s, int) or s <= 0 for s in steps):
        return None  # negative steps: aten.slice has none
    out = x
    for s, end, ax, st in zip(starts, ends, axes, steps):
        ax = ax % x.type.rank
        end = SLICE_END if isinstance(end, int) and end >= SLICE_END else end
        start = -SLICE_END if isinstance(s, int) and s <= -SLICE_END else s
        end = -SLICE_END if isinstance(end, int) and end <= -SLICE_END else end
        out = imp.emit_ir("slice", [out], {"axis": ax, "start": start, "end": end, "step": st}, module_path(node))
    return [out]


def _concat(imp, node, e, a):
    vals = [imp.value(x, n) for x, n in zip(e, node.input)]
    return [imp.emit_ir("cat", vals, {"axis": a["axis"]}, module_path(node))]


def _unsqueeze(imp, node, e, a):
    x = imp.value(e[0])
    axes = e[1].dims() if len(e) > 1 and isinstance(e[1], Static) else a.get("axes")
    if axes is None:
        return None
    rank = x.type.rank + len(axes)
    out = x
    for ax in sorted(int(d) % rank for d in axes):
        out = imp.emit_ir("unsqueeze", [out], {"axis": ax}, module_path(node))
    return [out]


def _squeeze(imp, node, e, a):
    x = imp.value(e[0])
    axes = e[1].dims() if len(e) > 1 and isinstance(e[1], Static) else a.get("axes")
    if axes is None:
        return _torch_out(imp, node, e, "aten.squeeze.default", [x], (Ref(0),))
    return _torch_out(imp, node, e, "aten.squeeze.dims", [x], (Ref(0), tuple(int(d) for d in axes)))


def _expand(imp, node, e, a):
    x = imp.value(e[0])
    if not isinstance(e[1], Static):
        return None
    want = list(e[1].dims())
    rank = max(len(want), x.type.rank)
    have = [1] * (rank - x.type.rank) + list(x.type.shape)
    want = [1] * (rank - len(want)) + want
    shape = tuple(w if (isinstance(h, int) and h == 1) else h for h, w in zip(have, want))
    if rank > x.type.rank:
        out = imp.emit_ir("reshape", [x], {"shape": tuple(have)}, module_path(node)) if x.type.rank else x
        if not x.type.rank:
            for _ in range(rank):
                out = imp.emit_ir("unsqueeze", [out], {"axis": 0}, module_path(node))
        x = out
    return [imp.emit_ir("expand", [x], {"shape": shape}, module_path(node))]


def _gather(imp, node, e, a):
    data, idx = e
    axis = a.get("axis", 0)
    loc = module_path(node)
    if isinstance(data, Static) and isinstance(idx, Value) and data.array.ndim == 2 and axis == 0 \
            and not data.symbolic and idx.type.dtype.kind == "int":
        w = imp.const(data, imp.weight_name(data, loc, "weight", node.input[0]))
        return [imp.emit_ir("embedding", [idx, w], {}, loc)]
    x = imp.value(data, node.input[0])
    axis %= x.type.rank
    if isinstance(idx, Static) and idx.array.ndim == 0 and not idx.symbolic:
        return _torch_out(imp, node, e, "aten.select.int", [x], (Ref(0), axis, int(idx.scalar())))
    iv = imp.value(idx, node.input[1])
    return _torch_out(imp, node, e, "aten.index.Tensor", [x, iv], (Ref(0), (None,) * axis + (Ref(1),)))


def _matmul(imp, node, e, a):
    from .patterns import linear_weight

    x = e[0]
    w = linear_weight(imp, node, e)
    if w is not None and isinstance(x, Value) and x.type.rank >= 1:
        return [imp.emit_ir("linear", [x, w], {}, module_path(node))]
    xv, yv = imp.value(x, node.input[0]), imp.value(e[1], node.input[1])
    if xv.type.rank >= 2 and yv.type.rank >= 2:
        return [imp.emit_ir("matmul", [xv, yv], {}, module_path(node))]
    return _torch_out(imp, node, e, "aten.matmul.default", [xv, yv], (Ref(0), Ref(1)))


def _gemm(imp, node, e, a):
    from .patterns import linear_weight

    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    ta, tb = a.get("transA", 0), a.get("transB", 0)
    loc = module_path(node)
    w = linear_weight(imp, node, e, transposed=bool(tb))
    c = e[2] if len(e) > 2 else None
    if w is not None and not ta and alpha == 1.0 and beta == 1.0 and isinstance(e[0], Value):
        bias = None
        if isinstance(c, Static) and c.array.ndim == 1 and c.array.shape[0] == w.type.shape[0] and not c.symbolic:
            bias = imp.const(c, imp.weight_name(c, loc, "bias", node.input[2]))
        if c is None or bias is not None:
            return [imp.emit_ir("linear", [e[0], w] + ([bias] if bias is not None else []), {}, loc)]
    av, bv = imp.value(e[0], node.input[0]), imp.value(e[1], node.input[1])
    if ta:
        av = imp.emit_ir("transpose", [av], {"dim0": 0, "dim1": 1}, loc)
    if tb:
        bv = imp.emit_ir("transpose", [bv], {"dim0": 0, "dim1": 1}, loc)
    out = imp.emit_ir("matmul", [av, bv], {}, loc)
    if alpha != 1.0:
        out = imp.emit_torch("aten.mul.Tensor", [out], (Ref(0), float(alpha)), out.type, loc)
    if c is not None:
        cv = imp.value(c, node.input[2])
        out_t = out.type
        out = imp.emit_torch("aten.add.Tensor", [out, cv], (Ref(0), Ref(1)), out_t, loc,
                             {"alpha": float(beta)} if beta != 1.0 else None)
    return [out]


def _range(imp, node, e, a):
    start, limit, delta = (x.scalar() if isinstance(x, Static) else None for x in e)
    if None in (start, limit, delta) or not all(isinstance(x, Static) for x in e):
        return None
    dtype = e[0].dtype
    if dtype.is_float:
        return None
    n = sympy.Max(sympy.ceiling((sympy.sympify(limit) - start) / delta), 0)
    n = int(n) if n.is_Integer else sympy.ceiling((sympy.sympify(limit) - start) / delta)
    return [imp.emit_torch("aten.arange.start_step", [], (start, limit, delta), TensorType((n,), dtype),
                           module_path(node), {"dtype": dtype, "device": DEVICE})]


def _constant_of_shape(imp, node, e, a):
    if not isinstance(e[0], Static):
        return None
    value = a.get("value")
    arr = onnx.numpy_helper.to_array(value) if value is not None else None
    dtype = ir_dtype(value.data_type, "ConstantOfShape value") if value is not None else DTYPES["f32"]
    fill = arr.reshape(-1)[0].item() if arr is not None else 0.0
    shape = e[0].dims()
    return [imp.emit_torch("aten.full.default", [], (shape, fill), TensorType(shape, dtype), module_path(node),
                           {"dtype": dtype, "device": DEVICE})]


def _cumsum(imp, node, e, a):
    x = imp.value(e[0])
    if a.get("exclusive", 0) or a.get("reverse", 0) or not isinstance(e[1], Static):
        return None
    return _torch_out(imp, node, e, "aten.cumsum.default", [x], (Ref(0), int(e[1].scalar())),
                      {"dtype": x.type.dtype})


def _reduce_mean(imp, node, e, a):
    x = imp.value(e[0])
    if not x.type.dtype.is_float:
        return None
    if len(e) > 1 and e[1] is not None:
        if not isinstance(e[1], Static):
            return None
        axes = e[1].dims()
    else:
        axes = a.get("axes")
    if not axes:
        if a.get("noop_with_empty_axes", 0):
            return [x]
        axes = tuple(range(x.type.rank))
    keep = bool(a.get("keepdims", 1))
    return _torch_out(imp, node, e, "aten.mean.dim", [x], (Ref(0), tuple(int(d) for d in axes), keep))


def _identity(imp, node, e, a):
    return [e[0]]


RULES: dict[str, Rule] = {
    "Add": binary("aten.add.Tensor", "add", "aten.add.Tensor"),
    "Mul": binary("aten.mul.Tensor", "mul", "aten.mul.Tensor"),
    "Sub": binary("aten.sub.Tensor", None, "aten.sub.Tensor", "aten.rsub.Scalar"),
    "Div": binary("aten.div.Tensor", None, "aten.div.Tensor"),
    "Pow": _pow,
    "Equal": binary("aten.eq.Tensor", None, "aten.eq.Scalar", "aten.eq.Scalar"),
    "Less": binary("aten.lt.Tensor", None, "aten.lt.Scalar", "aten.gt.Scalar"),
    "LessOrEqual": binary("aten.le.Tensor", None, "aten.le.Scalar", "aten.ge.Scalar"),
    "Greater": binary("aten.gt.Tensor", None, "aten.gt.Scalar", "aten.lt.Scalar"),
    "GreaterOrEqual": binary("aten.ge.Tensor", None, "aten.ge.Scalar", "aten.le.Scalar"),
    "And": binary("aten.logical_and.default"),
    "Or": binary("aten.logical_or.default"),
    "Xor": binary("aten.logical_xor.default"),
    "Max": _variadic("aten.maximum.default"),
    "Min": _variadic("aten.minimum.default"),
    "Where": _where,
    "Neg": unary("aten.neg.default"),
    "Sqrt": unary("aten.sqrt.default"),
    "Reciprocal": unary("aten.reciprocal.default"),
    "Erf": unary("aten.erf.default"),
    "Exp": unary("aten.exp.default"),
    "Log": unary("aten.log.default"),
    "Sigmoid": unary("aten.sigmoid.default"),
    "Abs": unary("aten.abs.default"),
    "Sin": unary("aten.sin.default"),
    "Cos": unary("aten.cos.default"),
    "Not": unary("aten.logical_not.default"),
    "IsNaN": unary("aten.isnan.default"),
    "Tanh": ir_unary("tanh"),
    "Relu": ir_unary("relu"),
    "Identity": _identity,
    "Softmax": _softmax,
    "Gelu": _gelu,
    "LayerNormalization": _layer_norm,
    "Cast": _cast,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Slice": _slice,
    "Concat": _concat,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Expand": _expand,
    "Gather": _gather,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Range": _range,
    "ConstantOfShape": _constant_of_shape,
    "CumSum": _cumsum,
    "ReduceMean": _reduce_mean,
}
#: Ops whose rule only moves data: they run on every dtype torch holds.
_LAYOUT_OPS = {"Reshape", "Transpose", "Slice", "Concat", "Unsqueeze", "Squeeze", "Expand", "Identity"}


def _integer_division(imp, node, e, a):
    x, y = e
    if _dtype(x).is_float:
        return None
    xv = imp.value(x, node.input[0])
    if isinstance(y, Static) and (c := scalar(y, xv)) is not None:
        return _torch_out(imp, node, e, "aten.div.Tensor_mode", [xv], (Ref(0), c), {"rounding_mode": "trunc"})
    yv = imp.value(y, node.input[1])
    return _torch_out(imp, node, e, "aten.div.Tensor_mode", [xv, yv], (Ref(0), Ref(1)), {"rounding_mode": "trunc"})


def map_node(imp: Importer, node: onnx.NodeProto, entries: list) -> list:
    """The results of `node` (IR values or Statics): folded, matched by a pattern, mapped by
    its rule, or else an `onnx` fallback node."""
    from .patterns import PATTERNS

    attrs = attributes(node)
    domain = node.domain if node.domain != "ai.onnx" else ""
    if domain == "":
        folded = fold(node, entries, attrs, imp.model.opset_import)
        if folded is not None:
            return folded
        for pattern in PATTERNS.get(node.op_type, ()):
            got = pattern(imp, node, entries, attrs)
            if got is not None:
                return got
        rule = RULES.get(node.op_type)
        dtypes = {_dtype(x).name for x in entries if x is not None}
        if rule is not None and (node.op_type in _LAYOUT_OPS or not dtypes & NO_KERNELS):
            if node.op_type == "Div":
                got = _integer_division(imp, node, entries, attrs)
                if got is not None:
                    return got
            got = rule(imp, node, entries, attrs)
            if got is not None:
                return got
    if any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute):
        raise OnnxImportError(f"{describe_node(node)} has a subgraph (control flow); mxc imports graphs without "
                              "If/Loop/Scan")
    return imp.fallback(node, entries)


def describe_node(node: onnx.NodeProto) -> str:
    from .importer import describe

    return describe(node)


#: The ONNX ops the frontend maps (the README lists them; conformance covers them).
MAPPED_OPS = sorted(set(RULES) | {"Shape", "Size", "Constant"})
