"""calibrate: the lazy, layer-by-layer statistics of linear inputs.

Statistics are checked against an independent computation (the reference executor's
observer collecting every linear's input); sequential semantics against a graph whose
weights were replaced by hand; static activation scales end to end: the compiled model
run on the calibration batches sees exactly the abs-max its scales were made from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mxc
from mxc.calibrate import Calibration, calibrate, collect
from mxc.passes.calibrate import TENSOR_BINS
from mxc.driver import calibration_inputs
from mxc.frontends.torch_export import capture
from mxc.ir import parse_format
from mxc.passes import run_pipeline
from mxc.passes.quantize import layer_path
from mxc.runtime import ReferenceExecutor


@pytest.fixture(scope="module")
def graph_and_batches(captured_tiny_llama):
    graph = run_pipeline(captured_tiny_llama.graph, ["canonicalize"]).graph
    gen = torch.Generator().manual_seed(11)
    # batches of different shapes: lockstep execution must not need equal lengths
    ids = [torch.randint(0, 131, shape, generator=gen) for shape in [(1, 37), (2, 23), (1, 50)]]
    batches = calibration_inputs(ids, captured_tiny_llama.call_spec)
    return graph, batches


def linear_inputs(graph, batches, weights=None) -> dict[str, torch.Tensor]:
    """Every linear's input rows over all batches, by an observer on full runs."""
    g = graph if weights is None else graph.replace(weights={**graph.weights, **weights})
    run, rows = ReferenceExecutor(g, check_shapes=False), {}

    def observe(node, operands):
        if node.op == "linear" and node.inputs[1].node.op == "const":
            x = operands[0].reshape(-1, operands[0].shape[-1]).float()
            path = layer_path(node, node.inputs[1].node)
            rows[path] = torch.cat([rows[path], x]) if path in rows else x

    for b in batches:
        run(b, observer=observe)
    return rows


def test_statistics_match_an_independent_computation(graph_and_batches):
    graph, batches = graph_and_batches
    stats = collect(graph, batches)
    rows = linear_inputs(graph, batches)
    assert set(stats) == set(rows) and len(stats) == 2 * 7 + 1  # 7 linears per layer + lm_head
    for path, x in rows.items():
        s = stats[path]
        assert s["rows"] == x.shape[0] == 37 + 46 + 50
        torch.testing.assert_close(s["amax"], x.abs().amax(0))
        want = (x.double().T @ x.double()) / x.shape[0]
        torch.testing.assert_close(s["hessian"], want, rtol=1e-5, atol=1e-7)
        a = x.abs().numpy()
        for p in (99.0, 99.9):
            np.testing.assert_allclose(s["percentiles"][p].numpy(), np.percentile(a, p, axis=0, method="inverted_cdf"))
            exact = float(np.percentile(a, p, method="inverted_cdf"))
            assert exact <= s["tensor_percentiles"][p] <= exact + float(s["amax"].max()) / TENSOR_BINS
        assert (s["percentiles"][99.0] <= s["amax"]).all()


def test_layers_sharing_an_input_share_one_entry(graph_and_batches):
    graph, batches = graph_and_batches
    cal = Calibration(graph, batches)
    q = cal.stats("model.layers.0.self_attn.q_proj")
    assert cal.stats("model.layers.0.self_attn.k_proj") is q
    assert cal.stats("model.layers.0.self_attn.v_proj") is q
    h = q["hessian"]
    # once every reader of the activation has run, its Hessian is freed (bounded memory)
    o = cal.stats("model.layers.0.self_attn.o_proj")
    assert "hessian" not in q and "amax" in q and o is not q and o["hessian"].shape == h.shape
    cal.close()


def test_layers_must_be_asked_for_in_graph_order(graph_and_batches):
    graph, batches = graph_and_batches
    cal = Calibration(graph, batches)
    cal.stats("model.layers.1.mlp.gate_proj")
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj' has already run; ask for layers in graph order"):
        cal.stats("model.layers.0.mlp.down_proj")
    with pytest.raises(ValueError, match="has already run"):
        cal.update("model.layers.0.mlp.down_proj", weight=torch.randn(72, 100))
    with pytest.raises(KeyError, match=r"no linear layer 'model.layers.0.mlp.dwn_proj'; closest: model.layers.0.mlp.down_proj"):
        cal.stats("model.layers.0.mlp.dwn_proj")


def test_updated_layers_feed_the_later_statistics(graph_and_batches):
    """Sequential calibration: after `update`, later layers see the replaced weight and the
    fake-quantized input, exactly as a graph holding those weights would give them."""
    graph, batches = graph_and_batches
    gen = torch.Generator().manual_seed(3)
    w = graph.weights["model.layers.0.self_attn.o_proj.weight"]
    new_w = w + 0.05 * torch.randn(w.shape, generator=gen)
    fmt = parse_format("int4<sym,g32>")
    cal = Calibration(graph, batches)
    cal.stats("model.layers.0.self_attn.o_proj")
    cal.update("model.layers.0.self_attn.o_proj", weight=new_w)
    cal.update("model.layers.0.mlp.down_proj", act=fmt)
    got = cal.stats("model.layers.1.self_attn.q_proj")

    g = graph.replace(weights={**graph.weights, "model.layers.0.self_attn.o_proj.weight": new_w})
    run, xs = ReferenceExecutor(g, check_shapes=False), []

    def observe(node, operands):
        if node.loc == "model.layers.0.mlp.down_proj" and node.op == "linear":
            return [fmt.fake(operands[0]), *operands[1:]]
        if node.loc == "model.layers.1.self_attn.q_proj" and node.op == "linear":
            xs.append(operands[0].reshape(-1, operands[0].shape[-1]))
        return None

    for b in batches:
        run(b, observer=observe)
    x = torch.cat(xs).double()
    torch.testing.assert_close(got["hessian"], x.T @ x / x.shape[0], rtol=1e-5, atol=1e-7)
    float_h = collect(graph, batches)["model.layers.1.self_attn.q_proj"]["hessian"]
    assert not torch.allclose(got["hessian"], float_h, rtol=1e-3)  # the update did change it
    cal.close()


