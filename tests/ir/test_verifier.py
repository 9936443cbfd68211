"""The verifier: one test per kind of violation, each checking that the error names the
offending node's printed line, what was expected and what came; and the parser's errors:
line number and expected form."""

from __future__ import annotations

import pytest
import torch

from mxc.ir import (
    F16,
    F32,
    I64,
    OPS,
    DimRange,
    Graph,
    IntFormat,
    Layout,
    Node,
    ParseError,
    Ref,
    Scaling,
    TensorType,
    Value,
    VerificationError,
    parse,
    parse_type,
    sym,
    verify,
)

B, S, T = sym("b"), sym("s"), sym("t")


def arg(name: str, index: int, shape: tuple, dtype=F32) -> Node:
    return Node.create("input", (), {"name": name, "index": index}, [TensorType(shape, dtype)])


def node(op: str, inputs=(), attrs=None, shape=(B, 8), dtype=F32, loc=None) -> Node:
    return Node.create(op, [v if isinstance(v, Value) else v.out for v in inputs], attrs, [TensorType(shape, dtype)], loc)


def const(name: str, shape: tuple, dtype=F32) -> Node:
    return Node.create("const", (), {"name": name}, [TensorType(shape, dtype)])


X = arg("x", 0, (B, 8))


def graph(nodes, outputs=None, inputs=(X,), dims=(DimRange("b"),), weights=None) -> Graph:
    outs = outputs if outputs is not None else [nodes[-1].out]
    return Graph("g", tuple(inputs), tuple(nodes), tuple(outs), tuple(dims), dict(weights or {}))


def problems(g: Graph) -> list[tuple[str, str]]:
    with pytest.raises(VerificationError) as e:
        verify(g)
    return e.value.problems


def only_problem(g: Graph) -> tuple[str, str]:
    got = problems(g)
    assert len(got) == 1, got
    return got[0]


# --------------------------------------------------------------------------- well formed


def test_valid_graph_is_returned_as_is():
    w = const("w", (16, 8))
    lin = node("linear", [X, w], shape=(B, 16))
    g = graph([w, lin], weights={"w": torch.zeros(16, 8)})
    assert verify(g) is g


def test_error_text_lists_node_line_and_message():
    bad = node("relu", [X], shape=(B, 9))
    with pytest.raises(VerificationError) as e:
        verify(graph([bad]))
    assert str(e.value) == (
        "graph @g failed verification (1 problems):\n"
        "  %0 = relu(%x) : f32[b, 9]\n"
        "    error: result 0 declared f32[b, 9], but relu of these operands gives f32[b, 8]"
    )
    assert isinstance(e.value, ValueError)


# --------------------------------------------------------------------------- op set


def test_unknown_op_lists_valid_ops():
    line, msg = only_problem(graph([node("frobnicate", [X])]))
    assert line == "%0 = frobnicate(%x) : f32[b, 8]"
    assert msg == "unknown op 'frobnicate'; expected one of " + ", ".join(sorted(OPS))
    assert "linear" in msg and "rms_norm" in msg and "torch" in msg


@pytest.mark.parametrize(
    "op,n,expected",
    [
        ("relu", 2, "relu takes 1..1 operands, got 2"),
        ("linear", 1, "linear takes 2..3 operands, got 1"),
        ("attention", 5, "attention takes 3..4 operands, got 5"),
        ("cat", 0, "cat takes 1..any operands, got 0"),
    ],
)
def test_wrong_operand_count(op, n, expected):
    bad = node(op, [X] * n, {"axis": 0} if op == "cat" else None)
    line, msg = only_problem(graph([bad]))
    assert line == f"%0 = {op}({', '.join(['%x'] * n)}){' {axis=0}' if op == 'cat' else ''} : f32[b, 8]"
    assert msg == expected


def test_wrong_result_count():
    bad = Node.create("relu", [X.out], {}, [TensorType((B, 8), F32)] * 2)
    line, msg = only_problem(graph([bad], outputs=[bad.outs[0]]))
    assert line == "%0:2 = relu(%x) : (f32[b, 8], f32[b, 8])"
    assert msg == "relu has 1 result(s), the node declares 2"


def test_missing_attribute():
    line, msg = only_problem(graph([node("softmax", [X])]))
    assert line == "%0 = softmax(%x) : f32[b, 8]"
    assert msg == "softmax needs attribute 'axis'"


