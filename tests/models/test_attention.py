"""Attention implementations: parity with ``xla`` in value and gradient, memory, prefill, dtypes.

The reference is the ``xla`` implementation (all scores at once), itself
checked against ``transformers`` by test_hf_parity.py, and against a
naive NumPy softmax here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxprs import equations

from erpo_jax.models import Decoder, ModelConfig
from erpo_jax.models import attention as A


def _attend(*args, impl, block_size=512):
    return _attend_jit(*args, impl=impl, block_size=block_size)


_attend_jit = jax.jit(A.attention, static_argnames=("impl", "block_size"))


def _inputs(seed, b, s, n, kh, c, h, *, offset=0, pads=(0, 3), dtype=jnp.float32):
    """Queries at slots ``offset .. offset + s - 1``; row i has ``pads[i]`` masked leading keys."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, s, n, h)), dtype)
    k = jnp.asarray(rng.normal(size=(b, kh, c, h)), dtype)
    v = jnp.asarray(rng.normal(size=(b, kh, c, h)), dtype)
    kv_mask = np.ones((b, c), bool)
    for i in range(b):
        kv_mask[i, : pads[i % len(pads)]] = False
    q_slots = offset + jnp.arange(s, dtype=jnp.int32)
    return q, k, v, q_slots, jnp.asarray(kv_mask)


