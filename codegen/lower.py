"""Lowering: a `fused` node (a kernel group of the fuse pass) becomes the generated kernels
that compute it, and the wiring of its operands and results to their `launch` arguments.

    lowered = lower(fused)                 # Lowered, or None when no template covers the group
    for call in lowered.calls:             # in order; a call may read an earlier call's result
        load(call.spec).launch(**{name: <value of arg> for name, arg in call.args}, out=...)
    results = [<value of src> for src in lowered.results]   # one per result of `fused`

A `Source` names where a value comes from: argument i of the region (= operand i of the fused
node; weights are operands too) or result j of an earlier call of the group; an argument is
a source, None, or a tuple of arguments (a list-valued parameter: norm_quant's static
`scales`). Each call lists its `outputs` (the kernel's results in the order `launch` returns
them) with the IR type of each (symbolic shape; a number format means codes in the storage
convention of `mxc.runtime.storage`) and where a preallocated buffer for it goes: a keyword
of its own (`out`), or its place in the list the call's `outs` keyword takes.

One rule per group kind (`RULES`), each reading the region and raising `NotLowered` with the
reason when the group holds something its templates do not compute:

    dequant_gemm   linear(x, dequantize(packed consts)) [+ bias] then an epilogue of bias add,
                   silu / gelu / gelu_tanh, residual add  ->  one `dequant_gemm` kernel;
                   qlinear(activation codes and scales, packed weight parts) [+ bias] and the
                   same epilogue (the fold pass's integer GEMM)  ->  one `qgemm` kernel, which
                   reads the activation codes in the storage convention (`mxc.runtime.storage`)
    swiglu         mul(silu(linear(x, dequantize(Wg))), linear(x', dequantize(Wu)))
                   ->  gate kernel with epilogue "silu", then up kernel with "mul" by the
                       gate's output (`multiplier`); over qlinears likewise, two qgemm kernels
    norm_quant     [gather of channels] rms_norm / layer_norm, quantizes of its result or of
                   last-axis slices of it  ->  one `norm_quant` kernel (codes, scales)
    act_quant      gather of channels, quantizes of it (or of slices)  ->  one `norm_quant`
                   kernel with norm "none"
    rope_kv        rope, quantizes of its result  ->  one `rope_kv` kernel
    attention      attention(q, k, v[, mask]) with k and / or v a dequantize of run-time codes
                   (a quantized KV cache)  ->  one `attention` kernel reading the codes

The row kernels (norm_quant, rope_kv) write codes and scales; a group that yields a
dequantized activation (float values computed from those codes) is not lowered.

Numerics: x and out keep the graph's dtype (f32 in graphs captured from fp32 models), so a
kernel differs from the reference backend only by fp32 summation order (see
`mxc.codegen.templates.dequant_gemm`); f16 graphs lower to f16 kernels. Lowering reads the
region only: it never changes the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from ..ir import DType, Graph, Node, TensorType, Value, dims_equal
from ..ir.ops import quant_parts
from ..ir.printer import region_of

from .spec import KernelSpec
from .templates import TEMPLATES, template


class NotLowered(Exception):
    """A group no template covers; the message is the reason (`lower` records it)."""


@dataclass(frozen=True, slots=True)
class Source:
    """Where a launch argument or a group result comes from: region argument `index` (the
    fused node's operand `index`) when `call` is None, else result `index` of call `call`."""

    call: int | None
    index: int

    def __str__(self) -> str:
        return f"a{self.index}" if self.call is None else f"k{self.call}#{self.index}"


#: A launch argument: a value, None, or a tuple of arguments (passed as a list).
Arg = Union[Source, None, tuple["Arg", ...]]


def _arg_str(a: Arg) -> str:
    return "[" + ", ".join(map(_arg_str, a)) + "]" if isinstance(a, tuple) else str(a)


@dataclass(frozen=True, slots=True)
class Output:
    """One result of a kernel call: its IR `type` (shape with symbolic dims), the `launch`
    keyword that takes a preallocated buffer for it (None: it goes into the call's `outs`
    list, or there is none), and whether the caller provides a buffer at all (`alloc`
    False: the kernel returns one of its inputs here, e.g. a static scale)."""

    keyword: str | None
    type: TensorType
    alloc: bool = True


@dataclass(frozen=True, slots=True)
class KernelCall:
    """One launch of `spec`'s kernel: keyword -> each argument, its results, and `outs`: the
    keyword that takes a list of output buffers, one entry per output in order (None where
    `alloc` is off), when the kernel takes them so."""

    spec: KernelSpec
    args: tuple[tuple[str, Arg], ...]
    outputs: tuple[Output, ...]
    loc: str | None = None
    outs: str | None = None

    def __str__(self) -> str:
        args = ", ".join(f"{k}={_arg_str(v)}" for k, v in self.args)
        return f"{self.spec}({args})" + (f" loc({self.loc!r})" if self.loc else "")


@dataclass(frozen=True, slots=True)
class Lowered:
    """A fused group as kernel calls, in order, and the source of each of its results."""

    kind: str
    calls: tuple[KernelCall, ...]
    results: tuple[Source, ...]

    def __str__(self) -> str:
        calls = "; ".join(f"k{i} = {c}" for i, c in enumerate(self.calls))
        return f"{self.kind}: {calls}; yield {', '.join(map(str, self.results))}"


class Region:
    """A fused node's region with the lookups the rules need: which values are region
    arguments, and their operand index."""

    def __init__(self, body: Graph):
        self.body = body
        self.args = {arg: i for i, arg in enumerate(body.inputs)}

    def arg(self, v: Value, what: str) -> Source:
        """The source of `v`, which must be a region argument (an operand of the fused node)."""
        if v.node not in self.args:
            raise NotLowered(f"{what} is computed inside the group ({v.node.op}), not an operand of it")
        return Source(None, self.args[v.node])


Rule = Callable[[Region], Lowered]

_GEMM_DTYPES = ("f16", "f32")
_ACTIVATIONS = {("silu", None): "silu", ("gelu", "none"): "gelu", ("gelu", "tanh"): "gelu_tanh"}


def _dtype_name(t: TensorType) -> str | None:
    return t.dtype.name if isinstance(t.dtype, DType) else None


def _gemm_call(r: Region, gemm: Node, steps: tuple[str, ...], extra: dict[str, Source], out: TensorType) -> KernelCall:
    """The kernel call of the GEMM `gemm` with the epilogue `steps` (a GEMM's own bias goes
    first), extra launch arguments (bias, residual, multiplier) and result type `out`: a
    `dequant_gemm` kernel for a `linear` over a dequantize of packed weights, a `qgemm`
    kernel for a `qlinear` (quantized activations and packed weights)."""
    if gemm.op == "linear":
        args, spec = _dequant_gemm_spec(r, gemm, steps, out)
    elif gemm.op == "qlinear":
        args, spec = _qgemm_spec(r, gemm, steps, out)
    else:
        raise NotLowered(f"the GEMM is a {gemm.op}, not a linear or qlinear")
    if set(args) & set(extra):
        raise NotLowered(f"the epilogue needs a second {', '.join(sorted(set(args) & set(extra)))}")
    args.update(extra)
    return KernelCall(spec, tuple(args.items()), (Output("out", out),), gemm.loc)


def _weight_args(r: Region, fmt, values: tuple[Value, ...], names: dict[str, str]) -> tuple[dict[str, Source], TensorType]:
    """Launch arguments of the packed weight parts `values` of `fmt` (named by `names`), and
    the codes' type, which must be packed with static [N, K]."""
    parts = dict(zip(quant_parts(fmt), values))
    codes = parts["codes"].type
    if codes.layout is None:
        raise NotLowered(f"the {fmt} weight codes are not packed (the layout pass packs them into int32 words)")
    if not all(isinstance(d, int) for d in codes.shape):
        raise NotLowered(f"the weight shape {codes} is not static")
    return {names[p]: r.arg(v, f"the weight's {p}") for p, v in parts.items()}, codes


def _checked(family: str, build: Callable[[], KernelSpec]) -> KernelSpec:
    """The spec `build` makes, checked by `family`'s template; NotLowered says what fails."""
    if family not in TEMPLATES:
        raise NotLowered(f"the {family} template is not registered")
    try:
        spec = build()
        template(family).check(spec)
    except ValueError as e:
        raise NotLowered(str(e)) from None
    return spec


def _dequant_gemm_spec(r: Region, gemm: Node, steps: tuple[str, ...], out: TensorType) -> tuple[dict, KernelSpec]:
    """linear(x, dequantize(codes, scale[, zero][, global])[, bias]) -> a dequant_gemm spec."""
    deq = gemm.inputs[1].node
    if deq.op != "dequantize":
        raise NotLowered(f"the linear's weight is a {deq.op}, not a dequantize of quantized weights")
    fmt = deq.get("format")
    names = {"codes": "weight", "scale": "scale", "zero": "zero", "global": "global_scale"}
    weight, codes = _weight_args(r, fmt, deq.inputs, names)
    x, w_dt, y_dt = _dtype_name(gemm.inputs[0].type), _dtype_name(deq.types[0]), _dtype_name(out)
    if not (x == w_dt == y_dt and x in _GEMM_DTYPES):
        raise NotLowered(f"x {gemm.inputs[0].type}, dequantized weight {deq.types[0]} and result {out}: "
                         f"the kernel takes one dtype of {', '.join(_GEMM_DTYPES)} for all three")
    args = {"x": r.arg(gemm.inputs[0], "the GEMM's input x"), **weight}
    if len(gemm.inputs) > 2:
        args["bias"] = r.arg(gemm.inputs[2], "the linear's bias")
        steps = ("bias", *steps)
    n, k = codes.shape
    spec = _checked("dequant_gemm", lambda: KernelSpec.dequant_gemm(
        n, k, fmt, x_dtype=x, out_dtype=y_dt, epilogue=steps, layout=codes.layout))
    return args, spec


def _qgemm_spec(r: Region, gemm: Node, steps: tuple[str, ...], out: TensorType) -> tuple[dict, KernelSpec]:
    """qlinear(act parts.., weight parts..[, bias]) -> a qgemm spec (activation codes in the
    storage convention, `mxc.runtime.storage`)."""
    act, wfmt = gemm.get("act"), gemm.get("weight")
    na, nw = len(quant_parts(act)), len(quant_parts(wfmt))
    x_names = {"codes": "x_codes", "scale": "x_scale", "zero": "x_zero", "global": "x_global"}
    args = {x_names[p]: r.arg(v, f"the activation's {p}") for p, v in zip(quant_parts(act), gemm.inputs[:na])}
    names = {"codes": "w_words", "scale": "w_scale", "zero": "w_zero", "global": "w_global"}
    weight, codes = _weight_args(r, wfmt, gemm.inputs[na : na + nw], names)
    args.update(weight)
    y_dt = _dtype_name(out)
    if len(gemm.inputs) > na + nw:
        args["bias"] = r.arg(gemm.inputs[na + nw], "the qlinear's bias")
        steps = ("bias", *steps)
    n, k = codes.shape
    spec = _checked("qgemm", lambda: TEMPLATES["qgemm"].spec(
        n, k, act, wfmt, out_dtype=y_dt, epilogue=steps, layout=codes.layout))
    return args, spec


def _epilogue_step(node: Node, tail: Value, r: Region) -> tuple[str, dict[str, Source]]:
    """The epilogue step `node` applies to the GEMM result so far, `tail`, and its operand."""
    if node.op in ("silu", "gelu") and node.inputs[0] == tail:
        step = _ACTIVATIONS.get((node.op, node.get("approximate")))
        if step is None:
            raise NotLowered(f"gelu(approximate={node.get('approximate')!r}) has no epilogue step")
        return step, {}
    if node.op == "add" and tail in node.inputs and node.inputs[0] != node.inputs[1]:
        other = node.inputs[1] if node.inputs[0] == tail else node.inputs[0]
        t, y = other.type, tail.type
        if t.rank == 1 and dims_equal(t.shape[0], y.shape[-1]):
            return "bias", {"bias": r.arg(other, "the bias")}
        if t.rank == y.rank and all(dims_equal(a, b) for a, b in zip(t.shape, y.shape)) and t.dtype == y.dtype:
            return "residual", {"residual": r.arg(other, "the residual")}
        raise NotLowered(f"add of {t} to the GEMM result {y}: neither a bias [N] nor a residual of its type")
    raise NotLowered(f"{node.op} after the GEMM has no epilogue step (expected bias / residual add, silu, gelu)")


def dequant_gemm(r: Region) -> Lowered:
    """dequantize + linear + epilogue steps (each reading the previous result) -> one kernel."""
    gemms = [n for n in r.body.nodes if n.op in ("linear", "qlinear")]
    if len(gemms) != 1:
        raise NotLowered(f"a dequant_gemm group holds one GEMM, this one {len(gemms)}")
    gemm = gemms[0]
    nodes = list(r.body.nodes)
    at = nodes.index(gemm)
    weight = {gemm.inputs[1].node} if gemm.op == "linear" else set()
    if set(nodes[:at]) - weight:
        raise NotLowered(f"the group computes {sorted({n.op for n in set(nodes[:at]) - weight})} before its GEMM")
    tail, steps, extra = gemm.out, [], {}
    for node in nodes[at + 1 :]:
        step, operand = _epilogue_step(node, tail, r)
        steps.append(step)
        if set(operand) & set(extra):
            raise NotLowered(f"the epilogue has two {step} steps")
        extra.update(operand)
        tail = node.out
    if r.body.outputs != (tail,):
        raise NotLowered("the group yields a value other than its last epilogue step")
    call = _gemm_call(r, gemm, tuple(steps), extra, tail.type)
    return Lowered("dequant_gemm", (call,), (Source(0, 0),))


def swiglu(r: Region) -> Lowered:
    """mul(silu(gate GEMM), up GEMM) -> gate kernel (+silu), then up kernel (+mul by it)."""
    if len(r.body.outputs) != 1:
        raise NotLowered(f"a swiglu group yields one value, this one {len(r.body.outputs)}")
    mul = r.body.outputs[0].node
    if mul.op != "mul":
        raise NotLowered(f"the swiglu group yields a {mul.op}, not a mul")
    for act, up in (mul.inputs, mul.inputs[::-1]):
        if act.node.op == "silu" and up.node.op in ("linear", "qlinear") and act.node.inputs[0].node.op in ("linear", "qlinear"):
            break
    else:
        raise NotLowered("the mul does not read silu(GEMM) and a GEMM")
    gate, up_gemm = act.node.inputs[0].node, up.node
    inner = {mul, act.node, gate, up_gemm, gate.inputs[1].node, up_gemm.inputs[1].node}
    if set(r.body.nodes) - inner:
        extra = sorted({n.op for n in set(r.body.nodes) - inner})
        raise NotLowered(f"the swiglu group holds more than its two GEMMs, silu and mul: {extra}")
    gate_call = _gemm_call(r, gate, ("silu",), {}, act.type)
    up_call = _gemm_call(r, up_gemm, ("mul",), {"multiplier": Source(0, 0)}, mul.out.type)
    return Lowered("swiglu", (gate_call, up_call), (Source(1, 0),))


def _static_int(d, what: str) -> int:
    if not isinstance(d, int):
        raise NotLowered(f"{what} {d} is not static")
    return d


@dataclass
class RowOutputs:
    """What a row kernel (norm_quant, rope_kv) writes for a group: the quantizes (formats,
    channel ranges, static scale arguments) and whether the float row is an output too."""

    formats: list
    ranges: list[tuple[int, int]]
    scales: list[Arg]
    outputs: list[Output]
    results: tuple[Source, ...]
    float_out: bool


def _row_outputs(r: Region, row: Node, nodes: list[Node], *, slices: bool) -> RowOutputs:
    """The outputs of a row kernel whose float row is `row`'s result: `nodes` (the rest of the
    region) must be quantizes of the row — or, with `slices`, of last-axis slices of it —
    and dequantizes no result of which the group yields. Kernel outputs, in the order the
    templates return them: the float row (if the group yields it), then per quantize its
    codes, scale (and zero point)."""
    d = _static_int(row.types[0].shape[-1], "the row length")
    spans: dict[Value, tuple[int, int]] = {row.out: (0, d)}
    quantizes = []
    yields = set(r.body.outputs)
    for node in nodes:
        if node.op == "slice" and slices and node.inputs[0] == row.out:
            rank, start, end = node.types[0].rank, node.get("start"), node.get("end")
            if node.get("axis") % rank != rank - 1 or node.get("step") != 1 or not isinstance(start, int) \
                    or not isinstance(end, int) or not 0 <= start < min(end, d):
                raise NotLowered(f"a slice [{start}:{end}] of the row is not a channel range of the kernel")
            spans[node.out] = (start, min(end, d))
        elif node.op == "quantize" and node.inputs[0] in spans:
            quantizes.append(node)
        elif node.op == "dequantize":
            if any(v in yields for v in node.outs):
                raise NotLowered("the group yields a dequantized activation; the row kernel writes codes and scales "
                                 "(the fuse pass pairs them with dequantizing GEMMs only for quantized-GEMM plans)")
        else:
            raise NotLowered(f"{node.op} has no place in the row kernel (quantizes of the row or of its channel ranges)")
    float_out = row.out in yields
    if not quantizes and not float_out:
        raise NotLowered("the group writes nothing (no quantize, no float row read outside)")
    formats, ranges, scales = [], [], []
    outputs = [Output(None, row.types[0])] if float_out else []
    where = {row.out: 0} if float_out else {}
    for q in quantizes:
        fmt = q.get("format")
        parts = quant_parts(fmt)
        static = len(q.inputs) > 1
        if "global" in parts:
            raise NotLowered(f"{fmt} has a global scale (an amax over the whole tensor), which a row kernel does not see")
        if static != (fmt.scaling.kind == "tensor"):
            raise NotLowered(f"a {'static' if static else 'dynamic'} quantize into {fmt}: the row kernel takes "
                             "given scales for per-tensor formats and computes per-token / group / block ones")
        formats.append(fmt)
        ranges.append(spans[q.inputs[0]])
        given = tuple(r.arg(v, f"the static {p} of {fmt}") for p, v in zip(parts[1:], q.inputs[1:]))
        scales.append(None if not static else given[0] if len(given) == 1 else given)
        for part, v in zip(parts, q.outs):
            where[v] = len(outputs)
            outputs.append(Output(None, v.type, alloc=not (static and part != "codes")))
    missing = [v for v in r.body.outputs if v not in where]
    if missing:
        raise NotLowered(f"the group yields {missing[0].node.op} results the row kernel does not compute")
    return RowOutputs(formats, ranges, scales, outputs, tuple(Source(0, where[v]) for v in r.body.outputs), float_out)


def _x_dtype(v: Value) -> str:
    name = _dtype_name(v.type)
    if name is None:
        raise NotLowered(f"the row kernel reads a float tensor, got {v.type}")
    return name


def norm_quant(r: Region) -> Lowered:
    """[gather] + rms_norm / layer_norm + quantizes (of channel ranges) -> one norm_quant kernel."""
    nodes = list(r.body.nodes)
    gather = nodes.pop(0) if nodes and nodes[0].op == "gather" else None
    norm = nodes.pop(0) if nodes else None
    if norm is None or norm.op not in ("rms_norm", "layer_norm"):
        raise NotLowered(f"a norm_quant group starts with [gather] rms_norm / layer_norm, got {norm and norm.op}")
    args: dict[str, Arg] = {}
    if gather is not None:
        if norm.inputs[0] != gather.out:
            raise NotLowered("the norm does not read the gathered row")
        args.update(_gather_args(r, gather))
    else:
        args["x"] = r.arg(norm.inputs[0], "the norm's input")
    if len(norm.inputs) > 1:
        args["weight"] = r.arg(norm.inputs[1], "the norm's weight")
    if len(norm.inputs) > 2:
        args["bias"] = r.arg(norm.inputs[2], "the norm's bias")
    return _norm_quant_call("norm_quant", r, norm, nodes, args, "rms" if norm.op == "rms_norm" else "layer", norm.get("eps"))


def act_quant(r: Region) -> Lowered:
    """gather of channels + quantizes (of channel ranges) -> one norm_quant kernel, norm "none"."""
    nodes = list(r.body.nodes)
    gather = nodes.pop(0) if nodes and nodes[0].op == "gather" else None
    if gather is None:
        raise NotLowered("an act_quant group starts with a gather of channels")
    return _norm_quant_call("act_quant", r, gather, nodes, _gather_args(r, gather), "none", None)


def _gather_args(r: Region, gather: Node) -> dict[str, Arg]:
    """x and the channel `index` of a reorder gather (a const permutation of the last axis)."""
    rank = gather.types[0].rank
    if gather.get("axis") % rank != rank - 1:
        raise NotLowered("the gather does not permute the last axis (channels)")
    return {"x": r.arg(gather.inputs[0], "the gathered tensor"), "index": r.arg(gather.inputs[1], "the channel order")}


def _norm_quant_call(kind: str, r: Region, row: Node, rest: list[Node], args: dict, norm: str, eps) -> Lowered:
    """The norm_quant kernel of a `kind` group whose float row is `row`'s result."""
    out = _row_outputs(r, row, rest, slices=True)
    d = _static_int(row.types[0].shape[-1], "the row length")
    x_dt = _x_dtype(row.inputs[0])
    if any(s is not None for s in out.scales):
        args["scales"] = tuple(out.scales)
    spec = _checked("norm_quant", lambda: TEMPLATES["norm_quant"].spec(
        d, out.formats, out.ranges, norm=norm, eps=float(eps) if eps is not None else 1e-5, gather="index" in args,
        has_weight="weight" in args, has_bias="bias" in args, float_out=out.float_out, x_dtype=x_dt))
    call = KernelCall(spec, tuple(args.items()), tuple(out.outputs), row.loc, outs="outs")
    return Lowered(kind, (call,), out.results)


def rope_kv(r: Region) -> Lowered:
    """rope + quantizes of its result -> one rope_kv kernel."""
    nodes = list(r.body.nodes)
    rope = nodes.pop(0) if nodes else None
    if rope is None or rope.op != "rope":
        raise NotLowered(f"a rope_kv group starts with a rope, got {rope and rope.op}")
    out = _row_outputs(r, rope, nodes, slices=False)
    if any(s is not None for s in out.scales):
        raise NotLowered("the rope_kv kernel computes its scales; a static (per-tensor) KV quantize is not lowered")
    d = _static_int(rope.types[0].shape[-1], "the head dim")
    x_dt = _x_dtype(rope.inputs[0])
    args = {name: r.arg(v, f"the rope's {name}") for name, v in zip(("x", "cos", "sin"), rope.inputs)}
    spec = _checked("rope_kv", lambda: TEMPLATES["rope_kv"].spec(d, out.formats, float_out=out.float_out, x_dtype=x_dt))
    call = KernelCall(spec, tuple(args.items()), tuple(out.outputs), rope.loc, outs="outs")
    return Lowered("rope_kv", (call,), out.results)


def attention(r: Region) -> Lowered:
    """[dequantize of K codes] [dequantize of V codes] attention -> one attention kernel that
    dequantizes the KV cache as it loads it."""
    nodes = list(r.body.nodes)
    att = nodes[-1] if nodes else None
    if att is None or att.op != "attention" or r.body.outputs != (att.out,):
        raise NotLowered("an attention group ends with the attention it yields")
    q, k, v, *mask = att.inputs
    args: dict[str, Arg] = {"q": r.arg(q, "the queries")}
    formats = {}
    for role, val in (("k", k), ("v", v)):
        node = val.node
        if node.op == "dequantize" and node in nodes[:-1]:
            fmt = node.get("format")
            names = {"codes": role, "scale": f"{role}_scale", "zero": f"{role}_zero"}
            for part, operand in zip(quant_parts(fmt), node.inputs):
                if part not in names:
                    raise NotLowered(f"the {role} cache format {fmt} has a {part} scale; the kernel takes scales per token or group")
                args[names[part]] = r.arg(operand, f"the {role} cache's {part}")
            formats[role] = fmt
        else:
            args[role] = r.arg(val, f"the {'keys' if role == 'k' else 'values'}")
    if set(nodes[:-1]) - {k.node, v.node}:
        raise NotLowered("the attention group holds more than the KV dequantizes and the attention")
    if any(_dtype_name(t) != "f32" for t in (q.type, att.types[0])) or any(
            role not in formats and _dtype_name(val.type) != "f32" for role, val in (("k", k), ("v", v))):
        raise NotLowered("the attention kernel computes in f32 (q, float k / v and out)")
    mask_kind = "none"
    if mask:
        mask_kind = "bool" if mask[0].type.dtype.name == "bool" else "float" if _dtype_name(mask[0].type) == "f32" else None
        if mask_kind is None:
            raise NotLowered(f"a {mask[0].type} mask: the kernel takes a bool or f32 mask")
        args["mask"] = r.arg(mask[0], "the mask")
    heads, kv_heads, d = (_static_int(x, what) for x, what in (
        (q.type.shape[1], "the query heads"), (k.type.shape[1], "the key/value heads"), (q.type.shape[-1], "the head dim")))
    spec = _checked("attention", lambda: TEMPLATES["attention"].spec(
        heads, kv_heads, d, k=formats.get("k"), v=formats.get("v"), causal=bool(att.get("causal")), mask=mask_kind,
        scale=att.get("scale")))
    call = KernelCall(spec, tuple(args.items()), (Output("out", att.types[0]),), att.loc)
    return Lowered("attention", (call,), (Source(0, 0),))


#: Group kind -> its lowering rule. Kinds without a rule run op by op.
RULES: dict[str, Rule] = {
    "dequant_gemm": dequant_gemm,
    "swiglu": swiglu,
    "norm_quant": norm_quant,
    "act_quant": act_quant,
    "rope_kv": rope_kv,
    "attention": attention,
}


def lower(node: Node, reasons: dict[Node, str] | None = None) -> Lowered | None:
    """The kernel calls that compute the `fused` node `node`, or None when no template
    covers its group; then, if `reasons` is given, `reasons[node]` says why."""
    if node.op != "fused":
        raise ValueError(f"lower: expected a fused node, got {node.op} ({node!r})")
    kind, body = node.get("kind"), region_of(node)
    rule = RULES.get(kind)
    try:
        if body is None:
            raise NotLowered("the fused node has no region")
        if rule is None:
            raise NotLowered(f"no kernel template lowers {kind} groups yet (rules exist for {', '.join(RULES)})")
        lowered = rule(Region(body))
    except NotLowered as e:
        if reasons is not None:
            reasons[node] = str(e)
        return None
    if len(lowered.results) != len(node.types):
        raise AssertionError(f"lower: the {kind} rule gives {len(lowered.results)} results for {len(node.types)}")
    return lowered
