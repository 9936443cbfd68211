"""The reference backend, op by op: a one-op graph with symbolic dims, built by hand and
verified, runs with `check_shapes=True` and must equal the direct torch computation
(exactly where both run the same torch op, to rtol 1e-6 against an independent formula).
Then the input checks of `bind_inputs` and the executor's errors, which must name the
argument or node, what was expected and what came."""

from __future__ import annotations

import re

import pytest
import sympy
import torch
import torch.nn.functional as F

from mxc.ir import (
    BF16,
    DEVICE,
    F16,
    F32,
    F64,
    I64,
    OPS,
    DimRange,
    DType,
    Graph,
    Node,
    Ref,
    IntFormat,
    TensorType,
    VerificationError,
    parse_format,
    sym,
    verify,
)
from mxc.ir.ops import quant_parts
from mxc.runtime import ExecutionError, InputError, ReferenceExecutor, bind_inputs
from mxc.runtime.reference import IMPLS

B, S, T = sym("b"), sym("s"), sym("t")
DIMS = (DimRange("b", 1, 6), DimRange("s", 1, 40), DimRange("t", 1, 40))
#: (b, s) pairs every shape-generic graph runs at: size 1 and sizes that are not powers of two.
SIZES = [(1, 1), (3, 7), (2, 13)]


# --------------------------------------------------------------------------- helpers


def one_op(op, operands, attrs=None, types=None, *, dims=DIMS, extra=()):
    """A verified graph computing `op` once. `operands` is a list of (name, spec): a
    `TensorType` makes a graph input, a tensor a named weight read by a `const` node. The
    result types come from the op's own type rule unless `types` is given. `extra` inputs
    (name, type) are only there to bind size symbols the operands do not have."""
    inputs, consts, weights, values = [], [], {}, []
    for name, spec in operands:
        if isinstance(spec, torch.Tensor):
            node = Node.create("const", (), {"name": name}, [TensorType(tuple(spec.shape), DType.from_torch(spec.dtype))])
            consts.append(node)
            weights[name] = spec
        else:
            node = Node.create("input", (), {"name": name, "index": len(inputs)}, [spec])
            inputs.append(node)
        values.append(node.out)
    for name, spec in extra:
        inputs.append(Node.create("input", (), {"name": name, "index": len(inputs)}, [spec]))
    attrs = dict(attrs or {})
    if types is None:
        types = OPS[op].infer([v.type for v in values], attrs)
    node = Node.create(op, values, attrs, types)
    bound = {d for n in inputs for d in n.types[0].shape if isinstance(d, sympy.Symbol)}
    dims = tuple(d for d in dims if sym(d.name) in bound)  # only symbols a call can bind
    return verify(Graph(f"one_{op}", tuple(inputs), (*consts, node), node.outs, dims, weights))


def run(graph, *inputs):
    """The graph's outputs on `inputs`, with every result checked against its declared type."""
    return ReferenceExecutor(graph, check_shapes=True)(list(inputs))


def run1(graph, *inputs):
    (out,) = run(graph, *inputs)
    return out


def exact(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    assert torch.equal(got, want), f"max abs diff {(got.double() - want.double()).abs().max().item()}"


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def test_every_op_of_the_reference_backend_is_covered():
    # Guards this file: a rule added to IMPLS must get a test here.
    tested = {
        "linear", "matmul", "embedding", "rms_norm", "layer_norm", "add", "mul", "silu", "relu",
        "tanh", "gelu", "softmax", "attention", "rope", "cast", "reshape", "transpose", "permute",
        "unsqueeze", "expand", "slice", "cat", "torch", "quantize", "dequantize",
    }
    # tested with the pass that makes them: qlinear in tests/passes/test_fold.py (against the
    # dequantized product in float64), gather in tests/passes/test_reorder.py
    tested |= {"qlinear", "gather"}
    # onnx (ONNX ops run by onnx.reference): tests/frontends/onnx, its conformance tests above all
    tested |= {"onnx"}
    assert set(IMPLS) == tested


# --------------------------------------------------------------------------- dense ops


@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias):
    w, bvec = randn(11, 13), randn(11)
    operands = [("x", TensorType((B, S, 13), F32)), ("w", w)] + ([("bias", bvec)] if bias else [])
    g = one_op("linear", operands)
    assert g.outputs[0].type == TensorType((B, S, 11), F32)
    for b, s in SIZES:
        x = randn(b, s, 13)
        want = x @ w.T + bvec if bias else x @ w.T
        close(run1(g, x), want)
        exact(run1(g, x), F.linear(x, w, bvec if bias else None))


def test_matmul_broadcasts_batch_dims():
    g = one_op("matmul", [("a", TensorType((B, 3, S, 11), F32)), ("m", TensorType((1, 3, 11, 5), F32))])
    assert g.outputs[0].type == TensorType((B, 3, S, 5), F32)
    for b, s in SIZES:
        a, m = randn(b, 3, s, 11), randn(1, 3, 11, 5)
        close(run1(g, a, m), (a.unsqueeze(-1) * m.unsqueeze(-3)).sum(-2))
        exact(run1(g, a, m), torch.matmul(a, m))