def _numpy_attention(q, k, v, q_slots, kv_mask, window=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, s, n, h = q.shape
    kh, c = k.shape[1], k.shape[2]
    out = np.zeros((b, s, n, h))
    for bi in range(b):
        for qi in range(s):
            allowed = (np.arange(c) <= int(q_slots[qi])) & np.asarray(kv_mask[bi])
            if window is not None:  # the query's own key and the window - 1 before it
                allowed &= np.arange(c) > int(q_slots[qi]) - window
            for ni in range(n):
                kk, vv = k[bi, ni // (n // kh)], v[bi, ni // (n // kh)]
                scores = kk @ q[bi, qi, ni] / np.sqrt(h)
                scores = np.where(allowed, scores, -np.inf) if allowed.any() else 0 * scores
                p = np.exp(scores - scores.max())
                out[bi, qi, ni] = (p / p.sum()) @ vv
    return out.reshape(b, s, n * h)


# (S, C, offset, block): self-attention, a block that does not divide C, a
# cached extend (queries at slots 13.., keys beyond them unwritten), one block.
CASES = [(37, 37, 0, 8), (37, 37, 0, 10), (24, 50, 13, 7), (16, 16, 0, 64)]


@pytest.mark.parametrize(("s", "c", "offset", "block"), CASES)
def test_chunked_and_xla_match_numpy_in_value(s, c, offset, block):
    # Row 1 has 3 masked leading keys: its first queries (at offset 0) see none.
    q, k, v, q_slots, kv_mask = _inputs(0, 2, s, 4, 2, c, 8, offset=offset)
    want = _numpy_attention(q, k, v, q_slots, kv_mask)
    xla = _attend(q, k, v, q_slots, kv_mask, impl="xla")
    chunked = _attend(q, k, v, q_slots, kv_mask, impl="chunked", block_size=block)
    np.testing.assert_allclose(np.asarray(xla), want, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(chunked), want, atol=2e-6, rtol=1e-5)


# (S, C, offset, block, causal_offset): self-attention in key blocks, in causal
# query spans, a cached extend, a decode step.
@pytest.mark.parametrize(
    ("s", "c", "offset", "block", "causal"),
    [(37, 37, 0, 8, None), (37, 37, 0, 8, 0), (24, 50, 13, 7, None), (1, 21, 13, 8, None)],
)
@pytest.mark.parametrize("impl", ["xla", "chunked", "cudnn", "splash", "auto"])
def test_sliding_window_attention_matches_numpy(s, c, offset, block, causal, impl):
    """A sliding window of 5 keys, given as window_slots(q_slots, 5); cudnn and
    splash run as chunked (their masks take no traced window), on CPU too."""
    q, k, v, q_slots, kv_mask = _inputs(4, 2, s, 4, 2, c, 8, offset=offset)
    want = _numpy_attention(q, k, v, q_slots, kv_mask, window=5)
    f = jax.jit(functools.partial(A.attention, impl=impl, block_size=block, causal_offset=causal))
    got = f(q, k, v, A.window_slots(q_slots, jnp.int32(5)), kv_mask)
    # Queries that see a key (a padding query's output is unspecified).
    sees = np.asarray(kv_mask)[:, np.asarray(q_slots)]
    np.testing.assert_allclose(np.asarray(got)[sees], want[sees], atol=2e-6, rtol=1e-5)
    # ... and the window cuts keys here: full attention differs.
    assert np.abs(want - _numpy_attention(q, k, v, q_slots, kv_mask)).max() > 1e-2


def test_sliding_window_gradients_equal_xla():
    q, k, v, q_slots, kv_mask = _inputs(5, 2, 37, 4, 2, 37, 8)
    slots = A.window_slots(q_slots, 6)

    def loss(impl, **kw):
        def f(q, k, v):
            out = A.attention(q, k, v, slots, kv_mask, impl=impl, **kw)
            return jnp.sum(jnp.sin(out) * kv_mask[:, :, None])

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    want = loss("xla")
    for kw in (dict(block_size=8), dict(block_size=8, causal_offset=0)):
        for got, ref in zip(loss("chunked", **kw), want, strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-5, rtol=1e-4)


def test_sliding_window_with_a_shared_prefix_is_refused():
    q, k, v, q_slots, kv_mask = _inputs(6, 2, 1, 4, 2, 5, 8, offset=4)
    prefix = (jnp.zeros((1, 2, 8, 3)), jnp.zeros((1, 2, 3, 8)), jnp.ones((1, 3), bool))
    with pytest.raises(ValueError, match="sliding window with a shared prefix"):
        A.attention(q, k, v, A.window_slots(q_slots, 2), kv_mask, prefix)


# (S, C, offset): a decode step (S == 1, XLA:CPU's multiply-reduce path), and
# a cached multi-token extend, both against a partly unwritten cache.
@pytest.mark.parametrize(("s", "c", "offset"), [(1, 21, 13), (1, 1, 0), (5, 21, 9)])
@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_transposed_cache_keys_give_the_same_attention(s, c, offset, impl):
    # A KV cache stores keys as [B, K, H, C]; attending to them so must equal
    # the NumPy reference on the [B, K, C, H] keys. H == C in no case here, so
    # a mixed-up axis cannot pass.
    q, k, v, q_slots, kv_mask = _inputs(3, 2, s, 4, 2, c, 8, offset=offset)
    want = _numpy_attention(q, k, v, q_slots, kv_mask)
    kt = jnp.swapaxes(k, 2, 3)
    got = jax.jit(A.attention, static_argnames=("impl", "keys_transposed"))(
        q, kt, v, q_slots, kv_mask, impl=impl, keys_transposed=True
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)


def test_transposed_decode_scores_reduce_over_a_major_axis():
    # The decode step's scores reduce over the head width; with the cache's
    # slots-minor keys that is not the minor axis of the product (on CPU a
    # minor reduction of 32 floats ran 1.7x slower), and the keys are read
    # as stored: no transpose of them. The values' pass is a batched dot.
    q, k, v, q_slots, kv_mask = _inputs(4, 2, 1, 4, 2, 21, 8, offset=13)
    kt = jnp.swapaxes(k, 2, 3)
    jaxpr = jax.make_jaxpr(lambda q, kt, v: A._xla_decode_cpu(q, kt, v, q_slots, kv_mask, True))(
        q, kt, v
    )
    products = [  # the [B, K, G, H, C] scores product
        e.params["axes"]
        for e in equations(jaxpr)
        if e.primitive.name == "reduce_sum" and e.invars[0].aval.ndim == 5
    ]
    assert products == [(3,)]  # [(4,)] with [B, K, C, H] keys
    assert not [e for e in equations(jaxpr) if e.primitive.name == "transpose"]
    # The values: one dot batched over (row, key head), contracting the slots.
    dots = [e for e in equations(jaxpr) if e.primitive.name == "dot_general"]
    assert [e.params["dimension_numbers"] for e in dots] == [(((3,), (2,)), ((0, 1), (0, 1)))]


def test_keys_that_do_not_match_the_values_are_a_clear_error():
    q, k, v, q_slots, kv_mask = _inputs(5, 2, 1, 4, 2, 21, 8, offset=13)
    with pytest.raises(ValueError, match=r"keys of shape \(2, 2, 21, 8\).*keys_transposed=True"):
        A.attention(q, k, v, q_slots, kv_mask, keys_transposed=True)
    with pytest.raises(ValueError, match=r"expected \(2, 2, 21, 8\)"):
        A.attention(q, jnp.swapaxes(k, 2, 3), v, q_slots, kv_mask)


def _shared_prefix_inputs(seed, p, g, s, sp, c, *, offset, scale=1.0, shift=0.0, h=8, n=4, kh=2):
    """A shared prefix of ``sp`` slots for ``p`` prompts, ``g`` rows each, ``c`` own slots.

    Prompt 0 has 2 masked leading slots, prompt 1 one real slot only, any
    further prompt none masked. Returns the attention arguments and the
    equivalent unshared ``[B, K, sp + c, H]`` keys and values, mask and query slots.
    ``shift``: every query's first component is 10 and the prefix keys'
    first component is shifted by ``shift``, so the prefix's scores sit
    about ``10 * shift / sqrt(h)`` above (or below) the own slots', with
    their usual spread of a few units.
    """
    rng = np.random.default_rng(seed)
    b = p * g
    q = rng.normal(size=(b, s, n, h)) * scale
    pk, pv = rng.normal(size=(2, p, kh, sp, h))
    if shift:
        q[..., 0] = 10.0
        pk[..., 0] += shift
    k, v = rng.normal(size=(2, b, kh, c, h))
    pmask = np.ones((p, sp), bool)
    pmask[0, :2] = False
    pmask[1, : sp - 1] = False
    kv_mask = np.arange(c)[None, :] < offset + s  # written own slots
    kv_mask = np.broadcast_to(kv_mask, (b, c)).copy()
    kv_mask[1, 0] = False  # a masked own slot
    q_slots = offset + np.arange(s, dtype=np.int32)
    full_k = np.concatenate([np.repeat(pk, g, axis=0), k], axis=2)
    full_v = np.concatenate([np.repeat(pv, g, axis=0), v], axis=2)
    full_mask = np.concatenate([np.repeat(pmask, g, axis=0), kv_mask], axis=1)
    args = (q, np.swapaxes(k, 2, 3), v, q_slots, kv_mask)
    prefix = (np.swapaxes(pk, 2, 3), pv, pmask)
    full = (q, full_k, full_v, sp + q_slots, full_mask)
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)

    def cast(xs):
        return tuple(f32(x) if x.dtype == np.float64 else jnp.asarray(x) for x in xs)

    return cast(args), cast(prefix), full


# (S, own slots, offset, query scale, prefix shift): a decode step (XLA:CPU's
# multiply-reduce path) on a partly written cache, its first step (one own
# slot), a cached multi-token extend (the einsum path), scores far from zero
# (scale 100), and the prefix's scores about 210 above or below the own
# slots' with a spread of a few units (exp over- or underflows, and the
# prefix's weights flatten, unless both parts share one maximum).
@pytest.mark.parametrize(
    ("s", "c", "offset", "scale", "shift"),
    [(1, 9, 4, 1.0, 0.0), (1, 1, 0, 1.0, 0.0), (3, 9, 2, 1.0, 0.0), (1, 9, 6, 100.0, 0.0),
     (1, 9, 6, 1.0, 60.0), (1, 9, 6, 1.0, -60.0), (3, 9, 2, 1.0, 60.0)],
)  # fmt: skip
def test_shared_prefix_attention_equals_the_copied_prompt(s, c, offset, scale, shift):
    args, prefix, full = _shared_prefix_inputs(
        6, 3, 2, s, 7, c, offset=offset, scale=scale, shift=shift
    )
    want = _numpy_attention(*full)
    got = jax.jit(A.attention, static_argnames=("impl", "keys_transposed"))(
        *args, prefix, keys_transposed=True
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5 * scale, rtol=1e-5)
    # The prompt's slots matter (unless pushed far below): dropping the
    # prefix changes the output.
    q, kt, v, q_slots, kv_mask = (np.asarray(x) for x in args)
    alone = _numpy_attention(q, np.swapaxes(kt, 2, 3), v, q_slots, kv_mask)
    assert np.allclose(want, alone, atol=1e-3) == (shift < 0)


def test_shared_prefix_attention_reads_keys_in_either_layout_and_differentiates():
    args, prefix, full = _shared_prefix_inputs(7, 2, 3, 2, 5, 6, offset=3)
    q, kt, v, q_slots, kv_mask = args
    k = jnp.swapaxes(kt, 2, 3)

    def f(q, k):  # [B, K, C, H] keys, as a cache-free caller passes them
        return A.attention(q, k, v, q_slots, kv_mask, prefix)

    np.testing.assert_allclose(np.asarray(jax.jit(f)(q, k)), _numpy_attention(*full), atol=2e-6)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(6, 2, 32)), jnp.float32)
    fk, fv = (jnp.asarray(x, jnp.float32) for x in full[1:3])
    f_slots, f_mask = full[3:]

    def shared(q):
        return jnp.sum(f(q, k) * w)

    def copied(q):
        return jnp.sum(A.attention(q, fk, fv, jnp.asarray(f_slots), jnp.asarray(f_mask)) * w)

    got, want = jax.grad(shared)(q), jax.grad(copied)(q)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-6)
    assert float(jnp.abs(want).max()) > 1e-2