def test_pass_and_validation(graph_and_batches):
    graph, batches = graph_and_batches
    assert calibrate(graph) is graph  # no batches: nothing to do
    out = calibrate(graph, batches=batches)
    assert out is not graph and "calibration" not in graph.meta
    cal = out.meta["calibration"]
    assert cal.for_graph(graph) is cal and cal.for_graph(out) is not cal
    with pytest.raises(ValueError, match="at least one batch"):
        Calibration(graph, [])
    with pytest.raises(ValueError, match=r"percentiles must lie in \(0, 100\), got \[100.0\]"):
        Calibration(graph, batches, percentiles=(99.0, 100.0))


# --------------------------------------------------------------------------- static activation scales


def test_static_activation_scales_are_the_calibrated_abs_max(tiny_llama_factory):
    model = tiny_llama_factory(seed=4, layers=2)
    ids = torch.randint(0, 131, (1, 9))
    calib = [torch.randint(0, 131, (n,), generator=torch.Generator().manual_seed(n)) for n in (40, 33)]
    fmt = parse_format("int8<sym,tensor>")
    plan = {"default": {"weight": "int8<sym,channel>", "act": str(fmt)}, "rules": [{"match": "lm_head"}], "method": "rtn",
            "clip_search": False}
    c = mxc.compile(model, plan, example_inputs=ids, calibration=calib)
    statics = [n for n in c.graph.walk() if n.op == "quantize"]
    assert len(statics) == 14 and all(len(n.inputs) == 2 for n in statics)
    assert "model.layers.0.self_attn.q_proj.input_scale" in c.graph.weights
    # the compiled model, run on the calibration batches, sees exactly the abs-max each scale
    # was made from: calibration ran the layers before each one already quantized
    seen: dict[str, float] = {}

    def observe(node, operands):
        if node.op == "quantize":
            seen[node.loc] = max(seen.get(node.loc, 0.0), float(operands[0].abs().max()))

    run = ReferenceExecutor(c.graph, check_shapes=False)
    for b in calibration_inputs(calib, c.call_spec):
        run(b, observer=observe)
    assert len(seen) == 14
    for path, amax in seen.items():
        want = fmt.quantize(torch.tensor([[amax]])).scale
        torch.testing.assert_close(c.graph.weights[f"{path}.input_scale"], want.reshape(1, 1), rtol=1e-6, atol=0)
    # and it runs on other inputs, saturating what lies beyond the calibrated range
    out = c(ids).logits
    assert torch.isfinite(out).all()


def test_static_activation_scales_need_calibration(tiny_llama):
    ids = torch.randint(0, 131, (1, 7))
    with pytest.raises(Exception, match=r"model.layers.0.self_attn.q_proj: activation format int8<sym,tensor> scales per tensor, statically, from calibration data"):
        mxc.compile(tiny_llama, {"default": {"act": "int8<sym,tensor>"}}, example_inputs=ids)
    calib = [torch.randint(0, 131, (20,))]
    with pytest.raises(Exception, match=r"static activation format int8<asym,tensor> is not supported"):
        mxc.compile(tiny_llama, {"default": {"act": "int8<asym,tensor>"}}, example_inputs=ids, calibration=calib)


def test_static_activation_percentile_clips(tiny_llama_factory):
    model = tiny_llama_factory(seed=4, layers=1)
    ids = torch.randint(0, 131, (1, 9))
    calib = [torch.randint(0, 131, (60,), generator=torch.Generator().manual_seed(1))]
    rule = {"act": "int8<sym,tensor>"}
    full = mxc.compile(model, {"default": rule}, example_inputs=ids, calibration=calib)
    clipped = mxc.compile(model, {"default": {**rule, "options": {"act_percentile": 99.0}}}, example_inputs=ids, calibration=calib)
    name = "model.layers.0.mlp.down_proj.input_scale"
    assert float(clipped.graph.weights[name]) < float(full.graph.weights[name])
    with pytest.raises(Exception, match=r"act_percentile 97.5 was not calibrated; calibrated: \[99.0, 99.9, 99.99\]"):
        mxc.compile(model, {"default": {**rule, "options": {"act_percentile": 97.5}}}, example_inputs=ids, calibration=calib)


def test_report_shows_activation_formats_and_smoothing(tiny_llama_factory):
    model = tiny_llama_factory(seed=6, layers=1)
    ids = torch.randint(0, 131, (1, 9))
    calib = [torch.randint(0, 131, (30,), generator=torch.Generator().manual_seed(2))]
    rep = mxc.compile(model, "w8a8", example_inputs=ids, calibration=calib).report()
    assert rep.smoothed["model.layers.0.mlp.down_proj"]["alpha"] == 0.5
    line = next(l for l in str(rep).splitlines() if l.split()[:1] == ["model.layers.0.mlp.down_proj"])
    assert "int8<sym,channel>" in line and "int8<sym,token>" in line and "alpha 0.5" in line
    # an activation-only plan: the weight stays float, the row still shows the activation format
    rep = mxc.compile(model, {"default": {"act": "fp8e4m3<token>"}}, example_inputs=ids).report()
    assert rep.avg_bits is None
    line = next(l for l in str(rep).splitlines() if l.split()[:1] == ["model.layers.0.self_attn.o_proj"])
    assert line.split()[1:3] == ["float", "fp8e4m3<token>"]
