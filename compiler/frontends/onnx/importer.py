"""Import an ONNX model into the IR: checks, size symbols, initializers, node by node.

    imp = Importer(model_proto)
    graph, input_names, output_names = imp.run()

Each node is mapped by its rule in `mapping.RULES` (an op of the op set, or a `torch` node
calling the equivalent aten op); a node with no rule, or a variant a rule does not cover,
becomes an `onnx` node that `onnx.reference` evaluates at run time (`Importer.fallback`).
Values known at import time (constants, shape computations) stay `Static` and are folded
(see `values.py`); they become tensors only where an op needs one.

Initializers become `const` nodes named by the module path of the node that uses them
(`pkg.torch.onnx.name_scopes` metadata, as `torch.onnx.export(dynamo=True)` writes it):
a linear's weight is `{path}.weight` whatever the initializer was called (`val_152`), so
plan rules match the same names as on the torch route.

Size symbols get upper bounds where the graph needs one to be well typed, as torch.export
records them (its range constraints): BERT's position ids are a slice of a [1, 512] buffer
up to the sequence length `s`, [1, Min(512, s)], added to [b, s, 384]; that only broadcasts
for s <= 512, so the importer records `s in [1, 512]` (`assume_bounds`), types the slice
[1, s] and the compiled model refuses longer inputs, naming the bound.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import sympy
import torch

from ...ir import DimRange, DType, Graph, Node, TensorType, Value, sym
from ...ir.types import refine
from ...ir.ops import OPS
from .values import DTYPE_OF, ONNX_OF, Static, ir_dtype, symbolic_array

Entry = "Value | Static | None"
SCOPES = "pkg.torch.onnx.name_scopes"
#: Domains whose ops the frontend knows (by their schemas in `onnx.defs`).
DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


class OnnxImportError(ValueError):
    """The ONNX model is malformed or uses something mxc cannot import; names the node."""


def describe(node: onnx.NodeProto) -> str:
    return f"node {node.name or '<unnamed>'!r} ({node.domain + '.' if node.domain else ''}{node.op_type})"


def one_node_model(node: onnx.NodeProto, inputs: list[onnx.ValueInfoProto | None],
                   outputs: list[onnx.ValueInfoProto | None], opset_import: Any,
                   initializers: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    """A model of `node` alone, its operands and results renamed after `inputs` and `outputs`
    (one `ValueInfoProto` each, None for an omitted optional one), to run (`fold`) or type
    (`Importer.infer`) it on its own:

        Add(x, bias) -> y    becomes    graph(in0, in1) { Add(in0, in1) -> out0 }
    """
    one = onnx.NodeProto()
    one.CopyFrom(node)
    del one.input[:], one.output[:]
    one.input.extend(vi.name if vi is not None else "" for vi in inputs)
    one.output.extend(vi.name if vi is not None else "" for vi in outputs)
    graph = onnx.helper.make_graph([one], f"one_{node.op_type}", [vi for vi in inputs if vi is not None],
                                   [vi for vi in outputs if vi is not None], list(initializers))
    return onnx.helper.make_model(graph, opset_imports=opset_import)


def check(model: onnx.ModelProto) -> None:
    """Refuse a malformed model or an op/opset mxc does not know, naming the node."""
    opsets = {o.domain: o.version for o in model.opset_import}
    if "" not in opsets and "ai.onnx" not in opsets:
        raise OnnxImportError("the model imports no default ONNX opset (opset_import has no domain '')")
    for node in model.graph.node:
        domain = node.domain if node.domain != "ai.onnx" else ""
        if domain not in DOMAINS:
            raise OnnxImportError(f"{describe(node)} uses domain {node.domain!r}; mxc imports the ONNX domains "
                                  f"{', '.join(repr(d) for d in DOMAINS)}")
        version = opsets.get(domain, opsets.get("ai.onnx" if domain == "" else domain))
        if version is None:
            raise OnnxImportError(f"{describe(node)}: the model imports no opset for domain {node.domain!r}")
        if not onnx.defs.has(node.op_type, version, domain):
            raise OnnxImportError(f"{describe(node)}: op {node.op_type!r} is not defined in opset {version} of "
                                  f"domain {node.domain or 'ai.onnx'!r}")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise OnnxImportError(f"malformed ONNX model: {str(e).strip()}") from None


def module_path(node: onnx.NodeProto) -> str | None:
    """The module path the exporter recorded for `node` (the scope before the op's own name)."""
    for p in node.metadata_props:
        if p.key == SCOPES:
            scopes = [s for s in _parse_scopes(p.value) if s and not s.startswith("_empty")]
            return scopes[-2] if len(scopes) >= 2 else None
    return None


def _parse_scopes(text: str) -> list[str]:
    import ast

    try:
        got = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [str(s) for s in got] if isinstance(got, (list, tuple)) else []


class Importer:
    """State while walking one ONNX graph (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto, name: str | None = None):
        check(model)
        if model.functions:
            model = onnx.inliner.inline_local_functions(model)
        self.model = model
        self.opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
        self.opset = self.opsets.get("", 1)
        g = model.graph
        self.name = re.sub(r"[^\w.\-]", "_", name or g.name or "onnx_model") or "onnx_model"
        self.env: dict[str, Any] = {}
        self.nodes: list[Node] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.consts: dict[tuple[int, str], Value] = {}
        self.const_owner: dict[str, int] = {}
        self.prod: dict[str, onnx.NodeProto] = {o: n for n in g.node for o in n.output}
        self.uses: dict[str, int] = {}
        for n in g.node:
            for i in n.input:
                self.uses[i] = self.uses.get(i, 0) + 1
        for o in g.output:
            self.uses[o.name] = self.uses.get(o.name, 0) + 1
        self.symbols: dict[str, sympy.Symbol] = {}
        self.ranges: dict[sympy.Symbol, tuple[int, int | None]] = {}  # each symbol's (lo, hi)
        self.loc: str | None = None  # the module path of the node being imported

    @staticmethod
    def dtype(elem_type: int, where: str) -> DType:
        """The IR dtype of ONNX element type `elem_type` (`values.ir_dtype`); an
        `OnnxImportError` naming `where` (a value, a node's output) when it has none."""
        try:
            return ir_dtype(elem_type, where)
        except ValueError as e:
            raise OnnxImportError(str(e)) from None

    # ------------------------------------------------------------------ inputs
    def _dim(self, d: onnx.TensorShapeProto.Dimension, axis: int, where: str):
        if d.HasField("dim_value"):
            return int(d.dim_value)
        param = d.dim_param or f"{where}_{axis}"
        if param not in self.symbols:
            base = {0: "b", 1: "s"}.get(axis, "d")
            taken = {str(s) for s in self.symbols.values()}
            name, k = base, 1
            while name in taken:
                name, k = f"{base}{k}", k + 1
            self.symbols[param] = sym(name)
            self.ranges[sym(name)] = (1, None)
        return self.symbols[param]

    def _input(self, vi: onnx.ValueInfoProto, index: int) -> Node:
        t = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise OnnxImportError(f"graph input {vi.name!r} is not a tensor ({vi.type.WhichOneof('value')}); "
                                  "mxc imports tensor inputs only")
        where = f"graph input {vi.name!r}"
        dtype = self.dtype(t.elem_type, where)
        if not t.HasField("shape"):
            raise OnnxImportError(f"{where} has no shape; mxc needs each input's rank")
        shape = tuple(self._dim(d, i, vi.name) for i, d in enumerate(t.shape.dim))
        node = Node.create("input", (), {"name": _ident(vi.name), "index": index}, [TensorType(shape, dtype)])
        self.env[vi.name] = node.out
        return node

    # ------------------------------------------------------------------ constants
    def const(self, st: Static, name: str, transpose: bool = False) -> Value:
        """A `const` node named `name` holding `st` (transposed once for a linear's weight)."""
        key = (id(st), name)
        if key in self.consts:
            return self.consts[key]
        if name in self.const_owner and self.const_owner[name] != id(st):
            k = 1
            while f"{name}.{k}" in self.const_owner:
                k += 1
            name = f"{name}.{k}"
        from ...runtime.onnx_node import to_torch

        tensor = to_torch(st.numeric(), torch.device("cpu"))
        if tensor.dtype != st.dtype.torch:
            tensor = tensor.to(st.dtype.torch)
        if transpose:
            tensor = tensor.T.contiguous()
        self.weights[name] = tensor
        self.const_owner[name] = id(st)
        node = Node.create("const", (), {"name": name}, [TensorType(tuple(tensor.shape), st.dtype)])
        self.nodes.append(node)
        self.consts[key] = node.out
        return node.out

    def weight_name(self, st: Static, loc: str | None, role: str, fallback: str) -> str:
        """The const name of an initializer used as `role` ("weight", "bias") by a node in
        module `loc`: `{loc}.{role}`; the initializer's own name where no path is known."""
        if loc:
            return f"{loc}.{role}"
        return self.init_name(st) or fallback

    def init_name(self, st: Static) -> str | None:
        """The const name of initializer `st` used by a node in module `self.loc`: a state-dict
        name (`model.layers.0.input_layernorm.weight`) the exporter shared between modules
        because the tensors were equal is renamed for the module using it
        (`model.layers.1.input_layernorm.weight`), as the torch route names it."""
        if st.init is None or not self.loc or "." not in st.init:
            return st.init
        prefix, suffix = st.init.rsplit(".", 1)
        if suffix in ("weight", "bias") and prefix != self.loc and not self.loc.startswith(prefix + "."):
            return f"{self.loc}.{suffix}"
        return st.init

    def value(self, e: Any, name: str = "") -> Value:
        """`e` as an IR tensor: a Static becomes a `const` (numbers) or is built from its sizes."""
        if isinstance(e, Value):
            return e
        if not isinstance(e, Static):
            raise OnnxImportError(f"value {name!r} is missing (an omitted optional input where a tensor is needed)")
        if not e.symbolic:
            return self.const(e, self.init_name(e) or f"onnx.const.{_ident(name) or len(self.weights)}")
        # a size computed from the inputs' shapes: a tensor built at run time
        from ...ir import DEVICE

        parts = []
        for d in e.dims():
            node = Node.create("torch", (), {"target": "aten.full.default", "args": ((1,), d),
                                              "kwargs": {"dtype": e.dtype, "device": DEVICE}},
                               [TensorType((1,), e.dtype)])
            self.nodes.append(node)
            parts.append(node.out)
        out = parts[0] if len(parts) == 1 else self.emit_ir("cat", parts, {"axis": 0})
        if e.array.ndim == 0:
            out = self.emit_torch("aten.squeeze.dims", [out], (0, (0,)), TensorType((), e.dtype))
        return out

    # ------------------------------------------------------------------ size bounds
    def refined(self, d):
        """Dim `d` with each `Min`/`Max` the symbols' known bounds decide made plain
        (`Min(512, s)` is `s` once s <= 512 is recorded)."""
        if not isinstance(d, sympy.Expr) or not d.has(sympy.Min, sympy.Max):
            return d
        r = refine(d, self.ranges)
        if r == d:
            return d
        r = sympy.simplify(r)
        return int(r) if r.is_Integer else r

    def refined_type(self, t: TensorType) -> TensorType:
        return t.with_shape(tuple(self.refined(d) for d in t.shape))

    def _refined_attr(self, v: Any) -> Any:
        if isinstance(v, sympy.Expr):
            return self.refined(v)
        if isinstance(v, tuple):
            return tuple(self._refined_attr(x) for x in v)
        return v

    def assume_bounds(self, types: list[TensorType], infer, error: TypeError) -> list[TensorType]:
        """`infer(types)` (which raised `error`) under the one upper bound on a size symbol
        that makes it succeed: for each `Min(n, s + c)` in the operands' dims, `s <= n - c` is
        tried, as torch.export guards it. The bound is recorded; without one, `error` is raised."""
        candidates: dict[sympy.Symbol, int] = {}
        for t in types:
            for d in t.shape:
                if not isinstance(d, sympy.Expr):
                    continue
                for m in d.atoms(sympy.Min):
                    if len(m.args) != 2:
                        continue
                    for n, x in (m.args, m.args[::-1]):
                        c, s = x.as_coeff_Add()  # x = s + c
                        if not n.is_Integer or s not in self.ranges:
                            continue
                        lo, hi = self.ranges[s]
                        bound = int(n - c)
                        if bound >= lo and (hi is None or bound < hi):
                            candidates[s] = bound
        for s, bound in candidates.items():
            before = self.ranges[s]
            self.ranges[s] = (before[0], bound)
            try:
                return infer([self.refined_type(t) for t in types])
            except TypeError:
                self.ranges[s] = before
        raise error

    def _types(self, op: str, inputs: list[Value], attrs: dict) -> list[TensorType]:
        """The output types of IR op `op`, by its type rule on the operands' refined types."""
        types = [self.refined_type(v.type) for v in inputs]
        try:
            out = OPS[op].infer(types, attrs)
        except TypeError as e:
            out = self.assume_bounds(types, lambda ts: OPS[op].infer(ts, attrs), e)
        return [self.refined_type(t) for t in out]

    # ------------------------------------------------------------------ emitting
    def emit_ir(self, op: str, inputs: list[Value], attrs: dict, loc: str | None = None) -> Value:
        """An op of the op set; its type comes from the op's own type rule (with the size
        bounds it needs recorded, see `assume_bounds`)."""
        types = self._types(op, inputs, attrs)
        node = Node.create(op, inputs, attrs, types, loc)
        self.nodes.append(node)
        return node.out

    def emit_torch(self, target: str, inputs: list[Value], args: tuple, types, loc: str | None = None,
                   kwargs: dict | None = None):
        """A `torch` node calling `target` with `args` (`Ref(i)` = input i), typed `types`."""
        attrs: dict[str, Any] = {"target": target, "args": args}
        if kwargs:
            attrs["kwargs"] = kwargs
        types = [types] if isinstance(types, TensorType) else list(types)
        node = Node.create("torch", inputs, attrs, types, loc)
        self.nodes.append(node)
        return node.out if len(types) == 1 else node.outs

    def infer(self, node: onnx.NodeProto, entries: list[Any]) -> list[TensorType]:
        """The output types of `node` on operands `entries`, by ONNX shape inference on a
        one-node model whose symbolic dims are named for the IR's size expressions."""
        names: dict[str, Any] = {}
        inputs: list[onnx.ValueInfoProto | None] = []
        inits: list[onnx.TensorProto] = []

        def dim(d):
            d = self.refined(d)
            if isinstance(d, int):
                return d
            key = f"mxc:{d}"  # equal sizes get one name, so broadcasting unifies them
            names[key] = d
            return key

        for i, (name, e) in enumerate(zip(node.input, entries)):
            if name == "" or e is None:
                inputs.append(None)
                continue
            iname = f"in{i}"
            if isinstance(e, Static) and not e.symbolic:
                arr = e.numeric()
                inits.append(onnx.numpy_helper.from_array(arr, iname))
                inputs.append(onnx.helper.make_tensor_value_info(iname, ONNX_OF[e.dtype.name], arr.shape))
            else:
                t = self.value(e, name).type if isinstance(e, Static) else e.type
                inputs.append(onnx.helper.make_tensor_value_info(iname, ONNX_OF[t.dtype.name], [dim(d) for d in t.shape]))
        outs = [f"out{i}" for i in range(len(node.output))]
        model = one_node_model(node, inputs, [onnx.ValueInfoProto(name=o) for o in outs], self.model.opset_import,
                               inits)
        model.ir_version = self.model.ir_version
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        except Exception as e:  # noqa: BLE001 - onnx raises several types here
            raise OnnxImportError(f"{describe(node)}: ONNX shape inference failed: {e}") from None
        types = []
        found = {vi.name: vi for vi in inferred.graph.output}
        for o, orig in zip(outs, node.output):
            vi = found.get(o)
            tt = vi.type.tensor_type if vi is not None else None
            if tt is None or not tt.HasField("shape") or tt.elem_type == 0:
                raise OnnxImportError(f"{describe(node)}: the type of output {orig!r} cannot be inferred "
                                      "(mxc needs shapes that follow from the input shapes)")
            shape = []
            for k, d in enumerate(tt.shape.dim):
                if d.HasField("dim_value"):
                    shape.append(int(d.dim_value))
                elif d.dim_param in names:
                    shape.append(names[d.dim_param])
                else:
                    raise OnnxImportError(f"{describe(node)}: dim {k} of output {orig!r} depends on data, not on "
                                          "the input shapes; mxc needs static or symbolic sizes")
            types.append(TensorType(tuple(shape), self.dtype(tt.elem_type, f"{describe(node)} output {orig!r}")))
        return types

    def fallback(self, node: onnx.NodeProto, entries: list[Any]) -> list[Value]:
        """An `onnx` node: the op run as is by `onnx.reference` (listed in the report)."""
        from ...runtime.onnx_node import stored_attribute

        types = self.infer(node, entries)
        operands: list[Value] = []
        slots: list[int | None] = []
        for name, e in zip(node.input, entries):
            if name == "" or e is None:
                slots.append(None)
            else:
                slots.append(len(operands))
                operands.append(self.value(e, name))
        attrs = {"op_type": node.op_type, "domain": node.domain, "opset": self.opsets.get(node.domain, self.opset),
                 "attributes": {a.name: stored_attribute(a) for a in node.attribute}, "operands": tuple(slots)}
        out = Node.create("onnx", operands, attrs, types, module_path(node))
        self.nodes.append(out)
        return list(out.outs)

    # ------------------------------------------------------------------ walking
    def run(self) -> tuple[Graph, list[str], list[str]]:
        from .mapping import map_node

        g = self.model.graph
        init_names = {i.name for i in g.initializer}
        inputs = []
        for vi in g.input:
            if vi.name not in init_names:
                inputs.append(self._input(vi, len(inputs)))
        for init in g.initializer:
            dtype = self.dtype(init.data_type, f"initializer {init.name!r}")
            self.env[init.name] = Static(onnx.numpy_helper.to_array(init), dtype, init.name)
        for node in g.node:
            entries = [self.env.get(i) if i else None for i in node.input]
            for i, e in zip(node.input, entries):
                if i and e is None:
                    raise OnnxImportError(f"{describe(node)} reads {i!r}, which no node, input or initializer defines "
                                          "before it (the graph must be topologically sorted)")
            self.loc = module_path(node)
            try:
                outs = map_node(self, node, entries)
            except OnnxImportError:
                raise
            except (TypeError, ValueError) as e:
                raise OnnxImportError(f"{describe(node)}: {e}") from e
            for name, v in zip(node.output, outs):
                if name:
                    self.env[name] = v
        outputs = []
        for o in g.output:
            if o.name not in self.env:
                raise OnnxImportError(f"graph output {o.name!r} is not produced by any node")
            outputs.append(self.value(self.env[o.name], o.name))
        dims = tuple(DimRange(s.name, lo, hi) for s, (lo, hi) in self.ranges.items())
        graph = Graph(self.name, tuple(inputs), tuple(self.nodes), tuple(outputs), dims, self.weights)
        graph = graph.dead_code_eliminated()
        # types and sizes made before a bound was recorded: `Min(512, s)` becomes `s`
        graph = graph.rewrite(lambda n: n.replace(types=[self.refined_type(t) for t in n.types],
                                                  attrs={k: self._refined_attr(v) for k, v in n.attrs}))
        used = {n.get("name") for n in graph.nodes if n.op == "const"}
        graph = graph.replace(weights={k: v for k, v in self.weights.items() if k in used})
        return graph, [n.get("name") for n in inputs], [_ident(o.name) for o in g.output]


def _ident(name: str) -> str:
    """`name` as an IR argument name (letters, digits, `_` and `.`)."""
    out = re.sub(r"[^\w.]", "_", name)
    return out if out and not out[0].isdigit() else f"_{out}"


__all__ = ["Importer", "OnnxImportError", "DTYPE_OF", "symbolic_array"]
