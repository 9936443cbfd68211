"""quantize: give weights, activations and the KV cache the number formats of a plan.

For every `linear` whose weight is a `const`, the plan's rule for the layer's module path
(`node.loc`) decides:

- weight format: the weight becomes quantized constants (codes, scales, zero points) named
  `{path}.weight`, `{path}.weight.scale`, ... and a `dequantize` feeds the linear (a weight
  other nodes still read in float, such as an lm_head tied to the embedding, keeps its name,
  and the quantized constants are `{path}.qweight`, `{path}.qweight.scale`, ...);
- activation format: the linear's input passes through `quantize` (scales computed per
  token at run time) and `dequantize`.

For every `attention` the rule for its path with op kind `attention` gives the KV-cache
format: keys and values pass through `quantize`/`dequantize` (per token and head).

    Before: %5 = const() {name="m.fc.weight"} : f32[64, 72]
            %6 = linear(%4, %5) : f32[b, s, 64] loc("m.fc")
    After:  %5 = const() {name="m.fc.weight"} : int4<asym,g32>[64, 72]
            %6 = const() {name="m.fc.weight.scale"} : f32[64, 3]
            %7 = const() {name="m.fc.weight.zero"} : f32[64, 3]
            %8 = dequantize(%5, %6, %7) {format=int4<asym,g32>, dtype=f32} : f32[64, 72]
            %9 = linear(%4, %8) : f32[b, s, 64] loc("m.fc")

Weights are rounded to nearest by default; `method="gptq"` uses the Hessians that
calibration left in `graph.meta["calibration"]` (per layer path), and `clip_search` picks
per-block clipping ratios that minimise each layer's output error. What each layer got is
recorded in `graph.meta["quantized"][path]` (format, bytes, errors) for the report.

Preserves: every op that the plan leaves in float, bit for bit.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..ir import F32, FloatFormat, Graph, IntFormat, Node, NumberFormat, TensorType, Value
from ..ir.ops import quant_parts, scale_shape


class RuleLike(Protocol):
    weight: NumberFormat | None
    act: NumberFormat | None
    kv: NumberFormat | None
    options: dict


class PlanLike(Protocol):
    """What the pass needs of a plan (`mxc.Plan` is one)."""

    method: str
    clip_search: bool

    def rule_for(self, path: str, op: str = "linear") -> RuleLike: ...


def layer_path(node: Node, weight: Node | None = None) -> str:
    """The module path a plan addresses a layer by: its `loc`, else its weight's name."""
    if node.loc:
        return node.loc
    if weight is not None and weight.op == "const":
        return weight.get("name").removesuffix(".weight")
    return f"<{node.op}>"