def test_a_shared_prefix_that_does_not_fit_is_a_clear_error():
    args, (pk, pv, pmask), _ = _shared_prefix_inputs(8, 3, 2, 1, 7, 9, offset=4)
    with pytest.raises(ValueError, match=r"keys \(3, 1, 8, 7\).*expected keys \[P, 2, 8, S\]"):
        A.attention(*args, (pk[:, :1], pv, pmask), keys_transposed=True)
    with pytest.raises(ValueError, match=r"shared prefix of keys \(4, 2, 8, 7\).*P dividing 6"):
        pad = ((0, 1), (0, 0), (0, 0), (0, 0))
        A.attention(*args, (jnp.pad(pk, pad), jnp.pad(pv, pad), jnp.pad(pmask, ((0, 1), (0, 0)))),
                    keys_transposed=True)  # fmt: skip


@pytest.mark.parametrize(("s", "c", "offset", "block"), CASES)
def test_chunked_gradients_equal_xla(s, c, offset, block):
    q, k, v, q_slots, kv_mask = _inputs(1, 2, s, 4, 2, c, 8, offset=offset)
    w = jnp.asarray(np.random.default_rng(2).normal(size=(2, s, 32)), jnp.float32)

    def grads(impl):
        def f(q, k, v):
            out = A.attention(q, k, v, q_slots, kv_mask, impl=impl, block_size=block)
            return jnp.sum(out * w)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    for got, want, name in zip(grads("chunked"), grads("xla"), "qkv", strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-6, err_msg=name)
        assert float(jnp.abs(want).max()) > 1e-2, name  # the comparison is not vacuous


