"""Latency costs for the allocation's latency budget: the predicted time of each linear in
each candidate format, summed by the solver (`mxc.passes.allocate.solve(budget_seconds=)`).

    cost = mxc.cost.BandwidthModel()                          # H100 SXM figures, one token
    plan = mxc.Plan.auto(model, 4.0, calibration=tok, latency="0.4ms", cost=cost)
    plan.notes["allocation"]["latency"]                         # budget, predicted, the model used

No kernel table has been measured (the kernel benchmark needs CUDA and none was lent), so the
only cost model is a **bandwidth model, an estimate**: it says so in every report
(`describe()`, `to_dict()["measured"] is False`). A linear running M tokens is taken to be
memory-bound (true for decode, M small), so its time is the bytes it must move over the
memory bandwidth plus a fixed cost per kernel launch:

    seconds = (weight bytes + M·(K + N)·2) / bandwidth + launch
              + with k outlier channels: M·2K·2 / bandwidth (the gather of x) + M·N·2 / bandwidth
                and a second launch (the outlier GEMM)

Weight bytes are the choice's own (`Choice.bytes`: packed codes, scales, zero points, outlier
part, a share of the gather index), so the latency budget prices formats as the byte budget
sizes them; fp16 activations in and out.

Activation and KV-cache choices are priced as what they change, next to the linears:

    act "<linear>:act" in a format of b bits (scales included), K input channels:
        seconds = M·K·2·b/8 / bandwidth + launch
    a separate quantize kernel reads the fp16 activation and writes codes (M·K·b/8), which
    the GEMM then reads in place of the fp16 activation: an upper bound where the quantize
    fuses into the preceding norm (q/k/v, gate/up), which saves bytes instead; float: 0.

    kv "<attention>:kv" in a format of b bits (float: the fp16 cache), W = K and V elements
    per token (every KV head), `context` cached tokens:
        seconds = M·context·W·b/8 / bandwidth
    what each decode step reads of the cache; `context` 0 (the default) prices every KV
    choice at 0, which leaves them to the size budget alone.

Compute-bound prefill (M large) is not modelled: `tokens` sets M but the figure stays a
bandwidth bound, so an int8 activation never pays for itself here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

_LATENCY = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*(s|ms|us|µs|ns)?\s*")
_SECONDS = {None: 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_latency(latency: Any) -> float:
    """Seconds from a number (seconds) or text with a unit: "0.4ms", "350us", "2e-4s".

        parse_latency("0.4ms") -> 0.0004
    """
    if isinstance(latency, (int, float)) and not isinstance(latency, bool):
        value = float(latency)
    elif isinstance(latency, str) and (m := _LATENCY.fullmatch(latency)):
        value = float(m[1]) * 10 ** int(m[2] or 0) * _SECONDS[m[3]]
    else:
        raise ValueError(f"latency budget {latency!r}: expected seconds as a number or text with a unit "
                         "(\"0.4ms\", \"350us\", \"2e-4s\")")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"latency budget {latency!r}: expected a positive time, got {value} s")
    return value


@dataclass(frozen=True)
class BandwidthModel:
    """The estimated time of one linear (see the module docstring). Defaults: an H100 SXM's
    peak HBM3 bandwidth (3.35 TB/s), 3 µs per kernel launch, one token (a decode step)."""

    bandwidth: float = 3.35e12  # bytes/s
    launch: float = 3e-6        # seconds per kernel launch
    tokens: int = 1             # M: rows of activations per call
    act_bytes: int = 2          # bytes per activation element in and out (fp16)
    context: int = 0            # KV-cache tokens each step reads (0: KV choices cost nothing)

    def __post_init__(self) -> None:
        for name in ("bandwidth", "launch", "tokens", "act_bytes", "context"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and (value > 0 or (name in ("launch", "context") and value == 0))):
                zero = " or 0" if name in ("launch", "context") else ""
                raise ValueError(f"BandwidthModel: {name} must be a positive number{zero}, got {value!r}")

    def seconds(self, choice: Any, shape: tuple[int, ...] | None) -> float:
        """Predicted seconds of `choice` (see the module docstring): for a weight, of the
        linear whose weight is `shape` ([N, K]) in `choice`'s format (`choice.bytes`,
        `choice.outliers`); for an activation ("...:act", `shape` (K,)) or a KV cache
        ("...:kv", `shape` (W,): K and V elements per token), what its format adds."""
        kind = choice.tensor.rpartition(":")[2]
        if kind == "act":
            if choice.fmt is None:
                return 0.0
            (k,) = self._vector(choice, shape, "input channels (K,)")
            return self.tokens * k * 2 * choice.bits / 8 / self.bandwidth + self.launch
        if kind == "kv":
            if not self.context:
                return 0.0
            (w,) = self._vector(choice, shape, "K and V elements per token (W,)")
            bits = 8 * self.act_bytes if choice.fmt is None else choice.bits  # a float cache is fp16
            return self.tokens * self.context * w * bits / 8 / self.bandwidth
        if not choice.numel:
            return 0.0
        if shape is None or len(shape) != 2:
            raise ValueError(f"BandwidthModel: {choice.tensor} needs its weight's [N, K] shape, got {shape!r}")
        n, k = shape
        moved = choice.bytes + self.tokens * (k + n) * self.act_bytes
        launches = 1
        if choice.outliers:
            moved += self.tokens * (2 * k + n) * self.act_bytes
            launches = 2
        return moved / self.bandwidth + launches * self.launch

    @staticmethod
    def _vector(choice: Any, shape: tuple[int, ...] | None, what: str) -> tuple[int]:
        if shape is None or len(shape) != 1:
            raise ValueError(f"BandwidthModel: {choice.tensor} needs its {what}, got {shape!r}")
        return shape

    def describe(self) -> str:
        return (f"bandwidth model (an estimate, not measured): {self.bandwidth / 1e12:g} TB/s, "
                f"{self.launch * 1e6:g} µs per launch, {self.tokens} token(s) per call"
                + (f", {self.context} cached tokens read per step" if self.context else ""))

    def to_dict(self) -> dict:
        return {"model": "bandwidth", "measured": False, "bandwidth": self.bandwidth, "launch": self.launch,
                "tokens": self.tokens, "act_bytes": self.act_bytes, "context": self.context}
