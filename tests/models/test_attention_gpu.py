"""cuDNN attention on a GPU: parity with ``xla`` in value and gradient, alone and in the decoder.

cuDNN's fused attention runs in half precision only, so each check compares
against the float32 ``xla`` result on the same (bf16-representable) inputs
and allows what ``xla`` itself loses in bf16: the cuDNN error must stay
within ``2 x`` the ``xla``-in-bf16 error plus a small floor. A wrong mask
(padding, causality, a cached offset, the GQA head mapping) moves outputs by
O(1), far outside that bound.

Skipped without a GPU. On one: ``JAX_PLATFORMS= pytest -m gpu -n 0 tests/models/test_attention_gpu.py``
(``JAX_PLATFORMS`` set empty, since ``tests/conftest.py`` otherwise pins the CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from erpo_jax.models import Decoder, ModelConfig
from erpo_jax.models import attention as A

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (JAX_PLATFORMS=)"),
]

# (S, C, offset, pads, N, KH, H): self-attention with a left-padded row (its
# first 37 queries see no key) and GQA 4:1; a cached extend (queries at slots
# 13.., unwritten slots after them) with 2:1 GQA and head_dim 128; odd
# lengths (cuDNN's masked kernel needs even ones under grad: padded inside).
CASES = [
    (128, 128, 0, (0, 37), 8, 2, 64),
    (64, 192, 13, (0, 5), 8, 4, 128),
    (97, 97, 0, (0, 40), 4, 4, 64),
    (33, 101, 60, (3, 0), 8, 2, 128),
]


def _inputs(seed, s, c, offset, pads, n, kh, h, b=2):
    rng = np.random.default_rng(seed)
    # bf16-representable float32 inputs: both precisions see the same numbers.
    q = jnp.asarray(rng.normal(size=(b, s, n, h)), jnp.bfloat16).astype(jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, kh, c, h)), jnp.bfloat16).astype(jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, kh, c, h)), jnp.bfloat16).astype(jnp.float32)
    kv_mask = np.ones((b, c), bool)
    for i in range(b):
        kv_mask[i, : pads[i % len(pads)]] = False
    q_slots = offset + jnp.arange(s, dtype=jnp.int32)
    return q, k, v, q_slots, jnp.asarray(kv_mask)


def _value_and_grads(impl, q, k, v, q_slots, kv_mask, w, dtype):
    def f(q, k, v):
        out = A.attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), q_slots, kv_mask,
                          impl=impl)  # fmt: skip
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(out, np.float32), [np.asarray(g, np.float32) for g in grads]


def check_half_precision_parity(impl: str, case, seed: int = 0) -> dict[str, float]:
    """Asserts ``impl`` in bf16 is as close to float32 ``xla`` as ``xla`` in bf16 is."""
    s, c, offset, pads, n, kh, h = case
    q, k, v, q_slots, kv_mask = _inputs(seed, s, c, offset, pads, n, kh, h)
    # Queries with no visible key are padding: their outputs are finite but
    # not compared, and carry no loss (as in training, where they are masked).
    sees = np.asarray(A._allowed(q_slots, kv_mask, jnp.arange(c)).any(-1))  # [B, S]
    w = np.random.default_rng(seed + 1).normal(size=(2, s, n * h)) * sees[..., None]
    w = jnp.asarray(w, jnp.float32)
    exact, exact_g = _value_and_grads("xla", q, k, v, q_slots, kv_mask, w, jnp.float32)
    ref, ref_g = _value_and_grads("xla", q, k, v, q_slots, kv_mask, w, jnp.bfloat16)
    got, got_g = _value_and_grads(impl, q, k, v, q_slots, kv_mask, w, jnp.bfloat16)
    assert np.isfinite(got).all()
    exact, ref, got = exact[sees], ref[sees], got[sees]
    errors = {}
    for name, e, r, g in zip("oqkv", [exact, *exact_g], [ref, *ref_g], [got, *got_g], strict=True):
        scale = np.abs(e).max()
        assert scale > 1e-2, name  # the comparison is not vacuous
        ref_err = np.abs(r - e).max() / scale
        err = np.abs(g - e).max() / scale
        errors[name] = float(err)
        assert np.isfinite(g).all(), name
        assert err <= 2 * ref_err + 2e-3, (name, err, ref_err)
    return errors


@pytest.mark.parametrize("case", CASES)
def test_cudnn_matches_float32_xla_in_value_and_gradient(case):
    check_half_precision_parity("cudnn", case)


def test_auto_is_cudnn_for_half_precision_on_gpu():
    assert A.resolve_attention_impl("auto", s=512, c=512, dtype=jnp.bfloat16) == "cudnn"
    assert A.resolve_attention_impl("auto", s=1, c=512, dtype=jnp.bfloat16) == "xla"


_CONFIG = ModelConfig("qwen3", 211, 128, 192, 2, 4, 2, 64, qk_norm=True,
                      max_position_embeddings=512)  # fmt: skip


def check_decoder_parity(impl: str) -> float:
    """A bf16 decoder with ``impl`` against the same weights with float32 ``xla``."""
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, 211, (3, 80)), jnp.int32)
    mask = np.ones((3, 80), bool)
    mask[1, :23] = False  # a left-padded row
    mask = jnp.asarray(mask)

    def logits(attention_impl, dtype):
        model = Decoder(_CONFIG, dtype=dtype, param_dtype=jnp.float32,
                        attention_impl=attention_impl, rngs=nnx.Rngs(0))  # fmt: skip
        out = nnx.jit(lambda m, t, k: m(t, k))(model, tokens, mask)
        return np.asarray(out, np.float32)[np.asarray(mask)]

    exact = logits("xla", jnp.float32)
    ref_err = np.abs(logits("xla", jnp.bfloat16) - exact).max()
    err = np.abs(logits(impl, jnp.bfloat16) - exact).max()
    assert np.abs(exact).max() > 0.1
    assert err <= 2 * ref_err + 1e-2, (err, ref_err)
    return float(err)


def test_decoder_with_cudnn_matches_xla_in_bfloat16():
    check_decoder_parity("cudnn")