def test_chunked_in_bfloat16_stays_at_bfloat16_error():
    """bf16 inputs: chunked is as close to the float32 result as xla in bf16 is."""
    args32 = _inputs(3, 2, 64, 4, 2, 64, 16)
    args16 = tuple(x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in args32)
    exact = np.asarray(_attend(*args32, impl="xla"), np.float32)
    xla16 = np.asarray(_attend(*args16, impl="xla"), np.float32)
    chunk16 = np.asarray(_attend(*args16, impl="chunked", block_size=16), np.float32)
    bf16_error = np.abs(xla16 - exact).max()
    assert (
        chunk16.dtype == np.float32 and A.attention(*args16, impl="chunked").dtype == jnp.bfloat16
    )
    assert np.abs(chunk16 - exact).max() <= 2 * bf16_error + 1e-3


@pytest.mark.parametrize(("s", "c"), [(20, 30), (21, 31)])
def test_jax_nn_path_matches_on_queries_that_see_keys(s, c):
    """The cudnn wrapper's layout, mask and odd-length padding, run with jax.nn's XLA kernel.

    Odd lengths are padded to even ones inside (cuDNN's masked kernel needs
    them under grad); the gradient through the padding equals ``xla``'s.
    """
    q, k, v, q_slots, kv_mask = _inputs(4, 2, s, 4, 2, c, 8, offset=10, pads=(0, 12))
    got = A._dot_product_attention(q, k, v, q_slots, kv_mask, implementation="jax_nn")
    want = _numpy_attention(q, k, v, q_slots, kv_mask)
    sees = (np.arange(c)[None, None] <= np.asarray(q_slots)[None, :, None]) & np.asarray(kv_mask)[
        :, None
    ]
    rows = sees.any(-1)  # [B, S]
    assert not rows.all()  # row 1's first queries see nothing: excluded
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got)[rows], want[rows], atol=2e-6, rtol=1e-5)
    w = jnp.asarray(np.random.default_rng(5).normal(size=want.shape) * rows[..., None])

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)

    ours = grads(lambda q, k, v: A._dot_product_attention(q, k, v, q_slots, kv_mask,
                                                          implementation="jax_nn"))  # fmt: skip
    ref = grads(lambda q, k, v: A.attention(q, k, v, q_slots, kv_mask, impl="xla"))
    for a, b, name in zip(ours, ref, "qkv", strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, err_msg=name)


