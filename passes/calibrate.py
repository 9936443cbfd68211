"""calibrate: statistics of every linear's input activation on real calibration batches,
gathered layer by layer.

    graph = calibrate(graph, batches=batches)      # attaches graph.meta["calibration"]
    cal = graph.meta["calibration"]                # a Calibration
    cal.stats("model.layers.0.self_attn.q_proj")   # {"amax": [K], "percentiles": {99.0: [K], ...},
                                                   #  "tensor_percentiles": {...}, "rows": n, "hessian": [K, K]}
    cal.update(path, weight=wq, act=fmt)           # the layer computes with these from now on

The batches are run through the graph in lockstep, node by node, and only as far as the
layer asked for: nothing is computed before a pass needs it, and memory holds the live
activations of the batches and the Hessian of the layer being quantized, never all of
them (SmolLM2-135M: 120 Hessians of 576² or 1536² in float64 would be ~0.8 GB). The
quantize pass asks for the layers in graph order and reports each quantized weight back
with `update`, so the next layer's statistics see the already quantized layers before it
(sequential GPTQ: each layer corrects the error of those before it).

Statistics (float32 unless said):
- `amax`: per input channel abs-max; `percentiles`: per channel abs-value percentiles
  (nearest rank) at `PERCENTILES`; `tensor_percentiles`: the same over the whole tensor
  (from a histogram: within amax/4096 above the exact value);
- `hessian`: `XᵀX / rows` (float64 [K, K]) for GPTQ and the clipping search, computed only
  when asked for, and freed once the cursor has passed every linear that reads it;
- layers reading one activation (q/k/v, gate/up) share one entry.

The batches run on an `executor` the caller provides (`executor(graph)` returns an object
whose `start(inputs)` gives a run with `advance(stop, observer)` and `operands(node)`, as
`mxc.runtime.ReferenceExecutor` does): passes import only the IR, and `mxc.calibrate`
binds the reference executor.

Preserves: the graph (only `meta["calibration"]` is added).
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..ir import Graph, Node, Value
from ..ir.formats import NumberFormat
from .quantize import layer_path

#: Per-channel abs-value percentiles calibration records.
PERCENTILES = (99.0, 99.9, 99.99)
#: Keys of an entry that are freed once every reader of the activation has run.
_HEAVY = ("hessian", "gptq_factors")


class Calibration:
    """Statistics of `graph`'s linear inputs over `batches` (each the list of the graph's
    input tensors), computed lazily and in graph order; see the module docstring."""

    def __init__(
        self,
        graph: Graph,
        batches: Iterable[Sequence[torch.Tensor]],
        *,
        executor: Callable[[Graph], Any],
        percentiles: Sequence[float] = PERCENTILES,
    ):
        self.graph = graph
        self.executor = executor
        self.batches = [list(b) for b in batches]
        if not self.batches:
            raise ValueError("calibration needs at least one batch of real inputs, got none")
        bad = [p for p in percentiles if not 0.0 < p < 100.0]
        if bad:
            raise ValueError(f"calibration percentiles must lie in (0, 100), got {bad}")
        self.percentiles = tuple(percentiles)
        self._index: dict[str, int] = {}
        self._positions = {n: i for i, n in enumerate(graph.nodes)}
        self._last_reader: dict[Value, int] = {}
        for i, node in enumerate(graph.nodes):
            if node.op == "linear" and node.inputs[1].node.op == "const":
                self._index.setdefault(layer_path(node, node.inputs[1].node), i)
                self._last_reader[node.inputs[0]] = i
        self._entries: dict[Value, dict[str, Any]] = {}
        self._patches: dict[int, tuple[torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor] | None]] = {}
        self._runs: list | None = None
        self._position = 0
        self._progress: Any = None
        self._closed = False

    # ------------------------------------------------------------------ public
    @property
    def paths(self) -> list[str]:
        """The layer paths calibration knows, in graph order."""
        return sorted(self._index, key=self._index.__getitem__)

    def __contains__(self, path: object) -> bool:
        return path in self._index

    def for_graph(self, graph: Graph) -> "Calibration":
        """This calibration if it was made for `graph`, else a fresh one on `graph` with the
        same batches (a pass that changed the graph invalidates the activations)."""
        if graph is self.graph and not self._closed:
            return self
        return self.fresh(graph)

    def fresh(self, graph: Graph, percentiles: Sequence[float] | None = None) -> "Calibration":
        """A new calibration of `graph` on the same batches and executor."""
        p = self.percentiles if percentiles is None else percentiles
        return Calibration(graph, self.batches, executor=self.executor, percentiles=p)

    def stats(self, path: str, *, hessian: bool = True) -> dict[str, Any]:
        """The statistics of layer `path`'s input (with its Hessian when `hessian`), running
        the batches up to that layer. Layers must be asked for in graph order."""
        i = self._node_index(path)
        node = self.graph.nodes[i]
        entry = self._entries.get(node.inputs[0])
        if self._position > i and (entry is None or (hessian and "hessian" not in entry)):
            raise ValueError(
                f"calibration: layer {path!r} has already run; ask for layers in graph order "
                f"(the calibration is at node {self._position}, the layer is node {i})"
            )
        self._advance(i)
        if entry is None:
            entry = self._entries[node.inputs[0]] = self._activation_stats(node)
        if hessian and "hessian" not in entry:
            entry["hessian"] = self._hessian(node)
        return entry

    def update(
        self,
        path: str,
        *,
        weight: torch.Tensor | None = None,
        act: NumberFormat | Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """From now on layer `path` runs with `weight` (its dequantized value) and its input
        passes through `act` (a format, fake-quantized dynamically, or a function)."""
        i = self._node_index(path)
        if self._position > i:
            raise ValueError(f"calibration: layer {path!r} has already run; update it before later layers are asked for")
        if act is not None and not callable(act):
            fmt = act
            act = fmt.fake
        self._patches[i] = (None if weight is None else weight.detach().float(), act)

    def close(self) -> None:
        """Free the runs' activations (statistics already gathered stay)."""
        self._runs = None
        self._closed = True
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    # ------------------------------------------------------------------ internals
    def _node_index(self, path: str) -> int:
        try:
            return self._index[path]
        except KeyError:
            close = difflib.get_close_matches(path, list(self._index), n=3, cutoff=0.3)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise KeyError(f"calibration has no linear layer {path!r}{hint}") from None

    def _advance(self, stop: int) -> None:
        if self._runs is None:
            if self._closed:
                raise ValueError("calibration was closed; for_graph(graph) starts a fresh one")
            executor = self.executor(self.graph)
            self._runs = [executor.start(b) for b in self.batches]
            self._progress = tqdm(total=len(self._index), desc="calibrate", unit="layer", disable=None)
        if stop <= self._position:
            return
        for run in self._runs:
            run.advance(stop, self._patch)
        for i in [i for i in self._patches if i < stop]:
            del self._patches[i]  # every run is past it: free the layer's replacement weight
        passed = sum(1 for i in self._index.values() if self._position <= i < stop)
        self._position = stop
        self._progress.update(passed)
        for v, last in self._last_reader.items():
            if last < stop and v in self._entries:
                for key in _HEAVY:
                    self._entries[v].pop(key, None)

    def _patch(self, node: Node, operands: list[torch.Tensor]) -> list[torch.Tensor] | None:
        patch = self._patches.get(self._positions[node])
        if patch is None:
            return None
        weight, act = patch
        out = list(operands)
        if act is not None:
            out[0] = act(out[0]).to(out[0].dtype)
        if weight is not None:
            out[1] = weight.to(out[1].dtype)
        return out

    def _inputs(self, node: Node) -> torch.Tensor:
        """The node's input activation over every batch, as rows [n, K] float32."""
        assert self._runs is not None
        xs = [run.operands(node)[0] for run in self._runs]
        return torch.cat([x.reshape(-1, x.shape[-1]).float() for x in xs])

    def _activation_stats(self, node: Node) -> dict[str, Any]:
        x = self._inputs(node).abs()
        rows = x.shape[0]
        if not self.percentiles:
            return {"amax": x.amax(0), "percentiles": {}, "tensor_percentiles": {}, "rows": rows}
        # per channel: one top-k for the lowest percentile, read at each rank (nearest rank)
        top = x.topk(_rank(rows, min(self.percentiles)), dim=0).values
        per_channel = {p: top[_rank(rows, p) - 1] for p in self.percentiles}
        amax = top[0]
        return {"amax": amax, "percentiles": per_channel, "tensor_percentiles": _tensor_percentiles(x, float(amax.max()), self.percentiles), "rows": rows}

    def _hessian(self, node: Node) -> torch.Tensor:
        x = self._inputs(node)
        return (x.T @ x).double() / x.shape[0]  # float32 products, ample for 10⁴ rows


