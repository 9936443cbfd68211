"""Sensitivity: how much the model suffers when ONE tensor takes a number format.

    choices = mxc.sensitivity.measure(model, ["int3<asym,g128>", "int4<asym,g128>", None], tokenizer)
    choices["model.layers.3.mlp.down_proj:weight"]     # [Choice(fmt=int3<...>, error=0.021, ...), ...]
    choices.seconds, choices.tokens                    # what the measurement cost and saw

For every quantizable tensor — each linear's weight ("<path>:weight"), each linear's input
activation ("<path>:act"), each attention's keys and values ("<path>:kv") — and every
candidate format, the error is the increase of the objective when only that tensor is
quantized, on real calibration text:

- "kl": mean KL(p_float ‖ p_quant) of the next-token distributions, over every position of
  every calibration sequence (nats/token);
- "ce": the increase of the next-token cross entropy (nats/token; may be negative);
- "proxy": the Hessian-weighted relative output error of each weight, squared
  (`mxc.passes.clip.output_error(W, fake(W), H)²`, H = XᵀX/n from calibration). It costs one
  calibration pass instead of one partial forward per (tensor, format), but ranks tensors
  only approximately: the KL is measured exactly on `check` evenly spaced tensors and the
  Spearman rank correlation of the two is kept as `result.correlation`.
- "fisher": the KL to second order, from the Fisher information of the float model: for a
  weight W taking Q(W), KL ≈ ½·E[⟨Q(W) − W, ∇_W log p(ŷ)⟩²] per window, ŷ next tokens drawn
  from the float model's own distributions at every position (`fisher_errors`). One forward
  and one backward per window serve every tensor and candidate (a dot product each), so it
  scores far more text in the time the measured KL takes for a little: a tokenizer gives
  `FISHER_WINDOWS` (64 × 512 tokens). Its units are the KL's (nats/token); on SmolLM2 its
  sum per candidate is within 5% of the measured KL's (benchmarks/RESULTS.md). As for "proxy", the
  KL is measured on `check` tensors (on the first `CHECK_TOKENS` tokens) and the rank
  correlation kept as `result.correlation`. Weights only. It costs the candidates' weight
  differences in memory (2 bytes per weight per candidate).

Weights take each candidate as `quantizer` says (`Weights`): "rtn" rounds to nearest
(`fmt.fake(W)`); "gptq" quantizes them as the quantize pass does with calibration data
(clipping search, then GPTQ: `mxc.passes.quantize.quantize_weight`), on each layer's Hessian
from float activations of `hessian_calibration` — the errors of the plan that
`mxc.compile(..., calibration=...)` will build, at the price of a GPTQ run per (layer,
format). (The compile pass is sequential: its later layers see the earlier layers quantized;
here every layer sees float inputs.) A weight candidate "fmt+k" (`Candidate`) keeps the k
input channels of largest calibrated abs-max in int8 and the rest in fmt, as the reorder and
quantize passes build `Rule(weight=fmt, options={"outliers": k})`. Activations and KV take
the format's dynamic (per token) scales, as the quantize pass emits them. A float candidate
(None or "float") costs nothing: error 0.

The text scored and the text the statistics come from: given a tokenizer, `WINDOWS` windows
held out from the compile's calibration windows are scored, and Hessians and abs-max come
from the compile's windows — what `mxc.compile(model, plan, calibration=tokenizer)` uses.
GPTQ fits each layer to its calibration inputs; scoring it on that same text would
understate its error, at 2 and 3 bits most.

Cost: the model is captured once; its float graph runs once over the calibration batches
for the reference log-probabilities, then once more, node by node, and at each quantizable
tensor the run is forked (`Run.fork`: the live float values are shared) and only the rest of
the graph — from that node to the logits — is recomputed with the tensor replaced. Nothing
before the tensor runs again, and memory holds one float run and one fork.
"""

from __future__ import annotations

import fnmatch
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .calibrate import CALIBRATION_WINDOWS, Calibration, text_batches
from .ir import Graph, Node, NumberFormat, parse_format
from .passes.allocate import Choice
from .passes.clip import output_error
from .passes.quantize import DEFAULT_OUTLIER_FORMAT, _split_quantize, layer_path, quantize_weight, stored_bytes
from .passes.reorder import gather_indices, permutation
from .plan import _fmt
from .runtime import ReferenceExecutor

