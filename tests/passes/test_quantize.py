"""The quantize pass through `mxc.compile` on the tiny random Llama: for every preset and a
mixed JSON plan the compiled graph verifies, prints and parses back, every linear reads the
formats its rule gives, and the logits equal a hand-built torch reference (the HF model with
its weights replaced by `fmt.fake(w)`, its linear inputs fake-quantized per token and its
keys/values fake-quantized before attention). Then the report's numbers, tied embeddings,
GPTQ with calibration, and the warnings a user gets."""

from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import replace

import pytest
import torch

import mxc
from mxc.ir import FloatFormat, IntFormat, parse, verify
from mxc.ir.formats import SCALE_DTYPES
from mxc.ir.ops import quant_parts
from mxc.calibrate import collect
from mxc.driver import calibration_inputs
from mxc.frontends.torch_export import capture
from mxc.passes import run_pipeline
from mxc.plan import Plan

PRESETS = ["w8a8", "w4a16-g128", "w4a16-g32", "w3a16-g128", "nvfp4", "mxfp4", "fp8"]
MIXED = {
    "name": "mixed",
    "rules": [
        {"match": "*.self_attn.*", "weight": "int8<sym,channel>", "act": "int8<sym,token>"},
        {"match": "*.mlp.down_proj", "weight": "int3<asym,g32>"},
        {"match": "*.mlp.*", "weight": "int4<asym,g32>", "act": "fp8e4m3<token>"},
        {"match": "lm_head", "weight": "int8<asym,channel>"},  # codes up to 255
        {"match": "*", "op": "attention", "kv": "int8<sym,token>"},
    ],
    "default": {"weight": None},
}
PLANS = PRESETS + ["mixed"]


pytestmark = pytest.mark.usefixtures("one_thread")


#: These tests read the quantize (and fold) pass's output node by node; the layout and fuse
#: passes that follow in the pipeline (packing, regions) are tested in their own files and on
#: the whole pipeline in tests/test_pipeline.py.
UNPACKED = {"layout": False, "fuse": False}


def as_plan(name: str) -> Plan:
    plan = Plan.from_json(__import__("json").dumps(MIXED)) if name == "mixed" else Plan.preset(name)
    return replace(plan, passes=UNPACKED)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 131, (2, 13))


@pytest.fixture(scope="module")
def compiled(tiny_llama, ids):
    """`compiled(plan name)`: the tiny Llama compiled with that plan, once per module."""
    cache: dict = {}

    def get(name):
        if name not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the no-calibration warning, tested below
                cache[name] = mxc.compile(tiny_llama, None if name is None else as_plan(name), example_inputs=ids)
        return cache[name]

    return get


# --------------------------------------------------------------------------- the torch reference


