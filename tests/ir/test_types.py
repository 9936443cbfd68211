"""Dtypes, number formats, layouts and symbolic tensor types: text forms, torch mapping,
parse errors and symbolic dim equality."""

from __future__ import annotations

import pytest
import sympy
import torch
from hypothesis import given, settings, strategies as st

from mxc.ir import (
    BF16,
    DTYPES,
    F32,
    DType,
    FloatFormat,
    IntFormat,
    Layout,
    Scaling,
    TensorType,
    dims_equal,
    parse_expr,
    parse_format,
    parse_layout,
    parse_type,
    sym,
)
from mxc.ir.formats import FLOAT_ELEMENTS

from ir_strategies import formats, layouts, plain_types, quant_types

S, T, B = sym("s"), sym("t"), sym("b")
SETTINGS = settings(max_examples=60, deadline=None)

# --------------------------------------------------------------------------- dtypes

TORCH_OF = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f8e4m3": torch.float8_e4m3fn,
    "f8e5m2": torch.float8_e5m2,
    "i64": torch.int64,
    "i32": torch.int32,
    "i16": torch.int16,
    "i8": torch.int8,
    "u8": torch.uint8,
    "u16": torch.uint16,  # ONNX tensors (the ONNX frontend)
    "u32": torch.uint32,
    "u64": torch.uint64,
    "bool": torch.bool,
}


def test_dtype_names_are_exactly_the_documented_set():
    assert list(DTYPES) == list(TORCH_OF)


@pytest.mark.parametrize("name", list(TORCH_OF))
def test_dtype_parse_print_and_torch_round_trip(name):
    t = DType.parse(name)
    assert t is DTYPES[name]
    assert str(t) == name and repr(t) == name and t.name == name
    assert t.torch is TORCH_OF[name]
    assert DType.from_torch(TORCH_OF[name]) is t
    assert t.bits == torch.empty((), dtype=t.torch).element_size() * 8
    assert t.is_float == TORCH_OF[name].is_floating_point


def test_dtype_parse_unknown_names_the_valid_ones():
    with pytest.raises(ValueError) as e:
        DType.parse("f33")
    assert str(e.value) == (
        "unknown dtype 'f33'; expected one of f64, f32, f16, bf16, f8e4m3, f8e5m2, i64, i32, i16, i8, u8, u16, u32, u64, bool"
    )


def test_dtype_from_unmapped_torch_dtype():
    with pytest.raises(ValueError) as e:
        DType.from_torch(torch.complex64)
    msg = str(e.value)
    assert msg.startswith("torch dtype torch.complex64 has no IR dtype; expected one of ")
    assert "torch.float32" in msg and "torch.bfloat16" in msg


# --------------------------------------------------------------------------- formats and layouts

FORMAT_TEXTS = [
    (IntFormat(4, True, Scaling("group", 128)), "int4<sym,g128>"),
    (IntFormat(8, False, Scaling("token")), "int8<asym,token>"),
    (IntFormat(3, True, Scaling("channel")), "int3<sym,channel>"),
    (IntFormat(2, False, Scaling("tensor")), "int2<asym,tensor>"),
    (FloatFormat("fp4e2m1", Scaling("block", 32)), "fp4e2m1<block32>"),
    (FloatFormat("fp8e4m3", Scaling("channel")), "fp8e4m3<channel>"),
    (FloatFormat("fp6e3m2", Scaling("group", 64)), "fp6e3m2<g64>"),
    (IntFormat(4, True, Scaling("group", 32, "f32")), "int4<sym,g32,scale=f32>"),
    (FloatFormat("fp4e2m1", Scaling("block", 16, "fp8e4m3"), True), "fp4e2m1<block16,scale=fp8e4m3,global>"),
    (IntFormat(1, False, Scaling("channel")), "int1<asym,channel>"),
]


@pytest.mark.parametrize("fmt,text", FORMAT_TEXTS, ids=[t for _, t in FORMAT_TEXTS])
def test_format_text(fmt, text):
    assert str(fmt) == text
    assert parse_format(text) == fmt
    assert hash(parse_format(text)) == hash(fmt)


def test_default_scale_dtype_is_not_printed():
    assert Scaling("group", 32) == Scaling("group", 32, "f16")
    assert str(IntFormat(4, True, Scaling("group", 32, "f16"))) == "int4<sym,g32>"
    assert str(FloatFormat("fp8e4m3", Scaling("block", 32, "e8m0"))) == "fp8e4m3<block32>"


def test_format_aliases():
    assert parse_format("mxfp4") == FloatFormat("fp4e2m1", Scaling("block", 32))
    assert parse_format("nvfp4") == FloatFormat("fp4e2m1", Scaling("block", 16, "fp8e4m3"), True)


