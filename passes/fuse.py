"""fuse: form kernel groups; each becomes one `fused` node whose region holds the ops it groups.

Groups, by `kind`, each found from one anchor op (the pattern table `PATTERNS`, applied in
this order, so a linear claimed by a SwiGLU is not also a GEMM of its own):

- `swiglu` at `mul(silu(gate), up)`: the gate and up GEMMs (`linear` or `qlinear`), which
  read the same input (one value, or the same dynamic `quantize` of one value, dequantized
  or not), with their weight `dequantize`s, the `silu` and the `mul`; gate, silu and up are
  read only inside the group;
- `dequant_gemm` at a `linear` whose weight is a `dequantize` of consts (that dequantize and
  the linear), or at a `qlinear` of const weight parts (the fold pass's integer GEMM), then
  an epilogue, each step only if the result before it has no other reader (and is no graph
  output): an `add` of a bias (a 1-D const), an activation (`silu`, `gelu`), a residual
  `add` (of a value of the result's type);
- `norm_quant` at `rms_norm`/`layer_norm`: the norm, the reorder pass's `gather` of its input
  (a const permutation of the channels that only the norm reads: the kernel loads its row in
  that order), and every `quantize` of its result — or of a `slice` of its channels that only
  quantizes read (a reordered layer's main and outlier ranges) — with the `dequantize` that
  reads each; a norm with neither gather nor quantize forms no group;
- `act_quant` at a reorder `gather` (const index, last axis) read only by quantizes, directly
  or through channel slices (the attention output before a reordered `o_proj`): the gather
  becomes the quantize kernel's load order, never a pass of its own over memory;
- `attention` at `attention` whose keys or values are a `dequantize` of run-time codes (a
  quantized KV cache) that only it reads: the attention and those dequantizes (the kernel
  dequantizes as it loads);
- `rope_kv` at `rope`: the rope and the (KV-cache) `quantize`s of its result, with the
  `dequantize` that reads each unless an attention group took it.

A node joins at most one group; `const` nodes never join (weights stay operands of the fused
node). A group, and each optional step that extends it, must be contractible: no path may
leave the group and re-enter it, or the fused node would be its own ancestor. This is checked
with networkx on the DAG of the graph with the groups formed so far contracted, and the
result's order is a topological sort of that DAG that keeps the original order otherwise.
A region's arguments are the group's operands (tensors, then weights: the values of `const`
nodes, each in order of first use), its nodes are the group's nodes in their original order,
its yields the values read outside the group (in that order).

    Before: %6 = const() {name="m.fc.weight"} : int4<sym,g32>[64, 72]
            %7 = const() {name="m.fc.weight.scale"} : f32[64, 3]
            %8 = dequantize(%6, %7) {format=int4<sym,g32>, dtype=f32} : f32[64, 72] loc("m.fc")
            %9 = linear(%5, %8) : f32[b, s, 64] loc("m.fc")
            %10 = add(%x, %9) : f32[b, s, 64] loc("m")
    After:  %8 = fused(%5, %x, %6, %7) {kind="dequant_gemm"} : f32[b, s, 64] loc("m.fc") {
              ^(%a0: f32[b, s, 72], %a1: f32[b, s, 64], %a2: int4<sym,g32>[64, 72], %a3: f32[64, 3])
              %0 = dequantize(%a2, %a3) {format=int4<sym,g32>, dtype=f32} : f32[64, 72] loc("m.fc")
              %1 = linear(%a0, %0) : f32[b, s, 64] loc("m.fc")
              %2 = add(%a1, %1) : f32[b, s, 64] loc("m")
              yield %2
            }

`graph.meta["fused"]` records how many groups of each kind asked for were formed.

Preserves: the function, bit for bit on the reference backend (a fused node runs its region:
the same ops, in the same order, on the same values), every node not grouped, the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import networkx as nx

from ..ir import Graph, Node, Value, dims_equal
from ..ir.ops import quant_parts

#: The kinds of group, in the order they are formed.
KINDS = ("swiglu", "dequant_gemm", "norm_quant", "act_quant", "attention", "rope_kv")
#: The GEMMs groups are formed around: a float or dequantized-weight `linear`, and `qlinear`
#: (quantized activation and weight, scales in the epilogue: the fold pass forms it).
GEMMS = ("linear", "qlinear")


class Context:
    """What patterns may ask about the graph being fused: readers and graph outputs."""

    def __init__(self, graph: Graph):
        self.users = graph.users()
        self.outputs = set(graph.outputs)

    def sole_reader(self, node: Node) -> Node | None:
        """The only node that reads `node`'s single result, unless that result is also a
        graph output."""
        readers = self.users.get(node, [])
        if len(node.types) != 1 or len(readers) != 1 or node.out in self.outputs:
            return None
        return readers[0]

    def read_outside(self, v: Value, inside: set[Node]) -> bool:
        """Whether `v` is a graph output or is read by a node not in `inside`."""
        return v in self.outputs or any(v in r.inputs for r in self.users.get(v.node, ()) if r not in inside)


@dataclass
class Candidate:
    """A group a pattern proposes: the `core` nodes (all or nothing), then optional `steps`
    that join in order while the group stays contractible; a step that cannot join ends the
    group when `chained` (an epilogue), else it is skipped. With `need_step` the core alone
    is no group."""

    kind: str
    anchor: Node  # gives the fused node its location
    core: list[Node]
    steps: list[list[Node]] = field(default_factory=list)
    chained: bool = True
    need_step: bool = False


Pattern = Callable[[Node, Context], "Candidate | None"]


# --------------------------------------------------------------------------- patterns


def _same_type(a: Value, b: Value) -> bool:
    x, y = a.type, b.type
    return x.dtype == y.dtype and x.rank == y.rank and all(dims_equal(p, q) for p, q in zip(x.shape, y.shape))


def _other(node: Node, v: Value) -> Value | None:
    """The operand of the binary `node` that is not `v` (None if `v` is not exactly one of them)."""
    a, b = node.inputs
    if (a == v) == (b == v):
        return None
    return b if a == v else a


def _parts(gemm: Node) -> tuple[tuple[Value, ...], tuple[Value, ...]]:
    """A `qlinear`'s activation parts and weight parts (see `quant_parts`)."""
    na, nw = len(quant_parts(gemm.get("act"))), len(quant_parts(gemm.get("weight")))
    return gemm.inputs[:na], gemm.inputs[na : na + nw]


