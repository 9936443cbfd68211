"""`mxc.export_onnx`: compiled models (float and quantized) written as standard ONNX, checked
by `onnx.checker` (full check) and run by `onnx.reference.ReferenceEvaluator` against the
compiled model (the reference backend) on fresh token ids of a batch and sequence length
other than the ones the model was captured with ([2, 16])."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator

import mxc
from mxc import Plan, Rule
from mxc.onnx_export import ATEN_OPS, OnnxExportError, export_onnx

T = TensorProto
#: Float and weight-only graphs match to float32 rounding (measured: <= 5e-7 of max |logit|).
EXACT = 1e-5
#: Graphs with quantized activations: the ONNX form dequantizes before a float32 MatMul where
#: the reference accumulates integer products exactly, so an activation code downstream may
#: round to its neighbour. Measured over 15 random shapes (b 1..3, s 1..39) on the tiny Llama:
#: max error 2.1e-3 (fp8), 1.8e-3 (w8a8), 2.6e-4 (mx formats) of max |logit|; the median error
#: stays at float32 rounding (<= 3.3e-7), which the median check below holds to.
ROUNDING = 5e-3

MIXED = Plan(
    rules=[
        Rule("*.mlp.*", weight="int3<asym,g32>"),                          # UINT4, 3 blocks of K=72, 4 of K=100
        Rule("*.q_proj", weight="int4<sym,g32>", act="int8<sym,g32>"),     # INT4, blocked activations
        Rule("*.k_proj", weight="int5<sym,channel>", act="int6<asym,token>"),  # INT8 container, asym acts
        Rule("*", op="attention", kv="int8<sym,token>"),                   # int8 KV cache
        Rule("lm_head", weight=None),
    ],
    default=Rule(weight="int8<asym,g32>"),
    name="mixed",
)
MICROSCALED = Plan(
    rules=[
        Rule("*.mlp.*", weight="mxfp4", act="mxfp4"),       # e8m0 activation scales
        Rule("*.q_proj", weight="nvfp4", act="nvfp4"),      # fp8 block scales and a global scale at run time
        Rule("*.k_proj", weight="mxfp6", act="mxfp6"),      # FLOAT6E2M3 (opset 28)
        Rule("*", op="attention", kv="fp8e5m2<token>"),
        Rule("lm_head", weight=None),
    ],
    default=Rule(weight="fp8e5m2<channel>", act="fp8e4m3<g32>"),
    name="microscaled",
)

# id, plan, opset asked for, tolerance, the opset written, initializer types that must appear
CASES = [
    ("float", None, None, EXACT, 21, set()),
    ("w8a16", "w8a16", None, EXACT, 21, {T.INT8, T.FLOAT16}),
    ("w4a16-g128", "w4a16-g128", None, EXACT, 21, {T.UINT4}),  # asymmetric int4: UINT4 codes, UINT4 zero points
    ("w2a16-g64", "w2a16-g64", None, EXACT, 25, {T.UINT2}),
    ("nvfp4", "nvfp4", None, EXACT, 23, {T.FLOAT4E2M1, T.FLOAT8E4M3FN}),
    ("mxfp6-opset23", "mxfp6", 23, EXACT, 23, {T.FLOAT8E4M3FN}),  # fp6 in the e4m3 container below opset 28
    ("w8a8", "w8a8", None, ROUNDING, 21, {T.INT8}),
    ("fp8", "fp8", None, ROUNDING, 21, {T.FLOAT8E4M3FN}),
    ("w4a4-kv4", "w4a4-kv4", None, ROUNDING, 21, {T.UINT4}),
    ("mixed", MIXED, None, ROUNDING, 21, {T.INT4, T.UINT4, T.INT8, T.UINT8}),
    ("microscaled", MICROSCALED, None, ROUNDING, 28, {T.FLOAT4E2M1, T.FLOAT6E2M3, T.FLOAT8E5M2}),
]


def _compile(model, plan, example_inputs=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no calibration data": round to nearest is what is exported
        return mxc.compile(model, plan, example_inputs=example_inputs)


@pytest.fixture(scope="module")
def compiled(tiny_llama):
    """`compiled(key, plan)`: the tiny Llama compiled with `plan`, once per key in this module."""
    cache = {}

    def get(key, plan):
        if key not in cache:
            cache[key] = _compile(tiny_llama, plan)
        return cache[key]
    return get


@pytest.fixture(scope="module")
def ids():
    """Fresh token ids, batch 3 and sequence 11 (the model was captured at [2, 16])."""
    return torch.randint(0, 131, (3, 11), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def float_logits(compiled, ids):
    return compiled("float", None)(ids).logits


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_export_runs_like_the_reference(case, compiled, ids, float_logits, tmp_path):
    name, plan, opset, tol, written, types = case
    cm = compiled(name.removesuffix("-opset23"), plan)
    path = tmp_path / f"{name}.onnx"
    mxc.export_onnx(cm, path, opset=opset)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == written

    got = ReferenceEvaluator(model).run(None, {"input_ids": ids.numpy()})[0]
    want = cm(ids).logits.numpy()
    scale = np.abs(want).max()
    err = np.abs(got - want)
    assert got.shape == want.shape == (3, 11, 131)
    assert err.max() <= tol * scale, f"{name}: max error {err.max() / scale:.2e} of max |logit| > {tol}"
    assert np.median(err) <= 1e-6 * scale, f"{name}: median error {np.median(err) / scale:.2e} of max |logit|"
    if plan is not None:  # the check tells formats apart: the quantized model is far from the float one
        assert np.median(np.abs(want - float_logits.numpy())) > 100e-6 * scale

    stored = {t.data_type for t in model.graph.initializer}
    assert types <= stored, f"{name}: expected {[T.DataType.Name(t) for t in types]} among " \
                            f"{[T.DataType.Name(t) for t in stored]}"
    if plan is None:
        assert stored == {T.FLOAT, T.INT64}
        assert "DequantizeLinear" not in {n.op_type for n in model.graph.node}


def test_weights_are_stored_transposed_with_block_scales(compiled):
    """A linear's codes are [K, N] (as torch.onnx stores weights) with their group scales along
    K: DequantizeLinear(axis=0, block_size=32), three blocks for K=72 (the last one short)."""
    model = export_onnx(compiled("mixed", MIXED))
    q = _initializer(model, "model.layers.0.self_attn.q_proj.weight")
    assert q.data_type == T.INT4 and list(q.dims) == [72, 72]
    up = _initializer(model, "model.layers.0.mlp.up_proj.weight")
    assert up.data_type == T.UINT4 and list(up.dims) == [72, 100]  # int3 asym in UINT4
    down_scale = next(t for t in model.graph.initializer
                      if t.name.startswith("model.layers.0.mlp.down_proj.weight.scale"))
    assert list(down_scale.dims) == [4, 72]  # ceil(100 / 32) blocks by N=72 outputs
    k = _initializer(model, "model.layers.0.self_attn.k_proj.weight")
    assert k.data_type == T.INT8 and list(k.dims) == [72, 24]  # int5 in INT8
    blocked = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 32 for a in n.attribute)]
    assert blocked and all(next(a.i for a in n.attribute if a.name == "axis") in (0, 2) for n in blocked)


def test_dynamic_dims_and_names(compiled):
    """Inputs and outputs keep the model's names; batch and sequence are `dim_param`s."""
    model = export_onnx(compiled("w8a8", "w8a8"))

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, dims(inp), inp.type.tensor_type.elem_type) == ("input_ids", ["b", "s"], T.INT64)
    assert (out.name, dims(out)) == ("logits", ["b", "s", 131])
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize) == 2 * 4  # per layer: q/k/v input, o_proj, gate/up input, down_proj
    ev = ReferenceEvaluator(model)
    for shape in [(1, 1), (2, 37)]:
        ids = torch.randint(0, 131, shape, generator=torch.Generator().manual_seed(sum(shape)))
        assert ev.run(None, {"input_ids": ids.numpy()})[0].shape == (*shape, 131)


