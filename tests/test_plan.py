"""Plans: rule matching (globs, first match wins, op kinds, the default), presets and what
they expand to, the JSON form, `Plan.coerce`, the errors a user sees for a wrong plan,
`check_matches` warnings, `explain`, and `resolved` (what "auto" becomes)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import mxc

from mxc.ir import parse_format
from mxc.plan import PRESETS, Plan, Rule

LAYERS = [
    f"model.layers.{i}.{m}"
    for i in range(3)
    for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
] + ["lm_head"]

MIXED = {
    "name": "mixed",
    "method": "rtn",
    "clip_search": False,
    "rules": [
        {"match": "lm_head", "weight": None},
        {"match": "model.layers.0.*", "weight": "int8<sym,channel>"},
        {"match": "*.self_attn.*", "weight": "int4<sym,g32>", "act": "int8<sym,token>"},
        {"match": "*.mlp.down_proj", "weight": "int3<asym,g64>", "options": {"method": "gptq"}},
        {"match": "*", "op": "attention", "kv": "fp8e4m3<token>"},
    ],
    "default": {"weight": "nvfp4"},
}


# --------------------------------------------------------------------------- matching


def test_first_matching_rule_wins_and_the_default_takes_the_rest():
    plan = Plan.from_dict(MIXED)
    f = parse_format
    want = {
        "lm_head": None,
        "model.layers.0.self_attn.q_proj": f("int8<sym,channel>"),  # layer 0 comes before self_attn
        "model.layers.0.mlp.down_proj": f("int8<sym,channel>"),
        "model.layers.1.self_attn.q_proj": f("int4<sym,g32>"),
        "model.layers.2.self_attn.o_proj": f("int4<sym,g32>"),
        "model.layers.1.mlp.down_proj": f("int3<asym,g64>"),
        "model.layers.2.mlp.up_proj": f("nvfp4"),
        "model.layers.1.mlp.gate_proj": f("nvfp4"),
    }
    for path, fmt in want.items():
        assert plan.rule_for(path).weight == fmt, path
    assert plan.rule_for("model.layers.2.self_attn.k_proj").act == f("int8<sym,token>")
    assert plan.rule_for("model.layers.2.mlp.up_proj").act is None
    assert plan.rule_for("model.layers.1.mlp.down_proj").options == {"method": "gptq"}
    assert plan.rule_for("model.layers.1.mlp.down_proj") is plan.rules[3]
    assert plan.rule_for("something.else") is plan.default


def test_rule_order_matters():
    a = Rule("*.mlp.*", weight="int4<sym,g32>")
    b = Rule("*.down_proj", weight="int8<sym,channel>")
    path = "model.layers.3.mlp.down_proj"
    assert Plan(rules=(a, b)).rule_for(path).weight == parse_format("int4<sym,g32>")
    assert Plan(rules=(b, a)).rule_for(path).weight == parse_format("int8<sym,channel>")


def test_globs_match_the_whole_path():
    r = Rule("*.q_proj", weight="int8<sym,channel>")
    assert r.matches("model.layers.0.self_attn.q_proj", "linear")
    assert not r.matches("model.layers.0.self_attn.q_proj_extra", "linear")
    assert not Rule("lm_head", weight=None).matches("model.lm_head.x", "linear")
    assert Rule("model.layers.[02].*").matches("model.layers.2.mlp.up_proj", "linear")
    assert not Rule("model.layers.[02].*").matches("model.layers.1.mlp.up_proj", "linear")
    assert Rule("model.layers.?.mlp.up_proj").matches("model.layers.7.mlp.up_proj", "linear")
    assert not Rule("model.layers.?.mlp.up_proj").matches("model.layers.17.mlp.up_proj", "linear")
    assert not Rule("MODEL.*").matches("model.layers.1.mlp.up_proj", "linear")  # case-sensitive


def test_rules_match_their_op_kind_only():
    plan = Plan.from_dict(MIXED)
    path = "model.layers.1.self_attn"
    assert plan.rule_for(path, "attention").kv == parse_format("fp8e4m3<token>")
    assert plan.rule_for("model.layers.1.self_attn.q_proj", "linear").kv is None
    # the attention rule's "*" does not swallow linears, and the linear default not attention
    assert plan.rule_for("x.y", "linear") is plan.default
    emb = plan.rule_for("model.embed_tokens", "embedding")
    assert emb.op == "embedding" and emb.weight is None and emb.act is None
    with pytest.raises(ValueError, match=r"rule '\*': unknown op kind 'conv'; expected one of linear, embedding, attention"):
        Rule(op="conv")


def test_format_text_and_float_words():
    r = Rule("x", weight="int4<sym,g128>", act="FLOAT", kv="none")
    assert r.weight == parse_format("int4<sym,g128>") and r.act is None and r.kv is None
    for word in ("f16", "bf16", "fp32", "f32", None):
        assert Rule(weight=word).weight is None
    assert Rule(weight=parse_format("mxfp4")).weight == parse_format("fp4e2m1<block32>")
    with pytest.raises(TypeError, match="expected a number format or its text, got int 4"):
        Rule(weight=4)


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    "name, weight, act",
    [
        ("w8a8", "int8<sym,channel>", "int8<sym,token>"),
        ("w8a16", "int8<sym,channel>", None),
        ("w4a16", "int4<asym,channel>", None),
        ("w4a16-g128", "int4<asym,g128>", None),
        ("w4a16-g64", "int4<asym,g64>", None),
        ("w4a16-g32", "int4<asym,g32>", None),
        ("w3a16-g128", "int3<asym,g128>", None),
        ("w2a16-g64", "int2<asym,g64>", None),
        ("w4a8", "int4<asym,g128>", "int8<sym,token>"),
        ("fp8", "fp8e4m3<channel>", "fp8e4m3<token>"),
        ("w8a8-static", "int8<sym,channel>", "int8<sym,tensor>"),
        ("w4a4-kv4", "int4<asym,g128>", "int4<sym,g128>"),
        ("fp8-kv8", "fp8e4m3<channel>", "fp8e4m3<token>"),
        ("nvfp4", "fp4e2m1<block16,scale=fp8e4m3,global>", None),
        ("mxfp4", "fp4e2m1<block32>", None),
        ("mxfp6", "fp6e2m3<block32>", None),
        ("mxfp8", "fp8e4m3<block32>", None),
    ],
)
def test_presets_expand(name, weight, act):
    plan = Plan.preset(name)
    assert plan.name == name and plan is PRESETS[name]
    assert plan.default.weight == parse_format(weight)
    assert plan.default.act == (None if act is None else parse_format(act))
    assert plan.default.kv is None
    # 8-bit per-channel grids skip the clipping search (no gain measured on SmolLM2)
    assert plan.method == "auto" and plan.clip_search is (False if weight.endswith("8<sym,channel>") or weight == "fp8e4m3<channel>" else None)
    # activation-quantizing presets smooth (SmoothQuant's alpha 0.5), weight-only ones do not
    assert plan.smooth == (None if act is None else 0.5)
    kv = {"w4a4-kv4": "int4<asym,token>", "fp8-kv8": "fp8e4m3<token>"}.get(name)
    assert plan.rule_for("model.layers.3.self_attn", "attention").kv == (None if kv is None else parse_format(kv))
    # lm_head stays float, every other linear takes the default
    assert plan.rule_for("lm_head").weight is None and plan.rule_for("lm_head").act is None
    assert plan.rule_for("model.layers.5.mlp.down_proj").weight == parse_format(weight)
    assert Plan.coerce(name) is plan


def test_preset_w4a16_g128_weight():
    assert Plan.preset("w4a16-g128").default.weight == parse_format("int4<asym,g128>")


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        Plan.preset("w4a16-g100")
    msg = str(info.value)
    assert "unknown plan preset 'w4a16-g100'" in msg
    for name in PRESETS:
        assert name in msg


# --------------------------------------------------------------------------- JSON


def test_json_round_trip_text_and_file(tmp_path):
    plan = Plan.from_dict(MIXED)
    text = plan.to_json()
    assert json.loads(text)["rules"][2] == {
        "match": "*.self_attn.*", "op": "linear", "weight": "int4<sym,g32>", "act": "int8<sym,token>", "kv": None
    }
    assert json.loads(text)["default"]["weight"] == "fp4e2m1<block16,scale=fp8e4m3,global>"
    back = Plan.from_json(text)
    assert back == plan and back.to_json() == text
    path = tmp_path / "plan.json"
    assert plan.to_json(path) == text and path.read_text() == text
    assert Plan.from_json(path) == plan
    assert Plan.from_json(str(path)) == plan
    for preset in PRESETS.values():
        assert Plan.from_json(preset.to_json()) == preset


def test_json_defaults():
    plan = Plan.from_json('{"rules": [{"match": "*.mlp.*", "weight": "int4<sym,g32>"}]}')
    assert plan.method == "auto" and plan.clip_search is None and plan.name is None
    assert plan.default == Rule() and plan.rules[0].op == "linear" and plan.rules[0].act is None


def test_coerce_every_input_kind(tmp_path):
    plan = Plan.from_dict(MIXED)
    path = tmp_path / "mixed.json"
    plan.to_json(path)
    assert Plan.coerce(plan) is plan
    assert Plan.coerce("w8a8") is PRESETS["w8a8"]
    assert Plan.coerce(MIXED) == plan
    assert Plan.coerce(plan.to_json()) == plan
    assert Plan.coerce("  " + plan.to_json()) == plan
    assert Plan.coerce(path) == plan
    assert Plan.coerce(str(path)) == plan
    for bad in ("w9a9", str(tmp_path / "missing.json"), "x" * 5000):
        with pytest.raises(ValueError) as info:
            Plan.coerce(bad)
        assert "unknown plan" in str(info.value) and "w4a16-g128" in str(info.value)


def test_unknown_json_keys_are_named():
    with pytest.raises(ValueError, match=r"plan has unknown key\(s\) \['rule'\]; expected .*'rules'"):
        Plan.from_dict({"rule": []})
    with pytest.raises(ValueError, match=r"plan rules\[1\] has unknown key\(s\) \['wieght'\]; expected .*'weight'"):
        Plan.from_dict({"rules": [{"match": "a"}, {"match": "b", "wieght": "int4<sym,g32>"}]})
    with pytest.raises(ValueError, match=r"plan default has unknown key\(s\) \['format'\]"):
        Plan.from_dict({"default": {"format": "int4<sym,g32>"}})
    with pytest.raises(ValueError, match=r"plan rules\[0\]: expected an object"):
        Plan.from_dict({"rules": ["int4<sym,g32>"]})
    with pytest.raises(ValueError, match="plan JSON is malformed"):
        Plan.from_json('{"rules": [}')


# --------------------------------------------------------------------------- errors


def test_unknown_format_names_the_rule_and_the_valid_formats():
    with pytest.raises(ValueError) as info:
        Plan.from_dict({"rules": [{"match": "*.mlp.*", "weight": "fp5<g32>"}]})
    msg = str(info.value)
    assert "rule '*.mlp.*' weight" in msg and "unknown number format 'fp5'" in msg
    for valid in ("int1..int8", "fp8e4m3", "fp4e2m1", "mxfp4", "nvfp4"):
        assert valid in msg
    with pytest.raises(ValueError, match=r"rule 'lm_head' act: malformed number format 'int4'"):
        Rule("lm_head", act="int4")


def test_per_channel_activations_are_refused():
    with pytest.raises(ValueError) as info:
        Plan.from_dict({"rules": [{"match": "*.o_proj", "act": "int8<sym,channel>"}]})
    msg = str(info.value)
    assert "rule '*.o_proj'" in msg and "int8<sym,channel>" in msg and "per channel" in msg and "per token" in msg


def test_per_token_weights_are_refused():
    with pytest.raises(ValueError) as info:
        Rule("*.mlp.up_proj", weight="fp8e4m3<token>")
    msg = str(info.value)
    assert "rule '*.mlp.up_proj'" in msg and "fp8e4m3<token>" in msg and "per token" in msg


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown quantization method 'awq'; expected one of auto, rtn, gptq"):
        Plan(method="awq")
    with pytest.raises(ValueError, match="unknown quantization method"):
        Plan.from_dict({"method": "awq"})


# --------------------------------------------------------------------------- check_matches, explain


def test_check_matches_warns_for_a_rule_matching_nothing_with_the_closest_layers():
    plan = Plan.from_dict({"rules": [
        {"match": "*.mlp.down_prj", "weight": "int8<sym,channel>"},
        {"match": "*.mlp.*", "weight": "int4<sym,g32>"},
        {"match": "*", "op": "attention", "kv": "int8<sym,token>"},
    ]})
    with pytest.warns(UserWarning) as rec:
        unmatched = plan.check_matches(LAYERS)
    assert unmatched == ["*.mlp.down_prj"]
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "plan rule '*.mlp.down_prj' (linear) matches no layer" in msg
    assert "closest: " in msg and "mlp.down_proj" in msg.split("closest: ")[1]
    # every rule matching: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Plan.preset("w4a16-g128").check_matches(LAYERS) == []


def test_explain_shows_rules_and_per_layer_formats():
    plan = Plan.from_dict(MIXED)
    text = plan.explain()
    assert text.splitlines()[0] == "plan mixed: method rtn, clip search off, smoothing off"
    for r in MIXED["rules"]:
        assert r["match"] in text
    assert "* (default)" in text and "fp4e2m1<block16,scale=fp8e4m3,global>" in text
    layers = [(p, "linear") for p in LAYERS] + [("model.layers.1.self_attn", "attention")]
    table = plan.explain(layers).splitlines()
    rows = {line.split()[0]: line.split() for line in table[2:]}
    assert rows["model.layers.0.mlp.up_proj"][1:3] == ["model.layers.0.*", "int8<sym,channel>"]
    assert rows["model.layers.1.self_attn.k_proj"][1:4] == ["*.self_attn.*", "int4<sym,g32>", "int8<sym,token>"]
    assert rows["model.layers.2.mlp.down_proj"][1:3] == ["*.mlp.down_proj", "int3<asym,g64>"]
    assert rows["model.layers.2.mlp.up_proj"][1:3] == ["*", "fp4e2m1<block16,scale=fp8e4m3,global>"]
    assert rows["lm_head"][1:3] == ["lm_head", "float"]
    assert rows["model.layers.1.self_attn"][-1] == "fp8e4m3<token>"
    assert len(rows) == len(layers)
    assert Plan.preset("w8a8").explain().splitlines()[0] == "plan w8a8: method auto, clip search off, smoothing alpha 0.5"


# --------------------------------------------------------------------------- resolved


def test_resolved_auto():
    plan = Plan.preset("w4a16-g128")
    cal = plan.resolved(calibrated=True)
    assert cal.method == "gptq" and cal.clip_search is True
    plain = plan.resolved(calibrated=False)
    assert plain.method == "rtn" and plain.clip_search is False
    assert plain.rules == plan.rules and plain.default == plan.default and plain.name == plan.name
    # explicit choices are kept
    assert Plan(method="rtn").resolved(calibrated=True).method == "rtn"
    assert Plan(clip_search=False).resolved(calibrated=True).clip_search is False
    assert Plan(method="rtn", clip_search=True).resolved(calibrated=True).clip_search is True


def test_resolved_refuses_gptq_or_clip_search_without_calibration():
    with pytest.raises(ValueError) as info:
        Plan(method="gptq", name="mine").resolved(calibrated=False)
    msg = str(info.value)
    assert "plan mine asks for GPTQ" in msg and "calibration=" in msg
    with pytest.raises(ValueError, match=r"(?s)a clipping search.*calibration="):
        Plan(method="rtn", clip_search=True).resolved(calibrated=False)


def test_explain_a_model(tiny_llama):
    """`plan.explain(model)`: every linear, embedding and attention of the module, with the
    rule and formats it gets; a compiled model explains the same layers."""
    plan = Plan.preset("w4a4-kv4")
    rows = {line.split()[0]: line.split()[1:] for line in plan.explain(tiny_llama).splitlines()[2:]}
    assert rows["lm_head"][:2] == ["lm_head", "float"]
    assert rows["model.layers.1.mlp.down_proj"][:3] == ["*", "int4<asym,g128>", "int4<sym,g128>"]
    assert rows["model.layers.0.self_attn"][-1] == "int4<asym,token>"
    assert rows["model.embed_tokens"][-3:] == ["float", "float", "float"]
    assert len(rows) == 2 * 7 + 1 + 2 + 1  # linears, attentions, embedding
    with pytest.warns(UserWarning, match="no calibration data"):
        compiled = mxc.compile(tiny_llama, plan, example_inputs=torch.randint(0, 131, (1, 5)))
    from_graph = {line.split()[0] for line in plan.explain(compiled).splitlines()[2:]}
    assert {p for p in rows if p != "model.embed_tokens"} <= from_graph
    with pytest.raises(TypeError, match="expected a model, a compiled model or"):
        plan.explain(42)