def test_cudnn_off_gpu_and_unknown_impl_are_clear_errors():
    args = _inputs(0, 1, 4, 2, 1, 4, 8)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match=r"cudnn.*needs a GPU"):
            A.attention(*args, impl="cudnn")
    with pytest.raises(ValueError, match=r"attention_impl=.flash.*xla, chunked"):
        A.attention(*args, impl="flash")
    with pytest.raises(ValueError, match="attention_impl"):
        Decoder(_CONFIG, attention_impl="flash", rngs=nnx.Rngs(0))


def test_auto_picks_by_length_and_backend():
    f32 = jnp.float32
    assert A.resolve_attention_impl("auto", s=1, c=100_000, dtype=f32) == "xla"
    short = A.resolve_attention_impl("auto", s=128, c=128, dtype=f32)
    assert short == ("chunked" if jax.default_backend() == "cpu" else "xla")
    long = A.resolve_attention_impl("auto", s=4096, c=4096, dtype=jnp.bfloat16)
    assert long == ("cudnn" if jax.default_backend() == "gpu" else "chunked")


# ---------------------------------------------------------------- the model

_CONFIG = ModelConfig("qwen3", 97, 32, 48, 2, 4, 2, 8, qk_norm=True, max_position_embeddings=512)


def _pair(impl_a="xla", impl_b="chunked", block=8, scan_layers=False):
    a = Decoder(_CONFIG, attention_impl=impl_a, scan_layers=scan_layers, rngs=nnx.Rngs(0))
    b = Decoder(_CONFIG, attention_impl=impl_b, attention_block=block, scan_layers=scan_layers,
                rngs=nnx.Rngs(0))  # fmt: skip
    return a, b


def _tokens(seed, b, s):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, 97, (b, s)), jnp.int32)
    mask = np.ones((b, s), bool)
    mask[1, :7] = False
    return tokens, jnp.asarray(mask)


@nnx.jit
def _forward(model, tokens, mask):
    return model(tokens, mask)


def test_decoder_chunked_matches_xla_forward_and_gradient():
    xla, chunked = _pair(scan_layers=True)  # one compiled block: a faster compile
    tokens, mask = _tokens(0, 3, 29)
    # At real positions; a padding position's output is unspecified (chunked's
    # causal query blocks average a query that sees no key over its block's keys).
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(
        np.asarray(_forward(chunked, tokens, mask))[real],
        np.asarray(_forward(xla, tokens, mask))[real],
        atol=2e-5,
    )

    def loss(model):
        logits = model(tokens, mask)
        return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)[..., :5])

    gx = nnx.jit(nnx.grad(loss))(xla)
    gc = nnx.jit(nnx.grad(loss))(chunked)
    for (path, a), (_, b) in zip(
        jax.tree_util.tree_leaves_with_path(gx),
        jax.tree_util.tree_leaves_with_path(gc),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, err_msg=str(path))


@nnx.jit(static_argnames="max_length")
def _prefill(model, tokens, mask, max_length):
    return model.prefill(tokens, mask, max_length=max_length)


@nnx.jit
def _decode(model, tokens, cache):
    return model.decode_step(tokens, cache)


def test_prefill_and_decode_match_across_implementations():
    xla, chunked = _pair()
    tokens, mask = _tokens(1, 3, 21)
    lx, cx = _prefill(xla, tokens, mask, 40)
    lc, cc = _prefill(chunked, tokens, mask, 40)
    np.testing.assert_allclose(np.asarray(lc), np.asarray(lx), atol=2e-5)
    np.testing.assert_allclose(np.asarray(cc.k[0]), np.asarray(cx.k[0]), atol=2e-5)
    nxt = jnp.argmax(lx, -1).astype(jnp.int32)
    dx, _ = _decode(xla, nxt, cx)
    dc, _ = _decode(chunked, nxt, cc)
    np.testing.assert_allclose(np.asarray(dc), np.asarray(dx), atol=2e-5)
    # The prefill's logits equal the cache-free forward's last position.
    full = _forward(xla, tokens, mask)[:, -1]
    np.testing.assert_allclose(np.asarray(lx), np.asarray(full), atol=2e-5)