def test_bert_float_matches(minilm):
    """all-MiniLM-L6-v2 (BertModel): LayerNormalization, Gelu, biases, a float attention mask
    built from torch fallbacks (aten.gather, aten.ge, aten.select) and two outputs."""
    model, _ = minilm
    compiled = _compile(model, None)
    assert set(compiled.report().fallbacks) <= set(ATEN_OPS)
    exported = export_onnx(compiled)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    want = compiled(ids)
    got = dict(zip([o.name for o in exported.graph.output],
                   ReferenceEvaluator(exported).run(None, {"input_ids": ids.numpy()})))
    assert set(got) == {"last_hidden_state", "pooler_output"}
    for key, value in got.items():
        ref = getattr(want, key).numpy()
        assert np.abs(value - ref).max() <= EXACT * np.abs(ref).max(), key


def test_tiny_llama_fallbacks_are_mapped(compiled):
    assert set(compiled("float", None).report().fallbacks) <= set(ATEN_OPS)


class _CumProd(torch.nn.Module):
    def forward(self, x):
        return torch.cumprod(x, -1) + 1


def test_unmapped_aten_op_is_named():
    cm = _compile(_CumProd(), None, example_inputs=(torch.randn(2, 5),))
    with pytest.raises(OnnxExportError, match=r"aten op 'aten\.cumprod\.default' has no ONNX mapping") as err:
        export_onnx(cm)
    assert "torch(%x)" in str(err.value) and "aten.cumsum.default" in str(err.value)  # the node, what is mapped


