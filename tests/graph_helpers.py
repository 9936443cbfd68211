"""Graph helpers shared by the tests of passes that read activation statistics (smooth,
reorder): a graph with its own side table, its const-weight linears, and their inputs'
per-channel abs-max measured independently of the calibrate pass."""

from __future__ import annotations

import torch

from mxc.ir import Graph
from mxc.passes.quantize import layer_path
from mxc.runtime import ReferenceExecutor


def fresh(graph: Graph, weights=None) -> Graph:
    """`graph` with its own (empty) side table and `weights` (default: a copy of its own)."""
    return Graph(graph.name, graph.inputs, graph.nodes, graph.outputs, graph.dims, dict(weights or graph.weights))


def linears(graph: Graph):
    return [n for n in graph.nodes if n.op == "linear" and n.inputs[1].node.op == "const"]


def input_amax(graph: Graph, batches) -> dict[str, torch.Tensor]:
    """Per-channel abs-max of every const-weight linear's input over `batches`, by path."""
    values = list(dict.fromkeys(n.inputs[0] for n in linears(graph)))
    run = ReferenceExecutor(graph.replace(outputs=values), check_shapes=True)
    amax: dict = {}
    for batch in batches:
        for v, t in zip(values, run(list(batch))):
            m = t.reshape(-1, t.shape[-1]).abs().amax(0)
            amax[v] = m if v not in amax else torch.maximum(amax[v], m)
    return {layer_path(n, n.inputs[1].node): amax[n.inputs[0]] for n in linears(graph)}
