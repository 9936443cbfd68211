"""canonicalize: lower what capture recorded onto the op set's compound ops and drop no-ops.

Rewrites (a table of `(op or torch target, rule)` pairs, applied to a fixed point):

- no-ops: `cast` to the same dtype, `reshape`/`expand` to the same shape, `slice` with
  step 1 that keeps the whole axis, and the identity arithmetic captured shape computations
  carry (torch `x + 0` on integers, `x * 1.0`) are replaced by their operand;
- RMSNorm: `x * rsqrt(mean(x^2, -1, keepdim) + eps)` becomes `rms_norm(x) {eps}`, and
  `w * rms_norm(x)` with a 1-D weight of the normalised size becomes `rms_norm(x, w)`;
- rotary embeddings: `x*cos + cat(-x[..., h:], x[..., :h])*sin` becomes `rope(x, cos, sin)`;
- grouped-query attention: a key/value head repetition (`unsqueeze(2) -> expand -> reshape`)
  feeding `attention` is dropped; `attention` reads the grouped heads directly.

Preserves: the function, exactly (each compound op's reference rule computes the same torch
ops in the same order as the pattern it replaces), and every value not rewritten.

    Before: %5 = torch(%4) {target="aten.pow.Tensor_Scalar", args=[$0, 2]} ... %9 = mul(%8, %4')
    After:  %5 = rms_norm(%4, %w) {eps=1e-05}
"""

from __future__ import annotations

from typing import Callable

import sympy

from ..ir import Graph, Node, Ref, Value, dims_equal

Rule = Callable[[Node, "Context"], "Node | Value | None"]
MAX_ROUNDS = 16


class Context:
    """What rules may ask about the graph: the users of each node."""

    def __init__(self, graph: Graph):
        self.users = graph.users()
        self.origins: dict[Node, Node] = {}  # filled by `Graph.rewrite` as it rebuilds nodes

    def single_use(self, v: Value) -> bool:
        """Whether `v` has exactly one user (known only for nodes of the graph being rewritten)."""
        node = self.origins.get(v.node, v.node)
        return len(self.users.get(node, ())) == 1 and len(node.types) == 1


def _target(v: Value, name: str) -> Node | None:
    """`v`'s node if it is a `torch` node calling `name`."""
    n = v.node
    return n if n.op == "torch" and n.get("target") == name else None


def _same_type(node: Node) -> bool:
    a, b = node.inputs[0].type, node.types[0]
    return a.dtype == b.dtype and a.rank == b.rank and all(dims_equal(x, y) for x, y in zip(a.shape, b.shape))


def noop(node: Node, ctx: Context) -> Value | None:
    if node.op == "slice" and node.get("step") != 1:
        return None
    return node.inputs[0] if _same_type(node) else None


#: Identity arithmetic of captured shape computations: `x + 0`, `x - 0` (integers only: a
#: float -0.0 + 0 is +0.0), `x * 1`, `x / 1` (exact for every dtype).
_IDENTITIES = {"aten.add.Tensor": (0, False), "aten.sub.Tensor": (0, False), "aten.mul.Tensor": (1, True),
               "aten.div.Tensor": (1, True)}


def identity(node: Node, ctx: Context) -> Value | None:
    """torch add/sub of 0, mul/div by 1 (a scalar argument, the tensor first) whose result
    has the operand's type -> the operand."""
    rule = _IDENTITIES.get(node.get("target"))
    args = node.get("args")
    if rule is None or len(node.inputs) != 1 or node.get("kwargs") or len(args) != 2:
        return None
    unit, floats_too = rule
    first, other = args
    if not isinstance(first, Ref) or first.index != 0 or isinstance(other, bool) or not isinstance(other, (int, float)):
        return None
    if other != unit or (node.types[0].dtype.is_float and not floats_too):
        return None
    return node.inputs[0] if _same_type(node) else None


def rms_norm(node: Node, ctx: Context) -> Node | None:
    """mul(x, rsqrt(add(mean(pow(x, 2), [-1], True), eps))) -> rms_norm(x) {eps}."""
    if len(node.inputs) != 2:
        return None
    x, r = node.inputs
    rsqrt = _target(r, "aten.rsqrt.default")
    add = rsqrt and _target(rsqrt.inputs[0], "aten.add.Tensor")
    if add is None or len(add.get("args")) != 2 or not isinstance(add.get("args")[1], (int, float)):
        return None
    if add.get("kwargs"):  # e.g. alpha: mean + alpha * eps is another function
        return None
    mean = _target(add.inputs[0], "aten.mean.dim")
    if mean is None or tuple(mean.get("args")[1:]) not in (((-1,), True), ((x.type.rank - 1,), True)):
        return None
    if mean.get("kwargs"):
        return None
    pow_ = _target(mean.inputs[0], "aten.pow.Tensor_Scalar")
    if pow_ is None or pow_.get("args")[1] != 2 or pow_.inputs[0] != x:
        return None
    return Node.create("rms_norm", [x], {"eps": float(add.get("args")[1])}, node.types, node.loc)


