"""Tensor types with symbolic shapes.

A dim is a non-negative int or a sympy expression over named size symbols (`b`, `s`, ...).
Every symbol is made by `sym(name)`, so the same name is the same symbol everywhere.

    >>> t = TensorType((sym("b"), sym("s"), 576), F32)
    >>> str(t)
    'f32[b, s, 576]'
    >>> parse_type("int4<sym,g128>[576, 576] packed<bits=4,word=i32,axis=1>").dtype.bits
    4
"""

from __future__ import annotations

import functools
import re
import tokenize
from dataclasses import dataclass
from typing import Union

import sympy

from .dtypes import DType, DTYPES
from .formats import Layout, NumberFormat, is_format_text, parse_format, parse_layout

Dim = Union[int, sympy.Expr]

# Names sympy functions keep when shape expressions are printed and parsed back.
_FUNCTIONS = {"floor": sympy.floor, "ceiling": sympy.ceiling, "Max": sympy.Max, "Min": sympy.Min, "Mod": sympy.Mod}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_EXPR_CHARS = re.compile(r"[A-Za-z0-9_\s+\-*/(),]*")


def sym(name: str) -> sympy.Symbol:
    """The size symbol `name` (a positive integer)."""
    return sympy.Symbol(name, integer=True, positive=True)


def norm_dim(d: object) -> Dim:
    """A dim as the IR keeps it: a python int when constant, else a sympy expression."""
    if isinstance(d, bool):
        raise TypeError(f"a dim must be an int or a sympy expression, got bool {d}")
    if isinstance(d, int):
        return d
    if isinstance(d, sympy.Expr):
        if d.is_number and not d.is_Integer:
            raise TypeError(f"a dim must be an integer, got {d}")
        return int(d) if d.is_Integer else _canonical(d)
    raise TypeError(f"a dim must be an int or a sympy expression, got {type(d).__name__} {d!r}")


@functools.lru_cache(maxsize=8192)
def _canonical(d: sympy.Expr) -> sympy.Expr:
    """`d` in the form its printed text parses back to (`2*(b + 1)` reads back as `2*b + 2`),
    so that printing a type and parsing it again gives the same type and the same text."""
    for _ in range(4):
        try:
            back = _sympy_parse(str(d))
        except (SyntaxError, TypeError, ValueError, tokenize.TokenError, sympy.SympifyError):
            return d
        if back == d or not isinstance(back, sympy.Expr):
            return d
        d = back
    return d


def _sympy_parse(text: str) -> sympy.Basic:
    if not _EXPR_CHARS.fullmatch(text) or "__" in text:
        # sympy.parse_expr evaluates Python: admit only names, integers, + - * / ( ) and commas.
        raise ValueError(f"{text!r} is not a shape expression")
    names = {n: sym(n) for n in _IDENT.findall(text) if n not in _FUNCTIONS}
    return sympy.sympify(sympy.parse_expr(text, local_dict={**names, **_FUNCTIONS}, evaluate=True))


def dim_str(d: Dim) -> str:
    return str(d)


def parse_expr(text: str) -> Dim:
    """Read a dim expression (`s`, `2*s + 1`, `floor(s/2)`); every identifier is a size symbol."""
    expected = f"expected an integer expression of size symbols with + - * / and {', '.join(_FUNCTIONS)}"
    if not _EXPR_CHARS.fullmatch(text) or "__" in text:
        raise ValueError(f"malformed dim expression {text!r}; {expected}")
    try:
        return norm_dim(_sympy_parse(text))
    except (SyntaxError, TypeError, tokenize.TokenError, sympy.SympifyError) as e:
        raise ValueError(f"malformed dim expression {text!r} ({e}); {expected}") from None


