"""Small cases whose expected values are written as arithmetic from METHOD.md."""

from __future__ import annotations

import math

import numpy as np
import pytest

from erpo_jax import losses as L


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_group_advantages_by_hand():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]], np.float32)
    std = math.sqrt(4 * 0.25 / 3)  # sample std of {1, 0, 0, 1}
    a = 0.5 / (std + 1e-6)
    np.testing.assert_allclose(L.group_advantages(rewards)[0], [a, -a, -a, a], rtol=1e-6)
    np.testing.assert_array_equal(L.group_advantages(rewards)[1], 0.0)
    np.testing.assert_allclose(
        L.group_advantages(rewards, normalize_std=False)[0], [0.5, -0.5, -0.5, 0.5]
    )
    pop = L.group_advantages(rewards, ddof=0)[0]
    np.testing.assert_allclose(
        pop, [0.5 / (0.5 + 1e-6)] * 1 + [-0.5 / (0.5 + 1e-6)] * 2 + [1.0], rtol=1e-5
    )


@pytest.mark.parametrize(
    ("log_ratio", "adv", "kw", "expected"),
    [
        (0.0, 1.0, {}, -1.0),  # ratio 1: pg = -A
        (0.5, 1.0, {}, -1.2),  # upper clip binds: -A * (1 + 0.2)
        (0.5, 1.0, {"clip_eps_high": 0.8}, -math.exp(0.5)),  # clip-higher leaves it
        (-1.0, -1.0, {}, 0.8),  # lower clip binds for A < 0: max(e^-1, 0.8)
        (2.0, -1.0, {}, math.exp(2.0)),  # A < 0, ratio large: unclipped term wins
        (2.0, -1.0, {"clip_c": 3.0}, 3.0),  # dual clip caps it at -c * A
        (-0.5, 2.0, {}, -2.0 * math.exp(-0.5)),  # A > 0, ratio small: unclipped
    ],
)
def test_clipped_surrogate_by_hand(log_ratio, adv, kw, expected):
    logp = np.array([[log_ratio - 1.0]], np.float32)
    old = np.array([[-1.0]], np.float32)
    loss, _ = L.policy_loss(logp, old, np.array([[adv]], np.float32), np.ones((1, 1), bool), **kw)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_kl_estimators_by_hand():
    logp, ref = np.float32(-1.0), np.float32(-2.0)  # d = ref - logp = -1
    assert float(L.kl_penalty(logp, ref, estimator="k1")) == pytest.approx(1.0)
    assert float(L.kl_penalty(logp, ref, estimator="k2")) == pytest.approx(0.5)
    assert float(L.kl_penalty(logp, ref, estimator="k3")) == pytest.approx(math.exp(-1.0), rel=1e-6)


def test_aggregation_by_hand():
    tok = np.array([[1.0, 2.0, np.nan], [3.0, np.inf, -np.inf]], np.float32)
    mask = np.array([[True, True, False], [True, False, False]])
    expected = {
        "token_mean": 6 / 3,
        "seq_mean_token_mean": (3 / 2 + 3 / 1) / 2,
        "seq_mean_token_sum": 6 / 2,
        "seq_mean_token_sum_norm": 6 / (2 * 4),
    }
    for agg, value in expected.items():
        got = L.aggregate(tok, mask, agg=agg, max_len=4)
        assert float(got) == pytest.approx(value), agg
    num, den = L.aggregate_parts(tok, mask, agg="token_mean")
    assert (float(num), float(den)) == (6.0, 3.0)


def test_entropy_gate_and_redistribution_by_hand():
    entropy = np.array([[2.0, 0.0], [0.0, 0.0]], np.float32)
    mask = np.ones((2, 2), bool)
    std = math.sqrt(0.75)  # population std of {2, 0, 0, 0}, mean 0.5
    w_hi, w_lo = _sigmoid(5.0 * 1.5 / std), _sigmoid(5.0 * -0.5 / std)
    gate = L.entropy_gate(entropy, mask, group_size=2)
    np.testing.assert_allclose(gate, [[w_hi, w_lo], [w_lo, w_lo]], rtol=1e-5)
    rewards = np.array([[1.0, 0.0]], np.float32)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    adv = L.erpo_token_advantages(rewards, entropy, mask, eta=0.0)
    row0 = [a * 2 * w_hi / (w_hi + w_lo), a * 2 * w_lo / (w_hi + w_lo)]
    np.testing.assert_allclose(adv, [row0, [-a, -a]], rtol=1e-5)
    amp = L.erpo_token_advantages(rewards, entropy, mask, eta=0.0, gate_mode="amplify")
    np.testing.assert_allclose(amp[0], [a * (1 + w_hi), a * (1 + w_lo)], rtol=1e-5)


def test_bucket_ids_by_hand():
    mask = np.zeros((3, 6), bool)
    mask[0, :5] = True  # n = 5, K = 2: floor(2 * pos / 5) = 0, 0, 0, 1, 1
    mask[1, :3] = True  # n = 3
    mask[2, [0, 2, 5]] = True  # holes: ranks 0, 1, 2 at t = 0, 2, 5
    k2 = np.asarray(L.bucket_ids(mask, num_buckets=2))
    np.testing.assert_array_equal(k2[0], [0, 0, 0, 1, 1, 2])
    np.testing.assert_array_equal(k2[2], [0, 2, 0, 2, 2, 1])
    k10 = np.asarray(L.bucket_ids(mask, num_buckets=10))
    np.testing.assert_array_equal(k10[1, :3], [0, 3, 6])