OBJECTIVES = ("kl", "ce", "proxy", "fisher")
QUANTIZERS = ("rtn", "gptq")
KINDS = ("weight", "act", "kv")
#: Calibration sequences of one shape are stacked into batches of at most this many tokens
#: (larger GEMMs run faster; the logits of a batch take tokens · vocab · 4 bytes, twice).
BATCH_TOKENS = 2048
#: Positions scored at once (temporaries of rows · vocab · 4 bytes, a few at a time).
SCORE_ROWS = 256
#: Tensors on which objectives "proxy" and "fisher" measure the KL too, to report their rank
#: correlation with it.
PROXY_CHECK = 16
#: Objective "fisher": the held-out text a tokenizer gives, (count, tokens) windows. One
#: forward and one backward per window; on SmolLM2 the estimate from 64 windows ranks 1680
#: (weight, candidate) pairs as the KL measured on 2 × 512 tokens does to Spearman 0.990,
#: as well as two direct measurements on different text agree (benchmarks/RESULTS.md).
FISHER_WINDOWS = (64, 512)
#: Objective "fisher": the seed of the next-token draws (the estimate is deterministic).
FISHER_SEED = 0
#: Objective "fisher": the check's KL is measured on the first windows of the scored text
#: that hold this many tokens (at least one window).
CHECK_TOKENS = 1024
#: The text a tokenizer gives: `WINDOWS` (count, tokens) windows scored, held out from the
#: compile's calibration windows (`CALIBRATION_WINDOWS`, the last 8 × 512 tokens of the text:
#: `mxc.compile(..., calibration=tokenizer)` cuts those), which give the Hessians and abs-max
#: statistics: GPTQ fits a layer to its calibration inputs, and scored on the same text its
#: error would look smaller than on any other (most so at 2 and 3 bits).
WINDOWS = (2, 128)
#: The weight format of outlier channels: the quantize pass's default `outlier_format`.
OUTLIER_FORMAT = parse_format(DEFAULT_OUTLIER_FORMAT["weight"])
#: Bytes per input channel of the int64 gather index [K] the reorder pass keeps for outlier
#: channels behind a norm or on a layer's input (`mxc.passes.reorder.gather_indices`): one
#: per group of linears reading one activation (q, k, v), however many take outliers; none
#: when the permutation folds into a producing linear's rows (down_proj). A candidate with
#: outlier channels is charged its share (the index over the group's measured members,
#: rounded up), exact when the whole group takes outliers; `Sensitivity.stored_bytes` counts
#: a solution's indices exactly.
INDEX_BYTES = 8


@dataclass(frozen=True)
class Candidate:
    """A candidate for one tensor: a number format (None keeps float) and, for weights,
    `outliers` k > 0: the k input channels of largest calibrated abs-max kept in
    `OUTLIER_FORMAT`, the other K - k in `fmt` (what `Rule(weight=fmt, options={"outliers":
    k})` compiles to). Text: "int3<asym,g128>", "int3<asym,g128>+16", "float"."""

    fmt: NumberFormat | None
    outliers: int = 0

    def __post_init__(self) -> None:
        k = self.outliers
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"candidate {self.fmt}: outliers must be a count of input channels >= 0, got {k!r}")
        if k and self.fmt is None:
            raise ValueError(f"candidate float+{k}: outlier channels need a format for the other channels")

    def __str__(self) -> str:
        text = "float" if self.fmt is None else str(self.fmt)
        return f"{text}+{self.outliers}" if self.outliers else text

    @staticmethod
    def parse(value: Any, where: str = "candidate") -> "Candidate":
        """A candidate from itself, a format, None, or text ("int4<asym,g128>+16": 16 outlier
        channels)."""
        if isinstance(value, Candidate):
            return value
        if isinstance(value, str) and (m := re.fullmatch(r"\s*(.*?)\s*\+\s*(\d+)\s*", value)):
            return Candidate(_fmt(m[1], where), int(m[2]))
        return Candidate(_fmt(value, where))


@dataclass(frozen=True)
class Target:
    """A quantizable tensor: `tensor` ("<path>:<kind>"), the node at body position `index`
    that reads it, which of its operands it is, and its size (`numel` 0 for act / kv)."""

    tensor: str
    kind: str
    index: int
    operands: tuple[int, ...]
    shape: tuple[int, ...]
    numel: int

    @property
    def k(self) -> int:
        """The length of the axis formats scale along (the reduction axis, the head dim)."""
        return int(self.shape[-1])


