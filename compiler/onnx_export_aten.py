"""The `torch` fallback nodes of the final IR as ONNX: one rule per aten target (`ATEN_OPS`).

A fallback node (`torch(%x) {target="aten.cumsum.default", args=[$0, 1]}`) is written by the
rule of its target, on its arguments with operands replaced by their ONNX names:

    aten.add.Tensor(x, 2.0, alpha=3)   ->  Add(x, Mul(2.0, 3))
    aten.index.Tensor(x, [i, j])       ->  GatherND(x, Concat([i, j] broadcast together, each Unsqueezed))
    aten.cumprod.default               ->  OnnxExportError naming the node and the mapped targets

`mxc.onnx_export` calls `torch_node` for every `torch` node; this module only uses the
exporter it is handed (`emit`, `const`, `shape`, `scalar`, `resolve`, `fail`, `onnx_type`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import sympy
from onnx import TensorProto, helper

from .ir import Node, Ref, RuntimeDevice, TorchConst

if TYPE_CHECKING:
    from .onnx_export import _Exporter

F = TensorProto.FLOAT
#: Slice's "to the end" bound.
INT64_MAX = int(np.iinfo(np.int64).max)


def torch_node(ex: "_Exporter", node: Node, ins: list[str]) -> Any:
    """Write a `torch` fallback node: the rule of its aten target in `ATEN_OPS` on its
    arguments (operands as ONNX names, sizes, constants); raises naming the target if none."""
    target = node.get("target")
    rule = ATEN_OPS.get(target)
    if rule is None:
        raise ex.fail(f"aten op {target!r} has no ONNX mapping; mapped aten ops: {', '.join(sorted(ATEN_OPS))}")
    if len(node.types) != 1:
        raise ex.fail(f"aten op {target!r} with {len(node.types)} results; expected one")

    def arg(v: Any) -> Any:  # a template argument: an operand's name, a size, a constant
        if isinstance(v, Ref):
            return ins[v.index]
        if isinstance(v, tuple):
            return [arg(x) for x in v]
        if isinstance(v, (RuntimeDevice, TorchConst)):
            return None
        return v

    args = [arg(a) for a in node.get("args")]
    kwargs = {k: arg(v) for k, v in (node.get("kwargs") or {}).items()}
    return rule(_Aten(ex, node, ins), args, kwargs)


class _Aten:
    """What an aten rule needs: the exporter, the node, its operands' IR types."""

    def __init__(self, ex: "_Exporter", node: Node, ins: list[str]):
        self.ex, self.node, self.ins = ex, node, ins
        self.out_type = ex.onnx_type(node.types[0].dtype)

    def type_of(self, name: Any) -> int | None:
        """The ONNX element type of operand `name` (None for a python scalar)."""
        if isinstance(name, str) and name in self.ins:
            return self.ex.onnx_type(self.ex.resolve(self.node.inputs[self.ins.index(name)]).type.dtype)
        return None

    def operand(self, a: Any, onnx_type: int) -> str:
        """An operand name, or a python / sympy scalar as a constant of `onnx_type`."""
        if isinstance(a, str):
            t = self.type_of(a)
            return a if t == onnx_type else self.ex.emit("Cast", [a], to=onnx_type)
        if isinstance(a, sympy.Expr) and not a.is_number:
            return self.ex.scalar(a, onnx_type)
        return self.ex.const(a, onnx_type, shape=())

    def to_out(self, name: str, onnx_type: int) -> str:
        return name if onnx_type == self.out_type else self.ex.emit("Cast", [name], to=self.out_type)


def _arith(op: str) -> Callable[[_Aten, list, dict], str]:
    def rule(a: _Aten, args: list, kwargs: dict) -> str:
        if kwargs.get("rounding_mode") is not None:
            raise a.ex.fail(f"{a.node.get('target')} with rounding_mode={kwargs['rounding_mode']!r}; "
                            "only true division is mapped")
        x, y = (a.operand(v, a.out_type) for v in args[:2])
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        if alpha != 1:
            y = a.ex.emit("Mul", [y, a.operand(alpha, a.out_type)])
        return a.ex.emit(op, [x, y])
    return rule


def _compare(op: str, negate: bool = False) -> Callable[[_Aten, list, dict], str]:
    def rule(a: _Aten, args: list, kwargs: dict) -> str:
        types = [a.type_of(v) for v in args[:2]]
        known = [t for t in types if t is not None]
        common = known[0] if len(set(known)) == 1 else F
        y = a.ex.emit(op, [a.operand(v, common) for v in args[:2]])
        return a.ex.emit("Not", [y]) if negate else y
    return rule


