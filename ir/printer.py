"""The stable text form of a graph, one line per node.

    graph @LlamaForCausalLM(%input_ids: i64[b, s]) {
      dim b in [1, oo]
      %0 = const() {name="model.embed_tokens.weight"} : f32[100, 64]
      %1 = embedding(%input_ids, %0) : f32[b, s, 64] loc("model.embed_tokens")
      %2:2 = torch(%1) {target="aten.max.dim", args=[$0, -1]} : (f32[b, s], i64[b, s])
      return %1, %2#1
    }

Arguments keep their names; body values are numbered in order; `%n#i` is output i of a
multi-output node. Weights print by name and type, never by value. `mxc.ir.parse` reads
this text back, and `print_graph(parse(text)) == text`.

A node with a region (`fused`, whose `body` attribute is a `Graph`) ends its line with `{`;
the region follows, indented: its arguments `^(...)` (the node's operands, in order), its
nodes, numbered from `%0` again (a region reads only its arguments, never values of the
enclosing graph), and `yield` with the values that become the node's results:

      %7 = fused(%4, %5, %6) {kind="dequant_gemm"} : f32[b, s, 64] loc("m.fc") {
        ^(%a0: f32[b, s, 72], %a1: int4<sym,g32>[64, 72], %a2: f32[64, 3])
        %0 = dequantize(%a1, %a2) {format=int4<sym,g32>, dtype=f32} : f32[64, 72] loc("m.fc")
        %1 = linear(%a0, %0) : f32[b, s, 64] loc("m.fc")
        yield %1
      }
"""

from __future__ import annotations

import json
from typing import Any

import sympy

from .dtypes import DType
from .formats import FloatFormat, IntFormat, Layout
from .graph import Graph, Node, Ref, RuntimeDevice, TorchConst, Value


def format_attr(v: Any) -> str:
    """The text of one attribute value; `mxc.ir.parser.parse_attr` reads it back."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(format_attr(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {format_attr(x)}" for k, x in v.items()) + "}"
    if isinstance(v, sympy.Expr):
        return str(int(v)) if v.is_Integer else str(v)
    if isinstance(v, (DType, IntFormat, FloatFormat, Layout, Ref, TorchConst, RuntimeDevice)):
        return str(v)
    raise TypeError(f"attribute value {v!r} of type {type(v).__name__} has no text form")


def _types(node: Node) -> str:
    if len(node.types) == 1:
        return str(node.types[0])
    return "(" + ", ".join(str(t) for t in node.types) + ")"


def value_names(graph: Graph) -> dict[Node, str]:
    """The printed name of every node's result: `%arg` for inputs, `%0`, `%1`, ... for the body."""
    names = {n: "%" + n.get("name") for n in graph.inputs}
    for i, n in enumerate(graph.nodes):
        names[n] = f"%{i}"
    return names


def print_node(node: Node, names: dict[Node, str]) -> str:
    """One line: `%k = op(%a, %b) {attrs} : type loc("path")`; a region (an attribute whose
    value is a `Graph`) is not part of the line (see `print_lines`)."""

    def ref(v: Value) -> str:
        base = names.get(v.node, "%<undefined>")
        return base if len(v.node.types) == 1 else f"{base}#{v.index}"

    lhs = names[node] if len(node.types) == 1 else f"{names[node]}:{len(node.types)}"
    text = f"{lhs} = {node.op}({', '.join(ref(v) for v in node.inputs)})"
    attrs = [(k, v) for k, v in node.attrs if not isinstance(v, Graph)]
    if attrs:
        text += " {" + ", ".join(f"{k}={format_attr(v)}" for k, v in attrs) + "}"
    text += f" : {_types(node)}"
    if node.loc:
        text += f" loc({json.dumps(node.loc)})"
    return text


def region_of(node: Node) -> Graph | None:
    """The region a node holds (the value of its `Graph` attribute), or None."""
    for _, v in node.attrs:
        if isinstance(v, Graph):
            return v
    return None


def print_lines(node: Node, names: dict[Node, str], indent: str = "  ") -> list[str]:
    """`node`'s text: its line, and for a node with a region the region's lines and `}`."""
    line = indent + print_node(node, names)
    body = region_of(node)
    if body is None:
        return [line]
    inner = indent + "  "
    body_names = value_names(body)
    args = ", ".join(f"{body_names[n]}: {n.types[0]}" for n in body.inputs)
    lines = [line + " {", f"{inner}^({args})"]
    for n in body.nodes:
        lines += print_lines(n, body_names, inner)
    lines.append(f"{inner}yield " + ", ".join(_ref(v, body_names) for v in body.outputs))
    lines.append(indent + "}")
    return lines


def _ref(v: Value, names: dict[Node, str]) -> str:
    return names[v.node] if len(v.node.types) == 1 else f"{names[v.node]}#{v.index}"


def print_graph(graph: Graph) -> str:
    """The whole graph as text (see the module docstring)."""
    names = value_names(graph)
    args = ", ".join(f"{names[n]}: {n.types[0]}" for n in graph.inputs)
    lines = [f"graph @{graph.name}({args}) {{"]
    lines += [f"  dim {d}" for d in graph.dims]
    for n in graph.nodes:
        lines += print_lines(n, names)
    lines.append("  return " + ", ".join(_ref(v, names) for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"