def test_unknown_attribute_names_the_valid_ones():
    line, msg = only_problem(graph([node("rms_norm", [X], {"eps": 1e-6, "alpha": 0.5})]))
    assert line == "%0 = rms_norm(%x) {eps=1e-06, alpha=0.5} : f32[b, 8]"
    assert msg == "rms_norm has no attribute(s) ['alpha']; expected ['eps']"


@pytest.mark.parametrize(
    "op,attrs,expected",
    [
        ("softmax", {"axis": "1"}, "attribute 'axis' of softmax must be int, got str '1'"),
        ("softmax", {"axis": True}, "attribute 'axis' of softmax must be int, got bool True"),
        ("rms_norm", {"eps": "small"}, "attribute 'eps' of rms_norm must be int or float, got str 'small'"),
        ("reshape", {"shape": [4, 2]}, "attribute 'shape' of reshape must be tuple, got list [4, 2]"),
        ("cast", {"dtype": "f16"}, "attribute 'dtype' of cast must be DType, got str 'f16'"),
    ],
)
def test_ill_typed_attribute(op, attrs, expected):
    line, msg = only_problem(graph([node(op, [X], attrs)]))
    assert line.startswith(f"%0 = {op}(%x) {{")
    assert msg == expected


def test_attention_scale_must_be_float_or_none():
    q = const("q", (1, 4, 8, 16))
    att = node("attention", [q, q, q], {"causal": True, "scale": 1}, shape=(1, 4, 8, 16))
    line, msg = only_problem(graph([q, att]))
    assert line == "%1 = attention(%0, %0, %0) {causal=true, scale=1} : f32[1, 4, 8, 16]"
    assert msg == "attribute 'scale' of attention must be float or NoneType, got int 1"


# --------------------------------------------------------------------------- declared vs inferred types


def test_linear_with_wrong_n():
    w = const("w", (16, 8))
    lin = node("linear", [X, w], shape=(B, 7))
    line, msg = only_problem(graph([w, lin]))
    assert line == "%1 = linear(%x, %0) : f32[b, 7]"
    assert msg == "result 0 declared f32[b, 7], but linear of these operands gives f32[b, 16]"


def test_linear_with_wrong_k():
    w = const("w", (16, 9))
    line, msg = only_problem(graph([w, node("linear", [X, w], shape=(B, 16))]))
    assert line == "%1 = linear(%x, %0) : f32[b, 16]"
    assert msg == "linear: input's last dim must be K=9, got f32[b, 8]"


def test_linear_with_wrong_bias():
    w, bias = const("w", (16, 8)), const("bias", (8,))
    line, msg = only_problem(graph([w, bias, node("linear", [X, w, bias], shape=(B, 16))]))
    assert line == "%2 = linear(%x, %0, %1) : f32[b, 16]"
    assert msg == "linear: bias must be [16], got f32[8]"


def test_add_with_shapes_that_do_not_broadcast():
    y = const("y", (B, 4))
    line, msg = only_problem(graph([y, node("add", [X, y])]))
    assert line == "%1 = add(%x, %0) : f32[b, 8]"
    assert msg == "add: shapes [b, 8] and [b, 4] do not broadcast (dim 8 vs 4)"


def test_add_of_different_symbols_does_not_broadcast():
    y = const("y", (S, 8))
    g = graph([y, node("add", [X, y])], inputs=[X, arg("z", 1, (S,))], dims=[DimRange("b"), DimRange("s")])
    line, msg = only_problem(g)
    assert msg == "add: shapes [b, 8] and [s, 8] do not broadcast (dim b vs s)"


def test_add_with_different_dtypes():
    y = const("y", (8,), F16)
    _, msg = only_problem(graph([y, node("add", [X, y])]))
    assert msg == "add: operand dtypes differ: f32 and f16"


def test_reshape_with_wrong_element_count():
    c = const("c", (2, 3))
    line, msg = only_problem(graph([c, node("reshape", [c], {"shape": (4, 2)}, shape=(4, 2))]))
    assert line == "%1 = reshape(%0) {shape=[4, 2]} : f32[4, 2]"
    assert msg == "reshape: cannot reshape f32[2, 3] to [4, 2]"


