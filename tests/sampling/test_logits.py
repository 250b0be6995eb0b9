"""The pure one-step functions on NumPy logits: jit equals no-jit, float32 out, forced = drawn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erpo_jax.sampling import (
    full_logp_and_entropy,
    sample_from_logits,
    score_tokens,
    truncation_mask,
)

OPTIONS = [
    {},
    {"top_k": 3},
    {"top_p": 0.5},
    {"min_p": 0.3},
    {"top_k": 6, "top_p": 0.7, "min_p": 0.05},
]


def _logits(seed=0, b=5, v=23):
    return (2.0 * np.random.default_rng(seed).normal(size=(b, v))).astype(np.float32)


def test_full_logp_and_entropy_hand_case():
    logits = np.log(np.array([[0.5, 0.25, 0.25]], np.float32))
    logp, entropy = full_logp_and_entropy(logits, np.array([1]))
    np.testing.assert_allclose(logp, [np.log(0.25)], atol=1e-6)
    np.testing.assert_allclose(entropy, [1.5 * np.log(2.0)], atol=1e-6)


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "none")
def test_jit_equals_no_jit_and_forced_stats_equal_drawn(opts):
    logits = _logits()
    keys = jax.random.split(jax.random.key(0), 5)
    kw = dict(temperature=0.8, **opts)
    eager = sample_from_logits(logits, keys, **kw)
    jitted = jax.jit(lambda x, k: sample_from_logits(x, k, **kw))(logits, keys)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    forced = score_tokens(logits, eager.tokens, **kw)
    for a, b in zip(eager, forced, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    keep = np.asarray(truncation_mask(logits, **kw))
    assert keep[np.arange(5), np.asarray(eager.tokens)].all()
    assert (keep.sum(-1) >= 1).all()


def test_bf16_logits_give_float32_stats():
    logits = jnp.asarray(_logits(), jnp.bfloat16)
    out = sample_from_logits(logits, jax.random.split(jax.random.key(0), 5), top_p=0.9)
    assert out.tokens.dtype == jnp.int32
    for x in (out.logp, out.entropy, out.truncated_entropy):
        assert x.dtype == jnp.float32 and np.isfinite(np.asarray(x)).all()


def test_top_p_one_and_min_p_zero_keep_everything():
    keep = truncation_mask(_logits(), top_p=1.0, min_p=0.0)
    assert np.asarray(keep).all()