class Sensitivity(dict):
    """`{tensor: [Choice, ...]}` (candidates in the order given) with what was measured:
    `objective`, `tokens` (calibration tokens seen), `seconds`, and for objective "proxy"
    `correlation` (Spearman, proxy against measured KL over `checked` tensors)."""

    def __init__(self, choices: dict[str, list[Choice]], *, objective: str, tokens: int, seconds: float,
                 correlation: float | None = None, checked: tuple[str, ...] = (), quantizer: str = "rtn",
                 indices: dict[str, dict] | None = None, float_bytes: int | None = None):
        super().__init__(choices)
        self.objective, self.tokens, self.seconds = objective, tokens, seconds
        self.correlation, self.checked, self.quantizer = correlation, checked, quantizer
        #: weights whose outlier candidates need a gather index: {tensor: {"group": the
        #: index's group, "bytes": the index's bytes, "share": what each choice is charged}}
        self.indices = dict(indices or {})
        #: bytes of the captured graph's constants that no measured weight covers (norms,
        #: embeddings, lm_head, rotary tables), as the compiled model keeps them; None when
        #: unknown (a measurement saved before this was recorded)
        self.float_bytes = float_bytes

    def stored_bytes(self, solution: dict[str, Choice]) -> int:
        """The bytes a solution's weights take compiled: its choices' bytes with each gather
        index counted once per group that has a weight with outlier channels, not as shares."""
        total, groups = 0, {}
        for tensor, c in solution.items():
            total += c.bytes
            index = self.indices.get(tensor)
            if c.outliers and index is not None:
                total -= index["share"]
                groups[index["group"]] = index["bytes"]
        return total + sum(groups.values())

    def to_dict(self) -> dict:
        """JSON-ready: what was measured and every choice (formats as text, float as null)."""
        return {
            "objective": self.objective, "quantizer": self.quantizer, "tokens": self.tokens, "seconds": self.seconds,
            "correlation": self.correlation, "checked": list(self.checked), "indices": self.indices,
            "float_bytes": self.float_bytes,
            "tensors": {t: [{"format": None if c.fmt is None else str(c.fmt), "bytes": c.bytes, "bits": c.bits,
                             "numel": c.numel, "error": c.error, **({"outliers": c.outliers} if c.outliers else {})}
                            for c in row] for t, row in self.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Sensitivity":
        """The inverse of `to_dict` (e.g. a measurement saved as JSON, reused for other budgets)."""
        choices = {t: [Choice(t, _fmt(c["format"], f"measured format of {t}"), int(c["bytes"]), float(c["bits"]),
                              int(c["numel"]), float(c["error"]), int(c.get("outliers", 0))) for c in row]
                   for t, row in data["tensors"].items()}
        return cls(choices, objective=data["objective"], tokens=int(data["tokens"]), seconds=float(data["seconds"]),
                   correlation=data.get("correlation"), checked=tuple(data.get("checked", ())),
                   quantizer=data.get("quantizer", "rtn"), indices=data.get("indices"),
                   float_bytes=data.get("float_bytes"))

    def describe(self) -> str:
        """One line: what was measured, on how much text, in how long."""
        text = (f"sensitivity ({self.objective}, weights by {self.quantizer}) of {len(self)} tensors on "
                f"{self.tokens} tokens in {self.seconds:.1f} s")
        if self.correlation is not None:
            text += f"; Spearman correlation with the measured KL on {len(self.checked)} tensors: {self.correlation:.3f}"
        return text


def measure(
    model: Any,
    candidates: "dict[str, list[Candidate | NumberFormat | str | None]] | Sequence[Candidate | NumberFormat | str | None]",
    calibration: Any,
    *,
    objective: str = "kl",
    tensors: Sequence[str] = ("weight",),
    progress: bool = True,
    check: int = PROXY_CHECK,
    example_inputs: Any = None,
    quantizer: str = "rtn",
    hessian_calibration: Any = None,
    windows: tuple[int, int] | None = None,
) -> Sensitivity:
    """Each tensor's `Choice`s: one per candidate, with its measured `error` (see the module
    docstring). `model`: a torch module, captured here as `mxc.compile` does.

    `candidates`: a list of candidates for every tensor — formats, their text, None / "float"
    (keep float), or "fmt+k" (`Candidate`: k outlier input channels in int8, weights only) —
    or a dict whose keys are a kind ("weight", "act", "kv") or a glob over tensor names
    ("*.mlp.down_proj:weight"); the first matching key wins, and a tensor no key matches is
    not measured. `calibration`: a tokenizer or a list of token-id tensors, the text scored.
    A tokenizer gives `WINDOWS` windows held out from the compile's calibration windows,
    which give the statistics (below). `tensors`: the kinds measured. `check`: for objective
    "proxy" or "fisher", how many tensors also get the measured KL. `quantizer`: "rtn" or "gptq"
    (weights; see the module docstring). `hessian_calibration`: the compile's calibration
    data (same kinds as `calibration`), whose Hessians GPTQ uses and whose abs-max ranks
    outlier channels, as in the compile; default: the compile's windows of a tokenizer, else
    `calibration` itself (then GPTQ is scored on the text it was fitted to). `windows`:
    (count, tokens) of the held-out windows a tokenizer gives (default `WINDOWS`; for
    objective "fisher" `FISHER_WINDOWS`): more text costs time but carries over better to
    other text (benchmarks/RESULTS.md)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown sensitivity objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
    if quantizer not in QUANTIZERS:
        raise ValueError(f"unknown weight quantizer {quantizer!r}; expected one of {', '.join(QUANTIZERS)}")
    bad = [k for k in tensors if k not in KINDS]
    if bad:
        raise ValueError(f"unknown tensor kind(s) {bad}; expected some of {', '.join(KINDS)}")
    if objective == "proxy" and set(tensors) != {"weight"}:
        raise ValueError("the proxy objective (Hessian-weighted output error) covers weights only: tensors=('weight',)")
    if objective == "fisher" and set(tensors) != {"weight"}:
        raise ValueError("the fisher objective (the KL to second order in a weight's change) covers weights only: "
                         "tensors=('weight',)")
    if objective == "fisher" and windows is None and not isinstance(calibration, (list, tuple)):
        windows = FISHER_WINDOWS
    start = time.perf_counter()
    graph, batches, ids, stats_batches = _prepare(model, calibration, example_inputs, hessian_calibration, windows)
    plan = {t: formats_for(candidates, t) for t in targets(graph, tensors)}
    plan = {t: cands for t, cands in plan.items() if cands}
    outliers = any(c.outliers for cands in plan.values() for c in cands)
    if hessian_calibration is not None and quantizer != "gptq" and not outliers:
        raise ValueError("hessian_calibration is for quantizer='gptq' or candidates with outlier channels "
                         "(round to nearest needs no statistics)")
    tokens = sum(int(x.numel()) for x in ids)
    indices = _indices(graph, plan)
    fixed = float_bytes(graph, plan)

    def weights() -> Weights:
        return Weights(graph, stats_batches, quantizer)

    quantized = weights()
    try:
        if objective in ("proxy", "fisher"):
            if objective == "proxy":
                errors = proxy_errors(graph, batches, plan, progress=progress, weights=quantized)
                scored, scored_ids = batches, ids
            else:
                errors = fisher_errors(graph, batches, plan, weights=quantized, progress=progress)
                scored, scored_ids = _first_tokens(batches, ids, CHECK_TOKENS)
            picked = _evenly(list(plan), check)
            quantized.close()  # the checks run the layers again from the first
            quantized = weights()
            measured = Suffixes(graph, scored, scored_ids, "kl", quantized).errors({t: plan[t] for t in picked},
                                                                                   progress=progress)
            pairs = [(errors[t][i], measured[t][i]) for t in picked for i, c in enumerate(plan[t]) if c.fmt is not None]
            corr = spearman([p for p, _ in pairs], [m for _, m in pairs]) if len(pairs) > 1 else float("nan")
            return Sensitivity(_choices(plan, errors, indices), objective=objective, tokens=tokens,
                               seconds=time.perf_counter() - start, correlation=corr,
                               checked=tuple(t.tensor for t in picked), quantizer=quantizer, indices=indices,
                               float_bytes=fixed)
        errors = Suffixes(graph, batches, ids, objective, quantized).errors(plan, progress=progress)
    finally:
        quantized.close()
    return Sensitivity(_choices(plan, errors, indices), objective=objective, tokens=tokens,
                       seconds=time.perf_counter() - start, quantizer=quantizer, indices=indices, float_bytes=fixed)


def prepare(model: Any, calibration: Any, example_inputs: Any = None,
            windows: tuple[int, int] | None = None) -> tuple[Graph, list[list[torch.Tensor]], list[torch.Tensor]]:
    """The canonical float graph of `model` (captured as `mxc.compile` does), the scored
    calibration batches as graph inputs (sequences of one shape stacked up to
    `BATCH_TOKENS`; a tokenizer's held-out `windows`, default `WINDOWS`), and each batch's
    token ids."""
    graph, batches, ids, _ = _prepare(model, calibration, example_inputs, None, windows)
    return graph, batches, ids


def _prepare(model: Any, calibration: Any, example_inputs: Any = None, stats: Any = None,
             windows: tuple[int, int] | None = None):
    """`prepare`'s graph, batches and ids, and the graph inputs of the calibration data that
    statistics (Hessians, abs-max) come from: `stats`, else for a tokenizer the compile's
    windows (the scored ones are then held out from them), else the scored batches."""
    from .driver import calibration_inputs
    from .frontends.torch_export import capture
    from .passes import run_pipeline

    if calibration is None:
        raise ValueError("sensitivity is measured on calibration text: pass calibration=tokenizer or token-id batches")
    if isinstance(model, Graph):
        raise TypeError("measure needs the model (its call signature binds the calibration batches), not a graph")
    if isinstance(calibration, (list, tuple)):
        if windows is not None:
            raise ValueError(f"windows={windows!r} sizes the text a tokenizer gives; calibration is "
                             f"{len(calibration)} token-id batches, which are scored as given")
    else:  # a tokenizer: scored text held out from the compile's
        shape = WINDOWS if windows is None else windows
        if not (isinstance(shape, (tuple, list)) and len(shape) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
            raise ValueError(f"windows must be (count, tokens per window), two positive ints, got {windows!r}")
        count, tokens = shape
        n, seq_len = CALIBRATION_WINDOWS
        if stats is None:
            stats = text_batches(calibration, n=n, seq_len=seq_len)
        calibration = text_batches(calibration, n=count, seq_len=tokens, skip=n * seq_len)
    captured = capture(model, example_inputs)
    graph = run_pipeline(captured.graph, ["canonicalize"]).graph
    inputs = calibration_inputs(calibration, captured.call_spec)
    where = captured.call_spec.inputs.index("input_ids") if "input_ids" in captured.call_spec.inputs else 0
    batches = _stack(inputs, where)
    extra = batches if stats is None else _stack(calibration_inputs(stats, captured.call_spec), where)
    return graph, batches, [b[where] for b in batches], extra


def _stack(inputs: list[list[torch.Tensor]], ids_at: int) -> list[list[torch.Tensor]]:
    """Consecutive batches of one shape concatenated along the batch axis, `BATCH_TOKENS` at most."""
    out: list[list[list[torch.Tensor]]] = []
    for b in inputs:
        last = out[-1] if out else None
        if (last is not None and [t.shape[1:] for t in last[0]] == [t.shape[1:] for t in b]
                and sum(x[ids_at].numel() for x in last) + b[ids_at].numel() <= BATCH_TOKENS):
            last.append(b)
        else:
            out.append([b])
    return [[torch.cat(parts) for parts in zip(*group)] for group in out]


def float_bytes(graph: Graph, plan: dict) -> int:
    """Bytes of the constants `graph` reads that none of `plan`'s weight targets is: what the
    compiled model keeps in float beside the allocated weights (a tied weight once; a module
    buffer the graph never reads, such as a spare copy of the rotary frequencies, not at all)."""
    allocated = {graph.nodes[t.index].inputs[1].node.get("name") for t in plan if t.kind == "weight"}
    return sum(w.numel() * w.element_size() for name, w in graph.used_weights().items() if name not in allocated)


def targets(graph: Graph, kinds: Sequence[str] = ("weight",)) -> list[Target]:
    """The quantizable tensors of `graph` of the given kinds, in graph order: the weight and
    the input of every linear whose weight is a constant, the keys and values of every
    attention (one tensor: the KV cache takes one format)."""
    out = []
    for i, node in enumerate(graph.nodes):
        if node.op == "linear" and node.inputs[1].node.op == "const":
            path = layer_path(node, node.inputs[1].node)
            wshape = tuple(int(d) for d in node.inputs[1].type.shape)
            if "weight" in kinds:
                out.append(Target(f"{path}:weight", "weight", i, (1,), wshape, math.prod(wshape)))
            if "act" in kinds:
                out.append(Target(f"{path}:act", "act", i, (0,), (wshape[1],), 0))
        elif node.op == "attention" and "kv" in kinds:
            head = node.inputs[1].type.shape[-1]
            out.append(Target(f"{layer_path(node)}:kv", "kv", i, (1, 2), (int(head),), 0))
    return out


def formats_for(candidates: Any, target: Target) -> list[Candidate]:
    """The candidates of `target` (see `measure`), parsed and checked; [] when none applies."""
    if isinstance(candidates, dict):
        for key, fmts in candidates.items():
            if key == target.kind or fnmatch.fnmatchcase(target.tensor, key):
                break
        else:
            return []
    else:
        fmts = candidates
    out = [Candidate.parse(f, f"candidate for {target.tensor}") for f in fmts]
    for c in out:
        f = c.fmt
        if f is None:
            continue
        if target.kind == "weight" and f.scaling.kind == "token":
            raise ValueError(f"{target.tensor}: weight candidate {f} scales per token; weights scale per tensor, channel or block")
        if target.kind != "weight" and f.scaling.kind in ("tensor", "channel"):
            raise ValueError(
                f"{target.tensor}: candidate {f} scales per {f.scaling.kind}; sensitivity measures activations and KV "
                "with dynamic scales (per token or per block)"
            )
        if c.outliers and target.kind != "weight":
            raise ValueError(f"{target.tensor}: candidate {c} keeps outlier channels, which sensitivity measures for "
                             "weights only")
        if c.outliers >= target.k:
            raise ValueError(f"{target.tensor}: candidate {c} keeps {c.outliers} outlier channels of K={target.k}; "
                             "at least one channel stays in the low-bit format")
    return out


def _indices(graph: Graph, plan: dict[Target, list[Candidate]]) -> dict[str, dict]:
    """`Sensitivity.indices` of the weights with outlier candidates (see `INDEX_BYTES`)."""
    groups = gather_indices(graph)
    members: dict[str, list[Target]] = {}
    for t, cands in plan.items():
        path = t.tensor.rpartition(":")[0]
        if t.kind == "weight" and any(c.outliers for c in cands) and path in groups:
            members.setdefault(groups[path], []).append(t)
    out = {}
    for group, ts in members.items():
        size = INDEX_BYTES * ts[0].k
        out.update({t.tensor: {"group": group, "bytes": size, "share": -(-size // len(ts))} for t in ts})
    return out


def candidate_size(candidate: "Candidate | NumberFormat | str | None", shape: tuple[int, ...]) -> tuple[int, float]:
    """(bytes, bits per element) of a weight of `shape` ([N, K]) as `candidate` compiles:
    bytes as the compiled model stores them (`stored_bytes`; float: 4 per element), both
    parts of a candidate with outlier channels (its gather index not included); bits
    include scales (`effective_bits`; float: 32)."""
    c = Candidate.parse(candidate)
    n, kdim = shape
    f, k = c.fmt, c.outliers
    if f is None:
        return 4 * n * kdim, 32.0
    if not k:
        return stored_bytes(f, (n, kdim)), float(f.effective_bits(kdim))
    size = stored_bytes(f, (n, kdim - k)) + stored_bytes(OUTLIER_FORMAT, (n, k))
    return size, float((f.effective_bits(kdim - k) * (kdim - k) + OUTLIER_FORMAT.effective_bits(k) * k) / kdim)


def _choices(plan: dict[Target, list[Candidate]], errors: dict[Target, list[float]],
             indices: dict[str, dict]) -> dict[str, list[Choice]]:
    out = {}
    for t, cands in plan.items():
        row = []
        for c, err in zip(cands, errors[t]):
            if t.kind == "weight":
                size, bits = candidate_size(c, t.shape)
                size += indices[t.tensor]["share"] if c.outliers and t.tensor in indices else 0
            else:
                size, bits = 0, 32.0 if c.fmt is None else float(c.fmt.effective_bits(t.k))
            row.append(Choice(t.tensor, c.fmt, size, bits, t.numel, float(err), c.outliers))
        out[t.tensor] = row
    return out


class Suffixes:
    """The float graph's runs over the calibration batches and their reference
    log-probabilities; `errors(plan)` walks the runs once and, at each target, recomputes
    only the rest of the graph per candidate format (module docstring)."""

    def __init__(self, graph: Graph, batches: list[list[torch.Tensor]], ids: list[torch.Tensor], objective: str,
                 weights: "Weights | None" = None):
        if objective not in ("kl", "ce"):
            raise ValueError(f"measured objectives are 'kl' and 'ce', got {objective!r}")
        self.graph, self.batches, self.ids, self.objective = graph, batches, ids, objective
        #: how a weight takes a candidate (default: rounded to nearest, statistics from `batches`)
        self.quantized = weights if weights is not None else Weights(graph, batches, "rtn")
        self.executor = ReferenceExecutor(graph, check_shapes=False)
        self.weights = self.executor.weights
        self.reference = [_logits(self.executor(b)) for b in batches]
        self.positions = sum(self._count(x) for x in ids)
        # per batch, what `score` compares with: the float next-token probabilities (KL), or
        # the float log-probability of each label (cross entropy)
        self.cached = [self._reference_terms(i) for i in range(len(batches))]

    def _reference_terms(self, batch: int) -> torch.Tensor:
        ref = self.reference[batch]
        vocab = ref.shape[-1]
        if self.objective == "kl":
            return torch.cat([torch.softmax(ref.reshape(-1, vocab)[rows].double(), -1).float()
                              for rows in _chunks(ref.numel() // vocab)])
        labels = self.ids[batch][:, 1:].reshape(-1, 1)
        ref = ref[:, :-1].reshape(-1, vocab)
        return torch.cat([(ref[rows].double().gather(1, labels[rows]) - torch.logsumexp(ref[rows].double(), -1, keepdim=True))
                          for rows in _chunks(ref.shape[0])])

    def _count(self, ids: torch.Tensor) -> int:
        return ids.numel() if self.objective == "kl" else ids.shape[0] * (ids.shape[1] - 1)

    def score(self, batch: int, outputs: list[torch.Tensor]) -> float:
        """The summed objective increase of one batch's outputs against the float ones,
        `SCORE_ROWS` positions at a time.

        KL: with d = z_quant - z_float (logits) and p the float probabilities,
        KL(p ‖ q) = log Σ p·e^d − Σ p·d = C + log1p(A) − A, where A = Σ p·expm1(d) and
        C = Σ p·(expm1(d) − d) ≥ 0. Each term is formed in float32 from the exact difference
        of the logits and summed in float64: no log-probability of either side is formed, so
        the tiny KL of an 8-bit tensor (~1e-6 nats) does not drown in the rounding of
        log-probabilities (~1e-6 each); agreement with float64 log-softmax is ~1e-5
        relative, at a third of its cost. Cross entropy: the label's log-probability, taken
        in float64."""
        ref, got = self.reference[batch], _logits(outputs)
        vocab = ref.shape[-1]
        total = 0.0
        if self.objective == "kl":
            p = self.cached[batch]
            ref, got = ref.reshape(-1, vocab), got.reshape(-1, vocab)
            for rows in _chunks(ref.shape[0]):
                d = got[rows] - ref[rows]
                e = torch.expm1(d)
                a = (p[rows] * e).sum(-1, dtype=torch.float64)
                c = ((e - d).mul_(p[rows])).sum(-1, dtype=torch.float64)
                kl = c + torch.log1p(a) - a
                far = ~torch.isfinite(kl)  # expm1 overflows past d ≈ 88: those rows by log-softmax
                if bool(far.any()):
                    q = F.log_softmax(got[rows][far].double(), -1)
                    kl[far] = F.kl_div(q, F.log_softmax(ref[rows][far].double(), -1), reduction="none",
                                       log_target=True).sum(-1)
                total += float(kl.sum())
            return total
        labels = self.ids[batch][:, 1:].reshape(-1, 1)
        got = got[:, :-1].reshape(-1, vocab)
        for rows in _chunks(got.shape[0]):
            q = got[rows].double()
            q = q.gather(1, labels[rows]) - torch.logsumexp(q, -1, keepdim=True)
            total += float((self.cached[batch][rows] - q).sum())
        return total

    def replacement(self, target: Target, candidate: "Candidate | NumberFormat") -> "Replace":
        """The observer that runs `target`'s node with the tensor as `candidate` has it."""
        c = Candidate.parse(candidate)
        node = self.graph.nodes[target.index]
        if target.kind == "weight":
            w = self.weights[node.inputs[1].node.get("name")]
            return Replace(node, {1: self.quantized(target, c, w).to(w.dtype)}, None)
        if c.outliers:
            raise ValueError(f"{target.tensor}: outlier channels are measured for weights only, got {c}")
        return Replace(node, {}, (c.fmt, target.operands))

    def errors(self, plan: dict[Target, list[Candidate]], *, progress: bool = True) -> dict[Target, list[float]]:
        """`{target: [error per candidate]}`: the objective increase per token of each (target,
        candidate) alone; float is 0 without running anything."""
        plan = {t: [Candidate.parse(c) for c in cands] for t, cands in plan.items()}
        order = sorted(plan, key=lambda t: t.index)
        runs = [self.executor.start(b) for b in self.batches]
        end = len(self.graph.nodes)
        out: dict[Target, list[float]] = {}
        total = sum(1 for t in order for c in plan[t] if c.fmt is not None)
        bar = tqdm(total=total, desc=f"sensitivity ({self.objective})", unit="run", disable=not progress or None)
        try:
            for t in order:
                for run in runs:
                    run.advance(t.index)
                row = []
                for c in plan[t]:
                    if c.fmt is None:
                        row.append(0.0)
                        continue
                    observer = self.replacement(t, c)
                    summed = 0.0
                    for i, run in enumerate(runs):
                        alt = run.fork()
                        alt.advance(end, observer)
                        summed += self.score(i, alt.outputs())
                    row.append(summed / self.positions)
                    bar.update(1)
                out[t] = row
        finally:
            bar.close()
        return out


class Replace:
    """An executor observer that runs `node` with some operands replaced: `fixed` ({operand
    index: tensor}) and, when `fake` = (format, operand indices), those operands fake-quantized."""

    def __init__(self, node: Node, fixed: dict[int, torch.Tensor], fake: tuple[NumberFormat, tuple[int, ...]] | None):
        self.node, self.fixed, self.fake = node, fixed, fake

    def __call__(self, node: Node, operands: list[torch.Tensor]) -> list[torch.Tensor] | None:
        if node is not self.node:
            return None
        out = list(operands)
        for i, t in self.fixed.items():
            out[i] = t
        if self.fake is not None:
            fmt, which = self.fake
            for i in which:
                out[i] = fmt.fake(out[i]).to(out[i].dtype)
        return out


class Weights:
    """Candidate weights as `mxc.compile` builds them: `method` "rtn" rounds to nearest (a
    plan compiled without calibration data: no clipping search); "gptq" runs the clipping
    search, then GPTQ on the layer's Hessian (`quantize_weight`). A candidate with outlier
    channels takes the k channels of largest abs-max of the layer's input, puts them last
    (`mxc.passes.reorder.permutation`) and splits the weight as the quantize pass does
    (`_split_quantize`: with GPTQ the outlier part compensates the low-bit part's error).
    Hessians and abs-max come from `batches`, the compile's calibration data, computed lazily
    (none for plain round to nearest); targets must be asked for in graph order (one layer's
    statistics held).

    One approximation remains for outlier candidates: a layer reading the same activation as
    another that takes more outlier channels (q, k and v; gate and up) sees its columns in
    that layer's order after the reorder pass, which moves some columns across group
    boundaries; measured, each layer has its own order."""

    def __init__(self, graph: Graph, batches: list[list[torch.Tensor]], method: str = "rtn"):
        if method not in QUANTIZERS:
            raise ValueError(f"unknown weight quantizer {method!r}; expected one of {', '.join(QUANTIZERS)}")
        self.graph, self.batches, self.method = graph, batches, method
        self.calibration: Any = None
        self.path: str | None = None
        self.stats: dict = {}

    def _stats(self, target: Target) -> dict:
        node = self.graph.nodes[target.index]
        path = layer_path(node, node.inputs[1].node)
        if path != self.path:
            if self.calibration is None:
                self.calibration = Calibration(self.graph, self.batches, percentiles=())
            self.path, self.stats = path, self.calibration.stats(path, hessian=self.method == "gptq")
        return self.stats

    def __call__(self, target: Target, candidate: "Candidate | NumberFormat", w: torch.Tensor) -> torch.Tensor:
        """`w` ([N, K]) as `candidate` has it, dequantized (float32)."""
        c = Candidate.parse(candidate)
        w = w.float()
        if self.method == "rtn" and not c.outliers:
            return c.fmt.fake(w)
        stats = self._stats(target)
        h = stats.get("hessian") if self.method == "gptq" else None
        clip = self.method == "gptq"
        if not c.outliers:
            return quantize_weight(w, c.fmt, method=self.method, clip_search=clip, hessian=h)[1]
        k, kdim = c.outliers, w.shape[1]
        perm = permutation(stats["amax"], k)
        hp = None if h is None else h[perm][:, perm]
        parts = _split_quantize(w[:, perm], kdim - k, (c.fmt, OUTLIER_FORMAT), {"method": self.method, "clip_search": clip},
                                hp, None)
        out = torch.empty_like(w)
        out[:, perm] = torch.cat([parts[0][1], parts[1][1]], dim=1)
        return out

    def close(self) -> None:
        if self.calibration is not None:
            self.calibration.close()


def proxy_errors(graph: Graph, batches: list[list[torch.Tensor]], plan: dict[Target, list[Candidate]],
                 *, progress: bool = True, weights: Weights | None = None) -> dict[Target, list[float]]:
    """`{target: [output_error(W, Q(W), H)² per candidate]}` for weight targets, H from one
    calibration pass over `batches` (layer by layer: one Hessian held at a time); Q is
    `weights` (default: rounded to nearest, abs-max from `batches`)."""
    quantized = weights if weights is not None else Weights(graph, batches, "rtn")
    cal = Calibration(graph, batches, percentiles=())
    tensors = graph.used_weights()
    out = {}
    try:
        for t in tqdm(sorted(plan, key=lambda t: t.index), desc="sensitivity (proxy)", unit="layer",
                      disable=not progress or None):
            node = graph.nodes[t.index]
            h = cal.stats(layer_path(node, node.inputs[1].node))["hessian"]
            w = tensors[node.inputs[1].node.get("name")].float()
            out[t] = [0.0 if c.fmt is None else output_error(w, quantized(t, c, w), h) ** 2
                      for c in map(Candidate.parse, plan[t])]
    finally:
        cal.close()
        if weights is None:
            quantized.close()
    return out


def fisher_errors(graph: Graph, batches: list[list[torch.Tensor]], plan: dict[Target, list[Candidate]], *,
                  weights: Weights, progress: bool = True, seed: int = FISHER_SEED) -> dict[Target, list[float]]:
    """`{target: [KL per token to second order, per candidate]}` for weight targets.

    With the float model's next-token distributions p and a weight's change D = Q(W) − W,
    KL(p ‖ p_Q) = ½·Dᵀ F D + O(D³) summed over positions, F the Fisher information; F is the
    covariance of the score, so ½·E[s²] with s = ⟨D, ∇_W Σ_t log p_t(ŷ_t)⟩ and ŷ_t drawn
    from p_t (draws at different positions are independent, so cross terms vanish in the
    mean). Per window (each sequence of each batch): one forward through the graph with
    every target's weight a leaf that requires grad, one draw of ŷ (`seed`), one backward,
    and s for every (target, candidate) from the gradient; the estimate is Σ s² / (2 ·
    positions). Q(W) is `weights` (gptq or round to nearest), taken once per target before
    the windows run and held as float16 differences."""
    executor = ReferenceExecutor(graph, check_shapes=False)
    order = sorted(plan, key=lambda t: t.index)
    deltas = weight_changes(executor, graph, plan, weights, progress=progress)
    squares = {t: torch.zeros(0 if d is None else d.shape[0], dtype=torch.float64) for t, d in deltas.items()}
    positions = 0
    for count, grads in fisher_gradients(executor, graph, batches, order, seed=seed, progress=progress):
        for t, g in grads.items():
            if deltas[t] is not None:
                s = torch.einsum("cnk,nk->c", deltas[t].float(), g.float()).double()
                squares[t] += s * s
        positions += count
    out = {}
    for t in order:
        est = iter((squares[t] / (2 * positions)).tolist())
        out[t] = [0.0 if c.fmt is None else next(est) for c in map(Candidate.parse, plan[t])]
    return out


def weight_changes(executor: ReferenceExecutor, graph: Graph, plan: dict[Target, list[Candidate]],
                   weights: Weights, *, progress: bool = True) -> dict[Target, torch.Tensor | None]:
    """`{target: Q(W) − W}` for every quantized candidate of `plan` (float ones skipped), as
    float16 [candidates, N, K] (None: no quantized candidate), in graph order as `weights`
    needs them."""
    tensors = executor.weights
    out: dict[Target, torch.Tensor | None] = {}
    for t in tqdm(sorted(plan, key=lambda t: t.index), desc="sensitivity (fisher): candidates", unit="tensor",
                  disable=not progress or None):
        w = tensors[graph.nodes[t.index].inputs[1].node.get("name")].float()
        changed = [weights(t, c, w) - w for c in map(Candidate.parse, plan[t]) if c.fmt is not None]
        out[t] = torch.stack(changed).to(torch.float16) if changed else None
    return out


def fisher_gradients(executor: ReferenceExecutor, graph: Graph, batches: list[list[torch.Tensor]],
                     order: list[Target], *, seed: int = FISHER_SEED, progress: bool = True):
    """Per window (each sequence of each batch), `(positions, {target: ∇_W Σ_t log p_t(ŷ_t)})`:
    one forward through `graph` on `executor` with every target's weight a leaf that
    requires grad, the next tokens ŷ drawn from the float model's own distributions (one
    generator seeded with `seed` across the windows), one backward. What `fisher_errors`
    sums; the score of a change D of a weight in one window is ⟨D, gradient⟩."""
    tensors = executor.weights
    names = {t: graph.nodes[t.index].inputs[1].node.get("name") for t in order}
    at = {graph.nodes[t.index]: t for t in order}
    gen = torch.Generator().manual_seed(seed)
    windows = [[x[r:r + 1] for x in b] for b in batches for r in range(b[0].shape[0])]
    for inputs in tqdm(windows, desc="sensitivity (fisher)", unit="window", disable=not progress or None):
        leaves = {t: tensors[names[t]].detach().requires_grad_() for t in order}

        def observer(node: Node, operands: list[torch.Tensor], leaves=leaves) -> list[torch.Tensor] | None:
            t = at.get(node)
            return None if t is None else [operands[0], leaves[t], *operands[2:]]

        run = executor.start(inputs)
        run.advance(len(graph.nodes), observer, grad=True)
        logits = _logits(run.outputs())
        logp = F.log_softmax(logits.reshape(-1, logits.shape[-1]), -1)
        drawn = torch.multinomial(logp.detach().exp(), 1, generator=gen)
        grads = torch.autograd.grad(logp.gather(1, drawn).sum(), [leaves[t] for t in order])
        count = logp.shape[0]
        del run, logits, logp
        yield count, dict(zip(order, grads))


def _logits(outputs: list[torch.Tensor]) -> torch.Tensor:
    """The graph's first output, the logits [batch, seq, vocab], in float32."""
    logits = outputs[0]
    if logits.dim() != 3:
        raise ValueError(f"sensitivity needs logits [batch, seq, vocab] as the graph's first output, got {list(logits.shape)}")
    return logits.float()


def _first_tokens(batches: list[list[torch.Tensor]], ids: list[torch.Tensor],
                  tokens: int) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """The first windows (rows of `batches`) that hold at most `tokens` tokens (at least one
    window), stacked as `_stack` does, and their token ids (`ids[i]` is an input of
    `batches[i]`, as `_prepare` gives them)."""
    where = next(j for j, x in enumerate(batches[0]) if x is ids[0])
    rows: list[list[torch.Tensor]] = []
    seen = 0
    for b in batches:
        for r in range(b[where].shape[0]):
            if rows and seen + b[where][r].numel() > tokens:
                break
            rows.append([x[r:r + 1] for x in b])
            seen += b[where][r].numel()
        else:
            continue
        break
    stacked = _stack(rows, where)
    return stacked, [b[where] for b in stacked]


def _chunks(n: int) -> list[slice]:
    """Row slices of `SCORE_ROWS` covering `n` rows."""
    return [slice(i, i + SCORE_ROWS) for i in range(0, n, SCORE_ROWS)]


def ranks(x: Sequence[float]) -> torch.Tensor:
    """1-based ranks of `x` (float64), ties given the mean of the ranks they span
    (`scipy.stats.rankdata`)."""
    from scipy.stats import rankdata

    return torch.as_tensor(rankdata(list(x), method="average"), dtype=torch.float64)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of `a` and `b` (`scipy.stats.spearmanr`: the Pearson
    correlation of their ranks, ties averaged); NaN when either is constant."""
    import warnings

    from scipy.stats import spearmanr

    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} values against {len(b)}")
    if len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(list(a), list(b)).statistic)


def _evenly(items: list, n: int) -> list:
    """`n` items spread evenly over `items` (all of them when there are no more than `n`)."""
    if n >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(n - 1, 1))] for i in range(n)]
