"""The token-level clipped policy-gradient surrogate, KL penalties and aggregation.

METHOD.md section 1. Every other token-level loss in erpo_jax (GRPO, ERPO,
ARCA, 80/20 masking) is this surrogate with a different token advantage.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from erpo_jax.losses._check import (
    AGG_MODES,
    KL_ESTIMATORS,
    check_bt,
    check_choice,
    concrete_float,
    is_static_zero,
)
from erpo_jax.ops import masked_mean, masked_sum
from erpo_jax.typing import Array, ArrayLike, Bool, Float

__all__ = [
    "PolicyAux",
    "aggregate",
    "aggregate_parts",
    "kl_penalty",
    "policy_loss",
    "policy_token_loss",
]

LOG_RATIO_CLIP = 20.0


class PolicyAux(NamedTuple):
    """Diagnostics of :func:`policy_loss`, float32 scalars.

    Fractions and means are over valid tokens (``mask`` True).
    """

    pg_loss: Array  # token mean of the clipped policy-gradient term (KL excluded)
    kl: Array  # mean KL estimate to the reference policy (0 without ref_logp)
    approx_kl: Array  # mean k3 estimate of KL(old || new) from the old samples
    clip_frac_low: Array  # A < 0 and ratio < 1 - clip_eps: the lower clip is active
    clip_frac_high: Array  # A > 0 and ratio > 1 + clip_eps_high: the upper clip is active
    dual_clip_frac: Array  # A < 0 and the dual clip -clip_c * A is active
    ratio_mean: Array  # mean importance ratio new / old
    adv_abs_mean: Array  # mean |adv_tok|
    num_tokens: Array  # number of valid tokens


def kl_penalty(
    logp: Float[ArrayLike, "*s"], ref_logp: Float[ArrayLike, "*s"], *, estimator: str = "k3"
) -> Float[Array, "*s"]:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

    With ``d = ref_logp - logp``: ``k1 = -d``, ``k2 = d**2 / 2``,
    ``k3 = exp(d) - d - 1`` (unbiased and low variance; the GRPO paper's
    choice, arXiv 2402.03300 eq. 4). ``d`` is clipped to ``[-20, 20]`` inside
    ``exp`` so that a far-off reference cannot overflow.

    Args:
      logp: log-probabilities of the sampled tokens under the policy.
      ref_logp: the same under the reference policy (treated as data).
      estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
      float32 per-token KL estimates, the shape of ``logp``.
    """
    check_choice("kl_penalty", "estimator", estimator, KL_ESTIMATORS)
    logp = jnp.asarray(logp, jnp.float32)
    d = jax.lax.stop_gradient(jnp.asarray(ref_logp, jnp.float32)) - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    d = jnp.clip(d, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    return jnp.expm1(d) - d


def aggregate_parts(
    token_loss: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    agg: str = "token_mean",
    max_len: int | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """The aggregation of METHOD.md section 1 as ``(numerator, denominator)``.

    ``loss = numerator / max(denominator, 1)``. The denominator depends only
    on the mask and the shapes, never on parameters, so a train step that
    splits a batch into micro-batches reproduces the full-batch loss and
    gradient exactly by summing the micro-batch numerators (or their
    gradients) and dividing once by the summed denominators. Pass that global
    denominator to :func:`policy_loss` as ``denominator=`` to do it in one call.

    =========================== =============================================== ===========
    agg                         numerator                                       denominator
    =========================== =============================================== ===========
    ``token_mean`` (DAPO)       ``sum(M * l)``                                   ``sum(M)``
    ``seq_mean_token_mean``     ``sum_b sum_t M * l / max(n_b, 1)``             ``B``
    ``seq_mean_token_sum``      ``sum(M * l)``                                   ``B``
    ``seq_mean_token_sum_norm`` ``sum(M * l)`` (Dr. GRPO)                        ``B * L``
    =========================== =============================================== ===========

    Args:
      token_loss: ``[B, T]`` per-token losses; masked entries are ignored,
        NaN included.
      mask: ``[B, T]`` valid tokens.
      agg: one of the four names above.
      max_len: ``L`` of ``seq_mean_token_sum_norm``, a fixed generation
        budget (default ``T``).

    Returns:
      ``(numerator, denominator)``, float32 scalars.
    """
    check_choice("aggregate_parts", "agg", agg, AGG_MODES)
    b, t = check_bt("aggregate_parts", token_loss=token_loss, mask=mask)
    mask = jnp.asarray(mask, bool)
    if agg == "seq_mean_token_mean":
        row_sum = masked_sum(token_loss, mask, axis=-1)
        n = jnp.sum(mask, axis=-1, dtype=jnp.float32)
        return jnp.sum(row_sum / jnp.maximum(n, 1.0)), jnp.float32(b)
    total = masked_sum(token_loss, mask)
    if agg == "token_mean":
        return total, jnp.sum(mask, dtype=jnp.float32)
    if agg == "seq_mean_token_sum":
        return total, jnp.float32(b)
    length = t if max_len is None else max_len
    if int(length) < 1:
        raise ValueError(f"aggregate_parts: max_len={max_len} must be a positive token count")
    return total, jnp.float32(b * int(length))


def aggregate(
    token_loss: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    agg: str = "token_mean",
    max_len: int | None = None,
) -> Float[Array, ""]:
    """``numerator / max(denominator, 1)`` of :func:`aggregate_parts`."""
    num, den = aggregate_parts(token_loss, mask, agg=agg, max_len=max_len)
    return num / jnp.maximum(den, 1.0)


def policy_token_loss(
    logp: Float[ArrayLike, "B T"],
    old_logp: Float[ArrayLike, "B T"],
    adv_tok: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    clip_eps: float | Array = 0.2,
    clip_eps_high: float | Array | None = None,
    clip_c: float | Array | None = None,
    ref_logp: Float[ArrayLike, "B T"] | None = None,
    kl_coef: float | Array = 0.0,
    kl_estimator: str = "k3",
) -> tuple[Float[Array, "B T"], PolicyAux]:
    """Per-token clipped surrogate plus KL penalty, before aggregation.

    METHOD.md section 1 (PPO, arXiv 1707.06347 eq. 7; dual clip, arXiv
    1912.09729 eq. 5; clip-higher, DAPO arXiv 2503.14476 eq. 10)::

        ratio = exp(clip(logp - old_logp, -20, 20))
        pg    = max(-A * ratio, -A * clip(ratio, 1 - clip_eps, 1 + clip_eps_high))
        pg    = min(pg, -clip_c * A)              where A < 0, if clip_c is given
        l     = pg + kl_coef * kl_penalty(logp, ref_logp)

    ``old_logp``, ``adv_tok`` and ``ref_logp`` are data (wrapped in
    ``stop_gradient``). Masked entries of every input are replaced before any
    arithmetic, so NaN or inf there changes neither the value nor the gradient.
    Numeric hyperparameters may be traced scalars.

    Returns:
      ``(token_loss[B, T], aux)``: float32 per-token losses (0 where masked)
      and a :class:`PolicyAux` whose ``pg_loss`` is the token mean of ``pg``.
    """
    fn = "policy_token_loss"
    check_bt(fn, logp=logp, old_logp=old_logp, adv_tok=adv_tok, mask=mask, ref_logp=ref_logp)
    check_choice(fn, "kl_estimator", kl_estimator, KL_ESTIMATORS)
    # Every numeric hyperparameter may be traced (a schedule value under
    # jit): range checks run only on values known at trace time, and the
    # arithmetic below never converts one with float().
    low = concrete_float(clip_eps)
    if low is not None and not 0.0 < low < 1.0:
        raise ValueError(f"{fn}: clip_eps={clip_eps} must lie in (0, 1)")
    high = concrete_float(clip_eps_high)
    if high is not None and high <= 0.0:
        raise ValueError(f"{fn}: clip_eps_high={clip_eps_high} must be positive")
    c = concrete_float(clip_c)
    if c is not None and c <= 1.0:
        raise ValueError(f"{fn}: clip_c={clip_c} must be > 1 (dual clip bound) or None")
    if ref_logp is None and not is_static_zero(kl_coef):
        raise ValueError(f"{fn}: kl_coef={kl_coef} needs `ref_logp`, which is None")
    eps_low = jnp.asarray(clip_eps, jnp.float32)
    eps_high = eps_low if clip_eps_high is None else jnp.asarray(clip_eps_high, jnp.float32)

    mask = jnp.asarray(mask, bool)
    sg = jax.lax.stop_gradient
    logp = jnp.where(mask, jnp.asarray(logp, jnp.float32), 0.0)
    old_logp = sg(jnp.where(mask, jnp.asarray(old_logp, jnp.float32), 0.0))
    adv = sg(jnp.where(mask, jnp.asarray(adv_tok, jnp.float32), 0.0))

    log_ratio = jnp.clip(logp - old_logp, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    ratio = jnp.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    pg = jnp.maximum(pg_unclipped, pg_clipped)
    dual_active = jnp.zeros_like(mask)
    if clip_c is not None:
        dual_bound = -jnp.asarray(clip_c, jnp.float32) * adv
        dual_active = (adv < 0) & (pg > dual_bound)
        pg = jnp.where(adv < 0, jnp.minimum(pg, dual_bound), pg)

    token_loss = pg
    kl_mean = jnp.float32(0.0)
    if ref_logp is not None:
        ref = jnp.where(mask, jnp.asarray(ref_logp, jnp.float32), 0.0)
        kl = kl_penalty(logp, ref, estimator=kl_estimator)
        kl_mean = masked_mean(kl, mask)
        if not is_static_zero(kl_coef):
            token_loss = pg + jnp.asarray(kl_coef, jnp.float32) * kl
    token_loss = jnp.where(mask, token_loss, 0.0)

    sl = sg(log_ratio)
    aux = PolicyAux(
        pg_loss=masked_mean(pg, mask),
        kl=sg(kl_mean),
        approx_kl=masked_mean(jnp.expm1(sl) - sl, mask),
        clip_frac_low=masked_mean(
            ((adv < 0) & (sg(ratio) < 1.0 - eps_low)).astype(jnp.float32), mask
        ),
        clip_frac_high=masked_mean(
            ((adv > 0) & (sg(ratio) > 1.0 + eps_high)).astype(jnp.float32), mask
        ),
        dual_clip_frac=masked_mean(sg(dual_active).astype(jnp.float32), mask),
        ratio_mean=masked_mean(sg(ratio), mask),
        adv_abs_mean=masked_mean(jnp.abs(adv), mask),
        num_tokens=jnp.sum(mask, dtype=jnp.float32),
    )
    return token_loss, aux


def policy_loss(
    logp: Float[ArrayLike, "B T"],
    old_logp: Float[ArrayLike, "B T"],
    adv_tok: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    clip_eps: float | Array = 0.2,
    clip_eps_high: float | Array | None = None,
    clip_c: float | Array | None = None,
    agg: str = "token_mean",
    max_len: int | None = None,
    ref_logp: Float[ArrayLike, "B T"] | None = None,
    kl_coef: float | Array = 0.0,
    kl_estimator: str = "k3",
    denominator: float | Array | None = None,
) -> tuple[Float[Array, ""], PolicyAux]:
    """Clipped policy-gradient loss for any token advantage (METHOD.md section 1).

    Args:
      logp: ``[B, T]`` log-probabilities of the sampled tokens under the
        current policy (the only differentiated input).
      old_logp: ``[B, T]`` the same under the rollout policy.
      adv_tok: ``[B, T]`` token advantages (GRPO broadcasts ``A_b`` over the
        row; ERPO, ARCA and entropy masking shape it per token).
      mask: ``[B, T]`` True on sampled tokens, EOS included.
      clip_eps: lower clip ``eps_low`` (and upper one unless
        ``clip_eps_high`` is given).
      clip_eps_high: upper clip ``eps_high``; ``> clip_eps`` is DAPO's
        clip-higher.
      clip_c: dual-clip constant ``c > 1`` for negative advantages, or None.
        ``clip_eps``, ``clip_eps_high``, ``clip_c`` and ``kl_coef`` may be
        traced scalars (schedules inside ``jit``); only whether ``clip_c``
        is None is a static choice. Range checks run on concrete values.
      agg: ``"token_mean"``, ``"seq_mean_token_mean"``,
        ``"seq_mean_token_sum"`` or ``"seq_mean_token_sum_norm"``.
      max_len: ``L`` for ``seq_mean_token_sum_norm`` (default ``T``).
      ref_logp: ``[B, T]`` reference-policy log-probabilities, for the KL
        penalty and the ``kl`` diagnostic.
      kl_coef: weight of the KL penalty (may be traced, e.g. a schedule).
      kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``.
      denominator: overrides the aggregation denominator; pass the
        denominator of the whole batch (:func:`aggregate_parts`) when this
        call sees one micro-batch, and the micro-batch losses then sum to the
        full-batch loss exactly.

    Returns:
      ``(loss, aux)``: the float32 scalar loss and a :class:`PolicyAux`.

    Example:
      >>> import numpy as np
      >>> logp = np.log(np.full((2, 3), 0.5, np.float32))
      >>> mask = np.array([[True, True, False], [True, False, False]])
      >>> adv = np.array([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]], np.float32)
      >>> loss, aux = policy_loss(logp, logp, adv, mask)
      >>> round(float(loss), 4)  # ratio 1 everywhere: -(1 + 1 - 1) / 3
      -0.3333
    """
    token_loss, aux = policy_token_loss(
        logp,
        old_logp,
        adv_tok,
        mask,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        clip_c=clip_c,
        ref_logp=ref_logp,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
    )
    num, den = aggregate_parts(token_loss, mask, agg=agg, max_len=max_len)
    if denominator is not None:
        den = jnp.asarray(denominator, jnp.float32)
    loss = num / jnp.maximum(den, 1.0)
    return loss, aux


def _split_policy_kw(kw: dict[str, Any], fn: str) -> dict[str, Any]:
    """Check that ``kw`` holds only :func:`policy_loss` keywords (for wrappers)."""
    allowed = (
        "clip_eps",
        "clip_eps_high",
        "clip_c",
        "agg",
        "max_len",
        "kl_coef",
        "kl_estimator",
        "denominator",
    )
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise TypeError(
            f"{fn}: unknown keyword(s) {', '.join(unknown)}; policy keywords are "
            + ", ".join(allowed)
        )
    return kw
