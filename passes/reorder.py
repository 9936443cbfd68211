"""reorder: gather each selected linear's outlier input channels at the end (Atom / QUIK).

For every selected `linear` (path -> k outlier channels) the input channels are ranked by
their calibrated abs-max `amax` [K] and permuted so that the k largest lie contiguous at the
end, in increasing order of abs-max (the largest last); the other channels keep their
order. The quantize pass then keeps the last k input channels of such a layer at a higher
precision (mixed precision inside one tensor, see `passes/quantize.py`). With the
permutation `p` ([K], new position i reads original channel p[i]) the linear computes

    linear(x[..., p], W[:, p]) = linear(x, W)      (the weight's columns are permuted)

and `x[..., p]` is made where it costs nothing, by folding `p` into the activation's
producer (via):

- `"norm"` — `rms_norm(x, w)` / `layer_norm(x, w, b)`: the parameters become `w[p]` (`b[p]`)
  and the norm reads `gather(x, p)`: a norm over the last axis is permutation-equivariant,
  `norm(x[..., p], w[p]) = norm(x, w)[..., p]`. The gather is the order in which the fused
  norm + activation-quantize kernel loads its row: the fuse pass is to take it into that
  group (its `norm_quant` group does not yet; until then the gather runs as its own op);
- `"rows"` — a producing `linear(y, W2, b2)`: its rows become `W2[p]`, `b2[p]`;
- the producer's op (`"mul"`, `"gelu"`, ...) — elementwise ops (`mul`, `add`, `silu`, `gelu`,
  `relu`, `tanh`) of producing linears, such as SwiGLU's `mul(silu(gate(y)), up(y))` feeding
  `down_proj`: the rows of *every* such linear, gate's and up's (a permutation, unlike a
  scale, has to reach every factor);
- `"gather"` — anything else (the attention output feeding `o_proj`: its channels are heads ×
  head dim, which no row permutation of `v_proj` can shuffle freely; an activation that is
  also read by a residual `add` or a graph output; a graph input): a `gather(x, p)` is
  inserted on the linear's input, to become the load pattern of the fused kernel that
  quantizes the activation (the same fuse-pass step as above).

Linears that read one activation (q/k/v; gate/up) get ONE permutation, from the maximum of
their abs-maxima, and with different counts the largest decides (the last k of every count
are then that layer's k largest). When the producer absorbs the permutation, every linear
reading the activation gets its columns permuted (selected or not: a layer with no outlier
count is recorded with `outliers` 0). A layer whose weight is also read elsewhere (an
lm_head tied to the embedding) is skipped with the reason recorded.

`graph.meta["reordered"][path]` = `{"outliers": k, "channels": [original indices of the k
outlier channels, largest last], "via", "producer", "shared": [paths], "folded": [consts
permuted along axis 0, and "gather <norm>" for a norm's input], "why": reason a gather was
needed (via "gather" only)}` or `{"skipped": reason}`. The index of each gather is a const
`i64[K]` named `{first path of the group}.reorder_index`.

Preserves: the float function, exactly up to the order of floating-point sums (a
permutation moves values, it rounds nothing).

    Before: %0 = const() {name="norm.weight"} : f32[10]
            %1 = const() {name="q.weight"} : f32[4, 10]
            %2 = rms_norm(%x, %0) {eps=1e-05} : f32[b, s, 10] loc("norm")
            %3 = linear(%2, %1) : f32[b, s, 4] loc("q")
    After:  %0 = const() {name="norm.weight"} : f32[10]               weights: w[p]
            %1 = const() {name="q.weight"} : f32[4, 10]                weights: W[:, p]
            %2 = const() {name="q.reorder_index"} : i64[10]            weights: p
            %3 = gather(%x, %2) {axis=2} : f32[b, s, 10] loc("norm")
            %4 = rms_norm(%3, %0) {eps=1e-05} : f32[b, s, 10] loc("norm")
            %5 = linear(%4, %1) : f32[b, s, 4] loc("q")

`amax` comes from calibration (`graph.meta["calibration"]`, as smooth reads it) or is given.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..ir import I64, Graph, Node, TensorType, Value, dims_equal
from .quantize import layer_path
from .smooth import Fold, Uses, _attention_value, describe

#: Elementwise ops a channel permutation passes through unchanged.
ELEMENTWISE = ("silu", "relu", "tanh", "gelu")


def _linears(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.op == "linear" and n.inputs[1].node.op == "const"]


def check_outliers(graph: Graph, outliers: Mapping[str, object]) -> dict[str, int]:
    """`outliers` checked against the linears of `graph`: known paths, integer counts in [0, K)."""
    weights = {layer_path(n, n.inputs[1].node): n.inputs[1].node for n in _linears(graph)}
    unknown = sorted(set(outliers) - set(weights))
    if unknown:
        raise ValueError(f"reorder: outliers names {unknown}, which are no linear layers of graph @{graph.name}")
    out = {}
    for path, k in outliers.items():
        wnode = weights[path]
        kdim = wnode.types[0].shape[1]
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < kdim:
            raise ValueError(
                f"reorder: layer {path!r}: outliers must be an integer count in [0, {kdim}) (weight "
                f"{wnode.get('name')!r} has K={kdim} input channels; at least one stays low-bit), got {k!r}"
            )
        out[path] = k
    return out


def outlier_count(value: object, k_in: int, path: str) -> int:
    """The number of outlier channels a plan's `outliers` option asks of a layer with `k_in`
    input channels: an integer count, or a fraction of K in [0, 1) (rounded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        got = f"{type(value).__name__} {value!r}"
    else:
        k = value if isinstance(value, int) else round(value * k_in)
        if 0 <= k < k_in and (isinstance(value, int) or 0.0 <= value < 1.0):
            return k
        got = repr(value) if isinstance(value, int) else f"{value!r} ({k} of {k_in} channels)"
    raise ValueError(
        f"layer {path!r}: outliers must be a count of input channels in [0, {k_in}) (K={k_in}; at least one "
        f"channel stays low-bit) or a fraction of K in [0, 1), got {got}"
    )


def _check_amax(path: str, a: object, k: int) -> torch.Tensor:
    if not isinstance(a, torch.Tensor) or tuple(a.shape) != (k,):
        got = list(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
        raise ValueError(f"reorder: layer {path!r}: amax must be a tensor of shape [{k}] (one per input channel), got {got}")
    a = a.detach().to(torch.float64).cpu()
    if not torch.isfinite(a).all() or (a < 0).any():
        raise ValueError(f"reorder: layer {path!r}: amax must be finite and >= 0")
    return a


def permutation(amax: torch.Tensor, k: int) -> torch.Tensor:
    """The order [K] (int64) that puts the k largest of `amax` last, in increasing order, and
    keeps the others in their order (ties: the lower channel counts as larger)."""
    top = torch.argsort(amax, descending=True, stable=True)[:k].flip(0)
    rest = torch.ones(amax.numel(), dtype=torch.bool)
    rest[top] = False
    return torch.cat([torch.arange(amax.numel())[rest], top])


# ----------------------------------------------------------------------------- producers


def _absorb(x: Value, reader: Node | None, uses: Uses, depth: int = 0) -> tuple[list[str], list[Node]] | str:
    """How the producer of `x` can permute its last axis: (consts whose axis 0 is permuted,
    norms whose input is gathered), or why it cannot. `reader` must be the only reader of
    `x` (None: the caller checked the readers)."""
    p = x.node
    if reader is not None and not uses.only_reader(p, reader):
        return f"{describe(p)} is also read elsewhere"
    if p.op == "input":
        return f"the activation is the graph input %{p.get('name')}"
    if len(p.types) != 1:
        return f"the producer {describe(p)} has {len(p.types)} outputs"
    if p.op in ("rms_norm", "layer_norm", "linear"):
        for v in p.inputs[1:]:
            if not uses.private(v.node):
                what = "not a constant" if v.node.op != "const" else f"also read elsewhere ({v.node.get('name')})"
                return f"{describe(p)}'s parameter is {what}"
        return [v.node.get("name") for v in p.inputs[1:]], [] if p.op == "linear" else [p]
    if depth >= 4:
        return f"the producer {describe(p)} lies too deep behind elementwise ops"
    if p.op in ELEMENTWISE:
        return _absorb(p.inputs[0], p, uses, depth + 1)
    if p.op in ("mul", "add"):
        a, b = p.inputs
        if a == b or not all(dims_equal(v.type.shape[-1], x.type.shape[-1]) for v in (a, b)):
            return f"{describe(p)} does not combine two full-width operands"
        consts, norms = [], []
        for v in (a, b):
            got = _absorb(v, p, uses, depth + 1)
            if isinstance(got, str):
                return f"{describe(p)}: {got}"
            consts += got[0]
            norms += got[1]
        return consts, norms
    if p.op == "reshape" and isinstance(_attention_value(p, uses), Fold):
        return (f"the producer {describe(p)} is the attention output: its channels are (head, head dim) pairs, "
                "which no row permutation of v_proj moves across heads")
    return f"the producer {describe(p)} cannot permute its channels"


def _via(producer: Node) -> str:
    return {"rms_norm": "norm", "layer_norm": "norm", "linear": "rows"}.get(producer.op, producer.op)


def _readers_problem(x: Value, group: list[Node], uses: Uses) -> str | None:
    """Why the producer of `x` may not be permuted: a reader that is not a linear of `group`."""
    if x.node in uses.outputs:
        return f"the activation ({describe(x.node)}) is also a graph output"
    for reader, index in uses.readers[x.node]:
        if reader not in group or index != 0:
            return f"the activation ({describe(x.node)}) is also read by {describe(reader)}"
    return None


# ----------------------------------------------------------------------------- the pass


def reorder(
    graph: Graph,
    *,
    outliers: Mapping[str, int] | None = None,
    amax: Mapping[str, torch.Tensor] | None = None,
) -> Graph:
    """Reorder the input channels of the linears `outliers` names (path -> k) so that their k
    outlier channels come last (see the module docstring). `amax[path]`: the abs-max [K] of
    the layer's input; without it, from the calibration the calibrate pass attached. Returns
    `graph` itself when nothing is reordered (no counts, or all 0)."""
    counts = check_outliers(graph, dict(outliers or {}))
    selected = {p for p, k in counts.items() if k > 0}
    if not selected:
        return graph
    if amax is None:
        amax = _calibrated_amax(graph, selected)
    uses = Uses(graph)
    by_value: dict[Value, list[Node]] = {}  # activation -> every const-weight linear reading it
    for n in _linears(graph):
        by_value.setdefault(n.inputs[0], []).append(n)

    weights = dict(graph.weights)
    record: dict[str, dict] = {}
    norm_gathers: dict[Node, str] = {}  # norm -> index const name
    input_gathers: dict[Node, tuple[str, int]] = {}  # linear -> (index const name, group id)
    for gid, (x, readers) in enumerate(by_value.items()):
        paths = {n: layer_path(n, n.inputs[1].node) for n in readers}
        chosen = [n for n in readers if paths[n] in selected]
        if not chosen:
            continue
        tied = {n for n in readers if not uses.private(n.inputs[1].node)}
        for n in chosen:
            if n in tied:
                record[paths[n]] = {"skipped": f"weight {n.inputs[1].node.get('name')!r} is tied (also read elsewhere)"}
        chosen = [n for n in chosen if n not in tied]
        if not chosen:
            continue
        k_in = chosen[0].inputs[1].type.shape[1]
        a = torch.stack([_check_amax(paths[n], _amax_of(amax, paths[n]), k_in) for n in chosen]).amax(0)
        kmax = max(counts[paths[n]] for n in chosen)
        perm = permutation(a, kmax)
        via, consts, norms, members, why = _fold(x, readers, chosen, tied, uses)
        index = _index_name(f"{paths[chosen[0]]}.reorder_index", weights)
        if norms or via == "gather":  # the gathers' index; rows of producers need none
            weights[index] = perm.clone()
        for name in consts:
            weights[name] = weights[name][perm.to(weights[name].device)]
        for norm in norms:
            norm_gathers[norm] = index
        if via == "gather":
            input_gathers.update({n: (index, gid) for n in members})
        for n in members:
            name = n.inputs[1].node.get("name")
            weights[name] = weights[name][:, perm.to(weights[name].device)]
            k = counts.get(paths[n], 0)
            record[paths[n]] = {
                "outliers": k, "channels": perm[len(perm) - k:].tolist(), "via": via, "producer": describe(x.node),
                "shared": [paths[m] for m in members],
                "folded": [*consts, *(f"gather {describe(m)}" for m in norms)],
                **({"why": why} if why is not None else {}),
            }

    if all("skipped" in r for r in record.values()):
        graph.meta["reordered"] = {**graph.meta.get("reordered", {}), **record}
        return graph
    origins: dict[Node, Node] = {}
    made: dict[int, Value] = {}  # group id -> its gather on the linears' input

    def gather_of(x: Value, index: str, loc: str | None) -> list[Node]:
        const = Node.create("const", (), {"name": index}, [TensorType((x.type.shape[-1],), I64)])
        return [const, Node.create("gather", [x, const.out], {"axis": x.type.rank - 1}, [x.type], loc)]

    def apply(node: Node) -> list[Node] | None:
        old = origins.get(node, node)
        if old in norm_gathers:
            extra = gather_of(node.inputs[0], norm_gathers[old], node.loc)
            return [*extra, node.replace(inputs=[extra[-1].out, *node.inputs[1:]])]
        if old in input_gathers:
            index, gid = input_gathers[old]
            extra = []
            if gid not in made:
                extra = gather_of(node.inputs[0], index, node.loc)
                made[gid] = extra[-1].out
            return [*extra, node.replace(inputs=[made[gid], *node.inputs[1:]])]
        return None

    out = graph.rewrite(apply, origins) if norm_gathers or input_gathers else graph
    out = out.replace(weights=weights)
    out.meta["reordered"] = {**graph.meta.get("reordered", {}), **record}
    return out


def _fold(x: Value, readers: list[Node], chosen: list[Node], tied: set[Node], uses: Uses):
    """How the permutation of the activation `x` (read by the linears `readers`, of which
    `chosen` take outlier channels) is paid: (via, consts whose axis 0 is permuted, norms
    whose input is gathered, the linears whose columns are permuted, why a gather)."""
    why = _readers_problem(x, readers, uses) or (f"weight of {describe(next(iter(tied)))} is tied" if tied else None)
    fold = _absorb(x, None, uses) if why is None else why
    if isinstance(fold, str):  # a gather on the chosen linears' input
        return "gather", [], [], chosen, fold
    (consts, norms), via = fold, _via(x.node)
    return via, consts, norms, readers, None


def gather_indices(graph: Graph) -> dict[str, str]:
    """`{path: group}` for every linear whose outlier channels (any count) make the reorder
    pass keep a gather index, an int64 const [K]: the linears of one group read one
    activation and share one index, however many of them take outlier channels (q, k and v
    behind their norm). A linear whose permutation folds into the rows of the linears that
    produce its input (down_proj behind gate · up) needs none and is absent; so is a tied
    weight, which the pass skips."""
    uses = Uses(graph)
    by_value: dict[Value, list[Node]] = {}
    for n in _linears(graph):
        by_value.setdefault(n.inputs[0], []).append(n)
    out = {}
    for x, readers in by_value.items():
        tied = {n for n in readers if not uses.private(n.inputs[1].node)}
        chosen = [n for n in readers if n not in tied]
        if not chosen:
            continue
        via, _, norms, _, _ = _fold(x, readers, chosen, tied, uses)
        if norms or via == "gather":
            paths = [layer_path(n, n.inputs[1].node) for n in chosen]
            out.update({p: paths[0] for p in paths})
    return out


def _amax_of(amax: Mapping[str, torch.Tensor], path: str) -> torch.Tensor:
    if path not in amax:
        raise ValueError(f"reorder: layer {path!r} asks for outlier channels but has no amax (calibration statistics)")
    return amax[path]


def _index_name(base: str, weights: Mapping[str, torch.Tensor]) -> str:
    name, i = base, 1
    while name in weights:
        name, i = f"{base}.{i}", i + 1
    return name


def _calibrated_amax(graph: Graph, selected: set[str]) -> dict[str, torch.Tensor]:
    cal = graph.meta.get("calibration")
    if cal is None:
        first = sorted(selected)[:3]
        raise ValueError(
            f"reorder: layers {first}{'...' if len(selected) > 3 else ''} ask for outlier channels, which are "
            "ranked by activation statistics: run the calibrate pass with calibration batches first, or pass amax="
        )
    cal = cal.fresh(graph, percentiles=())  # abs-max only
    try:
        return {p: cal.stats(p, hessian=False)["amax"] for p in cal.paths if p in selected}
    finally:
        cal.close()
