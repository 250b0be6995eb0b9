"""The sampler against the model's own full forward pass: statistics, distributions, masks."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import nnx
from jaxprs import equations

from erpo_jax.sampling import compiled_cache_sizes, repeat_for_groups, sample

T = 12


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _allowed(logits, temperature, top_k=None, top_p=None, min_p=None):
    """NumPy reference of the truncation, one row at a time (HF warper order: k, p, min-p)."""
    z = logits.astype(np.float64) / temperature
    keep = np.ones(z.shape, bool)
    for b in range(z.shape[0]):
        order = np.argsort(-z[b], kind="stable")
        if top_k is not None:
            keep[b, order[top_k:]] = False
        if top_p is not None:
            p = np.where(keep[b], np.exp(z[b] - z[b].max()), 0.0)
            p /= p.sum()
            mass = 0.0
            for i in order:
                if not keep[b, i]:
                    continue
                if mass >= top_p:
                    keep[b, i] = False
                mass += p[i]
        if min_p is not None:
            p = np.exp(z[b] - z[b].max())
            keep[b] &= p >= min_p
    return keep


def _entropy(z, keep):
    z = np.where(keep, z.astype(np.float64), -np.inf)
    logq = np.where(keep, _log_softmax(z), 0.0)
    return -np.sum(np.where(keep, np.exp(logq) * logq, 0.0), -1)


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_logp_and_entropy_equal_full_forward(model, h, temperature):
    prompt, prompt_mask = h.left_padded(0)
    out = sample(
        model, prompt, prompt_mask, h.key(1), max_new_tokens=T, temperature=temperature, eos_ids=()
    )
    mask = np.asarray(out.mask)
    assert mask.all() and np.array_equal(out.lengths, np.full(4, T))
    logp, entropy = h.reference_stats(model, prompt, prompt_mask, out, temperature)
    np.testing.assert_allclose(np.asarray(out.logp), logp, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.entropy), entropy, atol=1e-4)
    # No truncation: the distribution drawn from is the full one.
    np.testing.assert_array_equal(np.asarray(out.truncated_entropy), np.asarray(out.entropy))
    assert out.logp.dtype == np.float32 and out.tokens.dtype == np.int32


def test_greedy_is_argmax_with_temperature_one_stats(model, h):
    prompt, prompt_mask = h.left_padded(1)
    out = sample(
        model, prompt, prompt_mask, h.key(0), max_new_tokens=T, temperature=0.0, eos_ids=()
    )
    tokens = np.asarray(out.tokens)
    logits = h.reference_logits(model, prompt, prompt_mask, tokens, np.asarray(out.mask))
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    logp, entropy = h.reference_stats(model, prompt, prompt_mask, out, 1.0)
    np.testing.assert_allclose(np.asarray(out.logp), logp, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.entropy), entropy, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.truncated_entropy), 0.0)
    other = sample(
        model, prompt, prompt_mask, h.key(5), max_new_tokens=T, temperature=0.0, eos_ids=()
    )
    np.testing.assert_array_equal(np.asarray(other.tokens), tokens)


def _chi_square_bound(df: int) -> float:
    """Upper 1e-4 quantile of chi-square(df) (Wilson-Hilferty, z = 3.719)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + 3.719 * math.sqrt(a)) ** 3


