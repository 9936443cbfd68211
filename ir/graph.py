"""The graph: SSA values produced by nodes, in topological order.

`Node` is one operation: an `op` from the op set (`mxc.ir.ops`), its `inputs` (values),
its `attrs`, the `types` of its outputs and an optional source location `loc` (the module
path it came from, e.g. `model.layers.0.mlp.down_proj`). A `Value` is one output of a node:
`(node, index)`. Nodes are frozen and compare by identity; `replace()` returns the same node
when nothing changes. `meta` is a side table for analyses (calibration statistics, debug
data) that equality, hashing and printing ignore.

A `Graph` has `inputs` (nodes of op `input`, one per argument), a body of `nodes` in
topological order, `outputs` (values), the `dims` (size symbols with their ranges) and the
named `weights` its `const` nodes refer to. Graphs are immutable too: passes build new ones
with `Graph.rewrite` or `replace`.

    Before: %1 = torch(%0) {target="aten.neg.default", args=[$0]}; %2 = neg-user(%1)
    g.rewrite(lambda n: ...)   # returns a new graph; the old one is unchanged
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace as dc_replace
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from .types import TensorType


@dataclass(frozen=True, slots=True)
class Ref:
    """In a `torch` node's argument template: the node's `index`-th input (prints `$index`)."""

    index: int

    def __str__(self) -> str:
        return f"${self.index}"


@dataclass(frozen=True, slots=True)
class TorchConst:
    """A torch enum constant by name (`torch.contiguous_format`, `torch.strided`)."""

    name: str

    def __str__(self) -> str:
        return f"torch.{self.name}"

    def resolve(self) -> Any:
        return getattr(torch, self.name)


@dataclass(frozen=True, slots=True)
class RuntimeDevice:
    """The device the graph runs on, filled in at execution (prints `device`)."""

    def __str__(self) -> str:
        return "device"


DEVICE = RuntimeDevice()


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    """One operation. `op` names an entry of the op set; `attrs` are (name, value) pairs in
    a fixed order; `types` has one `TensorType` per output."""

    op: str
    inputs: tuple["Value", ...] = ()
    attrs: tuple[tuple[str, Any], ...] = ()
    types: tuple[TensorType, ...] = ()
    loc: str | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @staticmethod
    def create(
        op: str,
        inputs: Iterable["Value"] = (),
        attrs: Mapping[str, Any] | None = None,
        types: Iterable[TensorType] = (),
        loc: str | None = None,
    ) -> "Node":
        """A node with `attrs` given as a mapping (kept in insertion order)."""
        return Node(op, tuple(inputs), tuple((attrs or {}).items()), tuple(types), loc)

    @property
    def attr(self) -> dict[str, Any]:
        """The attributes as a dict (a copy)."""
        return dict(self.attrs)

    def get(self, name: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == name:
                return v
        return default

    @property
    def out(self) -> "Value":
        """The single output; raises for nodes with several or none."""
        if len(self.types) != 1:
            raise ValueError(f"node {self.op} has {len(self.types)} outputs, expected exactly 1")
        return Value(self, 0)

    @property
    def outs(self) -> tuple["Value", ...]:
        return tuple(Value(self, i) for i in range(len(self.types)))

    def replace(self, **changes: Any) -> "Node":
        """This node with `changes` (`attrs` may be a mapping); the same object if nothing changes."""
        if "attrs" in changes and isinstance(changes["attrs"], Mapping):
            changes["attrs"] = tuple(changes["attrs"].items())
        for key in ("inputs", "types"):
            if key in changes:
                changes[key] = tuple(changes[key])
        if all(_same(getattr(self, k), v) for k, v in changes.items()):
            return self
        return dc_replace(self, **{"meta": dict(self.meta), **changes})

    def __repr__(self) -> str:
        return f"Node({self.op}, {len(self.inputs)} inputs, {', '.join(map(str, self.types))})"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Node) or isinstance(b, Node):
        return a is b
    return type(a) is type(b) and a == b


@dataclass(frozen=True, slots=True)
class Value:
    """Output `index` of `node`: an SSA tensor."""

    node: Node
    index: int = 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Value) and other.node is self.node and other.index == self.index

    def __hash__(self) -> int:
        return hash((id(self.node), self.index))

    @property
    def type(self) -> TensorType:
        return self.node.types[self.index]

    def __repr__(self) -> str:
        return f"Value({self.node.op}#{self.index}: {self.type})"


@dataclass(frozen=True, slots=True)
class DimRange:
    """The sizes a size symbol may take: `lo..hi` inclusive, `hi=None` for unbounded."""

    name: str
    lo: int = 1
    hi: int | None = None

    def __contains__(self, size: int) -> bool:
        return size >= self.lo and (self.hi is None or size <= self.hi)

    def __str__(self) -> str:
        return f"{self.name} in [{self.lo}, {'oo' if self.hi is None else self.hi}]"


@dataclass(frozen=True, slots=True, eq=False)
class Graph:
    """A function: `inputs` (nodes of op `input`), body `nodes` in topological order,
    `outputs`, size symbol ranges `dims`, and the `weights` its `const` nodes name."""

    name: str
    inputs: tuple[Node, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[Value, ...]
    dims: tuple[DimRange, ...] = ()
    weights: Mapping[str, torch.Tensor] = field(default_factory=dict, repr=False)
    meta: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def replace(self, **changes: Any) -> "Graph":
        """This graph with `changes`; the same object if nothing changes."""
        for key in ("inputs", "nodes", "outputs", "dims"):
            if key in changes:
                changes[key] = tuple(changes[key])
        if all(_same(getattr(self, k), v) if k != "weights" else getattr(self, k) is v for k, v in changes.items()):
            return self
        return dc_replace(self, **{"meta": dict(self.meta), **changes})  # each graph owns its side table

    def with_meta(self, **items: Any) -> "Graph":
        """A copy of this graph (same nodes and weights) whose side table has `items` added;
        this graph's own `meta` is left as it is."""
        return dc_replace(self, meta={**self.meta, **items})

    def __str__(self) -> str:
        from .printer import print_graph

        return print_graph(self)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(n.get("name") for n in self.inputs)

    def users(self) -> dict[Node, list[Node]]:
        """For every node, the body nodes that read one of its outputs (in order)."""
        out: dict[Node, list[Node]] = {n: [] for n in (*self.inputs, *self.nodes)}
        for n in self.nodes:
            for v in n.inputs:
                if n not in out[v.node]:
                    out[v.node].append(n)
        return out

    def walk(self) -> Iterator[Node]:
        """Every body node in order, each `fused` node followed by the nodes of its region
        (recursively): what a search for an op must see once the fuse pass grouped it."""
        for n in self.nodes:
            yield n
            for _, v in n.attrs:
                if isinstance(v, Graph):
                    yield from v.walk()

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            key = n.op if n.op != "torch" else f"torch:{n.get('target')}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def rewrite(
        self,
        fn: Callable[[Node], "Node | list[Node] | tuple[Value, ...] | Value | None"],
        origins: dict[Node, Node] | None = None,
    ) -> "Graph":
        """Rebuild the graph node by node. `fn` gets each body node with its inputs already
        remapped and returns None (keep it), a node (use it instead), a list of nodes (inserted
        in order, the last one replacing it), or the value(s) that replace its outputs (the
        node is dropped). Unused nodes are then removed. Returns
        `self` when nothing changed. If given, `origins` is filled with new node -> the node
        of this graph it was rebuilt from, so `fn` can look up facts about the old graph."""
        env: dict[Value, Value] = {}
        new_nodes: list[Node] = []
        for node in self.nodes:
            remapped = node.replace(inputs=[env.get(v, v) for v in node.inputs])
            if origins is not None and remapped is not node:
                origins[remapped] = node
            got = fn(remapped)
            if got is None:
                got = remapped
            if isinstance(got, list):
                new_nodes.extend(got[:-1])
                got = got[-1]
            if isinstance(got, Node):
                new_nodes.append(got)
                if got is not node:
                    for i in range(len(node.types)):
                        env[Value(node, i)] = Value(got, i)
            else:
                values = (got,) if isinstance(got, Value) else tuple(got)
                if len(values) != len(node.types):
                    raise ValueError(
                        f"rewrite of {node.op} returned {len(values)} values, expected {len(node.types)}"
                    )
                for i, v in enumerate(values):
                    env[Value(node, i)] = v
        outputs = tuple(env.get(v, v) for v in self.outputs)
        return self.replace(nodes=new_nodes, outputs=outputs).dead_code_eliminated()

    def dead_code_eliminated(self) -> "Graph":
        """This graph without body nodes none of whose outputs reach an output."""
        live: set[Node] = {v.node for v in self.outputs}
        for node in reversed(self.nodes):
            if node in live:
                live.update(v.node for v in node.inputs)
        kept = [n for n in self.nodes if n in live]
        if len(kept) == len(self.nodes):
            return self
        return self.replace(nodes=kept)

    def used_weights(self) -> dict[str, torch.Tensor]:
        """The weights that `const` nodes of the body name."""
        return {n.get("name"): self.weights[n.get("name")] for n in self.nodes if n.op == "const"}
