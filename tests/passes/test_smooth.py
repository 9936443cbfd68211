"""smooth: golden IR texts for each producer kind (and a graph whose every layer must be
skipped), weight values against an independent computation of the scales, function
preservation on the goldens, the tiny Llama and the real MiniLM, the recorded skip
reasons, one scale per shared producer, alpha per path and the errors for bad options.

Golden files live in tests/golden/smooth/: `X.before.mxir` is parsed, given seeded random
weights and abs-maxima, smoothed and printed; the text must equal `X.after.mxir` (weights
print by name only, so their values are checked here against `expected_*`). To accept a
deliberate change run `MXC_UPDATE_GOLDEN=1 pytest tests/passes/test_smooth.py` and review
the diff.

The abs-maxima are measured here (`input_amax`) by running the graph with every linear's
input as an output: smoothing must preserve the function for any scales, and the flatness
test needs the measurement repeated on the smoothed graph.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mxc.ir import Graph, parse, verify
from mxc.passes.canonicalize import canonicalize
from mxc.passes.manager import PASSES, run_pipeline
from mxc.passes.quantize import layer_path
from mxc.passes.smooth import smooth
from mxc.runtime import ReferenceExecutor
from golden_files import check_golden, golden_before
from graph_helpers import fresh, golden_inputs, input_amax, linears, outlier_norm_llama, seeded

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "smooth"
CASES = sorted(p.name.removesuffix(".before.mxir") for p in GOLDEN.glob("*.before.mxir"))


def s_ref(amax: torch.Tensor, wmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's scale, written out independently of the pass (float64)."""
    a, w = amax.double(), wmax.double()
    s = a.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)
    s[(a == 0) | (w == 0)] = 1.0
    return s


def colmax(*ws: torch.Tensor) -> torch.Tensor:
    return torch.stack([w.double().abs().amax(0) for w in ws]).amax(0)


