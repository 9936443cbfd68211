"""Calibration: run real text through the float graph and keep what quantization needs.

    stats = calibrate(graph, batches)        # {layer path: {"hessian": H, "amax": [K], "rows": n}}
    graph.meta["calibration"] = stats        # the side table the quantize pass reads

For every `linear` with a constant weight, the input activations are accumulated into the
Hessian `XᵀX / rows` (float64, K×K; shared by layers that read the same activation, such
as q/k/v) and the per-channel abs-max. Calibration data is real text: `text_batches` cuts
windows from the END of `mxc.eval.default_text()`, so that it never overlaps the windows
perplexity is measured on (which come from the start).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from .ir import Graph, Node, Value
from .passes.gptq import HessianAccumulator
from .passes.quantize import layer_path
from .runtime import ReferenceExecutor


def text_batches(tokenizer: Any, *, n: int = 16, seq_len: int = 512, text: str | None = None) -> list[torch.Tensor]:
    """`n` windows of `seq_len` tokens of real text, from the end of the default text."""
    from .eval import default_text

    ids = tokenizer.encode(text if text is not None else default_text(), add_special_tokens=False)
    need = n * seq_len
    if len(ids) < need:
        raise ValueError(f"calibration text has {len(ids)} tokens, but {n} windows of {seq_len} need {need}")
    tail = torch.tensor(ids[-need:], dtype=torch.long).reshape(n, seq_len)
    return list(tail)


def calibrate(graph: Graph, batches: Iterable[list[torch.Tensor]]) -> dict[str, dict]:
    """Hessians and per-channel abs-max of every linear's input over `batches`, each the
    list of the graph's input tensors (`mxc.driver.calibration_inputs` makes them)."""
    run = ReferenceExecutor(graph, check_shapes=False)
    readers: dict[Value, list[str]] = {}
    for node in graph.nodes:
        if node.op == "linear" and node.inputs[1].node.op == "const":
            readers.setdefault(node.inputs[0], []).append(layer_path(node, node.inputs[1].node))
    acc: dict[Value, HessianAccumulator] = {v: HessianAccumulator() for v in readers}
    amax: dict[Value, torch.Tensor] = {}
    seen: set[Value] = set()  # activations already taken in this batch (q/k/v share one)

    def observe(node: Node, operands: list[torch.Tensor]) -> None:
        if node.op != "linear" or node.inputs[0] not in acc:
            return
        v, x = node.inputs[0], operands[0]
        if v in seen:
            return
        seen.add(v)
        flat = x.reshape(-1, x.shape[-1]).float()
        acc[v].add(flat)
        m = flat.abs().amax(0)
        amax[v] = m if v not in amax else torch.maximum(amax[v], m)

    for batch in tqdm(list(batches), desc="calibrate", disable=None):
        seen.clear()
        run(list(batch), observer=observe)
    stats: dict[str, dict] = {}
    for v, paths in readers.items():
        if acc[v].rows == 0:
            continue
        entry = {"hessian": acc[v].H, "amax": amax[v], "rows": acc[v].rows}
        for p in paths:
            stats[p] = entry
    return stats
