"""Compound patterns matched on the ONNX graph before a node's own rule runs.

A pattern is tried at the node that ends it (its root) and looks back through producers
(`Importer.prod`); every inner value must have one use, so nothing else needs it. The inner
nodes were already imported on their own; they become dead and are dropped.

    Add(MatMul(x, W), b)                                  -> linear(x, W^T, b)
    Reciprocal(Sqrt(y))                                   -> torch aten.rsqrt (RMSNorm, for canonicalize)
    Mul(x, Sigmoid(x))                                    -> silu(x)
    x * 0.5 * (1 + Erf(x / sqrt 2)), any association      -> gelu(x) {approximate="none"}
    x * 0.5 * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))  -> gelu(x) {approximate="tanh"}
      (what the exporter writes for nn.GELU(approximate="tanh") below opset 20, and for
       Hugging Face's NewGELUActivation, "gelu_new", at any opset)
    MatMul(Softmax(MatMul(q*c, k^T*c) [+ mask]), v)       -> attention(q, k, v[, mask]) {scale=c^2}
      (what torch.onnx.export(dynamo=True) writes for scaled_dot_product_attention; k^T may be
       the exporter's Reshape/Transpose/Reshape; a Where(IsNaN(p), 0, p) after the softmax and a
       boolean mask turned into Where(mask, 0, -inf) are recognised too)
"""

from __future__ import annotations

import math
from typing import Any

import onnx

from ...ir import Ref, Value, dims_equal
from .importer import Importer, module_path
from .values import Static


def _single(imp: Importer, name: str) -> onnx.NodeProto | None:
    """The producer of `name` if `name` has exactly one use."""
    return imp.prod.get(name) if imp.uses.get(name, 0) == 1 else None


def _const(e: Any) -> float | None:
    if isinstance(e, Static) and e.array.size == 1 and not e.symbolic and e.dtype.is_float:
        return float(e.scalar())
    return None


def linear_weight(imp: Importer, node: onnx.NodeProto, e: list, transposed: bool = False) -> Value | None:
    """The [out, in] `const` weight of a MatMul/Gemm whose second operand is a 2-D float
    initializer (stored [in, out]: transposed once here), or the Transpose of one."""
    w = e[1]
    loc = module_path(node)
    if isinstance(w, Static) and w.array.ndim == 2 and w.dtype.is_float and not w.symbolic:
        return imp.const(w, imp.weight_name(w, loc, "weight", node.input[1]), transpose=not transposed)
    tr = imp.prod.get(node.input[1])
    if not transposed and tr is not None and tr.op_type == "Transpose":
        src = imp.env.get(tr.input[0])
        perm = [a.ints for a in tr.attribute if a.name == "perm"]
        if isinstance(src, Static) and src.array.ndim == 2 and src.dtype.is_float and (not perm or list(perm[0]) == [1, 0]):
            return imp.const(src, imp.weight_name(src, loc, "weight", tr.input[0]))
    return None


def linear_bias(imp: Importer, node: onnx.NodeProto, e: list, a: dict) -> list | None:
    for i in (0, 1):
        mm = _single(imp, node.input[i])
        bias = e[1 - i]
        if mm is None or mm.op_type != "MatMul" or not isinstance(bias, Static) or bias.array.ndim != 1:
            continue
        x = imp.env.get(mm.input[0])
        w = linear_weight(imp, mm, [x, imp.env.get(mm.input[1])])
        if w is None or not isinstance(x, Value) or bias.symbolic or bias.dtype != w.type.dtype \
                or bias.array.shape[0] != w.type.shape[0]:
            continue
        loc = module_path(mm)
        b = imp.const(bias, imp.weight_name(bias, loc, "bias", node.input[1 - i]))
        return [imp.emit_ir("linear", [x, w, b], {}, loc)]
    return None


def rsqrt(imp: Importer, node: onnx.NodeProto, e: list, a: dict) -> list | None:
    sq = _single(imp, node.input[0])
    y = imp.env.get(sq.input[0]) if sq is not None and sq.op_type == "Sqrt" else None
    if not isinstance(y, Value) or not y.type.dtype.is_float:
        return None
    return [imp.emit_torch("aten.rsqrt.default", [y], (Ref(0),), y.type, module_path(node))]


