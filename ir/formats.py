"""Number formats and packed layouts: the slots of `TensorType` for quantized storage.

A value whose dtype is a number format holds quantized data: `int4<sym,g128>` is 4-bit
symmetric integers with one scale per group of 128 along the reduction axis. A layout says
how such a tensor lies in memory. Both are frozen, hashable and print to text that
`parse_format` / `parse_layout` read back:

    >>> str(IntFormat(4, True, Scaling("group", 128)))
    'int4<sym,g128>'
    >>> parse_format("fp8e4m3<channel>")
    FloatFormat(name='fp8e4m3', scaling=Scaling(kind='channel', size=None))
    >>> str(Layout(bits=3, axis=1))
    'packed<bits=3,word=i32,axis=1>'

The numerics of each format (value grid, quantize/dequantize) are filled in by the format
algebra; this module fixes their identity and text form.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from . import quant as Q

SCALING_KINDS = ("tensor", "channel", "group", "token", "block")
FLOAT_ELEMENTS = {"fp8e4m3": 8, "fp8e5m2": 8, "fp6e3m2": 6, "fp6e2m3": 6, "fp4e2m1": 4}
SCALE_DTYPES = {"f32": 32, "f16": 16, "e8m0": 8, "fp8e4m3": 8}
#: The scale dtype a scaling kind has unless the text says otherwise.
DEFAULT_SCALE = {"tensor": "f32", "channel": "f16", "group": "f16", "token": "f32", "block": "e8m0"}
#: Names users may type for common formats, and the format each stands for.
ALIASES = {
    "mxfp8": "fp8e4m3<block32>",
    "mxfp6": "fp6e2m3<block32>",
    "mxfp6e3m2": "fp6e3m2<block32>",
    "mxfp6e2m3": "fp6e2m3<block32>",
    "mxfp4": "fp4e2m1<block32>",
    "nvfp4": "fp4e2m1<block16,scale=fp8e4m3,global>",
}


@dataclass(frozen=True, slots=True)
class Scaling:
    """Where scales live: per `tensor`, `channel` (row of a weight), `token` (row of an
    activation, computed at run time), `group` of `size` elements along the reduction
    axis, or microscaling `block` of `size` elements; and the dtype scales are stored in
    (`scale`: f32, f16, e8m0 or fp8e4m3; default by kind, see `DEFAULT_SCALE`)."""

    kind: str
    size: int | None = None
    scale: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SCALING_KINDS:
            raise ValueError(f"unknown scaling {self.kind!r}; expected one of {', '.join(SCALING_KINDS)}")
        if (self.kind in ("group", "block")) != (self.size is not None):
            raise ValueError(f"scaling {self.kind!r} {'needs' if self.size is None else 'takes no'} size")
        if self.size is not None and self.size < 1:
            raise ValueError(f"scaling size must be positive, got {self.size}")
        if not self.scale:
            object.__setattr__(self, "scale", DEFAULT_SCALE[self.kind])
        if self.scale not in SCALE_DTYPES:
            raise ValueError(f"unknown scale dtype {self.scale!r}; expected one of {', '.join(SCALE_DTYPES)}")

    def __str__(self) -> str:
        text = {"group": f"g{self.size}", "block": f"block{self.size}"}.get(self.kind, self.kind)
        return text if self.scale == DEFAULT_SCALE[self.kind] else f"{text},scale={self.scale}"

    @staticmethod
    def parse(text: str, scale: str = "") -> "Scaling":
        if m := re.fullmatch(r"g(\d+)", text):
            return Scaling("group", int(m[1]), scale)
        if m := re.fullmatch(r"block(\d+)", text):
            return Scaling("block", int(m[1]), scale)
        return Scaling(text, None, scale)

    def block(self, k: int) -> int | None:
        """How many elements along the reduction axis share a scale (None: the whole tensor)."""
        return None if self.kind == "tensor" else k if self.kind in ("channel", "token") else self.size


@dataclass(frozen=True, slots=True)
class QTensor:
    """A quantized tensor: `codes` (grid values as float32, same shape as the source),
    `scale` per block ([..., n_blocks], or [1] per tensor), `zero` point codes for
    asymmetric integers, and `global_scale` (a float32 scalar) for two-level formats."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None