def _logical(op: str) -> Callable[[_Aten, list, dict], str]:
    def rule(a: _Aten, args: list, kwargs: dict) -> str:
        if a.out_type == TensorProto.BOOL:
            return a.ex.emit(op, [a.operand(v, TensorProto.BOOL) for v in args[:2]])
        return a.ex.emit("Bitwise" + op, [a.operand(v, a.out_type) for v in args[:2]])
    return rule


def _unary(op: str) -> Callable[[_Aten, list, dict], str]:
    return lambda a, args, kwargs: a.ex.emit(op, [args[0]])


def _not(a: _Aten, args: list, kwargs: dict) -> str:
    return a.ex.emit("Not" if a.out_type == TensorProto.BOOL else "BitwiseNot", [args[0]])


def _arange(a: _Aten, args: list, kwargs: dict) -> str:
    start, end, step = (0, args[0], 1) if len(args) == 1 else (args[0], args[1], args[2] if len(args) > 2 else 1)
    is_int = all(isinstance(v, (int, sympy.Expr)) or a.type_of(v) == TensorProto.INT64 for v in (start, end, step))
    t = TensorProto.INT64 if is_int else F
    r = a.ex.emit("Range", [a.operand(v, t) for v in (start, end, step)])
    return a.to_out(r, t)


def _cumsum(a: _Aten, args: list, kwargs: dict) -> str:
    x = a.operand(args[0], a.out_type)
    return a.ex.emit("CumSum", [x, a.ex.const(args[1], shape=())])


def _diff(a: _Aten, args: list, kwargs: dict) -> str:
    x, n, dim = args[0], args[1] if len(args) > 1 else 1, args[2] if len(args) > 2 else -1
    prepend = args[3] if len(args) > 3 else kwargs.get("prepend")
    append = args[4] if len(args) > 4 else kwargs.get("append")
    if n != 1:
        raise a.ex.fail(f"aten.diff with n={n}; only n=1 is mapped")
    parts = [p for p in (prepend, x, append) if p is not None]
    if any(not isinstance(p, str) for p in parts):
        raise a.ex.fail("aten.diff with a scalar prepend/append; expected tensors")
    full = a.ex.emit("Concat", parts, axis=dim) if len(parts) > 1 else x
    axis = a.ex.const([dim])
    later = a.ex.emit("Slice", [full, a.ex.const([1]), a.ex.const([INT64_MAX]), axis])
    earlier = a.ex.emit("Slice", [full, a.ex.const([0]), a.ex.const([-1]), axis])
    if a.out_type == TensorProto.BOOL:
        return a.ex.emit("Xor", [later, earlier])
    return a.ex.emit("Sub", [later, earlier])


def _filled(value: float) -> Callable[[_Aten, list, dict], str]:
    """new_ones / new_zeros (self, size) and ones / zeros (size): a constant of the node's dtype."""
    def rule(a: _Aten, args: list, kwargs: dict) -> str:
        size = args[1] if a.node.get("target").startswith("aten.new_") else args[0]
        fill = helper.make_tensor("fill", a.out_type, [1], np.array([value]).astype(
            helper.tensor_dtype_to_np_dtype(a.out_type)).tolist())
        return a.ex.emit("ConstantOfShape", [a.ex.shape(list(size))], value=fill)
    return rule


def _index(a: _Aten, args: list, kwargs: dict) -> str:
    """x[i0, i1, ...] with integer index tensors on the leading dims (broadcast together)."""
    x, indices = args[0], args[1]
    if any(not isinstance(i, str) for i in indices) or any(a.type_of(i) == TensorProto.BOOL for i in indices):
        raise a.ex.fail("aten.index.Tensor with None (slice) or boolean indices; expected integer index tensors")
    ex = a.ex
    if len(indices) == 1:
        return ex.emit("Gather", [x, indices[0]], axis=0)
    idx = [ex.emit("Cast", [i], to=TensorProto.INT64) if a.type_of(i) != TensorProto.INT64 else i for i in indices]
    zero = ex.const(0, shape=())
    zeros = ex.emit("Mul", [idx[0], zero])
    for i in idx[1:]:
        zeros = ex.emit("Add", [zeros, ex.emit("Mul", [i, zero])])  # the broadcast shape, all zeros
    cols = [ex.emit("Unsqueeze", [ex.emit("Add", [i, zeros]), ex.const([-1])]) for i in idx]
    return ex.emit("GatherND", [x, ex.emit("Concat", cols, axis=-1)])


