"""Shared test setup: the Triton interpreter, offline Hugging Face and mxc's debug checks are
switched on before anything imports triton or transformers; the real models are loaded once
per session."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MXC_DEBUG", "1")  # verify after every pass, check every result's shape

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (fp32) and its tokenizer."""
    from mxc import models

    return models.load_smollm2()


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 (BertModel, fp32) and its tokenizer."""
    from mxc import models

    return models.load_minilm()


def make_tiny_llama(seed: int = 0, layers: int = 2):
    """A random Llama with non-power-of-two sizes: hidden 72 (6 heads of 12), 2 KV heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=131, hidden_size=72, intermediate_size=100, num_hidden_layers=layers,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_llama_factory():
    """`make_tiny_llama` itself, for tests that need a fresh model or another size."""
    return make_tiny_llama


@pytest.fixture(scope="session")
def captured_tiny_llama(tiny_llama):
    """`capture(tiny_llama)`: its graph, call spec and exported program (capture takes seconds)."""
    from mxc.frontends.torch_export import capture

    return capture(tiny_llama)


@pytest.fixture
def one_thread():
    """Many tiny CPU ops (GPTQ, clip search): threads only add scheduling stalls on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
