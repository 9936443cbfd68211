"""The op set: what each op takes, which attributes it has, and the type it produces.

One `OpDef` per op. `infer` computes the output types from the input types and attributes
(raising `TypeError` with what was expected and what came); the verifier compares them with
the types a node declares. Ops whose result cannot be inferred (`const`, `input`, `torch`)
have `infer=None` and trust their declared types.

Ops, by inputs and attributes:

    input                                      {name, index}          a graph argument
    const                                      {name}                 a named weight
    linear(x[..., K], w[N, K], bias[N]?)                              x @ w.T + bias
    matmul(a, b)                                                      torch.matmul
    embedding(ids[...], w[V, D])                                      w[ids]
    rms_norm(x, w?)                            {eps}                  x * rsqrt(mean(x², -1) + eps) * w
    layer_norm(x, w?, b?)                      {eps}                  over the last dim
    add, mul(a, b)                                                    broadcasting
    silu, relu, tanh(x); gelu(x)               {approximate}
    softmax(x)                                 {axis}
    attention(q[b,H,s,d], k[b,Hkv,t,d], v[b,Hkv,t,e], mask?) {causal, scale}   GQA when Hkv < H;
                                               a boolean mask keeps True entries, a float mask is
                                               added to the scores; with causal both apply
    rope(x, cos, sin)                                                 x*cos + rotate_half(x)*sin
    cast(x)                                    {dtype}
    reshape(x) {shape}; transpose(x) {dim0, dim1}; permute(x) {dims}; unsqueeze(x) {axis}
    expand(x) {shape}; slice(x) {axis, start, end, step}; cat(x...) {axis}
    gather(x, index[n]) {axis}                 x.index_select(axis, index): channels picked (reordered)
    quantize(x) {format} -> (codes, scale[, zero][, global])   dynamic: scales computed at run time
    dequantize(codes, scale[, zero][, global]) {format, dtype}  the format's reference numerics;
                                               codes may be packed (a layout along their last axis)
    torch(x...)                                {target, args, kwargs} a PyTorch op, run as is
    onnx(x...)                                 {op_type, domain, opset, attributes, operands}
                                               an ONNX op the ONNX frontend could not map, run as is
                                               by `onnx.reference`; `operands[i]` is the operand that
                                               fills the op's input slot i (none: an omitted input)
    fused(x...) {kind, body} -> (y...)         a kernel group (the fuse pass): `body` is a region,
                                               a `Graph` whose arguments take the operands and whose
                                               outputs are the results; it holds no `const`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import sympy

from .dtypes import F32, DType
from .formats import FloatFormat, IntFormat, NumberFormat
from .graph import Graph
from .packing import check_layout
from .types import Dim, TensorType, dims_equal

#: An `end` at or above this means "to the end of the axis" (torch writes 2**63 - 1).
SLICE_END = 2**62

Infer = Callable[[list[TensorType], dict[str, Any]], list[TensorType]]


@dataclass(frozen=True)
class OpDef:
    """An op: input count range, attributes (name -> (python types, required)), type rule."""

    name: str
    min_inputs: int
    max_inputs: int | None
    attrs: dict[str, tuple[tuple[type, ...], bool]] = field(default_factory=dict)
    infer: Infer | None = None
    outputs: int | None = 1  # None: any number (declared by the node)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise TypeError(msg)


def _broadcast(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> tuple[Dim, ...]:
    out: list[Dim] = []
    for i in range(max(len(a), len(b))):
        x = a[len(a) - 1 - i] if i < len(a) else 1
        y = b[len(b) - 1 - i] if i < len(b) else 1
        if x == 1:
            out.append(y)
        elif y == 1 or dims_equal(x, y):
            out.append(x)
        else:
            raise TypeError(f"shapes {list(a)} and {list(b)} do not broadcast (dim {x} vs {y})")
    return tuple(reversed(out))


def _axis(axis: int, rank: int) -> int:
    _need(-rank <= axis < max(rank, 1), f"axis {axis} out of range for rank {rank}")
    return axis % rank if rank else 0


def _same_as_first(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    return [ins[0]]


def _binary(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    a, b = ins
    _need(a.dtype == b.dtype, f"operand dtypes differ: {a.dtype} and {b.dtype}")
    return [a.with_shape(_broadcast(a.shape, b.shape))]


def _linear(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, w = ins[0], ins[1]
    _need(w.rank == 2, f"weight must be rank 2 [N, K], got {w}")
    _need(x.rank >= 1 and dims_equal(x.shape[-1], w.shape[1]), f"input's last dim must be K={w.shape[1]}, got {x}")
    if len(ins) == 3:
        _need(ins[2].rank == 1 and dims_equal(ins[2].shape[0], w.shape[0]), f"bias must be [{w.shape[0]}], got {ins[2]}")
    return [x.with_shape((*x.shape[:-1], w.shape[0]))]


def _qlinear(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    """`qlinear(activation parts.., weight parts.. [, bias])`: a linear on quantized operands,
    scales applied in the epilogue (the parts of each format in `quant_parts` order)."""
    act, weight = attrs["act"], attrs["weight"]
    na, nw = len(quant_parts(act)), len(quant_parts(weight))
    _need(len(ins) in (na + nw, na + nw + 1), f"qlinear of {act} x {weight} takes {na} + {nw} operands (+ bias), got {len(ins)}")
    x, w = ins[0], ins[na]
    _need(x.dtype == act, f"activation codes must have type {act}, got {x}")
    _need(w.dtype == weight, f"weight codes must have type {weight}, got {w}")
    _need(x.layout is None, f"activation codes are computed at run time and never packed, got {x}")
    _check_packed(w, weight)
    _need(w.rank == 2 and x.rank >= 1 and dims_equal(x.shape[-1], w.shape[1]), f"activation [.., K] and weight [N, K] disagree: {x}, {w}")
    for fmt, parts, t in ((act, ins[:na], x), (weight, ins[na : na + nw], w)):
        for part, got, want in zip(quant_parts(fmt), parts, _quant_types(fmt, t.shape)):
            _need(got.rank == want.rank and all(dims_equal(a, b) for a, b in zip(got.shape, want.shape)), f"{part} of {fmt} must be {want}, got {got}")
    if len(ins) == na + nw + 1:
        _need(ins[-1].rank == 1 and dims_equal(ins[-1].shape[0], w.shape[0]), f"bias must be [{w.shape[0]}], got {ins[-1]}")
    grouped = [f.scaling.size for f in (act, weight) if f.scaling.kind in ("group", "block")]
    _need(len(set(grouped)) <= 1, f"activation and weight blocks must align: {act} x {weight}")
    return [TensorType((*x.shape[:-1], w.shape[0]), attrs["dtype"])]


def _matmul(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    a, b = ins
    _need(a.rank >= 2 and b.rank >= 2, f"matmul wants rank >= 2 operands, got {a} and {b}")
    _need(dims_equal(a.shape[-1], b.shape[-2]), f"contraction dims differ: {a} @ {b}")
    batch = _broadcast(a.shape[:-2], b.shape[:-2])
    return [a.with_shape((*batch, a.shape[-2], b.shape[-1]))]


def _embedding(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    ids, w = ins
    _need(isinstance(ids.dtype, DType) and ids.dtype.kind == "int", f"ids must be integers, got {ids}")
    _need(w.rank == 2, f"table must be rank 2 [V, D], got {w}")
    return [TensorType((*ids.shape, w.shape[1]), w.dtype)]


def _norm(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x = ins[0]
    for p in ins[1:]:
        _need(p.rank == 1 and dims_equal(p.shape[0], x.shape[-1]), f"norm parameter must be [{x.shape[-1]}], got {p}")
    return [x]


def _attention(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    q, k, v = ins[:3]
    _need(q.rank == k.rank == v.rank == 4, f"attention wants [b, heads, seq, dim] operands, got {q}, {k}, {v}")
    _need(dims_equal(q.shape[-1], k.shape[-1]), f"q and k head dims differ: {q} and {k}")
    _need(dims_equal(k.shape[2], v.shape[2]), f"k and v lengths differ: {k} and {v}")
    _need(dims_equal(k.shape[1], v.shape[1]), f"k and v head counts differ: {k} and {v}")
    hq, hk = q.shape[1], k.shape[1]
    if isinstance(hq, int) and isinstance(hk, int):
        _need(hq % hk == 0, f"query heads {hq} must be a multiple of key/value heads {hk}")
    return [q.with_shape((*q.shape[:-1], v.shape[-1]))]


def _rope(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, cos, sin = ins
    _broadcast(x.shape, cos.shape)
    _broadcast(x.shape, sin.shape)
    return [x]


def _cast(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    return [TensorType(ins[0].shape, attrs["dtype"])]


def _reshape(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, shape = ins[0], list(attrs["shape"])
    if -1 in shape:
        i = shape.index(-1)
        known = sympy.Mul(*[d for d in shape if d != -1])
        shape[i] = sympy.simplify(sympy.Mul(*x.shape) / known)
    _need(dims_equal(sympy.Mul(*x.shape), sympy.Mul(*shape)), f"cannot reshape {x} to {shape}")
    return [x.with_shape(tuple(shape))]


def _transpose(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x = ins[0]
    shape = list(x.shape)
    a, b = _axis(attrs["dim0"], x.rank), _axis(attrs["dim1"], x.rank)
    shape[a], shape[b] = shape[b], shape[a]
    return [x.with_shape(tuple(shape))]


def _permute(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, dims = ins[0], [_axis(d, ins[0].rank) for d in attrs["dims"]]
    _need(sorted(dims) == list(range(x.rank)), f"dims {list(attrs['dims'])} are not a permutation of rank {x.rank}")
    return [x.with_shape(tuple(x.shape[d] for d in dims))]


def _unsqueeze(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x = ins[0]
    axis = _axis(attrs["axis"], x.rank + 1)
    return [x.with_shape((*x.shape[:axis], 1, *x.shape[axis:]))]


def _expand(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, shape = ins[0], list(attrs["shape"])
    _need(len(shape) >= x.rank, f"cannot expand {x} to fewer dims {shape}")
    lead = len(shape) - x.rank
    out = [x.shape[i - lead] if d == -1 else d for i, d in enumerate(shape)]
    for i, d in enumerate(x.shape):
        _need(d == 1 or dims_equal(d, out[lead + i]), f"cannot expand {x} to {shape}")
    return [x.with_shape(tuple(out))]


def _slice(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x = ins[0]
    axis = _axis(attrs["axis"], x.rank)
    n = sympy.sympify(x.shape[axis])
    start, end, step = (sympy.sympify(attrs[k]) for k in ("start", "end", "step"))
    if end.is_Integer and end >= SLICE_END:  # torch's "to the end" sentinel
        end = n
    start = sympy.Max(0, sympy.Min(n, start + n if start.is_negative else start))
    end = sympy.Max(0, sympy.Min(n, end + n if end.is_negative else end))
    size = sympy.simplify(sympy.Max(0, sympy.ceiling((end - start) / step)))
    shape = list(x.shape)
    shape[axis] = size
    return [x.with_shape(tuple(shape))]


def _cat(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    first = ins[0]
    axis = _axis(attrs["axis"], first.rank)
    for t in ins[1:]:
        _need(t.rank == first.rank and t.dtype == first.dtype, f"cat operands differ: {first} and {t}")
        for i in range(t.rank):
            _need(i == axis or dims_equal(t.shape[i], first.shape[i]), f"cat operands differ off axis {axis}: {first} and {t}")
    shape = list(first.shape)
    shape[axis] = sympy.sympify(sum(sympy.sympify(t.shape[axis]) for t in ins))
    return [first.with_shape(tuple(shape))]


def _gather(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    x, index = ins
    axis = _axis(attrs["axis"], x.rank)
    _need(index.rank == 1 and isinstance(index.dtype, DType) and index.dtype.kind == "int",
          f"gather's index must be a rank-1 integer tensor, got {index}")
    shape = list(x.shape)
    shape[axis] = index.shape[0]
    return [x.with_shape(tuple(shape))]


def quant_parts(fmt: NumberFormat) -> tuple[str, ...]:
    """The tensors a quantized value is made of, in operand/result order: codes, the block
    scales, the zero points of asymmetric integers, the global scale of two-level formats."""
    parts = ("codes", "scale")
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        parts += ("zero",)
    if isinstance(fmt, FloatFormat) and fmt.global_:
        parts += ("global",)
    return parts


def scale_shape(fmt: NumberFormat, shape: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """The shape of `fmt`'s block scales for a tensor of `shape` (blocks along the last axis)."""
    block = fmt.scaling.block(shape[-1]) if shape else None
    if block is None:
        return (1, 1)  # one scale for the whole tensor
    return (*shape[:-1], sympy.ceiling(sympy.sympify(shape[-1]) / block))


