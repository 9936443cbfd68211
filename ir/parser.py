"""Read the text form of `mxc.ir.printer` back into a `Graph`.

    g2 = parse(str(g))          # str(g2) == str(g); weights come from `weights=`
    g2 = parse(text, weights=g.weights)

A node line that ends with `{` opens a region (see `mxc.ir.printer`): `^(args)`, nodes,
`yield ...` and `}`; it becomes the node's `body` attribute, a `Graph`.

Errors name the line number, the line and what was expected.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import torch

from .dtypes import DTYPES
from .formats import is_format_text, parse_format, parse_layout
from .graph import DEVICE, DimRange, Graph, Node, Ref, TorchConst, Value
from .types import TensorType, parse_expr, parse_type, split_top


class ParseError(ValueError):
    """Malformed IR text: says where and what was expected."""


_INT = re.compile(r"-?\d+")
_FLOAT = re.compile(r"-?(\d+\.\d*|\d*\.\d+|\d+)(e[-+]?\d+)?|-?inf|nan")
_KEYWORDS: dict[str, Any] = {"true": True, "false": False, "none": None, "device": DEVICE}


def parse_attr(text: str) -> Any:
    """One attribute value from its text (see `mxc.ir.printer.format_attr`)."""
    text = text.strip()
    if not text:
        raise ValueError("empty attribute value")
    if text in _KEYWORDS:
        return _KEYWORDS[text]
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    if text[0] == '"':
        return json.loads(text)
    if text[0] == "[":
        _closing(text, "]")
        return tuple(parse_attr(p) for p in split_top(text[1:-1]))
    if text[0] == "{":
        _closing(text, "}")
        out = {}
        for item in split_top(text[1:-1]):
            kv = split_top(item, ":")
            if len(kv) != 2 or not kv[0].startswith('"'):
                raise ValueError(f"malformed dict item {item!r} in {text!r}; expected \"KEY\": VALUE")
            out[json.loads(kv[0])] = parse_attr(kv[1])
        return out
    if text[0] == "$":
        return Ref(int(text[1:]))
    if text.startswith("torch."):
        return TorchConst(text[len("torch.") :])
    if text in DTYPES:
        return DTYPES[text]
    if text.startswith("packed<"):
        return parse_layout(text)
    if is_format_text(text):
        return parse_format(text)
    return parse_expr(text)


def _closing(text: str, close: str) -> None:
    if not text.endswith(close):
        raise ValueError(f"unbalanced {text[0]} in {text!r}")


_HEADER = re.compile(r"graph @([\w.\-]+)\((.*)\) \{")
_ARG = re.compile(r"%([A-Za-z_][\w.]*): (.+)")
_DIM = re.compile(r"dim ([A-Za-z_]\w*) in \[(\d+), (\d+|oo)\]")
_NODE = re.compile(r"%(\d+)(?::(\d+))? = (\w+)\(([^)]*)\)(.*)")
_REF = re.compile(r"%([\w.]+?)(?:#(\d+))?")


def _split_rest(rest: str) -> tuple[str | None, str, str | None]:
    """Split what follows `op(...)` into the attribute block, the types and the location."""
    rest = rest.strip()
    attrs = None
    if rest.startswith("{"):
        depth, quote, i = 0, False, 0
        while i < len(rest):
            c = rest[i]
            if quote:
                if c == "\\":
                    i += 1
                elif c == '"':
                    quote = False
            elif c == '"':
                quote = True
            elif c in "{[(":
                depth += 1
            elif c in "}])":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        attrs, rest = rest[1:i], rest[i + 1 :].strip()
    if not rest.startswith(": "):
        raise ValueError("expected ' : TYPE' after the operands and attributes")
    rest = rest[2:]
    loc = None
    if (m := re.search(r' loc\(("(?:[^"\\]|\\.)*")\)$', rest)) is not None:
        loc, rest = json.loads(m[1]), rest[: m.start()]
    return attrs, rest, loc


def _parse_types(text: str) -> tuple[TensorType, ...]:
    text = text.strip()
    if text.startswith("("):
        return tuple(parse_type(t) for t in split_top(text[1:-1]))
    return (parse_type(text),)


def parse(text: str, *, weights: Mapping[str, torch.Tensor] | None = None) -> Graph:
    """The graph that `text` prints. `weights` supplies the tensors `const` nodes name."""
    lines = [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines())]
    lines = [(i, ln) for i, ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ParseError("empty IR text: expected 'graph @name(...) {'")
    lineno, first = lines[0]
    m = _HEADER.fullmatch(first)
    if m is None:
        raise ParseError(f"line {lineno}: expected 'graph @name(%arg: TYPE, ...) {{', got {first!r}")
    inputs, env = _arguments(m[2], lineno)
    dims: list[DimRange] = []
    nodes, outputs, end = _block(lines, 1, env, dims, "return")
    if end != len(lines) - 1:
        raise ParseError(f"line {lines[-1][0]}: expected the end of the IR text after '}}'")
    return Graph(m[1], tuple(inputs), tuple(nodes), outputs, tuple(dims), dict(weights or {}))


_REGION_ARGS = re.compile(r"\^\((.*)\)")


def _arguments(text: str, lineno: int) -> tuple[list[Node], dict[str, Node]]:
    """The `input` nodes of `%name: TYPE, ...` (a graph's or a region's arguments)."""
    env: dict[str, Node] = {}
    inputs: list[Node] = []
    for i, arg in enumerate(split_top(text) if text.strip() else []):
        am = _ARG.fullmatch(arg)
        if am is None:
            raise ParseError(f"line {lineno}: expected '%name: TYPE' for argument {i}, got {arg!r}")
        if am[1] in env:
            raise ParseError(f"line {lineno}: argument %{am[1]} is defined twice")
        node = Node.create("input", (), {"name": am[1], "index": i}, (_at(lineno, parse_type, am[2]),))
        env[am[1]] = node
        inputs.append(node)
    return inputs, env


def _value(env: dict[str, Node], ref: str, lineno: int, region: bool) -> Value:
    rm = _REF.fullmatch(ref.strip())
    if rm is None or rm[1] not in env:
        hint = " (a region reads only its ^(...) arguments)" if region else ""
        raise ParseError(f"line {lineno}: {ref.strip()!r} is not a value defined above{hint}")
    node, n = env[rm[1]], len(env[rm[1]].types)
    if (rm[2] is None) != (n == 1) or int(rm[2] or 0) >= n:
        want = f"%{rm[1]}" if n == 1 else f"%{rm[1]}#0..%{rm[1]}#{n - 1}"
        raise ParseError(f"line {lineno}: {ref.strip()!r} does not name a result; %{rm[1]} has {n}, expected {want}")
    return Value(node, int(rm[2] or 0))


def _block(
    lines: list[tuple[int, str]], start: int, env: dict[str, Node], dims: list[DimRange] | None, keyword: str
) -> tuple[list[Node], tuple[Value, ...], int]:
    """Parse node lines from `lines[start]` up to `keyword` (`return`, or `yield` in a region,
    where `dims` is None) and the closing `}`: the nodes, the outputs and the index of `}`."""
    region = dims is None
    nodes: list[Node] = []
    outputs: tuple[Value, ...] | None = None
    i = start
    while i < len(lines):
        lineno, line = lines[i]
        if outputs is not None:
            if line != "}":
                raise ParseError(f"line {lineno}: expected '}}' after {keyword}, got {line!r}")
            return nodes, outputs, i
        if not region and (dm := _DIM.fullmatch(line)):
            dims.append(DimRange(dm[1], int(dm[2]), None if dm[3] == "oo" else int(dm[3])))
        elif line.startswith(keyword):
            outputs = tuple(_value(env, r, lineno, region) for r in split_top(line[len(keyword) :]))
        elif nm := _NODE.fullmatch(line):
            if nm[1] in env:
                raise ParseError(f"line {lineno}: %{nm[1]} is defined twice")
            operands = tuple(_value(env, r, lineno, region) for r in split_top(nm[4])) if nm[4].strip() else ()
            opens = nm[5].endswith(" {")  # a region follows
            attrs_text, types_text, loc = _at(lineno, _split_rest, nm[5][:-2] if opens else nm[5])
            attrs: dict[str, Any] = {}
            for item in split_top(attrs_text) if attrs_text else []:
                key, _, val = item.partition("=")
                attrs[key.strip()] = _at(lineno, parse_attr, val)
            types = _at(lineno, _parse_types, types_text)
            if len(types) != int(nm[2] or 1):
                raise ParseError(f"line {lineno}: declares {nm[2] or 1} results but {len(types)} types")
            if opens:
                attrs["body"], i = _region(lines, i + 1, str(attrs.get("kind", nm[3])))
            node = Node.create(nm[3], operands, attrs, types, loc)
            env[nm[1]] = node
            nodes.append(node)
        else:
            want = "'%N = op(...) : TYPE' or 'yield'" if region else "'dim', '%N = op(...) : TYPE' or 'return'"
            raise ParseError(f"line {lineno}: expected {want}, got {line!r}")
        i += 1
    raise ParseError(f"line {lines[-1][0]}: unexpected end of IR text: expected '{keyword} ...' and '}}'")


def _region(lines: list[tuple[int, str]], start: int, name: str) -> tuple[Graph, int]:
    """The region whose `^(...)` line is `lines[start]`: its graph and the index of its `}`."""
    if start >= len(lines):
        raise ParseError(f"line {lines[-1][0]}: unexpected end of IR text: expected the region's '^(%name: TYPE, ...)'")
    lineno, line = lines[start]
    am = _REGION_ARGS.fullmatch(line)
    if am is None:
        raise ParseError(f"line {lineno}: expected the region's arguments '^(%name: TYPE, ...)', got {line!r}")
    inputs, env = _arguments(am[1], lineno)
    nodes, outputs, end = _block(lines, start + 1, env, None, "yield")
    return Graph(name, tuple(inputs), tuple(nodes), outputs), end


def _at(lineno: int, fn, *args):
    try:
        return fn(*args)
    except ParseError:
        raise
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise ParseError(f"line {lineno}: {e}") from None
