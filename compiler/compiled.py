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

from .ir import Graph
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

    def __str__(self) -> str:
        lines = [f"mxc report: graph @{self.graph_name}, backend {self.backend}"]
        lines.append(f"  weights: {self.weight_bytes / 2**20:.2f} MiB")
        lines.append("  ops:")
        for op, n in sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0])):
            if not op.startswith("torch:"):
                lines.append(f"    {op:<28} {n:>6}")
        total = sum(self.fallbacks.values())
        lines.append(f"  torch fallbacks (not lowered to the op set): {total}")
        for op, n in sorted(self.fallbacks.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {op:<28} {n:>6}")
        if self.timings:
            lines.append("  passes: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.timings.items()))
        return "\n".join(lines)


class CompiledModel:
    """A compiled graph bound to a backend, callable like the module it came from."""

    def __init__(
        self,
        graph: Graph,
        call_spec: CallSpec,
        executor: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]],
        backend: str,
        timings: dict[str, float] | None = None,
    ):
        self.graph = graph
        self.call_spec = call_spec
        self.backend = backend
        self.timings = dict(timings or {})
        self._executor = executor

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = self.call_spec.bind(args, kwargs)
        return self.call_spec.unflatten(self._executor(inputs))

    @property
    def ir(self) -> str:
        """The final IR as text (parse it back with `mxc.ir.parse`)."""
        return str(self.graph)

    def report(self) -> Report:
        counts = self.graph.op_counts()
        fallbacks = {k.removeprefix("torch:"): v for k, v in counts.items() if k.startswith("torch:")}
        weights = self.graph.used_weights()
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        return Report(self.graph.name, self.backend, counts, fallbacks, nbytes, self.timings)

    def __repr__(self) -> str:
        return f"CompiledModel(@{self.graph.name}, {len(self.graph.nodes)} nodes, backend={self.backend!r})"
