"""tune: refit the quantized weights' scales end to end, against the float model's outputs.

    graph = tune(graph, teacher=float_graph, batches=batches, steps=64, executor=executor)
    graph.meta["tuned"]    # {"steps", "scales", "kl_before", "kl_after", "kept", "seconds", ...}

GPTQ and the clipping search choose each weight's codes and scales layer by layer, each
against that layer's own output error. What the user pays for is the model's: the KL of its
next-token distributions against the float model's. This pass keeps every code and zero point
the quantize pass chose and moves only the scales, jointly for the whole model, by gradient
descent (Adam, the step size decaying along a cosine to 0) on the mean KL(p_float ‖ p_quant)
over every position of calibration text — the end-to-end stage of EfficientQAT ("E2E-QP"),
on the reference backend. Each scale s is refitted as s·exp(u), u starting at 0; at the end
it is rounded to the dtype the format stores it in (f16 for the integer formats), as the
quantize pass rounds it. Number formats, bytes and kernels are unchanged: the plan and the
model size are exactly what they were.

Which scales: those of every `dequantize` of a constant weight whose format stores f16 or
f32 scales. E8M0 (mxfp4) and FP8 (nvfp4) scales are steps of a coarse grid, not a
continuous parameter, and are left as they are; so are two-level formats' global scales.

Quantized activations and KV cache (a `quantize` computed at run time) round, and rounding
has no gradient: the gradient passes them straight through (STE), as if they were the
identity; their values in the forward pass are the quantized ones.

The text: `batches` (lists of graph inputs, as calibration takes them; from a tokenizer
`mxc.compile` cuts the 33×512 tokens just before the calibration windows GPTQ fits the layers
to, on which the quantized model's error looks smaller than on other text); each step is one
window (one row of a batch), in order, cycling. With two or more windows, the first is held
out: its KL is measured before and after, and if tuning made it worse the original scales
are kept (`meta["tuned"]["kept"]` says which). `teacher` is the float graph (before any
pass: the captured one), run on the same executor for the reference distributions.

Preserves: every node and every constant but the tuned scales (bit for bit).
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..ir import Graph, Node

#: Adam's first step size on u (scale = s·exp(u)): about 0.2% of a scale per step.
LEARNING_RATE = 2e-3
#: Scale dtypes tuned (`Scaling.scale`); e8m0 and fp8e4m3 scales are left as they are.
TUNED_SCALES = ("f16", "f32")


def tuned_scales(graph: Graph) -> dict[Node, str]:
    """`{dequantize node: name of its scale constant}` for every scale the pass tunes."""
    out: dict[Node, str] = {}
    for n in graph.nodes:
        if n.op != "dequantize" or len(n.inputs) < 2 or n.inputs[0].node.op != "const":
            continue
        scale = n.inputs[1].node
        if scale.op == "const" and n.get("format").scaling.scale in TUNED_SCALES:
            out[n] = scale.get("name")
    return out


def tune(
    graph: Graph,
    *,
    teacher: Graph,
    batches: Sequence[Sequence[torch.Tensor]] | None = None,
    steps: int = 0,
    executor: Callable[[Graph], Any] | None = None,
    lr: float = LEARNING_RATE,
    progress: bool = True,
) -> Graph:
    """`graph` with its weight scales refitted (see the module docstring); `graph` itself when
    `steps` is 0 or it has no scale to tune."""
    if steps == 0:
        return graph
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"tune: steps must be a count >= 0, got {steps!r}")
    if not batches:
        raise ValueError("tune: needs calibration batches (windows of real text) to fit the scales on")
    if executor is None:
        raise ValueError("tune: needs an executor to run the graphs (mxc.compile binds the reference backend)")
    if not lr > 0:
        raise ValueError(f"tune: the learning rate must be > 0, got {lr!r}")
    targets = tuned_scales(graph)
    if not targets:
        return graph
    start = time.perf_counter()
    windows = [[x[r:r + 1] for x in b] for b in batches for r in range(b[0].shape[0])]
    held = windows[0] if len(windows) > 1 else None
    train = windows[1:] if held is not None else windows

    student, reference = executor(graph), executor(teacher)
    names = sorted(set(targets.values()))
    base = {k: graph.weights[k].float() for k in names}
    u = {k: torch.zeros_like(base[k], requires_grad=True) for k in names}
    stash: dict[Node, torch.Tensor] = {}

    def observer(node: Node, operands: list[torch.Tensor]) -> list[torch.Tensor] | None:
        name = targets.get(node)
        if name is not None:
            return [operands[0], base[name] * torch.exp(u[name]), *operands[2:]]
        if node.op == "quantize":
            stash[node] = operands[0]  # the activation a straight-through gradient reaches
        elif node.op == "dequantize" and node.inputs[0].node in stash:
            return _straight_through(node, operands, stash[node.inputs[0].node])
        return None

    def kl(inputs: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            ref = reference(inputs)
        run = student.start(inputs)
        run.advance(len(graph.nodes), observer, grad=True)
        stash.clear()
        return _kl(run.outputs(), ref)

    with torch.no_grad():
        held_ref = None if held is None else reference(held)  # the float model's, before and after
    before = None if held is None else float(_kl(student(held), held_ref))
    opt = torch.optim.Adam(list(u.values()), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)  # to 0 at the last step
    losses = []
    for step in tqdm(range(steps), desc="tune", unit="step", disable=not progress or None):
        loss = kl(train[step % len(train)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
    fmts = {name: node.get("format") for node, name in targets.items()}
    with torch.no_grad():
        tuned = {k: fmts[k]._store_scale(base[k] * torch.exp(u[k])).to(graph.weights[k].dtype) for k in names}
    weights = {**graph.weights, **tuned}
    out = graph.replace(weights=weights)
    after = None if held is None else float(_kl(executor(out)(held), held_ref))
    kept = after is not None and after > before
    if kept:
        warnings.warn(f"tune: the held-out KL rose from {before:.4g} to {after:.4g} nats/token after {steps} steps, "
                      "so the untuned scales are kept", stacklevel=2)
        out = graph
    per = len(train)
    record = {
        "steps": steps, "scales": len(names), "windows": len(train), "tokens": sum(w[0].numel() for w in train),
        "lr": lr, "kl_before": before, "kl_after": after, "kept": "original" if kept else "tuned",
        "loss_first": _mean(losses[:per]), "loss_last": _mean(losses[-per:]),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return out.with_meta(tuned=record)


def _straight_through(node: Node, operands: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """`dequantize` operands whose result has the quantized values and the gradient of `x`:
    the codes plus (x − x)/scale in their blocks, which is 0 in value and 1/scale in gradient
    (dequantize multiplies it back by the scale)."""
    fmt = node.get("format")
    codes, scale = operands[0], operands[1].detach()
    glob = operands[3] if len(operands) > 3 else None
    full = scale * (glob.detach() if glob is not None else 1.0)
    zero = x - x.detach()
    passed = fmt._unblocked(fmt._blocked(zero, 0.0) / full[..., None], zero.shape)
    return [codes + passed, *operands[1:]]


def _kl(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
    """Mean KL(p_reference ‖ p) over positions (nats/token), from the graphs' first outputs,
    logits [batch, seq, vocab]."""
    got, ref = (_log_probs(o) for o in (outputs, reference))
    return F.kl_div(got, ref, reduction="sum", log_target=True) / got.shape[0]


def _log_probs(outputs: list[torch.Tensor]) -> torch.Tensor:
    """The first output, logits [batch, seq, vocab], as log-probabilities [positions, vocab]."""
    logits = outputs[0]
    if logits.dim() != 3:
        raise ValueError(f"tune needs logits [batch, seq, vocab] as the graph's first output, got {list(logits.shape)}")
    return F.log_softmax(logits.float().reshape(-1, logits.shape[-1]), -1)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None
