"""Check a graph's invariants and report every violation at once.

`verify(graph)` checks SSA (every operand is defined above its use, by a node of this graph),
the op set (known op, operand count, attribute names and types), types (dims are ints or
expressions over the graph's size symbols), shapes (the types each node declares equal
the types its op's rule infers; `dequantize` checks the layout of packed codes) and weights
(a const's tensor has its shape; a packed const's tensor is the int32 words of
`packed_shape`, or in IR-level graphs not yet packed, a tensor of the codes' shape). It
raises `VerificationError` listing each offender as its printed line, what was expected and
what came.
"""

from __future__ import annotations

import sympy
import torch

from .formats import FloatFormat, IntFormat
from .graph import Graph, Node
from .ops import OPS
from .packing import packed_shape
from .printer import print_node, region_of, value_names
from .types import TensorType, dims_equal, sym


class VerificationError(ValueError):
    """The graph breaks an invariant; `.problems` lists (node line, message) pairs."""

    def __init__(self, graph_name: str, problems: list[tuple[str, str]]):
        self.problems = problems
        body = "\n".join(f"  {line}\n    error: {msg}" for line, msg in problems)
        super().__init__(f"graph @{graph_name} failed verification ({len(problems)} problems):\n{body}")


def _types_match(declared: TensorType, inferred: TensorType, ranges: dict) -> bool:
    return (
        declared.dtype == inferred.dtype
        and declared.rank == inferred.rank
        and all(dims_equal(a, b, ranges) for a, b in zip(declared.shape, inferred.shape))
    )


def _check_type(t: TensorType, symbols: set) -> str | None:
    for d in t.shape:
        if isinstance(d, int):
            if d < 0:
                return f"negative dim {d} in {t}"
        elif not d.free_symbols <= symbols:
            unknown = sorted(str(s) for s in d.free_symbols - symbols)
            return f"dim {d} of {t} uses size symbols {unknown} that the graph does not declare"
    if isinstance(t.dtype, (IntFormat, FloatFormat)) is False and t.layout is not None:
        return f"layout {t.layout} on plain dtype {t.dtype}: only quantized formats are packed"
    return None


def _check_storage(w, t: TensorType) -> str | None:
    """Why weight tensor `w` cannot store a const of type `t` (None if it can): a tensor of
    its shape; for packed codes the int32 words of `packed_shape` (or the codes' shape, not
    yet packed: a `dequantize` of those fails at run time, naming the word count it wants)."""
    if t.layout is None or (tuple(w.shape) == t.shape and w.dtype != torch.int32):
        return None if tuple(w.shape) == t.shape else f"has shape {list(w.shape)}, the node declares {t}"
    want = packed_shape(t.shape, t.layout)
    if tuple(w.shape) != want or w.dtype != torch.int32:
        return f"is {w.dtype} {list(w.shape)}; packed {t} is stored as int32 words {list(want)}"
    return None


def _attr_symbols(v: object) -> set:
    if isinstance(v, sympy.Expr):
        return set(v.free_symbols)
    if isinstance(v, (tuple, list)):
        return set().union(*(_attr_symbols(x) for x in v)) if v else set()
    if isinstance(v, dict):
        return _attr_symbols(tuple(v.values()))
    return set()


def _check_node(node: Node, ranges: dict) -> str | None:
    opdef = OPS.get(node.op)
    if opdef is None:
        return f"unknown op {node.op!r}; expected one of {', '.join(sorted(OPS))}"
    n = len(node.inputs)
    if n < opdef.min_inputs or (opdef.max_inputs is not None and n > opdef.max_inputs):
        hi = "any" if opdef.max_inputs is None else opdef.max_inputs
        return f"{node.op} takes {opdef.min_inputs}..{hi} operands, got {n}"
    if opdef.outputs is not None and len(node.types) != opdef.outputs:
        return f"{node.op} has {opdef.outputs} result(s), the node declares {len(node.types)}"
    if not node.types:
        return f"{node.op} declares no result"
    attrs = node.attr
    for name, (types, required) in opdef.attrs.items():
        if name not in attrs:
            if required:
                return f"{node.op} needs attribute {name!r}"
        elif not isinstance(attrs[name], types) or (bool not in types and isinstance(attrs[name], bool)):
            want = " or ".join(t.__name__ for t in types)
            return f"attribute {name!r} of {node.op} must be {want}, got {type(attrs[name]).__name__} {attrs[name]!r}"
    unknown = _attr_symbols(tuple(attrs.values())) - set(ranges)
    if unknown:
        return f"attributes use size symbols {sorted(map(str, unknown))} that the graph does not declare"
    extra = sorted(set(attrs) - set(opdef.attrs))
    if extra:
        return f"{node.op} has no attribute(s) {extra}; expected {sorted(opdef.attrs)}"
    if opdef.infer is not None:
        try:
            inferred = opdef.infer([v.type for v in node.inputs], attrs)
        except (TypeError, KeyError, ValueError, IndexError) as e:
            return f"{node.op}: {e}"
        if len(inferred) != len(node.types):
            return f"{node.op} of these operands gives {len(inferred)} results, the node declares {len(node.types)}"
        for i, (d, t) in enumerate(zip(node.types, inferred)):
            if not _types_match(d, t, ranges):
                return f"result {i} declared {d}, but {node.op} of these operands gives {t}"
    return None


