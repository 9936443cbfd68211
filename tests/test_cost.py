"""The bandwidth model of `mxc.cost`: bytes moved over bandwidth plus launches, outliers
costing the gather and a second GEMM, activations and KV choices free, bad input named."""

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


def test_activation_and_kv_choices_cost_nothing_and_weights_need_a_shape():
    model = BandwidthModel()
    assert model.seconds(Choice("a:act", parse_format("int8<sym,token>"), 0, 8.0, 0, 0.1), None) == 0.0
    with pytest.raises(ValueError, match=r"a:weight needs its weight's \[N, K\] shape, got None"):
        model.seconds(Choice("a:weight", None, 64, 32.0, 16, 0.0), None)
    assert "an estimate, not measured" in model.describe() and model.to_dict()["measured"] is False