def test_reshape_whose_inferred_dim_is_not_an_integer():
    c = const("c", (6,))
    line, msg = only_problem(graph([c, node("reshape", [c], {"shape": (4, -1)}, shape=(4, 2))]))
    assert line == "%1 = reshape(%0) {shape=[4, -1]} : f32[4, 2]"
    assert msg == "reshape: a dim must be an integer, got 3/2"


C = {}  # consts of the inference table, by shape text


def c(shape: tuple, dtype=F32) -> Value:
    key = (shape, dtype)
    if key not in C:
        C[key] = const(f"c{len(C)}", shape, dtype)
    return C[key].out


INFERRED = [
    # op, operands, attrs, the result type every backend must produce
    ("add", [X.out, c((1, 8))], {}, "f32[b, 8]"),
    ("add", [c((B, 1)), c((8,))], {}, "f32[b, 8]"),
    ("mul", [c((4, 1, 8)), X.out], {}, "f32[4, b, 8]"),
    ("linear", [X.out, c((16, 8)), c((16,))], {}, "f32[b, 16]"),
    ("matmul", [c((2, B, 8)), c((8, 3))], {}, "f32[2, b, 3]"),
    ("matmul", [c((5, 1, 4, 8)), c((3, 8, 2))], {}, "f32[5, 3, 4, 2]"),
    ("embedding", [c((B, 3), I64), c((100, 8))], {}, "f32[b, 3, 8]"),
    ("rms_norm", [X.out, c((8,))], {"eps": 1e-6}, "f32[b, 8]"),
    ("layer_norm", [X.out, c((8,)), c((8,))], {"eps": 1e-5}, "f32[b, 8]"),
    ("gelu", [X.out], {"approximate": "tanh"}, "f32[b, 8]"),
    ("softmax", [X.out], {"axis": -1}, "f32[b, 8]"),
    ("attention", [c((B, 6, 5, 16)), c((B, 2, 7, 16)), c((B, 2, 7, 12))], {"causal": True, "scale": None},
     "f32[b, 6, 5, 12]"),
    ("rope", [c((B, 4, 8)), c((4, 8)), c((4, 8))], {}, "f32[b, 4, 8]"),
    ("cast", [X.out], {"dtype": F16}, "f16[b, 8]"),
    ("reshape", [c((B, 4, 6))], {"shape": (B, -1)}, "f32[b, 24]"),
    ("reshape", [c((B, 4, 6))], {"shape": (B, 2, 2, 6)}, "f32[b, 2, 2, 6]"),
    ("transpose", [c((B, 4, 6))], {"dim0": 0, "dim1": -1}, "f32[6, 4, b]"),
    ("permute", [c((B, 4, 6))], {"dims": (2, 0, 1)}, "f32[6, b, 4]"),
    ("unsqueeze", [X.out], {"axis": -1}, "f32[b, 8, 1]"),
    ("unsqueeze", [X.out], {"axis": 1}, "f32[b, 1, 8]"),
    ("expand", [c((1, 8))], {"shape": (3, B, -1)}, "f32[3, b, 8]"),
    ("slice", [X.out], {"axis": 1, "start": 2, "end": 7, "step": 2}, "f32[b, 3]"),
    ("slice", [X.out], {"axis": -1, "start": -3, "end": 2**63 - 1, "step": 1}, "f32[b, 3]"),
    ("slice", [X.out], {"axis": 1, "start": 6, "end": 2, "step": 1}, "f32[b, 0]"),
    ("cat", [X.out, c((B, 3)), X.out], {"axis": 1}, "f32[b, 19]"),
    ("cat", [X.out, X.out], {"axis": 0}, "f32[2*b, 8]"),
]


@pytest.mark.parametrize("op,ins,attrs,text", INFERRED, ids=[f"{r[0]}-{r[3]}" for r in INFERRED])
def test_inferred_types(op, ins, attrs, text):
    """Declaring the right type verifies; declaring one off (a dim + 1) is reported with the
    exact inferred type."""
    consts = list({v.node: None for v in ins if v.node.op == "const"})
    right = parse_type(text)
    ok = Node.create(op, ins, attrs, [right])
    assert verify(graph([*consts, ok])) is not None
    wrong_shape = (*right.shape[:-1], right.shape[-1] + 1)
    bad = Node.create(op, ins, attrs, [right.with_shape(wrong_shape)])
    _, msg = only_problem(graph([*consts, bad]))
    assert msg == f"result 0 declared {right.with_shape(wrong_shape)}, but {op} of these operands gives {text}"


