"""Hypothesis strategies for IR pieces, shared by the tests in this folder: number formats,
layouts, symbolic dims, tensor types and attribute values."""

from __future__ import annotations

import math

import sympy
from hypothesis import strategies as st

from mxc.ir import DEVICE, DTYPES, FloatFormat, IntFormat, Layout, Ref, Scaling, TensorType, TorchConst, sym
from mxc.ir.formats import FLOAT_ELEMENTS, SCALE_DTYPES, SCALING_KINDS

SYMBOLS = ("b", "s", "t", "n_ctx")

scale_dtypes = st.one_of(st.just(""), st.sampled_from(sorted(SCALE_DTYPES)))  # "" = the kind's default
scalings = st.one_of(
    st.builds(Scaling, st.sampled_from([k for k in SCALING_KINDS if k not in ("group", "block")]), st.none(),
              scale_dtypes),
    st.builds(Scaling, st.just("group"), st.integers(1, 4096), scale_dtypes),
    st.builds(Scaling, st.just("block"), st.integers(1, 256), scale_dtypes),
)
int_formats = st.booleans().flatmap(
    lambda symmetric: st.builds(IntFormat, st.integers(2 if symmetric else 1, 8), st.just(symmetric), scalings)
)
float_formats = st.builds(FloatFormat, st.sampled_from(sorted(FLOAT_ELEMENTS)), scalings, st.booleans())
formats = st.one_of(int_formats, float_formats)
layouts = st.builds(
    Layout,
    bits=st.integers(1, 8),
    axis=st.integers(-2, 3),
    word=st.sampled_from(["i32", "i8", "i16"]),
    order=st.integers(0, 8).flatmap(lambda n: st.permutations(list(range(n))).map(tuple)),
    tile=st.lists(st.integers(1, 256), max_size=3).map(tuple),
)


def sym_exprs(names=SYMBOLS):
    """Non-constant integer shape expressions over the size symbols `names`."""
    atoms = st.sampled_from([sym(n) for n in names])
    return st.one_of(
        atoms,
        st.builds(lambda a, k, c: k * a + c, atoms, st.integers(1, 4), st.integers(-3, 7)),
        st.builds(lambda a, k: sympy.floor(a / k), atoms, st.integers(2, 8)),
        st.builds(lambda a, k: sympy.ceiling(a / k), atoms, st.integers(2, 8)),
        st.builds(lambda a, b: a * b, atoms, atoms),
        st.builds(lambda a, b: sympy.Max(a, b), atoms, atoms),
        st.builds(lambda a, k: sympy.Mod(a, k), atoms, st.integers(2, 8)),
    )


dims = st.one_of(st.integers(0, 4096), sym_exprs(("b", "s", "t")))
shapes = st.lists(dims, max_size=5).map(tuple)
plain_types = st.builds(TensorType, shapes, st.sampled_from(list(DTYPES.values())))
quant_types = st.builds(TensorType, shapes, formats, st.one_of(st.none(), layouts))

TRICKY_STRINGS = [
    "", '"', "\\", '\\"', 'a "quoted" \\ back\\slash', "ünïcødé ✓ 🙂 中文", "\n\t\r\x00\x1f",
    "{[(<", ">)]}", "x=1, y: 2", "$0", "%0", "#1", "none", "true", "torch.strided", "f32", "1e5",
    ' loc("x")', "\u2028\u0085", "int4<sym,g8>", "nvfp4",
]
TRICKY_FLOATS = [0.0, -0.0, 1e-300, 5e-324, -1e300, 1.7976931348623157e308, math.inf, -math.inf,
                 1e16, 0.1, -2.5e-7, 1e-6, 123456789.125]


def attr_values_over(names=SYMBOLS):
    """Random attribute values (nested tuples and dicts of every leaf kind the printer knows);
    shape expressions in them use only the size symbols `names`."""
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False),
        st.sampled_from(TRICKY_FLOATS),
        st.text(max_size=12),
        st.sampled_from(TRICKY_STRINGS),
        st.builds(Ref, st.integers(0, 12)),
        st.builds(TorchConst, st.sampled_from(["contiguous_format", "strided", "channels_last", "preserve_format"])),
        st.just(DEVICE),
        st.sampled_from(list(DTYPES.values())),
        formats,
        layouts,
        *([sym_exprs(names)] if names else []),
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4).map(tuple),
            st.dictionaries(st.one_of(st.text(max_size=6), st.sampled_from(TRICKY_STRINGS)), inner, max_size=4),
        ),
        max_leaves=12,
    )


attr_values = attr_values_over()
