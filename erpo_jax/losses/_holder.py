"""HolderPO: power-mean aggregation of token ratios with sequence-level clipping.

HolderPO (arXiv 2605.12058), METHOD.md section 3. ``p = 1`` with token
clipping is GRPO (``agg="seq_mean_token_mean"``); ``p = 0`` with sequence
clipping is GSPO (arXiv 2507.18071), exposed as :func:`gspo_loss`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from erpo_jax.losses._check import (
    CLIP_LEVELS,
    check_bt,
    check_choice,
    check_rows,
    concrete_float,
)
from erpo_jax.losses._policy import LOG_RATIO_CLIP
from erpo_jax.ops import masked_sum
from erpo_jax.typing import Array, ArrayLike, Bool, Float

__all__ = ["HolderAux", "gspo_loss", "holder_loss", "holder_p_schedule", "log_power_mean"]

# exp(80) * 2**31 is still below float32's max, so expm1 of a clipped term can
# be summed over any realistic row length without overflow.
_POWER_TERM_CLIP = 80.0


class HolderAux(NamedTuple):
    """Diagnostics of :func:`holder_loss`, float32 scalars over non-empty rows."""

    rho_mean: Array  # mean sequence ratio rho_b
    clip_frac: Array  # rows whose clipped term is active (sequence level) or tokens (token level)
    adv_abs_mean: Array  # mean |A_b|
    num_rows: Array  # rows with at least one valid token


def log_power_mean(
    log_x: Float[ArrayLike, "B T"], mask: Bool[ArrayLike, "B T"], p: float | Array
) -> Float[Array, " B"]:
    """``log(((1/n_b) sum_t x^p)^(1/p))`` per row, stable for every ``p`` including 0.

    Written as ``mean(log x) + log1p(mean(expm1(p * (log x - mean log x)))) / p``:
    the centred ``expm1``/``log1p`` pair keeps full float32 accuracy as
    ``p -> 0``, where the textbook ``log(mean(exp(p log x))) / p`` loses all
    digits, and ``p == 0`` gives the geometric mean ``mean(log x)`` exactly.
    ``p`` may be traced (a schedule value). Rows without valid tokens give 0.
    """
    mask = jnp.asarray(mask, bool)
    lx = jnp.where(mask, jnp.asarray(log_x, jnp.float32), 0.0)
    n = jnp.sum(mask, axis=-1, dtype=jnp.float32)
    mean = masked_sum(lx, mask, axis=-1) / jnp.maximum(n, 1.0)
    p = jnp.asarray(p, jnp.float32)
    y = jnp.clip(p * (lx - mean[:, None]), -_POWER_TERM_CLIP, _POWER_TERM_CLIP)
    m = masked_sum(jnp.expm1(y), mask, axis=-1) / jnp.maximum(n, 1.0)
    p_safe = jnp.where(p == 0, 1.0, p)
    correction = jnp.where(p == 0, 0.0, jnp.log1p(m) / p_safe)
    return jnp.where(n > 0, mean + correction, 0.0)


def holder_loss(
    logp: Float[ArrayLike, "B T"],
    old_logp: Float[ArrayLike, "B T"],
    adv_seq: Float[ArrayLike, " B"],
    mask: Bool[ArrayLike, "B T"],
    *,
    p: float | Array,
    clip_eps: float | Array = 0.2,
    clip_eps_high: float | Array | None = None,
    clip_level: str = "sequence",
    denominator: float | Array | None = None,
) -> tuple[Float[Array, ""], HolderAux]:
    """HolderPO loss (arXiv 2605.12058; METHOD.md section 3).

    With ``r_t = exp(clip(logp - old_logp, -20, 20))`` and
    ``clip(x) = clip(x, 1 - clip_eps, 1 + clip_eps_high)``:

    - ``clip_level="sequence"`` (HolderPO, GSPO at ``p=0``):
      ``rho_b = ((1/n_b) sum_t r_t^p)^(1/p)`` (geometric mean at ``p=0``),
      ``l_b = -min(rho_b A_b, clip(rho_b) A_b)``;
    - ``clip_level="token"``: each ratio is first PPO-clipped for the sign of
      ``A_b`` (``e_t = min(r_t, clip(r_t))`` if ``A_b >= 0`` else ``max``),
      then ``rho_b`` is the power mean of ``e_t`` and ``l_b = -rho_b A_b``.
      At ``p=1`` this is exactly GRPO with ``agg="seq_mean_token_mean"``.

    The loss is ``sum_b l_b / max(denominator, 1)`` over rows with at least
    one valid token, ``denominator = B`` by default. Everything runs in log
    space.

    Args:
      logp, old_logp: ``[B, T]`` current and rollout log-probs.
      adv_seq: ``[B]`` sequence advantages (e.g. :func:`group_advantages`
        flattened prompt-major).
      mask: ``[B, T]`` valid tokens.
      p: power of the mean (``2 -> -2`` over training by default).
      clip_eps: lower clip ``eps_low`` (and the upper one unless
        ``clip_eps_high`` is given), in (0, 1).
      clip_eps_high: upper clip ``eps_high`` (default ``clip_eps``).
      clip_level: ``"sequence"`` or ``"token"`` (static).
      denominator: the row count to divide by. When this call sees one
        micro-batch of a larger batch, pass the whole batch's ``B``: the
        micro-batch losses (and gradients) then sum to the full batch's
        exactly, as with :func:`policy_loss`'s ``denominator``.

    ``p``, ``clip_eps``, ``clip_eps_high`` and ``denominator`` may be traced
    scalars (``p`` e.g. from :func:`holder_p_schedule`); range checks run on
    concrete values only.

    Returns:
      ``(loss, aux)`` with ``aux`` a :class:`HolderAux`.
    """
    fn = "holder_loss"
    check_choice(fn, "clip_level", clip_level, CLIP_LEVELS)
    b, _ = check_bt(fn, logp=logp, old_logp=old_logp, mask=mask)
    check_rows(fn, "adv_seq", adv_seq, b)
    low = concrete_float(clip_eps)
    if low is not None and not 0.0 < low < 1.0:
        raise ValueError(f"{fn}: clip_eps={clip_eps} must lie in (0, 1)")
    high = concrete_float(clip_eps_high)
    if high is not None and high <= 0.0:
        raise ValueError(f"{fn}: clip_eps_high={clip_eps_high} must be positive")
    mask = jnp.asarray(mask, bool)
    sg = jax.lax.stop_gradient
    logp = jnp.where(mask, jnp.asarray(logp, jnp.float32), 0.0)
    old = sg(jnp.where(mask, jnp.asarray(old_logp, jnp.float32), 0.0))
    adv = sg(jnp.asarray(adv_seq, jnp.float32))
    log_ratio = jnp.clip(logp - old, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    eps_low = jnp.asarray(clip_eps, jnp.float32)
    eps_high = eps_low if clip_eps_high is None else jnp.asarray(clip_eps_high, jnp.float32)
    lo, hi = jnp.log1p(-eps_low), jnp.log1p(eps_high)
    valid_row = jnp.any(mask, axis=-1)

    if clip_level == "sequence":
        log_rho = log_power_mean(log_ratio, mask, p)
        rho = jnp.exp(log_rho)
        unclipped = rho * adv
        clipped = jnp.exp(jnp.clip(log_rho, lo, hi)) * adv
        row_loss = -jnp.minimum(unclipped, clipped)
        clip_active = (clipped < unclipped).astype(jnp.float32)
        clip_frac = jnp.sum(jnp.where(valid_row, clip_active, 0.0)) / jnp.maximum(
            jnp.sum(valid_row), 1
        )
    else:
        log_clip = jnp.clip(log_ratio, lo, hi)
        positive = (adv >= 0)[:, None]
        log_eff = jnp.where(
            positive, jnp.minimum(log_ratio, log_clip), jnp.maximum(log_ratio, log_clip)
        )
        log_rho = log_power_mean(log_eff, mask, p)
        rho = jnp.exp(log_rho)
        row_loss = -rho * adv
        active = (log_eff != log_ratio).astype(jnp.float32)
        clip_frac = masked_sum(sg(active), mask) / jnp.maximum(jnp.sum(mask), 1)

    den = jnp.float32(b) if denominator is None else jnp.asarray(denominator, jnp.float32)
    loss = jnp.sum(jnp.where(valid_row, row_loss, 0.0)) / jnp.maximum(den, 1.0)
    num_rows = jnp.sum(valid_row, dtype=jnp.float32)
    aux = HolderAux(
        rho_mean=jnp.sum(jnp.where(valid_row, sg(rho), 0.0)) / jnp.maximum(num_rows, 1.0),
        clip_frac=sg(clip_frac).astype(jnp.float32),
        adv_abs_mean=jnp.mean(jnp.abs(adv)),
        num_rows=num_rows,
    )
    return loss, aux


def gspo_loss(
    logp: Float[ArrayLike, "B T"],
    old_logp: Float[ArrayLike, "B T"],
    adv_seq: Float[ArrayLike, " B"],
    mask: Bool[ArrayLike, "B T"],
    *,
    clip_eps: float | Array = 3e-4,
    clip_eps_high: float | Array | None = 4e-4,
    denominator: float | Array | None = None,
) -> tuple[Float[Array, ""], HolderAux]:
    """GSPO (arXiv 2507.18071 eq. 5-7): :func:`holder_loss` at ``p=0``, sequence clipping.

    The sequence ratio is the geometric mean of token ratios,
    ``exp(mean_t log r_t)``, clipped to ``[1 - clip_eps, 1 + clip_eps_high]``.
    The defaults, ``3e-4`` left and ``4e-4`` right, are the GSPO paper's:
    its section 5.1 (empirical results, Qwen3-30B-A3B) sets the left and
    right clipping ranges of its Eq. 5 to 3e-4 and 4e-4 (against 0.2 and
    0.27 for its GRPO baseline): a length-normalized sequence ratio stays
    much closer to 1 than a token ratio.

    Args:
      logp, old_logp, adv_seq, mask: as :func:`holder_loss`.
      clip_eps: left clip range (``1 - clip_eps``).
      clip_eps_high: right clip range (``1 + clip_eps_high``); None makes the
        clip symmetric.
      denominator: as :func:`holder_loss` (exact micro-batching).
    """
    return holder_loss(
        logp,
        old_logp,
        adv_seq,
        mask,
        p=0.0,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        denominator=denominator,
    )


def holder_p_schedule(
    total_steps: int, *, p_start: float = 2.0, p_end: float = -2.0
) -> optax.Schedule:
    """HolderPO's power schedule: linear from ``p_start`` to ``p_end`` over ``total_steps``.

    An optax schedule, ``step -> p``; pass its value as ``holder_loss(p=...)``
    inside the jitted step (``p`` may be traced).
    """
    if total_steps < 1:
        raise ValueError(f"holder_p_schedule: total_steps={total_steps} must be >= 1")
    return optax.linear_schedule(init_value=p_start, end_value=p_end, transition_steps=total_steps)