def test_declared_dtype_differs_from_inferred():
    line, msg = only_problem(graph([node("silu", [X], dtype=F16)]))
    assert msg == "result 0 declared f16[b, 8], but silu of these operands gives f32[b, 8]"


def test_transpose_of_a_scalar_is_reported_not_raised():
    c = const("c", ())
    line, msg = only_problem(graph([c, node("transpose", [c], {"dim0": 0, "dim1": 0}, shape=())]))
    assert line == "%1 = transpose(%0) {dim0=0, dim1=0} : f32[]"
    assert msg.startswith("transpose: ")


# --------------------------------------------------------------------------- SSA and symbols


def test_use_before_definition():
    later = node("relu", [X])
    early = node("silu", [later])
    line, msg = only_problem(graph([early, later], outputs=[early.out]))
    assert line == "%0 = silu(%1) : f32[b, 8]"
    assert msg == "operand 0 is not defined above this node (not SSA)"


def test_operand_from_outside_the_graph():
    stray = node("relu", [X])
    line, msg = only_problem(graph([node("silu", [stray])]))
    assert line == "%0 = silu(%<undefined>) : f32[b, 8]"
    assert msg == "operand 0 is not defined above this node (not SSA)"


def test_operand_reading_a_missing_result_is_reported_not_raised():
    bad = node("relu", [Value(X, 1)])
    got = problems(graph([bad]))
    assert got[0] == ("%0 = relu(%x) : f32[b, 8]", "operand 0 reads result 1 of a node with 1 results")


def test_node_listed_twice():
    r = node("relu", [X])
    line, msg = only_problem(graph([r, r]))
    assert msg == "node appears twice in the graph"


def test_undeclared_size_symbol_in_a_dim():
    c = const("c", (T, 8))
    line, msg = only_problem(graph([c]))
    assert line == '%0 = const() {name="c"} : f32[t, 8]'
    assert msg == "dim t of f32[t, 8] uses size symbols ['t'] that the graph does not declare"


def test_undeclared_size_symbol_in_an_expression():
    c = const("c", (2 * B + T, 8))
    _, msg = only_problem(graph([c]))
    assert msg == "dim 2*b + t of f32[2*b + t, 8] uses size symbols ['t'] that the graph does not declare"


def test_undeclared_size_symbol_in_an_argument():
    line, msg = only_problem(graph([], outputs=[X.out], dims=[]))
    assert line == '%x = input() {name="x", index=0} : f32[b, 8]'
    assert msg == "dim b of f32[b, 8] uses size symbols ['b'] that the graph does not declare"


def test_undeclared_size_symbol_in_an_attribute():
    t = Node.create("torch", [X.out], {"target": "aten.view", "args": (Ref(0), (T, -1))}, [TensorType((B, 8), F32)])
    line, msg = only_problem(graph([t]))
    assert line == '%0 = torch(%x) {target="aten.view", args=[$0, [t, -1]]} : f32[b, 8]'
    assert msg == "attributes use size symbols ['t'] that the graph does not declare"


def test_size_symbol_no_input_binds():
    line, msg = only_problem(graph([node("relu", [X])], dims=[DimRange("b"), DimRange("s")]))
    assert line == "dim s"
    assert msg == "size symbol s is no input's dim, so no call can bind it"


def test_negative_dim():
    _, msg = only_problem(graph([const("c", (-1, 8))]))
    assert msg == "negative dim -1 in f32[-1, 8]"


def test_layout_on_a_plain_dtype():
    c = Node.create("const", (), {"name": "c"}, [TensorType((8, 8), F32, Layout(bits=4, axis=1))])
    line, msg = only_problem(graph([c]))
    assert line == '%0 = const() {name="c"} : f32[8, 8] packed<bits=4,word=i32,axis=1>'
    assert msg == "layout packed<bits=4,word=i32,axis=1> on plain dtype f32: only quantized formats are packed"


def test_argument_with_wrong_index():
    bad = arg("x", 1, (B, 8))
    line, msg = only_problem(graph([node("relu", [bad])], inputs=[bad]))
    assert line == '%x = input() {name="x", index=1} : f32[b, 8]'
    assert msg == "argument 0 must be an 'input' node with index=0 and one type"


# --------------------------------------------------------------------------- outputs


