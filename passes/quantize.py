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

A layer the reorder pass recorded in `graph.meta["reordered"][path]` with k outlier channels
(its last k input channels, contiguous) gets mixed precision inside the tensor: the first
K-k input channels take the rule's formats, the last k the rule's `outlier_format` (default
`int8<sym,channel>` for the weight, `int8<sym,token>` for the activation when the rule
quantizes it; "float" keeps them f32). The IR says so explicitly, as the two GEMMs a fused
mixed-precision kernel runs into one accumulator (Atom, QUIK): the input is sliced, each
part quantized in its own format, each weight part dequantized, and the two products added:

    %a = slice(%x) {axis=2, start=0, end=64, step=1} : f32[b, s, 64]     (+ quantize/dequantize)
    %b = slice(%x) {axis=2, start=64, end=72, step=1} : f32[b, s, 8]     (+ quantize/dequantize)
    %wa = dequantize(%c0, %s0) {format=int4<sym,g32>, dtype=f32} : f32[N, 64]   "{path}.weight"
    %wb = dequantize(%c1, %s1) {format=int8<sym,channel>, dtype=f32} : f32[N, 8] "{path}.weight.outliers"
    %ya = linear(%a, %wa, %bias) : f32[b, s, N]
    %yb = linear(%b, %wb) : f32[b, s, N]
    %y = add(%ya, %yb) : f32[b, s, N]

(every node with the layer's loc). Each weight part is its own constant, packed by the
layout pass at its own width; the add is one GEMM's epilogue (a residual add of the other's
result), so a kernel reads each part once, in its own format, into one output.
With GPTQ the Hessian (already in the reordered channel order: calibration runs the
reordered graph) is split: the low-bit part is solved under the Schur complement
`H_ll - H_lo H_oo⁻¹ H_ol` and its error is then compensated optimally in the outlier columns
(`W_o -= ΔW_l H_lo H_oo⁻¹`) before they are quantized under `H_oo` (QUIK's scheme: exact
GPTQ with the outlier columns last). The record then holds both parts (`"parts"`; `bits`
and `bytes` count both).

Weights are rounded to nearest by default; `method="gptq"` uses the Hessians that
calibration left in `graph.meta["calibration"]` (per layer path), and `clip_search` picks
per-block clipping ratios that minimise each layer's output error. What each layer got is
recorded in `graph.meta["quantized"][path]` (format, bytes, errors) for the report.

Preserves: every op that the plan leaves in float, bit for bit.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..ir import F32, FloatFormat, Graph, IntFormat, Node, NumberFormat, TensorType, Value, parse_format
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