def storage(codes: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """Codes in their storage tensor: int8 for symmetric integers, uint8 for asymmetric ones
    (codes up to 255); float16 for float grids (exact: every fp8/fp6/fp4 value is a float16)."""
    if isinstance(fmt, IntFormat):
        return codes.to(torch.int8 if fmt.symmetric else torch.uint8)
    return codes.to(torch.float16)


def format_bytes(fmt: NumberFormat, shape: tuple[int, ...]) -> int:
    """Bytes the tensor takes packed: ceil(bits·n/8) for the codes plus the scales (and zero
    points) in their storage dtypes."""
    from ..ir.formats import SCALE_DTYPES

    n = 1
    for d in shape:
        n *= d
    total = -(-fmt.bits * n // 8)
    nscale = 1
    for d in scale_shape(fmt, shape):
        nscale *= int(d)
    total += -(-SCALE_DTYPES[fmt.scaling.scale] * nscale // 8)
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        total += -(-fmt.bits * nscale // 8)
    if isinstance(fmt, FloatFormat) and fmt.global_:
        total += 4
    return total


def quantize_weight(
    w: torch.Tensor,
    fmt: NumberFormat,
    *,
    method: str,
    clip_search: bool,
    hessian: torch.Tensor | None,
    factors: dict | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The quantized parts of `w` ([N, K]) and their dequantized value."""
    w = w.float()
    clip: Any = 1.0
    if clip_search:
        from .clip import search_clip

        clip = search_clip(w, fmt, H=hessian)
    if method == "gptq":
        if hessian is None:
            raise ValueError("GPTQ needs calibration Hessians: compile with calibration data")
        from .gptq import gptq_quantize

        q = gptq_quantize(w, hessian, fmt, clip=clip if clip_search else None, factors=factors)
    else:
        q = fmt.quantize(w, clip)
    parts = {"codes": storage(q.codes, fmt), "scale": q.scale, "zero": q.zero, "global": q.global_scale}
    return {p: parts[p] for p in quant_parts(fmt)}, fmt.dequantize(q)


def _quant_dequant(x: Value, fmt: NumberFormat, loc: str | None, static: list[Node] = ()) -> tuple[list[Node], Value]:
    """`quantize` (dynamic, or static with the `static` scale consts) and `dequantize` of `x`."""
    inputs = [x, *(c.out for c in static)]
    q = Node.create("quantize", inputs, {"format": fmt}, _parts_types(fmt, x.type), loc)
    dq = Node.create("dequantize", q.outs, {"format": fmt, "dtype": x.type.dtype}, [x.type], loc)
    return [*static, q, dq], dq.out


def _parts_types(fmt: NumberFormat, t: TensorType) -> list[TensorType]:
    from ..ir.ops import OPS

    return OPS["quantize"].infer([t], {"format": fmt})


def static_scale(fmt: NumberFormat, stats: dict, path: str, percentile: float | None = None) -> torch.Tensor:
    """The per-tensor scale ([1, 1]) of a static activation format from calibration: the
    format's own scale for the activation's abs-max (or its `percentile`, which clips)."""
    if fmt.scaling.kind != "tensor":
        raise ValueError(f"layer {path}: static activation scales are per tensor, got {fmt}")
    if (isinstance(fmt, IntFormat) and not fmt.symmetric) or (isinstance(fmt, FloatFormat) and fmt.global_):
        raise ValueError(
            f"layer {path}: static activation format {fmt} is not supported; use a symmetric integer or "
            "a float format (calibration keeps abs-max statistics)"
        )
    if not stats:
        raise ValueError(
            f"layer {path}: activation format {fmt} scales per tensor, statically, from calibration data; "
            "compile with calibration=tokenizer or batches, or use per-token (dynamic) scaling"
        )
    if percentile is None:
        bound = float(stats["amax"].max())
    else:
        have = stats.get("tensor_percentiles", {})
        if percentile not in have:
            raise ValueError(f"layer {path}: act_percentile {percentile} was not calibrated; calibrated: {sorted(have)}")
        bound = have[percentile]
    return fmt.quantize(torch.tensor([[bound]], dtype=torch.float32)).scale.reshape(1, 1)


class _Stats:
    """Calibration statistics by layer path: a `Calibration` (lazy, in graph order, told
    each quantized layer) or a plain dict `{path: entry}`."""

    def __init__(self, graph: Graph):
        source = graph.meta.get("calibration")
        if source is not None and hasattr(source, "for_graph"):
            source = source.for_graph(graph)
        self.source = source

    def get(self, path: str, hessian: bool) -> dict:
        if self.source is None:
            return {}
        if hasattr(self.source, "stats"):
            return self.source.stats(path, hessian=hessian) if path in self.source else {}
        return self.source.get(path, {})

    def update(self, path: str, **kw: Any) -> None:
        if hasattr(self.source, "update") and path in self.source:
            self.source.update(path, **kw)

    def close(self) -> None:
        if hasattr(self.source, "close"):
            self.source.close()


def quantize(graph: Graph, *, plan: PlanLike) -> Graph:
    """Apply `plan` to `graph` (see the module docstring); returns `graph` if it changes nothing."""
    calib = _Stats(graph)
    weights = dict(graph.weights)
    record: dict[str, dict] = {}
    readers: dict[Node, int] = {}  # a tied weight (lm_head = embedding) has several
    for n in graph.nodes:
        for v in n.inputs:
            readers[v.node] = readers.get(v.node, 0) + 1

    def linear(node: Node) -> list[Node] | None:
        wnode = node.inputs[1].node
        path = layer_path(node, wnode)
        rule = plan.rule_for(path, "linear")
        if rule.act is None and rule.weight is None:
            return None
        opts = {"method": plan.method, "clip_search": plan.clip_search, **rule.options}
        stats = calib.get(path, hessian=rule.weight is not None)
        inputs, emitted, act = list(node.inputs), [], None
        if rule.act is not None:
            static: list[Node] = []
            act = rule.act
            if rule.act.scaling.kind == "tensor":
                scale = static_scale(rule.act, stats, path, opts.get("act_percentile"))
                name = f"{path}.input_scale"
                weights[name] = scale
                static = [Node.create("const", (), {"name": name}, [TensorType((1, 1), F32)])]
                act = lambda x, f=rule.act, s=scale: f.dequantize(f.encode(x, s))  # noqa: E731
            extra, inputs[0] = _quant_dequant(inputs[0], rule.act, node.loc, static)
            emitted += extra
        wq = None
        if rule.weight is not None:
            fmt, w = rule.weight, graph.weights[wnode.get("name")]
            hessian = stats.get("hessian")
            parts, wq = quantize_weight(
                w, fmt, method=opts["method"], clip_search=opts["clip_search"], hessian=hessian,
                factors=stats.setdefault("gptq_factors", {}) if hessian is not None else None,
            )
            consts = []
            base = f"{path}.weight"
            if base in graph.weights and (wnode.get("name") != base or readers.get(wnode, 0) > 1):
                base = f"{path}.qweight"  # the float tensor keeps its name for its other readers
            for part, t in zip(quant_parts(fmt), _parts_types(fmt, wnode.types[0])):
                name = base + ("" if part == "codes" else f".{part}")
                weights[name] = parts[part]
                consts.append(Node.create("const", (), {"name": name}, [t]))
            attrs = {"format": fmt, "dtype": wnode.types[0].dtype}
            dq = Node.create("dequantize", [c.out for c in consts], attrs, [wnode.types[0]], node.loc)
            emitted += [*consts, dq]
            inputs[1] = dq.out
            record[path] = {**_layer_record(fmt, w, wq, hessian), "weights": [c.get("name") for c in consts]}
        if rule.act is not None:
            record.setdefault(path, {})["act"] = str(rule.act)
        calib.update(path, weight=wq, act=act)
        return [*emitted, node.replace(inputs=inputs)]

    def attention(node: Node) -> list[Node] | None:
        rule = plan.rule_for(layer_path(node), "attention")
        if rule.kv is None:
            return None
        inputs, emitted = list(node.inputs), []
        for i in (1, 2):
            extra, inputs[i] = _quant_dequant(inputs[i], rule.kv, node.loc)
            emitted += extra
        record[layer_path(node)] = {"kv": str(rule.kv)}
        return [*emitted, node.replace(inputs=inputs)]

    def apply(node: Node) -> list[Node] | None:
        if node.op == "linear" and node.inputs[1].node.op == "const":
            return linear(node)
        if node.op == "attention":
            return attention(node)
        return None

    try:
        out = graph.rewrite(apply)
    finally:
        calib.close()
    if out is graph:
        return graph
    used = {n.get("name") for n in out.nodes if n.op == "const"}
    out = out.replace(weights={k: v for k, v in weights.items() if k in used})
    out.meta["quantized"] = {**graph.meta.get("quantized", {}), **record}
    out.meta.pop("calibration", None)  # the batches' activations are not the compiled model's
    return out


def _layer_record(fmt: NumberFormat, w: torch.Tensor, wq: torch.Tensor, hessian: torch.Tensor | None) -> dict:
    err = (wq - w.float()).norm() / w.float().norm()
    rec = {
        "format": str(fmt),
        "shape": tuple(w.shape),
        "bits": fmt.effective_bits(w.shape[-1]),
        "bytes": format_bytes(fmt, tuple(w.shape)),
        "float_bytes": w.numel() * w.element_size(),
        "weight_error": float(err),
    }
    if hessian is not None:
        from .clip import output_error

        rec["output_error"] = output_error(w.float(), wq, hessian.float())
    return rec
