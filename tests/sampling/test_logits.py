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


def _reference_stats(z, tokens, keep=None):
    """float64 NumPy log-probs, entropy and kept-set entropy of softmax(z) (METHOD's formulas)."""
    z = np.asarray(z, np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    entropy = -(np.exp(logp) * logp).sum(-1)
    if keep is None:
        return logp[np.arange(len(z)), tokens], entropy, entropy
    zk = np.where(keep, z, -np.inf)
    lk = zk - zk.max(-1, keepdims=True)
    lk -= np.log(np.exp(lk).sum(-1, keepdims=True))
    truncated = -(np.exp(lk) * np.where(keep, lk, 0.0)).sum(-1)
    return logp[np.arange(len(z)), tokens], entropy, truncated


@pytest.mark.parametrize("opts", [{}, {"top_p": 0.5}], ids=["none", "top_p"])
@pytest.mark.parametrize("center", [0.0, 1000.0, -3000.0])
def test_stats_of_logits_far_from_zero_keep_their_digits(center, opts):
    """Logits in the thousands with a spread of a few units: the statistics
    equal float64 ones to 2e-6, as they do at zero. (Computed unshifted,
    ``z[token] - logsumexp(z)`` and ``logsumexp(z) - sum(p * z)`` lose
    digits to cancellation: float32's spacing at 1,000 is 6e-5. The
    sampler did so before 2026-11-30, and its entropies were off by 0.03 at
    1,000 and 0.33 at -3,000 on these logits.)"""
    rng = np.random.default_rng(11)
    z = (center + 2.0 * rng.normal(size=(6, 300))).astype(np.float32)
    keys = jax.random.split(jax.random.key(1), 6)
    out = jax.jit(lambda x, k: sample_from_logits(x, k, **opts))(z, keys)
    keep = np.asarray(truncation_mask(z, **opts)) if opts else None
    logp, entropy, truncated = _reference_stats(z, np.asarray(out.tokens), keep)
    np.testing.assert_allclose(np.asarray(out.logp), logp, atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(out.entropy), entropy, atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(out.truncated_entropy), truncated, atol=2e-6, rtol=0)
    assert entropy.min() > 1.0  # a spread-out distribution, not a near one-hot


@pytest.mark.parametrize("opts", [{"top_p": 0.5}, {"top_p": 0.9}, {"top_p": 0.9, "top_k": 50}])
def test_truncation_does_not_move_with_the_logits_center(opts):
    """The kept set is a function of the logits' differences: logits on a
    1/64 grid shifted by 1,024 or -4,096 (exactly representable) keep the same
    tokens in every row. Computed as exp(z - logsumexp(z)), the cut moved in
    1-2% of these rows at top_p = 0.9 (before 2026-11-30)."""
    rng = np.random.default_rng(0)
    z = (np.round(rng.normal(size=(2000, 300)) * 128) / 64).astype(np.float32)
    mask = jax.jit(lambda x: truncation_mask(x, **opts))
    want = np.asarray(mask(z))
    for shift in (1024.0, -4096.0):
        got = np.asarray(mask(z + np.float32(shift)))
        assert (got != want).any(axis=1).sum() == 0, shift
    assert 1 < want.sum(axis=1).mean() < 300  # a cut inside the vocabulary


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


def _sorted_top_p(z: np.ndarray, top_p: float) -> np.ndarray:
    """The sorted-cumsum definition (transformers' TopPLogitsWarper), in NumPy."""
    keep = np.zeros(z.shape, bool)
    for b in range(z.shape[0]):
        p = np.exp(z[b] - z[b].max())
        p = p / p.sum()
        order = np.argsort(-z[b], kind="stable")
        mass_before = np.cumsum(p[order]) - p[order]
        n = max(int(np.sum(mass_before < top_p)), 1)
        keep[b] = z[b] >= z[b][order[n - 1]]
    return keep


@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0, 40.0])
def test_top_p_without_a_sort_equals_the_sorted_definition(scale):
    """The bisection cut keeps exactly the sorted-cumsum set, ties and peaked rows included."""
    rng = np.random.default_rng(int(scale * 100))
    z = (scale * rng.normal(size=(64, 301))).astype(np.float32)
    z[::4] = np.round(z[::4])  # many ties
    z[1::8, :5] = z[1::8].max(axis=1, keepdims=True) + 30  # five equal dominant tokens
    fn = jax.jit(lambda z, p: truncation_mask(z, top_p=p))
    checked = 0
    for top_p in (0.05, 0.3, 0.5, 0.9, 0.97):
        got = np.asarray(fn(z, jnp.float32(top_p)))
        want = _sorted_top_p(z.astype(np.float64), top_p)
        # Rows whose cumulative mass sits within float32 rounding of top_p at
        # the cut may go either way; everywhere else the sets are identical.
        p = np.exp(z - z.max(1, keepdims=True))
        p = p / p.sum(1, keepdims=True)
        kept_mass = np.where(want, p, 0).sum(1)
        dropped_mass = kept_mass - np.array([p[b][want[b]].min() for b in range(len(z))])
        clear = (np.abs(kept_mass - top_p) > 1e-5) & (np.abs(dropped_mass - top_p) > 1e-5)
        np.testing.assert_array_equal(got[clear], want[clear])
        checked += int(clear.sum())
        assert got.any(axis=1).all()
    assert checked > 300