@pytest.mark.parametrize(
    "temperature, trunc",
    [(1.0, {}), (0.7, {}), (1.2, {"top_k": 12, "top_p": 0.9})],
    ids=["t1", "t0.7", "t1.2-topk-topp"],
)
def test_first_token_frequencies_match_model_distribution(model, h, temperature, trunc):
    """Many one-step draws of one prompt follow softmax(logits / temperature) (after truncation)."""
    draws = 4096
    prompt, prompt_mask = h.left_padded(2, b=1)
    grouped = repeat_for_groups(prompt, prompt_mask, h.key(7), group_size=draws)
    out = sample(model, grouped.tokens, grouped.mask, grouped.keys, max_new_tokens=1,
                 temperature=temperature, eos_ids=(), **trunc)  # fmt: skip
    logits = h.reference_logits(
        model, prompt, prompt_mask, np.zeros((1, 1), np.int32), np.ones((1, 1), bool)
    )[:, 0]
    keep = _allowed(logits, temperature, **trunc)[0]
    logits = logits[0]
    probs = np.exp(_log_softmax(np.where(keep, logits / temperature, -np.inf)))
    counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=h.VOCAB)
    assert counts[~keep].sum() == 0
    expected = draws * probs
    # Pool the rare outcomes into one bin so every bin expects >= 5 draws.
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < 5:
        obs, exp = obs[:-1], exp[:-1]
    chi2 = float(np.sum((obs - exp) ** 2 / exp))
    assert chi2 < _chi_square_bound(len(obs) - 1), (chi2, len(obs))


@pytest.mark.parametrize(
    "trunc",
    [{"top_k": 5}, {"top_p": 0.6}, {"min_p": 0.2}, {"top_k": 8, "top_p": 0.8, "min_p": 0.1}],
    ids=["top_k", "top_p", "min_p", "all"],
)
def test_truncation_never_emits_outside_the_allowed_set(model, h, trunc):
    temperature = 1.3
    prompt, prompt_mask = h.left_padded(3)
    out = sample(
        model,
        prompt,
        prompt_mask,
        h.key(3),
        max_new_tokens=T,
        temperature=temperature,
        eos_ids=(),
        **trunc,
    )
    tokens = np.asarray(out.tokens)
    logits = h.reference_logits(model, prompt, prompt_mask, tokens, np.asarray(out.mask))
    flat = logits.reshape(-1, h.VOCAB)
    keep = _allowed(flat, temperature, **trunc)
    assert keep[np.arange(flat.shape[0]), tokens.reshape(-1)].all()
    assert (keep.sum(-1) < h.VOCAB).all()  # the truncation actually cut something
    np.testing.assert_allclose(
        np.asarray(out.truncated_entropy).reshape(-1), _entropy(flat / temperature, keep), atol=1e-4
    )
    # logp and entropy stay those of the full temperature-scaled distribution.
    logp, entropy = h.reference_stats(model, prompt, prompt_mask, out, temperature)
    np.testing.assert_allclose(np.asarray(out.logp), logp, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.entropy), entropy, atol=1e-4)


def test_everything_after_eos_is_masked(model, h):
    prompt, prompt_mask = h.left_padded(4, b=8)
    eos = tuple(range(4, 40))  # a third of the vocabulary: rows end early
    t = 24
    out = sample(model, prompt, prompt_mask, h.key(4), max_new_tokens=t, eos_ids=eos, pad_id=0)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    lengths = np.asarray(out.lengths)
    assert (lengths < t).any()
    for b in range(8):
        is_eos = np.isin(tokens[b], eos) & mask[b]
        n = int(np.argmax(is_eos)) + 1 if is_eos.any() else t
        assert lengths[b] == n
        np.testing.assert_array_equal(mask[b], np.arange(t) < n)
        assert not np.isin(tokens[b, : n - 1], eos).any()
        assert (tokens[b, n:] == 0).all()
        for field in (out.logp, out.entropy, out.truncated_entropy):
            assert (np.asarray(field)[b, n:] == 0).all()
    logp, entropy = h.reference_stats(model, prompt, prompt_mask, out, 1.0)
    np.testing.assert_allclose(np.where(mask, out.logp, 0), np.where(mask, logp, 0), atol=1e-4)
    np.testing.assert_allclose(
        np.where(mask, out.entropy, 0), np.where(mask, entropy, 0), atol=1e-4
    )