def _layer_temp_bytes(impl, s, block=256):
    """Compiled temporary bytes of one decoder layer's value_and_grad at sequence length s."""
    cfg = ModelConfig("qwen3", 64, 64, 128, 1, 4, 2, 16, qk_norm=True, max_position_embeddings=s)
    model = Decoder(cfg, attention_impl=impl, attention_block=block, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((1, s), jnp.int32)

    def loss(params, tokens):
        m = nnx.merge(graphdef, params)
        return jnp.sum(m.hidden_states(tokens))

    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes


# (S, C, causal offset, block): self-attention in query blocks of 8 (37 = 5
# blocks, the last one short) and of 10; queries after 13 prefix keys in
# blocks of 7; and one block (S <= block: the plain path).
CAUSAL = [(37, 37, 0, 8), (37, 37, 0, 10), (24, 37, 13, 7), (16, 16, 0, 64)]


@pytest.mark.parametrize(("s", "c", "offset", "block"), CAUSAL)
def test_chunked_causal_blocks_equal_numpy_and_xla_in_value_and_gradient(s, c, offset, block):
    """With causal_offset (queries at slots offset + arange(S), the decoder's
    cache-free and shared-prompt forwards), chunked runs each query block over
    the keys up to its last slot only: the same attention, in value (NumPy) and
    in the q, k, v gradients (xla), on every query that sees a key (left padding
    in row 1: its first queries see none; theirs are unspecified)."""
    # Row 1's keys are masked up to slot offset + 2: its first 3 queries see none.
    q, k, v, q_slots, kv_mask = _inputs(3, 2, s, 4, 2, c, 8, offset=offset, pads=(0, offset + 3))
    sees = np.asarray((np.arange(c)[None, None] <= np.asarray(q_slots)[None, :, None])
                      & np.asarray(kv_mask)[:, None]).any(-1)  # fmt: skip  # [B, S]
    assert not sees.all() and sees.any()
    w = jnp.asarray(np.random.default_rng(4).normal(size=(2, s, 32)) * sees[..., None], jnp.float32)

    def f(impl, causal_offset):
        def loss(q, k, v):
            out = A.attention(q, k, v, q_slots, kv_mask, impl=impl, block_size=block,
                              causal_offset=causal_offset)  # fmt: skip
            return jnp.sum(out * w), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, got), got_g = f("chunked", offset)
    _, ref_g = f("xla", None)
    want = _numpy_attention(q, k, v, q_slots, kv_mask)
    np.testing.assert_allclose(np.asarray(got)[sees], want[sees], atol=2e-6, rtol=1e-5)
    for a, b, name in zip(got_g, ref_g, "qkv", strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-6, err_msg=name)
        assert float(jnp.abs(b).max()) > 1e-2, name


def test_chunked_causal_blocks_skip_the_masked_keys():
    """At S = 1,024 in blocks of 128, one layer's value_and_grad with
    causal_offset computes about half the scores: its compiled temporaries are
    at most 70% of the plain chunked path's (compiled, not run)."""
    s, block = 1024, 128
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, s, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, 2, s, 16)), jnp.float32) for _ in range(2))
    q_slots, kv_mask = jnp.arange(s, dtype=jnp.int32), jnp.ones((1, s), bool)

    def temp(causal_offset):
        def loss(q, k, v):
            out = A.attention(q, k, v, q_slots, kv_mask, impl="chunked", block_size=block,
                              causal_offset=causal_offset)  # fmt: skip
            return jnp.sum(out * out)

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain, causal = temp(None), temp(0)
    assert causal <= 0.7 * plain, (causal, plain)


@pytest.mark.parametrize(
    "lengths", [(1024, 4096), pytest.param((1024, 8192), marks=pytest.mark.slow)]
)
def test_chunked_memory_grows_linearly_with_length(lengths):
    """One layer's value_and_grad, S x r: chunked memory ~r x, xla ~r^2 x (compiled, not run)."""
    r = lengths[1] / lengths[0]
    chunked = [_layer_temp_bytes("chunked", s) for s in lengths]
    xla = [_layer_temp_bytes("xla", s) for s in lengths]
    assert chunked[1] / chunked[0] <= r * 1.25, chunked
    assert xla[1] / xla[0] >= r * r / 2, xla  # the quadratic baseline the test tells apart
    assert chunked[1] < xla[1] / 4, (chunked, xla)