def dims_equal(a: Dim, b: Dim, ranges: dict[sympy.Symbol, tuple[int, int | None]] | None = None) -> bool:
    """Whether two dims are provably the same size, for sizes of the symbols within `ranges`
    (symbol -> (lo, hi or None)) when given: `Min(512, s)` equals `s` when s <= 512."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    diff = sympy.simplify(sympy.sympify(a) - sympy.sympify(b))
    if diff == 0:
        return True
    if ranges and diff.has(sympy.Min, sympy.Max):
        return sympy.simplify(refine(diff, ranges)) == 0
    return False


def _sign(expr: sympy.Expr, ranges: dict[sympy.Symbol, tuple[int, int | None]]) -> int | None:
    """+1 / -1 / 0 if `expr`, affine in each symbol, has that sign over the whole box of ranges."""
    free = sorted(expr.free_symbols, key=str)
    if any(s not in ranges or ranges[s][1] is None for s in free) or not expr.is_polynomial(*free):
        return None
    if any(sympy.degree(expr, s) > 1 for s in free):
        return None
    corners = [expr]
    for s in free:
        lo, hi = ranges[s]
        corners = [c.subs(s, v) for c in corners for v in (lo, hi)]
    if all(c >= 0 for c in corners):
        return 0 if all(c == 0 for c in corners) else 1
    if all(c <= 0 for c in corners):
        return -1
    return None


def refine(expr: sympy.Expr, ranges: dict[sympy.Symbol, tuple[int, int | None]]) -> sympy.Expr:
    """`expr` with every `Min`/`Max` of two arguments decided by the symbols' ranges."""

    def pick(node: sympy.Expr) -> sympy.Expr:
        if isinstance(node, (sympy.Min, sympy.Max)) and len(node.args) == 2:
            x, y = node.args
            sign = _sign(x - y, ranges)
            if sign is not None:
                smaller_first = sign <= 0
                return x if smaller_first == isinstance(node, sympy.Min) else y
        return node

    return expr.replace(lambda n: isinstance(n, (sympy.Min, sympy.Max)), pick)


@dataclass(frozen=True, slots=True)
class TensorType:
    """The type of an SSA value: its `shape`, element `dtype` (plain or number format) and,
    for packed quantized storage, its memory `layout`."""

    shape: tuple[Dim, ...]
    dtype: DType | NumberFormat
    layout: Layout | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(norm_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def free_symbols(self) -> set[sympy.Symbol]:
        out: set[sympy.Symbol] = set()
        for d in self.shape:
            if not isinstance(d, int):
                out |= d.free_symbols
        return out

    def with_shape(self, shape: tuple[Dim, ...]) -> "TensorType":
        return TensorType(tuple(shape), self.dtype, self.layout)

    def __str__(self) -> str:
        text = f"{self.dtype}[{', '.join(dim_str(d) for d in self.shape)}]"
        return text if self.layout is None else f"{text} {self.layout}"


def split_top(text: str, sep: str = ",") -> list[str]:
    """Split `text` at `sep` outside brackets, parentheses, braces, angles and quotes."""
    parts, depth, cur, quote = [], 0, [], False
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            cur.append(c)
            if c == "\\":
                cur.append(text[i + 1])
                i += 1
            elif c == '"':
                quote = False
        elif c == '"':
            quote = True
            cur.append(c)
        elif c in "([{<":
            depth += 1
            cur.append(c)
        elif c in ")]}>":
            depth -= 1
            cur.append(c)
        elif c == sep and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    tail = "".join(cur).strip()
    if tail or parts:
        parts.append(tail)
    return parts


def parse_type(text: str) -> TensorType:
    """Read a `TensorType` from its text form (`f32[b, s, 64]`, `int4<sym,g128>[64, 64] packed<...>`)."""
    text = text.strip()
    layout = None
    if " packed<" in text:
        text, lay = text.split(" packed<", 1)
        layout = parse_layout("packed<" + lay)
    if not text.endswith("]") or "[" not in text:
        raise ValueError(f"malformed tensor type {text!r}; expected DTYPE[dims], e.g. f32[b, s, 64]")
    cut = text.index("[", text.index(">") if is_format_text(text) else 0)
    head, body = text[:cut], text[cut + 1 : -1]
    dtype: DType | NumberFormat = parse_format(head) if is_format_text(head) else DType.parse(head)
    shape = tuple(parse_expr(p) for p in split_top(body)) if body.strip() else ()
    return TensorType(shape, dtype, layout)


__all__ = [
    "DTYPES",
    "Dim",
    "TensorType",
    "dim_str",
    "dims_equal",
    "refine",
    "norm_dim",
    "parse_expr",
    "parse_type",
    "split_top",
    "sym",
]