def test_output_not_defined():
    stray = node("relu", [X])
    assert only_problem(graph([node("silu", [X])], outputs=[stray.out])) == (
        "return", "output 0 is not defined in the graph")


def test_output_reading_a_missing_result():
    r = node("relu", [X])
    assert only_problem(graph([r], outputs=[r.out, Value(r, 2)])) == (
        "return", "output 1 reads result 2 of a node with 1 results")


# --------------------------------------------------------------------------- weights


def test_const_naming_a_missing_weight():
    w = const("w2", (16, 8))
    line, msg = only_problem(graph([w], weights={"w": torch.zeros(16, 8)}))
    assert line == '%0 = const() {name="w2"} : f32[16, 8]'
    assert msg == "weight 'w2' is not among the graph's weights"


def test_const_with_wrong_weight_shape():
    w = const("w", (8, 4))
    line, msg = only_problem(graph([w], weights={"w": torch.zeros(4, 8)}))
    assert line == '%0 = const() {name="w"} : f32[8, 4]'
    assert msg == "weight 'w' has shape [4, 8], the node declares f32[8, 4]"


def test_two_consts_for_one_weight():
    a, b = const("w", (4,)), const("w", (4,))
    line, msg = only_problem(graph([a, b, node("add", [a, b], shape=(4,))]))
    assert line == '%1 = const() {name="w"} : f32[4]'
    assert msg == "weight 'w' has two const nodes"


# --------------------------------------------------------------------------- several at once


def test_every_problem_is_reported_at_once():
    w = const("w", (16, 8))
    nodes = [
        node("frobnicate", [X]),                               # %0 unknown op
        w,                                                     # %1 fine
        node("linear", [X, w], shape=(B, 7)),                  # %2 wrong N
        node("softmax", [X]),                                  # %3 missing attribute
        const("c", (T, 2)),                                    # %4 undeclared symbol
    ]
    stray = node("relu", [X])
    with pytest.raises(VerificationError) as e:
        verify(graph(nodes, outputs=[nodes[2].out, stray.out]))
    assert e.value.problems == [
        ("%0 = frobnicate(%x) : f32[b, 8]", "unknown op 'frobnicate'; expected one of " + ", ".join(sorted(OPS))),
        ("%2 = linear(%x, %1) : f32[b, 7]", "result 0 declared f32[b, 7], but linear of these operands gives f32[b, 16]"),
        ("%3 = softmax(%x) : f32[b, 8]", "softmax needs attribute 'axis'"),
        ('%4 = const() {name="c"} : f32[t, 2]', "dim t of f32[t, 2] uses size symbols ['t'] that the graph does not declare"),
        ("return", "output 1 is not defined in the graph"),
    ]
    assert str(e.value).startswith("graph @g failed verification (5 problems):\n  %0 = frobnicate(%x) : f32[b, 8]\n")


def test_quantized_weight_type_is_accepted_by_linear():
    fmt = IntFormat(4, True, Scaling("group", 8))
    w = Node.create("const", (), {"name": "w"}, [TensorType((16, 8), fmt, Layout(bits=4, axis=1))])
    g = graph([w, node("linear", [X, w], shape=(B, 16))])
    assert verify(g) is g


# --------------------------------------------------------------------------- parser errors

GOOD = """\
graph @g(%x: f32[b, 8]) {
  dim b in [1, oo]
  %0 = relu(%x) : f32[b, 8]
  %1:2 = torch(%0) {target="aten.max.dim", args=[$0, -1]} : (f32[b], i64[b])
  return %0, %1#1
}
"""


def parse_error(text: str) -> str:
    with pytest.raises(ParseError) as e:
        parse(text)
    assert isinstance(e.value, ValueError)
    return str(e.value)


def test_good_text_parses():
    g = verify(parse(GOOD))
    assert str(g) == GOOD
    assert g.outputs[1].type == TensorType((B,), I64)