def test_same_key_same_output_and_rows_are_independent(model, h):
    prompt, prompt_mask = h.left_padded(5)
    kw = dict(max_new_tokens=T, eos_ids=())
    a = sample(model, prompt, prompt_mask, h.key(11), **kw)
    b = sample(model, prompt, prompt_mask, h.key(11), **kw)
    c = sample(model, prompt, prompt_mask, h.key(12), **kw)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
    # Explicit row keys: row 2 alone draws what it drew inside the batch.
    row_keys = jax.random.split(h.key(11), 4)
    full = sample(model, prompt, prompt_mask, row_keys, **kw)
    alone = sample(model, prompt[2:3], prompt_mask[2:3], row_keys[2:3], **kw)
    np.testing.assert_array_equal(np.asarray(alone.tokens)[0], np.asarray(full.tokens)[2])


def test_second_call_with_same_shapes_does_not_recompile(model, h):
    kw = dict(max_new_tokens=T, top_p=0.9)
    prompt, prompt_mask = h.left_padded(6)
    sample(model, prompt, prompt_mask, h.key(0), temperature=0.9, eos_ids=(5, 6), **kw)
    before = compiled_cache_sizes()
    # New contents, a shorter prompt in the same length bucket, other traced options.
    prompt2, prompt_mask2 = h.left_padded(7, s=5)
    sample(model, prompt2, prompt_mask2, h.key(1), temperature=1.1, eos_ids=(7, 8, 9), **kw)
    sample(
        model,
        prompt2,
        prompt_mask2,
        h.key(2),
        temperature=1.1,
        eos_ids=(7, 8),
        **{**kw, "top_p": 0.5},
    )
    # New weights of the same architecture, given as an nnx.split pair (as a train state holds them).
    other = nnx.clone(model)
    other.lm_head.set_value(other.lm_head[...] * 1.5)
    pair = sample(
        nnx.split(other), prompt2, prompt_mask2, h.key(3), temperature=1.1, eos_ids=(7, 8), **kw
    )
    direct = sample(other, prompt2, prompt_mask2, h.key(3), temperature=1.1, eos_ids=(7, 8), **kw)
    np.testing.assert_array_equal(np.asarray(pair.tokens), np.asarray(direct.tokens))
    assert compiled_cache_sizes() == before


def _loop_kv_shapes(jaxpr):
    """The ``[rows, K, H, slots]`` keys each decode loop of ``jaxpr`` carries, per loop."""
    loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "while"]
    return [
        sorted({v.aval.shape for v in e.params["body_jaxpr"].jaxpr.invars if v.aval.ndim == 4})
        for e in loops
    ]


def test_shared_prefix_gives_the_unshared_outputs(model, h, monkeypatch):
    """group_size: each prompt is prefilled once, and its keys and values are
    stored and attended once for its G rows (a shared prefix)."""
    prompt, prompt_mask = h.left_padded(11, b=3)
    g = 4
    rows, row_mask = np.repeat(prompt, g, axis=0), np.repeat(prompt_mask, g, axis=0)
    kw = dict(max_new_tokens=T, temperature=1.0, eos_ids=(5,), top_p=0.9)
    seen = _decode_jaxprs(monkeypatch)
    shared = sample(model, rows, row_mask, h.key(4), group_size=g, **kw)
    unshared = sample(model, rows, row_mask, h.key(4), group_size=g, share_prefix=False, **kw)
    # The unshared loop carries W + T - 1 slots for each of the 12 rows (W:
    # the bucketed prompt width); the shared one the 3 prompts' W slots once
    # and each row's own T - 1.
    c = model.config
    shared_kv, unshared_kv = (set(_loop_kv_shapes(j)[0]) for j in seen)

    def kv(n, slots):
        return {(n, c.num_kv_heads, c.head_dim, slots), (n, c.num_kv_heads, slots, c.head_dim)}

    w = max(x[3] for x in unshared_kv) - (T - 1)
    assert w >= prompt.shape[1]
    assert unshared_kv == kv(12, w + T - 1)
    assert shared_kv == kv(3, w) | kv(12, T - 1)
    for other in (unshared,):
        np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(other.tokens))
        np.testing.assert_array_equal(np.asarray(shared.mask), np.asarray(other.mask))
        np.testing.assert_allclose(np.asarray(shared.logp), np.asarray(other.logp), atol=1e-5)
        np.testing.assert_allclose(np.asarray(shared.entropy), np.asarray(other.entropy), atol=1e-5)
    # Rows of a group differ (their keys differ): the sharing is of the prompt only.
    assert len({tuple(r) for r in np.asarray(shared.tokens)[:g]}) > 1
    # And the statistics are the model's own, as for unshared sampling.
    logp, _ = h.reference_stats(model, rows, row_mask, shared, 1.0)
    m = np.asarray(shared.mask)
    np.testing.assert_allclose(np.asarray(shared.logp)[m], logp[m], atol=2e-5)


