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

from erpo_jax.losses._check import CLIP_LEVELS, check_bt, check_choice, check_rows
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
    clip_eps: float = 0.2,
    clip_level: str = "sequence",
) -> tuple[Float[Array, ""], HolderAux]:
    """HolderPO loss (arXiv 2605.12058; METHOD.md section 3).

    With ``r_t = exp(clip(logp - old_logp, -20, 20))``:

    - ``clip_level="sequence"`` (HolderPO, GSPO at ``p=0``):
      ``rho_b = ((1/n_b) sum_t r_t^p)^(1/p)`` (geometric mean at ``p=0``),
      ``l_b = -min(rho_b A_b, clip(rho_b, 1-eps, 1+eps) A_b)``;
    - ``clip_level="token"``: each ratio is first PPO-clipped for the sign of
      ``A_b`` (``e_t = min(r_t, clip(r_t))`` if ``A_b >= 0`` else ``max``),
      then ``rho_b`` is the power mean of ``e_t`` and ``l_b = -rho_b A_b``.
      At ``p=1`` this is exactly GRPO with ``agg="seq_mean_token_mean"``.

    The loss is ``(1/B) sum_b l_b`` over rows with at least one valid token.
    Everything runs in log space; ``p`` may be traced, e.g. from
    :func:`holder_p_schedule`.

    Args:
      logp, old_logp: ``[B, T]`` current and rollout log-probs.
      adv_seq: ``[B]`` sequence advantages (e.g. :func:`group_advantages`
        flattened prompt-major).
      mask: ``[B, T]`` valid tokens.
      p: power of the mean (``2 -> -2`` over training by default).
      clip_eps: clip range.
      clip_level: ``"sequence"`` or ``"token"``.

    Returns:
      ``(loss, aux)`` with ``aux`` a :class:`HolderAux`.
    """
    fn = "holder_loss"
    check_choice(fn, "clip_level", clip_level, CLIP_LEVELS)
    b, _ = check_bt(fn, logp=logp, old_logp=old_logp, mask=mask)
    check_rows(fn, "adv_seq", adv_seq, b)
    if not 0.0 < float(clip_eps) < 1.0:
        raise ValueError(f"{fn}: clip_eps={clip_eps} must lie in (0, 1)")
    mask = jnp.asarray(mask, bool)
    sg = jax.lax.stop_gradient
    logp = jnp.where(mask, jnp.asarray(logp, jnp.float32), 0.0)
    old = sg(jnp.where(mask, jnp.asarray(old_logp, jnp.float32), 0.0))
    adv = sg(jnp.asarray(adv_seq, jnp.float32))
    log_ratio = jnp.clip(logp - old, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    lo, hi = jnp.log1p(-clip_eps), jnp.log1p(clip_eps)
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

    loss = jnp.sum(jnp.where(valid_row, row_loss, 0.0)) / b
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
    clip_eps: float = 3e-4,
) -> tuple[Float[Array, ""], HolderAux]:
    """GSPO (arXiv 2507.18071 eq. 5-7): :func:`holder_loss` at ``p=0``, sequence clipping.

    The sequence ratio is the geometric mean of token ratios; GSPO's paper
    uses a much smaller clip range than token-level PPO (default ``3e-4``).
    """
    return holder_loss(logp, old_logp, adv_seq, mask, p=0.0, clip_eps=clip_eps)


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