def _quant_types(fmt: NumberFormat, shape: tuple[Dim, ...]) -> list[TensorType]:
    sshape = scale_shape(fmt, shape)
    types = {"codes": TensorType(shape, fmt), "scale": TensorType(sshape, F32), "zero": TensorType(sshape, F32),
             "global": TensorType((1,), F32)}  # noqa: E501
    return [types[p] for p in quant_parts(fmt)]


def _quantize(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    fmt, x = attrs["format"], ins[0]
    _need(isinstance(fmt, (IntFormat, FloatFormat)), f"format must be a number format, got {fmt!r}")
    _need(isinstance(x.dtype, DType) and x.dtype.is_float, f"quantize reads a float tensor, got {x}")
    out = _quant_types(fmt, x.shape)
    if len(ins) > 1:  # static: the scales (zero points, global scale) are operands, not computed
        parts = quant_parts(fmt)[1:]
        _need(len(ins) == 1 + len(parts), f"static {fmt} quantize takes x and {', '.join(parts)}: {1 + len(parts)} operands, got {len(ins)}")
        for part, t, w in zip(parts, ins[1:], out[1:]):
            _need(t.rank == w.rank and all(dims_equal(a, b) for a, b in zip(t.shape, w.shape)), f"{part} must be {w}, got {t}")
    return out


def _check_packed(codes: TensorType, fmt: NumberFormat) -> None:
    """Packed codes (the layout pass) must be int32 words of `fmt`'s width along the last
    (reduction) axis, in a layout legal for their shape; unpacked codes pass."""
    if codes.layout is None:
        return
    lay = codes.layout
    _need(lay.bits == fmt.bits, f"packed codes of {fmt} must have layout bits={fmt.bits}, got {codes}")
    _need(codes.rank >= 1 and lay.axis % codes.rank == codes.rank - 1,
          f"packed codes must be packed along their last (reduction) axis {codes.rank - 1}, got {codes}")
    _need((problem := check_layout(lay, codes.shape)) is None, str(problem))


def _dequantize(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    fmt, codes = attrs["format"], ins[0]
    _need(codes.dtype == fmt, f"codes must have type {fmt}, got {codes}")
    _check_packed(codes, fmt)
    want = _quant_types(fmt, codes.shape)
    _need(len(ins) == len(want), f"{fmt} is dequantized from {', '.join(quant_parts(fmt))}: {len(want)} operands, got {len(ins)}")
    for part, t, w in zip(quant_parts(fmt), ins, want):
        _need(t.rank == w.rank and all(dims_equal(a, b) for a, b in zip(t.shape, w.shape)), f"{part} must be {w}, got {t}")
    return [TensorType(codes.shape, attrs["dtype"])]


def _fused(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    body = attrs["body"]
    _need(len(ins) == len(body.inputs), f"the region takes {len(body.inputs)} arguments, got {len(ins)} operands")
    for i, (t, arg) in enumerate(zip(ins, body.inputs)):
        a = arg.types[0]
        same = t.dtype == a.dtype and t.layout == a.layout and t.rank == a.rank
        same = same and all(dims_equal(x, y) for x, y in zip(t.shape, a.shape))
        _need(same, f"operand {i} is {t}, region argument {i} is {a}")
    return [v.type for v in body.outputs]


def _softmax(ins: list[TensorType], attrs: dict) -> list[TensorType]:
    _axis(attrs["axis"], ins[0].rank)
    return [ins[0]]


_INT = (int,)
_NUM = (int, float)
_DIMS = (tuple,)
_DIM = (int, sympy.Expr)

OPS: dict[str, OpDef] = {
    op.name: op
    for op in [
        OpDef("input", 0, 0, {"name": ((str,), True), "index": (_INT, True)}),
        OpDef("const", 0, 0, {"name": ((str,), True)}),
        OpDef("linear", 2, 3, infer=_linear),
        OpDef("matmul", 2, 2, infer=_matmul),
        OpDef(
            "qlinear", 4, 9,
            {"act": ((IntFormat, FloatFormat), True), "weight": ((IntFormat, FloatFormat), True), "dtype": ((DType,), True)},
            _qlinear,
        ),
        OpDef("embedding", 2, 2, infer=_embedding),
        OpDef("rms_norm", 1, 2, {"eps": (_NUM, True)}, _norm),
        OpDef("layer_norm", 1, 3, {"eps": (_NUM, True)}, _norm),
        OpDef("add", 2, 2, infer=_binary),
        OpDef("mul", 2, 2, infer=_binary),
        OpDef("silu", 1, 1, infer=_same_as_first),
        OpDef("relu", 1, 1, infer=_same_as_first),
        OpDef("tanh", 1, 1, infer=_same_as_first),
        OpDef("gelu", 1, 1, {"approximate": ((str,), True)}, _same_as_first),
        OpDef("softmax", 1, 1, {"axis": (_INT, True)}, _softmax),
        OpDef("attention", 3, 4, {"causal": ((bool,), True), "scale": ((float, type(None)), True)}, _attention),
        OpDef("rope", 3, 3, infer=_rope),
        OpDef("cast", 1, 1, {"dtype": ((DType,), True)}, _cast),
        OpDef("reshape", 1, 1, {"shape": (_DIMS, True)}, _reshape),
        OpDef("transpose", 1, 1, {"dim0": (_INT, True), "dim1": (_INT, True)}, _transpose),
        OpDef("permute", 1, 1, {"dims": (_DIMS, True)}, _permute),
        OpDef("unsqueeze", 1, 1, {"axis": (_INT, True)}, _unsqueeze),
        OpDef("expand", 1, 1, {"shape": (_DIMS, True)}, _expand),
        OpDef("slice", 1, 1, {k: (_DIM, True) for k in ("axis", "start", "end", "step")}, _slice),
        OpDef("cat", 1, None, {"axis": (_INT, True)}, _cat),
        OpDef("gather", 2, 2, {"axis": (_INT, True)}, _gather),
        OpDef("quantize", 1, 4, {"format": ((IntFormat, FloatFormat), True)}, _quantize, outputs=None),
        OpDef("dequantize", 2, 4, {"format": ((IntFormat, FloatFormat), True), "dtype": ((DType,), True)}, _dequantize),
        OpDef("fused", 0, None, {"kind": ((str,), True), "body": ((Graph,), True)}, _fused, outputs=None),
        OpDef(
            "torch",
            0,
            None,
            {"target": ((str,), True), "args": ((tuple,), True), "kwargs": ((dict,), False)},
            outputs=None,
        ),
        OpDef(
            "onnx",
            0,
            None,
            {"op_type": ((str,), True), "domain": ((str,), True), "opset": (_INT, True),
             "attributes": ((dict,), True), "operands": ((tuple,), True)},
            outputs=None,
        ),
    ]
}

#: Ops that compute nothing but rearrange or view their input.
SHAPE_OPS = frozenset({"reshape", "transpose", "permute", "unsqueeze", "expand", "slice", "cat", "gather"})
