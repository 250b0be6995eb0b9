"""Every loss against the naive NumPy reference of METHOD.md (tests/reference.py).

Random NumPy inputs over a grid of P, G (including 2), T (including 1) and
masks (full, ragged, all-masked rows, interior holes), and every mode and
keyword of each function. Padding holds NaN and inf throughout, so the
comparisons also prove that masked values never leak.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
import reference as ref
from conftest import MASK_KINDS, make_batch

from erpo_jax import losses as L

SHAPES = [(1, 2, 1), (2, 2, 5), (3, 4, 9), (2, 8, 17)]
# The default run checks every mask kind once, on a spread of shapes (a
# one-token row, an odd length, a wide group); ``-m slow`` runs every
# (shape, mask) pair.
_DEFAULT_CELLS = {
    ((1, 2, 1), "full"),
    ((2, 2, 5), "empty_rows"),
    ((3, 4, 9), "ragged"),
    ((2, 8, 17), "holes"),
}
GRID = [
    pytest.param(
        shape,
        kind,
        id=f"P{shape[0]}G{shape[1]}T{shape[2]}-{kind}",
        marks=() if (shape, kind) in _DEFAULT_CELLS else pytest.mark.slow,
    )
    for shape, kind in itertools.product(SHAPES, MASK_KINDS)
]
POLICY_KW = [
    {},
    {"clip_eps": 0.1, "clip_eps_high": 0.28},
    {"clip_c": 3.0, "kl_coef": 0.05, "kl_estimator": "k1"},
    {"kl_coef": 0.1, "kl_estimator": "k2"},
    {"kl_coef": 0.04, "kl_estimator": "k3", "clip_eps_high": 0.3, "clip_c": 2.0},
]


def _close(actual, expected, tol):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize(("shape", "kind"), GRID)
def test_policy_and_grpo_losses(shape, kind):
    p, g, t = shape
    x = make_batch(11, p, g, t, kind, nan_pad=True)
    for agg, kw in itertools.product(L.AGG_MODES, POLICY_KW):
        kw = dict(kw, agg=agg)
        if agg == "seq_mean_token_sum_norm":
            kw["max_len"] = t + 3
        ref_kw = dict(kw, ref_logp=x["ref_logp"] if "kl_coef" in kw else None)
        got, _ = L.policy_loss(x["logp"], x["old_logp"], x["adv_tok"], x["mask"], **ref_kw)
        want = ref.ref_policy_loss(x["logp"], x["old_logp"], x["adv_tok"], x["mask"], **ref_kw)
        _close(got, want, 1e-5)
        for normalize_std in (True, False):
            got, _ = L.grpo_loss(
                x["logp"],
                x["old_logp"],
                x["rewards"],
                x["mask"],
                normalize_std=normalize_std,
                **ref_kw,
            )
            want = ref.ref_grpo_loss(
                x["logp"],
                x["old_logp"],
                x["rewards"],
                x["mask"],
                normalize_std=normalize_std,
                **ref_kw,
            )
            _close(got, want, 1e-5)


@pytest.mark.parametrize(("shape", "kind"), GRID)
def test_token_losses_elementwise(shape, kind):
    p, g, t = shape
    x = make_batch(12, p, g, t, kind, nan_pad=True)
    for kw in POLICY_KW:
        ref_kw = dict(kw, ref_logp=x["ref_logp"] if "kl_coef" in kw else None)
        got, _ = L.policy_token_loss(x["logp"], x["old_logp"], x["adv_tok"], x["mask"], **ref_kw)
        want = ref.ref_token_pg(x["logp"], x["old_logp"], x["adv_tok"], x["mask"], **ref_kw)
        _close(got, want, 1e-5)


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("g", [2, 3, 8])
def test_group_advantages(g, ddof):
    rng = np.random.default_rng(g)
    rewards = rng.normal(size=(5, g)).astype(np.float32)
    rewards[0] = 0.7  # an all-equal group must give exactly 0
    rewards[1, :] = rng.integers(0, 2, g)
    for normalize_std in (True, False):
        got = L.group_advantages(rewards, normalize_std=normalize_std, ddof=ddof)
        want = ref.ref_group_advantages(rewards, normalize_std=normalize_std, ddof=ddof)
        _close(got, want, 1e-5)
        assert np.all(np.asarray(got)[0] == 0.0)


@pytest.mark.parametrize(("shape", "kind"), GRID)
def test_erpo_components(shape, kind):
    p, g, t = shape
    x = make_batch(13, p, g, t, kind, nan_pad=True)
    for gamma in (1.0, 5.0):
        got = L.entropy_gate(x["entropy"], x["mask"], group_size=g, gamma=gamma)
        _close(got, ref.ref_entropy_gate(x["entropy"], x["mask"], g, gamma=gamma), 1e-5)
    for k in (1, 3, 10):
        got = L.bucket_normalize(x["ref_logp"], x["mask"], group_size=g, num_buckets=k)
        want = ref.ref_bucket_normalize(x["ref_logp"], x["mask"], g, num_buckets=k)
        _close(got, want, 1e-4)


@pytest.mark.parametrize(("shape", "kind"), GRID)
def test_erpo_token_advantages_and_loss(shape, kind):
    p, g, t = shape
    x = make_batch(14, p, g, t, kind, nan_pad=True)
    settings = [
        {"gate_mode": mode, "eta": eta, "num_buckets": k, "gamma": gamma, "beta": beta}
        for mode, eta, k, gamma, beta in [
            ("redistribute", 0.2, 10, 5.0, 0.1),
            ("redistribute", 0.0, 10, 5.0, 0.1),
            ("amplify", 0.5, 3, 2.0, 1.0),
            ("none", 0.2, 4, 5.0, 0.1),
            ("none", 0.0, 10, 5.0, 0.1),
        ]
    ] + [
        {"psi_gate": False},
        {"progress_std_floor": 0.03, "num_buckets": 3},
        {"progress_source": "current", "gate_mode": "amplify"},
    ]
    for i, kw in enumerate(settings):
        # normalize_std=False only changes A_b: checked on the first two settings.
        for normalize_std in (True, False) if i < 2 else (True,):
            kw = dict(kw, normalize_std=normalize_std)
            got = L.erpo_token_advantages(
                x["rewards"],
                x["entropy"],
                x["mask"],
                old_logp=x["old_logp"],
                ref_logp=x["ref_logp"],
                logp=x["logp"],
                **kw,
            )
            want = ref.ref_erpo_token_advantages(
                x["rewards"],
                x["entropy"],
                x["mask"],
                old_logp=x["old_logp"],
                ref_logp=x["ref_logp"],
                logp=x["logp"],
                **kw,
            )
            _close(got, want, 1e-4)
    # Every aggregation with the default clip, then the clip/KL variants once
    # (the clip and KL terms are policy_loss's, checked in full above).
    loss_cases = [(agg, POLICY_KW[0]) for agg in L.AGG_MODES]
    loss_cases += [("token_mean", pkw) for pkw in POLICY_KW[1:3]]
    for agg, pkw in loss_cases:
        got, _ = L.erpo_loss(
            x["logp"], x["old_logp"], x["rewards"], x["entropy"], x["mask"],
            ref_logp=x["ref_logp"], agg=agg, **pkw,
        )  # fmt: skip
        want = ref.ref_erpo_loss(
            x["logp"], x["old_logp"], x["rewards"], x["entropy"], x["mask"],
            ref_logp=x["ref_logp"], agg=agg, **pkw,
        )  # fmt: skip
        _close(got, want, 1e-4)


# Ill-conditioned ERPO inputs (issue 8): each kind stresses one numerical rule
# of METHOD.md section 2. Progress values are built so that old_logp - ref_logp
# is exact in float32 (the two sit in one binade), so the reference and the
# code see the same drift and the comparison measures the statistics alone.
ILL_KINDS = ("tight_buckets", "gate_underflow", "extreme", "near_constant")


def make_ill_batch(seed, p, g, t, mask_kind, ill):
    """A ``make_batch`` batch made ill-conditioned, and the ERPO keywords it needs."""
    x = make_batch(seed, p, g, t, mask_kind, nan_pad=True)
    rng = np.random.default_rng(seed + 1000)
    m = x["mask"]
    b = p * g
    kw = {}
    if ill == "tight_buckets":
        # Odd buckets hold drifts 14 +- 1e-2, even ones 0 +- 1: tight sets far
        # from the group mean. ref = -4 and old = ref + d in [8, 16): exact.
        pos = np.cumsum(m, axis=1) - 1
        k = (10 * pos) // np.maximum(m.sum(axis=1, keepdims=True), 1)
        d = np.where(k % 2 == 1, 14.0 + 1e-2 * rng.normal(size=(b, t)), rng.normal(size=(b, t)))
        ref_logp = np.full((b, t), -4.0)
        x["ref_logp"] = np.where(m, ref_logp, x["ref_logp"]).astype(np.float32)
        x["old_logp"] = np.where(m, ref_logp + d, x["old_logp"]).astype(np.float32)
        kw = {"beta": 1.0}
    elif ill == "gate_underflow":
        # Near-constant entropies with a 0-nat first token in every third row:
        # at gamma = 100 those gates underflow (and whole short rows do).
        h = 3.0 + 0.05 * rng.normal(size=(b, t))
        first = np.argmax(m, axis=1)
        for row in range(0, b, 3):
            h[row, first[row]] = 0.0
        x["entropy"] = np.where(m, h, x["entropy"]).astype(np.float32)
        kw = {"gamma": 100.0}
    elif ill == "extreme":
        valid = np.argwhere(m)
        picks = valid[rng.permutation(len(valid))[:4]]
        values = [
            ("ref_logp", -np.inf),
            ("old_logp", 1e30),
            ("entropy", np.inf),
            ("ref_logp", 1e30),
        ]
        for (row, col), (name, value) in zip(picks, values, strict=False):
            x[name][row, col] = value
    else:  # near_constant: entropy 2.5 +- 1e-5 (~40 ulps), drift 0.3 +- 1e-5 (exact)
        x["entropy"] = np.where(m, 2.5 + 1e-5 * rng.normal(size=(b, t)), x["entropy"]).astype(
            np.float32
        )
        x["ref_logp"] = np.where(m, -1.0, x["ref_logp"]).astype(np.float32)
        d = 0.3 + 1e-5 * rng.normal(size=(b, t))
        x["old_logp"] = np.where(m, -1.0 + d, x["old_logp"]).astype(np.float32)
        kw = {"beta": 1.0}
    return x, kw


@pytest.mark.parametrize("ill", ILL_KINDS)
@pytest.mark.parametrize(("shape", "kind"), GRID[len(MASK_KINDS) :])  # T >= 5
def test_erpo_on_ill_conditioned_inputs(shape, kind, ill):
    p, g, t = shape
    x, kw = make_ill_batch(18, p, g, t, kind, ill)
    args = (x["rewards"], x["entropy"], x["mask"])
    logps = {"old_logp": x["old_logp"], "ref_logp": x["ref_logp"]}
    for extra in ({}, {"gate_mode": "amplify", "psi_gate": False, "num_buckets": 3}):
        got = L.erpo_token_terms(*args, **logps, **kw, **extra)
        want = ref.ref_erpo_token_terms(*args, **logps, **kw, **extra)
        for field in L.ErpoTerms._fields:
            value = np.asarray(getattr(got, field))
            assert np.all(np.isfinite(value)), field
            _close(value, want[field], 1e-4)
    got, aux = L.erpo_loss(x["logp"], x["old_logp"], *args, ref_logp=x["ref_logp"], **kw)
    want = ref.ref_erpo_loss(x["logp"], x["old_logp"], *args, ref_logp=x["ref_logp"], **kw)
    _close(got, want, 1e-4)
    assert all(np.isfinite(float(a)) for a in aux)


@pytest.mark.parametrize(("shape", "kind"), GRID)
def test_holder_loss(shape, kind):
    p, g, t = shape
    x = make_batch(15, p, g, t, kind, nan_pad=True)
    for pw, level, eps in itertools.product(
        (2.0, 1.0, 0.5, 1e-4, 0.0, -0.5, -2.0), L.CLIP_LEVELS, (0.2, 0.05)
    ):
        got, _ = L.holder_loss(
            x["logp"], x["old_logp"], x["adv_seq"], x["mask"], p=pw, clip_eps=eps, clip_level=level
        )
        want = ref.ref_holder_loss(
            x["logp"], x["old_logp"], x["adv_seq"], x["mask"], pw, clip_eps=eps, clip_level=level
        )
        _close(got, want, 1e-4)
    for pw, level in itertools.product((1.5, 0.0, -1.0), L.CLIP_LEVELS):
        kw = {"clip_eps": 0.1, "clip_eps_high": 0.25, "clip_level": level, "denominator": 7.0}
        got, _ = L.holder_loss(x["logp"], x["old_logp"], x["adv_seq"], x["mask"], p=pw, **kw)
        want = ref.ref_holder_loss(x["logp"], x["old_logp"], x["adv_seq"], x["mask"], pw, **kw)
        _close(got, want, 1e-4)
    for kw in ({"clip_eps": 0.01}, {"clip_eps": 0.01, "clip_eps_high": 0.03}, {}):
        got, _ = L.gspo_loss(x["logp"], x["old_logp"], x["adv_seq"], x["mask"], **kw)
        kw = {"clip_eps": 3e-4, "clip_eps_high": 4e-4, **kw}  # GSPO's defaults
        want = ref.ref_holder_loss(x["logp"], x["old_logp"], x["adv_seq"], x["mask"], 0.0, **kw)
        _close(got, want, 1e-4)


@pytest.mark.parametrize(("shape", "kind"), GRID)
def test_entropy_mask_and_arca(shape, kind):
    p, g, t = shape
    x = make_batch(16, p, g, t, kind, nan_pad=True)
    for frac in (0.2, 0.5, 1.0, 0.37):
        got = np.asarray(L.high_entropy_mask(x["entropy"], x["mask"], top_fraction=frac))
        want = ref.ref_high_entropy_mask(x["entropy"], x["mask"], top_fraction=frac)
        np.testing.assert_array_equal(got, want)
    for power in (1.0, 2.0, 4.0):
        got = L.arca_token_weights(x["residual_norm"], x["mask"], power=power)
        _close(got, ref.ref_arca_token_weights(x["residual_norm"], x["mask"], power=power), 1e-5)
        got = L.arca_token_advantages(x["adv_seq"], x["residual_norm"], x["mask"], power=power)
        want = ref.ref_arca_token_advantages(
            x["adv_seq"], x["residual_norm"], x["mask"], power=power
        )
        _close(got, want, 1e-4)


@pytest.mark.parametrize("agg", L.AGG_MODES)
def test_jit_equals_eager(agg):
    x = make_batch(17, 3, 4, 9, "ragged", nan_pad=True)
    kw = {"agg": agg, "clip_eps_high": 0.28, "kl_coef": 0.05}

    def fn(logp, old_logp, rewards, entropy, mask, ref_logp):
        return L.erpo_loss(logp, old_logp, rewards, entropy, mask, ref_logp=ref_logp, **kw)

    args = (x["logp"], x["old_logp"], x["rewards"], x["entropy"], x["mask"], x["ref_logp"])
    eager, eager_aux = fn(*args)
    jitted, jitted_aux = jax.jit(fn)(*args)
    # XLA fuses and reorders float32 sums under jit: equal to rounding, not bitwise.
    _close(jitted, float(eager), 1e-5)
    for a, b in zip(eager_aux, jitted_aux, strict=True):
        _close(b, float(a), 1e-5)
    want = ref.ref_erpo_loss(*args[:5], ref_logp=x["ref_logp"], **kw)
    _close(jitted, want, 1e-4)