def silu(imp: Importer, node: onnx.NodeProto, e: list, a: dict) -> list | None:
    for i in (0, 1):
        sg = _single(imp, node.input[1 - i])
        if sg is not None and sg.op_type == "Sigmoid" and sg.input[0] == node.input[i] and isinstance(e[i], Value):
            return [imp.emit_ir("silu", [e[i]], {}, module_path(node))]
    return None


def _factors(imp: Importer, name: str, depth: int = 0) -> list[str]:
    """`name` as a product of factors: Mul nodes (one use each) are expanded, two levels deep."""
    n = _single(imp, name) if depth else imp.prod.get(name)
    if n is None or n.op_type != "Mul" or depth > 2:
        return [name]
    return _factors(imp, n.input[0], depth + 1) + _factors(imp, n.input[1], depth + 1)


def _one_plus(imp: Importer, name: str, op_type: str) -> onnx.NodeProto | None:
    """The `op_type` node f if `name` is 1 + f(..) (either operand order), one use each."""
    add = _single(imp, name)
    if add is None or add.op_type != "Add":
        return None
    for i in (0, 1):
        f = _single(imp, add.input[i])
        if f is not None and f.op_type == op_type and _const(imp.env.get(add.input[1 - i])) == 1.0:
            return f
    return None


def _times(imp: Importer, name: str, c: float, tol: float = 1e-6) -> str | None:
    """x if `name` is Mul(x, c) or Mul(c, x) with one use and a scalar c within `tol` of `c`."""
    n = _single(imp, name)
    if n is None or n.op_type != "Mul":
        return None
    for i in (0, 1):
        k = _const(imp.env.get(n.input[1 - i]))
        if k is not None and abs(k - c) <= tol:
            return n.input[i]
    return None


def _erf_arg(imp: Importer, name: str) -> str | None:
    """x if `name` is 1 + Erf(x / sqrt 2) (or x * (1/sqrt 2)), one use each."""
    erf = _one_plus(imp, name, "Erf")
    if erf is None:
        return None
    div = _single(imp, erf.input[0])
    c = _const(imp.env.get(div.input[1])) if div is not None and div.op_type == "Div" else None
    if c is not None and abs(c - math.sqrt(2)) < 1e-6:
        return div.input[0]
    return _times(imp, erf.input[0], 1 / math.sqrt(2))


def _tanh_arg(imp: Importer, name: str) -> str | None:
    """x if `name` is 1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)) (either operand order of
    each Add and Mul), one use each."""
    tanh = _one_plus(imp, name, "Tanh")
    scaled = _times(imp, tanh.input[0], math.sqrt(2 / math.pi)) if tanh is not None else None
    inner = _single(imp, scaled) if scaled is not None else None
    if inner is None or inner.op_type != "Add":
        return None
    for j in (0, 1):
        x, cube = inner.input[j], _times(imp, inner.input[1 - j], 0.044715)
        pw = _single(imp, cube) if cube is not None else None
        if pw is not None and pw.op_type == "Pow" and pw.input[0] == x and _exponent(imp, pw.input[1]) == 3:
            return x
    return None


def _exponent(imp: Importer, name: str) -> float | None:
    e = imp.env.get(name)
    if isinstance(e, Static) and e.array.size == 1 and not e.symbolic:
        return float(e.scalar())
    return None


def gelu(imp: Importer, node: onnx.NodeProto, e: list, a: dict) -> list | None:
    """A product of three factors x, 0.5 and 1 + Erf(..x..) or 1 + Tanh(..x..)."""
    fs = _factors(imp, node.output[0])
    if len(fs) != 3 or not any(_const(imp.env.get(f)) == 0.5 for f in fs):
        return None
    for f in fs:
        for approximate, arg in (("none", _erf_arg), ("tanh", _tanh_arg)):
            x = arg(imp, f)
            if x is not None and x in fs and isinstance(imp.env.get(x), Value):
                return [imp.emit_ir("gelu", [imp.env[x]], {"approximate": approximate}, module_path(node))]
    return None


