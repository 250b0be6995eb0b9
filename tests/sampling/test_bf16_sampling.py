"""Sampling fully in bfloat16: a bfloat16 KV cache, float32 statistics that match the
same bfloat16 model's own forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from erpo_jax.models import Decoder
from erpo_jax.sampling import sample

T, G = 10, 2
TEMPERATURE = 0.7


def _recast(model: Decoder, dtype) -> Decoder:
    """``model``'s weights in a decoder that stores and computes in ``dtype``."""
    new = Decoder(model.config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.update(new, jax.tree.map(lambda x: x.astype(dtype), params))
    return new


@pytest.fixture(scope="module")
def sampled(model, h):
    """One grouped sample from the bfloat16 copy of the sampler tests' model, with the
    dtypes of the KV cache (own slots and shared prompt prefix) that every traced decode
    step received, and the logits it returned."""
    model16 = _recast(model, jnp.bfloat16)
    prompt, prompt_mask = h.left_padded(0, b=2)
    prompt, prompt_mask = prompt.repeat(G, axis=0), prompt_mask.repeat(G, axis=0)
    seen: dict[str, set] = {"k": set(), "v": set(), "prefix": set(), "logits": set()}
    decode_step = Decoder.decode_step

    def recording(self, tokens, cache, **kw):
        seen["k"].update(x.dtype for x in cache.k)
        seen["v"].update(x.dtype for x in cache.v)
        if cache.prefix is not None:
            seen["prefix"].update(x.dtype for x in (*cache.prefix.k, *cache.prefix.v))
        logits, cache = decode_step(self, tokens, cache, **kw)
        seen["logits"].add(logits.dtype)
        return logits, cache

    with pytest.MonkeyPatch.context() as mp:
        # Read while the decode loop is traced (once: no other test samples this model).
        mp.setattr(Decoder, "decode_step", recording)
        out = sample(model16, prompt, prompt_mask, h.key(3), max_new_tokens=T,
                     temperature=TEMPERATURE, eos_ids=(), group_size=G)  # fmt: skip
    return model16, prompt, prompt_mask, out, seen


def test_bf16_sampler_keeps_a_bf16_kv_cache_and_float32_outputs(sampled):
    model16, _, _, out, seen = sampled
    assert model16.embed[...].dtype == jnp.bfloat16
    bf16 = {np.dtype(jnp.bfloat16)}
    # The prompt's keys and values (the groups' shared prefix) and each row's own.
    assert seen["k"] == seen["v"] == seen["prefix"] == bf16, seen
    assert seen["logits"] == {np.dtype(jnp.float32)}
    for name in ("logp", "entropy", "truncated_entropy"):
        assert getattr(out, name).dtype == jnp.float32, name
    assert out.tokens.dtype == jnp.int32
    assert np.asarray(out.mask).all()  # eos_ids=(): every row runs T tokens


def test_bf16_sampler_stats_equal_the_bf16_models_own_forward(model, h, sampled):
    """Per-token logp and entropy equal ``token_logp_and_entropy`` over the bfloat16
    model's full forward on the sampled tokens (the trainer's recomputation).

    Tolerance: a quarter of the bfloat16 error itself, measured here as the distance
    between that reference and the same computation in float32 on the same
    (bfloat16-rounded) weights: 2.3e-2 for logp and 7.4e-3 for entropy on CPU. The
    cached decode and the full forward run the same bfloat16 model, so they part only
    where an intermediate value rounds differently (at most 6e-7 here, on CPU); a
    quarter of the bfloat16 error leaves room for other backends' kernels. A sampler
    that computed in float32, or took its statistics from bfloat16-rounded logits,
    misses it (checked: both fail).
    """
    model16, prompt, prompt_mask, out, _ = sampled
    logp16, entropy16 = h.reference_stats(model16, prompt, prompt_mask, out, TEMPERATURE)
    model32 = _recast(model16, jnp.float32)
    logp32, entropy32 = h.reference_stats(model32, prompt, prompt_mask, out, TEMPERATURE)
    for name, got, ref16, ref32 in (
        ("logp", out.logp, logp16, logp32),
        ("entropy", out.entropy, entropy16, entropy32),
    ):
        bf16_error = np.abs(ref16 - ref32).max()
        assert bf16_error > 1e-3, (name, bf16_error)  # the reference really ran in bfloat16
        np.testing.assert_allclose(np.asarray(got), ref16, rtol=0, atol=bf16_error / 4,
                                   err_msg=name)  # fmt: skip