def stored_bytes(fmt: NumberFormat, shape: tuple[int, ...]) -> int:
    """Bytes the compiled model stores for a weight of `shape` ([N, K]) in `fmt`: the layout
    pass packs each row's codes into ceil(bits·K/32) int32 words (more than `format_bytes`'
    ceil(bits·N·K/8) when a row's bits do not fill its last word), plus the scales and zero
    points at their `format_bytes` size."""
    from ..ir.packing import packed_words

    *rows, k = shape
    n = 1
    for d in rows:
        n *= d
    nominal = -(-fmt.bits * n * k // 8)
    return format_bytes(fmt, shape) - nominal + 4 * n * packed_words(k, fmt.bits)


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
    reordered = graph.meta.get("reordered", {})
    record: dict[str, dict] = {}
    shared: dict[Node, tuple[Value, torch.Tensor]] = {}  # weight const -> its dequantize, for later readers
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
        k = reordered.get(path, {}).get("outliers", 0)
        if k:
            base = f"{path}.weight"
            if base in graph.weights and (wnode.get("name") != base or readers.get(wnode, 0) > 1):
                base = f"{path}.qweight"
            emitted, rec, wq, act = _mixed_linear(node, path, rule, opts, stats, k, graph.weights, weights, base)
            record[path] = rec
            calib.update(path, weight=wq, act=act)
            return emitted
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
        if rule.weight is not None and wnode in shared:  # a second call of one module: one quantized weight
            inputs[1], wq = shared[wnode]
            emitted.append(node.replace(inputs=inputs))
            return emitted
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
            shared[wnode] = (dq.out, wq)
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


#: The formats of the outlier channels when a rule does not say (`outlier_format`).
DEFAULT_OUTLIER_FORMAT = {"weight": "int8<sym,channel>", "act": "int8<sym,token>"}
_FLOAT_NAMES = ("float", "none", "f32", "fp32")


def outlier_formats(spec: Any, where: str) -> tuple[NumberFormat | None, NumberFormat | None]:
    """The (weight, activation) formats of the outlier channels from a rule's `outlier_format`
    option: None (the defaults), a format's text for the weight part ("float" keeps weight and
    activation outliers f32), or `{"weight": text, "act": text}` (a missing key: the default;
    "float": f32). `where` names the layer or rule in errors."""
    expected = ('a number format text, "float", or {"weight": text, "act": text} '
                f'(default {DEFAULT_OUTLIER_FORMAT})')
    if spec is None:
        spec = dict(DEFAULT_OUTLIER_FORMAT)
    elif isinstance(spec, str):
        spec = {"weight": spec, "act": spec if spec.lower() in _FLOAT_NAMES else DEFAULT_OUTLIER_FORMAT["act"]}
    elif isinstance(spec, dict) and spec and set(spec) <= {"weight", "act"}:
        spec = {**DEFAULT_OUTLIER_FORMAT, **spec}
    else:
        raise ValueError(f"{where}: outlier_format must be {expected}, got {spec!r}")
    out = []
    for part in ("weight", "act"):
        text = spec[part]
        if not isinstance(text, str):
            raise ValueError(f"{where}: outlier_format {part} must be {expected}, got {text!r}")
        if text.lower() in _FLOAT_NAMES:
            out.append(None)
            continue
        try:
            fmt = parse_format(text)
        except ValueError as e:
            raise ValueError(f"{where}: outlier_format {part} must be {expected}, got {text!r} ({e})") from None
        bad, allowed = ("token", "weights scale per tensor, channel, group or block") if part == "weight" else (
            "channel", "activations scale per token, tensor, group or block")
        if fmt.scaling.kind == bad:
            raise ValueError(f"{where}: outlier_format {part} {fmt} scales per {bad}; {allowed}")
        out.append(fmt)
    return out[0], out[1]


def _slice_last(x: Value, start: int, end: int, loc: str | None) -> Node:
    axis = x.type.rank - 1
    shape = (*x.type.shape[:-1], end - start)
    return Node.create("slice", [x], {"axis": axis, "start": start, "end": end, "step": 1}, [x.type.with_shape(shape)], loc)


def _split_quantize(
    w: torch.Tensor, cut: int, formats: tuple[NumberFormat | None, NumberFormat | None], opts: dict,
    hessian: torch.Tensor | None, factors: dict | None,
) -> list[tuple[dict[str, torch.Tensor] | None, torch.Tensor]]:
    """The parts (None for a float part) and dequantized values of `w[:, :cut]` and
    `w[:, cut:]` in their formats; with GPTQ, the outlier part compensates the error of the
    low-bit part (see the module docstring)."""
    w = w.float()
    method, clip = opts["method"], opts["clip_search"]
    low, high = w[:, :cut], w[:, cut:]
    h_low = h_high = gain = None
    if hessian is not None:
        h = hessian.to(torch.float64)
        h_ll, h_lo, h_oo = h[:cut, :cut], h[:cut, cut:], h[cut:, cut:]
        h_high = h_oo
        if method == "gptq":
            eye = torch.eye(h_oo.shape[0], dtype=h.dtype)
            damped = h_oo + 0.01 * float(h_oo.diagonal().mean().clamp(min=1e-12)) * eye
            gain = torch.linalg.solve(damped, h_lo.T)  # H_oo⁻¹ H_ol: [k, cut]
            h_low = h_ll - h_lo @ gain  # the Schur complement: the outliers compensate
        else:
            h_low = h_ll
    sub = lambda key: None if factors is None else factors.setdefault(("outliers", cut, key), {})  # noqa: E731
    out = []
    fmt = formats[0]
    if fmt is None:
        out.append((None, low))
    else:
        out.append(quantize_weight(low, fmt, method=method, clip_search=clip, hessian=h_low, factors=sub("low")))
    if gain is not None:
        high = (high.to(torch.float64) - (out[0][1] - low).to(torch.float64) @ gain.T).float()
    fmt = formats[1]
    if fmt is None:
        out.append((None, high))
    else:
        out.append(quantize_weight(high, fmt, method=method, clip_search=clip, hessian=h_high, factors=sub("high")))
    return out


def _mixed_linear(
    node: Node, path: str, rule: RuleLike, opts: dict, stats: dict, k: int,
    originals: dict, weights: dict, base: str,
) -> tuple[list[Node], dict, torch.Tensor | None, Any]:
    """A linear whose last `k` input channels are outliers (the reorder pass put them there):
    the nodes replacing it, its record, its dequantized weight and its activation function
    for calibration (see the module docstring)."""
    where = f"layer {path!r}"
    w_out, a_out = outlier_formats(rule.options.get("outlier_format"), where)
    wnode = node.inputs[1].node
    n, kdim = wnode.types[0].shape
    if not 0 < k < kdim:
        raise ValueError(f"{where}: the reorder pass recorded {k} outlier channels, expected 1..{kdim - 1} (K={kdim})")
    cut = kdim - k
    x, loc = node.inputs[0], node.loc
    emitted: list[Node] = []
    xs, fns = [], []
    amax = stats.get("amax")
    for i, (lo, hi, fmt) in enumerate([(0, cut, rule.act), (cut, kdim, a_out if rule.act is not None else None)]):
        part = _slice_last(x, lo, hi, loc)
        emitted.append(part)
        if fmt is None:
            xs.append(part.out)
            fns.append(lambda t: t)
            continue
        static: list[Node] = []
        fn = fmt.fake
        if fmt.scaling.kind == "tensor":
            sub = {} if amax is None else {"amax": amax[lo:hi], "tensor_percentiles": stats.get("tensor_percentiles", {})}
            scale = static_scale(fmt, sub, path, opts.get("act_percentile") if i == 0 else None)
            name = f"{path}.input_scale" + ("" if i == 0 else ".outliers")
            weights[name] = scale
            static = [Node.create("const", (), {"name": name}, [TensorType((1, 1), F32)])]
            fn = lambda t, f=fmt, s=scale: f.dequantize(f.encode(t, s))  # noqa: E731
        extra, v = _quant_dequant(part.out, fmt, loc, static)
        emitted += extra
        xs.append(v)
        fns.append(fn)

    w = originals[wnode.get("name")]
    formats = (rule.weight, w_out if rule.weight is not None else None)
    hessian = stats.get("hessian") if rule.weight is not None else None
    factors = stats.setdefault("gptq_factors", {}) if hessian is not None else None
    parts = _split_quantize(w, cut, formats, opts, hessian, factors)
    dtype = wnode.types[0].dtype
    ws, recs = [], []
    for (q, wq_part), fmt, (lo, hi), name in zip(parts, formats, [(0, cut), (cut, kdim)], [base, f"{base}.outliers"]):
        t = TensorType((n, hi - lo), dtype)
        if q is None:  # a float part
            weights[name] = wq_part.to(w.dtype).contiguous()  # f32 (with GPTQ: compensated)
            const = Node.create("const", (), {"name": name}, [t])
            emitted.append(const)
            ws.append(const.out)
            recs.append({"format": str(dtype), "shape": (n, hi - lo), "bits": float(dtype.bits),
                         "bytes": n * (hi - lo) * w.element_size(), "weights": [name], "columns": [lo, hi]})
            continue
        consts = []
        for part, pt in zip(quant_parts(fmt), _parts_types(fmt, t)):
            cname = name + ("" if part == "codes" else f".{part}")
            weights[cname] = q[part]
            consts.append(Node.create("const", (), {"name": cname}, [pt]))
        dq = Node.create("dequantize", [c.out for c in consts], {"format": fmt, "dtype": dtype}, [t], loc)
        emitted += [*consts, dq]
        ws.append(dq.out)
        recs.append({"format": str(fmt), "shape": (n, hi - lo), "bits": fmt.effective_bits(hi - lo),
                     "bytes": format_bytes(fmt, (n, hi - lo)), "weights": [c.get("name") for c in consts],
                     "columns": [lo, hi]})
    ya = Node.create("linear", [xs[0], ws[0], *node.inputs[2:]], {}, node.types, loc)
    yb = Node.create("linear", [xs[1], ws[1]], {}, node.types, loc)
    y = Node.create("add", [ya.out, yb.out], {}, node.types, loc)
    emitted += [ya, yb, y]

    record: dict[str, Any] = {"outliers": k}
    wq = None
    if rule.weight is not None:
        wq = torch.cat([parts[0][1], parts[1][1]], dim=1)
        record.update(_layer_record(rule.weight, w, wq, hessian))
        record.update({
            "format": f"{rule.weight} + {k} {formats[1] or 'f32'}",
            "bits": sum(r["bits"] * (r["columns"][1] - r["columns"][0]) for r in recs) / kdim,
            "bytes": sum(r["bytes"] for r in recs),
            "weights": [name for r in recs for name in r["weights"]],
            "parts": recs,
        })
    if rule.act is not None:
        record["act"] = f"{rule.act} + {k} {a_out or 'f32'}"

    def act(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([fns[0](t[..., :cut]).to(t.dtype), fns[1](t[..., cut:]).to(t.dtype)], dim=-1)

    return emitted, record, wq, act if rule.act is not None else None


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
