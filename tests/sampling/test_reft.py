"""REFT first-token diversification (METHOD.md section 3) and the group helper."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from erpo_jax.sampling import reft_first_tokens, repeat_for_groups, sample

P, G, K, N, T = 3, 8, 4, 20, 6


def _prompts(h):
    prompt, prompt_mask = h.left_padded(10, b=P)
    return repeat_for_groups(prompt, prompt_mask, h.key(10), group_size=G), prompt, prompt_mask


def test_repeat_for_groups_is_prompt_major_with_one_key_per_row(h):
    grouped, prompt, prompt_mask = _prompts(h)
    assert grouped.tokens.shape == (P * G, prompt.shape[1]) and grouped.keys.shape == (P * G,)
    for b in range(P * G):
        np.testing.assert_array_equal(np.asarray(grouped.tokens)[b], prompt[b // G])
        np.testing.assert_array_equal(np.asarray(grouped.mask)[b], prompt_mask[b // G])
    key_data = np.asarray(jax.random.key_data(grouped.keys))
    assert len({tuple(k) for k in key_data}) == P * G


@pytest.mark.parametrize("marker", [(), (40, 41)], ids=["no-marker", "marker"])
def test_reft_openers(model, h, marker):
    grouped = _prompts(h)[0]
    out = sample(model, grouped.tokens, grouped.mask, grouped.keys, max_new_tokens=T, eos_ids=(),
                 first_token="reft", group_size=G, reft_top_n=N, reft_k=K, reft_marker=marker)  # fmt: skip
    tokens = np.asarray(out.tokens)
    m = len(marker)
    if m:
        np.testing.assert_array_equal(tokens[:, :m], np.broadcast_to(marker, (P * G, m)))
    openers = tokens[:, m].reshape(P, G)
    # The policy's top-N first tokens (after the marker), from the full forward pass.
    rows = np.arange(0, P * G, G)
    logits = h.reference_logits(model, np.asarray(grouped.tokens)[rows], np.asarray(grouped.mask)[rows],
                                tokens[rows], np.ones((P, T), bool))[:, m]  # fmt: skip
    top_n = np.argsort(-logits, axis=-1)[:, :N]
    for p in range(P):
        values, counts = np.unique(openers[p], return_counts=True)
        assert len(values) == K and (counts == G // K).all()
        assert np.isin(values, top_n[p]).all()
        # G/K consecutive rows per opener.
        assert (openers[p].reshape(K, G // K) == openers[p].reshape(K, G // K)[:, :1]).all()
    # The forced tokens carry the policy's true statistics.
    logp, entropy = h.reference_stats(
        model, np.asarray(grouped.tokens), np.asarray(grouped.mask), out, 1.0
    )
    np.testing.assert_allclose(np.asarray(out.logp), logp, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.entropy), entropy, atol=1e-4)
    assert np.asarray(out.mask).all()


def test_reft_first_tokens_pure_function(h):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 50)).astype(np.float32)
    keys = jax.random.split(h.key(0), 5)
    first = np.asarray(reft_first_tokens(logits, keys, group_size=6, top_n=4, k=3)).reshape(5, 6)
    top = np.argsort(-logits, -1)[:, :4]
    for p in range(5):
        values, counts = np.unique(first[p], return_counts=True)
        assert len(values) == 3 and (counts == 2).all() and np.isin(values, top[p]).all()
    # The choice is random: over 5 prompts, the chosen ranks are not all the same.
    ranks = {tuple(sorted(np.flatnonzero(np.isin(top[p], first[p])))) for p in range(5)}
    assert len(ranks) > 1
    with pytest.raises(ValueError, match="reft_k"):
        reft_first_tokens(logits, keys, group_size=6, top_n=4, k=4)
    with pytest.raises(ValueError, match="reft_top_n"):
        reft_first_tokens(logits, keys, group_size=6, top_n=51, k=3)


def test_reft_group_size_not_multiple_of_k_is_an_error(model, h):
    grouped, _, _ = _prompts(h)
    with pytest.raises(ValueError, match="group_size"):
        sample(model, grouped.tokens, grouped.mask, grouped.keys, max_new_tokens=T,
               first_token="reft", group_size=G, reft_k=3)  # fmt: skip


def test_reft_needs_identical_prompts_within_a_group(model, h):
    grouped = _prompts(h)[0]
    tokens = np.asarray(grouped.tokens).copy()
    tokens[1, -1] = (tokens[1, -1] + 1) % h.VOCAB
    with pytest.raises(ValueError, match="same prompt"):
        sample(model, tokens, grouped.mask, grouped.keys, max_new_tokens=T,
               first_token="reft", group_size=G, reft_k=K)  # fmt: skip