def test_prefill_does_not_attend_to_empty_cache_slots():
    """Prefill temporaries do not grow with the cache length (they did: [B, N, S, C] scores)."""
    model = Decoder(_CONFIG, attention_impl="xla", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((4, 64), jnp.int32)
    mask = jax.ShapeDtypeStruct((4, 64), jnp.bool_)

    def temp(max_length):
        def f(params, tokens, mask):
            return nnx.merge(graphdef, params).prefill(tokens, mask, max_length=max_length)

        compiled = jax.jit(f).lower(params, tokens, mask).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    short, long = temp(64 + 8), temp(64 + 8192)
    scores_at_long = 4 * 4 * 64 * (64 + 8192) * 4  # [B, N, S, C] float32
    assert long - short < scores_at_long / 4, (short, long)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn, "float64", "nonsense"])
def test_unsupported_dtypes_are_refused(dtype):
    with pytest.raises(ValueError, match=r"dtype=.*(not supported|not a dtype).*float32, bfloat16"):
        Decoder(_CONFIG, dtype=dtype, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"param_dtype=.*float32, bfloat16, float16"):
        Decoder(_CONFIG, param_dtype=dtype, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_supported_dtypes_are_kept(dtype):
    model = nnx.eval_shape(
        lambda: Decoder(_CONFIG, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    )
    assert model.dtype == jnp.dtype(dtype) and model.embed.get_value().dtype == jnp.dtype(dtype)


# ---------------------------------------------------------------- splash
# The Pallas TPU kernel, run here in interpret mode (same semantics, slow).


@pytest.mark.filterwarnings("ignore:attention_impl='splash' off TPU")
def test_splash_matches_numpy_and_xla_gradients_on_real_queries():
    # S = 150 pads to two 128-tiles; GQA 4 over 2; row 1 left-padded by 9.
    q, k, v, q_slots, kv_mask = _inputs(6, 2, 150, 4, 2, 150, 16, pads=(0, 9))
    real = np.asarray(kv_mask)  # [B, S]: the queries at real tokens
    got = _attend(q, k, v, q_slots, kv_mask, impl="splash")
    want = _numpy_attention(q, k, v, q_slots, kv_mask)
    assert np.isfinite(np.asarray(got)).all()  # padding queries too
    np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=2e-5, rtol=1e-5)

    w = jnp.asarray(np.random.default_rng(1).normal(size=(2, 150, 64)), jnp.float32)

    def loss(q, k, v, impl):
        out = A.attention(q, k, v, q_slots, kv_mask, impl=impl)
        return jnp.sum(jnp.where(kv_mask[..., None], out * w, 0.0))  # real queries only

    gs = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(q, k, v, "splash")
    gx = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(q, k, v, "xla")
    for name, a, b in zip("qkv", gs, gx, strict=True):
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * scale, err_msg=name)
    # Keys of padding get no gradient from real queries.
    np.testing.assert_array_equal(np.asarray(gs[1])[1, :, :9], 0.0)


def test_splash_falls_back_for_cached_steps_and_auto_picks_it_only_on_tpu():
    f32 = jnp.float32
    assert A.resolve_attention_impl("splash", s=1, c=300, dtype=f32) == "xla"  # decode step
    assert A.resolve_attention_impl("splash", s=24, c=50, dtype=f32) == "chunked"  # extend
    assert A.resolve_attention_impl("splash", s=50, c=50, dtype=f32) == "splash"
    auto = A.resolve_attention_impl("auto", s=4096, c=4096, dtype=f32, head_dim=128)
    assert auto == ("splash" if jax.default_backend() == "tpu" else "chunked")
    # head dims the TPU kernel's lanes do not fit stay on chunked
    assert A.resolve_attention_impl("auto", s=4096, c=4096, dtype=f32, head_dim=64) == "chunked"


@pytest.mark.filterwarnings("ignore:attention_impl='splash' off TPU")
def test_decoder_splash_matches_xla_forward_and_prefill():
    xla, splash = _pair("xla", "splash")
    tokens, mask = _tokens(0, 2, 29)
    real = np.asarray(mask)
    np.testing.assert_allclose(
        np.asarray(_forward(splash, tokens, mask))[real],
        np.asarray(_forward(xla, tokens, mask))[real],
        atol=2e-5,
    )
    # The prefill attends with splash, its decode steps with xla (a fallback).
    lx, cx = _prefill(xla, tokens, mask, 40)
    ls, cs = _prefill(splash, tokens, mask, 40)
    np.testing.assert_allclose(np.asarray(ls), np.asarray(lx), atol=2e-5)
    # Layer 1's keys at real slots (padding slots hold what padding queries
    # attended to, meaningless and masked in every path).
    slots = np.zeros((2, 40), bool)
    slots[:, :29] = real
    ks, kx = np.asarray(cs.k[1]).transpose(0, 3, 1, 2), np.asarray(cx.k[1]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ks[slots], kx[slots], atol=2e-5)
    nxt = jnp.argmax(lx, -1).astype(jnp.int32)
    np.testing.assert_allclose(
        np.asarray(_decode(splash, nxt, cs)[0]), np.asarray(_decode(xla, nxt, cx)[0]), atol=2e-5
    )


