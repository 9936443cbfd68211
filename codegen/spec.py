"""Kernel specs: what one generated kernel computes, as a frozen, hashable value.

A spec names the kernel `family` (the template that generates it) and everything the
template specialises on: static dims (the batch-like M stays symbolic: one spec serves every
M), number formats and packed layouts by operand role, plain dtypes by role, the fused
epilogue, and one tile configuration per M class. It is built from plain values, no graph:

    spec = KernelSpec.dequant_gemm(n=96, k=200, weight="int4<sym,g32>", x_dtype="f16",
                                   epilogue=("bias", "silu"))
    spec.dim("k"), spec.fmt("weight")            # 200, IntFormat(bits=4, ...)
    KernelSpec.from_json(spec.to_json()) == spec  # True
    spec.key()                                    # sha256 of the canonical JSON: keys the kernel cache

Role-keyed fields are tuples of (name, value) pairs sorted by name (dicts are accepted and
normalised), so two specs built in any order are equal and hash alike.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any, Mapping

from ..ir import DType, FloatFormat, IntFormat, Layout, NumberFormat, parse_format, parse_layout

#: Kernel families and what each computes (a family is one template in `mxc.codegen.templates`).
FAMILIES = {
    "dequant_gemm": "y[M, N] = x[M, K] @ dequant(W)[N, K]^T + epilogue (weight-only quantization)",
    "qgemm": "int8 / fp8 GEMM with per-token activation scales",
    "norm_quant": "fused RMSNorm / LayerNorm + activation quantize",
    "rope_kv": "fused rotary embedding + KV-cache quantize",
    "attention": "attention over a quantized KV cache",
}
#: Epilogue steps, applied in the order a spec lists them, on the float32 accumulator.
EPILOGUE_STEPS = {
    "bias": "+ bias[N]",
    "silu": "x * sigmoid(x)",
    "gelu": "0.5 x (1 + erf(x / sqrt 2))",
    "gelu_tanh": "0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))",
    "residual": "+ residual[M, N]",
    "mul": "* multiplier[M, N] (elementwise: SwiGLU's up projection times silu(gate))",
}
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
#: M classes: a tile configuration serves M up to its `max_m` (None: any M). Small M is
#: GEMV-like decoding and splits K across programs to fill the GPU.
M_CLASSES = {"small": 16, "large": None}
#: Version of the JSON form; bump when a field changes meaning.
SCHEMA = 1


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclass(frozen=True, slots=True)
class Tiles:
    """One tile configuration: used for M <= `max_m` (None: any M). `block_m/n/k` are the
    program tile (powers of two, >= 16: `tl.dot`'s minimum on NVIDIA GPUs), `split_k` the
    number of programs that share the K axis (partial sums reduced by a second kernel),
    `num_warps` and `num_stages` the launch options."""

    max_m: int | None
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or not _pow2(v) or v < 16:
                raise ValueError(f"Tiles.{name} must be a power of two >= 16 (tl.dot's minimum), got {v!r}")
        if not isinstance(self.split_k, int) or self.split_k < 1:
            raise ValueError(f"Tiles.split_k must be a positive integer, got {self.split_k!r}")
        if not isinstance(self.num_warps, int) or not _pow2(self.num_warps) or self.num_warps > 32:
            raise ValueError(f"Tiles.num_warps must be a power of two in 1..32, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"Tiles.num_stages must be a positive integer, got {self.num_stages!r}")
        if self.max_m is not None and (not isinstance(self.max_m, int) or self.max_m < 1):
            raise ValueError(f"Tiles.max_m must be a positive integer or None (any M), got {self.max_m!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _pairs(value: Any, what: str, convert) -> tuple[tuple[str, Any], ...]:
    """A role-keyed field as sorted (name, value) pairs; `convert` parses text values."""
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = [(str(k), convert(v)) for k, v in items]
    except (TypeError, ValueError) as e:
        raise ValueError(f"KernelSpec.{what}: expected name -> value pairs, got {value!r}: {e}") from None
    names = [k for k, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"KernelSpec.{what}: duplicate names in {names}")
    return tuple(sorted(pairs))


def _dim(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"a static dim must be a positive integer, got {v!r}")
    return v


def _fmt(v: Any) -> NumberFormat:
    return parse_format(v) if isinstance(v, str) else v


def _layout(v: Any) -> Layout:
    return parse_layout(v) if isinstance(v, str) else v


def _scalar(v: Any) -> Any:
    """An option value: a JSON scalar, or a tuple of them (lists become tuples, to hash)."""
    if isinstance(v, (list, tuple)):
        return tuple(_scalar(x) for x in v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ValueError(f"an option must be a bool, int, float, str or a list of them, got {v!r}")


def _dtype(v: Any) -> str:
    return DType.parse(str(v)).name


@dataclass(frozen=True, slots=True)
class KernelSpec:
    """What one kernel computes: `family`, static `dims` (M is symbolic and not listed),
    `formats` and `layouts` of quantized operands by role, plain `dtypes` by role (IR
    names: f16, f32), the `epilogue` steps in order, and `tiles` by M class (ascending
    `max_m`, the last for any M). Frozen and hashable; `key()` keys the kernel cache."""

    family: str
    dims: tuple[tuple[str, int], ...]
    formats: tuple[tuple[str, NumberFormat], ...]
    layouts: tuple[tuple[str, Layout], ...]
    dtypes: tuple[tuple[str, str], ...]
    epilogue: tuple[str, ...] = ()
    tiles: tuple[Tiles, ...] = ()
    #: Family-specific scalars by name (JSON bool / int / float / str): a norm's kind and
    #: eps, channel slice bounds, ... Sorted pairs like the role-keyed fields.
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown kernel family {self.family!r}; expected one of {', '.join(FAMILIES)}")
        set_ = object.__setattr__
        set_(self, "dims", _pairs(self.dims, "dims", _dim))
        set_(self, "formats", _pairs(self.formats, "formats", _fmt))
        set_(self, "layouts", _pairs(self.layouts, "layouts", _layout))
        set_(self, "dtypes", _pairs(self.dtypes, "dtypes", _dtype))
        set_(self, "epilogue", tuple(self.epilogue))
        set_(self, "options", _pairs(self.options, "options", _scalar))
        set_(self, "tiles", tuple(Tiles(**t) if isinstance(t, Mapping) else t for t in self.tiles))
        for role, f in self.formats:
            if not isinstance(f, (IntFormat, FloatFormat)):
                raise ValueError(f"KernelSpec.formats[{role!r}] must be a number format, got {f!r}")
        for role, lay in self.layouts:
            if not isinstance(lay, Layout):
                raise ValueError(f"KernelSpec.layouts[{role!r}] must be a Layout, got {lay!r}")
        for step in self.epilogue:
            if step not in EPILOGUE_STEPS:
                raise ValueError(f"unknown epilogue step {step!r}; expected some of {', '.join(EPILOGUE_STEPS)}")
        if len(set(self.epilogue)) != len(self.epilogue):
            raise ValueError(f"epilogue steps must not repeat, got {list(self.epilogue)}")
        if sum(s in ACTIVATIONS for s in self.epilogue) > 1:
            raise ValueError(f"an epilogue has at most one activation, got {list(self.epilogue)}")
        if not self.tiles:
            raise ValueError("KernelSpec.tiles: at least one tile configuration is needed (see choose_tiles)")
        bounds = [t.max_m for t in self.tiles]
        if bounds[-1] is not None or None in bounds[:-1] or bounds[:-1] != sorted(set(bounds[:-1])):
            raise ValueError(
                f"KernelSpec.tiles: max_m must ascend strictly and only the last configuration may be for any M "
                f"(max_m None), got {bounds}"
            )

    # ------------------------------------------------------------------ lookups

    def dim(self, name: str) -> int:
        """The static dim `name` (e.g. "n", "k"); KeyError names the dims the spec has."""
        return self._get(self.dims, name, "dim")

    def fmt(self, role: str) -> NumberFormat:
        """The number format of operand `role` (e.g. "weight")."""
        return self._get(self.formats, role, "format")

    def layout(self, role: str) -> Layout:
        """The packed layout of operand `role`."""
        return self._get(self.layouts, role, "layout")

    def dtype(self, role: str) -> str:
        """The plain dtype name of operand `role` (e.g. "x", "out")."""
        return self._get(self.dtypes, role, "dtype")

    def _get(self, pairs: tuple, name: str, what: str) -> Any:
        for k, v in pairs:
            if k == name:
                return v
        raise KeyError(f"{self.family} spec has no {what} {name!r}; it has {[k for k, _ in pairs]}")

    def option(self, name: str, default: Any = None) -> Any:
        """The option `name`, or `default` when the spec does not set it."""
        return next((v for k, v in self.options if k == name), default)

    def tiles_for(self, m: int) -> Tiles:
        """The tile configuration for a run with `m` rows: the first whose max_m >= m."""
        return next(t for t in self.tiles if t.max_m is None or m <= t.max_m)

    # ------------------------------------------------------------------ text and hash

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON values (formats and layouts as their IR text)."""
        return {
            "schema": SCHEMA,
            "family": self.family,
            "dims": dict(self.dims),
            "formats": {k: str(v) for k, v in self.formats},
            "layouts": {k: str(v) for k, v in self.layouts},
            "dtypes": dict(self.dtypes),
            "epilogue": list(self.epilogue),
            "tiles": [t.to_dict() for t in self.tiles],
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in self.options},
        }

    def to_json(self) -> str:
        """The canonical JSON text: sorted keys, no whitespace; `from_json` reads it back."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> "KernelSpec":
        """The spec `to_json` wrote; errors name what is missing or malformed."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"kernel spec: malformed JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"kernel spec: expected a JSON object, got {type(d).__name__}")
        if d.get("schema") != SCHEMA:
            raise ValueError(f"kernel spec: schema {d.get('schema')!r} is not the supported {SCHEMA}")
        missing = [k for k in ("family", "dims", "formats", "layouts", "dtypes", "epilogue", "tiles") if k not in d]
        if missing:
            raise ValueError(f"kernel spec: missing fields {missing}")
        try:
            tiles = tuple(Tiles(**t) for t in d["tiles"])
        except TypeError as e:
            raise ValueError(f"kernel spec: malformed tiles {d['tiles']!r}: {e}") from None
        return KernelSpec(d["family"], d["dims"], d["formats"], d["layouts"], d["dtypes"], tuple(d["epilogue"]), tiles,
                          d.get("options", {}))

    def key(self) -> str:
        """sha256 (hex) of the canonical JSON text."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def __str__(self) -> str:
        dims = ",".join(f"{k}={v}" for k, v in self.dims)
        fmts = ",".join(f"{k}={v}" for k, v in self.formats)
        epi = f" +{'+'.join(self.epilogue)}" if self.epilogue else ""
        opts = "".join(f" {k}={v}" for k, v in self.options)
        return f"{self.family}[{dims} {fmts}{epi}{opts}]"

    # ------------------------------------------------------------------ constructors

    @staticmethod
    def dequant_gemm(
        n: int,
        k: int,
        weight: NumberFormat | str,
        *,
        x_dtype: str = "f16",
        out_dtype: str | None = None,
        epilogue: tuple[str, ...] = (),
        layout: Layout | str | None = None,
        tiles: tuple[Tiles, ...] | None = None,
    ) -> "KernelSpec":
        """The spec of `y[M, n] = x[M, k] @ dequant(W)[n, k]^T` (+ `epilogue`): W in format
        `weight`, packed along K with `layout` (default: the layout pass's natural
        `packed<bits=B,word=i32,axis=1>`), x of `x_dtype`, y of `out_dtype` (default
        x's), tiles per M class from `choose_tiles` unless given."""
        fmt = _fmt(weight)
        formats = {"weight": fmt}
        dims = {"n": n, "k": k}
        if tiles is None:
            tiles = tuple(choose_tiles("dequant_gemm", dims, formats, m) for m in M_CLASSES)
        return KernelSpec(
            "dequant_gemm", dims, formats,
            {"weight": _layout(layout) if layout is not None else Layout(bits=fmt.bits, axis=1)},
            {"x": x_dtype, "out": out_dtype or x_dtype}, tuple(epilogue), tiles,
        )


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def choose_tiles(family: str, dims: Mapping[str, int], formats: Mapping[str, NumberFormat], m_class: str) -> Tiles:
    """The tile configuration of a `family` kernel with static `dims` and operand `formats`
    for M class `m_class` ("small": M <= 16, GEMV-like; "large": any M).

    GEMM families (dequant_gemm): BLOCK_K divides the weight's scale group when the group is
    a multiple of 16, so each K tile has one scale per row and scales multiply the partial
    dot product (see the template); small M takes a 16-row tile and splits K over up to 16
    programs until ~128 programs run (an H100 has 132 SMs), with no split left empty."""
    if m_class not in M_CLASSES:
        raise ValueError(f"unknown M class {m_class!r}; expected one of {', '.join(M_CLASSES)}")
    if family not in ("dequant_gemm", "qgemm"):
        raise ValueError(f"no tile rule for kernel family {family!r} yet")
    n, k = dims["n"], dims["k"]
    small = m_class == "small"
    cap = 128 if small else 64
    bk = min(cap, max(16, _next_pow2(k)))
    block = formats["weight"].scaling.block(k)
    if block is not None and block < k and block % 16 == 0:
        while block % bk:  # the largest power of two <= cap dividing the group
            bk //= 2
    bn = min(64, max(16, _next_pow2(n)))
    if not small:
        return Tiles(max_m=None, block_m=64, block_n=bn, block_k=bk, split_k=1, num_warps=4, num_stages=3)
    k_tiles = -(-k // bk)
    split = max(1, min(k_tiles, 16, 128 // -(-n // bn)))
    split = -(-k_tiles // -(-k_tiles // split))  # no empty split: every split gets >= 1 tile
    return Tiles(max_m=M_CLASSES["small"], block_m=16, block_n=bn, block_k=bk, split_k=split, num_warps=4, num_stages=2)
