"""The bandwidth model of `mxc.cost`: bytes moved over bandwidth plus launches, outliers
costing the gather and a second GEMM, an activation's quantize pass, a KV cache's reads at a
context, bad input named."""

import pytest

from mxc.cost import BandwidthModel
from mxc.ir import parse_format
from mxc.passes.allocate import Choice
from mxc.passes.quantize import stored_bytes


@pytest.mark.parametrize("fmt", ["int4<asym,g128>", "int3<asym,g128>", "int8<sym,channel>"])
def test_time_is_bytes_over_bandwidth_plus_a_launch(fmt):
    n, k = 1536, 576
    f = parse_format(fmt)
    c = Choice("mlp.up_proj:weight", f, stored_bytes(f, (n, k)), f.effective_bits(k), n * k, 0.1)
    model = BandwidthModel(bandwidth=2e12, launch=4e-6, tokens=3)
    expected = (c.bytes + 3 * (n + k) * 2) / 2e12 + 4e-6
    assert model.seconds(c, (n, k)) == pytest.approx(expected, rel=1e-12)
    fewer = BandwidthModel(bandwidth=2e12, launch=4e-6, tokens=1)
    assert fewer.seconds(c, (n, k)) < model.seconds(c, (n, k))


def test_outliers_add_the_gather_and_a_second_gemm():
    n, k = 576, 576
    plain = Choice("a:weight", parse_format("int4<asym,g128>"), 1000, 4.5, n * k, 0.1)
    split = Choice("a:weight", parse_format("int4<asym,g128>"), 1000, 4.5, n * k, 0.1, outliers=16)
    model = BandwidthModel()
    extra = model.seconds(split, (n, k)) - model.seconds(plain, (n, k))
    assert extra == pytest.approx((2 * k + n) * 2 / model.bandwidth + model.launch, rel=1e-9)


def test_activation_choices_cost_a_quantize_pass_and_float_ones_nothing():
    """An int8 activation of K channels: a quantize kernel reading fp16 and writing codes
    (`Choice.bits`), and the GEMM reading codes in place of fp16 (M·K·2·b/8
    over the bandwidth plus one launch); the float activation adds nothing."""
    k = 1536
    f = parse_format("int8<sym,token>")
    act = Choice("mlp.down_proj:act", f, 0, f.effective_bits(k), 0, 0.1)
    model = BandwidthModel(bandwidth=2e12, launch=4e-6, tokens=5)
    assert model.seconds(act, (k,)) == pytest.approx(5 * k * 2 * act.bits / 8 / 2e12 + 4e-6, rel=1e-12)
    assert model.seconds(Choice("mlp.down_proj:act", None, 0, 32.0, 0, 0.0), (k,)) == 0.0
    with pytest.raises(ValueError, match=r"mlp.down_proj:act needs its input channels \(K,\), got None"):
        model.seconds(act, None)


def test_kv_choices_cost_their_reads_at_a_context_and_nothing_without_one():
    """A KV cache of W = 2·3·64 elements per token read over `context` tokens per step: its
    format's bits per element (a float cache: fp16); context 0 prices every KV choice at 0."""
    w = 2 * 3 * 64
    f = parse_format("int4<sym,g64>")
    q = Choice("layers.0.self_attn:kv", f, 0, f.effective_bits(64), 0, 0.2)
    fl = Choice("layers.0.self_attn:kv", None, 0, 32.0, 0, 0.0)
    model = BandwidthModel(bandwidth=1e12, tokens=2, context=4000)
    assert model.seconds(fl, (w,)) == pytest.approx(2 * 4000 * w * 2 / 1e12, rel=1e-12)
    assert model.seconds(q, (w,)) == pytest.approx(2 * 4000 * w * q.bits / 8 / 1e12, rel=1e-12)
    assert model.seconds(q, (w,)) < model.seconds(fl, (w,)) / 3  # 4.25 bits against 16
    assert BandwidthModel().seconds(q, None) == BandwidthModel().seconds(fl, None) == 0.0
    with pytest.raises(ValueError, match=r"self_attn:kv needs its K and V elements per token \(W,\), got None"):
        model.seconds(q, None)
    assert "4000 cached tokens read per step" in model.describe() and model.to_dict()["context"] == 4000
    with pytest.raises(ValueError, match="context must be a positive number or 0, got -1"):
        BandwidthModel(context=-1)


def test_weights_need_a_shape_and_the_model_says_it_is_an_estimate():
    model = BandwidthModel()
    with pytest.raises(ValueError, match=r"a:weight needs its weight's \[N, K\] shape, got None"):
        model.seconds(Choice("a:weight", None, 64, 32.0, 16, 0.0), None)
    assert "an estimate, not measured" in model.describe() and model.to_dict()["measured"] is False