def test_group_size_needs_groups_of_one_prompt(model, h):
    prompt, prompt_mask = h.left_padded(12, b=4)
    with pytest.raises(ValueError, match="rows of each group must hold the same prompt"):
        sample(model, prompt, prompt_mask, h.key(0), max_new_tokens=4, group_size=2)
    with pytest.raises(ValueError, match="not a multiple of group_size=3"):
        sample(model, prompt, prompt_mask, h.key(0), max_new_tokens=4, group_size=3)


def _decode_jaxprs(monkeypatch):
    """Records the jaxpr of every decode call ``sample`` makes (as traced, pre-XLA)."""
    from erpo_jax.sampling import _sampler

    seen = []
    original = _sampler._decode_jit

    def spy(graphdef, params, state, keys, stop_at, dyn, *, static):
        fn = lambda p, s: _sampler._decode(graphdef, p, s, keys, stop_at, dyn, static=static)
        seen.append(jax.make_jaxpr(fn)(params, state))
        return original(graphdef, params, state, keys, stop_at, dyn, static=static)

    monkeypatch.setattr(_sampler, "_decode_jit", spy)
    return seen


def test_decode_loop_hoists_layer_slices_and_rope_out_of_the_loop(model, h, monkeypatch):
    """The decode ``while_loop`` body gets per-layer weights and a RoPE table from outside.

    XLA does not hoist these out of a ``while_loop`` itself: a body that
    slices the stacked ``[L, ...]`` parameters copies every weight at every
    step, and one that computes ``cos``/``sin`` recomputes them per use
    (together about 2.5 of 19 ms per step of the tiny Qwen3 rollout,
    measured on the 2-core Xeon).
    """
    seen = _decode_jaxprs(monkeypatch)
    prompt, prompt_mask = h.left_padded(0)
    sample(model, prompt, prompt_mask, h.key(0), max_new_tokens=T, eos_ids=())
    assert len(seen) == 1
    loops = [e for e in seen[0].jaxpr.eqns if e.primitive.name == "while"]
    assert len(loops) == 1
    body = loops[0].params["body_jaxpr"].jaxpr
    num_layers = model.config.num_layers
    stacked = {tuple(a.shape) for a in model.layers.arrays().values()}
    assert all(s[0] == num_layers for s in stacked)
    body_inputs = {tuple(v.aval.shape) for v in body.invars}
    assert not body_inputs & stacked, "the loop body receives stacked [L, ...] parameters"
    assert not {e.primitive.name for e in equations(body)} & {"cos", "sin"}, (
        "the loop body computes RoPE angles"
    )


