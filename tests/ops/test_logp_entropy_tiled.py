"""The vocabulary-tiled head: same values and gradients, memory independent of V."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from erpo_jax.ops import token_logp_and_entropy


def _inputs(seed=0, b=3, t=5, d=16, v=97, scale=2.0):
    rng = np.random.default_rng(seed)
    h = (rng.normal(size=(b, t, d)) * scale).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32)
    tok = rng.integers(0, v, (b, t)).astype(np.int32)
    return jnp.asarray(h), jnp.asarray(w), jnp.asarray(tok)


def _loss(h, w, tok, **kw):
    logp, entropy = token_logp_and_entropy(h, w, tok, **kw)
    return jnp.sum(0.3 * logp) + jnp.sum(0.7 * entropy)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("tile", [10, 32, 96])  # 97 is not a multiple of any of them
def test_tiled_matches_unchunked_in_value_and_gradient(temperature, tile):
    h, w, tok = _inputs()
    tok = tok.at[0, 0].set(w.shape[1] + 3)  # an out-of-vocabulary id: logp 0, no gradient
    kw = {"temperature": temperature}
    want = token_logp_and_entropy(h, w, tok, **kw)
    tiled = jax.jit(
        lambda h, w: token_logp_and_entropy(h, w, tok, chunk_size=4, vocab_chunk_size=tile, **kw)
    )
    got = tiled(h, w)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert float(got[0][0, 0]) == 0.0
    g_want = jax.grad(_loss, argnums=(0, 1))(h, w, tok, **kw)
    g_got = jax.grad(_loss, argnums=(0, 1))(h, w, tok, chunk_size=4, vocab_chunk_size=tile, **kw)
    for a, b in zip(g_got, g_want, strict=True):
        # Gradients of order 10 here; 1e-5 relative is float32 reassociation.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


def test_chunked_and_unchunked_agree_on_out_of_vocabulary_ids():
    h, w, tok = _inputs(1)
    tok = tok.at[1, 2].set(-1).at[2, 4].set(10_000)
    g_want = jax.grad(_loss, argnums=(0, 1))(h, w, tok)
    g_got = jax.grad(_loss, argnums=(0, 1))(h, w, tok, chunk_size=4)
    for a, b in zip(g_got, g_want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


def test_bf16_in_f32_out():
    h, w, tok = _inputs(2)
    logp, entropy = token_logp_and_entropy(
        h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), tok, chunk_size=8, vocab_chunk_size=16
    )
    assert logp.dtype == entropy.dtype == jnp.float32
    want = token_logp_and_entropy(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), tok)
    np.testing.assert_allclose(logp, want[0], rtol=1e-4, atol=1e-4)


def _temp_bytes(v, **kw):
    h = jax.ShapeDtypeStruct((4, 64, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((64, v), jnp.float32)
    tok = jax.ShapeDtypeStruct((4, 64), jnp.int32)
    fn = jax.jit(lambda h, w, t: token_logp_and_entropy(h, w, t, **kw))
    return fn.lower(h, w, tok).compile().memory_analysis().temp_size_in_bytes


def test_peak_memory_does_not_grow_with_vocabulary():
    kw = {"chunk_size": 32, "vocab_chunk_size": 512}
    small, large = _temp_bytes(4096, **kw), _temp_bytes(65536, **kw)
    # 16x the vocabulary: the token-chunked head's buffer grows 16x (32 x V
    # floats); the tiled head's stays at 32 x 512 floats.
    assert large <= small + 64 * 1024, (small, large)
    untiled_small, untiled_large = (
        _temp_bytes(4096, chunk_size=32),
        _temp_bytes(65536, chunk_size=32),
    )
    assert untiled_large > 8 * untiled_small


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"vocab_chunk_size": 16}, "vocab_chunk_size needs chunk_size"),
        (
            {"chunk_size": 4, "vocab_chunk_size": 0},
            "vocab_chunk_size must be None or a positive int",
        ),
        (
            {"chunk_size": 4, "vocab_chunk_size": 2.5},
            "vocab_chunk_size must be None or a positive int",
        ),
    ],
)
def test_bad_vocab_chunk_size(kw, match):
    h, w, tok = _inputs()
    with pytest.raises(ValueError, match=match):
        token_logp_and_entropy(h, w, tok, **kw)
