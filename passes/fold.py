"""fold: move dequantization scales into GEMM epilogues, and drop requantization.

A linear whose activation and weight are both quantized reads them dequantized:

    Before: %q, %sx = quantize(%x) {format=int8<sym,token>} : int8<sym,token>[b, s, 576], f32[b, s, 1]
            %xd = dequantize(%q, %sx) {format=int8<sym,token>, dtype=f32} : f32[b, s, 576]
            %wd = dequantize(%wc, %ws) {format=int8<sym,channel>, dtype=f32} : f32[1536, 576]
            %y = linear(%xd, %wd) : f32[b, s, 1536] loc("model.layers.0.mlp.up_proj")
    After:  %q, %sx = quantize(%x) {format=int8<sym,token>} : ...
            %y = qlinear(%q, %sx, %wc, %ws) {act=int8<sym,token>, weight=int8<sym,channel>, dtype=f32}
                 : f32[b, s, 1536] loc("model.layers.0.mlp.up_proj")

`qlinear` is the integer (or low-bit float) GEMM a kernel runs: `acc = xq · wqᵀ` per block
of K, an asymmetric weight's zero point subtracted as the correction `z · Σ xq` (no
dequantized weight is formed), then `out = Σ_blocks acc · s_w (· s_x,block) · s_x,token`
(W8A8: `acc · s_x · s_w`). Folded when the activation format is symmetric and its scales
are per token, per tensor, or per group with the weight's blocks (or one weight scale per
row or tensor); other pairs keep their dequantize nodes, and the reason is recorded.

A static `quantize(dequantize(codes, s...), s...)` of the same format with the very same
scale operands gives back `codes`: the pair is removed.

Identical copies of a pure op the quantize pass emits once per layer — `quantize`,
`dequantize`, `slice`, `gather` of the same operands with the same attributes, such as q, k
and v each quantizing the one norm output — are merged into the first (its location stays);
`graph.meta["merged"]` counts them. One activation is then quantized once per format.

Smoothing scales need no folding here: `smooth` folds them into the norms and producer
linears itself. Shape arithmetic stays: what is left of it in captured graphs depends on the
symbolic sizes.

Records `graph.meta["folded"][path] = "qlinear" | reason not folded`.
Preserves: the function up to float rounding (the epilogue multiplies the exact integer
sums by the scales, where the unfolded graph sums dequantized float products).
"""

from __future__ import annotations

from ..ir import Graph, IntFormat, Node, NumberFormat, Value
from ..ir.ops import quant_parts
from .quantize import layer_path


def _why_not(act: NumberFormat, weight: NumberFormat, k: int) -> str | None:
    """Why a qlinear of `act` x `weight` over K=`k` cannot be formed (None: it can)."""
    if isinstance(act, IntFormat) and not act.symmetric:
        return f"activation format {act} has a zero point"
    bx, bw = act.scaling.block(k), weight.scaling.block(k)
    if bx is not None and bx < k and bw is not None and bw < k and bw != bx:
        return f"activation groups of {bx} and weight groups of {bw} do not align"
    return None


def _dequantized(v: Value, want_op: str) -> Node | None:
    """The `dequantize` producing `v` if all its parts come from one `want_op` node
    (`quantize`) or are all `const` (`want_op` = "const")."""
    dq = v.node
    if dq.op != "dequantize":
        return None
    if want_op == "const":
        return dq if all(p.node.op == "const" for p in dq.inputs) else None
    q = dq.inputs[0].node
    if q.op != "quantize" or any(p.node is not q for p in dq.inputs):
        return None
    return dq


#: Pure ops the quantize pass repeats per layer on one shared activation (q, k and v each
#: slice and quantize the same norm output); identical copies are merged.
MERGED_OPS = ("quantize", "dequantize", "slice", "gather")


def fold(graph: Graph) -> Graph:
    """Fold dequantization into `qlinear` epilogues and drop requantization (see the module
    docstring); returns `graph` itself when nothing changes."""
    record: dict[str, str] = {}
    seen: dict[tuple, Node] = {}
    merged = 0

    def apply(node: Node):
        nonlocal merged
        if node.op in MERGED_OPS:
            key = (node.op, node.inputs, repr(node.attrs), node.types)
            if key in seen:
                merged += 1
                return seen[key].outs
            seen[key] = node
        if node.op == "quantize" and len(node.inputs) > 1:
            return _requantize(node)
        if node.op != "linear":
            return None
        xdq = _dequantized(node.inputs[0], "quantize")
        wdq = _dequantized(node.inputs[1], "const")
        if xdq is None or wdq is None:
            return None
        path = layer_path(node)
        act, weight = xdq.get("format"), wdq.get("format")
        k = int(wdq.types[0].shape[1])
        why = _why_not(act, weight, k)
        if why is not None:
            record[path] = why
            return None
        record[path] = "qlinear"
        attrs = {"act": act, "weight": weight, "dtype": node.types[0].dtype}
        return node.replace(op="qlinear", inputs=[*xdq.inputs, *wdq.inputs, *node.inputs[2:]], attrs=attrs)

    out = graph.rewrite(apply)
    if record or merged:
        out = out if out is not graph else graph.with_meta()
        out.meta["folded"] = {**graph.meta.get("folded", {}), **record}
        out.meta["merged"] = graph.meta.get("merged", 0) + merged
    return out


def _requantize(node: Node):
    """`quantize(dequantize(c, s..), s..)` with the same format and scale operands: `c, s..`."""
    dq = node.inputs[0].node
    fmt = node.get("format")
    if dq.op != "dequantize" or dq.get("format") != fmt:
        return None
    if list(dq.inputs[1:]) != list(node.inputs[1:]):
        return None
    return tuple(dq.inputs[: len(quant_parts(fmt))])

