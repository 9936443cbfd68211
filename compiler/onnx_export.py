"""Export a compiled model as a standard ONNX model: `mxc.export_onnx(compiled, "model.onnx")`.

The final IR (after every pass) is written with standard ONNX ops only, so that
`onnx.checker.check_model(model, full_check=True)` accepts it and any ONNX runtime (here
tested with `onnx.reference.ReferenceEvaluator`) computes what mxc's reference backend
computes. Fused regions are inlined (a region computes what its nodes compute), packed
weights are unpacked to their codes, and every op becomes plain ONNX:

    linear                 MatMul with the weight stored transposed [K, N] (as torch.onnx
                           does) + Add for a bias
    dequantize / qlinear   DequantizeLinear of the weight codes (the standard "QDQ" form a
                           runtime fuses into an integer or low-bit GEMM), MatMul; a quantized
                           activation is DequantizeLinear of the codes its `quantize` made
    quantize (dynamic)     ReduceMax(Abs) (ReduceMin/ReduceMax for asymmetric formats), Div,
                           the scale rounded to its storage dtype (Cast), then QuantizeLinear,
                           or Div/Add/Round/Clip/Cast where QuantizeLinear would round or clip
                           differently (asymmetric codes: mxc rounds x/s + z, ONNX rounds x/s
                           and adds z; widths narrower than their container)
    rms_norm, rope,        primitive ops in the reference backend's order; layer_norm is
    attention, silu        LayerNormalization; attention is MatMul/Softmax with GQA heads
                           repeated (Unsqueeze/Expand/Reshape), a boolean mask as Where, a
                           float mask added, causal as a Trilu mask
    shape ops              Reshape/Transpose/Slice/Concat/Unsqueeze/Expand/Gather; a size
                           symbol (`b`, `s`) is read from the input's Shape at run time and
                           a shape expression over symbols is computed with integer ops
    torch fallbacks        the ONNX op for each aten target in `ATEN_OPS` (the rules are in
                           `onnx_export_aten.py`); any other target raises `OnnxExportError`
                           naming it

**Storage of quantized weights.** Codes are stored at their real width where ONNX has the
type, else in the narrowest ONNX type that holds every code exactly:

    int8 / int4 / int2 (sym)       INT8 / INT4 / INT2 (INT2: opset 25)
    int8 / int4 / int2 (asym)      UINT8 / UINT4 / UINT2, zero points of the same type
    int3 (sym / asym)              INT4 / UINT4          (wider container, exact)
    int5..int7 (sym / asym)        INT8 / UINT8          (wider container, exact)
    fp8e4m3 / fp8e5m2              FLOAT8E4M3FN / FLOAT8E5M2
    fp4e2m1 (mxfp4, nvfp4)         FLOAT4E2M1 (opset 23)
    fp6e2m3 / fp6e3m2 (mxfp6)      FLOAT6E2M3 / FLOAT6E3M2 (opset 28)

An opset below a type's opset stores it in a wider container that holds it exactly (int2 in
INT4, fp4 and fp6 in FLOAT8E4M3FN: every fp4/fp6 value is an e4m3 value). Scales are stored
in their storage dtype where ONNX has it (f16 -> FLOAT16, fp8e4m3 -> FLOAT8E4M3FN, then a
Cast to float), e8m0 and f32 scales as FLOAT; a group or block scale is DequantizeLinear's
`block_size` along K (a shorter last block has its own scale, as in mxc); nvfp4's global
scale multiplies the block scales before DequantizeLinear (`codes · (scale · global)`, the
reference's order). Dequantized weights are therefore exactly the reference's.

**Numerics.** A float graph and a weight-only quantized graph match the reference backend to
float32 rounding (the order of a few additions). A `qlinear` (quantized activations and
weights) is written as dequantize-then-MatMul in float32, where the reference accumulates the
integer products exactly in float64 and applies the scales after: the results differ by
float32 rounding, and an activation code downstream may then round to its neighbour. The
default opset is the lowest (at least 21: int4 and blocked quantization) that stores every
format of the graph at its real width; `opset=` asks for another (>= 21).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import numpy as np
import onnx
import sympy
import torch
from onnx import TensorProto, helper, numpy_helper

from .ir import DType, Graph, Node, Value
from .ir.formats import SCALE_MAX, FloatFormat, IntFormat, NumberFormat
from .ir.ops import SLICE_END, quant_parts
from .ir.packing import from_codes, unpack
from .ir.printer import print_node, region_of, value_names
from .onnx_export_aten import ATEN_OPS, F, INT64_MAX, torch_node
from .runtime.onnx_node import ONNX_TYPES, to_numpy

#: The lowest opset the exporter writes: int4/uint4 and blocked (De)QuantizeLinear.
MIN_OPSET = 21
#: The largest opset of the installed onnx package (1.23: 28).
MAX_OPSET = onnx.defs.onnx_opset_version()
#: Initializers larger than this in all (bytes) are saved as external data, `{path}.data`:
#: a protobuf holds at most 2 GB.
EXTERNAL_DATA_BYTES = 1_500_000_000

#: Float element formats: (their ONNX type, the opset that has it).
_FLOAT_TYPES = {
    "fp8e4m3": (TensorProto.FLOAT8E4M3FN, MIN_OPSET), "fp8e5m2": (TensorProto.FLOAT8E5M2, MIN_OPSET),
    "fp4e2m1": (TensorProto.FLOAT4E2M1, 23), "fp6e2m3": (TensorProto.FLOAT6E2M3, 28),
    "fp6e3m2": (TensorProto.FLOAT6E3M2, 28),
}
#: Scale storage dtypes ONNX holds exactly, and their types (others are stored as FLOAT).
_SCALE_TYPES = {"f16": TensorProto.FLOAT16, "fp8e4m3": TensorProto.FLOAT8E4M3FN}


class OnnxExportError(ValueError):
    """The graph has a node the exporter cannot write as standard ONNX (an unmapped aten
    target, an unsupported format option); the message names the node and what is mapped."""


def export_onnx(compiled: Any, path: str | os.PathLike | None = None, *, opset: int | None = None) -> onnx.ModelProto:
    """Write `compiled` (a `CompiledModel`, float or quantized) as a standard ONNX model to
    `path` (when given) and return the `ModelProto`.

    Inputs keep the compiled model's input names (`input_ids`), outputs take the names of its
    output record (`logits`), size symbols become `dim_param`s (`b`, `s`), initializers keep
    the IR's weight names (`model.layers.0.mlp.up_proj.weight`, `...weight.scale`). The
    model passes `onnx.checker.check_model(full_check=True)`. Initializers over
    `EXTERNAL_DATA_BYTES` are saved as external data beside `path` (`{path}.data`), the model
    checked from its files and returned as loaded from them; such a model needs a `path`.

        model = mxc.export_onnx(mxc.compile(model, "w4a16-g128"), "llama-w4.onnx")
        onnx.reference.ReferenceEvaluator(model).run(None, {"input_ids": ids})
    """
    graph: Graph = compiled.graph
    needed = max([MIN_OPSET] + [_format_opset(f) for f in _formats(graph)])
    opset = needed if opset is None else opset
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxExportError(f"opset must be in {MIN_OPSET}..{MAX_OPSET} (onnx {onnx.__version__}), got {opset}")
    outputs = _output_names(compiled.call_spec, len(graph.outputs))
    model = _Exporter(graph, opset).model(outputs)
    model.metadata_props.add(key="mxc.plan", value=str(getattr(compiled.plan, "name", None) or
                                                      ("float" if compiled.plan is None else "custom")))
    big = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    if not big:
        onnx.checker.check_model(model, full_check=True)
    elif path is None:
        raise OnnxExportError(f"the initializers of {graph.name!r} take more than {EXTERNAL_DATA_BYTES} bytes, "
                              "over what one protobuf holds (2 GB); pass path= to save them as external data")
    if path is not None:
        path = os.fspath(path)
        onnx.save_model(model, path, save_as_external_data=big,
                        location=os.path.basename(path) + ".data" if big else None)
        if big:  # a model over 2 GB is checked from its files
            onnx.checker.check_model(path, full_check=True)
            model = onnx.load(path)
    return model


def _formats(graph: Graph) -> list[NumberFormat]:
    """Every number format a value of `graph` (or of a region in it) has."""
    out = []
    for g in [graph] + [region_of(n) for n in graph.nodes if region_of(n) is not None]:
        for n in (*g.inputs, *g.nodes):
            out += [t.dtype for t in n.types if isinstance(t.dtype, (IntFormat, FloatFormat))]
    return out


def _format_opset(fmt: NumberFormat) -> int:
    """The lowest opset with an ONNX type that holds `fmt`'s elements at their real width."""
    if isinstance(fmt, FloatFormat):
        return _FLOAT_TYPES[fmt.name][1]
    return 25 if fmt.bits <= 2 else MIN_OPSET