class _Format:
    """What every number format does; subclasses give `_scale_of` and `_codes`."""

    __slots__ = ()

    def effective_bits(self, k: int | None = None) -> float:
        """Bits per element including scales (and zero points; the global scale's share is
        neglected) for a reduction axis of length `k` (needed for per-channel scaling; a K
        that is not a multiple of the block has a shorter last block with its own scale).
        Without `k`, the nominal figure for whole blocks."""
        sc = self.scaling  # type: ignore[attr-defined]
        block = sc.block(k) if k is not None else sc.size
        if sc.kind in ("tensor", "token") or block is None:
            return float(self.bits)  # type: ignore[attr-defined]
        extra = SCALE_DTYPES[sc.scale] + (self.bits if not getattr(self, "symmetric", True) else 0)  # type: ignore[attr-defined]
        if k is None:
            return self.bits + extra / block  # type: ignore[attr-defined]
        return self.bits + extra * math.ceil(k / block) / k  # type: ignore[attr-defined]  # a shorter last block has a scale too

    def encode(
        self,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None = None,
        global_scale: torch.Tensor | None = None,
    ) -> QTensor:
        """`x` rounded onto the grid of given scales (as `quantize` lays them out; static
        activation scales from calibration): the same float32 operations as `quantize`."""
        xb = self._blocked(x)
        full = (scale * (global_scale if global_scale is not None else 1.0)).float()[..., None]
        if isinstance(self, IntFormat):
            if zero is None:
                codes = Q.round_int(xb / full, self.bits, True)
            else:
                codes = Q.round_int(xb / full + zero.float()[..., None], self.bits, False)
        else:
            codes = Q.round_float(xb / full, self.spec)  # type: ignore[attr-defined]
        return QTensor(self._unblocked(codes, x.shape), scale, zero, global_scale)

    def fake(self, x: torch.Tensor, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
        """`dequantize(quantize(x))`: `x` as the format represents it, in float32."""
        return self.dequantize(self.quantize(x, clip), x.shape[-1])

    def _blocked(self, x: torch.Tensor, fill: float = math.nan) -> torch.Tensor:
        """`x` as [..., n_blocks, block] along the last axis (one block for per-tensor); a
        shorter last block padded with `fill` (NaN: statistics skip it; dequantize pads codes
        with 0, so that its product is differentiable in the scale: no 0·NaN in the gradient)."""
        x = x.float()
        block = self.scaling.block(x.shape[-1])  # type: ignore[attr-defined]
        if block is None:
            return x.reshape(1, -1)[:, None, :]
        return Q.blocks(x, block, fill)

    def _unblocked(self, y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if self.scaling.block(shape[-1]) is None:  # type: ignore[attr-defined]
            return y.reshape(shape)
        return Q.unblocks(y, shape[-1])

    def _store_scale(self, s: torch.Tensor) -> torch.Tensor:
        """Scales rounded to the dtype they are stored in (exactly as a kernel reads them)."""
        kind = self.scaling.scale  # type: ignore[attr-defined]
        if kind == "f16":
            s = s.clamp(max=65504.0).half().float()
        elif kind == "e8m0":
            s = Q.e8m0(s)
        elif kind == "fp8e4m3":
            s = Q.round_float(s, Q.FLOAT_SPECS["fp8e4m3"])
        return torch.where(s > 0, s, torch.ones_like(s))  # an all-zero block keeps scale 1


@dataclass(frozen=True, slots=True)
class IntFormat(_Format):
    """`bits`-bit integers, symmetric (codes in [-2^(b-1), 2^(b-1)-1], scale = amax /
    (2^(b-1)-1)) or asymmetric (codes in [0, 2^b-1] with a zero point, the range always
    containing 0), with `scaling`."""

    bits: int
    symmetric: bool
    scaling: Scaling

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"integer format bits must be in 1..8, got {self.bits}")
        if self.symmetric and self.bits < 2:
            raise ValueError("a symmetric integer format needs at least 2 bits")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def __str__(self) -> str:
        return f"{self.name}<{'sym' if self.symmetric else 'asym'},{self.scaling}>"

    def grid(self) -> torch.Tensor:
        """Every code, ascending, as float32."""
        lo, hi = Q.int_range(self.bits, self.symmetric)
        return torch.arange(lo, hi + 1, dtype=torch.float32)

    def quantize(self, x: torch.Tensor, clip: float | torch.Tensor = 1.0) -> QTensor:
        """Codes, scales (and zero points) of `x` along its last axis; `clip` (<= 1) shrinks
        the range before rounding (per block when a tensor [..., n_blocks])."""
        xb = self._blocked(x)
        if self.symmetric:
            amax = Q.nan_amax(xb) * clip
            scale = self._store_scale(amax / Q.int_range(self.bits, True)[1])
            codes = Q.round_int(xb / scale[..., None], self.bits, True)
            return QTensor(self._unblocked(codes, x.shape), scale)
        lo = torch.clamp(Q.nan_min(xb) * clip, max=0.0)
        hi = torch.clamp(Q.nan_max(xb) * clip, min=0.0)
        qmax = 2**self.bits - 1
        scale = self._store_scale((hi - lo) / qmax)
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
        codes = Q.round_int(xb / scale[..., None] + zero[..., None], self.bits, False)
        return QTensor(self._unblocked(codes, x.shape), scale, zero)

    def dequantize(self, q: QTensor, k: int | None = None) -> torch.Tensor:
        """Float32 values of `q` (`k`: the source's last dim, when blocks padded it)."""
        shape = q.codes.shape
        cb = self._blocked(q.codes, 0.0)
        if q.zero is not None:
            cb = cb - q.zero[..., None]
        return self._unblocked(cb * q.scale[..., None], shape)


@dataclass(frozen=True, slots=True)
class FloatFormat(_Format):
    """A small float element format (`fp8e4m3`, `fp4e2m1`, ...) with `scaling`; `global_`
    adds a float32 per-tensor scale above the block scales (nvfp4)."""

    name: str
    scaling: Scaling
    global_: bool = False

    def __post_init__(self) -> None:
        if self.name not in FLOAT_ELEMENTS:
            raise ValueError(f"unknown float format {self.name!r}; expected one of {', '.join(FLOAT_ELEMENTS)}")

    @property
    def bits(self) -> int:
        return FLOAT_ELEMENTS[self.name]

    @property
    def spec(self) -> Q.FloatSpec:
        return Q.FLOAT_SPECS[self.name]

    def __str__(self) -> str:
        return f"{self.name}<{self.scaling}{',global' if self.global_ else ''}>"

    def grid(self) -> torch.Tensor:
        """Every finite value, ascending, as float32 (±0 once)."""
        pos = self.spec.grid()
        return torch.cat([-pos.flip(0)[:-1], pos])

    def quantize(self, x: torch.Tensor, clip: float | torch.Tensor = 1.0) -> QTensor:
        xb = self._blocked(x)
        emax = self.spec.max
        glob = None
        if self.global_:  # from the unclipped tensor: `clip` shrinks the block scales only
            glob = (Q.nan_amax(xb.reshape(-1)) / (emax * SCALE_MAX[self.scaling.scale])).reshape(1)
            glob = torch.where(glob > 0, glob, torch.ones_like(glob))
        amax = Q.nan_amax(xb) * clip / (glob if glob is not None else 1.0)
        if self.scaling.scale == "e8m0":
            # OCP MX: the shared exponent puts the block's largest value in the top binade.
            raw = amax / 2.0 ** math.floor(math.log2(emax))
        else:
            raw = amax / emax
        scale = self._store_scale(raw)
        full = scale * (glob if glob is not None else 1.0)
        codes = Q.round_float(xb / full[..., None], self.spec)
        return QTensor(self._unblocked(codes, x.shape), scale, None, glob)

    def dequantize(self, q: QTensor, k: int | None = None) -> torch.Tensor:
        shape = q.codes.shape
        full = q.scale * (q.global_scale if q.global_scale is not None else 1.0)
        return self._unblocked(self._blocked(q.codes, 0.0) * full[..., None], shape)


#: The largest value of each scale dtype (bounds the global scale of two-level formats).
SCALE_MAX = {"f32": 3.0e38, "f16": 65504.0, "e8m0": 2.0**127, "fp8e4m3": 448.0}

NumberFormat = IntFormat | FloatFormat

_FORMAT_RE = re.compile(r"([a-z0-9]+)<([^<>]*)>")


def is_format_text(text: str) -> bool:
    """Whether `text` starts like a number format (`name<...>`) or is a format alias."""
    if text.strip() in ALIASES:
        return True
    return _FORMAT_RE.match(text) is not None and text.split("<", 1)[0] != "packed"


def parse_format(text: str) -> NumberFormat:
    """Read a number format from its text form or an alias (`mxfp4`, `nvfp4`); errors name
    the text and the valid forms."""
    text = ALIASES.get(text.strip(), text.strip())
    m = _FORMAT_RE.fullmatch(text)
    if m is None:
        raise ValueError(
            f"malformed number format {text!r}; expected NAME<options>, e.g. int4<sym,g128>, "
            f"or one of {', '.join(ALIASES)}"
        )
    name, opts = m[1], [o.strip() for o in m[2].split(",") if o.strip()]
    scale = next((o.split("=", 1)[1] for o in opts if o.startswith("scale=")), "")
    glob = "global" in opts
    opts = [o for o in opts if not o.startswith("scale=") and o != "global"]
    if im := re.fullmatch(r"int(\d)", name):
        if len(opts) != 2 or opts[0] not in ("sym", "asym") or glob:
            raise ValueError(f"malformed integer format {text!r}; expected intN<sym|asym,SCALING[,scale=DTYPE]>")
        return IntFormat(int(im[1]), opts[0] == "sym", Scaling.parse(opts[1], scale))
    if name in FLOAT_ELEMENTS:
        if len(opts) != 1:
            raise ValueError(f"malformed float format {text!r}; expected {name}<SCALING[,scale=DTYPE][,global]>")
        return FloatFormat(name, Scaling.parse(opts[0], scale), glob)
    raise ValueError(
        f"unknown number format {name!r} in {text!r}; expected int1..int8, one of "
        f"{', '.join(FLOAT_ELEMENTS)}, or an alias: {', '.join(ALIASES)}"
    )


@dataclass(frozen=True, slots=True)
class Layout:
    """How a quantized tensor is packed: `bits` per element into `word`s along `axis`,
    with an element `order` inside each word (interleaving) and a `tile` order; empty
    tuples mean the natural order."""

    bits: int
    axis: int
    word: str = "i32"
    order: tuple[int, ...] = ()
    tile: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"layout bits must be in 1..8, got {self.bits}")
        if self.order and sorted(self.order) != list(range(len(self.order))):
            raise ValueError(f"layout order must be a permutation, got {list(self.order)}")

    def __str__(self) -> str:
        parts = [f"bits={self.bits}", f"word={self.word}", f"axis={self.axis}"]
        if self.order:
            parts.append("order=[" + ",".join(map(str, self.order)) + "]")
        if self.tile:
            parts.append("tile=[" + ",".join(map(str, self.tile)) + "]")
        return "packed<" + ",".join(parts) + ">"


def parse_layout(text: str) -> Layout:
    """Read a layout from its text form `packed<bits=..,word=..,axis=..[,order=[..]][,tile=[..]]>`."""
    m = re.fullmatch(r"packed<(.*)>", text.strip())
    if m is None:
        raise ValueError(f"malformed layout {text!r}; expected packed<bits=N,word=i32,axis=A,...>")
    field_re = r"\s*(\w+)=(\[[^\]]*\]|[^,]+)"
    if not re.fullmatch(rf"{field_re}(,{field_re})*", m[1]):
        raise ValueError(f"malformed layout {text!r}; expected packed<bits=N,word=i32,axis=A,...>")
    fields: dict[str, object] = {}
    try:
        for key, val in re.findall(field_re, m[1]):
            if val.startswith("["):
                fields[key] = tuple(int(v) for v in val[1:-1].split(",") if v.strip())
            elif key == "word":
                fields[key] = val
            else:
                fields[key] = int(val)
        return Layout(**fields)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise ValueError(f"malformed layout {text!r}: {e}") from None
