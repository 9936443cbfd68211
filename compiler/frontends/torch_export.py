"""Capture an `nn.Module` with `torch.export` and lower it to the IR, one aten op at a time.

    captured = capture(model, {"input_ids": ids})
    captured.graph      # IR: linear, embedding, attention, ... and `torch` fallbacks
    captured.call_spec  # how to call it like the module

Each aten op with a rule in `LOWERINGS` becomes an op of the op set; every other op becomes a
`torch` node that calls the aten op as is (listed by `fallbacks()`), so a model always
compiles. Parameters, buffers and constants become `const` nodes named by their module path
(`model.layers.3.mlp.down_proj.weight`). Size symbols are named for their role: the first
input's dim 0 is `b`, dim 1 is `s`. Shape arithmetic (`aten.sym_size`, `operator.mul` on
sizes) is folded into sympy expressions on the dims.

Recognising compound patterns (RMSNorm, rotary embeddings, GQA) is the `canonicalize` pass's
work, not this module's: capture keeps what torch recorded.
"""

from __future__ import annotations

import inspect
import operator
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import sympy
import torch
import torch.fx
import torch.utils._pytree as pytree

from ..ir import DEVICE, DType, DimRange, Graph, Node, Ref, TensorType, TorchConst, Value, sym
from ..signature import CallSpec


class CaptureError(RuntimeError):
    """`torch.export` could not capture the model; the message names the op or source line."""


@dataclass
class Captured:
    graph: Graph
    call_spec: CallSpec
    exported: torch.export.ExportedProgram


# ----------------------------------------------------------------------------- inputs


def example_kwargs(model: torch.nn.Module, example_inputs: Any) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Bind `example_inputs` (a tensor, a tuple of positional arguments or a dict of keyword
    arguments) to `model.forward`'s parameters. Returns the arguments by name and the
    parameter names in order. Hugging Face models get `use_cache=False` unless given."""
    sig = inspect.signature(model.forward)
    params = tuple(
        p.name for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    )
    if example_inputs is None:
        example_inputs = default_example(model)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise TypeError(
            f"example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword "
            f"arguments, got {type(example_inputs).__name__}"
        )
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"example_inputs do not fit {type(model).__name__}.forward{sig}: {e}") from None
    named: dict[str, Any] = {}
    for name, val in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(val)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{type(model).__name__}.forward takes *{name}; pass example inputs by name instead")
        else:
            named[name] = val
    if "use_cache" in sig.parameters and "use_cache" not in named and _is_hf(model):
        named["use_cache"] = False
    return named, params


def default_example(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Example inputs for a Hugging Face model that takes `input_ids`: 2 sequences of 16 tokens."""
    config = getattr(model, "config", None)
    if config is None or "input_ids" not in inspect.signature(model.forward).parameters:
        raise TypeError(
            f"example_inputs are needed to capture {type(model).__name__}: pass a tensor, a tuple of "
            "positional arguments or a dict of keyword arguments"
        )
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=gen).to(device)
    return {"input_ids": ids}