def _gather(a: _Aten, args: list, kwargs: dict) -> str:
    """torch.gather(x, dim, index): out[..., j, ...] = x[..., index[..., j, ...], ...]. Written as
    GatherND with every other axis a batch axis (x cut to the index's extent there), not as
    GatherElements, whose reference implementation (np.choose) takes at most 64 positions."""
    ex, (x, dim, index) = a.ex, args[:3]
    rank = ex.resolve(a.node.inputs[a.ins.index(x)]).type.rank
    d = dim % rank
    keep = ex.const([i == d for i in range(rank)], TensorProto.BOOL, shape=(rank,))
    ends = ex.emit("Where", [keep, ex.const([INT64_MAX] * rank), ex.emit("Shape", [index])])
    x = ex.emit("Slice", [x, ex.const([0] * rank), ends])
    perm = [i for i in range(rank) if i != d] + [d]  # the gathered axis last
    if d != rank - 1:
        x, index = (ex.emit("Transpose", [t], perm=perm) for t in (x, index))
    index = ex.emit("Cast", [index], to=TensorProto.INT64)
    y = ex.emit("GatherND", [x, ex.emit("Unsqueeze", [index, ex.const([-1])])], batch_dims=rank - 1)
    return y if d == rank - 1 else ex.emit("Transpose", [y], perm=[perm.index(i) for i in range(rank)])


def _select(a: _Aten, args: list, kwargs: dict) -> str:
    return a.ex.emit("Gather", [args[0], a.operand(args[2], TensorProto.INT64)], axis=args[1])


def _to(a: _Aten, args: list, kwargs: dict) -> str:
    return a.ex.emit("Cast", [args[0]], to=a.out_type)


#: The aten targets of `torch` fallback nodes the exporter maps, and their rules.
ATEN_OPS: dict[str, Callable[[_Aten, list, dict], str]] = {
    "aten.arange.default": _arange, "aten.arange.start": _arange, "aten.arange.start_step": _arange,
    "aten.add.Tensor": _arith("Add"), "aten.add.Scalar": _arith("Add"),
    "aten.sub.Tensor": _arith("Sub"), "aten.sub.Scalar": _arith("Sub"),
    "aten.mul.Tensor": _arith("Mul"), "aten.mul.Scalar": _arith("Mul"),
    "aten.div.Tensor": _arith("Div"),
    "aten.eq.Tensor": _compare("Equal"), "aten.eq.Scalar": _compare("Equal"),
    "aten.ne.Tensor": _compare("Equal", negate=True), "aten.ne.Scalar": _compare("Equal", negate=True),
    "aten.lt.Tensor": _compare("Less"), "aten.lt.Scalar": _compare("Less"),
    "aten.le.Tensor": _compare("LessOrEqual"), "aten.le.Scalar": _compare("LessOrEqual"),
    "aten.gt.Tensor": _compare("Greater"), "aten.gt.Scalar": _compare("Greater"),
    "aten.ge.Tensor": _compare("GreaterOrEqual"), "aten.ge.Scalar": _compare("GreaterOrEqual"),
    "aten.__and__.Tensor": _logical("And"), "aten.bitwise_and.Tensor": _logical("And"),
    "aten.__or__.Tensor": _logical("Or"), "aten.bitwise_or.Tensor": _logical("Or"),
    "aten.logical_not.default": _unary("Not"), "aten.bitwise_not.default": _not,
    "aten.cos.default": _unary("Cos"), "aten.sin.default": _unary("Sin"), "aten.exp.default": _unary("Exp"),
    "aten.neg.default": _unary("Neg"), "aten.sqrt.default": _unary("Sqrt"), "aten.abs.default": _unary("Abs"),
    "aten.sigmoid.default": _unary("Sigmoid"), "aten.reciprocal.default": _unary("Reciprocal"),
    "aten.cumsum.default": _cumsum,
    "aten.diff.default": _diff,
    "aten.new_ones.default": _filled(1), "aten.new_zeros.default": _filled(0),
    "aten.ones.default": _filled(1), "aten.zeros.default": _filled(0),
    "aten.index.Tensor": _index,
    "aten.gather.default": _gather,
    "aten.select.int": _select,
    "aten._to_copy.default": _to, "aten.to.dtype": _to,
}