def test_format_bits():
    assert IntFormat(5, True, Scaling("tensor")).bits == 5
    assert [FloatFormat(n, Scaling("tensor")).bits for n in FLOAT_ELEMENTS] == [8, 8, 6, 6, 4]


def test_layout_text():
    assert str(Layout(bits=3, axis=1)) == "packed<bits=3,word=i32,axis=1>"
    lay = Layout(bits=4, axis=0, order=(0, 2, 1, 3), tile=(16, 64))
    assert str(lay) == "packed<bits=4,word=i32,axis=0,order=[0,2,1,3],tile=[16,64]>"
    assert parse_layout(str(lay)) == lay
    # spaces after commas are tolerated
    assert parse_layout("packed<bits=4, word=i32, axis=0, order=[0, 2, 1, 3], tile=[16, 64]>") == lay


# --------------------------------------------------------------------------- strategies

@SETTINGS
@given(formats)
def test_format_round_trip(fmt):
    assert parse_format(str(fmt)) == fmt


@SETTINGS
@given(layouts)
def test_layout_round_trip(lay):
    assert parse_layout(str(lay)) == lay


@SETTINGS
@given(st.one_of(plain_types, quant_types))
def test_type_round_trip(t):
    text = str(t)
    back = parse_type(text)
    assert back == t
    assert str(back) == text
    assert back.free_symbols == t.free_symbols


# --------------------------------------------------------------------------- exact type texts

@pytest.mark.parametrize(
    "t,text",
    [
        (TensorType((B, S, 576), F32), "f32[b, s, 576]"),
        (TensorType((), BF16), "bf16[]"),
        (TensorType((2 * S + 1, sympy.floor(S / 2)), F32), "f32[2*s + 1, floor(s/2)]"),
        (TensorType((S * T, sympy.ceiling(T / 4)), F32), "f32[s*t, ceiling(t/4)]"),
        (
            TensorType((576, 576), IntFormat(4, True, Scaling("group", 128)), Layout(bits=4, axis=1)),
            "int4<sym,g128>[576, 576] packed<bits=4,word=i32,axis=1>",
        ),
        (
            TensorType((S, 64), FloatFormat("fp8e4m3", Scaling("token")), Layout(8, 1, order=(1, 0), tile=(16,))),
            "fp8e4m3<token>[s, 64] packed<bits=8,word=i32,axis=1,order=[1,0],tile=[16]>",
        ),
    ],
)
def test_type_exact_text(t, text):
    assert str(t) == text
    assert parse_type(text) == t


def test_parsed_symbols_are_the_shared_size_symbols():
    t = parse_type("f32[b, 2*s + 1, floor(s/2)]")
    assert t.shape == (B, 2 * S + 1, sympy.floor(S / 2))
    assert B.is_integer and B.is_positive
    assert isinstance(parse_type("f32[2*3]").shape[0], int) and parse_type("f32[2*3]").shape == (6,)


@pytest.mark.parametrize(
    "dim,text",
    [
        (sympy.factor(2 * S + 2), "2*s + 2"),
        (sympy.Mul(2, S + 1, evaluate=False), "2*s + 2"),
        (sympy.simplify((2 * B + 2) * sympy.floor(B / 2)), "(2*b + 2)*floor(b/2)"),
    ],
)
def test_dims_are_kept_in_the_form_their_text_reads_back_as(dim, text):
    """`2*(s + 1)` prints as is but reads back as `2*s + 2`; types keep the read-back form so
    that print -> parse -> print is the identity."""
    t = TensorType((dim, 4), F32)
    assert str(t) == f"f32[{text}, 4]"
    assert parse_type(str(t)) == t
    assert str(parse_type(str(t))) == str(t)


# --------------------------------------------------------------------------- malformed texts

EXPR_EXPECTED = "expected an integer expression of size symbols with + - * / and floor, ceiling, Max, Min, Mod"