def verify(graph: Graph) -> Graph:
    """Return `graph` if it is well formed; else raise `VerificationError` with every problem.
    The region of a `fused` node is checked like a graph (its types over the enclosing graph's
    size symbols, its operands defined in it: a region reads only its arguments, it holds no
    `const`), and the op's type rule matches the node's operands and results to the region's
    arguments and yields."""
    symbols = {sym(d.name) for d in graph.dims}
    ranges = {sym(d.name): (d.lo, d.hi) for d in graph.dims}
    problems: list[tuple[str, str]] = []
    bindable = {d for n in graph.inputs for t in n.types for d in t.shape if isinstance(d, sympy.Symbol)}
    for s in sorted(symbols - bindable, key=str):
        problems.append((f"dim {s}", f"size symbol {s} is no input's dim, so no call can bind it"))
    _check_graph(graph, symbols, ranges, problems, None)
    if problems:
        raise VerificationError(graph.name, problems)
    return graph


def _check_graph(graph: Graph, symbols: set, ranges: dict, problems: list[tuple[str, str]], region: str | None) -> None:
    """Append the problems of `graph`'s arguments, nodes and outputs to `problems`; for the
    region of a node, `region` names that node (its messages say "in the region of %k")."""
    names = value_names(graph)
    defined: set[Node] = set()
    end = "return" if region is None else "yield"

    def problem(node: Node | str | None, msg: str) -> None:
        where = node if isinstance(node, str) else print_node(node, names) if node is not None else "<graph>"
        problems.append((where, msg if region is None else f"in the region of {region}: {msg}"))

    for i, node in enumerate(graph.inputs):
        if node.op != "input" or node.get("index") != i or len(node.types) != 1:
            problem(node, f"argument {i} must be an 'input' node with index={i} and one type")
        elif (msg := _check_type(node.types[0], symbols)) is not None:
            problem(node, msg)
        defined.add(node)
    seen_names: set[str] = set()
    for node in graph.nodes:
        if node in defined:
            problem(node, "node appears twice in the graph")
            continue
        for j, v in enumerate(node.inputs):
            if v.node not in defined:
                problem(node, f"operand {j} is not defined above this node (not SSA)")
            elif v.index >= len(v.node.types):
                problem(node, f"operand {j} reads result {v.index} of a node with {len(v.node.types)} results")
        else:
            for t in node.types:
                if (msg := _check_type(t, symbols)) is not None:
                    problem(node, msg)
            if (msg := _check_node(node, ranges)) is not None:
                problem(node, msg)
            elif node.op == "const" and region is not None:
                problem(node, "a region holds no const: weights are operands of the node that holds the region")
            elif node.op == "const":
                name = node.get("name")
                if graph.weights and name not in graph.weights:
                    problem(node, f"weight {name!r} is not among the graph's weights")
                elif name in graph.weights and (msg := _check_storage(graph.weights[name], node.types[0])) is not None:
                    problem(node, f"weight {name!r} {msg}")
                if name in seen_names:
                    problem(node, f"weight {name!r} has two const nodes")
                seen_names.add(name)
            if (body := region_of(node)) is not None:
                inner = names[node] if region is None else f"{names[node]} in the region of {region}"
                _check_graph(body, symbols, ranges, problems, inner)
        defined.add(node)
    for k, v in enumerate(graph.outputs):
        if v.node not in defined:
            problem(end, f"output {k} is not defined in the graph")
        elif v.index >= len(v.node.types):
            problem(end, f"output {k} reads result {v.index} of a node with {len(v.node.types)} results")