def test_opset_out_of_range_and_too_low_for_float_activations(compiled):
    cm = compiled("microscaled", MICROSCALED)
    with pytest.raises(OnnxExportError, match="opset must be in 21..28"):
        export_onnx(cm, opset=20)
    with pytest.raises(OnnxExportError, match=r"activations in fp4e2m1<block16,scale=fp8e4m3,global> need opset 23") \
            as err:
        export_onnx(cm, opset=21)
    assert 'quantize(%0) {format=fp4e2m1<block16,scale=fp8e4m3,global>}' in str(err.value)  # the node, in its region
    assert 'loc("model.layers.0.self_attn.q_proj")' in str(err.value)


def test_large_models_are_saved_as_external_data_and_checked_by_path(compiled, ids, monkeypatch, tmp_path):
    """Initializers over `EXTERNAL_DATA_BYTES` (here every one: the limit set to 0) go to
    `{path}.data` and the model is checked from its files, as a model over protobuf's 2 GB must
    be; the model returned runs like the reference. Without a path such a model is refused."""
    import mxc.onnx_export as onnx_export_module

    monkeypatch.setattr(onnx_export_module, "EXTERNAL_DATA_BYTES", 0)
    cm = compiled("w4a16-g128", "w4a16-g128")
    path = tmp_path / "llama-w4.onnx"
    model = export_onnx(cm, path)
    assert (tmp_path / "llama-w4.onnx.data").stat().st_size > path.stat().st_size  # the weights are out of the proto
    codes = _initializer(onnx.load(path, load_external_data=False), "model.layers.0.mlp.up_proj.weight")
    assert codes.data_location == T.EXTERNAL and codes.data_type == T.UINT4
    got = ReferenceEvaluator(model).run(None, {"input_ids": ids.numpy()})[0]
    want = cm(ids).logits.numpy()
    assert np.abs(got - want).max() <= EXACT * np.abs(want).max()
    with pytest.raises(OnnxExportError, match=r"take more than 0 bytes.*pass path= to save them as external data"):
        export_onnx(cm)
