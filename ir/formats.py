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

import re
from dataclasses import dataclass

SCALING_KINDS = ("tensor", "channel", "group", "token", "block")
FLOAT_ELEMENTS = {"fp8e4m3": 8, "fp8e5m2": 8, "fp6e3m2": 6, "fp6e2m3": 6, "fp4e2m1": 4}


@dataclass(frozen=True, slots=True)
class Scaling:
    """Where scales live: per `tensor`, `channel`, `token` (dynamic), `group` of `size`
    elements along the reduction axis, or microscaling `block` of `size` elements."""

    kind: str
    size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCALING_KINDS:
            raise ValueError(f"unknown scaling {self.kind!r}; expected one of {', '.join(SCALING_KINDS)}")
        if (self.kind in ("group", "block")) != (self.size is not None):
            raise ValueError(f"scaling {self.kind!r} {'needs' if self.size is None else 'takes no'} size")
        if self.size is not None and self.size < 1:
            raise ValueError(f"scaling size must be positive, got {self.size}")

    def __str__(self) -> str:
        if self.kind == "group":
            return f"g{self.size}"
        if self.kind == "block":
            return f"block{self.size}"
        return self.kind

    @staticmethod
    def parse(text: str) -> "Scaling":
        if m := re.fullmatch(r"g(\d+)", text):
            return Scaling("group", int(m[1]))
        if m := re.fullmatch(r"block(\d+)", text):
            return Scaling("block", int(m[1]))
        return Scaling(text)


@dataclass(frozen=True, slots=True)
class IntFormat:
    """`bits`-bit integers, symmetric (no zero point) or asymmetric, with `scaling`."""

    bits: int
    symmetric: bool
    scaling: Scaling

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"integer format bits must be in 1..8, got {self.bits}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def __str__(self) -> str:
        return f"{self.name}<{'sym' if self.symmetric else 'asym'},{self.scaling}>"


@dataclass(frozen=True, slots=True)
class FloatFormat:
    """A small float element format (`fp8e4m3`, `fp4e2m1`, ...) with `scaling`."""

    name: str
    scaling: Scaling

    def __post_init__(self) -> None:
        if self.name not in FLOAT_ELEMENTS:
            raise ValueError(f"unknown float format {self.name!r}; expected one of {', '.join(FLOAT_ELEMENTS)}")

    @property
    def bits(self) -> int:
        return FLOAT_ELEMENTS[self.name]

    def __str__(self) -> str:
        return f"{self.name}<{self.scaling}>"


NumberFormat = IntFormat | FloatFormat

_FORMAT_RE = re.compile(r"([a-z0-9]+)<([^<>]*)>")


def is_format_text(text: str) -> bool:
    """Whether `text` starts like a number format (`name<...>`)."""
    return _FORMAT_RE.match(text) is not None and text.split("<", 1)[0] != "packed"


def parse_format(text: str) -> NumberFormat:
    """Read a number format from its text form; errors name the text and the valid forms."""
    m = _FORMAT_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"malformed number format {text!r}; expected NAME<options>, e.g. int4<sym,g128>")
    name, opts = m[1], [o.strip() for o in m[2].split(",") if o.strip()]
    if im := re.fullmatch(r"int(\d)", name):
        if len(opts) != 2 or opts[0] not in ("sym", "asym"):
            raise ValueError(f"malformed integer format {text!r}; expected intN<sym|asym,SCALING>")
        return IntFormat(int(im[1]), opts[0] == "sym", Scaling.parse(opts[1]))
    if name in FLOAT_ELEMENTS:
        if len(opts) != 1:
            raise ValueError(f"malformed float format {text!r}; expected {name}<SCALING>")
        return FloatFormat(name, Scaling.parse(opts[0]))
    raise ValueError(
        f"unknown number format {name!r} in {text!r}; expected int1..int8 or one of {', '.join(FLOAT_ELEMENTS)}"
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
