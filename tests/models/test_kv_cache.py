"""KV-cache prefill/decode agrees with the full forward pass on left-padded batches."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from erpo_jax.models import Decoder, KVCache, ModelConfig, share_kv_prefix

CONFIGS = {
    "qwen3": ModelConfig("qwen3", 61, 32, 48, 2, 4, 2, 16, qk_norm=True),
    "qwen2": ModelConfig("qwen2", 61, 32, 48, 2, 4, 1, 8, qkv_bias=True, tie_word_embeddings=True),
}


def _model(family, scan_layers=False):
    model = nnx.clone(_base_model(family))
    model.scan_layers = scan_layers
    return model


@functools.cache
def _base_model(family):
    model = Decoder(CONFIGS[family], rngs=nnx.Rngs(0))
    # Non-trivial biases and norms so that every parameter influences the check.
    for name, var in vars(model.layers).items():
        if isinstance(var, nnx.Variable) and (name.endswith("bias") or name.endswith("norm")):
            noise = jax.random.normal(jax.random.key(len(name)), var[...].shape)
            var.set_value(var[...] + 0.1 * noise)
    return model


@nnx.jit
def _forward(model, tokens, mask):
    return model(tokens, mask)


@nnx.jit
def _hidden(model, tokens, mask):
    return model.hidden_states(tokens, mask)


@nnx.jit(static_argnums=3)
def _prefill(model, tokens, mask, max_length):
    return model.prefill(tokens, mask, max_length=max_length)


def _batch(seed=0, b=3, s=6, n=5, vocab=61):
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, vocab, (b, s)).astype(np.int32)
    mask = np.ones((b, s), bool)
    mask[1, :2] = False
    mask[2, : s - 1] = False  # a one-token prompt
    completion = rng.integers(0, vocab, (b, n)).astype(np.int32)
    return prompt, mask, completion


def _sample_like(graphdef, state, prompt, mask, completion, max_length):
    """Prefill, then decode inside lax.fori_loop on fixed buffers, as the sampler will."""
    model = nnx.merge(graphdef, state)
    first, cache = model.prefill(prompt, mask, max_length=max_length)
    b, n = completion.shape

    def body(i, carry):
        cache, out = carry
        logits, cache = model.decode_step(completion[:, i], cache)
        return cache, out.at[:, i].set(logits)

    out = jnp.zeros((b, n, model.config.vocab_size), jnp.float32)
    cache, out = jax.lax.fori_loop(0, n, body, (cache, out))
    return first, out, cache


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_prefill_then_decode_equals_full_forward(family, scan_layers):
    model = _model(family, scan_layers)
    prompt, mask, completion = _batch()
    s, n = prompt.shape[1], completion.shape[1]
    graphdef, state = nnx.split(model)
    run = jax.jit(_sample_like, static_argnums=(0, 5))
    first, decoded, cache = run(graphdef, state, prompt, mask, completion, s + n + 2)

    tokens = np.concatenate([prompt, completion], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(completion, bool)], axis=1)
    full = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(full_mask)))
    np.testing.assert_allclose(first, full[:, s - 1], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(decoded, full[:, s:], atol=1e-5, rtol=1e-5)

    assert isinstance(cache, KVCache)
    assert cache.max_length == s + n + 2
    # Keys slots-minor, values heads-then-slots (head width != slots here).
    layer_k, layer_v = cache.k[0].shape, cache.v[0].shape
    assert layer_k[3] == layer_v[2] == s + n + 2 and layer_k[2] == layer_v[3] != s + n + 2
    # Keys as stored are the forward's: the prompt's real slots hold what a
    # fresh prefill of the same prompt writes, in the same [.., H, C] layout.
    _, fresh = _prefill(model, jnp.asarray(prompt), jnp.asarray(mask), s + n + 2)
    real = np.asarray(mask)
    np.testing.assert_allclose(
        np.asarray(cache.k[1]).transpose(0, 3, 1, 2)[:, :s][real],
        np.asarray(fresh.k[1]).transpose(0, 3, 1, 2)[:, :s][real],
        atol=1e-6,
    )
    assert int(cache.index) == s + n
    np.testing.assert_array_equal(cache.positions, full_mask.sum(-1))
    np.testing.assert_array_equal(cache.mask[:, : s + n], full_mask)
    assert not np.asarray(cache.mask[:, s + n :]).any()


def test_extend_by_several_tokens_equals_full_forward():
    model = _model("qwen3")
    prompt, mask, completion = _batch(seed=1)
    s = prompt.shape[1]
    _, cache = _prefill(model, jnp.asarray(prompt), jnp.asarray(mask), 16)
    extend = nnx.jit(lambda m, t, k, c: m.extend(t, k, c))
    hidden, cache = extend(model, jnp.asarray(completion), jnp.ones(completion.shape, bool), cache)
    tokens = np.concatenate([prompt, completion], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(completion, bool)], axis=1)
    full_hidden = _hidden(model, jnp.asarray(tokens), jnp.asarray(full_mask))
    np.testing.assert_allclose(hidden, full_hidden[:, s:], atol=1e-5, rtol=1e-5)


def test_padding_content_does_not_matter():
    model = _model("qwen2")
    prompt, mask, _ = _batch(seed=2)
    other = np.where(mask, prompt, (prompt + 7) % 61)
    a, _ = _prefill(model, jnp.asarray(prompt), jnp.asarray(mask), 8)
    b, _ = _prefill(model, jnp.asarray(other), jnp.asarray(mask), 8)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_prefill_rejects_a_prompt_longer_than_the_cache():
    model = _model("qwen2")
    prompt, mask, _ = _batch()
    with pytest.raises(ValueError, match="max_length"):
        model.prefill(jnp.asarray(prompt), jnp.asarray(mask), max_length=3)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_decode_with_hoisted_consts_equals_decode_without(family):
    """``decode_consts`` made outside the loop change where work happens, not the result."""
    model = _model(family)
    prompt, mask, completion = _batch(seed=3)
    s, n = prompt.shape[1], completion.shape[1]
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnums=1)
    def run(state, hoist):
        m = nnx.merge(graphdef, state)
        _, cache = m.prefill(prompt, mask, max_length=s + n)
        consts = m.decode_consts(s + n) if hoist else None

        def body(i, carry):
            cache, out = carry
            logits, cache = m.decode_step(jnp.asarray(completion)[:, i], cache, consts=consts)
            return cache, out.at[:, i].set(logits)

        out = jnp.zeros((prompt.shape[0], n, m.config.vocab_size), jnp.float32)
        return jax.lax.fori_loop(0, n, body, (cache, out))[1]

    hoisted, plain = np.asarray(run(state, True)), np.asarray(run(state, False))
    np.testing.assert_allclose(hoisted, plain, atol=1e-6, rtol=1e-6)
    tokens = np.concatenate([prompt, completion], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(completion, bool)], axis=1)
    full = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(full_mask)))
    # decode step i consumes completion[:, i], so it predicts position s + i
    np.testing.assert_allclose(hoisted[:, :-1], full[:, s : s + n - 1], atol=1e-5, rtol=1e-5)


def test_decode_consts_for_another_cache_length_is_an_error():
    model = _model("qwen3")
    prompt, mask, completion = _batch()
    _, cache = _prefill(model, jnp.asarray(prompt), jnp.asarray(mask), 16)
    with pytest.raises(ValueError, match=r"decode_consts\(max_length=16\)"):
        model.decode_step(jnp.asarray(completion[:, 0]), cache, consts=model.decode_consts(12))


def _shared_decode(graphdef, state, prompt, mask, completion, group):
    """Prefill ``P`` prompts once, share them with ``P * group`` rows, decode ``completion``."""
    model = nnx.merge(graphdef, state)
    first, prompt_cache = model.prefill(prompt, mask, max_length=prompt.shape[1])
    n = completion.shape[1]
    cache = share_kv_prefix(prompt_cache, group, n + 1)
    consts = model.decode_consts(prompt.shape[1] + n + 1)
    out = []
    for i in range(n):
        logits, cache = model.decode_step(completion[:, i], cache, consts=consts)
        out.append(logits)
    return first, jnp.stack(out, axis=1), cache


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_decode_on_a_shared_prefix_equals_the_full_forward(family):
    # Each prompt's cache stored once for its G = 2 rows: the rows' decoded
    # logits equal the full forward of the prompt copied into every row
    # (left padding and a one-token prompt included), and the rows of a
    # group differ (their own tokens differ).
    model = _model(family)
    prompt, mask, _ = _batch()
    group, n = 2, 4
    completion = np.random.default_rng(3).integers(0, 61, (3 * group, n)).astype(np.int32)
    graphdef, state = nnx.split(model)
    run = jax.jit(_shared_decode, static_argnums=(0, 5))
    first, decoded, cache = run(graphdef, state, prompt, mask, completion, group)

    rows = np.repeat(prompt, group, axis=0)
    row_mask = np.repeat(mask, group, axis=0)
    tokens = np.concatenate([rows, completion], axis=1)
    full_mask = np.concatenate([row_mask, np.ones_like(completion, bool)], axis=1)
    full = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(full_mask)))
    s = prompt.shape[1]
    np.testing.assert_allclose(np.repeat(first, group, 0), full[:, s - 1], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(decoded, full[:, s:], atol=1e-5, rtol=1e-5)
    assert not np.allclose(decoded[0], decoded[1], atol=1e-3)

    # The prompt is stored once per prompt; each row has only its own slots.
    assert cache.prefix.k[0].shape[0] == 3 and cache.prefix_length == s
    assert cache.k[0].shape[0] == 3 * group and cache.max_length == n + 1
    assert int(cache.index) == n
    np.testing.assert_array_equal(cache.positions, full_mask.sum(-1))
    np.testing.assert_array_equal(cache.prefix.mask, mask)


def test_shared_prefix_bad_input_is_a_clear_error():
    model = _model("qwen2")
    prompt, mask, _ = _batch()
    _, cache = _prefill(model, jnp.asarray(prompt), jnp.asarray(mask), prompt.shape[1])
    for name, bad in (("group_size", 0), ("max_length", 2.5)):
        args = {"group_size": 2, "max_length": 3, name: bad}
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            share_kv_prefix(cache, **args)
    shared = share_kv_prefix(cache, 2, 3)
    with pytest.raises(ValueError, match="already has a shared prefix"):
        share_kv_prefix(shared, 2, 3)
    tokens = jnp.zeros((6, 1), jnp.int32)
    with pytest.raises(ValueError, match="fresh=True is for an empty cache"):
        model.extend(tokens, jnp.ones((6, 1), bool), shared, fresh=True)
    with pytest.raises(ValueError, match=r"consts are for a cache of 8 slots, the cache has 9"):
        model.decode_step(tokens[:, 0], shared, consts=model.decode_consts(8))


def test_init_kv_cache_bad_sizes_are_a_clear_error():
    """Each size must be a positive int (not a bool, a float or zero), named in the error."""
    from erpo_jax.models.kv_cache import init_kv_cache

    good = dict(num_layers=2, batch_size=3, max_length=4, num_kv_heads=1, head_dim=8)
    cache = init_kv_cache(**good)
    assert cache.k[0].shape == (3, 1, 8, 4) and cache.v[1].shape == (3, 1, 4, 8)
    for name in good:
        for bad in (0, -1, 2.0, True):
            with pytest.raises(ValueError, match=rf"init_kv_cache: {name} must be a positive int"):
                init_kv_cache(**{**good, name: bad})
    with pytest.raises(ValueError, match="share_kv_prefix: group_size must be a positive int"):
        share_kv_prefix(cache, True, 3)