def rms_norm_weight(node: Node, ctx: Context) -> Node | None:
    """mul(w, rms_norm(x)) with w of shape [D] -> rms_norm(x, w)."""
    if len(node.inputs) != 2:
        return None
    w, y = node.inputs
    norm = y.node
    if norm.op != "rms_norm" or len(norm.inputs) != 1 or not ctx.single_use(y):
        return None
    if w.type.rank != 1 or not dims_equal(w.type.shape[0], y.type.shape[-1]) or w.node.op != "const":
        return None
    return norm.replace(inputs=[norm.inputs[0], w], loc=node.loc or norm.loc)


def _half_slice(v: Value, x: Value, first: bool) -> bool:
    n = v.node
    if n.op != "slice" or n.inputs[0] != x or n.get("step") != 1:
        return False
    rank, d = x.type.rank, x.type.shape[-1]
    if n.get("axis") not in (-1, rank - 1) or not isinstance(d, int) or d % 2:
        return False
    start, end = n.get("start"), n.get("end")
    if first:
        return (start, end) == (0, d // 2)
    return start == d // 2 and isinstance(end, int) and end >= d


def rope(node: Node, ctx: Context) -> Node | None:
    """add(mul(x, cos), mul(cat(neg(x[..., h:]), x[..., :h]), sin)) -> rope(x, cos, sin)."""
    a, b = (v.node for v in node.inputs)
    if a.op != "mul" or b.op != "mul":
        return None
    x, cos = a.inputs
    rot, sin = b.inputs
    cat = rot.node
    if cat.op != "cat" or len(cat.inputs) != 2 or cat.get("axis") not in (-1, x.type.rank - 1):
        return None
    neg = _target(cat.inputs[0], "aten.neg.default")
    if neg is None or not _half_slice(neg.inputs[0], x, first=False) or not _half_slice(cat.inputs[1], x, first=True):
        return None
    if not dims_equal(sympy.Mul(*node.types[0].shape), sympy.Mul(*x.type.shape)):
        return None
    return Node.create("rope", [x, cos, sin], {}, node.types, node.loc)


def _repeated_heads(v: Value) -> Value | None:
    """The grouped key/value tensor that `v` repeats per query head, if it is such a repeat."""
    reshape = v.node
    if reshape.op != "reshape":
        return None
    expand = reshape.inputs[0].node
    if expand.op != "expand":
        return None
    unsq = expand.inputs[0].node
    if unsq.op != "unsqueeze" or unsq.get("axis") != 2:
        return None
    src = unsq.inputs[0]
    if src.type.rank != 4:
        return None
    b, h, t, d = src.type.shape
    rep = expand.types[0].shape[2]
    want = (b, sympy.sympify(h) * rep, t, d)
    if all(dims_equal(x, y) for x, y in zip(reshape.types[0].shape, want)):
        return src
    return None


def gqa(node: Node, ctx: Context) -> Node | None:
    """attention(q, repeat(k), repeat(v), ...) -> attention(q, k, v, ...) with grouped heads."""
    k, v = _repeated_heads(node.inputs[1]), _repeated_heads(node.inputs[2])
    if k is None or v is None or not dims_equal(k.type.shape[1], v.type.shape[1]):
        return None  # key and value must keep the same number of grouped heads
    return node.replace(inputs=[node.inputs[0], k, v, *node.inputs[3:]])


RULES: list[tuple[str, Rule]] = [
    ("torch", identity),
    ("cast", noop),
    ("reshape", noop),
    ("expand", noop),
    ("slice", noop),
    ("mul", rms_norm),
    ("mul", rms_norm_weight),
    ("add", rope),
    ("attention", gqa),
]


def canonicalize(graph: Graph, *, rules: list[tuple[str, Rule]] | None = None) -> Graph:
    """Apply `rules` (default `RULES`) to a fixed point; returns `graph` itself if none fires."""
    table: dict[str, list[Rule]] = {}
    for op, rule in rules or RULES:
        table.setdefault(op, []).append(rule)
    for _ in range(MAX_ROUNDS):
        ctx = Context(graph)

        def apply(node: Node) -> Node | Value | None:
            for rule in table.get(node.op, ()):
                got = rule(node, ctx)
                if got is not None:
                    return got
            return None

        new = graph.rewrite(apply, ctx.origins)
        if new is graph:
            return graph
        graph = new
    raise RuntimeError(f"canonicalize did not reach a fixed point in {MAX_ROUNDS} rounds on graph @{graph.name}")
