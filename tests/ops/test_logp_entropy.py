"""Tests of ``erpo_jax.ops.token_logp_and_entropy`` (chunked head with a custom VJP)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from jaxprs import equations

from erpo_jax.ops import AUTO_LOGITS_BYTES, _logp_entropy, auto_chunk_size, token_logp_and_entropy


def _reference(hidden, unembed, tokens, temperature):
    """Naive NumPy loops over (b, t), float64."""
    b_size, t_size, _ = hidden.shape
    logp = np.zeros((b_size, t_size))
    entropy = np.zeros((b_size, t_size))
    for b in range(b_size):
        for t in range(t_size):
            z = hidden[b, t].astype(np.float64) @ unembed.astype(np.float64) / temperature
            z = z - z.max()
            p = np.exp(z) / np.exp(z).sum()
            logp[b, t] = np.log(p[tokens[b, t]])
            entropy[b, t] = -(p * np.log(p)).sum()
    return logp, entropy


def _inputs(seed, b=3, t=5, d=8, v=11, scale=1.0):
    rng = np.random.default_rng(seed)
    hidden = (scale * rng.standard_normal((b, t, d))).astype(np.float32)
    unembed = rng.standard_normal((d, v)).astype(np.float32)
    tokens = rng.integers(0, v, (b, t)).astype(np.int32)
    return hidden, unembed, tokens


def test_uniform_logits_by_hand():
    hidden = jnp.ones((1, 2, 3))
    unembed = jnp.zeros((3, 7))
    logp, entropy = token_logp_and_entropy(hidden, unembed, jnp.array([[0, 6]]))
    np.testing.assert_allclose(logp, -np.log(7) * np.ones((1, 2)), rtol=1e-6)
    np.testing.assert_allclose(entropy, np.log(7) * np.ones((1, 2)), rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 4, 15, 64])
@pytest.mark.parametrize(("shape", "temperature"), [((3, 5, 8, 11), 1.0), ((1, 1, 4, 3), 0.7)])
def test_matches_numpy_reference(shape, temperature, chunk_size, jit):
    b, t, d, v = shape
    hidden, unembed, tokens = _inputs(0, b, t, d, v, scale=2.0)
    fn = lambda h, w, tok: token_logp_and_entropy(
        h, w, tok, temperature=temperature, chunk_size=chunk_size
    )
    if jit:
        fn = jax.jit(fn)
    logp, entropy = fn(jnp.asarray(hidden), jnp.asarray(unembed), jnp.asarray(tokens))
    ref_logp, ref_entropy = _reference(hidden, unembed, tokens, temperature)
    assert logp.dtype == entropy.dtype == jnp.float32
    np.testing.assert_allclose(logp, ref_logp, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(entropy, ref_entropy, atol=1e-5, rtol=1e-5)


def _loss(chunk_size, temperature):
    rng = np.random.default_rng(7)
    a = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)

    def loss(h, w, tok):
        logp, entropy = token_logp_and_entropy(
            h, w, tok, temperature=temperature, chunk_size=chunk_size
        )
        return jnp.sum(a * logp) + jnp.sum(c * entropy)

    return loss


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk_size", [1, 4, 15, 100])
def test_chunked_values_and_gradients_match_unchunked(chunk_size, temperature):
    hidden, unembed, tokens = (jnp.asarray(x) for x in _inputs(1, scale=1.5))
    ref = jax.jit(jax.value_and_grad(_loss(None, temperature), argnums=(0, 1)))
    got = jax.jit(jax.value_and_grad(_loss(chunk_size, temperature), argnums=(0, 1)))
    (ref_val, (ref_gh, ref_gw)), (val, (gh, gw)) = (
        ref(hidden, unembed, tokens),
        got(hidden, unembed, tokens),
    )
    np.testing.assert_allclose(val, ref_val, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gh, ref_gh, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gw, ref_gw, atol=1e-5, rtol=1e-5)
    assert np.isfinite(np.asarray(gh)).all() and np.abs(np.asarray(gh)).max() > 0


@pytest.mark.parametrize("vocab_chunk_size", [None, 5])
@pytest.mark.parametrize("row_shards", [2, 3, 4])
def test_row_shard_accumulators_give_the_same_values_and_gradients(row_shards, vocab_chunk_size):
    """row_shards keeps one weight-gradient partial sum per row group (summed once
    at the end); the result is the single-accumulator one up to summation order.
    3 does not divide the 4 rows: it falls back to gcd(4, 3) = 1 accumulator."""
    hidden, unembed, tokens = (jnp.asarray(x) for x in _inputs(1, b=4, t=7, scale=1.5))

    def loss(shards):
        def f(h, w):
            logp, ent = token_logp_and_entropy(
                h, w, tokens, chunk_size=6, vocab_chunk_size=vocab_chunk_size, row_shards=shards
            )
            return jnp.sum(
                logp * jnp.arange(logp.size).reshape(logp.shape) / logp.size
            ) + 0.3 * jnp.sum(ent)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    (ref_val, (ref_gh, ref_gw)) = loss(1)(hidden, unembed)
    (val, (gh, gw)) = loss(row_shards)(hidden, unembed)
    np.testing.assert_allclose(val, ref_val, rtol=1e-6)
    np.testing.assert_allclose(gh, ref_gh, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gw, ref_gw, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(gw)).max() > 1e-3


def test_gradient_of_each_output_matches_finite_differences():
    hidden, unembed, tokens = _inputs(2, b=1, t=2, d=3, v=4)
    with jax.enable_x64(True):
        h, w = jnp.asarray(hidden, jnp.float64), jnp.asarray(unembed, jnp.float64)
        for index in (0, 1):

            def f(h, w, index=index):
                return jnp.sum(token_logp_and_entropy(h, w, tokens, chunk_size=1)[index])

            check_grads(f, (h, w), order=1, modes=["rev"], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "kw", [{}, {"chunk_size": 4}, {"chunk_size": 4, "vocab_chunk_size": 5}], ids=str
)
def test_traced_temperature_value_and_gradient(kw):
    hidden, unembed, tokens = _inputs(3)
    fn = jax.jit(lambda h, w, tok, temp: token_logp_and_entropy(h, w, tok, temperature=temp, **kw))
    args = tuple(jnp.asarray(x) for x in (hidden, unembed, tokens))
    logp, entropy = fn(*args, jnp.float32(0.5))
    ref_logp, ref_entropy = _reference(hidden, unembed, tokens, 0.5)
    np.testing.assert_allclose(logp, ref_logp, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(entropy, ref_entropy, atol=1e-5, rtol=1e-5)
    # d/dT of a mix of both outputs against a float64 central difference of
    # the NumPy reference (step 1e-4: truncation error ~1e-8).
    a, c = 0.3, 0.7
    grad = jax.grad(lambda t: jnp.sum(a * fn(*args, t)[0] + c * fn(*args, t)[1]))(jnp.float32(0.5))

    def f(temp):
        lp, ent = _reference(hidden, unembed, tokens, temp)
        return a * lp.sum() + c * ent.sum()

    want = (f(0.5 + 1e-4) - f(0.5 - 1e-4)) / 2e-4
    assert abs(want) > 1.0  # a real derivative, not a vacuous 0 == 0
    assert float(grad) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "kw", [{}, {"chunk_size": 512}, {"chunk_size": 512, "vocab_chunk_size": 5}], ids=str
)
def test_half_precision_gradients_are_the_rounded_float32_gradient(dtype, kw):
    # 16,384 tokens and a loss scaled by 4e-7: most of a token's logit
    # gradients (4e-7 * p) are below float16's smallest subnormal (6e-8),
    # while the weight gradient sums 16k of them to a normal float16. Accumulating in float32
    # and casting only the result gives the float32 gradient (of the same
    # rounded weights) rounded once to the weight dtype: within one ulp.
    rng = np.random.default_rng(8)
    h = jnp.asarray(rng.normal(size=(16, 1024, 8)), dtype)
    w = jnp.asarray(rng.normal(size=(8, 11)), dtype)
    tok = jnp.asarray(rng.integers(0, 11, (16, 1024)), jnp.int32)

    def loss(h, w):
        logp, entropy = token_logp_and_entropy(h, w, tok, **kw)
        return 4e-7 * (jnp.sum(logp) + 0.5 * jnp.sum(entropy))

    g_h, g_w = jax.jit(jax.grad(loss, argnums=(0, 1)))(h, w)
    assert g_h.dtype == g_w.dtype == dtype
    w32, h32 = w.astype(jnp.float32), h.astype(jnp.float32)
    r_h, r_w = jax.jit(jax.grad(loss, argnums=(0, 1)))(h32, w32)
    info = jnp.finfo(dtype)
    ulp_rel = float(info.eps)  # one ulp, relative, for normal numbers
    tiny_step = float(info.smallest_subnormal)
    for got, want in ((g_w, r_w), (g_h, r_h)):
        want = np.asarray(want, np.float64)
        got = np.asarray(got.astype(jnp.float32), np.float64)
        np.testing.assert_allclose(got, want, rtol=ulp_rel, atol=tiny_step)
    # Most weight-gradient entries are normal numbers of the weight dtype.
    assert np.median(np.abs(np.asarray(r_w))) > float(info.smallest_normal)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_bfloat16_inputs_give_float32_outputs_and_input_dtype_grads(chunk_size):
    hidden, unembed, tokens = _inputs(4)
    h, w = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(unembed, jnp.bfloat16)
    logp, entropy = token_logp_and_entropy(h, w, jnp.asarray(tokens), chunk_size=chunk_size)
    assert logp.dtype == entropy.dtype == jnp.float32
    ref_logp, ref_entropy = _reference(
        np.asarray(h.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)), tokens, 1.0
    )
    np.testing.assert_allclose(logp, ref_logp, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(entropy, ref_entropy, atol=1e-4, rtol=1e-4)
    gh, gw = jax.grad(
        lambda h, w: jnp.sum(token_logp_and_entropy(h, w, tokens, chunk_size=chunk_size)[0]),
        argnums=(0, 1),
    )(h, w)
    assert gh.dtype == gw.dtype == jnp.bfloat16


def test_out_of_range_tokens_stay_finite():
    hidden, unembed, tokens = _inputs(5)
    tokens[0, 0] = -1
    tokens[1, 2] = 11
    for chunk_size in (None, 4):
        logp, entropy = token_logp_and_entropy(
            jnp.asarray(hidden), jnp.asarray(unembed), jnp.asarray(tokens), chunk_size=chunk_size
        )
        assert np.isfinite(np.asarray(logp)).all() and np.isfinite(np.asarray(entropy)).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 2.0}, "chunk_size"),
        ({"chunk_size": "Auto"}, "'auto'"),
        ({"temperature": 0.0}, "temperature"),
        ({"chunk_size": 4, "row_shards": 0}, "row_shards"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, match):
    hidden, unembed, tokens = (jnp.asarray(x) for x in _inputs(6))
    # A float chunk_size is also rejected by the annotations when runtime
    # type checking is on (jaxtyping's TypeCheckError is a TypeError).
    with pytest.raises((ValueError, TypeError), match=match):
        token_logp_and_entropy(hidden, unembed, tokens, **kwargs)


def _grad_temp_bytes(num_tokens, vocab, chunk_size, d=16):
    def loss(h, w, tok):
        logp, entropy = token_logp_and_entropy(h, w, tok, chunk_size=chunk_size)
        return jnp.sum(logp) + jnp.sum(entropy)

    args = (
        jax.ShapeDtypeStruct((1, num_tokens, d), jnp.float32),
        jax.ShapeDtypeStruct((d, vocab), jnp.float32),
        jax.ShapeDtypeStruct((1, num_tokens), jnp.int32),
    )
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_peak_memory_does_not_grow_with_tokens():
    # Compile-time memory analysis (nothing allocated). For a fixed chunk the
    # temporaries are O(chunk * V) plus O(D * V) for the unembedding gradient,
    # whatever the number of tokens; unchunked ones are O(tokens * V).
    vocab, chunk = 4096, 64
    small = _grad_temp_bytes(512, vocab, chunk)
    large = _grad_temp_bytes(4096, vocab, chunk)
    logits_bytes = 4096 * vocab * 4
    assert large < small + logits_bytes / 16
    assert large < _grad_temp_bytes(4096, vocab, None) / 8


# ---------------------------------------------------------------- chunk_size="auto"


def test_auto_chunk_size_by_hand():
    budget = 256 * 2**20
    assert AUTO_LOGITS_BYTES == budget
    # The toy task's head (B 128, T 48, V 100: 2.4 MB) runs at once, and so
    # does the rollout benchmark's: 128 x 128 tokens over 4,096 ids, 256 MiB.
    assert auto_chunk_size(128, 48, 100) is None
    assert auto_chunk_size(128, 128, 4096) is None
    # Exactly at the bound: at once; one position more: two equal chunks
    # (32,769 and 32,768 positions of 65,537), not 65,536 and 1.
    assert auto_chunk_size(1, budget // (4 * 1024), 1024) is None
    assert auto_chunk_size(1, budget // (4 * 1024) + 1, 1024) == 32769
    # Qwen's vocabulary, 64 rows over 8 devices, 4,096 tokens: a device's
    # position of 8 rows is 8 * 151,936 * 4 = 4,861,952 bytes, so 55 fit
    # (267,407,360 bytes) and 56 do not; 75 chunks of 55 positions.
    assert auto_chunk_size(64, 4096, 151936, row_shards=8) == 55 * 64
    # Rows that do not divide the shards count the largest share: 9 rows a
    # device, 5,469,696 bytes a position, 49 fit, 84 chunks of 49.
    assert auto_chunk_size(65, 4096, 151936, row_shards=8) == 49 * 65
    # One position of every row above the bound: one position at a time.
    assert auto_chunk_size(4096, 8, 151936) == 4096


@pytest.mark.parametrize(
    ("args", "kw", "match"),
    [
        ((-1, 4, 8), {}, "rows"),
        ((2, 4.0, 8), {}, "length"),
        ((2, 4, 8), {"row_shards": 0}, "row_shards"),
        ((2, True, 8), {}, "length"),
    ],
)
def test_auto_chunk_size_names_a_bad_argument(args, kw, match):
    with pytest.raises(ValueError, match=match):
        auto_chunk_size(*args, **kw)


def test_auto_is_at_once_under_the_bound_and_chunked_above(monkeypatch):
    hidden, unembed, tokens = (jnp.asarray(x) for x in _inputs(7, b=3, t=5, v=11))
    want = _reference(*(np.asarray(x) for x in (hidden, unembed, tokens)), 0.7)

    def scans(**kw):
        def f(h, w):
            return token_logp_and_entropy(h, w, tokens, temperature=0.7, chunk_size="auto", **kw)

        got = f(hidden, unembed)
        np.testing.assert_allclose(np.asarray(got[0]), want[0], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(got[1]), want[1], atol=2e-5, rtol=1e-5)
        grads = jax.grad(lambda h, w: jnp.sum(f(h, w)[0]) + jnp.sum(f(h, w)[1]), (0, 1))
        ref = jax.grad(
            lambda h, w: sum(
                jnp.sum(x) for x in token_logp_and_entropy(h, w, tokens, temperature=0.7)
            ),
            (0, 1),
        )
        for a, b in zip(grads(hidden, unembed), ref(hidden, unembed), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5)
        return sum(
            e.primitive.name == "scan" for e in equations(jax.make_jaxpr(f)(hidden, unembed))
        )

    assert scans() == 0  # 3 x 5 x 11 float32 logits: far under the bound
    # 2 positions of 3 rows fit under a bound of 2 * 3 * 11 * 4 bytes: 3
    # chunks of 2 positions (the last one padded by one).
    monkeypatch.setattr(_logp_entropy, "AUTO_LOGITS_BYTES", 2 * 3 * 11 * 4)
    assert _logp_entropy.auto_chunk_size(3, 5, 11) == 6
    assert scans() > 0
    # Tiles of 4 ids: the chunks are sized by the tile (5 positions fit).
    assert _logp_entropy.auto_chunk_size(3, 5, 4) is None
    assert scans(vocab_chunk_size=4) > 0
    # Under the bound with a vocabulary tile asked for: one chunk, tiled.
    monkeypatch.setattr(_logp_entropy, "AUTO_LOGITS_BYTES", 10**9)
    assert scans(vocab_chunk_size=4) > 0


def test_auto_bounds_the_compiled_memory_of_a_large_head():
    # Abstract shapes, nothing allocated: 65,536 tokens over 4,096 ids are
    # 1 GiB of float32 logits. "auto" takes them 256 MiB at a time; all at
    # once keeps copies of the whole.
    auto = _grad_temp_bytes(65536, 4096, "auto")
    whole = _grad_temp_bytes(65536, 4096, None)
    # A chunk's logits and their gradient: about twice the bound, where all
    # at once takes twice the whole (2 GiB).
    assert auto <= 2 * AUTO_LOGITS_BYTES + 2**24
    assert whole >= 2 * 2**30


@pytest.mark.parametrize("first", [0.0, -0.0, np.nan, np.inf, -np.inf, 3e38, 1e-45])
def test_materialized_cotangent_passes_the_cotangent_through_bit_for_bit(first):
    """The at-once head's backward divides the incoming cotangent by a 1 that
    XLA cannot fold (so it is computed once, not once per vocabulary entry): the
    division must be exact for every value, whatever the first entry is.
    Subnormals may flush to a zero of their sign, as in every float op of
    XLA:CPU (flush-to-zero), the head's own products of the cotangent included."""
    from erpo_jax.ops._logp_entropy import _materialized_cotangent

    g = np.array([[first, -0.0, np.nan, np.inf], [-np.inf, 1e-45, -3e38, 0.3]], np.float32)
    _, vjp = jax.vjp(_materialized_cotangent, jnp.zeros((2, 4), jnp.float32))
    (got,) = jax.jit(vjp)(jnp.asarray(g))
    got = np.asarray(got)
    sub = (g != 0) & (np.abs(g) < np.finfo(np.float32).tiny)
    np.testing.assert_array_equal(got[~sub].view(np.uint32), g[~sub].view(np.uint32))
    assert all(
        x == y or (x == 0 and np.signbit(x) == np.signbit(y))
        for x, y in zip(got[sub], g[sub], strict=True)
    )
    _, vjp0 = jax.vjp(_materialized_cotangent, jnp.zeros((0, 4), jnp.float32))
    assert jax.jit(vjp0)(jnp.zeros((0, 4), jnp.float32))[0].shape == (0, 4)