def test_bucket_normalize_and_psi_by_hand():
    # One group of two rows with two tokens each, K = 2: each bucket holds one
    # token of each row, so s_hat = +-1 (up to eps) wherever the two differ.
    signal = np.array([[1.0, 5.0], [3.0, 5.0]], np.float32)
    mask = np.ones((2, 2), bool)
    s_hat = L.bucket_normalize(signal, mask, group_size=2, num_buckets=2)
    np.testing.assert_allclose(s_hat, [[-1.0, 0.0], [1.0, 0.0]], atol=1e-5)
    gate = np.full((2, 2), 0.5, np.float32)
    adv = L.result_anchored_synthesis(
        np.array([1.0, -1.0], np.float32), gate, s_hat, mask, eta=0.2, gate_mode="none"
    )
    # A * 1 + eta * W * sign(A) * s_hat
    np.testing.assert_allclose(adv, [[1.0 - 0.1, 1.0], [-1.0 - 0.1, -1.0]], atol=1e-5)


@pytest.mark.parametrize(
    ("p", "rho"),
    [
        (1.0, math.cosh(0.1)),
        (0.0, 1.0),
        (2.0, math.sqrt(math.cosh(0.2))),
        (-1.0, 1 / math.cosh(0.1)),
    ],
)
def test_holder_power_mean_by_hand(p, rho):
    logp = np.array([[0.1, -0.1]], np.float32)
    old = np.zeros((1, 2), np.float32)
    loss, aux = L.holder_loss(logp, old, np.array([1.0], np.float32), np.ones((1, 2), bool), p=p)
    assert float(loss) == pytest.approx(-rho, rel=1e-6)
    assert float(aux.rho_mean) == pytest.approx(rho, rel=1e-6)


def test_holder_sequence_clip_by_hand():
    logp = np.array([[0.5, 0.5]], np.float32)  # geometric mean ratio e^0.5 > 1.2
    old = np.zeros((1, 2), np.float32)
    loss, aux = L.holder_loss(logp, old, np.array([1.0], np.float32), np.ones((1, 2), bool), p=0.0)
    assert float(loss) == pytest.approx(-1.2, rel=1e-6)
    assert float(aux.clip_frac) == 1.0


@pytest.mark.parametrize(
    ("log_ratio", "adv", "expected"),
    [
        (1e-3, 1.0, -(1.0 + 4e-4)),  # rho = e^1e-3 > 1 + 4e-4: the right clip binds
        (-1e-3, -1.0, 1.0 - 3e-4),  # rho < 1 - 3e-4 with A < 0: the left clip binds
        (2e-4, 1.0, None),  # inside [1 - 3e-4, 1 + 4e-4]: -rho
        (-1e-3, 1.0, None),  # A > 0 and rho low: the min keeps the unclipped -rho
    ],
)
def test_gspo_default_clip_is_the_papers_asymmetric_range(log_ratio, adv, expected):
    # GSPO (arXiv 2507.18071, section 5.1): left and right clip ranges 3e-4, 4e-4.
    logp = np.full((1, 3), -1.0 + log_ratio, np.float32)
    old = np.full((1, 3), -1.0, np.float32)
    if expected is None:  # the unclipped sequence ratio, from the float32 log-ratio
        expected = -math.exp(float(logp[0, 0]) - float(old[0, 0])) * adv
    loss, _ = L.gspo_loss(logp, old, np.array([adv], np.float32), np.ones((1, 3), bool))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_high_entropy_mask_by_hand():
    entropy = np.arange(1, 11, dtype=np.float32).reshape(2, 5)
    mask = np.ones((2, 5), bool)
    # 0.8-quantile of 1..10 with the linear rule: 8 + 0.2 * (9 - 8) = 8.2.
    keep = np.asarray(L.high_entropy_mask(entropy, mask, top_fraction=0.2))
    np.testing.assert_array_equal(keep, entropy >= 8.2)
    mask[1, 3:] = False  # now valid: 1..8; 0.8-quantile = 6 + 0.6 * 1 = 6.6
    keep = np.asarray(L.high_entropy_mask(entropy, mask, top_fraction=0.2))
    np.testing.assert_array_equal(keep, mask & (entropy >= 6.6))
    assert not np.asarray(L.high_entropy_mask(entropy, np.zeros((2, 5), bool))).any()


def test_arca_by_hand():
    alpha = np.array([[1.0, 3.0, np.nan]], np.float32)
    mask = np.array([[True, True, False]])
    w = L.arca_token_weights(alpha, mask, eps=0.0)
    np.testing.assert_allclose(w, [[0.1, 0.9, 0.0]], rtol=1e-6)
    adv = L.arca_token_advantages(np.array([2.0], np.float32), alpha, mask, eps=0.0)
    np.testing.assert_allclose(adv, [[0.4, 3.6, 0.0]], rtol=1e-6)