def _weight(gemm: Node, ctx: Context) -> list[Node] | None:
    """A GEMM's weight as a group takes it: [] for consts (operands: a `linear`'s float weight,
    a `qlinear`'s quantized parts), [its dequantize] for a `linear` reading a dequantize of
    consts that nothing else reads, None for anything else."""
    if gemm.op == "qlinear":
        return [] if all(p.node.op == "const" for p in _parts(gemm)[1]) else None
    w = gemm.inputs[1].node
    if w.op == "const":
        return []
    if w.op == "dequantize" and all(u.node.op == "const" for u in w.inputs) and ctx.sole_reader(w) is gemm:
        return [w]
    return None


def _input(gemm: Node) -> tuple:
    """What a GEMM reads, seen through a dynamic `quantize` (and `dequantize`): two such
    quantizations of one value in one format give the same numbers."""
    if gemm.op == "qlinear":
        parts = _parts(gemm)[0]
        q = parts[0].node
        if q.op == "quantize" and len(q.inputs) == 1 and parts == q.outs:
            return ("codes", q.inputs[0], q.get("format"))
        return ("codes", *parts)
    v = gemm.inputs[0]
    q = v.node.inputs[0].node if v.node.op == "dequantize" else None
    if q is not None and q.op == "quantize" and len(q.inputs) == 1 and v.node.inputs == q.outs:
        return ("dequantized", q.inputs[0], q.get("format"), v.node.get("format"), v.node.get("dtype"))
    return ("value", v)


