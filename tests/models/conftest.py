"""Fixtures for model tests: tiny configs and tiny random ``transformers`` checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

# A tiny geometry shared by every family; 97 is deliberately not a power of two.
TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)

FAMILIES = ("qwen3", "qwen2", "llama")


def hf_config(family: str, **overrides):
    """A tiny ``transformers`` config of one family (Qwen3 with an explicit head_dim,
    Qwen2 tied with q/k/v biases, Llama with llama3 rope scaling that matters at these lengths)."""
    import transformers

    kw = dict(TINY)
    if family == "qwen3":
        kw.update(head_dim=24, tie_word_embeddings=False)
        cls = transformers.Qwen3Config
    elif family == "qwen2":
        kw.update(tie_word_embeddings=True)
        cls = transformers.Qwen2Config
    elif family == "llama":
        kw.update(
            max_position_embeddings=64,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            tie_word_embeddings=False,
        )
        cls = transformers.LlamaConfig
    else:
        raise ValueError(family)
    kw.update(overrides)
    return cls(**kw)


def random_hf_model(family: str, seed: int = 0, **overrides):
    """A float32 torch model with random weights; norms and biases perturbed so they matter."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers logits with HF's own left-padding positions (as in ``generate``)."""
    import torch

    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(positions),
        )
    return out.logits.float().numpy()


def padded_batch(seed: int = 0, batch: int = 3, length: int = 12, vocab: int = 97):
    """Left-padded tokens and mask: a full row, a row with 4 pads, a row with one real token."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    mask = np.ones((batch, length), bool)
    mask[1, :4] = False
    mask[2, : length - 1] = False
    return tokens, mask


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """family -> (directory of a saved tiny random HF model, the torch model), built once."""
    pytest.importorskip("torch", reason="parity tests need torch (CPU), a test-only dependency")
    cache: dict[str, tuple[str, object]] = {}

    def get(family: str):
        if family not in cache:
            model = random_hf_model(family)
            path = tmp_path_factory.mktemp(f"hf_{family}")
            model.save_pretrained(path)
            cache[family] = (str(path), model)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def hf():
    """The helpers above, for test modules (conftest is not importable by name)."""
    import types

    return types.SimpleNamespace(
        hf_config=hf_config,
        random_hf_model=random_hf_model,
        torch_logits=torch_logits,
        padded_batch=padded_batch,
        FAMILIES=FAMILIES,
    )