def test_matmul_with_weight():
    w = randn(9, 6)
    g = one_op("matmul", [("a", TensorType((B, S, 9), F32)), ("w", w)])
    x = randn(3, 7, 9)
    close(run1(g, x), (x.unsqueeze(-1) * w).sum(-2))


def test_embedding():
    table = randn(29, 9)
    g = one_op("embedding", [("ids", TensorType((B, S), I64)), ("table", table)])
    assert g.outputs[0].type == TensorType((B, S, 9), F32)
    for b, s in SIZES:
        ids = torch.randint(0, 29, (b, s))
        exact(run1(g, ids), table[ids])


def hf_rms_norm(x, w, eps):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(x.shape[-1], eps=eps)
    with torch.no_grad():
        norm.weight.copy_(w)
        return norm(x)


@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_rms_norm_equals_hf_llama_rms_norm_exactly(eps):
    w = randn(19)
    g = one_op("rms_norm", [("x", TensorType((B, S, 19), F32)), ("w", w)], {"eps": eps})
    for b, s in SIZES:
        x = randn(b, s, 19) * 3
        exact(run1(g, x), hf_rms_norm(x, w, eps))


def test_rms_norm_without_weight():
    g = one_op("rms_norm", [("x", TensorType((B, S, 19), F32))], {"eps": 1e-3})
    x = randn(3, 7, 19) * 0.05  # small, so eps matters
    exact(run1(g, x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-3))
    x64 = x.double()
    close(run1(g, x).double(), x64 / (x64.pow(2).mean(-1, keepdim=True) + 1e-3).sqrt())


@pytest.mark.parametrize("params", ["none", "weight", "weight+bias"])
def test_layer_norm(params):
    w, bias = randn(17), randn(17)
    operands = [("x", TensorType((B, S, 17), F32))]
    if params != "none":
        operands.append(("w", w))
    if params == "weight+bias":
        operands.append(("bias", bias))
    g = one_op("layer_norm", operands, {"eps": 1e-3})
    for b, s in SIZES:
        x = randn(b, s, 17) * 0.1 + 0.5
        x64 = x.double()
        want = (x64 - x64.mean(-1, keepdim=True)) / (x64.var(-1, unbiased=False, keepdim=True) + 1e-3).sqrt()
        if params != "none":
            want = want * w.double()
        if params == "weight+bias":
            want = want + bias.double()
        got = run1(g, x)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        exact(got, F.layer_norm(x, (17,), w if params != "none" else None, bias if params == "weight+bias" else None, 1e-3))


@pytest.mark.parametrize("op", ["add", "mul"])
def test_binary_broadcasting(op):
    fn = torch.add if op == "add" else torch.mul
    # input [b, 1, 7] with input [1, s, 7]
    g = one_op(op, [("a", TensorType((B, 1, 7), F32)), ("c", TensorType((1, S, 7), F32))])
    assert g.outputs[0].type == TensorType((B, S, 7), F32)
    for b, s in SIZES:
        a, c = randn(b, 1, 7), randn(1, s, 7)
        exact(run1(g, a, c), fn(a, c))
    # input with a lower-rank weight on either side
    w = randn(7)
    for operands in ([("a", TensorType((B, S, 7), F32)), ("w", w)], [("w", w), ("a", TensorType((B, S, 7), F32))]):
        g = one_op(op, operands)
        a = randn(3, 5, 7)
        exact(run1(g, a), fn(a, w))


@pytest.mark.parametrize(
    "op, attrs, fn",
    [
        ("silu", {}, F.silu),
        ("relu", {}, F.relu),
        ("tanh", {}, torch.tanh),
        ("gelu", {"approximate": "none"}, lambda x: F.gelu(x)),
        ("gelu", {"approximate": "tanh"}, lambda x: F.gelu(x, approximate="tanh")),
    ],
)
def test_activations(op, attrs, fn):
    g = one_op(op, [("x", TensorType((B, S, 23), F32))], attrs)
    for b, s in SIZES:
        x = randn(b, s, 23) * 3
        exact(run1(g, x), fn(x))


def test_activations_against_formulas():
    x = randn(5, 7, 23) * 3
    x64 = x.double()
    formulas = {
        ("silu", "-"): x64 * torch.sigmoid(x64),
        ("relu", "-"): x64.clamp_min(0),
        ("tanh", "-"): torch.tanh(x64),
        ("gelu", "none"): 0.5 * x64 * (1 + torch.erf(x64 / 2**0.5)),
        ("gelu", "tanh"): 0.5 * x64 * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x64 + 0.044715 * x64**3))),
    }
    for (op, approx), want in formulas.items():
        g = one_op(op, [("x", TensorType((B, S, 23), F32))], {"approximate": approx} if op == "gelu" else {})
        torch.testing.assert_close(run1(g, x).double(), want, rtol=1e-5, atol=1e-6)
    # the two gelu approximations differ: an executor ignoring the attribute fails above
    assert not torch.allclose(formulas[("gelu", "none")], formulas[("gelu", "tanh")], rtol=0, atol=1e-6)