def swiglu(node: Node, ctx: Context) -> Candidate | None:
    """mul(silu(linear(x, Wg)), linear(x, Wu)) and the weights' dequantizes."""
    for act, up_v in (node.inputs, node.inputs[::-1]):
        silu, up = act.node, up_v.node
        if silu.op != "silu" or up.op not in GEMMS:
            continue
        gate = silu.inputs[0].node
        if gate.op not in GEMMS or gate is up:
            continue
        if ctx.sole_reader(gate) is not silu or ctx.sole_reader(silu) is not node or ctx.sole_reader(up) is not node:
            continue
        if _input(gate) != _input(up):
            continue
        wg, wu = _weight(gate, ctx), _weight(up, ctx)
        if wg is None or wu is None:
            continue
        return Candidate("swiglu", node, [*wg, gate, silu, *wu, up, node])
    return None


def _bias_add(node: Node, y: Value) -> bool:
    b = _other(node, y) if node.op == "add" else None
    return b is not None and b.node.op == "const" and b.type.rank == 1 and dims_equal(b.type.shape[0], y.type.shape[-1])


def _activation(node: Node, y: Value) -> bool:
    return node.op in ("silu", "gelu") and node.inputs[0] == y


def _residual_add(node: Node, y: Value) -> bool:
    r = _other(node, y) if node.op == "add" else None
    return r is not None and _same_type(r, y) and _same_type(node.out, y)


EPILOGUE = (_bias_add, _activation, _residual_add)


def dequant_gemm(node: Node, ctx: Context) -> Candidate | None:
    """linear(x, dequantize(consts)) or qlinear(.., consts..) and its epilogue: bias add,
    activation, residual add."""
    w = _weight(node, ctx)
    if w is None or (node.op == "linear" and not w):  # a float linear is no dequant-GEMM
        return None
    steps, tail = [], node
    for fits in EPILOGUE:
        nxt = ctx.sole_reader(tail)
        if nxt is not None and fits(nxt, tail.out):
            steps.append([nxt])
            tail = nxt
    return Candidate("dequant_gemm", node, [*w, node], steps, chained=True)


def _quantize_step(q: Node, ctx: Context) -> list[Node]:
    """A quantize and the dequantizes that read all of its results, but for those that only
    an `attention` reads: the attention kernel dequantizes its KV cache as it loads it."""
    return [q, *(d for d in ctx.users.get(q, ()) if d.op == "dequantize" and d.inputs == q.outs and not _kv_load(d, ctx))]


def _kv_load(d: Node, ctx: Context) -> bool:
    """Whether `d` dequantizes run-time codes (one `quantize`'s results) that only an
    `attention` reads, as its keys or values."""
    reader = ctx.sole_reader(d)
    q = d.inputs[0].node
    return (reader is not None and reader.op == "attention" and d.out in reader.inputs[1:3]
            and q.op == "quantize" and d.inputs == q.outs)


def kv_attention(node: Node, ctx: Context) -> Candidate | None:
    """attention and the dequantizes of its quantized keys / values (the KV cache): the
    kernel reads codes and scales and dequantizes as it loads."""
    loads = [v.node for v in node.inputs[1:3] if v.node.op == "dequantize" and _kv_load(v.node, ctx)]
    if not loads:
        return None
    return Candidate("attention", node, [*dict.fromkeys(loads), node])


def _quantize_steps(node: Node, ctx: Context) -> list[list[Node]]:
    """Each quantize of `node`'s result (with its dequantizes), and each slice of the last
    axis of it that only quantizes read (the main and outlier channel ranges of a reordered
    layer, `passes/reorder.py`), with those quantizes."""
    steps = []
    for r in ctx.users.get(node, ()):
        if r.op == "quantize" and r.inputs[0] == node.out:
            steps.append(_quantize_step(r, ctx))
        elif r.op == "slice" and r.get("axis") % r.types[0].rank == r.types[0].rank - 1 and r.get("step") == 1:
            readers = ctx.users.get(r, [])
            if readers and r.out not in ctx.outputs and all(q.op == "quantize" and q.inputs[0] == r.out for q in readers):
                steps.append([r, *(n for q in readers for n in _quantize_step(q, ctx))])
    return steps


