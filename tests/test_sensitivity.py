"""Sensitivity measurement (`mxc.sensitivity`) on the tiny Llama: each measured error is the
KL (or cross-entropy increase) that compiling the whole model with only that tensor
quantized gives, the cached-suffix recomputation equals a full one, and the proxy's rank
correlation is Spearman's."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import mxc
from mxc import sensitivity
from mxc.ir import parse_format
from mxc.passes.allocate import Choice
from mxc.passes.quantize import format_bytes, stored_bytes

FORMATS = ["int2<asym,g32>", "int3<asym,g32>", "int4<asym,g32>", "int8<sym,channel>"]


@pytest.fixture(scope="module")
def setup(tiny_llama_factory):
    """A fresh tiny Llama, random calibration tokens, and its weight sensitivities (KL)."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    model = tiny_llama_factory(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 131, (24,), generator=gen) for _ in range(3)]
    result = sensitivity.measure(model, [None, *FORMATS], batches, progress=False)
    return model, batches, result


def _logits(model, plan, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no calibration data: rounded to nearest, as asked
        return mxc.compile(model, plan)(ids).logits.double()  # log-probs in float64, as measured


def _only(path, fmt):
    rule = mxc.Rule(path, weight=fmt, options={"method": "rtn"})
    return mxc.Plan(rules=(rule,), default=mxc.Rule(), method="rtn", clip_search=False)


def test_choices_cover_every_linear_weight_with_sizes(setup):
    model, _, result = setup
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(result) == sorted(f"{n}:weight" for n in linears)
    for tensor, row in result.items():
        w = model.get_submodule(tensor.removesuffix(":weight")).weight
        assert [c.fmt for c in row] == [None, *map(parse_format, FORMATS)]
        assert all(isinstance(c, Choice) and c.tensor == tensor and c.numel == w.numel() for c in row)
        assert row[0] == Choice(tensor, None, 4 * w.numel(), 32.0, w.numel(), 0.0)  # float: error 0, no run
        for c in row[1:]:
            assert c.bytes == stored_bytes(c.fmt, tuple(w.shape)) >= format_bytes(c.fmt, tuple(w.shape))
            assert c.bits == c.fmt.effective_bits(w.shape[1])
    assert result.objective == "kl" and result.tokens == 3 * 24 and result.correlation is None


def test_measured_kl_equals_brute_force_compilation(setup):
    model, batches, result = setup
    ids = torch.stack(batches)
    ref = F.log_softmax(_logits(model, None, ids), -1)
    tensors = list(result)
    for tensor in [tensors[0], tensors[5], tensors[-1]]:  # q_proj of layer 0, a later MLP layer, lm_head
        path = tensor.removesuffix(":weight")
        for c in result[tensor][1:]:
            got = F.log_softmax(_logits(model, _only(path, c.fmt), ids), -1)
            kl = float(F.kl_div(got, ref, reduction="sum", log_target=True)) / ids.numel()
            assert c.error == pytest.approx(kl, rel=1e-4, abs=1e-8), (tensor, str(c.fmt))
            assert c.error > 0


def test_errors_grow_as_bits_shrink(setup):
    _, _, result = setup
    monotone = [all(a.error > b.error for a, b in zip(row[1:], row[2:])) for row in result.values()]
    assert sum(monotone) >= 0.8 * len(monotone), monotone


def test_cross_entropy_objective_equals_brute_force(setup):
    model, batches, _ = setup
    fmt = "int2<asym,g32>"
    path = "model.layers.1.mlp.down_proj"
    result = sensitivity.measure(model, {f"{path}:weight": [fmt]}, batches, objective="ce", progress=False)
    assert list(result) == [f"{path}:weight"]
    ids = torch.stack(batches)

    def ce(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")

    want = float(ce(_logits(model, _only(path, fmt), ids)) - ce(_logits(model, None, ids))) / (3 * 23)
    assert result[f"{path}:weight"][0].error == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_cached_suffix_equals_full_recomputation(setup):
    model, batches, _ = setup
    graph, inputs, ids = sensitivity.prepare(model, batches)
    suffixes = sensitivity.Suffixes(graph, inputs, ids, "kl")
    for target in sensitivity.targets(graph, ("weight", "act", "kv"))[::4]:
        fmt = parse_format("int4<sym,g32>" if target.kind == "weight" else "int4<sym,token>")
        observer = suffixes.replacement(target, fmt)
        run = suffixes.executor.start(inputs[0])
        run.advance(target.index)
        fork = run.fork()
        fork.advance(len(graph.nodes), observer)
        full = suffixes.executor(inputs[0], observer)[0]
        assert torch.equal(fork.outputs()[0], full), target.tensor
        assert not torch.equal(full, suffixes.executor(inputs[0])[0])
        run.advance(len(graph.nodes))  # the float run went on unchanged by its fork
        assert torch.equal(run.outputs()[0], suffixes.executor(inputs[0])[0])


def test_activation_and_kv_sensitivity_equal_brute_force(setup):
    model, batches, _ = setup
    fmt = "int4<sym,token>"
    got = sensitivity.measure(model, {"act": [fmt], "kv": [fmt]}, batches, tensors=("act", "kv"), progress=False)
    assert "model.layers.0.self_attn:kv" in got and "model.layers.1.mlp.up_proj:act" in got
    assert all(c.bytes == 0 and c.numel == 0 for row in got.values() for c in row)
    ids = torch.stack(batches)
    ref = F.log_softmax(_logits(model, None, ids), -1)
    for tensor, rule in [
        ("model.layers.1.mlp.up_proj:act", mxc.Rule("model.layers.1.mlp.up_proj", act=fmt)),
        ("model.layers.0.self_attn:kv", mxc.Rule("model.layers.0.self_attn", op="attention", kv=fmt)),
    ]:
        plan = mxc.Plan(rules=(rule,), default=mxc.Rule(), method="rtn", clip_search=False)
        q = F.log_softmax(_logits(model, plan, ids), -1)
        kl = float(F.kl_div(q, ref, reduction="sum", log_target=True)) / ids.numel()
        assert got[tensor][0].error == pytest.approx(kl, rel=1e-4, abs=1e-8), tensor


def test_proxy_reports_its_rank_correlation(setup):
    model, batches, measured = setup
    result = sensitivity.measure(model, [None, *FORMATS], batches, objective="proxy", check=100, progress=False)
    assert result.checked == tuple(measured)  # 14 tensors, all checked
    proxy = [c.error for row in result.values() for c in row[1:]]
    kl = [c.error for row in measured.values() for c in row[1:]]
    assert result.correlation == pytest.approx(sensitivity.spearman(proxy, kl), abs=1e-12)
    assert result.correlation > 0.5  # the proxy ranks (layer, format) pairs roughly as the KL does
    assert "Spearman" in result.describe()


@pytest.fixture(scope="module")
def fisher_setup(tiny_llama_factory):
    """A fresh float64 tiny Llama (float64, so that the graph's logits and eager torch's agree
    to rounding and draw the same next tokens), 40 random windows, and the fisher estimate."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    model = tiny_llama_factory(seed=seed).double()
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, 131, (int(torch.randint(9, 30, (), generator=gen)),), generator=gen) for _ in range(40)]
    result = sensitivity.measure(model, [None, *FORMATS[1:]], batches, objective="fisher", check=100, progress=False)
    return model, batches, result


def test_fisher_equals_an_eager_autograd_estimate(fisher_setup):
    """Each error is Σ ⟨Q(W) − W, ∇_W log p(ŷ)⟩² / (2 · positions) over the windows, ŷ drawn
    from the float model (seed `FISHER_SEED`, window after window), recomputed here with the
    eager model's own autograd and rounding to nearest."""
    model, batches, result = fisher_setup
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    weights = [model.get_submodule(n).weight for n in names]
    gen = torch.Generator().manual_seed(sensitivity.FISHER_SEED)
    squares = {n: torch.zeros(len(FORMATS) - 1, dtype=torch.float64) for n in names}
    positions = 0
    for ids in batches:
        with torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
            logp = F.log_softmax(model(ids[None]).logits[0].float(), -1)
            drawn = torch.multinomial(logp.detach().exp(), 1, generator=gen)
            grads = torch.autograd.grad(logp.gather(1, drawn).sum(), weights)
            for w in weights:
                w.requires_grad_(False)
        for n, w, g in zip(names, weights, grads):
            s = torch.stack([((parse_format(f).fake(w.detach().float()) - w.float()) * g).sum() for f in FORMATS[1:]])
            squares[n] += s.double() ** 2
        positions += ids.numel()
    assert sorted(result) == sorted(f"{n}:weight" for n in names) and result.objective == "fisher"
    for n in names:
        row = result[f"{n}:weight"]
        assert row[0].error == 0.0 and row[0].fmt is None
        want = (squares[n] / (2 * positions)).tolist()
        assert [c.error for c in row[1:]] == pytest.approx(want, rel=2e-3), n
        assert all(c.error > 0 for c in row[1:])


def test_fisher_agrees_with_the_measured_kl_and_reports_its_correlation(fisher_setup):
    """The second-order estimate is close to the KL where the change is small, and its rank
    correlation with the KL measured on the checked tensors (the first `CHECK_TOKENS` tokens)
    is what `correlation` says."""
    model, batches, result = fisher_setup
    assert result.checked == tuple(result)  # every tensor checked (check=100)
    first, seen = [], 0
    for b in batches:
        if first and seen + b.numel() > sensitivity.CHECK_TOKENS:
            break
        first.append(b)
        seen += b.numel()
    measured = sensitivity.measure(model, [None, *FORMATS[1:]], first, progress=False)
    est = [c.error for row in result.values() for c in row[1:]]
    kl = [c.error for row in measured.values() for c in row[1:]]
    assert result.correlation == pytest.approx(sensitivity.spearman(est, kl), abs=1e-12)
    assert result.correlation > 0.9
    assert "Spearman" in result.describe() and "fisher" in result.describe()
    whole = sensitivity.measure(model, [None, *FORMATS[1:]], batches, progress=False)  # the KL on the same text
    for i in range(len(FORMATS) - 1):  # summed over tensors, per format: the measured KL, up to the
        # noise of 40 draws (0.76 to 1.36 over 12 seeds); a lost or doubled ½ would fail
        a = sum(row[1 + i].error for row in result.values())
        b = sum(row[1 + i].error for row in whole.values())
        assert 0.6 < a / b < 1.6, (FORMATS[1 + i], a, b)


def test_spearman_averages_ties_and_matches_pearson_of_ranks():
    a = torch.randn(40).tolist()
    assert sensitivity.spearman(a, [x**3 for x in a]) == pytest.approx(1.0)
    assert sensitivity.spearman(a, [-x for x in a]) == pytest.approx(-1.0)
    assert sensitivity.ranks([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]
    # ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]: 4.5 / sqrt(4.5 · 5)
    assert sensitivity.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(sensitivity.spearman([1, 1, 1], [1, 2, 3]))


def test_errors_name_what_is_wrong(tiny_llama):
    ids = [torch.randint(0, 131, (8,))]
    with pytest.raises(ValueError, match="objective"):
        sensitivity.measure(tiny_llama, ["int4<sym,g32>"], ids, objective="mse")
    with pytest.raises(ValueError, match="calibration"):
        sensitivity.measure(tiny_llama, ["int4<sym,g32>"], None)
    with pytest.raises(ValueError, match="per token"):
        sensitivity.measure(tiny_llama, ["int4<sym,token>"], ids, progress=False)
    with pytest.raises(ValueError, match="weights only"):
        sensitivity.measure(tiny_llama, ["int4<sym,token>"], ids, objective="proxy", tensors=("act",))
    with pytest.raises(ValueError, match="fisher.*weights only"):
        sensitivity.measure(tiny_llama, ["int4<sym,token>"], ids, objective="fisher", tensors=("act",))


def test_gptq_quantizer_equals_brute_force_compilation(setup):
    """quantizer="gptq": each error is the KL of compiling the model with only that weight
    quantized by the quantize pass with calibration (clipping search + GPTQ on the float
    Hessian: with one layer quantized, its inputs are float, as measured)."""
    model, batches, rtn = setup
    path = "model.layers.1.mlp.down_proj"
    fmts = ["int2<asym,g32>", "int3<asym,g32>"]
    got = sensitivity.measure(model, {f"{path}:weight": fmts}, batches, quantizer="gptq", progress=False)
    assert got.quantizer == "gptq" and "weights by gptq" in got.describe()
    ids = torch.stack(batches)
    ref = F.log_softmax(_logits(model, None, ids), -1)
    for c, fmt in zip(got[f"{path}:weight"], fmts):
        plan = mxc.Plan(rules=(mxc.Rule(path, weight=fmt),), default=mxc.Rule(), method="gptq", clip_search=True)
        q = F.log_softmax(mxc.compile(model, plan, calibration=batches)(ids).logits.double(), -1)
        kl = float(F.kl_div(q, ref, reduction="sum", log_target=True)) / ids.numel()
        assert c.error == pytest.approx(kl, rel=1e-4, abs=1e-8), fmt
    rtn_row = {str(c.fmt): c.error for c in rtn[f"{path}:weight"]}
    assert got[f"{path}:weight"][0].error < rtn_row["int2<asym,g32>"]  # GPTQ + clipping beats rounding at 2 bits


def test_unknown_quantizer_and_misplaced_hessian_data_are_refused(setup):
    model, batches, _ = setup
    with pytest.raises(ValueError, match="unknown weight quantizer 'awq'; expected one of rtn, gptq"):
        sensitivity.measure(model, ["int4<asym,g32>"], batches, quantizer="awq", progress=False)
    with pytest.raises(ValueError, match="hessian_calibration is for quantizer='gptq'"):
        sensitivity.measure(model, ["int4<asym,g32>"], batches, hessian_calibration=batches, progress=False)


def test_kl_score_survives_logit_differences_past_float32_exp_range(setup):
    """A row whose logits move by more than ~88 (expm1 overflows in float32) is scored by
    float64 log-softmax instead: finite and equal to it."""
    model, batches, _ = setup
    graph, inputs, ids = sensitivity.prepare(model, batches)
    suffixes = sensitivity.Suffixes(graph, inputs, ids, "kl")
    ref = suffixes.reference[0]
    got = ref.clone()
    got[0, 0, 0] += 200.0  # one position moves far, the others a little
    got[0, 1:] += 0.01 * torch.randn_like(got[0, 1:])
    want = float(F.kl_div(F.log_softmax(got.double(), -1), F.log_softmax(ref.double(), -1), reduction="sum",
                          log_target=True))
    score = suffixes.score(0, [got])
    assert math.isfinite(score) and score == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_outlier_candidates_equal_brute_force_compilation(setup, quantizer):
    """"fmt+k": the k input channels of largest calibrated abs-max stay int8, the rest take
    fmt — the error of compiling the model with only that layer's rule
    `Rule(weight=fmt, options={"outliers": k})` (reorder + quantize passes), under round to
    nearest and under GPTQ (the outlier part compensating the low-bit part)."""
    model, batches, rtn = setup
    ids = torch.stack(batches)
    ref = F.log_softmax(_logits(model, None, ids), -1)
    cases = [("model.layers.1.mlp.down_proj", "int2<asym,g32>", 7), ("model.layers.0.self_attn.q_proj", "int3<asym,g32>", 5)]
    for path, fmt, k in cases:
        got = sensitivity.measure(model, {f"{path}:weight": [fmt, f"{fmt}+{k}"]}, batches, quantizer=quantizer,
                                  progress=False)
        plain, mixed = got[f"{path}:weight"]
        assert (plain.outliers, mixed.outliers) == (0, k) and mixed.fmt == plain.fmt == parse_format(fmt)
        plan = mxc.Plan(rules=(mxc.Rule(path, weight=fmt, options={"outliers": k}),), default=mxc.Rule(),
                        method=quantizer, clip_search=quantizer == "gptq")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = mxc.compile(model, plan, calibration=batches)
        q = F.log_softmax(compiled(ids).logits.double(), -1)
        kl = float(F.kl_div(q, ref, reduction="sum", log_target=True)) / ids.numel()
        assert mixed.error == pytest.approx(kl, rel=1e-4, abs=1e-8), (path, quantizer)
        assert mixed.error > 0
        layer = compiled.report().layers[path]
        assert layer["outliers"] == k and mixed.bits == pytest.approx(layer["bits"], abs=1e-12)
        kdim = model.get_submodule(path).weight.shape[1]
        # q_proj's permutation is a gather before its norm: an int64 index [K] (shared with
        # k and v, but only q is measured here); down_proj's folds into gate's and up's rows
        index = sensitivity.INDEX_BYTES * kdim if path.endswith("q_proj") else 0
        assert mixed.bytes == layer["bytes"] + index
        float_bytes = mxc.compile(model).report().weight_bytes
        assert compiled.report().weight_bytes - float_bytes == mixed.bytes - 4 * mixed.numel  # all it adds
        total = mixed.bits * mixed.numel
        assert total == pytest.approx(round(total), rel=1e-9)  # whole bits, as the solver needs


def test_candidates_parse_print_and_refuse_what_cannot_be(setup):
    model, batches, _ = setup
    c = sensitivity.Candidate.parse("int3<asym,g32> + 4")
    assert c == sensitivity.Candidate(parse_format("int3<asym,g32>"), 4) and str(c) == "int3<asym,g32>+4"
    assert sensitivity.Candidate.parse(str(c)) == c
    assert sensitivity.Candidate.parse(None) == sensitivity.Candidate(None) and str(sensitivity.Candidate(None)) == "float"
    assert sensitivity.Candidate.parse("int4<sym,g32>") == sensitivity.Candidate(parse_format("int4<sym,g32>"))
    with pytest.raises(ValueError, match="outlier channels need a format"):
        sensitivity.Candidate.parse("float+3")
    with pytest.raises(ValueError, match="at least one channel stays"):
        sensitivity.measure(model, {"model.layers.0.self_attn.q_proj:weight": ["int4<sym,g32>+72"]}, batches,
                            progress=False)
    with pytest.raises(ValueError, match="weights only"):
        sensitivity.measure(model, {"act": ["int8<sym,token>+4"]}, batches, tensors=("act",), progress=False)
    with pytest.raises(ValueError, match="outliers must be a count"):
        sensitivity.Candidate(parse_format("int4<sym,g32>"), -1)


def test_saved_measurement_keeps_outlier_candidates(setup):
    model, batches, _ = setup
    path = "model.layers.1.mlp.up_proj:weight"
    got = sensitivity.measure(model, {path: ["int4<asym,g32>", "int4<asym,g32>+3"]}, batches, progress=False)
    again = sensitivity.Sensitivity.from_dict(json.loads(json.dumps(got.to_dict())))
    assert again == got and [c.outliers for c in again[path]] == [0, 3]


class _WordTokenizer:
    """Token ids of a text's words (hashed into the tiny Llama's vocabulary)."""

    def encode(self, text, add_special_tokens=False):
        return [sum(map(ord, w)) % 131 for w in text.split()]


def test_a_tokenizer_scores_text_held_out_from_the_compiles_calibration(tiny_llama):
    """Given a tokenizer, the scored windows are `WINDOWS` windows just before the compile's
    calibration windows (the last 8 × 512 tokens), never overlapping them."""
    from mxc.calibrate import text_batches

    tok = _WordTokenizer()
    graph, inputs, ids = sensitivity.prepare(tiny_llama, tok)
    n, seq = sensitivity.WINDOWS
    cal_n, cal_seq = sensitivity.CALIBRATION_WINDOWS
    assert torch.equal(torch.cat(ids), torch.stack(text_batches(tok, n=n, seq_len=seq, skip=cal_n * cal_seq)))
    everything = tok.encode(mxc.eval.default_text())
    end = len(everything) - cal_n * cal_seq
    assert torch.cat(ids).reshape(-1).tolist() == everything[end - n * seq:end]
    assert torch.stack(text_batches(tok, n=cal_n, seq_len=cal_seq)).reshape(-1).tolist() == everything[end:]
    # `windows` sizes that text: 3 windows of 20 tokens, just before the compile's
    _, _, more = sensitivity.prepare(tiny_llama, tok, windows=(3, 20))
    assert torch.cat(more).reshape(-1).tolist() == everything[end - 60:end]
    with pytest.raises(ValueError, match=r"windows must be \(count, tokens per window\), two positive ints, got \(3, 0\)"):
        sensitivity.prepare(tiny_llama, tok, windows=(3, 0))
    with pytest.raises(ValueError, match="sizes the text a tokenizer gives; calibration is 2 token-id batches"):
        sensitivity.prepare(tiny_llama, [torch.randint(0, 131, (16,)) for _ in range(2)], windows=(3, 20))
    with pytest.raises(ValueError, match="skip must be a count"):
        text_batches(tok, n=1, seq_len=8, skip=-1)
    with pytest.raises(ValueError, match=f"after the last {len(everything)} are left out"):
        text_batches(tok, n=1, seq_len=8, skip=len(everything))
