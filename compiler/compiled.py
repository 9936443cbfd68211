"""`CompiledModel`: the callable `mxc.compile` returns, and its report.

    compiled = mxc.compile(model, example_inputs=ids)
    compiled(ids).logits          # called like the original module, same output structure
    print(compiled.ir)            # the final IR text
    print(compiled.report())      # ops, fallbacks, weights, pass timings
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .frontends.onnx import onnx_fallbacks
from .ir import Graph, parse_layout
from .signature import CallSpec


@dataclass
class Report:
    """What compilation produced: op counts, the aten ops left as fallbacks, weight bytes
    and the time each pass took. `str(report)` is a table; the fields are data."""

    graph_name: str
    backend: str
    op_counts: dict[str, int]
    fallbacks: dict[str, int]
    weight_bytes: int
    timings: dict[str, float] = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)
    float_bytes: int = 0
    plan: str | None = None
    smoothed: dict[str, dict] = field(default_factory=dict)
    #: Every pass of the pipeline in order: True if it ran, False if the plan switched it off.
    pipeline: dict[str, bool] = field(default_factory=dict)
    #: What each pass did to each layer: {path: {pass: what}} (see `pass_effects`).
    effects: dict[str, dict[str, str]] = field(default_factory=dict)
    #: What the tune pass did (`graph.meta["tuned"]`: steps, tokens, held-out KL before and after).
    tuned: dict = field(default_factory=dict)

    @property
    def avg_bits(self) -> float | None:
        """Average bits per weight over the quantized layers (scales included)."""
        n = sum(_numel(r["shape"]) for r in self.layers.values() if "shape" in r)
        return sum(r["bits"] * _numel(r["shape"]) for r in self.layers.values() if "shape" in r) / n if n else None

    def __str__(self) -> str:
        lines = [f"mxc report: graph @{self.graph_name}, backend {self.backend}, plan {self.plan or 'none (float)'}"]
        lines.append(f"  weights: {self.weight_bytes / 2**20:.2f} MiB (float: {self.float_bytes / 2**20:.2f} MiB)")
        if self.layers:
            if self.avg_bits is not None:
                lines.append(f"  average bits per weight over quantized layers: {self.avg_bits:.3f}")
            lines.append(
                f"  {'layer':<40} {'weight format':<34} {'bits':>6} {'KiB':>9} {'w err':>7} {'out err':>8}  "
                f"{'activation':<18} smoothing"
            )
            for path, r in self.layers.items():
                if "kv" in r:
                    lines.append(f"  {path:<40} kv cache {r['kv']}")
                    continue
                smooth = self.smoothed.get(path, {})
                sm = f"alpha {smooth['alpha']}" if "alpha" in smooth else ("skipped" if smooth else "-")
                act = r.get("act", "float")
                if "format" not in r:
                    lines.append(f"  {path:<40} {'float':<34} {'':>6} {'':>9} {'':>7} {'':>8}  {act:<18} {sm}")
                    continue
                out = f"{r['output_error']:.4f}" if "output_error" in r else "-"
                lines.append(
                    f"  {path:<40} {r['format']:<34} {r['bits']:>6.3f} {r['bytes'] / 1024:>9.1f} "
                    f"{r['weight_error']:>7.4f} {out:>8}  {act:<18} {sm}"
                )
            skipped = {p: r["skipped"] for p, r in self.smoothed.items() if "skipped" in r}
            for path, why in skipped.items():
                lines.append(f"  smoothing skipped {path}: {why}")
        lines.append("  ops:")
        for op, n in sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if not op.startswith("torch:"):
                lines.append(f"    {op:<28} {n:>6}")
        total = sum(self.fallbacks.values())
        lines.append(f"  torch fallbacks (not lowered to the op set): {total}")
        for op, n in sorted(self.fallbacks.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {op:<28} {n:>6}")
        if self.timings or self.pipeline:
            ran = [f"{k} {self.timings[k] * 1e3:.1f} ms" if k in self.timings else f"{k} off (plan)"
                   for k in (self.pipeline or self.timings)]
            lines.append("  passes: " + ", ".join(ran))
        if self.tuned:
            lines.append("  " + tuned_line(self.tuned))
        if self.effects:
            columns = [p for p in EFFECT_PASSES if any(p in e for e in self.effects.values())]
            lines.append("  what each pass did, per layer:")
            lines.append(f"  {'layer':<40} " + " ".join(f"{p:<{EFFECT_WIDTH[p]}}" for p in columns).rstrip())
            for path, e in self.effects.items():
                lines.append(f"  {path:<40} " + " ".join(f"{e.get(p, '-'):<{EFFECT_WIDTH[p]}}" for p in columns).rstrip())
        return "\n".join(lines)


def tuned_line(r: dict) -> str:
    """One line on what the tune pass did."""
    text = f"scales tuned: {r['scales']} tensors, {r['steps']} steps on {r['windows']} windows ({r['tokens']} tokens)"
    if r.get("kl_before") is not None:
        text += f"; held-out KL {r['kl_before']:.4g} -> {r['kl_after']:.4g} nats/token"
    if r.get("kept") == "original":
        text += ": worse, so the untuned scales were kept"
    return text


#: The passes whose per-layer effects the report's second table shows (quantize's are the
#: first table: formats, bits, errors), in pipeline order, and their column widths.
EFFECT_PASSES = ("smooth", "reorder", "fold", "layout", "fuse")
EFFECT_WIDTH = {"smooth": 10, "reorder": 20, "fold": 8, "layout": 16, "fuse": 14}


def pass_effects(graph: Graph, layers: dict[str, dict]) -> dict[str, dict[str, str]]:
    """{layer path: {pass: what it did}} from the records the passes leave in `graph.meta`
    ("smoothed", "reordered", "folded", "layout"; `layers` is "quantized") and from the fused groups of
    the graph (the kind of group each layer's GEMM joined)."""
    meta = graph.meta
    out: dict[str, dict[str, str]] = {}

    def put(path: str, name: str, what: str) -> None:
        out.setdefault(path, {})[name] = what

    for path, r in meta.get("smoothed", {}).items():
        put(path, "smooth", f"alpha {r['alpha']}" if "alpha" in r else "skipped")
    for path, r in meta.get("reordered", {}).items():
        put(path, "reorder", "skipped" if "skipped" in r else f"{r['outliers']} outliers ({r.get('via', '?')})")
    for path, why in meta.get("folded", {}).items():
        put(path, "fold", "qlinear" if why == "qlinear" else "kept")
    packed = meta.get("layout", {})
    for path, r in layers.items():
        lays = [parse_layout(packed[c]["layout"]) for part in r.get("parts") or [r] for c in (part.get("weights") or [])[:1]
                if c in packed]
        if lays:  # "packed 4b + 8b" (i32 words along K; an interleave or tile order is spelled out)
            put(path, "layout", "packed " + " + ".join(
                f"{x.bits}b" if not (x.order or x.tile) else str(x) for x in lays))
    for node in graph.nodes:
        if node.op == "fused":
            for inner in node.get("body").nodes:
                if inner.op in ("linear", "qlinear") and inner.loc:
                    put(inner.loc, "fuse", node.get("kind"))
    return out


def _with_packed_bytes(layers: dict[str, dict], packed: dict[str, dict]) -> dict[str, dict]:
    """`layers` with each packed weight's codes counted at their packed size: the quantize
    pass counts ceil(bits·N·K/8) bytes of codes, the layout pass stores N·ceil(bits·K/32)
    int32 words (`graph.meta["layout"]`), which is more when a row's bits do not fill its
    last word. Scales and zero points keep their nominal bytes. A layer in two parts (outlier
    channels at another precision: `r["parts"]`) has each part's codes counted so."""
    def extra(part: dict) -> int:
        codes = (part.get("weights") or [None])[0]
        if codes not in packed or "bytes" not in part or "shape" not in part:
            return 0
        return packed[codes]["bytes"] - -(-parse_layout(packed[codes]["layout"]).bits * _numel(part["shape"]) // 8)

    out = {}
    for path, r in layers.items():
        if r.get("parts"):
            parts = [{**p, "bytes": p["bytes"] + extra(p)} if extra(p) else p for p in r["parts"]]
            delta = sum(extra(p) for p in r["parts"])
            r = {**r, "parts": parts, "bytes": r["bytes"] + delta} if delta else r
        elif extra(r):
            r = {**r, "bytes": r["bytes"] + extra(r)}
        out[path] = r
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class CompiledModel:
    """A compiled graph bound to a backend, callable like the module it came from."""

    def __init__(
        self,
        graph: Graph,
        call_spec: CallSpec,
        executor: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]],
        backend: str,
        timings: dict[str, float] | None = None,
        plan: Any = None,
        pipeline: dict[str, bool] | None = None,
    ):
        self.graph = graph
        self.call_spec = call_spec
        self.backend = backend
        self.timings = dict(timings or {})
        self.plan = plan
        #: The pipeline's passes in order: True if it ran, False if the plan switched it off.
        self.pipeline = dict(pipeline) if pipeline is not None else {k: True for k in self.timings}
        self._executor = executor

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = self.call_spec.bind(args, kwargs)
        return self.call_spec.unflatten(self._executor(inputs))

    @property
    def executor(self) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
        """The backend's executor (`mxc.save` asks it for `kernel_sources()` and its device)."""
        return self._executor

    @property
    def ir(self) -> str:
        """The final IR as text (parse it back with `mxc.ir.parse`)."""
        return str(self.graph)

    def report(self) -> Report:
        counts = self.graph.op_counts()
        fallbacks = {k.removeprefix("torch:"): v for k, v in counts.items() if k.startswith("torch:")}
        fallbacks.update(onnx_fallbacks(self.graph))  # ONNX ops run by onnx.reference: "onnx:ai.onnx.GatherND"
        layers = _with_packed_bytes(dict(self.graph.meta.get("quantized", {})), self.graph.meta.get("layout", {}))
        packed_names = {n for r in layers.values() for n in r.get("weights", ())}  # counted in r["bytes"]
        weights = self.graph.used_weights()
        plain = sum(t.numel() * t.element_size() for k, t in weights.items() if k not in packed_names)
        packed = sum(r["bytes"] for r in layers.values() if "bytes" in r)
        before = sum(r["float_bytes"] for r in layers.values() if "float_bytes" in r)
        name = getattr(self.plan, "name", None) or (None if self.plan is None else "custom")
        smoothed = dict(self.graph.meta.get("smoothed", {}))
        return Report(
            self.graph.name, self.backend, counts, fallbacks, plain + packed, self.timings, layers, plain + before, name,
            smoothed, dict(self.pipeline), pass_effects(self.graph, layers),
            dict(self.graph.meta.get("tuned", {})),
        )

    def __repr__(self) -> str:
        return f"CompiledModel(@{self.graph.name}, {len(self.graph.nodes)} nodes, backend={self.backend!r})"