def _reorder_gather(node: Node, ctx: Context) -> Node | None:
    """The `gather` of channels (a const index along the last axis: the reorder pass's
    permutation) that only `node` reads, as `node`'s first operand."""
    g = node.inputs[0].node
    if g.op != "gather" or ctx.sole_reader(g) is not node or g.inputs[1].node.op != "const":
        return None
    return g if g.get("axis") % g.types[0].rank == g.types[0].rank - 1 else None


def norm_quant(node: Node, ctx: Context) -> Candidate | None:
    """rms_norm / layer_norm, the reorder gather of its input (the kernel loads the row in
    that order), and the activation quantizes (and dequantizes) of its result or of slices of
    its channels. A norm with a gather is a group even when nothing quantizes its result."""
    gather = _reorder_gather(node, ctx)
    steps = _quantize_steps(node, ctx)
    if gather is None and not steps:
        return None
    return Candidate("norm_quant", node, [gather, node] if gather else [node], steps, chained=False, need_step=gather is None)


def act_quant(node: Node, ctx: Context) -> Candidate | None:
    """A reorder `gather` (const index, last axis) whose result only quantizes read, directly
    or through slices of its channels: the activation-quantize kernel loads in that order."""
    if node.inputs[1].node.op != "const" or node.get("axis") % node.types[0].rank != node.types[0].rank - 1:
        return None
    steps = _quantize_steps(node, ctx)
    if not steps or len(steps) < len(ctx.users.get(node, ())):  # some reader is no quantize
        return None
    return Candidate("act_quant", node, [node], steps, chained=False, need_step=True)


def rope_kv(node: Node, ctx: Context) -> Candidate | None:
    """rope (of the keys) and the KV-cache quantize (and dequantize) of its result."""
    steps = [_quantize_step(q, ctx) for q in ctx.users.get(node, ()) if q.op == "quantize" and q.inputs[0] == node.out]
    return Candidate("rope_kv", node, [node], steps, chained=False, need_step=True) if steps else None


#: (kind, anchor ops, pattern), in the order groups are formed.
PATTERNS: list[tuple[str, tuple[str, ...], Pattern]] = [
    ("swiglu", ("mul",), swiglu),
    ("dequant_gemm", GEMMS, dequant_gemm),
    ("norm_quant", ("rms_norm", "layer_norm"), norm_quant),
    ("act_quant", ("gather",), act_quant),
    ("attention", ("attention",), kv_attention),
    ("rope_kv", ("rope",), rope_kv),
]


# --------------------------------------------------------------------------- grouping


@dataclass(eq=False)
class Group:
    """A formed group: its kind, anchor and nodes in their original order (a node of the
    contracted DAG, compared by identity)."""

    kind: str
    anchor: Node
    nodes: list[Node]


def contractible(dag: nx.DiGraph, members: set) -> bool:
    """Whether contracting `members` to one node keeps `dag` acyclic: no path leaves the
    group and comes back into it."""
    exits = {s for n in members for s in dag.successors(n)} - members
    entries = {p for n in members for p in dag.predecessors(n)} - members
    if not exits or not entries:
        return True
    below: set = set()
    for s in exits:
        if s not in below:  # else its descendants are there already
            below |= {s} | nx.descendants(dag, s)
    return below.isdisjoint(entries)


def contract(dag: nx.DiGraph, members: set, key: Group) -> None:
    """Replace `members` in `dag` by the single node `key`, keeping the edges in and out."""
    entries = {p for n in members for p in dag.predecessors(n)} - members
    exits = {s for n in members for s in dag.successors(n)} - members
    dag.remove_nodes_from(members)
    dag.add_node(key)
    dag.add_edges_from((p, key) for p in entries)
    dag.add_edges_from((key, s) for s in exits)