def reference_logits(model, plan: Plan, ids, monkeypatch) -> torch.Tensor:
    """The HF model with the plan applied by hand: weights `fmt.fake(w)`, linear inputs
    `act.fake(x)` (per token), keys and values `kv.fake(k)` as attention reads them."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    def attention(module, q, k, v, *args, **kwargs):
        kv = getattr(module, "mxc_kv", None)
        if kv is not None:
            k, v = kv.fake(k), kv.fake(v)
        return sdpa_attention_forward(module, q, k, v, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", attention)
    m = copy.deepcopy(model)
    assert m.config._attn_implementation == "sdpa"
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear):
            rule = plan.rule_for(name, "linear")
            if rule.weight is not None:  # a new Parameter: unties lm_head from the embedding
                mod.weight = torch.nn.Parameter(rule.weight.fake(mod.weight.detach()))
            if rule.act is not None:
                mod.register_forward_pre_hook(lambda _, args, fmt=rule.act: (fmt.fake(args[0]),))
        elif name.endswith("self_attn"):
            mod.mxc_kv = plan.rule_for(name, "attention").kv
    with torch.no_grad():
        return m(ids).logits


def rel_err(got, want) -> float:
    return float((got - want).norm() / want.norm())


# --------------------------------------------------------------------------- graph structure


def producer(v):
    return v.node


@pytest.mark.parametrize("name", PLANS)
def test_compiled_graph_has_the_plans_formats(compiled, name):
    plan = as_plan(name)
    c = compiled(name)
    g = c.graph
    verify(g)
    text = c.ir
    assert str(verify(parse(text))) == text
    linears = [n for n in g.nodes if n.op in ("linear", "qlinear")]
    assert len(linears) == 15  # 2 layers of 7, and lm_head
    for node in linears:
        path = node.loc
        rule = plan.rule_for(path, "linear")
        if node.op == "qlinear":  # fold put both operands' scales in the epilogue
            assert (node.get("act"), node.get("weight")) == (rule.act, rule.weight), path
            nx = len(quant_parts(rule.act))
            assert producer(node.inputs[0]).op == "quantize" and producer(node.inputs[0]).get("format") == rule.act
            assert all(producer(v).op == "const" for v in node.inputs[nx:])
            assert producer(node.inputs[nx]).get("name") == f"{path}.weight"
            assert torch.isin(g.weights[f"{path}.weight"].float(), rule.weight.grid()).all()
            continue
        w, x = producer(node.inputs[1]), producer(node.inputs[0])
        if rule.weight is None:
            assert w.op == "const" and w.types[0].dtype == mxc.ir.F32
        else:
            assert w.op == "dequantize" and w.get("format") == rule.weight, path
            consts = [producer(v) for v in w.inputs]
            assert [c.op for c in consts] == ["const"] * len(quant_parts(rule.weight))
            assert consts[0].types[0].dtype == rule.weight  # the codes carry the format
            assert consts[0].get("name") == f"{path}.weight"
            codes = g.weights[f"{path}.weight"]
            assert codes.dtype in (torch.int8, torch.uint8, torch.float16)
            assert torch.isin(codes.float(), rule.weight.grid()).all()
        if rule.act is None:
            assert x.op != "dequantize"
        else:
            assert x.op == "dequantize" and x.get("format") == rule.act
            q = producer(x.inputs[0])
            assert q.op == "quantize" and q.get("format") == rule.act
    if name != "mixed":
        assert plan.rule_for("lm_head").weight is None
    attentions = [n for n in g.nodes if n.op == "attention"]
    assert len(attentions) == 2
    for node in attentions:
        kv = plan.rule_for(node.loc, "attention").kv
        for v in node.inputs[1:3]:
            if kv is None:
                assert producer(v).op != "dequantize"
            else:
                assert producer(v).op == "dequantize" and producer(v).get("format") == kv
                assert producer(producer(v).inputs[0]).op == "quantize"
    # no float weight of a quantized layer is left behind
    for path, rec in g.meta["quantized"].items():
        if "format" in rec:
            assert set(rec["weights"]) <= set(g.weights)
            assert g.weights[rec["weights"][0]].dtype != torch.float32


@pytest.mark.parametrize("name", PLANS)
def test_logits_equal_the_hand_built_reference(compiled, tiny_llama, ids, name, monkeypatch):
    plan = as_plan(name)
    c = compiled(name)
    for batch in (ids, torch.randint(0, 131, (3, 7))):
        want = reference_logits(tiny_llama, plan, batch, monkeypatch)
        got = c(batch).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            assert rel_err(got, tiny_llama(batch).logits) > 1e-4  # it did quantize


def test_the_reference_sees_the_quantization(compiled, tiny_llama, ids, monkeypatch):
    # A reference that skips the KV cache or the activation quantization does not match:
    # the comparison above can fail.
    plan = as_plan("mixed")
    got = compiled("mixed")(ids).logits
    no_kv = Plan(rules=tuple(r for r in plan.rules if r.op != "attention"), default=plan.default)
    no_act = Plan(rules=tuple(type(r)(r.match, r.op, r.weight, None, r.kv) for r in plan.rules), default=plan.default)
    for other in (no_kv, no_act):
        assert not torch.allclose(got, reference_logits(tiny_llama, other, ids, monkeypatch), rtol=1e-5, atol=1e-6)


def test_error_grows_as_bits_shrink(compiled, tiny_llama):
    x = torch.randint(0, 131, (4, 24))
    with torch.no_grad():
        ref = tiny_llama(x).logits
    errs = {name: rel_err(compiled(name)(x).logits, ref) for name in ["w8a8", "w4a16-g32", "w4a16-g128", "w3a16-g128"]}
    assert errs["w8a8"] < errs["w4a16-g32"] < errs["w4a16-g128"] < errs["w3a16-g128"], errs
    assert errs["w8a8"] < 0.05 and errs["w3a16-g128"] < 1.0
    assert compiled(None)(x).logits.equal(ref)  # the float graph is exact


# --------------------------------------------------------------------------- report


def expected_bytes(fmt, n: int, k: int) -> int:
    block = fmt.scaling.block(k)
    nscale = 1 if block is None else n * math.ceil(k / block)
    total = math.ceil(fmt.bits * n * k / 8) + math.ceil(SCALE_DTYPES[fmt.scaling.scale] * nscale / 8)
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        total += math.ceil(fmt.bits * nscale / 8)  # zero points, packed like the codes
    if isinstance(fmt, FloatFormat) and fmt.global_:
        total += 4
    return total


@pytest.mark.parametrize("name", PLANS)
def test_report_rows(compiled, name):
    plan = as_plan(name)
    c = compiled(name)
    rep = c.report()
    g = c.graph
    assert rep.plan == plan.name
    rows = {p: r for p, r in rep.layers.items() if "format" in r}
    paths = [n.loc for n in g.nodes if n.op in ("linear", "qlinear") and plan.rule_for(n.loc).weight is not None]
    assert sorted(rows) == sorted(paths)
    numel = 0
    bits = 0.0
    for path, r in rows.items():
        fmt = plan.rule_for(path).weight
        n, k = r["shape"]
        assert r["format"] == str(fmt)
        assert r["bits"] == fmt.effective_bits(k)
        assert r["bytes"] == expected_bytes(fmt, n, k)
        assert r["float_bytes"] == 4 * n * k
        assert 0 < r["weight_error"] < 0.5
        # the scale tensors hold as many scales as the bytes count
        scale = g.weights[r["weights"][1]]
        block = fmt.scaling.block(k)
        assert scale.numel() == (1 if block is None else n * math.ceil(k / block))
        numel += n * k
        bits += r["bits"] * n * k
    assert rep.avg_bits == pytest.approx(bits / numel, rel=1e-12)
    # weight bytes: the packed layers plus every weight kept in float
    packed = {w for r in rows.values() for w in r["weights"]}
    plain = sum(t.numel() * t.element_size() for k, t in g.used_weights().items() if k not in packed)
    assert rep.weight_bytes == plain + sum(r["bytes"] for r in rows.values())
    float_weights = compiled(None).graph.used_weights()
    assert rep.float_bytes == sum(t.numel() * t.element_size() for t in float_weights.values())
    assert rep.weight_bytes < rep.float_bytes
    text = str(rep)
    assert f"plan {plan.name}" in text and f"{rep.avg_bits:.3f}" in text
    for path, r in rows.items():
        line = next(l for l in text.splitlines() if l.split()[:1] == [path])
        assert r["format"] in line and f"{r['bits']:.3f}" in line
    if name == "mixed":
        assert "model.layers.1.self_attn" in text and "kv cache int8<sym,token>" in text


def test_report_avg_bits_of_presets(compiled):
    """Bits per weight count the scales of every block, a shorter last block included: K is
    72 or 100 here, a single (short) group of 128, 3-4 blocks of 32, 5-7 blocks of 16."""

    def want(rep, bits: int, extra: int, block: int) -> float:
        shapes = [r["shape"] for r in rep.layers.values() if "shape" in r]
        total = sum((bits + extra * math.ceil(k / block) / k) * n * k for n, k in shapes)
        return total / sum(n * k for n, k in shapes)

    rep = compiled("w4a16-g128").report()
    assert rep.avg_bits == pytest.approx(want(rep, 4, 16 + 4, 128))
    assert 4 + 20 / 100 <= rep.avg_bits <= 4 + 20 / 72  # not the nominal 4 + 20/128
    rep = compiled("mxfp4").report()
    assert rep.avg_bits == pytest.approx(want(rep, 4, 8, 32))
    rep = compiled("nvfp4").report()
    assert rep.avg_bits == pytest.approx(want(rep, 4, 8, 16))
    # the report's bits agree with its bytes: codes plus scales (and zero points)
    for name in ("w4a16-g128", "mxfp4", "nvfp4", "w8a8"):
        for r in compiled(name).report().layers.values():
            if "shape" in r:
                n, k = r["shape"]
                extra = 4 if "global" in r["format"] else 0
                assert r["bytes"] - extra == pytest.approx(r["bits"] * n * k / 8, abs=2)
    w8 = compiled("w8a8").report()
    assert 8 < w8.avg_bits < 8 + 16 / 72 + 1e-9


# --------------------------------------------------------------------------- tied embeddings


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(
        vocab_size=131, hidden_size=72, intermediate_size=100, num_hidden_layers=1,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_tied_lm_head_is_quantized_apart_from_the_embedding(monkeypatch):
    model = tied_llama()
    table = model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 131, (2, 11))
    plan = Plan.from_dict({"name": "all", "default": {"weight": "int4<sym,g32>"}, "passes": UNPACKED})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = mxc.compile(model, plan, example_inputs=ids)
    g = verify(c.graph)
    emb = next(n for n in g.nodes if n.op == "embedding")
    head = next(n for n in g.nodes if n.op == "linear" and n.loc == "lm_head")
    table_node = producer(emb.inputs[1])
    assert table_node.op == "const" and table_node.types[0].dtype == mxc.ir.F32
    assert torch.equal(g.weights[table_node.get("name")], table)
    dq = producer(head.inputs[1])
    assert dq.op == "dequantize" and dq.get("format") == plan.default.weight
    names = [producer(v).get("name") for v in dq.inputs]
    assert table_node.get("name") not in names and len(set(names)) == len(names)
    assert g.meta["quantized"]["lm_head"]["weights"] == names
    assert str(verify(parse(c.ir))) == c.ir
    for batch in (ids, torch.randint(0, 131, (1, 5))):
        torch.testing.assert_close(c(batch).logits, reference_logits(model, plan, batch, monkeypatch), rtol=1e-5, atol=1e-6)
    # the model itself is untouched
    assert model.lm_head.weight is model.model.embed_tokens.weight and torch.equal(model.lm_head.weight, table)
    # the float table is counted once in the report, the packed lm_head apart
    rep = c.report()
    assert rep.weight_bytes == sum(
        t.numel() * t.element_size() for k, t in g.used_weights().items() if k not in {w for r in rep.layers.values() for w in r.get("weights", ())}
    ) + sum(r["bytes"] for r in rep.layers.values() if "bytes" in r)
    assert rep.weight_bytes > table.numel() * 4


class _Twice(torch.nn.Module):
    """One linear called twice: two `linear` nodes read one weight const."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(40, 40)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