def _rank(n: int, p: float) -> int:
    """How many of `n` values lie at or above the p-th percentile (nearest rank), at least 1."""
    return max(1, n - math.ceil(p / 100.0 * n) + 1)


#: Histogram bins for whole-tensor percentiles: exact to 1/TENSOR_BINS of the abs-max.
TENSOR_BINS = 4096


def _tensor_percentiles(x: torch.Tensor, amax: float, percentiles: Sequence[float]) -> dict[float, float]:
    """Percentiles of all of `x` (abs values) from a histogram: the upper edge of the bin
    holding the nearest-rank value, so never below it and at most amax/TENSOR_BINS above
    (an exact selection over 10⁶-10⁷ values per layer costs more than the GPTQ step)."""
    if amax <= 0.0:
        return {p: 0.0 for p in percentiles}
    counts = torch.histc(x.reshape(-1), bins=TENSOR_BINS, min=0.0, max=amax).double().cumsum(0)
    n = x.numel()
    out = {}
    for p in percentiles:
        rank = math.ceil(p / 100.0 * n)
        b = int(torch.searchsorted(counts, torch.tensor([float(rank)], dtype=torch.float64)))
        out[p] = amax * min(b + 1, TENSOR_BINS) / TENSOR_BINS
    return out


def calibrate(
    graph: Graph,
    *,
    batches: Iterable[Sequence[torch.Tensor]] | None = None,
    executor: Callable[[Graph], Any] | None = None,
    percentiles: Sequence[float] = PERCENTILES,
) -> Graph:
    """Attach a `Calibration` over `batches` run by `executor` as `graph.meta["calibration"]`
    (lazy: the batches run when a later pass asks for a layer's statistics). No batches: `graph`."""
    if batches is None:
        return graph
    if executor is None:
        raise ValueError("calibrate: batches need an executor to run them (mxc.calibrate binds the reference backend)")
    return graph.with_meta(calibration=Calibration(graph, batches, executor=executor, percentiles=percentiles))


def collect(
    graph: Graph, batches: Iterable[Sequence[torch.Tensor]], *, executor: Callable[[Graph], Any], hessian: bool = True
) -> dict[str, dict]:
    """Every linear's statistics at once, `{path: entry}`, from the float graph (no layer is
    updated). Holds every Hessian: for analysis and tests; compilation uses `Calibration`."""
    cal = Calibration(graph, batches, executor=executor)
    out = {}
    for path in cal.paths:
        entry = cal.stats(path, hessian=hessian)
        out[path] = {k: v for k, v in entry.items() if k != "gptq_factors"}
    cal.close()
    return out