@pytest.mark.parametrize("axis", [-1, 1, 0])
def test_softmax(axis):
    g = one_op("softmax", [("x", TensorType((B, S, 9), F32))], {"axis": axis})
    for b, s in SIZES:
        x = randn(b, s, 9) * 4
        got = run1(g, x)
        exact(got, torch.softmax(x, axis))
        close(got, (x.double().exp() / x.double().exp().sum(axis, keepdim=True)).float())


# --------------------------------------------------------------------------- attention


def manual_attention(q, k, v, mask=None, causal=False, scale=None):
    """softmax(q kᵀ · scale + mask) v in float64, heads already matched."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
    return torch.softmax(logits, -1) @ v


def attention_graph(hq, hkv, d, e, *, mask=None, causal=False, scale=None, kv_len=S):
    operands = [
        ("q", TensorType((B, hq, S, d), F32)),
        ("k", TensorType((B, hkv, kv_len, d), F32)),
        ("v", TensorType((B, hkv, kv_len, e), F32)),
    ]
    if mask is not None:
        operands.append(("mask", mask))
    return one_op("attention", operands, {"causal": causal, "scale": scale})


def qkv(b, s, hq, hkv, d, e, t=None):
    t = s if t is None else t
    return randn(b, hq, s, d), randn(b, hkv, t, d), randn(b, hkv, t, e)


def test_attention_causal():
    g = attention_graph(5, 5, 12, 10, causal=True)
    assert g.outputs[0].type == TensorType((B, 5, S, 10), F32)
    for b, s in SIZES:
        q, k, v = qkv(b, s, 5, 5, 12, 10)
        got = run1(g, q, k, v)
        exact(got, F.scaled_dot_product_attention(q, k, v, is_causal=True))
        close(got.double(), manual_attention(q, k, v, causal=True))


def test_attention_not_causal_with_scale_and_other_kv_length():
    g = attention_graph(3, 3, 12, 12, scale=0.37, kv_len=T)
    for b, s, t in [(1, 1, 1), (2, 5, 9), (3, 11, 4)]:
        q, k, v = qkv(b, s, 3, 3, 12, 12, t)
        got = run1(g, q, k, v)
        exact(got, F.scaled_dot_product_attention(q, k, v, scale=0.37))
        close(got.double(), manual_attention(q, k, v, scale=0.37))
        # the scale is applied: the default scale gives something else
        assert s == 1 and t == 1 or not torch.allclose(got, F.scaled_dot_product_attention(q, k, v))


def test_attention_boolean_mask():
    g = attention_graph(4, 4, 6, 6, mask=TensorType((B, 1, S, S), DType.parse("bool")))
    for b, s in SIZES:
        q, k, v = qkv(b, s, 4, 4, 6, 6)
        mask = torch.rand(b, 1, s, s) < 0.6
        mask[..., 0] = True  # every query sees at least one key
        got = run1(g, q, k, v, mask)
        exact(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        close(got.double(), manual_attention(q, k, v, mask=mask))


def test_attention_float_mask():
    g = attention_graph(4, 4, 6, 6, mask=TensorType((1, 1, S, S), F32), scale=0.5)
    for b, s in SIZES:
        q, k, v = qkv(b, s, 4, 4, 6, 6)
        mask = randn(1, 1, s, s) * 2
        got = run1(g, q, k, v, mask)
        exact(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5))
        close(got.double(), manual_attention(q, k, v, mask=mask, scale=0.5))


@pytest.mark.parametrize("causal", [True, False])
def test_attention_grouped_query_heads(causal):
    g = attention_graph(6, 2, 12, 12, causal=causal, scale=0.3)
    for b, s in SIZES:
        q, k, v = qkv(b, s, 6, 2, 12, 12)
        # query heads 0-2 read kv head 0, 3-5 read kv head 1 (repeat_interleave, as HF's repeat_kv)
        kr, vr = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
        got = run1(g, q, k, v)
        exact(got, F.scaled_dot_product_attention(q, kr, vr, is_causal=causal, scale=0.3))
        close(got.double(), manual_attention(q, kr, vr, causal=causal, scale=0.3))


# --------------------------------------------------------------------------- rope


def rope_tables(s, d, offset):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.arange(offset, offset + s, dtype=torch.float32)
    emb = torch.cat((pos[:, None] * inv_freq[None], pos[:, None] * inv_freq[None]), dim=-1)
    return emb.cos()[None], emb.sin()[None]  # [1, s, d], as LlamaRotaryEmbedding returns them


def test_rope_equals_hf_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    d = 14
    x_q = Node.create("input", (), {"name": "q", "index": 0}, [TensorType((B, 5, S, d), F32)])
    x_k = Node.create("input", (), {"name": "k", "index": 1}, [TensorType((B, 2, S, d), F32)])
    cos = Node.create("input", (), {"name": "cos", "index": 2}, [TensorType((1, 1, S, d), F32)])
    sin = Node.create("input", (), {"name": "sin", "index": 3}, [TensorType((1, 1, S, d), F32)])
    rq = Node.create("rope", [x_q.out, cos.out, sin.out], {}, OPS["rope"].infer([x_q.types[0], cos.types[0], sin.types[0]], {}))
    rk = Node.create("rope", [x_k.out, cos.out, sin.out], {}, OPS["rope"].infer([x_k.types[0], cos.types[0], sin.types[0]], {}))
    g = verify(Graph("rope", (x_q, x_k, cos, sin), (rq, rk), (rq.out, rk.out), DIMS[:2]))
    for b, s in SIZES:
        q, k = randn(b, 5, s, d), randn(b, 2, s, d)
        c, sn = rope_tables(s, d, offset=int(torch.randint(0, 50, ())))
        want_q, want_k = apply_rotary_pos_emb(q, k, c, sn)
        got_q, got_k = run(g, q, k, c[:, None], sn[:, None])
        exact(got_q, want_q)
        exact(got_k, want_k)
        # rotation preserves the norm of each (x_i, x_{i+d/2}) pair
        close(got_q.norm(dim=-1), q.norm(dim=-1))


# --------------------------------------------------------------------------- cast and shape ops


@pytest.mark.parametrize("src, dst", [(F32, F16), (F32, BF16), (F32, I64), (I64, F32), (F16, F64)])
def test_cast(src, dst):
    g = one_op("cast", [("x", TensorType((B, S, 5), src))], {"dtype": dst})
    assert g.outputs[0].type == TensorType((B, S, 5), dst)
    for b, s in SIZES:
        x = (randn(b, s, 5) * 100).to(src.torch)
        exact(run1(g, x), x.to(dst.torch))


def test_reshape_with_minus_one_and_symbolic_dims():
    x_t = TensorType((B, S, 6, 4), F32)
    g1 = one_op("reshape", [("x", x_t)], {"shape": (B, -1, 4)})
    g2 = one_op("reshape", [("x", x_t)], {"shape": (B * S, 24)})
    g3 = one_op("reshape", [("x", x_t)], {"shape": (-1, 3, S, 8)})
    assert g1.outputs[0].type == TensorType((B, 6 * S, 4), F32)
    assert g2.outputs[0].type == TensorType((B * S, 24), F32)
    assert g3.outputs[0].type == TensorType((B, 3, S, 8), F32)
    for b, s in SIZES:
        x = randn(b, s, 6, 4)
        exact(run1(g1, x), x.reshape(b, 6 * s, 4))
        exact(run1(g2, x), x.reshape(b * s, 24))
        exact(run1(g3, x), x.reshape(b, 3, s, 8))


@pytest.mark.parametrize("dim0, dim1", [(1, 2), (0, -1), (-1, -3)])
def test_transpose(dim0, dim1):
    g = one_op("transpose", [("x", TensorType((B, S, 5), F32))], {"dim0": dim0, "dim1": dim1})
    for b, s in [(2, 7), (3, 4)]:
        x = randn(b, s, 5)
        exact(run1(g, x), x.transpose(dim0, dim1))


@pytest.mark.parametrize("dims", [(2, 0, 3, 1), (0, 2, 1, 3), (-1, -2, 0, 1)])
def test_permute(dims):
    g = one_op("permute", [("x", TensorType((B, S, 5, 3), F32))], {"dims": dims})
    for b, s in [(2, 7), (3, 4)]:
        x = randn(b, s, 5, 3)
        exact(run1(g, x), x.permute(dims))


@pytest.mark.parametrize("axis", [0, 1, 3, -1, -2])
def test_unsqueeze(axis):
    g = one_op("unsqueeze", [("x", TensorType((B, S, 5), F32))], {"axis": axis})
    for b, s in SIZES:
        x = randn(b, s, 5)
        exact(run1(g, x), x.unsqueeze(axis))


def test_expand():
    cases = [
        (TensorType((B, 1, 7), F32), (B, S, 7)),
        (TensorType((B, 1, 7), F32), (-1, S, -1)),
        (TensorType((S, 7), F32), (B, -1, -1)),  # a new leading dim
        (TensorType((1, 1, 7), F32), (B, 3, 7)),
    ]
    for x_t, shape in cases:
        # `like` binds b and s where x does not have them
        g = one_op("expand", [("x", x_t)], {"shape": shape}, extra=[("like", TensorType((B, S), F32))])
        for b, s in SIZES:
            x = randn(*[{B: b, S: s}.get(d, d) for d in x_t.shape])
            want_shape = [int(sympy.sympify(d).xreplace({B: b, S: s})) if d != -1 else -1 for d in shape]
            exact(run1(g, x, randn(b, s)), x.expand(want_shape))


@pytest.mark.parametrize(
    "axis, start, end, step, ref",
    [
        (1, 2, 2**63 - 1, 1, lambda x: x[:, 2:]),  # torch's "to the end" sentinel
        (-1, 0, 2**63 - 1, 1, lambda x: x),  # the whole axis
        (2, 1, 6, 2, lambda x: x[:, :, 1:6:2]),
        (2, -4, 2**63 - 1, 1, lambda x: x[:, :, -4:]),
        (2, 0, -1, 3, lambda x: x[:, :, 0:-1:3]),
        (1, 0, S - 1, 1, lambda x: x[:, : x.shape[1] - 1]),  # symbolic end
        (1, 1, S, 2, lambda x: x[:, 1 : x.shape[1] : 2]),
        (1, 0, 1, 1, lambda x: x[:, :1]),
    ],
)
def test_slice(axis, start, end, step, ref):
    g = one_op("slice", [("x", TensorType((B, S, 9), F32))], {"axis": axis, "start": start, "end": end, "step": step})
    for b, s in SIZES + [(2, 2), (1, 5)]:
        x = randn(b, s, 9)
        exact(run1(g, x), ref(x))


def test_cat():
    g = one_op("cat", [("a", TensorType((B, S, 3), F32)), ("c", TensorType((B, S, 5), F32))], {"axis": -1})
    assert g.outputs[0].type == TensorType((B, S, 8), F32)
    g2 = one_op("cat", [("a", TensorType((S, 4), F32)), ("w", randn(2, 4))], {"axis": 0})
    assert g2.outputs[0].type == TensorType((S + 2, 4), F32)
    w = g2.weights["w"]
    g3 = one_op("cat", [("a", TensorType((B, S, 4), F32)), ("c", TensorType((B, T, 4), F32))], {"axis": 1})
    assert g3.outputs[0].type == TensorType((B, S + T, 4), F32)
    for b, s in SIZES:
        a3, a5, a4 = randn(b, s, 3), randn(b, s, 5), randn(b, s, 4)
        exact(run1(g, a3, a5), torch.cat([a3, a5], -1))
        exact(run1(g2, a4[0]), torch.cat([a4[0], w], 0))
        c = randn(b, s + 2, 4)
        exact(run1(g3, a4, c), torch.cat([a4, c], 1))


# --------------------------------------------------------------------------- quantize and dequantize


def quant_dequant_graph(fmt, x_type, dtype=F32):
    """input -> quantize {fmt} -> dequantize {fmt, dtype}: the fake-quantized input."""
    x = Node.create("input", (), {"name": "x", "index": 0}, [x_type])
    q = Node.create("quantize", [x.out], {"format": fmt}, OPS["quantize"].infer([x_type], {"format": fmt}))
    dq = Node.create("dequantize", q.outs, {"format": fmt, "dtype": dtype}, [TensorType(x_type.shape, dtype)])
    return verify(Graph("qdq", (x,), (q, dq), (*q.outs, dq.out), DIMS[:2]))


@pytest.mark.parametrize("text", ["int8<sym,token>", "fp8e4m3<token>", "int4<sym,g32>", "int4<asym,g32>", "nvfp4"])
def test_quantize_then_dequantize_is_the_formats_fake(text):
    fmt = parse_format(text)
    g = quant_dequant_graph(fmt, TensorType((B, S, 72), F32))  # 72 = 2 groups of 32 and one of 8
    parts = quant_parts(fmt)
    assert [t.dtype for t in g.outputs[0].node.types] == [fmt] + [F32] * (len(parts) - 1)
    for b, s in SIZES:
        x = randn(b, s, 72) * torch.rand(b, s, 1) * 10
        *got_parts, got = run(g, x)
        exact(got, fmt.fake(x))
        q = fmt.quantize(x)
        want = {"codes": q.codes, "scale": q.scale, "zero": q.zero, "global": q.global_scale}
        for part, t in zip(parts, got_parts):
            exact(t, want[part])
        assert not torch.equal(got, x)  # it did quantize


def test_per_token_scales_are_one_per_row():
    fmt = parse_format("int8<sym,token>")
    g = quant_dequant_graph(fmt, TensorType((B, S, 72), F32))
    x = randn(3, 7, 72)
    x[1, 2] *= 1000.0  # one loud token does not change the others' scales
    codes, scale, got = run(g, x)
    assert scale.shape == (3, 7, 1)
    torch.testing.assert_close(scale[..., 0], x.abs().amax(-1) / 127, rtol=0, atol=0)
    y = x.clone()
    y[1, 2] = randn(72)
    _, _, other = run(g, y)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 2] = False
    exact(got[mask], other[mask])


def test_dequantize_to_f16():
    fmt = parse_format("int4<sym,g32>")
    g = quant_dequant_graph(fmt, TensorType((B, S, 72), F32), dtype=F16)
    x = randn(2, 5, 72)
    *_, got = run(g, x)
    exact(got, fmt.fake(x).half())


def const_node(name, tensor, t):
    return Node.create("const", (), {"name": name}, [t])


def dequantize_graph(fmt, parts, n, k, *, operands=None):
    """consts holding `parts` (codes in their int8 / f16 storage) -> dequantize {fmt}."""
    names = quant_parts(fmt) if operands is None else operands
    types = dict(zip(quant_parts(fmt), OPS["quantize"].infer([TensorType((n, k), F32)], {"format": fmt})))
    consts = [const_node(f"w.{p}", parts[p], types[p]) for p in names]
    dq = Node.create("dequantize", [c.out for c in consts], {"format": fmt, "dtype": F32}, [TensorType((n, k), F32)])
    weights = {f"w.{p}": parts[p] for p in names}
    return Graph("dq", (), (*consts, dq), (dq.out,), (), weights)


@pytest.mark.parametrize("text", ["int4<asym,g32>", "int3<sym,g64>", "int8<asym,channel>", "mxfp4", "nvfp4", "fp8e5m2<channel>"])
def test_dequantize_from_constants_is_the_formats_dequantize(text):
    from mxc.passes.quantize import storage

    fmt = parse_format(text)
    n, k = 11, 200
    w = randn(n, k) * torch.rand(n, 1) * 4
    q = fmt.quantize(w)
    parts = {"codes": storage(q.codes, fmt), "scale": q.scale, "zero": q.zero, "global": q.global_scale}
    g = verify(dequantize_graph(fmt, parts, n, k))
    got = run1(g)
    exact(got, fmt.dequantize(q))
    close(got, fmt.fake(w))
    # independent formula for integers: (codes - zero) * scale, group by group
    if isinstance(fmt, IntFormat):
        block = fmt.scaling.block(k)
        z = 0 if q.zero is None else q.zero.repeat_interleave(block, -1)[:, :k]
        exact(got, (q.codes - z) * q.scale.repeat_interleave(block, -1)[:, :k])


def test_verify_refuses_a_dequantize_without_its_zero_points():
    fmt = parse_format("int4<asym,g32>")
    q = fmt.quantize(randn(5, 72))
    parts = {"codes": q.codes.to(torch.int8), "scale": q.scale, "zero": q.zero}
    g = dequantize_graph(fmt, parts, 5, 72, operands=("codes", "scale"))
    with pytest.raises(VerificationError) as info:
        verify(g)
    msg = str(info.value)
    assert "int4<asym,g32> is dequantized from codes, scale, zero" in msg and "got 2" in msg
    assert "dequantize(%0, %1)" in msg


def test_verify_refuses_mismatched_quant_parts():
    fmt = parse_format("int4<sym,g32>")
    # scales for groups of 64 where the format has groups of 32
    codes = Node.create("input", (), {"name": "c", "index": 0}, [TensorType((S, 72), fmt)])
    scale = Node.create("input", (), {"name": "sc", "index": 1}, [TensorType((S, 2), F32)])
    dq = Node.create("dequantize", [codes.out, scale.out], {"format": fmt, "dtype": F32}, [TensorType((S, 72), F32)])
    with pytest.raises(VerificationError, match=r"scale must be f32\[s, 3\], got f32\[s, 2\]"):
        verify(Graph("bad", (codes, scale), (dq,), (dq.out,), DIMS[1:2]))
    # codes of another format
    other = Node.create("input", (), {"name": "c", "index": 0}, [TensorType((S, 72), parse_format("int8<sym,g32>"))])
    dq = Node.create("dequantize", [other.out, scale.out], {"format": fmt, "dtype": F32}, [TensorType((S, 72), F32)])
    with pytest.raises(VerificationError, match=r"codes must have type int4<sym,g32>, got int8<sym,g32>\[s, 72\]"):
        verify(Graph("bad", (other, scale), (dq,), (dq.out,), DIMS[1:2]))
    # quantize of an integer tensor
    ids = Node.create("input", (), {"name": "ids", "index": 0}, [TensorType((S, 72), I64)])
    q = Node.create("quantize", [ids.out], {"format": fmt}, [TensorType((S, 72), fmt), TensorType((S, 3), F32)])
    with pytest.raises(VerificationError, match="quantize reads a float tensor"):
        verify(Graph("bad", (ids,), (q,), q.outs, DIMS[1:2]))


# --------------------------------------------------------------------------- torch fallback nodes


def torch_graph(target, operand_types, args, kwargs, types):
    operands = [(f"x{i}", t) for i, t in enumerate(operand_types)]
    attrs = {"target": target, "args": args}
    if kwargs:
        attrs["kwargs"] = kwargs
    return one_op("torch", operands, attrs, types)


def test_torch_fallback_cumsum_with_kwargs():
    g = torch_graph(
        "aten.cumsum.default", [TensorType((B, S, 7), F32)], (Ref(0), 1), {"dtype": F64}, [TensorType((B, S, 7), F64)]
    )
    for b, s in SIZES:
        x = randn(b, s, 7)
        exact(run1(g, x), torch.cumsum(x, 1, dtype=torch.float64))


def test_torch_fallback_multi_output_max_dim():
    g = torch_graph(
        "aten.max.dim",
        [TensorType((B, S, 7), F32)],
        (Ref(0), -1, True),
        None,
        [TensorType((B, S, 1), F32), TensorType((B, S, 1), I64)],
    )
    assert len(g.outputs) == 2
    for b, s in SIZES:
        x = randn(b, s, 7)
        values, indices = run(g, x)
        want = torch.max(x, -1, keepdim=True)
        exact(values, want.values)
        exact(indices, want.indices)


def test_torch_fallback_refs_in_lists_sizes_and_device():
    # cat([$1, $0], 1): operand refs inside a list, in another order than the operands
    g = torch_graph(
        "aten.cat.default",
        [TensorType((B, S, 3), F32), TensorType((B, 2, 3), F32)],
        ((Ref(1), Ref(0)), 1),
        None,
        [TensorType((B, S + 2, 3), F32)],
    )
    # arange(s) with a symbolic size and the runtime device
    g2 = one_op(
        "torch",
        [("x", TensorType((B, S), F32))],
        {"target": "aten.arange.start_step", "args": (1, 2 * S + 1, 2), "kwargs": {"dtype": I64, "device": DEVICE}},
        [TensorType((S,), I64)],
    )
    for b, s in SIZES:
        x, y = randn(b, s, 3), randn(b, 2, 3)
        exact(run1(g, x, y), torch.cat([y, x], 1))
        exact(run1(g2, randn(b, s)), torch.arange(1, 2 * s + 1, 2))


# --------------------------------------------------------------------------- input checks


@pytest.fixture
def two_inputs():
    """x: f32[b, s, 5], y: i64[b, 3], b in [1, 4], s in [1, 16]; returns x * 2 (a mul by a weight)."""
    dims = (DimRange("b", 1, 4), DimRange("s", 1, 16))
    x = Node.create("input", (), {"name": "x", "index": 0}, [TensorType((B, S, 5), F32)])
    y = Node.create("input", (), {"name": "y", "index": 1}, [TensorType((B, 3), I64)])
    w = Node.create("const", (), {"name": "w"}, [TensorType((5,), F32)])
    m = Node.create("mul", [x.out, w.out], {}, [TensorType((B, S, 5), F32)])
    return verify(Graph("two", (x, y), (w, m), (m.out, y.out), dims, {"w": randn(5)}))


def bind(graph, *inputs):
    return bind_inputs(graph, list(inputs), torch.device("cpu"))


def expect_input_error(graph, inputs, *fragments):
    with pytest.raises(InputError) as info:
        bind(graph, *inputs)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    # the executor reports the same error before running anything
    with pytest.raises(InputError, match=re.escape(msg)):
        ReferenceExecutor(graph)(list(inputs))
    return msg


def test_bind_inputs_binds_symbols(two_inputs):
    assert bind(two_inputs, randn(3, 11, 5), torch.randint(0, 9, (3, 3))) == {B: 3, S: 11}
    x = randn(3, 11, 5)
    out, ids = ReferenceExecutor(two_inputs)([x, torch.randint(0, 9, (3, 3))])
    exact(out, x * two_inputs.weights["w"])


def test_input_error_wrong_count(two_inputs):
    expect_input_error(two_inputs, [randn(2, 3, 5)], "@two", "2 input(s)", "x, y", "got 1")
    expect_input_error(two_inputs, [randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), randn(1)], "got 3")


def test_input_error_not_a_tensor(two_inputs):
    expect_input_error(two_inputs, [[1.0, 2.0], torch.randint(0, 9, (2, 3))], "'x'", "expected a tensor", "got list")


def test_input_error_rank(two_inputs):
    expect_input_error(
        two_inputs, [randn(2, 5), torch.randint(0, 9, (2, 3))], "argument 'x'", "expected rank 3", "f32[b, s, 5]", "got rank 2", "[2, 5]"
    )


def test_input_error_dtype(two_inputs):
    expect_input_error(
        two_inputs, [randn(2, 3, 5), randn(2, 3)], "argument 'y'", "expected dtype i64", "torch.int64", "got torch.float32"
    )


def test_input_error_fixed_dim(two_inputs):
    expect_input_error(
        two_inputs, [randn(2, 3, 6), torch.randint(0, 9, (2, 3))], "argument 'x' dim 2", "expected size 5", "got 6"
    )
    expect_input_error(
        two_inputs, [randn(2, 3, 5), torch.randint(0, 9, (2, 4))], "argument 'y' dim 1", "expected size 3", "got 4"
    )


def test_input_error_symbol_out_of_range(two_inputs):
    expect_input_error(
        two_inputs, [randn(2, 17, 5), torch.randint(0, 9, (2, 3))], "argument 'x' dim 1 (s)", "[1, 16]", "got 17"
    )
    expect_input_error(
        two_inputs, [randn(5, 3, 5), torch.randint(0, 9, (5, 3))], "argument 'x' dim 0 (b)", "[1, 4]", "got 5"
    )
    # the bounds themselves are accepted
    assert bind(two_inputs, randn(4, 16, 5), torch.randint(0, 9, (4, 3))) == {B: 4, S: 16}
    assert bind(two_inputs, randn(1, 1, 5), torch.randint(0, 9, (1, 3))) == {B: 1, S: 1}


def test_input_error_inconsistent_symbol(two_inputs):
    expect_input_error(
        two_inputs, [randn(2, 3, 5), torch.randint(0, 9, (3, 3))], "argument 'y' dim 0 (b)", "expected 2", "got 3"
    )


def test_input_error_derived_dim():
    # y's length is 2*s + 1: a dim given by an expression is checked against the bound symbols
    x = Node.create("input", (), {"name": "x", "index": 0}, [TensorType((S,), F32)])
    y = Node.create("input", (), {"name": "y", "index": 1}, [TensorType((2 * S + 1,), F32)])
    g = verify(Graph("derived", (x, y), (), (x.out, y.out), (DimRange("s"),)))
    assert bind(g, randn(4), randn(9)) == {S: 4}
    with pytest.raises(InputError, match=re.escape("argument 'y' dim 0 (2*s + 1): expected 9, got 8")):
        bind(g, randn(4), randn(8))


# --------------------------------------------------------------------------- executor errors


def test_check_shapes_catches_a_wrongly_declared_result():
    # A torch node's types are trusted by the verifier: declare cat([x, x], 1) as [b, s, 5]
    # although it gives [b, 2*s, 5]. Only the run-time check can catch it.
    g = torch_graph("aten.cat.default", [TensorType((B, S, 5), F32)], ((Ref(0), Ref(0)), 1), None, [TensorType((B, S, 5), F32)])
    x = randn(3, 7, 5)
    with pytest.raises(ExecutionError) as info:
        ReferenceExecutor(g, check_shapes=True)([x])
    msg = str(info.value)
    assert "graph @one_torch" in msg and '%0 = torch(%x0) {target="aten.cat.default"' in msg
    assert "[3, 14, 5]" in msg and "f32[b, s, 5]" in msg and "[3, 7, 5]" in msg and "b=3" in msg and "s=7" in msg
    # without the check the wrong shape goes through unnoticed; with MXC_DEBUG the check is on
    assert ReferenceExecutor(g, check_shapes=False)([x])[0].shape == (3, 14, 5)
    from mxc.ir import flags

    with flags.DEBUG.override(True), pytest.raises(ExecutionError, match="but the IR declares f32"):
        ReferenceExecutor(g)([x])


def test_check_shapes_catches_a_wrongly_declared_dtype():
    g = torch_graph("aten.argmax.default", [TensorType((B, S, 5), F32)], (Ref(0), -1), None, [TensorType((B, S), F32)])
    with pytest.raises(ExecutionError, match=r"(?s)aten\.argmax.*produced torch\.int64 \[2, 3\], but the IR declares f32\[b, s\]"):
        ReferenceExecutor(g, check_shapes=True)([randn(2, 3, 5)])


def test_check_shapes_names_the_node_of_a_multi_output_result():
    g = torch_graph(
        "aten.max.dim",
        [TensorType((B, S, 7), F32)],
        (Ref(0), -1),  # keepdim=False: results are [b, s], declared [b, s, 1]
        None,
        [TensorType((B, S, 1), F32), TensorType((B, S, 1), I64)],
    )
    with pytest.raises(ExecutionError, match=re.escape('%0:2 = torch(%x0) {target="aten.max.dim"')):
        run(g, randn(2, 3, 7))


def test_failing_node_is_named():
    table = randn(10, 4)
    g = one_op("embedding", [("ids", TensorType((B, S), I64)), ("table", table)])
    ids = torch.tensor([[1, 2, 10]])  # 10 is out of range
    with pytest.raises(ExecutionError) as info:
        run(g, ids)
    msg = str(info.value)
    assert "graph @one_embedding" in msg
    assert '%1 = embedding(%ids, %0) : f32[b, s, 4]' in msg
    assert "IndexError" in msg
    assert isinstance(info.value.__cause__, IndexError)


def test_failing_torch_node_is_named():
    # a verified torch node that fails at run time: cholesky of a matrix that is not positive definite
    g = torch_graph("aten.linalg_cholesky.default", [TensorType((S, S), F32)], (Ref(0),), None, [TensorType((S, S), F32)])
    spd = randn(5, 5)
    spd = spd @ spd.T + 5 * torch.eye(5)
    exact(run1(g, spd), torch.linalg.cholesky(spd))
    with pytest.raises(ExecutionError, match=r'(?s)graph @one_torch: node %0 = torch\(%x0\) \{target="aten.linalg_cholesky.default".*failed: '):
        run(g, -spd)


def test_op_without_a_rule_is_refused_up_front():
    # `fused` has no rule of its own: the reference backend runs a fused node's body, and a
    # fused node without one is refused
    assert "fused" not in IMPLS
    x = Node.create("input", (), {"name": "x", "index": 0}, [TensorType((B, 4), F32)])
    q = Node.create("fused", [x.out], {}, [TensorType((B, 4), F32)])
    g = Graph("fusedg", (x,), (q,), (q.out,), DIMS)
    with pytest.raises(ExecutionError, match="no rule for op 'fused'"):
        ReferenceExecutor(g)