def _container(fmt: NumberFormat, opset: int) -> int:
    """The ONNX type `fmt`'s codes are stored in at `opset` (see the module docstring)."""
    if isinstance(fmt, FloatFormat):
        onnx_type, since = _FLOAT_TYPES[fmt.name]
        return onnx_type if opset >= since else TensorProto.FLOAT8E4M3FN
    bits = fmt.bits if fmt.bits > 2 or opset >= 25 else 4
    width = 2 if bits <= 2 else 4 if bits <= 4 else 8
    if fmt.symmetric:
        return {2: TensorProto.INT2, 4: TensorProto.INT4, 8: TensorProto.INT8}[width]
    return {2: TensorProto.UINT2, 4: TensorProto.UINT4, 8: TensorProto.UINT8}[width]


def _native(fmt: NumberFormat, opset: int) -> bool:
    """Whether `fmt`'s codes are exactly the values of their container type (QuantizeLinear
    then rounds and clips as mxc does): symmetric integers of the container's width, floats
    in their own type."""
    if isinstance(fmt, FloatFormat):
        return opset >= _FLOAT_TYPES[fmt.name][1]
    if not fmt.symmetric:
        return False
    lo, hi = _RANGES[_container(fmt, opset)]
    return (lo, hi) == (-(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1)


_RANGES = {TensorProto.INT2: (-2, 1), TensorProto.INT4: (-8, 7), TensorProto.INT8: (-128, 127)}


def _output_names(call_spec: Any, n: int) -> list[str]:
    """The fields of the output record (`logits`), else `output` / `output_0`, `output_1`."""
    spec = getattr(call_spec, "out_spec", None)
    ctx = getattr(spec, "context", None) if spec is not None else None
    if isinstance(ctx, (list, tuple)) and len(ctx) == n and all(isinstance(k, str) for k in ctx) \
            and all(c.is_leaf() for c in spec.children()):
        return list(ctx)
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


def _flatten(graph: Graph) -> tuple[list[Node], dict[Value, Value]]:
    """The nodes of `graph` with every `fused` region inlined, in order, and the aliases that
    map a region's arguments to the operands of its node and a fused node's results to the
    values its region yields (so `resolve` finds the node that really computes a value)."""
    steps: list[Node] = []
    alias: dict[Value, Value] = {}

    def resolve(v: Value) -> Value:
        while v in alias:
            v = alias[v]
        return v

    def walk(g: Graph) -> None:
        for node in g.nodes:
            body = region_of(node) if node.op == "fused" else None
            if body is None:
                steps.append(node)
                continue
            for arg, operand in zip(body.inputs, node.inputs):
                alias[arg.out] = resolve(operand)
            walk(body)
            for i, out in enumerate(body.outputs):
                alias[Value(node, i)] = resolve(out)

    walk(graph)
    return steps, alias


class _Exporter:
    """Builds the ONNX graph of one IR graph: `model(output_names)`."""

    def __init__(self, graph: Graph, opset: int):
        self.graph = graph
        self.opset = opset
        self.steps, self.alias = _flatten(graph)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.names: dict[Value, str] = {}
        self.taken: set[str] = set()
        self.cache: dict[Any, str] = {}
        self.node: Node | None = None  # the IR node being written (names ONNX nodes, errors)
        self.symbols: dict[sympy.Symbol, tuple[str, int]] = {}
        for inp in graph.inputs:
            name = self._unique(inp.get("name"))
            self.names[inp.out] = name
            for axis, d in enumerate(inp.types[0].shape):
                if isinstance(d, sympy.Symbol) and d not in self.symbols:
                    self.symbols[d] = (name, axis)
        self.uses = self._uses()

    # ------------------------------------------------------------------ plumbing

    def resolve(self, v: Value) -> Value:
        while v in self.alias:
            v = self.alias[v]
        return v

    def _uses(self) -> dict[Value, set[str]]:
        """For each value, how it is read: "t" as a linear's weight (stored transposed), "n"
        in any other way (stored as is)."""
        uses: dict[Value, set[str]] = {}
        for node in self.steps:
            for i, v in enumerate(node.inputs):
                uses.setdefault(self.resolve(v), set()).add("t" if node.op == "linear" and i == 1 else "n")
        return uses

    def _unique(self, hint: str) -> str:
        name, k = hint, 1
        while name in self.taken:
            name, k = f"{hint}_{k}", k + 1
        self.taken.add(name)
        return name

    def emit(self, op_type: str, inputs: list[str], outputs: int = 1, **attrs: Any) -> Any:
        """Append an ONNX node; its name and outputs are named after the IR node's location.
        Returns the output name (or the list of names when `outputs` > 1)."""
        where = (self.node.loc or self.node.op) if self.node is not None else "mxc"
        outs = [self._unique(f"{where}/{op_type}") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self._unique(f"{where}/{op_type}:node"),
                                           **{k: v for k, v in attrs.items() if v is not None}))
        return outs[0] if outputs == 1 else outs

    def init(self, array: np.ndarray, hint: str, onnx_type: int | None = None) -> str:
        """An initializer holding `array` (converted to `onnx_type`, exactly)."""
        name = self._unique(hint)
        if onnx_type is not None:
            array = array.astype(helper.tensor_dtype_to_np_dtype(onnx_type))
        self.inits.append(numpy_helper.from_array(np.array(array, order="C", copy=True), name))
        return name

    def const(self, value: Any, onnx_type: int = TensorProto.INT64, shape: tuple[int, ...] | None = None) -> str:
        """A small constant (shared by every node that needs the same one)."""
        arr = np.array(value, dtype=helper.tensor_dtype_to_np_dtype(onnx_type))
        if shape is not None:
            arr = arr.reshape(shape)
        key = ("const", onnx_type, arr.shape, arr.tobytes())
        if key not in self.cache:
            self.cache[key] = self.init(arr, "const")
        return self.cache[key]

    @staticmethod
    def onnx_type(dtype: DType) -> int:
        """The ONNX element type of a plain IR dtype (`f32` -> FLOAT)."""
        return _onnx_type(dtype)

    def fail(self, what: str) -> OnnxExportError:
        return OnnxExportError(f"cannot export node {self._describe(self.node)} to ONNX: {what}")

    def _describe(self, node: Node | None) -> str:
        if node is None:
            return "(none)"
        names = value_names(self.graph)
        if node in names:
            return print_node(node, names)
        for outer in self.graph.nodes:  # a node of a fused region: its line there, and the region's node
            body = region_of(outer)
            inner = value_names(body) if body is not None else {}
            if node in inner:
                return f"{print_node(node, inner)} (in the region of {print_node(outer, names)})"
        return repr(node)

    # ------------------------------------------------------------------ values

    def value(self, v: Value) -> str:
        """The ONNX name of IR value `v` (a weight becomes an initializer on first use)."""
        v = self.resolve(v)
        name = self.names.get(v)
        if name is not None:
            return name
        node = v.node
        if node.op == "const":
            name = self._weight(node)
        elif node.op == "dequantize" and self._static(node):
            name = self._dequantize(node, transposed=False)
        else:
            raise self.fail(f"operand {v!r} is used before it is computed")
        self.names[v] = name
        return name

    def _weight(self, node: Node) -> str:
        """A float (or integer) const as an initializer of its own dtype."""
        t = node.types[0]
        if not isinstance(t.dtype, DType):
            raise OnnxExportError(f"const {node.get('name')!r} of type {t} is read by an op other than "
                                  "dequantize or qlinear; expected quantized codes to be dequantized")
        tensor = self.graph.weights[node.get("name")]
        return self.init(_numpy(tensor, t.dtype), node.get("name"))

    def _static(self, node: Node) -> bool:
        return all(self.resolve(v).node.op == "const" for v in node.inputs)

    def weight_t(self, v: Value) -> str:
        """The [K, N] float matrix a linear multiplies by, for its [N, K] weight operand `v`:
        a transposed initializer (or a DequantizeLinear of transposed codes) when nothing
        else reads the weight, else a Transpose of the shared tensor."""
        v = self.resolve(v)
        key = ("t", v)
        if key in self.cache:
            return self.cache[key]
        node = v.node
        if self.uses.get(v) == {"t"} and node.op == "const" and isinstance(node.types[0].dtype, DType):
            w = self.graph.weights[node.get("name")]
            name = self.init(_numpy(w, node.types[0].dtype).T, node.get("name"))
        elif self.uses.get(v) == {"t"} and node.op == "dequantize" and self._static(node):
            name = self._dequantize(node, transposed=True)
        else:
            name = self.emit("Transpose", [self.value(v)], perm=[1, 0])
        self.cache[key] = name
        return name

    # ------------------------------------------------------------------ sizes

    def dim(self, d: Any) -> str:
        """A 1-D int64 tensor [1] holding size `d` (an int or a sympy expression of the size
        symbols, read from the inputs' shapes at run time)."""
        d = sympy.sympify(d)
        key = ("dim", d)
        if key in self.cache:
            return self.cache[key]
        if d.is_Integer:
            name = self.const([int(d)])
        elif isinstance(d, sympy.Symbol):
            if d not in self.symbols:
                raise self.fail(f"size symbol {d} is not a dim of any graph input; expected one of "
                                f"{', '.join(map(str, self.symbols)) or '(none)'}")
            inp, axis = self.symbols[d]
            name = self.emit("Shape", [inp], start=axis, end=axis + 1)
        elif isinstance(d, (sympy.Add, sympy.Mul, sympy.Max, sympy.Min)):
            op = {sympy.Add: "Add", sympy.Mul: "Mul", sympy.Max: "Max", sympy.Min: "Min"}[type(d)]
            if isinstance(d, sympy.Mul) and any(a.is_Rational and not a.is_Integer for a in d.args):
                raise self.fail(f"size {d} is not an integer expression")
            parts = [self.dim(a) for a in d.args]
            name = parts[0]
            for p in parts[1:]:
                name = self.emit(op, [name, p])
        elif isinstance(d, (sympy.floor, sympy.ceiling)):
            num, den = sympy.fraction(sympy.together(d.args[0]))
            if not den.is_Integer:
                raise self.fail(f"size {d}: expected floor/ceiling of an expression over an integer")
            top = self.dim(num if isinstance(d, sympy.floor) else num + den - 1)
            name = self.emit("Div", [top, self.const([int(den)])])  # sizes are non-negative: Div is floor
        elif isinstance(d, sympy.Mod):
            name = self.emit("Mod", [self.dim(d.args[0]), self.dim(d.args[1])])
        elif isinstance(d, sympy.Pow) and d.args[1].is_Integer and d.args[1] > 0:
            base = self.dim(d.args[0])
            name = base
            for _ in range(int(d.args[1]) - 1):
                name = self.emit("Mul", [name, base])
        else:
            raise self.fail(f"size expression {d} has no ONNX form (expected + * floor ceiling Max Min Mod)")
        self.cache[key] = name
        return name

    def shape(self, dims: Any, minus_one: int | None = None) -> str:
        """A 1-D int64 shape tensor for `dims` (ints and sympy expressions); `minus_one`
        replaces -1 entries (Expand's "keep this dim" is 1)."""
        dims = [minus_one if (minus_one is not None and isinstance(d, int) and d == -1) else d for d in dims]
        if all(isinstance(d, int) for d in dims):
            return self.const(dims, shape=(len(dims),))
        if len(dims) == 1:
            return self.dim(dims[0])
        return self.emit("Concat", [self.dim(d) for d in dims], axis=0)

    def scalar(self, d: Any, onnx_type: int = TensorProto.INT64) -> str:
        """A scalar of `onnx_type` holding size `d`."""
        if isinstance(d, (int, float)) or (isinstance(d, sympy.Expr) and d.is_number):
            return self.const(d, onnx_type, shape=())
        name = self.emit("Squeeze", [self.dim(d), self.const([0])])
        return name if onnx_type == TensorProto.INT64 else self.emit("Cast", [name], to=onnx_type)

    # ------------------------------------------------------------------ quantized data

    def _dequantize(self, node: Node, transposed: bool) -> str:
        """A static `dequantize` (every part a const) as DequantizeLinear of initializers; a
        linear's weight is stored transposed, [K, N], with its scales along axis 0."""
        fmt = node.get("format")
        parts = dict(zip(quant_parts(fmt), node.inputs))
        return self.dequantize_const(fmt, parts, transposed)

    def dequantize_const(self, fmt: NumberFormat, parts: dict[str, Value], transposed: bool) -> str:
        """DequantizeLinear of a quantized weight whose parts (`codes`, `scale`, ...) are consts."""
        codes_node = self.resolve(parts["codes"]).node
        t = codes_node.types[0]
        name = codes_node.get("name")
        values = _code_values(self.graph.weights[name], t)  # float32 [N, K]
        if values.dim() != 2 and transposed:
            raise self.fail(f"weight {name!r} must be rank 2 [N, K] to multiply by, got {t}")
        k = values.shape[-1]
        block = fmt.scaling.block(k)
        ctype = _container(fmt, self.opset)
        scale = self.graph.weights[self.resolve(parts["scale"]).node.get("name")].float()
        zero = None
        if "zero" in parts:
            zero = self.graph.weights[self.resolve(parts["zero"]).node.get("name")].float()
        nb = 1 if block is None else -(-k // block)

        def layout(t: torch.Tensor) -> np.ndarray:
            """Scales (zero points) in DequantizeLinear's layout for the stored codes."""
            arr = t.numpy()
            if block is None:
                return arr.reshape(())  # per tensor: a scalar
            if transposed:
                return arr.reshape(-1) if nb == 1 else arr.T  # per output channel [N], or blocks [nb, N]
            return arr
        codes = values.numpy().T if transposed else values.numpy()
        q = self.init(_exact(codes, ctype, name), name, ctype)
        s = self._scale_init(layout(scale), fmt, name + ".scale")
        if "global" in parts:
            glob = self.graph.weights[self.resolve(parts["global"]).node.get("name")].float().numpy()
            s = self.emit("Mul", [s, self.init(glob.reshape(()), name + ".global")])
        inputs = [q, s]
        if zero is not None:
            inputs.append(self.init(_exact(layout(zero), ctype, name + ".zero"), name + ".zero", ctype))
        if block is None:
            return self.emit("DequantizeLinear", inputs)
        if transposed:
            if nb == 1:
                return self.emit("DequantizeLinear", inputs, axis=1)
            return self.emit("DequantizeLinear", inputs, axis=0, block_size=block)
        return self.emit("DequantizeLinear", inputs, axis=values.dim() - 1, block_size=min(block, k))

    def _scale_init(self, arr: np.ndarray, fmt: NumberFormat, hint: str) -> str:
        """Scales as an initializer of their storage dtype when ONNX has it and holds them
        exactly (then a Cast to float), else float32."""
        stype = _SCALE_TYPES.get(fmt.scaling.scale)
        if stype is not None:
            narrow = arr.astype(helper.tensor_dtype_to_np_dtype(stype))
            if np.array_equal(narrow.astype(np.float32), arr):
                return self.emit("Cast", [self.init(narrow, hint)], to=TensorProto.FLOAT)
        return self.init(arr.astype(np.float32), hint)

    def dequantize_dynamic(self, fmt: NumberFormat, parts: dict[str, str], t: Any) -> str:
        """DequantizeLinear of run-time codes (a `quantize` made them) of IR type `t`: the
        scales [..., n_blocks] (or [1, 1] per tensor) are blocks along the last axis."""
        k = t.shape[-1]
        block = fmt.scaling.block(k) if isinstance(k, int) else None
        scale = parts["scale"]
        if "global" in parts:
            scale = self.emit("Mul", [scale, parts["global"]])
        inputs = [parts["codes"], scale] + ([parts["zero"]] if "zero" in parts else [])
        if block is None:
            inputs[1:] = [self.emit("Reshape", [x, self.const([], shape=(0,))]) for x in inputs[1:]]
            return self.emit("DequantizeLinear", inputs)
        return self.emit("DequantizeLinear", inputs, axis=t.rank - 1, block_size=min(block, k))

    def quantize(self, x: str, t: Any, fmt: NumberFormat, given: dict[str, str]) -> dict[str, str]:
        """The parts of `fmt`'s quantization of float `x` (IR type `t`), computed as mxc's
        `quantize` computes them (`mxc.ir.formats`); `given` holds static scales (zero
        points, global scale) from calibration."""
        k = t.shape[-1]
        if not isinstance(k, int):
            raise self.fail(f"quantized activations need a static last dim, got {t}")
        block = fmt.scaling.block(k)
        nb = 1 if block is None else -(-k // block)
        lead = [0] * (t.rank - 1)
        # xb: x viewed as blocks [.., nb, g] (or x itself for one block / one tensor)
        if nb > 1:
            padded = self.emit("Pad", [x, self.const([0] * (2 * t.rank - 1) + [nb * block - k])])
            xb = self.emit("Reshape", [padded, self.const(lead + [nb, block])])
        else:
            xb = x

        def reduce(op: str, v: str) -> str:  # per block, keepdims (per tensor: over everything)
            return self.emit(op, [v] if block is None else [v, self.const([-1])], keepdims=1)

        out: dict[str, str] = {}
        if "scale" in given:  # static: per tensor [1, 1] or per block [.., nb]
            scale = given["scale"]
            sb = scale if nb == 1 else self.emit("Unsqueeze", [scale, self.const([-1])])
            zb = None
            if "zero" in given:
                zb = given["zero"] if nb == 1 else self.emit("Unsqueeze", [given["zero"], self.const([-1])])
                zb = self.emit("Cast", [zb], to=TensorProto.FLOAT)
            glob = given.get("global")
        else:
            glob = None
            if isinstance(fmt, IntFormat) and fmt.symmetric:
                amax = reduce("ReduceMax", self.emit("Abs", [xb]))
                qmax = self.const(float(2 ** (fmt.bits - 1) - 1), TensorProto.FLOAT)
                sb = self.store_scale(self.emit("Div", [amax, qmax]), fmt)
                zb = None
            elif isinstance(fmt, IntFormat):
                qmax = float(2**fmt.bits - 1)
                lo = self.emit("Min", [reduce("ReduceMin", xb), self.const(0.0, TensorProto.FLOAT)])
                hi = self.emit("Max", [reduce("ReduceMax", xb), self.const(0.0, TensorProto.FLOAT)])
                span = self.emit("Sub", [hi, lo])
                sb = self.store_scale(self.emit("Div", [span, self.const(qmax, TensorProto.FLOAT)]), fmt)
                z = self.emit("Round", [self.emit("Div", [self.emit("Neg", [lo]), sb])])
                zb = self.emit("Clip", [z, self.const(0.0, TensorProto.FLOAT), self.const(qmax, TensorProto.FLOAT)])
            else:
                amax = reduce("ReduceMax", self.emit("Abs", [xb]))
                emax = fmt.spec.max
                if fmt.global_:
                    whole = self.emit("ReduceMax", [self.emit("Abs", [x])], keepdims=0)
                    g = self.emit("Div", [whole, self.const(emax * SCALE_MAX[fmt.scaling.scale], TensorProto.FLOAT)])
                    glob = self.emit("Reshape", [self.positive(g), self.const([1])])
                    amax = self.emit("Div", [amax, glob])
                if fmt.scaling.scale == "e8m0":
                    raw = self.emit("Div", [amax, self.const(2.0 ** math.floor(math.log2(emax)), TensorProto.FLOAT)])
                else:
                    raw = self.emit("Div", [amax, self.const(emax, TensorProto.FLOAT)])
                sb = self.store_scale(raw, fmt)
                zb = None
        full = sb if glob is None else self.emit("Mul", [sb, glob])
        ctype = _container(fmt, self.opset)
        if zb is None and _native(fmt, self.opset):
            # QuantizeLinear divides, rounds half to even and saturates exactly as mxc does
            if block is None:
                codes = self.emit("QuantizeLinear", [x, self.emit("Reshape", [full, self.const([], shape=(0,))])],
                                  output_dtype=ctype)
            else:
                s_ir = full if nb == 1 else self.emit("Squeeze", [full, self.const([-1])])
                codes = self.emit("QuantizeLinear", [x, s_ir], axis=t.rank - 1, block_size=min(block, k),
                                  output_dtype=ctype)
        elif isinstance(fmt, IntFormat):
            lo_c, hi_c = (-(2 ** (fmt.bits - 1)), 2 ** (fmt.bits - 1) - 1) if fmt.symmetric else (0, 2**fmt.bits - 1)
            y = self.emit("Div", [xb, full])
            if zb is not None:
                y = self.emit("Add", [y, zb])
            y = self.emit("Clip", [self.emit("Round", [y]), self.const(float(lo_c), TensorProto.FLOAT),
                                   self.const(float(hi_c), TensorProto.FLOAT)])
            if nb > 1:
                y = self.emit("Slice", [self.emit("Reshape", [y, self.const(lead + [nb * block])]),
                                        self.const([0]), self.const([k]), self.const([-1])])
            codes = self.emit("Cast", [y], to=ctype)
        else:
            raise self.fail(f"activations in {fmt} need opset {_FLOAT_TYPES[fmt.name][1]} to be rounded to their "
                            f"grid by QuantizeLinear; this export uses opset {self.opset}")
        out["codes"] = codes

        def ir_shaped(v: str) -> str:  # [.., nb, 1] / [.., 1] / [1]*rank -> the IR's [.., nb] or [1, 1]
            if block is None:
                return self.emit("Reshape", [v, self.const([1, 1])])
            return v if nb == 1 else self.emit("Squeeze", [v, self.const([-1])])

        out["scale"] = given.get("scale") or ir_shaped(sb)
        if isinstance(fmt, IntFormat) and not fmt.symmetric:
            out["zero"] = self.emit("Cast", [ir_shaped(zb)], to=ctype) if "zero" not in given else \
                self.emit("Cast", [given["zero"]], to=ctype)
        if isinstance(fmt, FloatFormat) and fmt.global_:
            out["global"] = glob
        return out

    def positive(self, s: str) -> str:
        """`where(s > 0, s, 1)`: a block of zeros keeps scale 1."""
        one = self.const(1.0, TensorProto.FLOAT)
        return self.emit("Where", [self.emit("Greater", [s, self.const(0.0, TensorProto.FLOAT)]), s, one])

    def store_scale(self, s: str, fmt: NumberFormat) -> str:
        """Scales rounded to their storage dtype as `_Format._store_scale` rounds them."""
        kind = fmt.scaling.scale
        if kind == "f16":
            s = self.emit("Min", [s, self.const(65504.0, TensorProto.FLOAT)])
            s = self.emit("Cast", [self.emit("Cast", [s], to=TensorProto.FLOAT16)], to=TensorProto.FLOAT)
        elif kind == "fp8e4m3":
            s = self.emit("Cast", [s], to=TensorProto.FLOAT8E4M3FN, saturate=1)  # round to nearest even, saturate
            s = self.emit("Cast", [s], to=TensorProto.FLOAT)
        elif kind == "e8m0":
            s = self.e8m0(s)
        return self.positive(s)

    def e8m0(self, x: str) -> str:
        """`2^floor(log2 x)` exactly (2^-127 for x <= 0), as `mxc.ir.quant.e8m0`: the exponent
        from Log, corrected by one where float rounding put it in the neighbouring binade."""
        f = TensorProto.FLOAT
        two, one = self.const(2.0, f), self.const(1.0, f)
        e = self.emit("Floor", [self.emit("Div", [self.emit("Log", [x]), self.const(math.log(2.0), f)])])
        e = self.emit("Where", [self.emit("Greater", [x, self.const(0.0, f)]), e, self.const(-127.0, f)])
        p = self.emit("Pow", [two, e])
        e = self.emit("Where", [self.emit("Greater", [p, x]), self.emit("Sub", [e, one]), e])
        p = self.emit("Pow", [two, e])
        low = self.emit("LessOrEqual", [self.emit("Mul", [p, two]), x])
        e = self.emit("Where", [low, self.emit("Add", [e, one]), e])
        e = self.emit("Where", [self.emit("Greater", [x, self.const(0.0, f)]), e, self.const(-127.0, f)])
        e = self.emit("Clip", [e, self.const(-127.0, f), self.const(127.0, f)])
        return self.emit("Pow", [two, e])

    # ------------------------------------------------------------------ the model

    def model(self, output_names: list[str]) -> onnx.ModelProto:
        for node in self.steps:
            self.node = node
            if node.op in ("const", "input"):
                continue
            if node.op == "dequantize" and self._static(node):
                continue  # a weight: written where it is read (transposed for a linear)
            rule = _RULES.get(node.op)
            if rule is None:
                raise self.fail(f"op {node.op!r} has no ONNX mapping; mapped ops: {', '.join(sorted(_RULES))}")
            # linear and qlinear read their weights themselves (stored transposed)
            outs = rule(self, node, [] if node.op in ("linear", "qlinear") else [self.value(v) for v in node.inputs])
            outs = [outs] if isinstance(outs, str) else list(outs)
            for i, name in enumerate(outs):
                self.names[Value(node, i)] = name
        self.node = None
        out_infos = []
        for name, v in zip(output_names, self.graph.outputs):
            self.nodes.append(helper.make_node("Identity", [self.value(v)], [name], name=f"output:{name}"))
            out_infos.append(_value_info(name, self.resolve(v).type, self.opset))
        in_infos = [_value_info(self.names[n.out], n.types[0], self.opset) for n in self.graph.inputs]
        g = helper.make_graph(self.nodes, self.graph.name, in_infos, out_infos, self.inits)
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(g, opset_imports=opsets, producer_name="mxc",
                                  ir_version=helper.find_min_ir_version_for(opsets))
        model.doc_string = "exported by mxc.export_onnx from the final IR of a compiled model"
        return model


def _value_info(name: str, t: Any, opset: int) -> onnx.ValueInfoProto:
    elem = _container(t.dtype, opset) if isinstance(t.dtype, (IntFormat, FloatFormat)) else ONNX_TYPES[t.dtype.name]
    dims = [d if isinstance(d, int) else str(d) for d in t.shape]
    return helper.make_tensor_value_info(name, elem, dims)


def _onnx_type(dtype: DType) -> int:
    return ONNX_TYPES[dtype.name]


def _numpy(tensor: torch.Tensor, dtype: DType) -> np.ndarray:
    """`tensor` in `dtype` as a numpy array (bfloat16 and float8 as their `ml_dtypes` types)."""
    return to_numpy(tensor.to(dtype.torch))


def _code_values(tensor: torch.Tensor, t: Any) -> torch.Tensor:
    """The element values (float32) of quantized codes: unpacked from int32 words when the
    type has a layout (the layout pass packed them), else the stored values themselves."""
    if t.layout is not None:
        return from_codes(unpack(tensor, t.layout, int(t.shape[t.layout.axis])), t.dtype)
    return tensor.float()


def _exact(arr: np.ndarray, onnx_type: int, name: str) -> np.ndarray:
    """`arr` (float32 values) in `onnx_type`; raises if a value does not survive the trip."""
    out = arr.astype(helper.tensor_dtype_to_np_dtype(onnx_type))
    back = out.astype(np.float32)
    if not np.array_equal(back, arr.astype(np.float32)):
        bad = np.flatnonzero(back != arr)[0]
        raise OnnxExportError(f"{name!r}: value {arr.reshape(-1)[bad]} is not exact in ONNX type "
                              f"{TensorProto.DataType.Name(onnx_type)} (became {back.reshape(-1)[bad]})")
    return out


# ---------------------------------------------------------------------- op rules
# A rule writes one IR node: rule(exporter, node, operand names) -> output name(s).

Rule = Callable[[_Exporter, Node, list[str]], Any]


def _linear(ex: _Exporter, node: Node, _: list[str]) -> str:
    y = ex.emit("MatMul", [ex.value(node.inputs[0]), ex.weight_t(node.inputs[1])])
    return ex.emit("Add", [y, ex.value(node.inputs[2])]) if len(node.inputs) > 2 else y


def _qlinear(ex: _Exporter, node: Node, _: list[str]) -> str:
    act, wf = node.get("act"), node.get("weight")
    na, nw = len(quant_parts(act)), len(quant_parts(wf))
    xparts = {p: ex.value(v) for p, v in zip(quant_parts(act), node.inputs[:na])}
    x = ex.dequantize_dynamic(act, xparts, ex.resolve(node.inputs[0]).type)
    wparts = dict(zip(quant_parts(wf), node.inputs[na : na + nw]))
    if all(ex.resolve(v).node.op == "const" for v in wparts.values()):
        w = ex.dequantize_const(wf, wparts, transposed=True)
    else:
        raise ex.fail("qlinear weights must be consts (quantized weights)")
    y = ex.emit("MatMul", [x, w])
    return ex.emit("Add", [y, ex.value(node.inputs[na + nw])]) if len(node.inputs) > na + nw else y


def _quantize(ex: _Exporter, node: Node, ins: list[str]) -> list[str]:
    fmt = node.get("format")
    parts = ex.quantize(ins[0], ex.resolve(node.inputs[0]).type, fmt, dict(zip(quant_parts(fmt)[1:], ins[1:])))
    return [parts[p] for p in quant_parts(fmt)]


def _dequantize(ex: _Exporter, node: Node, ins: list[str]) -> str:
    fmt = node.get("format")
    return ex.dequantize_dynamic(fmt, dict(zip(quant_parts(fmt), ins)), ex.resolve(node.inputs[0]).type)


def _rms_norm(ex: _Exporter, node: Node, ins: list[str]) -> str:
    x = ins[0]
    ms = ex.emit("ReduceMean", [ex.emit("Mul", [x, x]), ex.const([-1])], keepdims=1)
    r = ex.emit("Reciprocal", [ex.emit("Sqrt", [ex.emit("Add", [ms, ex.const(float(node.get("eps")), F)])])])
    y = ex.emit("Mul", [x, r])
    return ex.emit("Mul", [ins[1], y]) if len(ins) > 1 else y


def _layer_norm(ex: _Exporter, node: Node, ins: list[str]) -> str:
    d = ex.resolve(node.inputs[0]).type.shape[-1]
    w = ins[1] if len(ins) > 1 else ex.const(np.ones(d, np.float32), F)
    return ex.emit("LayerNormalization", [w if i == 1 else n for i, n in enumerate([ins[0], w] + ins[2:])],
                   axis=-1, epsilon=float(node.get("eps")))


def _attention(ex: _Exporter, node: Node, ins: list[str]) -> str:
    q, k, v = ins[:3]
    qt, kt = ex.resolve(node.inputs[0]).type, ex.resolve(node.inputs[1]).type
    heads, kv_heads = qt.shape[1], kt.shape[1]
    if heads != kv_heads:  # GQA: each key/value head repeated for its group of query heads
        if not (isinstance(heads, int) and isinstance(kv_heads, int)):
            raise ex.fail(f"grouped-query attention needs static head counts, got {qt} and {kt}")
        rep = ex.const([1, 1, heads // kv_heads, 1, 1])
        vt = ex.resolve(node.inputs[2]).type
        k, v = (ex.emit("Reshape", [ex.emit("Expand", [ex.emit("Unsqueeze", [t, ex.const([2])]), rep]),
                                    ex.shape([0, heads, -1, last])])  # [b, Hkv, rep, t, d] -> [b, H, t, d]
                for t, last in ((k, kt.shape[-1]), (v, vt.shape[-1])))
    scale = node.get("scale")
    scale = 1.0 / math.sqrt(qt.shape[-1]) if scale is None else scale
    scores = ex.emit("Mul", [ex.emit("MatMul", [q, ex.emit("Transpose", [k], perm=[0, 1, 3, 2])]), ex.const(scale, F)])
    neg_inf = ex.const(-np.inf, F)
    if node.get("causal"):
        ones = ex.emit("ConstantOfShape", [ex.emit("Concat", [ex.emit("Shape", [q], start=2, end=3),
                                                             ex.emit("Shape", [k], start=2, end=3)], axis=0)],
                       value=helper.make_tensor("one", TensorProto.INT64, [1], [1]))
        tril = ex.emit("Trilu", [ones], upper=0)  # top-left aligned, as torch's is_causal
        scores = ex.emit("Where", [ex.emit("Cast", [tril], to=TensorProto.BOOL), scores, neg_inf])
    if len(ins) > 3:
        mtype = ex.resolve(node.inputs[3]).type.dtype
        if mtype.name == "bool":
            scores = ex.emit("Where", [ins[3], scores, neg_inf])
        else:
            scores = ex.emit("Add", [scores, ins[3]])
    return ex.emit("MatMul", [ex.emit("Softmax", [scores], axis=-1), v])


def _rope(ex: _Exporter, node: Node, ins: list[str]) -> str:
    x, cos, sin = ins
    d = ex.resolve(node.inputs[0]).type.shape[-1]
    half = ex.const([d // 2])
    last = ex.const([-1])
    hi = ex.emit("Slice", [x, half, ex.const([INT64_MAX]), last])
    lo = ex.emit("Slice", [x, ex.const([0]), half, last])
    rotated = ex.emit("Concat", [ex.emit("Neg", [hi]), lo], axis=-1)
    return ex.emit("Add", [ex.emit("Mul", [x, cos]), ex.emit("Mul", [rotated, sin])])


def _silu(ex: _Exporter, node: Node, ins: list[str]) -> str:
    return ex.emit("Mul", [ins[0], ex.emit("Sigmoid", [ins[0]])])


def _gelu(ex: _Exporter, node: Node, ins: list[str]) -> str:
    return ex.emit("Gelu", ins, approximate=node.get("approximate"))


def _reshape(ex: _Exporter, node: Node, ins: list[str]) -> str:
    dims = node.get("shape")
    if any(isinstance(d, int) and d == 0 for d in dims):
        raise ex.fail("reshape to a zero-size dim")
    return ex.emit("Reshape", [ins[0], ex.shape(dims)])


def _transpose(ex: _Exporter, node: Node, ins: list[str]) -> str:
    rank = ex.resolve(node.inputs[0]).type.rank
    perm = list(range(rank))
    a, b = node.get("dim0") % rank, node.get("dim1") % rank
    perm[a], perm[b] = perm[b], perm[a]
    return ex.emit("Transpose", ins, perm=perm)


def _slice(ex: _Exporter, node: Node, ins: list[str]) -> str:
    end = node.get("end")
    end = INT64_MAX if isinstance(end, int) and end >= SLICE_END else end
    return ex.emit("Slice", [ins[0], ex.shape([node.get("start")]), ex.shape([end]), ex.const([node.get("axis")]),
                             ex.shape([node.get("step")])])


def _cast(ex: _Exporter, node: Node, ins: list[str]) -> str:
    return ex.emit("Cast", ins, to=_onnx_type(node.get("dtype")))


_RULES: dict[str, Rule] = {
    "linear": _linear,
    "qlinear": _qlinear,
    "quantize": _quantize,
    "dequantize": _dequantize,
    "matmul": lambda ex, n, ins: ex.emit("MatMul", ins),
    "embedding": lambda ex, n, ins: ex.emit("Gather", [ins[1], ins[0]], axis=0),
    "rms_norm": _rms_norm,
    "layer_norm": _layer_norm,
    "add": lambda ex, n, ins: ex.emit("Add", ins),
    "mul": lambda ex, n, ins: ex.emit("Mul", ins),
    "silu": _silu,
    "relu": lambda ex, n, ins: ex.emit("Relu", ins),
    "tanh": lambda ex, n, ins: ex.emit("Tanh", ins),
    "gelu": _gelu,
    "softmax": lambda ex, n, ins: ex.emit("Softmax", ins, axis=n.get("axis")),
    "attention": _attention,
    "rope": _rope,
    "cast": _cast,
    "reshape": _reshape,
    "transpose": _transpose,
    "permute": lambda ex, n, ins: ex.emit("Transpose", ins, perm=[
        d % ex.resolve(n.inputs[0]).type.rank for d in n.get("dims")]),
    "unsqueeze": lambda ex, n, ins: ex.emit("Unsqueeze", [ins[0], ex.const([n.get("axis")])]),
    "expand": lambda ex, n, ins: ex.emit("Expand", [ins[0], ex.shape(n.get("shape"), minus_one=1)]),
    "slice": _slice,
    "cat": lambda ex, n, ins: ex.emit("Concat", ins, axis=n.get("axis")),
    "gather": lambda ex, n, ins: ex.emit("Gather", ins, axis=n.get("axis")),
    "torch": torch_node,
}


__all__ = ["ATEN_OPS", "EXTERNAL_DATA_BYTES", "MAX_OPSET", "MIN_OPSET", "OnnxExportError", "export_onnx"]
