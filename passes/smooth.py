"""smooth: migrate activation outliers into the weights (SmoothQuant).

For every selected `linear` with a constant weight `W` [N, K], given the calibrated abs-max
`amax` [K] of its input `X`, one scale per input channel

    s_j = max(amax_j, 1e-5)^α / max(max_n |W[n, j]|, 1e-5)^(1-α)     (s_j = 1 for a dead channel)

multiplies the weight's columns (`W' = W·diag(s)`) and divides the activation (`X' = X·diag(1/s)`),
so `X'·W'ᵀ = X·Wᵀ` while `X'` is flatter across channels. The division is folded into the
constants of the activation's producer:

- `rms_norm(x, w)`: `w / s`; `layer_norm(x, w, b)`: `w / s` and `b / s`; a norm without a
  weight gets one, a new const `1/s` named `{norm path}.weight`;
- `linear(y, W2, b2)`: the rows of `W2` and `b2` are divided by `s`;
- `mul(a, linear(y, W2, b2))` (SwiGLU's `silu(gate) * up` feeding `down_proj`): up's rows;
- `reshape(transpose(attention(q, k, transpose(reshape(linear(y, Wv, bv))))))` (`o_proj`):
  the rows of `Wv`; with grouped-query attention the query heads of one key/value group read
  the same rows of `Wv`, so the group's heads share one scale, computed from their joint maxima.

Linears that read one activation (q, k, v after one norm; gate and up) get one `s`, from the
shared `amax` and the maximum of their weights' column maxima, and must take one alpha. The
graph keeps its structure and const names; only the weights' values change (dtypes kept).

A layer is skipped, with the reason recorded, when its input has a reader that is not a
smoothed linear (a residual `add`, a graph output), its producer cannot absorb a per-channel
scale (a `gelu`, an embedding, a graph input), or a constant to be scaled is also read
elsewhere (a weight tied to the embedding, a shared norm weight). What happened to every
selected layer is recorded in `graph.meta["smoothed"][path]`: `{"alpha", "producer", "via",
"shared", "smax", "smin"}` or `{"skipped": reason}` (written into the input graph's meta when
nothing is smoothed, since the pass then returns the graph itself).

Preserves: the float function, exactly in real arithmetic (every channel is multiplied by
`s_j` on one side of a linear map and divided by it on the other); in floating point up to
rounding (scales are applied in float64, then stored in the weight's dtype).

    Before: %0 = const() {name="norm.weight"} : f32[10]             weights["norm.weight"] = w
            %2 = rms_norm(%x, %0) {eps=1e-05} : f32[b, s, 10] loc("norm")
            %3 = linear(%2, %1) : f32[b, s, 4] loc("q")              weights["q.weight"] = W
    After:  the same text; weights["norm.weight"] = w / s, weights["q.weight"] = W · diag(s)

    Before: %1 = rms_norm(%x) {eps=1e-06} : f32[b, s, 10] loc("final_norm")
    After:  %1 = const() {name="final_norm.weight"} : f32[10]       weights[...] = 1 / s
            %2 = rms_norm(%x, %1) {eps=1e-06} : f32[b, s, 10] loc("final_norm")

`amax` comes from calibration: `{path: stats["amax"] for path, stats in calibrate(...).items()}`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..ir import Graph, Node, TensorType, Value, dims_equal
from .quantize import layer_path

#: Maxima are clamped to at least this before the power law (and a zero maximum gives s = 1).
EPS = 1e-5
DEFAULT_ALPHA = 0.5


@dataclass(frozen=True)
class Fold:
    """Where `1/s` goes: the producer (`"<op> <name>"`), the op it is reached through (`mul`,
    `attention`), the constants whose axis 0 is divided, a weightless norm that gets a weight,
    and for attention the grouping `(kv heads, query heads per kv head, head dim)`."""

    producer: str
    via: str | None
    consts: tuple[str, ...]
    norm: Node | None = None
    kv: tuple[int, int, int] | None = None


class Uses:
    """Who reads each node (reader, operand index), which nodes are graph outputs, and how
    often each weight name is read (two const nodes may name one tensor)."""

    def __init__(self, graph: Graph):
        self.readers: dict[Node, list[tuple[Node, int]]] = {n: [] for n in (*graph.inputs, *graph.nodes)}
        for n in graph.nodes:
            for i, v in enumerate(n.inputs):
                self.readers[v.node].append((n, i))
        self.outputs = {v.node for v in graph.outputs}
        self.name_reads: Counter[str] = Counter()
        for n in graph.nodes:
            if n.op == "const":
                self.name_reads[n.get("name")] += len(self.readers[n])

    def only_reader(self, node: Node, reader: Node) -> bool:
        """`node` has one output, read once, by `reader`, and is no graph output."""
        return len(node.types) == 1 and node not in self.outputs and [r for r, _ in self.readers[node]] == [reader]

    def private(self, const: Node) -> bool:
        """`const` is a weight read by exactly one operand in the graph."""
        return const.op == "const" and self.name_reads[const.get("name")] == 1


def describe(node: Node) -> str:
    """`"<op> <name>"`: the node's module path, else its weight's name, else its op alone."""
    if node.op == "linear" and node.inputs[1].node.op == "const":
        return f"linear {layer_path(node, node.inputs[1].node)}"
    if node.op == "input":
        return f"input %{node.get('name')}"
    op = node.op if node.op != "torch" else f"torch:{node.get('target')}"
    if node.loc:
        return f"{op} {node.loc}"
    params = [v.node.get("name") for v in node.inputs[1:] if v.node.op == "const"]
    return f"{op} {params[0]}" if params else op


def _alpha_rule(alpha: float | Mapping[str, float]) -> Callable[[str], float]:
    def check(a: object, where: str) -> float:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"smooth: alpha{where} must be a number in [0, 1], got {a!r}")
        return float(a)

    if isinstance(alpha, Mapping):
        table = {path: check(a, f" for layer {path!r}") for path, a in alpha.items()}
        return lambda path: table.get(path, DEFAULT_ALPHA)
    value = check(alpha, "")
    return lambda path: value


def _check_amax(path: str, amax: object, weight: str, shape: tuple[int, ...]) -> torch.Tensor:
    n, k = shape
    if not isinstance(amax, torch.Tensor) or tuple(amax.shape) != (k,):
        got = list(amax.shape) if isinstance(amax, torch.Tensor) else type(amax).__name__
        raise ValueError(
            f"smooth: layer {path!r}: amax must be a tensor of shape [{k}] (one abs-max per input channel "
            f"of weight {weight!r} [N={n}, K={k}]), got {got}"
        )
    amax = amax.detach().to(torch.float64)
    if not torch.isfinite(amax).all() or (amax < 0).any():
        raise ValueError(f"smooth: layer {path!r}: amax must be finite and >= 0, got min {amax.min()} max {amax.max()}")
    return amax


def scales(amax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """`max(amax, EPS)^α / max(wmax, EPS)^(1-α)` per channel; 1 where either maximum is 0."""
    s = amax.clamp(min=EPS) ** alpha / wmax.clamp(min=EPS) ** (1.0 - alpha)
    return torch.where((amax > 0) & (wmax > 0), s, torch.ones_like(s))


# ----------------------------------------------------------------------------- producers


def _linear_rows(lin: Node, uses: Uses, via: str | None) -> Fold | str:
    """A linear producer: its weight rows (and bias) take 1/s."""
    params = lin.inputs[1:]
    for v in params:
        if not uses.private(v.node):
            what = "a constant" if v.node.op != "const" else f"read elsewhere ({v.node.get('name')})"
            return f"{describe(lin)}'s parameter is not private: {what}"
    return Fold(describe(lin), via, tuple(v.node.get("name") for v in params))


def _swaps_1_2(node: Node) -> bool:
    """A transpose (or permute) of axes 1 and 2 of a rank-4 tensor."""
    if node.op == "transpose" and node.types[0].rank == 4:
        return {node.get("dim0") % 4, node.get("dim1") % 4} == {1, 2}
    if node.op == "permute" and node.types[0].rank == 4:
        return tuple(d % 4 for d in node.get("dims")) == (0, 2, 1, 3)
    return False


def _attention_value(out: Node, uses: Uses) -> Fold | str:
    """o_proj's input `reshape(transpose(attention(q, k, v)))` with
    `v = transpose(reshape(linear(...)))`: the value projection's rows take 1/s."""
    why = f"{describe(out)} is not reshape(transpose(attention(..., v=transpose(reshape(linear)))))"
    t1 = out.inputs[0].node
    if out.op != "reshape" or not _swaps_1_2(t1) or not uses.only_reader(t1, out):
        return why
    att = t1.inputs[0].node
    if att.op != "attention" or not uses.only_reader(att, t1):
        return why
    v = att.inputs[2]
    t2 = v.node
    if v in att.inputs[:2] or v in att.inputs[3:] or not _swaps_1_2(t2) or not uses.only_reader(t2, att):
        return why
    r2 = t2.inputs[0].node
    if r2.op != "reshape" or not uses.only_reader(r2, t2):
        return why
    lin = r2.inputs[0].node
    if lin.op != "linear" or not uses.only_reader(lin, r2):
        return why
    heads, kv_heads, dim = att.types[0].shape[1], t2.types[0].shape[1], t2.types[0].shape[3]
    if not all(isinstance(d, int) for d in (heads, kv_heads, dim)) or heads % kv_heads:
        return f"{describe(att)} has symbolic or ungrouped head counts {heads}, {kv_heads}"
    merged, split, vin = out.types[0].shape, r2.types[0].shape, lin.types[0].shape
    if not (  # out merges [b, s, H, d] -> [b, s, H*d]; r2 splits [b, t, Hkv*d] -> [b, t, Hkv, d]
        len(merged) == 3 and dims_equal(merged[-1], heads * dim)
        and all(dims_equal(a, b) for a, b in zip(merged[:2], t1.types[0].shape[:2]))
        and len(split) == 4 and len(vin) == 3 and dims_equal(vin[-1], kv_heads * dim)
        and tuple(split[2:]) == (kv_heads, dim) and all(dims_equal(a, b) for a, b in zip(split[:2], vin[:2]))
    ):
        return why
    fold = _linear_rows(lin, uses, via="attention")
    if isinstance(fold, str):
        return fold
    return Fold(fold.producer, fold.via, fold.consts, kv=(kv_heads, heads // kv_heads, dim))


def producer_fold(x: Value, uses: Uses) -> Fold | str:
    """Where the activation `x` can absorb a per-channel 1/s, or why it cannot."""
    p = x.node
    if p.op == "input":
        return f"the activation is the graph input %{p.get('name')}"
    if len(p.types) != 1:
        return f"the producer {describe(p)} has {len(p.types)} outputs"
    if p.op in ("rms_norm", "layer_norm"):
        for v in p.inputs[1:]:
            if not uses.private(v.node):
                what = "not a constant" if v.node.op != "const" else f"also read elsewhere ({v.node.get('name')})"
                return f"{describe(p)}'s parameter is {what}"
        params = tuple(v.node.get("name") for v in p.inputs[1:])
        return Fold(describe(p), None, params, norm=None if params else p)
    if p.op == "linear":
        return _linear_rows(p, uses, via=None)
    if p.op == "mul":
        for v in p.inputs:
            lin = v.node
            full = lin.op == "linear" and dims_equal(lin.types[0].shape[-1], x.type.shape[-1])  # not broadcast
            if full and uses.only_reader(lin, p):
                fold = _linear_rows(lin, uses, via="mul")
                if isinstance(fold, Fold):
                    return fold
        return f"no factor of {describe(p)} is a linear read only by it"
    if p.op == "reshape":
        return _attention_value(p, uses)
    return f"the producer {describe(p)} cannot absorb a per-channel scale"


# ----------------------------------------------------------------------------- the pass


def _scaled(t: torch.Tensor, factor: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """`t` times `factor` along `axis`, computed in float64, stored in `t`'s dtype."""
    shape = [1] * t.dim()
    shape[axis] = -1
    return (t.to(torch.float64) * factor.to(t.device).reshape(shape)).to(t.dtype)


def fold_scales(fold: Fold, amax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The consumers' column scales [K] and the producer's (what its constants are divided by)."""
    if fold.kv is None:
        s = scales(amax, wmax, alpha)
        return s, s
    kv, per, dim = fold.kv  # the query heads of a key/value group read the same value rows
    t = scales(amax.reshape(kv, per, dim).amax(1), wmax.reshape(kv, per, dim).amax(1), alpha)
    return t[:, None, :].expand(kv, per, dim).reshape(-1), t.reshape(-1)


def _weight_name(base: str, weights: Mapping[str, torch.Tensor]) -> str:
    name, k = base, 1
    while name in weights:
        name, k = f"{base}.{k}", k + 1
    return name


def smooth(
    graph: Graph,
    *,
    amax: Mapping[str, torch.Tensor] | None = None,
    alpha: float | Mapping[str, float] = DEFAULT_ALPHA,
    layers: Callable[[str], bool] | None = None,
) -> Graph:
    """Smooth the selected linears of `graph` (see the module docstring): `amax[path]` is the
    abs-max [K] of the input of the linear at `path`, `alpha` the migration strength (one, or
    per path with 0.5 for paths missing), `layers(path)` selects (default: every linear with
    a constant weight). Without `amax` the abs-maxima come from the calibration the calibrate
    pass attached (`graph.meta["calibration"]`), gathered only when some layer is selected.
    Returns `graph` itself when nothing is smoothed."""
    if amax is None:
        amax = _calibrated_amax(graph, layers)
        if not amax:
            return graph
    alpha_of = _alpha_rule(alpha)
    uses = Uses(graph)
    if isinstance(alpha, Mapping):
        known = {layer_path(n, n.inputs[1].node) for n in graph.nodes if n.op == "linear"}
        unknown = sorted(set(alpha) - known)
        if unknown:
            raise ValueError(f"smooth: alpha names {unknown}, which are no linear layers of graph @{graph.name}")
    record: dict[str, dict] = {}
    stats: dict[Node, tuple[str, torch.Tensor | None]] = {}  # selected linear -> (path, amax)
    groups: dict[Value, list[Node]] = {}  # activation -> the selected linears reading it
    for n in graph.nodes:
        if n.op != "linear" or n.inputs[1].node.op != "const":
            continue
        wnode = n.inputs[1].node
        path = layer_path(n, wnode)
        if layers is not None and not layers(path):
            continue
        a = amax.get(path)
        if a is not None:
            a = _check_amax(path, a, wnode.get("name"), tuple(graph.weights[wnode.get("name")].shape))
        stats[n] = (path, a)
        groups.setdefault(n.inputs[0], []).append(n)

    weights = dict(graph.weights)
    new_norms: dict[Node, str] = {}
    for x, group in groups.items():
        paths = [stats[n][0] for n in group]
        problems = _group_problems(x, group, stats, uses)
        fold = producer_fold(x, uses) if not problems else None
        if isinstance(fold, str):
            problems = {p: fold for p in paths}
        if problems:
            record.update({p: {"skipped": why} for p, why in problems.items()})
            continue
        alphas = {alpha_of(p) for p in paths}
        if len(alphas) > 1:
            raise ValueError(
                f"smooth: layers {paths} read one activation and share one scale, so they need one alpha, "
                f"got {sorted(alphas)}"
            )
        (a,) = alphas
        ws = [weights[n.inputs[1].node.get("name")] for n in group]
        wmax = torch.stack([w.detach().abs().to(torch.float64).amax(0) for w in ws]).amax(0)
        act = torch.stack([stats[n][1].to(wmax.device) for n in group]).amax(0)
        s, inv = fold_scales(fold, act, wmax, a)
        for n in group:
            name = n.inputs[1].node.get("name")
            weights[name] = _scaled(weights[name], s, axis=1)
        for name in fold.consts:
            weights[name] = _scaled(weights[name], 1.0 / inv)
        if fold.norm is not None:
            name = _weight_name(f"{fold.norm.loc or paths[0] + '.smooth'}.weight", weights)
            weights[name] = (1.0 / inv).to(fold.norm.types[0].dtype.torch)
            new_norms[fold.norm] = name
        for p in paths:
            record[p] = {
                "alpha": a, "producer": fold.producer, "via": fold.via, "shared": list(paths),
                "smax": float(s.max()), "smin": float(s.min()),
            }

    if all("skipped" in r for r in record.values()):
        if record:
            graph.meta["smoothed"] = {**graph.meta.get("smoothed", {}), **record}
        return graph
    out = graph
    if new_norms:
        origins: dict[Node, Node] = {}

        def give_weight(node: Node) -> list[Node] | None:
            name = new_norms.get(origins.get(node, node))
            if name is None:
                return None
            t = node.types[0]
            const = Node.create("const", (), {"name": name}, [TensorType((t.shape[-1],), t.dtype)])
            return [const, node.replace(inputs=[*node.inputs, const.out])]

        out = graph.rewrite(give_weight, origins)
    out = out.replace(weights=weights)
    out.meta["smoothed"] = {**graph.meta.get("smoothed", {}), **record}
    return out


def _calibrated_amax(graph: Graph, layers: Callable[[str], bool] | None) -> dict[str, torch.Tensor]:
    paths = [layer_path(n, n.inputs[1].node) for n in graph.nodes if n.op == "linear" and n.inputs[1].node.op == "const"]
    selected = [p for p in paths if layers is None or layers(p)]
    if not selected:
        return {}
    cal = graph.meta.get("calibration")
    if cal is None:
        raise ValueError(
            f"smooth: layers {selected[:3]}{'...' if len(selected) > 3 else ''} need activation statistics: "
            "run the calibrate pass with calibration batches first, or pass amax="
        )
    cal = cal.fresh(graph, percentiles=())  # abs-max only: no Hessians, no percentiles
    out = {p: cal.stats(p, hessian=False)["amax"] for p in cal.paths if p in selected}
    cal.close()
    return out


def _group_problems(x: Value, group: list[Node], stats: dict, uses: Uses) -> dict[str, str]:
    """Why each of the linears `group` reading `x` cannot be smoothed (all or none can: they
    share one scale); empty if they can."""
    if x.node in uses.outputs:
        why = f"the activation ({describe(x.node)}) is also a graph output"
        return {stats[n][0]: why for n in group}
    for reader, index in uses.readers[x.node]:
        if reader not in group or index != 0:
            why = f"the activation ({describe(x.node)}) is also read by {describe(reader)}"
            return {stats[n][0]: why for n in group}
    own: dict[str, str] = {}
    for n in group:
        path, a = stats[n]
        wnode = n.inputs[1].node
        if a is None:
            own[path] = "no calibration amax"
        elif not uses.private(wnode):
            own[path] = f"weight {wnode.get('name')!r} is tied (also read elsewhere)"
    if not own:
        return {}
    other, why = next(iter(own.items()))
    shared = f"shares its input with {other}, which cannot be smoothed: {why}"
    return {stats[n][0]: own.get(stats[n][0], shared) for n in group}
