"""The default pipeline end to end: the passes run in DESIGN.md's order, every dump shows what
its pass changed, a plan switches passes off (`passes={"reorder": False}`), the report says
which passes ran and what each did per layer, and the passes after quantization (fold's
merging aside, layout and fuse) leave the compiled function bit for bit as it was."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import mxc
from mxc.driver import QUANT_PIPELINE
from mxc.ir import parse
from mxc.plan import SWITCHABLE_PASSES, Plan

#: What a plan runs unless it asks for scale tuning (`Plan(tune=steps)`).
RUN = [p for p in QUANT_PIPELINE if p != "tune"]

#: int4 weights and activations with 8 outlier channels per layer, smoothed, KV cache int8:
#: every pass has something to do.
PLAN = {
    "name": "everything",
    "rules": [{"match": "*", "op": "attention", "kv": "int8<sym,token>"}],
    "default": {"weight": "int4<asym,g24>", "act": "int8<sym,token>", "options": {"outliers": 8}},
    "smooth": 0.5,
    "method": "rtn",
    "clip_search": False,
}


@pytest.fixture(scope="module")
def calib():
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, 131, (40,), generator=gen) for _ in range(2)]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 131, (2, 9), generator=torch.Generator().manual_seed(5))


def compile_with(model, ids, calib, passes=None, **kw):
    plan = Plan.from_dict({**PLAN, **({"passes": passes} if passes is not None else {})})
    return mxc.compile(model, plan, example_inputs=ids, calibration=calib, **kw)


@pytest.fixture(scope="module")
def full(tiny_llama, ids, calib, tmp_path_factory):
    dumps = tmp_path_factory.mktemp("dumps")
    return compile_with(tiny_llama, ids, calib, dump_ir=dumps), dumps


def test_default_pipeline_order_is_the_design_order(full):
    compiled, _ = full
    assert QUANT_PIPELINE == ["canonicalize", "calibrate", "smooth", "reorder", "quantize", "tune", "fold", "layout",
                              "fuse"]
    assert list(compiled.timings) == RUN  # tune runs when the plan asks for steps (tests/passes/test_tune.py)
    assert compiled.pipeline == {name: True for name in RUN}
    assert set(SWITCHABLE_PASSES) < set(QUANT_PIPELINE)


def test_every_dump_shows_its_pass(full):
    compiled, dumps = full
    files = sorted(p.name for p in dumps.iterdir())
    assert files == ["00-capture.mxir"] + [f"{i:02d}-{name}.mxir" for i, name in enumerate(RUN, 1)]
    text = {name.split("-", 1)[1].removesuffix(".mxir"): (dumps / name).read_text() for name in files}
    assert text["fuse"] == compiled.ir
    for name in files:  # every dump parses back to itself
        assert str(parse((dumps / name).read_text())) == (dumps / name).read_text()
    assert "gather(" not in text["smooth"] and "gather(" in text["reorder"]
    assert "dequantize(" not in text["reorder"] and "dequantize(" in text["quantize"]
    assert "qlinear(" not in text["quantize"] and "qlinear(" in text["fold"]
    assert "packed<" not in text["fold"] and "packed<bits=4,word=i32,axis=1>" in text["layout"]
    assert "packed<bits=8,word=i32,axis=1>" in text["layout"]  # the outlier channels' int8 part
    assert "fused(" not in text["layout"] and 'fused(' in text["fuse"] and '{kind="norm_quant"}' in text["fuse"]
    # calibration attaches statistics only: the graph text is unchanged
    assert text["calibrate"] == text["canonicalize"]


def test_layout_and_fuse_keep_the_function_bit_for_bit(tiny_llama, full, ids, calib):
    compiled, _ = full
    for passes in ({"fuse": False}, {"layout": False, "fuse": False}):
        other = compile_with(tiny_llama, ids, calib, passes=passes)
        assert list(other.timings) == [p for p in RUN if p not in passes]
        for batch in (ids, torch.randint(0, 131, (3, 14))):
            assert torch.equal(compiled(batch).logits, other(batch).logits), passes
    assert "fused" not in other.graph.op_counts() and "layout" not in other.graph.meta


def test_fused_graph_leaves_little_outside_kernels(full):
    """Every GEMM, norm, reorder gather and activation quantize is inside a kernel group."""
    g = full[0].graph
    outside = g.op_counts()
    for op in ("linear", "qlinear", "rms_norm", "gather", "dequantize"):
        assert op not in outside or op == "dequantize", (op, outside)
    inside = [n.op for n in g.walk()]
    assert inside.count("qlinear") == 2 * (7 * 2 + 1)  # main and outlier part of every linear
    kinds = {n.get("kind") for n in g.nodes if n.op == "fused"}
    assert {"norm_quant", "act_quant", "dequant_gemm", "rope_kv"} <= kinds
    assert g.meta["merged"] > 0  # q, k and v share one quantize of their norm's output


def test_report_says_which_passes_ran_and_what_they_did(full):
    compiled, _ = full
    rep = compiled.report()
    text = str(rep)
    assert rep.pipeline == {name: True for name in RUN}
    line = next(l for l in text.splitlines() if l.strip().startswith("passes:"))
    assert all(f"{name} " in line for name in RUN) and "off" not in line
    assert "what each pass did, per layer:" in text
    q = rep.effects["model.layers.0.self_attn.q_proj"]
    assert q == {"smooth": "alpha 0.5", "reorder": "8 outliers (norm)", "fold": "qlinear", "layout": "packed 4b + 8b",
                 "fuse": "dequant_gemm"}
    assert rep.effects["model.layers.1.self_attn.o_proj"]["reorder"] == "8 outliers (gather)"
    assert rep.effects["model.layers.0.mlp.down_proj"]["reorder"] == "8 outliers (mul)"
    row = next(l for l in text.splitlines() if l.split()[:1] == ["model.layers.1.mlp.up_proj"] and "qlinear" in l)
    assert row.split()[1:] == ["alpha", "0.5", "8", "outliers", "(norm)", "qlinear", "packed", "4b", "+", "8b", "dequant_gemm"]


def test_plan_switches_passes_off(tiny_llama, ids, calib, tmp_path):
    c = compile_with(tiny_llama, ids, calib, passes={"reorder": False, "smooth": False}, dump_ir=tmp_path)
    assert list(c.timings) == [p for p in RUN if p not in ("reorder", "smooth")]
    assert c.pipeline["reorder"] is False and c.pipeline["smooth"] is False and c.pipeline["fuse"] is True
    assert sorted(p.name for p in tmp_path.iterdir())[3:5] == ["03-quantize.mxir", "04-fold.mxir"]  # numbered as run
    assert "reordered" not in c.graph.meta and "smoothed" not in c.graph.meta
    assert not any(n.op == "gather" for n in c.graph.walk())
    rep = c.report()
    assert "reorder off (plan)" in str(rep) and "smooth off (plan)" in str(rep)
    assert all("reorder" not in e and "smooth" not in e for e in rep.effects.values())
    assert "parts" not in rep.layers["model.layers.0.self_attn.q_proj"]  # no outlier channels kept apart
    # the plan's text forms carry the switches
    plan = c.plan
    assert plan.passes == {"reorder": False, "smooth": False}
    assert Plan.from_json(plan.to_json()).passes == plan.passes
    assert "passes off: reorder, smooth" in plan.explain().splitlines()[0]


def test_no_calibration_warning_names_only_what_runs(tiny_llama, ids):
    plan = Plan.from_dict({**PLAN, "passes": {"reorder": False, "smooth": False}})
    with pytest.warns(UserWarning) as got:
        mxc.compile(tiny_llama, plan, example_inputs=ids)
    text = " ".join(str(w.message) for w in got)
    assert "rounded to nearest" in text and "smoothed" not in text and "reordered" not in text


def test_bad_pass_switches_are_refused():
    with pytest.raises(ValueError, match=r"plan passes: 'quantize' cannot be switched; expected some of smooth, reorder, "
                                         r"fold, layout, fuse \(canonicalize, calibrate and quantize always run\)"):
        Plan(passes={"quantize": False})
    with pytest.raises(ValueError, match=r"plan passes: 'fuse' must be true or false, got 'no'"):
        Plan.from_dict({"passes": {"fuse": "no"}})
    with pytest.raises(ValueError, match=r"plan passes: 'reoder' cannot be switched"):
        Plan.from_json(json.dumps({"passes": {"reoder": False}}))
    assert dataclasses.replace(Plan(), passes={"fuse": False}).runs("fuse") is False and Plan().runs("fuse")