def test_decode_phases_give_the_same_samples_on_a_growing_cache(model, h, monkeypatch):
    """decode_phases=3: three loops, each over a cache of the slots its steps can
    fill; the samples equal one loop's (EOS ending rows early, shared prefill)."""
    prompt, prompt_mask = h.left_padded(13, b=3)  # 7 prompt slots (bucketed to 8)
    g = 2
    rows, row_mask = np.repeat(prompt, g, axis=0), np.repeat(prompt_mask, g, axis=0)
    t = 13
    kw = dict(max_new_tokens=t, temperature=1.0, eos_ids=(5, 6, 7), group_size=g)
    seen = _decode_jaxprs(monkeypatch)
    one = sample(model, rows, row_mask, h.key(5), **kw)
    three = sample(model, rows, row_mask, h.key(5), decode_phases=3, **kw)
    np.testing.assert_array_equal(np.asarray(three.tokens), np.asarray(one.tokens))
    np.testing.assert_array_equal(np.asarray(three.mask), np.asarray(one.mask))
    np.testing.assert_allclose(np.asarray(three.logp), np.asarray(one.logp), atol=1e-6)
    np.testing.assert_allclose(np.asarray(three.entropy), np.asarray(one.entropy), atol=1e-6)
    logp, _ = h.reference_stats(model, rows, row_mask, three, 1.0)
    m = np.asarray(three.mask)
    np.testing.assert_allclose(np.asarray(three.logp)[m], logp[m], atol=2e-5)

    # Prompt width S = 8, C = S + T - 1 = 20 slots. Steps 1..12 in three
    # parts end before steps 5, 9 and 13: caches of S + end - 1 slots, of
    # which the S prompt slots are the 3 prompts' shared prefix, and each of
    # the 6 rows has its own end - 1.
    def own_slots(jaxpr):  # per loop: the rows' own key slots; the prefix's slots
        return [
            ({x[3] for x in shapes if x[0] == 6 and x[2] == hd},
             {x[3] for x in shapes if x[0] == 3 and x[2] == hd})
            for shapes in _loop_kv_shapes(jaxpr)
        ]  # fmt: skip

    hd = model.config.head_dim
    first, phased = seen
    assert own_slots(first) == [({12}, {8})]
    assert own_slots(phased) == [({4}, {8}), ({8}, {8}), ({12}, {8})]


def test_decode_phases_auto_rule():
    """None: 8 phases on CPU from 128 new tokens, else one loop; an int is kept and checked."""
    from erpo_jax.sampling import resolve_decode_phases

    assert resolve_decode_phases(None, 128, "cpu") == 8
    assert resolve_decode_phases(None, 4096, "cpu") == 8
    assert resolve_decode_phases(None, 127, "cpu") == 1
    for accelerator in ("gpu", "tpu"):
        assert resolve_decode_phases(None, 4096, accelerator) == 1
    assert resolve_decode_phases(3, 4096, "gpu") == 3
    assert resolve_decode_phases(1, 4096, "cpu") == 1
    for bad in (0, -2, True, 2.0, "auto"):
        with pytest.raises(
            ValueError, match=r"decode_phases must be None \(auto\) or a positive int"
        ):
            resolve_decode_phases(bad, 128, "cpu")


def test_sample_defaults_to_the_auto_decode_phases(model, h, monkeypatch):
    """sample() without decode_phases runs 8 loops at 128 new tokens on CPU and
    one at 127 (the loops' count read from the decode program's jaxpr)."""
    assert jax.default_backend() == "cpu"
    seen = _decode_jaxprs(monkeypatch)
    prompt, prompt_mask = h.left_padded(3, b=2)
    for t in (127, 128):
        sample(model, prompt, prompt_mask, h.key(0), max_new_tokens=t, eos_ids=())
    loops = [[e for e in j.jaxpr.eqns if e.primitive.name == "while"] for j in seen]
    assert [len(x) for x in loops] == [1, 8]


def test_decode_phases_are_checked(model, h):
    prompt, prompt_mask = h.left_padded(14)
    for bad in (0, True, 2.0):
        with pytest.raises(
            ValueError, match=r"decode_phases must be None \(auto\) or a positive int"
        ):
            sample(model, prompt, prompt_mask, h.key(0), max_new_tokens=4, decode_phases=bad)
    # More parts than decode steps: one step each.
    out = sample(model, prompt, prompt_mask, h.key(0), max_new_tokens=3, decode_phases=50)
    ref = sample(model, prompt, prompt_mask, h.key(0), max_new_tokens=3)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
