"""Quantized all-MiniLM-L6-v2: sentence embeddings (mean pooling) stay close to float."""

from __future__ import annotations

import warnings

import pytest
import torch
from pydoc_data.topics import topics

import mxc


def sentences() -> list[str]:
    """Real sentences from the start of the pydoc topics (calibration takes the end)."""
    out = []
    for key in sorted(topics)[:40]:
        out += [s.strip() for s in topics[key].replace("\n", " ").split(". ") if 6 <= len(s.split()) <= 40][:1]
    return out[:16]


@pytest.fixture(scope="module")
def float_embeddings(minilm):
    model, tok = minilm
    enc = tok(sentences(), padding=True, return_tensors="pt")
    with torch.no_grad():
        return enc, mxc.eval.mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])


def cosines(minilm, float_embeddings, plan, calibration=None) -> torch.Tensor:
    model, _ = minilm
    enc, ref = float_embeddings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = mxc.compile(model, plan, example_inputs=dict(enc), calibration=calibration)
    emb = mxc.eval.mean_pool(compiled(**enc).last_hidden_state, enc["attention_mask"])
    return torch.nn.functional.cosine_similarity(emb, ref)


def test_w8a8_embeddings(minilm, float_embeddings):
    cos = cosines(minilm, float_embeddings, "w8a8")
    assert cos.min() >= 0.99, cos


def test_w4a16_embeddings_with_gptq(minilm, float_embeddings):
    _, tok = minilm
    calibration = [
        dict(tok(topics[k][:2000], truncation=True, max_length=256, return_tensors="pt")) for k in sorted(topics)[-24:]
    ]
    gptq = cosines(minilm, float_embeddings, "w4a16-g128", calibration)
    rtn = cosines(minilm, float_embeddings, "w4a16-g128")
    assert gptq.mean() >= 0.97, gptq
    assert gptq.mean() > rtn.mean()
