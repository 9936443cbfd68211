"""Graph helpers shared by the tests: a graph with its own side table, its const-weight
linears and their inputs' per-channel abs-max measured independently of the calibrate pass
(smooth, reorder), and random weights for a quantized graph (fuse, the kernel backend)."""

from __future__ import annotations

import zlib

import sympy
import torch

from mxc.ir import Graph
from mxc.ir.ops import quant_parts
from mxc.passes.quantize import layer_path, quantize_weight
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


def with_random_weights(graph: Graph, seed: int = 0) -> Graph:
    """Float consts get normal values; the quantized consts a `dequantize` or a `qlinear`
    reads get the parts of a round-to-nearest quantization of a random tensor."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for n in graph.nodes:
        if n.op == "dequantize" and all(v.node.op == "const" for v in n.inputs):
            fmt, consts = n.get("format"), n.inputs
        elif n.op == "qlinear":
            fmt, na = n.get("weight"), len(quant_parts(n.get("act")))
            consts = n.inputs[na : na + len(quant_parts(fmt))]
        else:
            continue
        w = torch.randn(consts[0].type.shape, generator=gen)
        parts, _ = quantize_weight(w, fmt, method="rtn", clip_search=False, hessian=None)
        weights.update((v.node.get("name"), parts[p]) for v, p in zip(consts, quant_parts(fmt)))
    for n in graph.nodes:
        if n.op == "const" and n.get("name") not in weights:
            t = n.types[0]
            if t.dtype.kind == "int":  # a reorder gather's index: a permutation of the channels
                weights[n.get("name")] = torch.randperm(t.shape[0], generator=gen)
            else:
                weights[n.get("name")] = torch.randn(t.shape, generator=gen)
    return graph.replace(weights=weights)


def input_shapes(graph: Graph, sizes: dict[str, int]) -> list[tuple]:
    """(input type, concrete shape) of each input of `graph` at the size binding `sizes`
    (symbol name -> size)."""
    subs = {sympy.Symbol(k, integer=True, positive=True): v for k, v in sizes.items()}
    return [(n.types[0], [d if isinstance(d, int) else int(d.xreplace(subs)) for d in n.types[0].shape])
            for n in graph.inputs]


def seeded(case: str) -> torch.Generator:
    """A generator seeded by a golden case's name (stable across runs and machines)."""
    return torch.Generator().manual_seed(zlib.crc32(case.encode()))


def golden_inputs(graph: Graph, sizes: dict[str, int], gen: torch.Generator) -> list[torch.Tensor]:
    """Inputs of `graph` at the size binding `sizes`: normal floats, small integers (0..8)."""
    return [torch.randn(shape, generator=gen) if t.dtype.is_float else torch.randint(0, 9, shape, generator=gen)
            for t, shape in input_shapes(graph, sizes)]


def outlier_norm_llama(graph: Graph, seed: int, outliers: int):
    """The canonical tiny Llama `graph` with `outliers` channels of every norm weight scaled
    by 25 (as trained models have: smoothing and reordering have something to act on),
    two calibration batches and their inputs' per-channel abs-maxima."""
    from mxc.ir import verify

    gen = torch.Generator().manual_seed(seed)
    weights = dict(graph.weights)
    for name in [k for k in weights if k.endswith("norm.weight")]:
        w = 1.0 + 0.1 * torch.randn(weights[name].shape, generator=gen)
        w[torch.randperm(w.numel(), generator=gen)[:outliers]] *= 25.0
        weights[name] = w
    graph = verify(fresh(graph, weights))
    batches = [[torch.randint(0, 131, (2, 23), generator=gen)], [torch.randint(0, 131, (1, 37), generator=gen)]]
    return graph, batches, input_amax(graph, batches)