def test_draws_follow_the_truncated_distribution():
    """Empirical frequencies of many independent draws match softmax of the kept
    logits (4 standard errors), and truncated tokens are never drawn, for a
    vocabulary that spans several cumulative-sum blocks."""
    rows, v = 40_000, 300
    rng = np.random.default_rng(0)
    logits = np.zeros(v, np.float32)
    logits[[3, 150, 299]] = [2.0, 1.5, 1.0]  # three likely tokens in three blocks
    logits[[10, 200]] = -np.inf  # never drawn
    probs = np.exp(logits - logits[np.isfinite(logits)].max())
    probs /= probs.sum()
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), rows)
    out = sample_from_logits(jnp.broadcast_to(jnp.asarray(logits), (rows, v)), keys)
    counts = np.bincount(np.asarray(out.tokens), minlength=v)
    assert counts[10] == 0 and counts[200] == 0
    freq = counts / rows
    stderr = np.sqrt(probs * (1 - probs) / rows)
    for tok in (3, 150, 299, 0, 298):
        assert abs(freq[tok] - probs[tok]) < 4 * stderr[tok] + 1e-4, (tok, freq[tok], probs[tok])
    # The long tail as a whole (296 tokens of weight e^0) as well.
    tail = np.setdiff1d(np.arange(v), [3, 150, 299, 10, 200])
    p_tail = probs[tail].sum()
    assert abs(freq[tail].sum() - p_tail) < 4 * np.sqrt(p_tail * (1 - p_tail) / rows)


def test_draw_at_the_top_of_the_cdf_never_lands_on_a_truncated_token(monkeypatch):
    """u = 1 targets the total weight: the draw is the last token of positive
    weight, even with truncated tokens after it in its block and rounding
    between the block sums and the in-block sum."""
    from erpo_jax.sampling import _logits as L

    monkeypatch.setattr(jax.random, "uniform", lambda key, shape, dtype: jnp.zeros(shape, dtype))
    v = 300  # blocks of 128: [0, 128), [128, 256), [256, 300) padded
    z = np.random.default_rng(3).normal(size=(4, v)).astype(np.float32)
    z[0, 200:] = -np.inf  # last positive weight: 199, mid-block
    z[1, 130:] = -np.inf  # 129, early in block 1
    z[2, 1:] = -np.inf  # only token 0
    w = jnp.exp(jnp.asarray(z) - jnp.max(jnp.asarray(z), axis=-1, keepdims=True))  # -inf -> 0
    tokens = L._inverse_cdf_draw(jax.random.split(jax.random.key(0), 4), w)
    assert np.asarray(tokens).tolist() == [199, 129, 0, 299]


def _equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations'
    parameters (jit, while/fori_loop bodies and conds, cond branches, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _equations(sub)


def _sorted_top_p_jnp(z, top_p):
    """The sorted-cumsum top-p in jnp (transformers' TopPLogitsWarper): a full sort."""
    order = jnp.argsort(-z, axis=-1)
    p = jnp.take_along_axis(jax.nn.softmax(z, axis=-1), order, axis=-1)
    n = jnp.maximum(jnp.sum(jnp.cumsum(p, axis=-1) - p < top_p, axis=-1, keepdims=True), 1)
    return z >= jnp.take_along_axis(jnp.take_along_axis(z, order, axis=-1), n - 1, axis=-1)


@pytest.mark.parametrize("fn", ["truncation_mask", "sample_from_logits"])
def test_top_p_alone_traces_no_sort_of_the_vocabulary(fn):
    """Top-p without top-k cuts by bisection (``_top_p_threshold``): its jaxpr,
    nested loops and calls included, holds no ``sort`` and no ``top_k`` over
    the vocabulary (a capped ``top_k`` of a few candidates would be fine),
    while the sorted definition's does."""
    v = 1024
    z = jnp.zeros((4, v), jnp.float32)
    top_p = jnp.float32(0.9)
    if fn == "truncation_mask":
        traced = jax.make_jaxpr(lambda z, p: truncation_mask(z, top_p=p))(z, top_p)
    else:
        keys = jax.random.split(jax.random.key(0), 4)
        traced = jax.make_jaxpr(lambda z, p, k: sample_from_logits(z, k, top_p=p))(z, top_p, keys)
    eqns = list(_equations(traced.jaxpr))
    names = {eqn.primitive.name for eqn in eqns}
    assert "sort" not in names
    assert all(eqn.params["k"] <= v // 8 for eqn in eqns if eqn.primitive.name == "top_k")
    assert names & {"scan", "while"}  # the bisection's fori_loop, walked into
    # The walk does find a sort where there is one: the sorted reference's,
    # nested in jnp.argsort's jit and here in a loop body as well.
    for reference in (
        lambda z, p: _sorted_top_p_jnp(z, p),
        lambda z, p: jax.lax.fori_loop(0, 2, lambda _, k: k & _sorted_top_p_jnp(z, p), z < 1),
    ):
        sorted_eqns = _equations(jax.make_jaxpr(reference)(z, top_p).jaxpr)
        assert "sort" in {eqn.primitive.name for eqn in sorted_eqns}
    # ... and it is the same cut (the sorted-definition parity test covers many rows).
    zr = jnp.asarray(_logits(seed=4, b=6, v=v))
    got = jax.jit(lambda z, p: truncation_mask(z, top_p=p))(zr, top_p)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_sorted_top_p_jnp(zr, top_p)))
