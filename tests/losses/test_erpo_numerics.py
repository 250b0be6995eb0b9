"""ERPO on ill-conditioned inputs: METHOD.md section 2's numerical contract.

One test per problem of issue 8, each of which failed before the fix:

1. bucket moments of tight sets far from the group mean (one-pass variance);
2. redistribution of a row whose gates all underflow (omega was 0);
3. one non-finite or extreme value on a valid token (NaN spread to its group);

and the keywords, the per-token terms and the diagnostics added with them.
Expected values come from tests/reference.py (float64 loops written from
METHOD.md) or from arithmetic written in the test.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from conftest import make_batch

from erpo_jax import losses as L


def _close(actual, expected, tol=1e-4):
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol)


def _finite(tree):
    for leaf in jax.tree_util.tree_leaves(tree):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64))), leaf


# --------------------------------------------------------------- 1. tight buckets


def _tight_bucket_batch(seed=0, p=2, g=8, t=40, k=10):
    """Progress values 10 +- 1e-2 in one bucket beside 0 +- 1 in the others."""
    rng = np.random.default_rng(seed)
    mask = np.ones((p * g, t), bool)
    s = rng.normal(0.0, 1.0, (p * g, t))
    last = t - t // k  # bucket K-1 of full rows: ranks >= 9t/10
    s[:, last:] = 10.0 + 1e-2 * rng.normal(size=(p * g, t - last))
    return s.astype(np.float32), mask


def test_tight_bucket_far_from_group_mean_matches_reference():
    s, mask = _tight_bucket_batch()
    got = L.bucket_normalize(s, mask, group_size=8)
    want = ref.ref_bucket_normalize(s, mask, 8)
    # The tight bucket's z-scores are O(1): a one-pass variance, even shifted
    # by the group mean, lost ~offset^2 / var = 1e6 times float32's epsilon.
    assert np.abs(want[:, -4:]).max() > 1.0
    _close(got, want)


def test_tight_bucket_through_erpo_token_advantages():
    s, mask = _tight_bucket_batch(seed=1)
    rng = np.random.default_rng(2)
    ref_logp = rng.normal(-1.0, 0.3, s.shape).astype(np.float32)
    old_logp = (ref_logp + s).astype(np.float32)  # beta = 1: s = old - ref
    entropy = rng.gamma(1.5, 0.8, s.shape).astype(np.float32)
    rewards = rng.integers(0, 2, (2, 8)).astype(np.float32)
    rewards[:, 0], rewards[:, 1] = 0.0, 1.0  # every group has a direction
    kw = {"old_logp": old_logp, "ref_logp": ref_logp, "beta": 1.0, "eta": 0.5}
    got = jax.jit(lambda: L.erpo_token_advantages(rewards, entropy, mask, **kw))()
    want = ref.ref_erpo_token_advantages(rewards, entropy, mask, **kw)
    _close(got, want)


# ----------------------------------------------------- 2. gates that underflow


def _underflow_batch():
    """Three long rows of near-constant entropy and two short low-entropy rows.

    Entropy 3.0 +- 0.05 on 3 x 500 + 400 tokens; row 3 has one token at 0
    nats and row 4 (in the same group) two tokens at 0.1 and 0.0: their
    z-scores are about -23, so sigmoid(5 z) ~ 1e-50 is below float32's
    smallest subnormal.
    """
    rng = np.random.default_rng(3)
    g, t = 6, 500
    entropy = (3.0 + 0.05 * rng.normal(size=(g, t))).astype(np.float32)
    mask = np.ones((g, t), bool)
    mask[3, 1:] = False
    entropy[3, 0] = 0.0
    mask[4, 2:] = False
    entropy[4, :2] = (0.1, 0.0)
    mask[5, 400:] = False
    entropy[~mask] = np.nan
    rewards = np.array([[1.0, 0.0, 1.0, 1.0, 0.0, 0.0]], np.float32)
    return rewards, entropy, mask


def test_rows_whose_gates_underflow_keep_their_credit():
    rewards, entropy, mask = _underflow_batch()
    gate = np.asarray(L.entropy_gate(entropy, mask, group_size=6))
    assert gate[3, 0] == 0.0 and gate[4, 0] == 0.0  # the float32 gates underflow
    terms = L.erpo_token_terms(rewards, entropy, mask, eta=0.0)
    adv_seq = np.asarray(L.group_advantages(rewards)).reshape(-1)
    # A one-token row: omega = 1 * softmax of one logit = 1, so A_tok = A_b.
    assert float(terms.omega[3, 0]) == pytest.approx(1.0, rel=1e-6)
    assert float(terms.adv_tok[3, 0]) == pytest.approx(adv_seq[3], rel=1e-6)
    # Two tokens 0.1 nats apart, both underflowing: omega = 2 softmax(log W),
    # with log W = log_sigmoid(5 z) = 5 z to float32 precision here.
    want = ref.ref_erpo_token_terms(rewards, entropy, mask, eta=0.0)
    _close(terms.omega, want["omega"], 1e-5)
    _close(terms.adv_tok, want["adv_tok"], 1e-5)
    np.testing.assert_allclose(np.asarray(terms.omega).sum(axis=1), mask.sum(axis=1), rtol=1e-5)
    # The public building blocks give the same with log_gate, and without it
    # fall back to equal weights on such a row rather than to zeros.
    log_gate = L.entropy_gate(entropy, mask, group_size=6, log_space=True)
    for kw in ({"log_gate": log_gate}, {}):
        adv = L.result_anchored_synthesis(adv_seq, gate, None, mask, eta=0.0, **kw)
        assert float(adv[3, 0]) == pytest.approx(adv_seq[3], rel=1e-6)
        assert np.abs(np.asarray(adv)[4, :2]).sum() > 0.0
    adv = L.result_anchored_synthesis(adv_seq, gate, None, mask, eta=0.0, log_gate=log_gate)
    _close(adv, want["adv_tok"], 1e-5)


# ------------------------------------------------- 3. extreme values stay local


EXTREMES = [
    ("ref_logp", -np.inf),
    ("ref_logp", np.inf),
    ("ref_logp", 1e30),
    ("old_logp", np.inf),
    ("old_logp", -1e30),
    ("logp", 1e30),
    ("logp", -np.inf),
    ("entropy", np.inf),
    ("entropy", np.nan),
    ("entropy", 1e30),
]


def _loss_parts(x, **kw):
    def f(logp):
        return L.erpo_loss(
            logp, x["old_logp"], x["rewards"], x["entropy"], x["mask"],
            ref_logp=x["ref_logp"], kl_coef=0.05, **kw,
        )  # fmt: skip

    (loss, aux), grad = jax.value_and_grad(f, has_aux=True)(x["logp"])
    return loss, aux, grad


@pytest.mark.parametrize(("name", "value"), EXTREMES, ids=lambda v: str(v))
def test_one_extreme_token_never_spreads(name, value):
    clean = make_batch(80, 3, 4, 9, "ragged", nan_pad=True)
    clean["rewards"][0] = (1.0, 0.0, 0.0, 1.0)
    dirty = {k: v.copy() for k, v in clean.items()}
    b, t = 1, 0  # row 1 (group 0) always has a valid first token
    assert clean["mask"][b, t]
    dirty[name][b, t] = value
    kw = {"old_logp": dirty["old_logp"], "ref_logp": dirty["ref_logp"]}
    terms = L.erpo_token_terms(dirty["rewards"], dirty["entropy"], dirty["mask"], **kw)
    loss, aux, grad = _loss_parts(dirty)
    _finite((terms, loss, aux, grad))
    # Rows of the other groups (4..11) are unchanged: statistics never cross groups.
    clean_terms = L.erpo_token_terms(
        clean["rewards"], clean["entropy"], clean["mask"],
        old_logp=clean["old_logp"], ref_logp=clean["ref_logp"],
    )  # fmt: skip
    for got, want in zip(terms, clean_terms, strict=True):
        np.testing.assert_array_equal(np.asarray(got)[4:], np.asarray(want)[4:])
    _, _, clean_grad = _loss_parts(clean)
    np.testing.assert_allclose(np.asarray(grad)[4:], np.asarray(clean_grad)[4:], rtol=1e-6)
    # Inside the group the terms follow METHOD's rules (clip, NaN -> 0, clamp).
    want = ref.ref_erpo_token_terms(dirty["rewards"], dirty["entropy"], dirty["mask"], **kw)
    for field in L.ErpoTerms._fields:
        _close(getattr(terms, field), want[field])


def test_progress_signal_clips_like_the_ratio():
    old = np.array([[0.0, -np.inf, 5.0, -np.inf, np.nan]], np.float32)
    ref_logp = np.array([[-np.inf, 0.0, -30.0, -np.inf, 0.0]], np.float32)
    s = L.progress_signal(old, ref_logp, np.ones((1, 5), bool), beta=0.5)
    np.testing.assert_array_equal(s, [[10.0, -10.0, 10.0, 0.0, 0.0]])


# ------------------------------------------------------------- keywords and terms


def _batch_terms(x, **kw):
    args = (x["rewards"], x["entropy"], x["mask"])
    src = {"old_logp": x["old_logp"], "ref_logp": x["ref_logp"], "logp": x["logp"]}
    return L.erpo_token_terms(*args, **src, **kw), ref.ref_erpo_token_terms(*args, **src, **kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"psi_gate": False},
        {"psi_gate": False, "gate_mode": "none", "eta": 1.0},
        {"progress_std_floor": 0.05},
        {"progress_std_floor": 10.0, "num_buckets": 3},
        {"progress_source": "current"},
        {"progress_source": "current", "psi_gate": False, "gate_mode": "amplify"},
    ],
    ids=str,
)
def test_new_keywords_match_reference(kw):
    x = make_batch(81, 3, 4, 11, "holes", nan_pad=True)
    got, want = _batch_terms(x, **kw)
    for field in L.ErpoTerms._fields:
        _close(getattr(got, field), want[field])
    adv = L.erpo_token_advantages(
        x["rewards"], x["entropy"], x["mask"],
        old_logp=x["old_logp"], ref_logp=x["ref_logp"], logp=x["logp"], **kw,
    )  # fmt: skip
    np.testing.assert_array_equal(adv, got.adv_tok)
    loss, _ = L.erpo_loss(
        x["logp"], x["old_logp"], x["rewards"], x["entropy"], x["mask"],
        ref_logp=x["ref_logp"], **kw,
    )  # fmt: skip
    want_loss = ref.ref_erpo_loss(
        x["logp"], x["old_logp"], x["rewards"], x["entropy"], x["mask"],
        ref_logp=x["ref_logp"], **kw,
    )  # fmt: skip
    _close(loss, want_loss)


def test_keywords_change_what_they_say():
    x = make_batch(82, 2, 4, 9, "ragged")
    base, _ = _batch_terms(x)
    no_w, _ = _batch_terms(x, psi_gate=False)
    a = np.sign(np.asarray(L.group_advantages(x["rewards"])).reshape(-1, 1))
    np.testing.assert_allclose(no_w.psi, a * np.asarray(base.progress_hat), rtol=1e-6)
    np.testing.assert_allclose(base.psi, np.asarray(base.gate) * np.asarray(no_w.psi), rtol=1e-6)
    # A floor above every bucket's std: s_hat = (s - mean) / (floor + eps).
    floored, _ = _batch_terms(x, progress_std_floor=100.0)
    assert np.abs(np.asarray(floored.progress_hat)).max() < 0.01
    current, _ = _batch_terms(x, progress_source="current")
    want = 0.1 * np.clip(x["logp"] - x["ref_logp"], -20, 20)
    np.testing.assert_allclose(
        np.asarray(current.progress)[x["mask"]], want[x["mask"]], rtol=1e-5, atol=1e-7
    )


def test_current_progress_source_is_detached_in_the_loss():
    # progress_source="current" reads the loss's own logp, but as data: the
    # gradient is that of policy_loss with the advantages held fixed.
    x = make_batch(83, 2, 4, 7, "ragged")
    kw = {"ref_logp": x["ref_logp"], "kl_coef": 0.05}

    def erpo(logp):
        return L.erpo_loss(
            logp, x["old_logp"], x["rewards"], x["entropy"], x["mask"],
            progress_source="current", **kw,
        )[0]  # fmt: skip

    adv = L.erpo_token_advantages(
        x["rewards"], x["entropy"], x["mask"], logp=x["logp"], ref_logp=x["ref_logp"],
        progress_source="current",
    )  # fmt: skip

    def policy(logp):
        return L.policy_loss(logp, x["old_logp"], adv, x["mask"], **kw)[0]

    np.testing.assert_allclose(jax.grad(erpo)(x["logp"]), jax.grad(policy)(x["logp"]), rtol=1e-6)
    assert float(erpo(x["logp"])) == pytest.approx(float(policy(x["logp"])), rel=1e-6)


def test_keyword_errors_name_the_argument():
    x = make_batch(84, 2, 4, 5)
    args = (x["rewards"], x["entropy"], x["mask"])
    with pytest.raises(ValueError, match=r"progress_source='new' .* 'old', 'current'"):
        L.erpo_token_advantages(*args, eta=0.0, progress_source="new")
    with pytest.raises(ValueError, match=r"logp - ref_logp.*but logp is None"):
        L.erpo_token_terms(
            *args, old_logp=x["old_logp"], ref_logp=x["ref_logp"], progress_source="current"
        )
    with pytest.raises(ValueError, match=r"progress_std_floor=-1.0 must be >= 0"):
        L.erpo_token_advantages(*args, eta=0.0, progress_std_floor=-1.0)


# ------------------------------------------------------------------- ErpoTerms


@pytest.mark.parametrize("gate_mode", L.GATE_MODES)
@pytest.mark.parametrize("jit", [False, True])
def test_terms_recompose_into_the_token_advantage(gate_mode, jit):
    x = make_batch(85, 3, 4, 9, "empty_rows", nan_pad=True)
    eta, beta, gamma = 0.3, 0.2, 4.0
    kw = {"gate_mode": gate_mode, "eta": eta, "beta": beta, "gamma": gamma}
    args = (x["rewards"], x["entropy"], x["mask"])
    logps = {"old_logp": x["old_logp"], "ref_logp": x["ref_logp"]}

    def terms_fn(*a):
        return L.erpo_token_terms(*a, **logps, **kw)

    def adv_fn(*a):
        return L.erpo_token_advantages(*a, **logps, **kw)

    if jit:
        terms_fn, adv_fn = jax.jit(terms_fn), jax.jit(adv_fn)
    terms = terms_fn(*args)
    assert isinstance(terms, L.ErpoTerms)
    for field in terms:
        assert field.shape == x["mask"].shape and field.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(field)[~x["mask"]], 0.0)
    # adv_tok is erpo_token_advantages' result: the same computation, bitwise
    # equal eagerly; two jitted programs may be fused differently by XLA,
    # which moves float32 rounding by an ulp.
    if jit:
        np.testing.assert_allclose(terms.adv_tok, adv_fn(*args), rtol=3e-7, atol=1e-7)
    else:
        np.testing.assert_array_equal(terms.adv_tok, adv_fn(*args))
    # METHOD.md section 2, term by term.
    m = x["mask"]
    a = np.asarray(L.group_advantages(x["rewards"]), np.float64).reshape(-1, 1)
    t = {f: np.asarray(v, np.float64) for f, v in terms._asdict().items()}
    d = np.clip(x["old_logp"].astype(np.float64) - x["ref_logp"], -20, 20)
    np.testing.assert_allclose(t["progress"][m], (beta * d)[m], rtol=1e-5, atol=1e-7)
    psi = t["gate"] * np.sign(a) * t["progress_hat"]
    np.testing.assert_allclose(t["psi"], np.where(m, psi, 0.0), rtol=1e-6, atol=1e-7)
    recomposed = a * t["omega"] + eta * t["psi"]
    np.testing.assert_allclose(t["adv_tok"], np.where(m, recomposed, 0.0), rtol=1e-5, atol=1e-6)
    n = m.sum(axis=1)
    if gate_mode == "redistribute":  # mean 1 over each non-empty row
        np.testing.assert_allclose(t["omega"].sum(axis=1), n, rtol=1e-5)
    elif gate_mode == "amplify":
        np.testing.assert_allclose(t["omega"], np.where(m, 1 + t["gate"], 0.0), rtol=1e-6)
    else:
        np.testing.assert_array_equal(t["omega"], m.astype(np.float64))


def test_terms_without_progress_inputs_are_zero():
    x = make_batch(86, 2, 4, 6)
    terms = L.erpo_token_terms(x["rewards"], x["entropy"], x["mask"], eta=0.0)
    for field in ("progress", "progress_hat", "psi"):
        np.testing.assert_array_equal(getattr(terms, field), 0.0)
    # With the log-probs given, eta = 0 still fills them (for notebooks),
    # while adv_tok is unchanged.
    full = L.erpo_token_terms(
        x["rewards"], x["entropy"], x["mask"], eta=0.0,
        old_logp=x["old_logp"], ref_logp=x["ref_logp"],
    )  # fmt: skip
    assert np.abs(np.asarray(full.progress_hat)).max() > 0.1
    np.testing.assert_array_equal(full.adv_tok, terms.adv_tok)


def test_redistribute_row_total_equals_grpo_only_at_eta_zero():
    # docs/method.md: "at eta = 0 the row's total credit equals GRPO's".
    x = make_batch(87, 2, 4, 9, "ragged")
    kw = {"old_logp": x["old_logp"], "ref_logp": x["ref_logp"]}
    a = np.asarray(L.group_advantages(x["rewards"]), np.float64).reshape(-1)
    n = x["mask"].sum(axis=1)
    adv0 = np.asarray(L.erpo_token_advantages(x["rewards"], x["entropy"], x["mask"], eta=0.0))
    np.testing.assert_allclose(adv0.sum(axis=1), n * a, rtol=1e-5, atol=1e-5)
    adv = np.asarray(L.erpo_token_advantages(x["rewards"], x["entropy"], x["mask"], **kw))
    assert np.abs(adv.sum(axis=1) - n * a).max() > 1e-2


# ----------------------------------------------------------------- ErpoAux fields


def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def test_aux_progress_and_sign_fields_by_hand():
    # Group 0: rewards (1, 0) so A = (a, -a) with a = 0.5 / (sqrt(0.5) + 1e-6);
    # group 1: rewards (1, 1), A = 0. One bucket (K = 1), beta = 1,
    # gate_mode "none", psi_gate False: Psi = sign(A) s_hat, A_tok = A + eta Psi.
    rewards = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
    mask = np.ones((4, 2), bool)
    ref_logp = np.full((4, 2), -1.0, np.float32)
    old_logp = ref_logp + np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], np.float32)
    logp = old_logp.copy()
    entropy = np.array([[1.0, 0.0], [0.0, 0.0], [2.0, 2.0], [2.0, 2.0]], np.float32)
    kw = {"num_buckets": 1, "beta": 1.0, "gate_mode": "none", "psi_gate": False, "eta": 2.0}
    _, aux = L.erpo_loss(logp, old_logp, rewards, entropy, mask, ref_logp=ref_logp, **kw)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    # Group 0's progress s = (2, 0, 0, 0): mean 0.5, population std sqrt(0.75);
    # group 1's is constant (degenerate: s_hat = 0, std 0).
    std = math.sqrt(0.75)
    hi, lo = 1.5 / (std + 1e-6), -0.5 / (std + 1e-6)
    # A_tok row 0: a + 2 hi > 0, a + 2 lo < 0 (flip); row 1: -a - 2 lo > 0 (flips).
    assert a + 2 * lo < 0 < -a - 2 * lo
    assert float(aux.sign_flip_frac) == pytest.approx(3 / 4)  # group 1 (A = 0) excluded
    assert float(aux.progress_abs_mean) == pytest.approx(2 / 8)
    assert float(aux.progress_std_mean) == pytest.approx((std + 0.0) / 2, rel=1e-6)
    assert float(aux.psi_abs_mean) == pytest.approx((hi - 3 * lo) / 8, rel=1e-5)
    assert float(aux.omega_max) == 1.0 and float(aux.eff_token_frac) == 1.0
    assert float(aux.adv_seq_abs_mean) == pytest.approx(2 * a / 4, rel=1e-6)
    # Group 0's entropies (1, 0, 0, 0): only the 1-nat token is above its
    # group's mean; group 1 is constant (z = 0, W = 0.5: not a pivot).
    assert float(aux.cdp_frac) == pytest.approx(1 / 8)
    # eta = 0: the progress fields are 0 (not computed), and no sign can flip.
    _, aux0 = L.erpo_loss(logp, old_logp, rewards, entropy, mask, **dict(kw, eta=0.0))
    assert float(aux0.psi_abs_mean) == float(aux0.progress_abs_mean) == 0.0
    assert float(aux0.progress_std_mean) == float(aux0.sign_flip_frac) == 0.0


def test_aux_omega_fields_by_hand():
    # One group, rows (2, 0, 0) and (0, 0, 0) nats: mean 1/3, population std
    # sqrt(5)/3; redistribute moves row 0's credit onto its first token.
    rewards = np.array([[1.0, 0.0]], np.float32)
    entropy = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    mask = np.ones((2, 3), bool)
    logp = np.full((2, 3), -1.0, np.float32)
    _, aux = L.erpo_loss(logp, logp, rewards, entropy, mask, eta=0.0)
    std = math.sqrt(5.0) / 3.0
    w_hi = _sigmoid(5.0 * (2.0 - 1.0 / 3.0) / (std + 1e-6))
    w_lo = _sigmoid(5.0 * (-1.0 / 3.0) / (std + 1e-6))
    row0 = [3 * w / (w_hi + 2 * w_lo) for w in (w_hi, w_lo, w_lo)]  # row 1: all 1
    assert float(aux.omega_max) == pytest.approx(row0[0], rel=1e-5)
    eff0 = sum(row0) ** 2 / (3 * sum(o * o for o in row0))
    assert float(aux.eff_token_frac) == pytest.approx((eff0 + 1.0) / 2, rel=1e-5)
    assert float(aux.gate_mean) == pytest.approx((w_hi + 5 * w_lo) / 6, rel=1e-5)
    assert float(aux.sign_flip_frac) == 0.0  # omega > 0: A_tok keeps A_b's sign


def test_aux_matches_reference_on_random_batches():
    for seed, kind in ((88, "ragged"), (89, "holes"), (90, "empty_rows")):
        x = make_batch(seed, 3, 4, 9, kind, nan_pad=True)
        for kw in ({}, {"gate_mode": "amplify", "eta": 3.0}, {"eta": 0.0}):
            args = (x["logp"], x["old_logp"], x["rewards"], x["entropy"], x["mask"])
            _, aux = L.erpo_loss(*args, ref_logp=x["ref_logp"], **kw)
            want = ref.ref_erpo_aux(*args, ref_logp=x["ref_logp"], **kw)
            for name, value in want.items():
                _close(getattr(aux, name), value, 1e-5)