MALFORMED = [
    ("f32", "malformed tensor type 'f32'; expected DTYPE[dims], e.g. f32[b, s, 64]"),
    ("f32[4", "malformed tensor type 'f32[4'; expected DTYPE[dims]"),
    ("f33[4]", "unknown dtype 'f33'; expected one of f64, f32,"),
    ("f32[4, ]", "malformed dim expression ''"),
    ("f32[4 4]", "malformed dim expression '4 4'"),
    ("f32[1.5]", f"malformed dim expression '1.5'; {EXPR_EXPECTED}"),
    ("f32[1/0]", "a dim must be an integer, got zoo"),
    ("f32[s.__class__]", f"malformed dim expression 's.__class__'; {EXPR_EXPECTED}"),
    ("f32[True]", "got BooleanTrue"),
    ("int4<sym>[4]", "malformed integer format 'int4<sym>'; expected intN<sym|asym,SCALING"),
    ("int4<both,tensor>[4]", "expected intN<sym|asym,SCALING"),
    ("int4<sym,tensor,token>[4]", "expected intN<sym|asym,SCALING"),
    ("int4<sym,tensor,global>[4]", "expected intN<sym|asym,SCALING"),
    ("int1<sym,tensor>[4]", "a symmetric integer format needs at least 2 bits"),
    ("int4<sym,g8,scale=f64>[4]", "unknown scale dtype 'f64'; expected one of f32, f16, e8m0, fp8e4m3"),
    ("int9<sym,tensor>[4]", "integer format bits must be in 1..8, got 9"),
    ("int4<sym,g0>[4]", "scaling size must be positive, got 0"),
    ("int4<sym,group>[4]", "scaling 'group' needs size"),
    ("int4<sym,perrow>[4]", "unknown scaling 'perrow'; expected one of tensor, channel, group, token, block"),
    (
        "fp5e2m2<tensor>[4]",
        "unknown number format 'fp5e2m2' in 'fp5e2m2<tensor>'; expected int1..int8, one of "
        "fp8e4m3, fp8e5m2, fp6e3m2, fp6e2m3, fp4e2m1",
    ),
    ("fp8e4m3<tensor,channel>[4]", "malformed float format 'fp8e4m3<tensor,channel>'; expected fp8e4m3<SCALING"),
    ("int4<sym,g8>[4] packed<bits=4,axis=1,junk>", "malformed layout 'packed<bits=4,axis=1,junk>'; expected packed<bits=N"),
    ("int4<sym,g8>[4] packed<bits=4>", "missing 1 required positional argument: 'axis'"),
    ("int4<sym,g8>[4] packed<bits=x,axis=1>", "malformed layout 'packed<bits=x,axis=1>'"),
    ("int4<sym,g8>[4] packed<bits=9,axis=1>", "layout bits must be in 1..8, got 9"),
    ("int4<sym,g8>[4] packed<bits=4,axis=1,order=[0,0]>", "layout order must be a permutation, got [0, 0]"),
    ("int4<sym,g8>[4] packed<bits=4,axis=1,color=1>", "unexpected keyword argument 'color'"),
]


@pytest.mark.parametrize("text,message", MALFORMED, ids=[t for t, _ in MALFORMED])
def test_malformed_type_names_what_was_expected(text, message):
    with pytest.raises(ValueError) as e:
        parse_type(text)
    assert message in str(e.value)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="sbt0123456789+-*/(), .[]_'\"floorceilingMaxMinModlambdaTrue", max_size=20))
def test_parse_expr_only_raises_value_error(text):
    """Arbitrary text is either a dim or a ValueError: never another exception, never code run."""
    try:
        d = parse_expr(text)
    except ValueError:
        return
    assert isinstance(d, int) or (isinstance(d, sympy.Expr) and not d.is_number)


def test_parse_expr_does_not_evaluate_python():
    with pytest.raises(ValueError, match="malformed dim expression"):
        parse_expr("(1).__class__.__bases__[0].__subclasses__()")
    with pytest.raises(ValueError, match="malformed dim expression"):
        parse_expr("s.func")


@pytest.mark.parametrize("dim", [1.5, True, "s", None])
def test_tensor_type_rejects_non_dims(dim):
    with pytest.raises(TypeError, match="a dim must be an int or a sympy expression"):
        TensorType((dim,), F32)


def test_tensor_type_rejects_non_integer_constant_dims():
    with pytest.raises(TypeError, match="a dim must be an integer, got 3/2"):
        TensorType((sympy.Rational(3, 2),), F32)
    assert TensorType((sympy.Integer(3),), F32).shape == (3,)
    assert type(TensorType((sympy.Integer(3),), F32).shape[0]) is int


# --------------------------------------------------------------------------- dims_equal

@pytest.mark.parametrize(
    "a,b,equal",
    [
        (4, 4, True),
        (4, 5, False),
        (sympy.Integer(4), 4, True),
        (S, S, True),
        (S, T, False),
        (2 * S + 2, 2 * (S + 1), True),
        (S * T, T * S, True),
        (S + 1, S, False),
        ((S * T) / T, S, True),
        (sympy.floor(S / 2) * 2, S, False),
        (sympy.floor((2 * S) / 2), S, True),
        (sympy.Max(S, S + 1), S + 1, True),
        (parse_expr("2*s + 1"), 2 * S + 1, True),
        (parse_expr("floor(s/2)"), sympy.floor(S / 2), True),
        (parse_expr("s*(t + 1)"), S * T + S, True),
        (S, 4, False),
    ],
)
def test_dims_equal(a, b, equal):
    assert dims_equal(a, b) is equal
    assert dims_equal(b, a) is equal