# ---------------------------------------------------------------- precision


def _dot_precisions(jaxpr) -> list:
    """The ``precision`` of every ``dot_general`` in ``jaxpr`` and its sub-jaxprs."""
    return [e.params["precision"] for e in equations(jaxpr) if e.primitive.name == "dot_general"]


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_float32_matmuls_ask_for_full_precision_and_bfloat16_ones_do_not(impl):
    """float32 compute is float32 on every backend (no TF32 on GPU, no 1-pass bf16 on TPU).

    CPU computes both the same way, so the test reads the requested precision
    from the traced forward and gradient; on a GPU, test_hf_parity's float32
    tolerance (1e-4) checks the numbers (it failed at 3.6e-4 under TF32).
    """
    tokens, mask = _tokens(0, 2, 9)
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    for dtype, want in ((jnp.float32, highest), (jnp.bfloat16, None)):
        model = Decoder(_CONFIG, dtype=dtype, attention_impl=impl, attention_block=4,
                        rngs=nnx.Rngs(0))  # fmt: skip
        graphdef, params = nnx.split(model)

        def loss(params, graphdef=graphdef):
            logits = nnx.merge(graphdef, params)(tokens, mask)
            return jnp.sum(logits[..., :3].astype(jnp.float32))

        precisions = _dot_precisions(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
        assert len(precisions) > 20  # projections, attention, logits, and their transposes
        assert all(p == want for p in precisions), (dtype, set(precisions))


@pytest.mark.parametrize("vocab_chunk_size", [None, 32])
def test_float32_head_matmuls_ask_for_full_precision(vocab_chunk_size):
    """The chunked log-prob/entropy head, forward and custom backward, by hidden dtype."""
    from erpo_jax.ops import token_logp_and_entropy

    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 97, (2, 6)), jnp.int32)
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    for dtype, want in ((jnp.float32, highest), (jnp.bfloat16, None)):
        hidden = jnp.asarray(rng.normal(size=(2, 6, 16)), dtype)
        unembed = jnp.asarray(rng.normal(size=(16, 97)), dtype)

        def loss(hidden, unembed):
            logp, entropy = token_logp_and_entropy(
                hidden, unembed, tokens, chunk_size=4, vocab_chunk_size=vocab_chunk_size
            )
            return jnp.sum(logp) + jnp.sum(entropy)

        jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, unembed)
        precisions = _dot_precisions(jaxpr.jaxpr)
        assert len(precisions) >= 3  # logits, and both gradient matmuls
        assert all(p == want for p in precisions), (dtype, set(precisions))


@pytest.mark.parametrize(
    ("c", "block_size", "blocks", "block"),
    [(520, 512, 2, 260), (512, 512, 1, 512), (159, 512, 1, 159), (1000, 256, 4, 250)],
)
def test_chunked_splits_the_keys_into_equal_blocks(c, block_size, blocks, block):
    """At most block_size keys per block, as few blocks as that allows, all of one size:
    520 keys run as 2 x 260, not 512 + 8 padded to 2 x 512 (1.7x slower than xla on CPU)."""
    q = jnp.zeros((1, 4, 4, 8), jnp.float32)
    k = jnp.zeros((1, 2, c, 8), jnp.float32)
    mask = jnp.ones((1, c), bool)
    slots = jnp.arange(c - 4, c, dtype=jnp.int32)
    jaxpr = jax.make_jaxpr(
        lambda q, k: A.attention(q, k, k, slots, mask, impl="chunked", block_size=block_size)
    )(q, k)

    (scan,) = [e for e in equations(jaxpr) if e.primitive.name == "scan"]
    assert scan.params["length"] == blocks
    keys = [
        v.aval.shape for v in scan.invars[scan.params["num_consts"] + scan.params["num_carry"] :]
    ]
    assert (blocks, 1, 2, block, 8) in keys  # the key blocks [nb, B, K, block, H]