def _is_hf(model: torch.nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def default_dynamic_shapes(named: dict[str, Any]) -> dict[str, Any]:
    """Batch (dim 0) and sequence (dim 1) of every tensor input may vary."""
    auto = torch.export.Dim.AUTO
    return {
        k: {i: auto for i in range(min(v.dim(), 2))} if isinstance(v, torch.Tensor) else None
        for k, v in named.items()
    }


# ----------------------------------------------------------------------------- export


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch: usually the model's failing line."""
    frames = traceback.extract_tb(exc.__traceback__)
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    mine = [f for f in frames if not f.filename.startswith(torch_dir) and "/mxc/" not in f.filename]
    if not mine:
        return None
    f = mine[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {f.line}"


def export(model: torch.nn.Module, named: dict[str, Any], dynamic_shapes: Any) -> torch.export.ExportedProgram:
    """`torch.export.export` under `no_grad`, with failures turned into `CaptureError`."""
    try:
        with torch.no_grad():
            return torch.export.export(model, (), named, dynamic_shapes=dynamic_shapes)
    except Exception as e:  # noqa: BLE001 - every export failure is reported the same way
        where = _user_frame(e)
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()][:12]
        msg = f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: " + "\n  ".join(lines)
        if where:
            msg += f"\n  at {where}"
        raise CaptureError(msg) from e


# ----------------------------------------------------------------------------- lowering


class _Lowering:
    """State while walking the exported FX graph."""

    def __init__(self, ep: torch.export.ExportedProgram):
        self.ep = ep
        self.values: dict[torch.fx.Node, Value | tuple[Value, ...]] = {}
        self.sizes: dict[torch.fx.Node, sympy.Expr | int] = {}
        self.nodes: list[Node] = []
        self.symbols: dict[sympy.Symbol, sympy.Symbol] = {}

    # symbolic sizes -----------------------------------------------------------
    def name_symbols(self, user_inputs: list[torch.fx.Node]) -> tuple[DimRange, ...]:
        taken: set[str] = set()
        for ph in user_inputs:
            val = ph.meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            for axis, d in enumerate(val.shape):
                if not isinstance(d, torch.SymInt):
                    continue
                expr = d.node.expr
                if not isinstance(expr, sympy.Symbol) or expr in self.symbols:
                    continue
                base = {0: "b", 1: "s"}.get(axis, "d")
                name, k = base, 1
                while name in taken:
                    name, k = f"{base}{k}", k + 1
                taken.add(name)
                self.symbols[expr] = sym(name)
        dims = []
        ranges = self.ep.range_constraints
        for torch_sym, ir_sym in self.symbols.items():
            vr = ranges.get(torch_sym)
            lo = int(vr.lower) if vr is not None and isinstance(vr.lower, sympy.Integer) else 1
            hi = int(vr.upper) if vr is not None and isinstance(vr.upper, sympy.Integer) else None
            # export traces sizes as >= 2 (its 0/1 specialisation); the lowered graph is
            # shape-generic, so size 1 is allowed (tests check batch 1 and length 1).
            dims.append(DimRange(ir_sym.name, 1 if lo == 2 else lo, hi))
        return tuple(dims)

    def expr(self, value: Any) -> sympy.Expr | int:
        """A torch SymInt or sympy expression in IR size symbols."""
        expr = value.node.expr if isinstance(value, torch.SymInt) else value
        if isinstance(expr, int):
            return expr
        expr = _standard_sympy(expr)
        unknown = expr.free_symbols - set(self.symbols)
        if unknown:
            raise CaptureError(
                f"size expression {expr} uses {sorted(map(str, unknown))}, which are not sizes of the inputs "
                "(a data-dependent size); mxc needs sizes that follow from the input shapes"
            )
        out = expr.xreplace(self.symbols)
        return int(out) if out.is_Integer else out

    def ttype(self, val: Any, where: torch.fx.Node) -> TensorType:
        if not isinstance(val, torch.Tensor):
            raise CaptureError(f"{where.target} at {where.name} produces {type(val).__name__}, not a tensor")
        return TensorType(tuple(self.expr(d) for d in val.shape), DType.from_torch(val.dtype))

    # arguments ------------------------------------------------------------------
    def arg(self, a: Any, refs: list[Value]) -> Any:
        """An FX argument as an IR attribute value; tensors become `Ref`s into `refs`."""
        if isinstance(a, torch.fx.Node):
            if a in self.sizes:
                return self.sizes[a]
            v = self.values.get(a)
            if isinstance(v, Value):
                refs.append(v)
                return Ref(len(refs) - 1)
            raise CaptureError(f"argument {a.name} ({a.op} {a.target}) has no IR value")
        if isinstance(a, (list, tuple)):
            return tuple(self.arg(x, refs) for x in a)
        if isinstance(a, torch.dtype):
            return DType.from_torch(a)
        if isinstance(a, torch.device):
            return DEVICE
        if isinstance(a, (torch.layout, torch.memory_format)):
            return TorchConst(str(a).removeprefix("torch."))
        if isinstance(a, (torch.SymInt, sympy.Expr)):
            return self.expr(a)
        if a is None or isinstance(a, (bool, int, float, str)):
            return a
        raise CaptureError(f"argument {a!r} of type {type(a).__name__} has no IR form")

    def value(self, a: Any) -> Value:
        v = self.values.get(a) if isinstance(a, torch.fx.Node) else None
        if not isinstance(v, Value):
            raise CaptureError(f"expected a tensor, got {a!r}")
        return v

    def emit(self, node: Node) -> Node:
        self.nodes.append(node)
        return node


def _standard_sympy(expr: sympy.Expr) -> sympy.Expr:
    """Replace torch's own sympy functions (FloorDiv, ...) with standard sympy ones."""
    from torch.utils._sympy import functions as F

    table = {
        F.FloorDiv: lambda a, b: sympy.floor(a / b),
        F.CeilDiv: lambda a, b: sympy.ceiling(a / b),
        F.CleanDiv: lambda a, b: a / b,
        F.IntTrueDiv: lambda a, b: a / b,
        F.PythonMod: sympy.Mod,
        F.Mod: sympy.Mod,
    }
    for fn, repl in table.items():
        if expr.has(fn):
            expr = expr.replace(fn, repl)
    return expr


def _loc(fx_node: torch.fx.Node) -> str | None:
    stack = fx_node.meta.get("nn_module_stack") or {}
    for path, _cls in reversed(list(stack.values())):
        if path and not path.startswith("_empty"):
            return path
    return None


Rule = Callable[[_Lowering, torch.fx.Node, TensorType], "Node | Value | None"]
aten = torch.ops.aten


def _args(fx_node: torch.fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    """The node's arguments by schema name (positional and keyword), defaults filled in."""
    schema = fx_node.target._schema
    out = {a.name: (a.default_value if a.has_default_value() else None) for a in schema.arguments}
    for a, v in zip(schema.arguments, fx_node.args):
        out[a.name] = v
    out.update(fx_node.kwargs)
    return {k: out.get(k) for k in names} if names else out


def _simple(op: str, n_inputs: int) -> Rule:
    def rule(lw: _Lowering, fx: torch.fx.Node, t: TensorType) -> Node:
        return Node.create(op, [lw.value(a) for a in fx.args[:n_inputs]], {}, [t])

    return rule


def _linear(lw, fx, t):
    a = _args(fx, ("input", "weight", "bias"))
    ins = [lw.value(a["input"]), lw.value(a["weight"])] + ([lw.value(a["bias"])] if a["bias"] is not None else [])
    return Node.create("linear", ins, {}, [t])


def _embedding(lw, fx, t):
    a = _args(fx, ("weight", "indices"))
    return Node.create("embedding", [lw.value(a["indices"]), lw.value(a["weight"])], {}, [t])


def _binary(op):
    def rule(lw, fx, t):
        a = _args(fx, ("self", "other", "alpha"))
        if a["alpha"] not in (None, 1) or not all(isinstance(a[k], torch.fx.Node) for k in ("self", "other")):
            return None
        x, y = lw.values.get(a["self"]), lw.values.get(a["other"])
        if not (isinstance(x, Value) and isinstance(y, Value) and x.type.dtype == y.type.dtype == t.dtype):
            return None
        return Node.create(op, [x, y], {}, [t])

    return rule


def _layer_norm(lw, fx, t):
    a = _args(fx, ("input", "normalized_shape", "weight", "bias", "eps"))
    if len(a["normalized_shape"]) != 1 or (a["weight"] is None and a["bias"] is not None):
        return None
    ins = [lw.value(a["input"])] + [lw.value(a[k]) for k in ("weight", "bias") if a[k] is not None]
    return Node.create("layer_norm", ins, {"eps": float(a["eps"])}, [t])


def _gelu(lw, fx, t):
    a = _args(fx, ("self", "approximate"))
    return Node.create("gelu", [lw.value(a["self"])], {"approximate": a["approximate"] or "none"}, [t])


def _softmax(lw, fx, t):
    a = _args(fx, ())
    if fx.target == aten.softmax.int and a.get("dtype") is not None:
        return None
    if fx.target == aten._softmax.default and a.get("half_to_float"):
        return None
    return Node.create("softmax", [lw.value(a["self"])], {"axis": int(a["dim"])}, [t])


def _sdpa(lw, fx, t):
    a = _args(fx, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"))
    if a["dropout_p"] not in (None, 0.0, 0):
        return None
    ins = [lw.value(a[k]) for k in ("query", "key", "value")]
    if a["attn_mask"] is not None:
        ins.append(lw.value(a["attn_mask"]))
    scale = None if a["scale"] is None else float(a["scale"])
    return Node.create("attention", ins, {"causal": bool(a["is_causal"]), "scale": scale}, [t])


def _reshape(lw, fx, t):
    shape = lw.arg(fx.args[1], [])
    return Node.create("reshape", [lw.value(fx.args[0])], {"shape": shape}, [t])


def _transpose(lw, fx, t):
    return Node.create("transpose", [lw.value(fx.args[0])], {"dim0": int(fx.args[1]), "dim1": int(fx.args[2])}, [t])


def _permute(lw, fx, t):
    return Node.create("permute", [lw.value(fx.args[0])], {"dims": tuple(int(d) for d in fx.args[1])}, [t])


def _unsqueeze(lw, fx, t):
    return Node.create("unsqueeze", [lw.value(fx.args[0])], {"axis": int(fx.args[1])}, [t])


def _expand(lw, fx, t):
    a = _args(fx, ("self", "size", "implicit"))
    return Node.create("expand", [lw.value(a["self"])], {"shape": lw.arg(a["size"], [])}, [t])


def _slice(lw, fx, t):
    a = _args(fx, ("self", "dim", "start", "end", "step"))
    attrs = {
        "axis": int(a["dim"] or 0),
        "start": 0 if a["start"] is None else lw.arg(a["start"], []),
        "end": 2**63 - 1 if a["end"] is None else lw.arg(a["end"], []),
        "step": lw.arg(a["step"] if a["step"] is not None else 1, []),
    }
    return Node.create("slice", [lw.value(a["self"])], attrs, [t])


def _cat(lw, fx, t):
    a = _args(fx, ("tensors", "dim"))
    return Node.create("cat", [lw.value(x) for x in a["tensors"]], {"axis": int(a["dim"] or 0)}, [t])


def _cast(lw, fx, t):
    a = _args(fx, ())
    if a.get("memory_format") not in (None, torch.preserve_format):
        return None
    return Node.create("cast", [lw.value(fx.args[0])], {"dtype": t.dtype}, [t])


def _identity(lw, fx, t):
    return lw.value(fx.args[0])


def _dropout(lw, fx, t):
    a = _args(fx, ("input", "p", "train"))
    return lw.value(a["input"]) if not a["train"] else None


LOWERINGS: dict[Any, Rule] = {
    aten.linear.default: _linear,
    aten.embedding.default: _embedding,
    aten.add.Tensor: _binary("add"),
    aten.mul.Tensor: _binary("mul"),
    aten.silu.default: _simple("silu", 1),
    aten.relu.default: _simple("relu", 1),
    aten.tanh.default: _simple("tanh", 1),
    aten.gelu.default: _gelu,
    aten.layer_norm.default: _layer_norm,
    aten.softmax.int: _softmax,
    aten._softmax.default: _softmax,
    aten.scaled_dot_product_attention.default: _sdpa,
    aten.matmul.default: _simple("matmul", 2),
    aten.view.default: _reshape,
    aten.reshape.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.transpose.int: _transpose,
    aten.permute.default: _permute,
    aten.unsqueeze.default: _unsqueeze,
    aten.expand.default: _expand,
    aten.slice.Tensor: _slice,
    aten.cat.default: _cat,
    aten.to.dtype: _cast,
    aten.to.dtype_layout: _cast,
    aten.to.device: _cast,
    aten._to_copy.default: _cast,
    aten.contiguous.default: _identity,
    aten.clone.default: _identity,
    aten.alias.default: _identity,
    aten.detach.default: _identity,
    aten.lift_fresh_copy.default: _identity,
    aten.dropout.default: _dropout,
}

#: Ops with no result that only assert facts torch already checked while tracing.
_ASSERTS = {
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
    aten._assert_async.msg,
}


def _fallback(lw: _Lowering, fx: torch.fx.Node) -> Node:
    """A `torch` node that calls the aten op with its recorded arguments."""
    refs: list[Value] = []
    args = tuple(lw.arg(a, refs) for a in fx.args)
    kwargs = {k: lw.arg(v, refs) for k, v in fx.kwargs.items()}
    val = fx.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    types = [lw.ttype(v, fx) for v in vals]
    attrs: dict[str, Any] = {"target": _target_name(fx.target), "args": args}
    if kwargs:
        attrs["kwargs"] = kwargs
    return Node.create("torch", refs, attrs, types)


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target.__name__}" if target.namespace == "aten" else f"{target.namespace}.{target.__name__}"
    raise CaptureError(f"cannot call {target!r} from the IR: not an aten/custom op overload")


def lower(ep: torch.export.ExportedProgram, name: str) -> tuple[Graph, list[str]]:
    """The IR of an exported program, and the names of its tensor user inputs in order."""
    lw = _Lowering(ep)
    sig = ep.graph_signature
    params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    user = [n for n in placeholders if n.name in sig.user_inputs]
    dims = lw.name_symbols(user)
    weights: dict[str, torch.Tensor] = {}
    inputs: list[Node] = []
    input_names: list[str] = []
    for ph in placeholders:
        if ph.name in params:
            target = params[ph.name]
            tensor = ep.state_dict[target] if target in ep.state_dict else ep.constants[target]
            weights[target] = tensor.detach()
            node = lw.emit(Node.create("const", (), {"name": target}, [lw.ttype(ph.meta["val"], ph)]))
            lw.values[ph] = node.out
        elif isinstance(ph.meta.get("val"), torch.Tensor):
            node = Node.create("input", (), {"name": ph.name, "index": len(inputs)}, [lw.ttype(ph.meta["val"], ph)])
            inputs.append(node)
            input_names.append(ph.name)
            lw.values[ph] = node.out
    outputs: list[Value] = []
    for fx in ep.graph.nodes:
        if fx.op == "call_function":
            _lower_call(lw, fx)
        elif fx.op == "output":
            for o in pytree.tree_leaves(fx.args[0]):
                outputs.append(lw.value(o))
        elif fx.op not in ("placeholder",):
            raise CaptureError(f"unsupported FX node {fx.op} {fx.target} ({fx.name})")
    graph = Graph(name, tuple(inputs), tuple(lw.nodes), tuple(outputs), dims, weights)
    return graph.dead_code_eliminated(), input_names


def _lower_call(lw: _Lowering, fx: torch.fx.Node) -> None:
    target, val = fx.target, fx.meta.get("val")
    if target in _ASSERTS:
        return
    if isinstance(val, torch.SymInt) or (target is aten.sym_size.int):
        lw.sizes[fx] = lw.expr(val)
        return
    if target is operator.getitem:
        src = lw.values.get(fx.args[0])
        if isinstance(src, tuple):
            lw.values[fx] = src[fx.args[1]]
            return
    if not isinstance(target, torch._ops.OpOverload):
        raise CaptureError(
            f"{fx.name}: {getattr(target, '__name__', target)} is not an aten op; mxc lowers aten graphs "
            f"(at {fx.meta.get('stack_trace', '').strip().splitlines()[-1:] or 'unknown source'})"
        )
    if isinstance(val, (tuple, list)):
        node = lw.emit(_fallback(lw, fx).replace(loc=_loc(fx)))
        lw.values[fx] = node.outs
        return
    t = lw.ttype(val, fx)
    rule = LOWERINGS.get(target)
    got = rule(lw, fx, t) if rule is not None else None
    if isinstance(got, Value):
        lw.values[fx] = got
        return
    node = got if got is not None else _fallback(lw, fx)
    lw.values[fx] = lw.emit(node.replace(loc=_loc(fx))).out


def capture(
    model: torch.nn.Module, example_inputs: Any = None, *, dynamic_shapes: Any = None
) -> Captured:
    """Export `model` on `example_inputs` and lower it to the IR (see the module docstring)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    named, params = example_kwargs(model, example_inputs)
    ep = export(model, named, dynamic_shapes if dynamic_shapes is not None else default_dynamic_shapes(named))
    graph, input_names = lower(ep, type(model).__name__)
    constants = {k: v for k, v in named.items() if not isinstance(v, torch.Tensor)}
    spec = CallSpec(params, tuple(input_names), constants, ep.call_spec.out_spec)
    return Captured(graph, spec, ep)


def fallbacks(graph: Graph) -> dict[str, int]:
    """The aten ops left as `torch` nodes, with their counts."""
    out: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "torch":
            out[n.get("target")] = out.get(n.get("target"), 0) + 1
    return out
