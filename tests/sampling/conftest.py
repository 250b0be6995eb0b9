"""Fixtures for the sampler tests: a tiny random decoder with peaked logits, and its reference stats.

Weights that matter for the checks (the unembedding) come from NumPy with a
fixed seed; references are the model's own full forward pass plus
``erpo_jax.ops.token_logp_and_entropy`` on prompt + completion.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from erpo_jax.models import Decoder, ModelConfig
from erpo_jax.ops import token_logp_and_entropy

# 100 = the Countdown character tokenizer's vocabulary, so the same model serves
# the stop-string tests.
VOCAB = 100
CONFIG = ModelConfig("qwen3", VOCAB, 32, 64, 2, 4, 2, 8, qk_norm=True, max_position_embeddings=256)


@functools.cache
def _model() -> Decoder:
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    # Hidden states leave the final RMSNorm with unit scale, so an unembedding of
    # std 0.5 gives logits of std ~2.8: peaked distributions, where top-p and
    # min-p actually cut and greedy has no near-ties.
    model.lm_head.set_value(jnp.asarray(rng.normal(0.0, 0.5, (32, VOCAB)), jnp.float32))
    model.embed.set_value(jnp.asarray(rng.normal(0.0, 1.0, (VOCAB, 32)), jnp.float32))
    return model


@pytest.fixture(scope="session")
def model() -> Decoder:
    return _model()


def left_padded(seed: int, b: int = 4, s: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts: full, 2 pads, a one-token prompt, 3 pads (cycled)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, VOCAB, (b, s)).astype(np.int32)
    mask = np.ones((b, s), bool)
    pads = [0, 2, s - 1, 3]
    for i in range(b):
        mask[i, : pads[i % 4]] = False
    # Padding slots hold ids outside the vocabulary: the sampler must never embed them.
    tokens[~mask] = 10_000
    return tokens, mask


@nnx.jit
def _hidden(model, tokens, mask):
    return model.hidden_states(tokens, mask)


def reference_hidden(model, prompt, prompt_mask, completion, completion_mask) -> np.ndarray:
    """Final hidden states ``[B, T, D]`` at the positions that predict each completion token."""
    tokens = np.concatenate([np.where(prompt_mask, prompt, 0), completion], axis=1)
    mask = np.concatenate([prompt_mask, completion_mask], axis=1)
    hidden = _hidden(model, jnp.asarray(tokens), jnp.asarray(mask))
    s, t = prompt.shape[1], completion.shape[1]
    return np.asarray(hidden[:, s - 1 : s - 1 + t])


def reference_logits(model, prompt, prompt_mask, completion, completion_mask) -> np.ndarray:
    """float32 logits ``[B, T, V]`` of the full forward pass that predict each completion token."""
    hidden = reference_hidden(model, prompt, prompt_mask, completion, completion_mask)
    return np.einsum("btd,dv->btv", hidden, np.asarray(model.unembedding()))


def reference_stats(model, prompt, prompt_mask, out, temperature):
    """``token_logp_and_entropy`` on prompt + completion: the trainer's recomputation."""
    tokens = np.asarray(out.tokens)
    hidden = reference_hidden(model, prompt, prompt_mask, tokens, np.asarray(out.mask))
    logp, entropy = token_logp_and_entropy(
        hidden, model.unembedding(), tokens, temperature=temperature
    )
    return np.asarray(logp), np.asarray(entropy)


def key(seed: int):
    return jax.random.key(seed)


@pytest.fixture(scope="session")
def h():
    """The helpers above, for test modules (this conftest is not importable by name)."""
    import types

    return types.SimpleNamespace(
        VOCAB=VOCAB,
        key=key,
        left_padded=left_padded,
        reference_logits=reference_logits,
        reference_stats=reference_stats,
    )