def _grow(dag: nx.DiGraph, cand: Candidate, claimed: set[Node]) -> set[Node] | None:
    """The nodes of `cand` that form a legal group, or None."""
    members = set(cand.core)
    if members & claimed or not contractible(dag, members):
        return None
    joined = 0
    for step in cand.steps:
        if not set(step) & claimed and contractible(dag, members | set(step)):
            members |= set(step)
            joined += 1
        elif cand.chained:
            break
    return None if cand.need_step and not joined else members


def _region(group: Group, env: dict[Value, Value], ctx: Context) -> tuple[Node, list[Value]]:
    """The `fused` node of `group` (operands remapped through `env`) and the values of the
    original graph that its results replace."""
    inside = set(group.nodes)
    used = list(dict.fromkeys(v for n in group.nodes for v in n.inputs if v.node not in inside))
    used = [v for v in used if v.node.op != "const"] + [v for v in used if v.node.op == "const"]
    args = [Node.create("input", (), {"name": f"a{i}", "index": i}, [v.type]) for i, v in enumerate(used)]
    local: dict[Value, Value] = {v: a.out for v, a in zip(used, args)}
    body: list[Node] = []
    for node in group.nodes:
        new = node.replace(inputs=[local[v] for v in node.inputs])
        body.append(new)
        for i in range(len(node.types)):
            local[Value(node, i)] = Value(new, i)
    yields = [v for n in group.nodes for v in n.outs if ctx.read_outside(v, inside)]
    region = Graph(group.kind, tuple(args), tuple(body), tuple(local[v] for v in yields))
    attrs = {"kind": group.kind, "body": region}
    operands = [env.get(v, v) for v in used]
    return Node.create("fused", operands, attrs, [v.type for v in yields], group.anchor.loc), yields


def fuse(graph: Graph, *, groups: Iterable[str] = KINDS) -> Graph:
    """Form the kernel groups of the kinds in `groups` (see the module docstring); returns
    `graph` itself when none forms."""
    groups = (groups,) if isinstance(groups, str) else tuple(groups)
    unknown = sorted(set(groups) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown fusion group kind(s) {unknown}; expected some of {list(KINDS)}")
    ctx = Context(graph)
    position = {n: i for i, n in enumerate(graph.nodes)}
    dag = nx.DiGraph()
    dag.add_nodes_from(graph.nodes)
    dag.add_edges_from((v.node, n) for n in graph.nodes for v in n.inputs if v.node in position)
    claimed: set[Node] = set()
    formed: list[Group] = []
    for kind, ops, pattern in PATTERNS:
        if kind not in groups:
            continue
        for node in graph.nodes:
            if node.op not in ops or node in claimed:
                continue
            cand = pattern(node, ctx)
            members = None if cand is None else _grow(dag, cand, claimed)
            if not members or not any(ctx.read_outside(v, members) for n in members for v in n.outs):
                continue
            group = Group(kind, cand.anchor, sorted(members, key=position.__getitem__))
            contract(dag, members, group)
            claimed |= members
            formed.append(group)
    if not formed:
        return graph
    first = {g: position[g.nodes[0]] for g in formed}
    env: dict[Value, Value] = {}
    nodes: list[Node] = []
    for item in nx.lexicographical_topological_sort(dag, key=lambda n: first[n] if isinstance(n, Group) else position[n]):
        if isinstance(item, Group):
            new, replaced = _region(item, env, ctx)
            env.update((v, Value(new, i)) for i, v in enumerate(replaced))
        else:
            new = item.replace(inputs=[env.get(v, v) for v in item.inputs])
            env.update((Value(item, i), Value(new, i)) for i in range(len(item.types)))
        nodes.append(new)
    out = graph.replace(nodes=nodes, outputs=[env.get(v, v) for v in graph.outputs])
    out.meta["fused"] = {k: sum(g.kind == k for g in formed) for k in KINDS if k in groups}
    return out