@pytest.mark.parametrize("plan", ["w4a16-g32", "w8a8"])
def test_a_linear_called_twice_is_quantized_once(plan):
    """Both calls read one set of quantized constants (one dequantize); the graph verifies
    and computes the module with that quantized weight (activations quantized per call)."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = _Twice().eval()
    x = torch.randn(2, 5, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no calibration: rounded to nearest, no smoothing
        c = mxc.compile(model, plan, example_inputs=(x,), debug=True, backend="reference")
    g = verify(c.graph)
    consts = [n.get("name") for n in g.nodes if n.op == "const"]
    assert len(consts) == len(set(consts))
    rule = Plan.coerce(plan).default
    w = rule.weight.fake(model.fc.weight.detach())

    def act(t):
        return t if rule.act is None else rule.act.fake(t)

    with torch.no_grad():
        want = torch.nn.functional.linear(act(torch.relu(torch.nn.functional.linear(act(x), w, model.fc.bias))), w,
                                          model.fc.bias)
    torch.testing.assert_close(c(x), want, rtol=1e-4, atol=1e-5)
    assert list(c.report().layers) == ["fc"]


def test_tied_model_with_a_float_lm_head(monkeypatch):
    model = tied_llama()
    ids = torch.randint(0, 131, (2, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = mxc.compile(model, "w4a16-g32", example_inputs=ids)
    g = verify(c.graph)
    emb = next(n for n in g.nodes if n.op == "embedding")
    head = next(n for n in g.nodes if n.op == "linear" and n.loc == "lm_head")
    assert producer(emb.inputs[1]) is producer(head.inputs[1])  # still one shared float table
    torch.testing.assert_close(c(ids).logits, reference_logits(model, Plan.preset("w4a16-g32"), ids, monkeypatch), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- calibration and GPTQ


@pytest.fixture(scope="module")
def calibration():
    return [torch.randint(0, 131, (48,)) for _ in range(4)]


@pytest.mark.parametrize("weight", ["int3<asym,g32>", "int4<sym,g32>"])
def test_gptq_with_calibration_beats_round_to_nearest(tiny_llama_factory, calibration, weight):
    model = tiny_llama_factory(seed=5, layers=1)
    ids = torch.randint(0, 131, (2, 9))
    rules = {"default": {"weight": weight}, "passes": {"layout": False}}  # the codes are read below
    auto = mxc.compile(model, {**rules, "name": "auto"}, example_inputs=ids, calibration=calibration)
    assert auto.plan.method == "gptq" and auto.plan.clip_search is True
    rtn = mxc.compile(model, {**rules, "method": "rtn", "clip_search": False}, example_inputs=ids, calibration=calibration)
    errs = {}
    for label, c in [("auto", auto), ("rtn", rtn)]:
        verify(c.graph)
        recs = {p: r for p, r in c.graph.meta["quantized"].items() if "format" in r}
        assert len(recs) == 8 and all("output_error" in r for r in recs.values())
        errs[label] = {p: r["output_error"] for p, r in recs.items()}
    mean = {k: sum(v.values()) / len(v) for k, v in errs.items()}
    assert mean["auto"] < 0.9 * mean["rtn"], mean
    assert sum(errs["auto"][p] < errs["rtn"][p] for p in errs["rtn"]) >= 6, errs
    fmt = auto.plan.default.weight
    params = dict(model.named_parameters())
    # float Hessians: those of the first layers' inputs, which no quantized layer precedes
    graph = run_pipeline(capture(model, ids).graph, ["canonicalize"]).graph
    float_stats = collect(graph, calibration_inputs(calibration, capture(model, ids).call_spec))
    for path, r in rtn.graph.meta["quantized"].items():
        # RTN with calibration is still plain rounding: the format's own codes of the weight
        w = params[f"{path}.weight"].detach()
        assert torch.equal(rtn.graph.weights[r["weights"][0]].float(), fmt.quantize(w).codes)
        # GPTQ's codes lie on the grid too, and differ from rounding to nearest
        gq = auto.graph.weights[r["weights"][0]].float()
        assert torch.isin(gq, fmt.grid()).all() and not torch.equal(gq, fmt.quantize(w).codes)
        # the recorded output error is the Hessian-weighted one of the weights the graph holds
        from mxc.passes.clip import output_error

        if path.endswith(("q_proj", "k_proj", "v_proj")):
            h = float_stats[path]["hessian"]
            assert r["output_error"] == pytest.approx(output_error(w, fmt.fake(w), h.float()), rel=1e-4)
    # the compiled GPTQ model runs and is closer to the float model than RTN on the calibration text
    batch = torch.stack(calibration)
    with torch.no_grad():
        ref = model(batch).logits
    assert rel_err(auto(batch).logits, ref) < rel_err(rtn(batch).logits, ref)


def test_gptq_without_calibration_is_refused(tiny_llama, ids):
    with pytest.raises(ValueError, match="needs calibration data: pass calibration="):
        mxc.compile(tiny_llama, {"default": {"weight": "int4<sym,g32>"}, "method": "gptq"}, example_inputs=ids)


# --------------------------------------------------------------------------- warnings


def test_no_calibration_warning(tiny_llama_factory):
    model = tiny_llama_factory(seed=2, layers=1)
    with pytest.warns(UserWarning, match=r"plan w4a16-g128: no calibration data, so weights are rounded to nearest"):
        mxc.compile(model, "w4a16-g128", example_inputs=torch.randint(0, 131, (1, 6)))


def test_unmatched_rule_warns_with_the_closest_layers(tiny_llama_factory):
    model = tiny_llama_factory(seed=2, layers=1)
    plan = {"rules": [{"match": "*.mlp.down_prj", "weight": "int8<sym,channel>"}], "default": {"weight": "int4<sym,g32>"}}
    with pytest.warns(UserWarning) as rec:
        c = mxc.compile(model, plan, example_inputs=torch.randint(0, 131, (1, 6)))
    msgs = [str(w.message) for w in rec]
    hit = [m for m in msgs if "matches no layer" in m]
    assert len(hit) == 1 and "'*.mlp.down_prj'" in hit[0]
    assert re.search(r"closest: .*model\.layers\.0\.mlp\.down_proj", hit[0]), hit[0]
    # the rule matched nothing, so down_proj took the default
    down = c.graph.meta["quantized"]["model.layers.0.mlp.down_proj"]
    assert down["format"] == "int4<sym,g32>"