def _transposed_key(imp: Importer, name: str) -> Value | None:
    """k if `name` is k with its last two axes swapped: a Transpose, or the exporter's
    Reshape([-1, t, d]) -> Transpose([0, 2, 1]) -> Reshape([b, h, d, t])."""
    n = _single(imp, name)
    if n is None:
        return None
    if n.op_type == "Transpose":
        perm = [list(x.ints) for x in n.attribute if x.name == "perm"]
        k = imp.env.get(n.input[0])
        if isinstance(k, Value) and perm and perm[0] == [*range(k.type.rank - 2), k.type.rank - 1, k.type.rank - 2]:
            return k
        return None
    if n.op_type != "Reshape":
        return None
    tr = _single(imp, n.input[0])
    r1 = _single(imp, tr.input[0]) if tr is not None and tr.op_type == "Transpose" else None
    if r1 is None or r1.op_type != "Reshape":
        return None
    perm = [list(x.ints) for x in tr.attribute if x.name == "perm"]
    k, flat, out = imp.env.get(r1.input[0]), imp.env.get(r1.output[0]), imp.env.get(n.output[0])
    if not (isinstance(k, Value) and isinstance(flat, Value) and isinstance(out, Value)) or perm != [[0, 2, 1]]:
        return None
    kt, ft, ot = k.type.shape, flat.type.shape, out.type.shape
    if len(kt) < 3 or len(ft) != 3 or len(ot) != len(kt):
        return None
    same = all(dims_equal(x, y) for x, y in zip((*kt[:-2], kt[-1], kt[-2]), ot))
    return k if same and dims_equal(ft[1], kt[-2]) and dims_equal(ft[2], kt[-1]) else None


def _scaled(imp: Importer, name: str) -> tuple[str, float]:
    """(x, c) if `name` is Mul(x, c) with one use and a scalar c, else (name, 1.0)."""
    n = _single(imp, name)
    if n is not None and n.op_type == "Mul":
        c = _const(imp.env.get(n.input[1]))
        if c is not None:
            return n.input[0], c
    return name, 1.0


def attention(imp: Importer, node: onnx.NodeProto, e: list, a: dict) -> list | None:
    v = e[1]
    p = _single(imp, node.input[0])
    if p is not None and p.op_type == "Where":  # Where(IsNaN(s), 0, s): rows masked everywhere give 0
        isnan = _single(imp, p.input[0])
        if isnan is not None and isnan.op_type == "IsNaN" and isnan.input[0] == p.input[2] \
                and _const(imp.env.get(p.input[1])) == 0.0 and imp.uses.get(p.input[2]) == 2:
            p = imp.prod.get(p.input[2])
    if p is None or p.op_type != "Softmax" or not isinstance(v, Value) or v.type.rank != 4:
        return None
    if [x.i for x in p.attribute if x.name == "axis"] not in ([-1], [3]):
        return None
    scores, mask = p.input[0], None
    add = _single(imp, scores)
    if add is not None and add.op_type == "Add":
        scores, mask = add.input[0], imp.env.get(add.input[1])
        where = imp.prod.get(add.input[1])
        if where is not None and where.op_type == "Where" and _const(imp.env.get(where.input[1])) == 0.0 \
                and _const(imp.env.get(where.input[2])) == float("-inf"):
            mask = imp.env.get(where.input[0])
        if not isinstance(mask, Value):
            return None
    scale = 1.0
    mm = _single(imp, scores)
    if mm is not None and mm.op_type in ("Mul", "Div"):
        c = _const(imp.env.get(mm.input[1]))
        if c is None:
            return None
        scale = c if mm.op_type == "Mul" else 1 / c
        mm = _single(imp, mm.input[0])
    if mm is None or mm.op_type != "MatMul":
        return None
    qn, cq = _scaled(imp, mm.input[0])
    kn, ck = _scaled(imp, mm.input[1])
    q, k = imp.env.get(qn), _transposed_key(imp, kn)
    if not isinstance(q, Value) or k is None or q.type.rank != 4 or k.type.rank != 4:
        return None
    ins = [q, k, v] + ([mask] if mask is not None else [])
    scale = scale * cq * ck
    d = q.type.shape[-1]
    if isinstance(d, int) and abs(scale * math.sqrt(d) - 1) < 1e-6:  # 1/sqrt(d) rounded to float32 and split
        scale = 1 / math.sqrt(d)
    return [imp.emit_ir("attention", ins, {"causal": False, "scale": float(scale)}, module_path(node))]


PATTERNS = {
    "Add": [linear_bias],
    "Reciprocal": [rsqrt],
    "Mul": [silu, gelu],
    "MatMul": [attention],
}