@pytest.mark.parametrize(
    "old,new,expected",
    [
        # header
        ("graph @g(", "graph g(", "line 1: expected 'graph @name(%arg: TYPE, ...) {', got 'graph g(%x: f32[b, 8]) {'"),
        ("f32[b, 8]) {", "f32[b, 8])", "line 1: expected 'graph @name(%arg: TYPE, ...) {', got 'graph @g(%x: f32[b, 8])'"),
        ("(%x: f32", "(x: f32", "line 1: expected '%name: TYPE' for argument 0, got 'x: f32[b, 8]'"),
        ("(%x: f32[b, 8])", "(%x: f32[b, 8], %x: f16[4])", "line 1: argument %x is defined twice"),
        ("(%x: f32[b, 8])", "(%x: f33[b, 8])", "line 1: unknown dtype 'f33'; expected one of f64, f32,"),
        # body lines
        ("dim b in [1, oo]", "dim b in [1, many]",
         "line 2: expected 'dim', '%N = op(...) : TYPE' or 'return', got 'dim b in [1, many]'"),
        ("%0 = relu(%x)", "%0 = relu(%y)", "line 3: '%y' is not a value defined above"),
        ("%0 = relu(%x)", "%0 = relu(%1)", "line 3: '%1' is not a value defined above"),
        ("%0 = relu(%x)", "%0 = relu(%x#1)", "line 3: '%x#1' does not name a result; %x has 1, expected %x"),
        ("return %0, %1#1", "return %0, %1", "line 5: '%1' does not name a result; %1 has 2, expected %1#0..%1#1"),
        ("return %0, %1#1", "return %0, %1#2", "line 5: '%1#2' does not name a result; %1 has 2, expected %1#0..%1#1"),
        ("return %0, %1#1", "return %0, %7", "line 5: '%7' is not a value defined above"),
        ("%1:2 = torch", "%0:2 = torch", "line 4: %0 is defined twice"),
        (": f32[b, 8]\n  %1", ": f33[b, 8]\n  %1", "line 3: unknown dtype 'f33'; expected one of"),
        (": f32[b, 8]\n  %1", ": f32[b, 8\n  %1", "line 3: malformed tensor type 'f32[b, 8'; expected DTYPE[dims]"),
        (": f32[b, 8]\n  %1", ": f32[b, 1.5]\n  %1", "line 3: malformed dim expression '1.5'; expected an integer"),
        (": f32[b, 8]\n  %1", ": int4<sym>[b, 8]\n  %1", "line 3: malformed integer format 'int4<sym>'; expected intN<"),
        (": f32[b, 8]\n  %1", " f32[b, 8]\n  %1", "line 3: expected ' : TYPE' after the operands and attributes"),
        ("(f32[b], i64[b])", "(f32[b])", "line 4: declares 2 results but 1 types"),
        ("args=[$0, -1]", "args=[$0, -1", "line 4: expected ' : TYPE' after the operands and attributes"),
        ("args=[$0, -1]", "args=[$0, -1], x=@", "line 4: malformed dim expression '@'; expected an integer expression"),
        ("args=[$0, -1]", "args=[$0, {\"k\" 1}]", "line 4: malformed dict item '\"k\" 1' in '{\"k\" 1}'; expected \"KEY\": VALUE"),
        ("args=[$0, -1]", "args=", "line 4: empty attribute value"),
        ("%0 = relu", "%0 == relu", "line 3: expected 'dim', '%N = op(...) : TYPE' or 'return', got '%0 == relu(%x) : f32[b, 8]'"),
        # the end
        ("  return %0, %1#1\n", "", "line 5: expected 'dim', '%N = op(...) : TYPE' or 'return', got '}'"),
        ("  return %0, %1#1\n}\n", "", "line 4: unexpected end of IR text: expected 'return ...' and '}'"),
        ("}\n", "", "line 5: unexpected end of IR text: expected 'return ...' and '}'"),
        ("}\n", "  %2 = relu(%0) : f32[b, 8]\n}\n", "line 6: expected '}' after return, got '%2 = relu(%0) : f32[b, 8]'"),
        ("}\n", "}\n%9 = relu(%0) : f32[b, 8]\n", "line 7: expected the end of the IR text after '}'"),
    ],
)
def test_parse_errors_name_line_and_expected_form(old, new, expected):
    assert old in GOOD
    msg = parse_error(GOOD.replace(old, new, 1))
    assert msg.startswith(expected), msg


def test_parse_error_line_numbers_count_blank_and_comment_lines():
    text = "\n# header comment\n" + GOOD.replace("%0 = relu(%x)", "%0 = relu(%nope)")
    assert parse_error(text) == "line 5: '%nope' is not a value defined above"


def test_parse_empty_text():
    assert parse_error("") == "empty IR text: expected 'graph @name(...) {'"
    assert parse_error("\n  \n# only a comment\n") == "empty IR text: expected 'graph @name(...) {'"