def col(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (w.double() * s[None, :]).float()


def row(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (w.double() / (s[:, None] if w.dim() == 2 else s)).float()


def recovered_s(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The column scales s with after = before · diag(s), checked to be one per column."""
    ratio = after.double() / before.double()
    s = ratio.median(0).values
    torch.testing.assert_close(ratio, s[None, :].expand_as(ratio), rtol=1e-6, atol=0)
    return s


def llama_scales(graph: Graph, smoothed: Graph) -> dict[str, torch.Tensor]:
    """Each linear's column scales, read off its weights; v_proj and up_proj also had their
    rows scaled (they produce o_proj's and down_proj's inputs), so theirs are q_proj's and gate_proj's."""
    out = {}
    for n in linears(graph):
        path = layer_path(n, n.inputs[1].node)
        sibling = path.replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
        out[path] = recovered_s(graph.weights[f"{sibling}.weight"], smoothed.weights[f"{sibling}.weight"])
    return out


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5, msg: str = "") -> None:
    """Equal to `rtol` of the reference's largest magnitude (fp32 rounding, not a loose bound)."""
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= rtol, f"{msg}: relative error {err:.3g} > {rtol}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --------------------------------------------------------------------------- goldens


def golden_graph(case: str) -> tuple[Graph, dict[str, torch.Tensor]]:
    """The parsed before file with seeded weights, and abs-maxima with outliers and a dead
    channel 0 per activation (the layers reading one activation get one tensor)."""
    graph, text = golden_before(GOLDEN, case)
    gen = seeded(case)
    weights = {
        n.get("name"): torch.randn(n.types[0].shape, generator=gen) * 0.3 for n in graph.nodes if n.op == "const"
    }
    graph = verify(graph.replace(weights=weights))
    by_value: dict = {}
    for n in linears(graph):
        k = n.inputs[1].type.shape[1]
        if n.inputs[0] not in by_value:
            a = torch.rand(k, generator=gen) + 0.05
            a[torch.randperm(k, generator=gen)[:2]] *= 40.0  # outlier channels
            a[0] = 0.0  # a dead channel
            by_value[n.inputs[0]] = a
    amax = {layer_path(n, n.inputs[1].node): by_value[n.inputs[0]] for n in linears(graph)}
    amax.pop("no_stats", None)
    return graph, amax


def expected_qkv_norm(w, amax, meta):
    s = s_ref(amax["attn.q_proj"], colmax(w["attn.q_proj.weight"], w["attn.k_proj.weight"], w["attn.v_proj.weight"]))
    assert s[0] == 1.0  # the dead channel
    for p in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
        assert meta[p]["producer"] == "rms_norm attn_norm" and meta[p]["via"] is None
        assert meta[p]["shared"] == ["attn.q_proj", "attn.k_proj", "attn.v_proj"]
        assert meta[p]["smax"] == pytest.approx(float(s.max())) and meta[p]["smin"] == pytest.approx(float(s.min()))
    return {
        "attn_norm.weight": row(w["attn_norm.weight"], s),
        **{f"attn.{p}_proj.weight": col(w[f"attn.{p}_proj.weight"], s) for p in "qkv"},
    }


def expected_mlp(w, amax, meta):
    s1 = s_ref(amax["mlp.gate_proj"], colmax(w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]))
    s2 = s_ref(amax["mlp.down_proj"], colmax(w["mlp.down_proj.weight"]))
    assert meta["mlp.down_proj"]["producer"] == "linear mlp.up_proj" and meta["mlp.down_proj"]["via"] == "mul"
    assert meta["mlp.up_proj"]["producer"] == "rms_norm mlp_norm"
    return {
        "mlp_norm.weight": row(w["mlp_norm.weight"], s1),
        "mlp.gate_proj.weight": col(w["mlp.gate_proj.weight"], s1),
        "mlp.up_proj.weight": row(col(w["mlp.up_proj.weight"], s1), s2),
        "mlp.down_proj.weight": col(w["mlp.down_proj.weight"], s2),
    }


def expected_attention_gqa(w, amax, meta):
    # 6 query heads of 4 read 2 key/value heads: heads 0-2 share v rows 0-3, heads 3-5 rows 4-7
    grouped = lambda t: t.reshape(2, 3, 4).amax(1)  # noqa: E731
    t = s_ref(grouped(amax["attn.o_proj"].double()), grouped(colmax(w["attn.o_proj.weight"]))).reshape(8)
    s = t.reshape(2, 1, 4).expand(2, 3, 4).reshape(24)
    assert meta["attn.o_proj"]["producer"] == "linear attn.v_proj" and meta["attn.o_proj"]["via"] == "attention"
    for p in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
        assert meta[p] == {"skipped": "the activation is the graph input %x"}
    return {
        "attn.o_proj.weight": col(w["attn.o_proj.weight"], s),
        "attn.v_proj.weight": row(w["attn.v_proj.weight"], t),
        "attn.v_proj.bias": row(w["attn.v_proj.bias"], t),
    }


def expected_layer_norm_chain(w, amax, meta):
    s1 = s_ref(amax["fc1"], colmax(w["fc1.weight"]))
    s2 = s_ref(amax["fc2"], colmax(w["fc2.weight"]))
    assert meta["fc1"]["producer"] == "layer_norm ln" and meta["fc2"]["producer"] == "linear fc1"
    return {
        "ln.weight": row(w["ln.weight"], s1),
        "ln.bias": row(w["ln.bias"], s1),
        "fc1.weight": row(col(w["fc1.weight"], s1), s2),
        "fc1.bias": row(w["fc1.bias"], s2),
        "fc2.weight": col(w["fc2.weight"], s2),
    }


def expected_weightless_norm(w, amax, meta):
    s = s_ref(amax["head"], colmax(w["head.weight"]))
    assert meta["head"]["producer"] == "rms_norm final_norm"
    return {"head.weight": col(w["head.weight"], s), "final_norm.weight": (1.0 / s).float()}


def expected_skipped(w, amax, meta):
    reasons = {p: r["skipped"] for p, r in meta.items()}
    assert set(reasons) == {"fc", "proj", "head", "lm_head", "out", "no_stats"}, meta
    assert reasons["fc"] == "the activation (rms_norm norm) is also read by add", reasons
    assert reasons["proj"] == "the producer gelu act cannot absorb a per-channel scale"
    assert reasons["head"] == "rms_norm final_norm's parameter is also read elsewhere (norm.weight)"
    assert reasons["lm_head"] == "weight 'embed.weight' is tied (also read elsewhere)"
    assert reasons["out"] == "the activation is the graph input %y"
    assert reasons["no_stats"] == "no calibration amax"
    return {}


EXPECTED = {name.removeprefix("expected_"): fn for name, fn in globals().items() if name.startswith("expected_")}


def test_golden_cases_exist():
    assert set(CASES) == set(EXPECTED), "every golden case has its expected weights, and only those"


@pytest.mark.parametrize("case", CASES)
def test_golden(case):
    before, amax = golden_graph(case)
    original = {k: v.clone() for k, v in before.weights.items()}
    after = verify(smooth(before, amax=amax))
    check_golden(GOLDEN / f"{case}.after.mxir", str(after))
    if case == "skipped":
        assert after is before, "a graph whose every layer is skipped comes back as itself"
    else:
        assert after is not before and "smoothed" not in before.meta, "the input graph is left as it was"
    reparsed = verify(parse(str(after), weights=after.weights))
    assert str(reparsed) == str(after)
    # the weights have the values of the formula, written out independently above
    meta = after.meta["smoothed"]
    want = EXPECTED[case](original, amax, meta)
    assert set(after.weights) == set(original) | set(want)
    for name, t in after.weights.items():
        assert t.dtype == torch.float32
        ref = want[name] if name in want else original[name]
        torch.testing.assert_close(t, ref, rtol=1e-6, atol=0, msg=lambda m: f"{name}: {m}")
        assert torch.equal(before.weights.get(name, t), original.get(name, t)), f"the input graph's {name} changed"
    for name in want:
        assert not torch.equal(after.weights[name], original.get(name, torch.ones(()))), f"{name} did not change"
    # and the function is preserved, on fresh inputs at several sizes
    gen = seeded(case + "/inputs")
    run_before, run_after = ReferenceExecutor(before, check_shapes=True), ReferenceExecutor(after, check_shapes=True)
    for sizes in ({"b": 1, "s": 1}, {"b": 3, "s": 7}, {"b": 2, "s": 13}):
        inputs = golden_inputs(before, sizes, gen)
        for i, (x, y) in enumerate(zip(run_before(inputs), run_after(inputs))):
            assert_close_rel(y, x, msg=f"{case} output {i} at {sizes}")


# --------------------------------------------------------------------------- the tiny Llama


@pytest.fixture(scope="module")
def llama(captured_tiny_llama):
    """The canonical tiny Llama with outlier channels in its norm weights (as trained models
    have, so smoothing has something to migrate), calibration batches and their abs-maxima."""
    return outlier_norm_llama(canonicalize(captured_tiny_llama.graph), seed=1234, outliers=2)


@pytest.fixture(scope="module")
def smoothed_llama(llama):
    graph, _, amax = llama
    return verify(smooth(graph, amax=amax))


def llama_logits(graph: Graph, shapes, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    run = ReferenceExecutor(graph, check_shapes=True)
    return [run([torch.randint(0, 131, shape, generator=gen)])[0] for shape in shapes]


SHAPES = [(1, 1), (2, 7), (3, 13)]


def test_tiny_llama_every_linear_smoothed_and_function_preserved(llama, smoothed_llama):
    graph, _, _ = llama
    meta = smoothed_llama.meta["smoothed"]
    assert set(meta) == {layer_path(n, n.inputs[1].node) for n in linears(graph)} and len(meta) == 15
    assert not [p for p, r in meta.items() if "skipped" in r], meta
    vias = {p.rsplit(".", 1)[-1]: r["via"] for p, r in meta.items()}
    assert vias == {"q_proj": None, "k_proj": None, "v_proj": None, "o_proj": "attention", "gate_proj": None,
                    "up_proj": None, "down_proj": "mul", "lm_head": None}
    # every weight changed (the embedding and the rotary frequencies excepted), none changed dtype
    same = sorted(k for k in graph.weights if torch.equal(graph.weights[k], smoothed_llama.weights[k]))
    assert same == sorted(k for k in graph.weights if k.startswith(("model.embed_tokens.", "model.rotary_emb.")))
    assert all(smoothed_llama.weights[k].dtype == graph.weights[k].dtype for k in graph.weights)
    for before, after in zip(llama_logits(graph, SHAPES, 5), llama_logits(smoothed_llama, SHAPES, 5)):
        assert_close_rel(after, before, msg=f"logits {tuple(before.shape)}")


@pytest.mark.parametrize("const", [
    "model.layers.0.input_layernorm.weight",    # rms_norm -> q, k, v
    "model.layers.1.self_attn.v_proj.weight",   # attention -> o_proj
    "model.layers.0.mlp.up_proj.weight",        # mul -> down_proj
    "model.norm.weight",                        # rms_norm -> lm_head
])
def test_tiny_llama_skipping_a_fold_breaks_the_function(llama, smoothed_llama, const):
    """The check above can fail: leave one producer as it was and the logits move."""
    graph, _, _ = llama
    wrong = fresh(smoothed_llama, {**smoothed_llama.weights, const: graph.weights[const]})
    (before,), (after,) = llama_logits(graph, [(2, 9)], 6), llama_logits(wrong, [(2, 9)], 6)
    assert rel_err(after, before) > 1e-3


def test_tiny_llama_activations_are_flatter(llama, smoothed_llama):
    """Measured again on the smoothed graph, each layer's input abs-max is amax / s, and its
    outliers are smaller relative to the median channel."""
    graph, batches, amax = llama
    after = input_amax(smoothed_llama, batches)
    flatness = lambda a: float(a.max() / a.median())  # noqa: E731
    for path, s in llama_scales(graph, smoothed_llama).items():
        torch.testing.assert_close(after[path].double(), amax[path].double() / s, rtol=1e-4, atol=1e-6)
        if path.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")):  # behind a norm
            assert flatness(after[path]) < 0.5 * flatness(amax[path]), path


def test_tiny_llama_shared_producers_share_one_scale(llama, smoothed_llama):
    graph, _, _ = llama
    w0, w1 = graph.weights, smoothed_llama.weights
    scale = lambda p: recovered_s(w0[f"model.layers.0.{p}.weight"], w1[f"model.layers.0.{p}.weight"])  # noqa: E731
    q, k = scale("self_attn.q_proj"), scale("self_attn.k_proj")
    torch.testing.assert_close(q, k, rtol=1e-6, atol=0)
    norm = "model.layers.0.input_layernorm.weight"
    torch.testing.assert_close(w1[norm].double(), w0[norm].double() / q, rtol=1e-6, atol=0)
    # v_proj: columns times q's s, rows divided by o_proj's per-group t (6 query heads of 12, 2 groups)
    o = scale("self_attn.o_proj").reshape(2, 3, 12)
    torch.testing.assert_close(o, o[:, :1].expand(2, 3, 12), rtol=1e-6, atol=0)
    assert not torch.allclose(o[0], o[1])
    v = "model.layers.0.self_attn.v_proj.weight"
    want = w0[v].double() * q[None, :] / o[:, 0].reshape(24, 1)
    torch.testing.assert_close(w1[v].double(), want, rtol=1e-6, atol=0)
    # gate and up share one s too; up's rows carry down_proj's
    up, down = "model.layers.0.mlp.up_proj.weight", scale("mlp.down_proj")
    want = w0[up].double() * scale("mlp.gate_proj")[None, :] / down[:, None]
    torch.testing.assert_close(w1[up].double(), want, rtol=1e-6, atol=0)
    meta = smoothed_llama.meta["smoothed"]
    assert meta["model.layers.0.self_attn.k_proj"]["shared"] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]


def test_tiny_llama_alpha_per_path(llama, smoothed_llama):
    graph, _, amax = llama
    down, head = "model.layers.1.mlp.down_proj", "lm_head"
    got = smooth(graph, amax=amax, alpha={down: 0.9, head: 0.0})
    meta = got.meta["smoothed"]
    assert meta[down]["alpha"] == 0.9 and meta[head]["alpha"] == 0.0
    assert {r["alpha"] for p, r in meta.items() if p not in (down, head)} == {0.5}
    for path, alpha in ((down, 0.9), (head, 0.0)):
        name = f"{path}.weight"
        s = recovered_s(graph.weights[name], got.weights[name])
        torch.testing.assert_close(s, s_ref(amax[path], colmax(graph.weights[name]), alpha), rtol=1e-6, atol=0)
        assert not torch.equal(got.weights[name], smoothed_llama.weights[name])
    for before, after in zip(llama_logits(graph, SHAPES[1:], 8), llama_logits(got, SHAPES[1:], 8)):
        assert_close_rel(after, before, msg="logits with alpha per path")
    # layers that share one scale need one alpha
    with pytest.raises(ValueError, match=r"q_proj.*k_proj.*one alpha.*0\.3, 0\.5"):
        smooth(graph, amax=amax, alpha={"model.layers.0.self_attn.q_proj": 0.3})


def test_tiny_llama_bad_options(llama):
    graph, _, amax = llama
    for alpha in (1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got"):
            smooth(graph, amax=amax, alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha for layer 'lm_head' must be a number in \[0, 1\], got 2"):
        smooth(graph, amax=amax, alpha={"lm_head": 2})
    with pytest.raises(ValueError, match=r"alpha names \['model.layers.0.mlp.gate'\], which are no linear layers"):
        smooth(graph, amax=amax, alpha={"model.layers.0.mlp.gate": 0.5})
    path = "model.layers.0.mlp.down_proj"
    want = rf"layer '{path}': amax must be a tensor of shape \[100\].*\[N=72, K=100\].*got \[99\]"
    with pytest.raises(ValueError, match=want):
        smooth(graph, amax={**amax, path: amax[path][:99]})
    with pytest.raises(ValueError, match=r"layer 'lm_head': amax must be a tensor of shape \[72\].*got \[1, 72\]"):
        smooth(graph, amax={**amax, "lm_head": amax["lm_head"][None]})
    with pytest.raises(ValueError, match=r"layer 'lm_head': amax must be finite and >= 0"):
        smooth(graph, amax={**amax, "lm_head": -amax["lm_head"]})


def test_tiny_llama_layer_selection(llama):
    graph, _, amax = llama
    got = smooth(graph, amax=amax, layers=lambda p: ".mlp." in p)
    mlp = {f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up", "down")}
    assert set(got.meta["smoothed"]) == mlp
    changed = {k for k in graph.weights if not torch.equal(graph.weights[k], got.weights[k])}
    assert changed == {f"model.layers.{i}.{p}" for i in (0, 1) for p in (
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "post_attention_layernorm.weight")}
    # q alone: k and v read the same norm output unsmoothed, so q is skipped and nothing changes
    lone = fresh(graph)
    assert smooth(lone, amax=amax, layers=lambda p: p == "model.layers.0.self_attn.q_proj") is lone
    assert lone.meta["smoothed"] == {"model.layers.0.self_attn.q_proj": {"skipped": (
        "the activation (rms_norm model.layers.0.input_layernorm) "
        "is also read by linear model.layers.0.self_attn.k_proj")}}
    # no amax at all: every layer is skipped, and says why
    bare = fresh(graph)
    assert smooth(bare, amax={}) is bare
    assert {r["skipped"] for r in bare.meta["smoothed"].values()} == {"no calibration amax"}
    assert len(bare.meta["smoothed"]) == 15
    # one layer of a shared group without amax: the others say which
    partial = smooth(fresh(graph), amax={k: v for k, v in amax.items() if k != "model.layers.1.mlp.up_proj"})
    assert partial.meta["smoothed"]["model.layers.1.mlp.gate_proj"] == {"skipped": (
        "shares its input with model.layers.1.mlp.up_proj, which cannot be smoothed: no calibration amax")}
    assert partial.meta["smoothed"]["model.layers.1.mlp.down_proj"]["via"] == "mul"


def test_registered_pass(llama, smoothed_llama):
    graph, _, amax = llama
    assert PASSES["smooth"] is smooth
    got = run_pipeline(graph, ["smooth"], options={"smooth": {"amax": amax}}, verify=True).graph
    assert all(torch.equal(got.weights[k], smoothed_llama.weights[k]) for k in graph.weights)


# --------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def bert(minilm):
    """The real all-MiniLM-L6-v2, captured on one short sentence, with that sentence's abs-maxima."""
    from mxc.frontends.torch_export import capture

    model, tok = minilm
    enc = dict(tok(["Smoothing moves the outliers of activations into the weights."], return_tensors="pt"))
    captured = capture(model, enc)
    graph = canonicalize(captured.graph)
    return graph, captured.call_spec, input_amax(graph, [captured.call_spec.bind((), enc)])


def test_minilm_smooths_attention_outputs_and_keeps_the_function(minilm, bert):
    graph, spec, amax = bert
    got = verify(smooth(graph, amax=amax))
    meta = got.meta["smoothed"]
    done = {p: r for p, r in meta.items() if "skipped" not in r}
    # post-norm BERT: every norm output also feeds a residual add, and gelu feeds output.dense,
    # so only the attention outputs are smoothed, through the value projections
    assert set(done) == {f"encoder.layer.{i}.attention.output.dense" for i in range(6)}
    for i in range(6):
        r = done[f"encoder.layer.{i}.attention.output.dense"]
        assert r["producer"] == f"linear encoder.layer.{i}.attention.self.value" and r["via"] == "attention"
        assert r["smax"] > 2 * r["smin"]
        for p in ("attention.self.query", "intermediate.dense"):
            assert meta[f"encoder.layer.{i}.{p}"]["skipped"].startswith("the activation (layer_norm ")
            assert " is also read by add " in meta[f"encoder.layer.{i}.{p}"]["skipped"]
        assert meta[f"encoder.layer.{i}.output.dense"]["skipped"] == (
            f"the producer gelu encoder.layer.{i}.intermediate.intermediate_act_fn cannot absorb a per-channel scale")
    changed = {k for k in graph.weights if not torch.equal(graph.weights[k], got.weights[k])}
    assert changed == {f"encoder.layer.{i}.{p}" for i in range(6) for p in (
        "attention.output.dense.weight", "attention.self.value.weight", "attention.self.value.bias")}
    # another sentence, of another length
    _, tok = minilm
    text = "Nothing the encoder computes may change, not even slightly, when it is smoothed."
    enc = dict(tok([text], return_tensors="pt"))
    inputs = spec.bind((), enc)
    before, after = ReferenceExecutor(graph)(inputs), ReferenceExecutor(got)(inputs)
    for i, (x, y) in enumerate(zip(before, after)):
        assert_close_rel(y, x, msg=f"MiniLM output {i}")
    # leaving the value projection's rows as they were breaks it
    name = "encoder.layer.2.attention.self.value.weight"
    wrong = fresh(got, {**got.weights, name: graph.weights[name]})
    assert rel_err(ReferenceExecutor(wrong)(inputs)[0], before[0]) > 1e-3
