"""GRPO: group-relative outcome advantages broadcast over tokens."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from erpo_jax.losses._advantages import group_advantages
from erpo_jax.losses._check import check_bt, check_rewards
from erpo_jax.losses._policy import PolicyAux, _split_policy_kw, policy_loss
from erpo_jax.typing import Array, ArrayLike, Bool, Float

__all__ = ["grpo_loss"]


def grpo_loss(
    logp: Float[ArrayLike, "B T"],
    old_logp: Float[ArrayLike, "B T"],
    rewards: Float[ArrayLike, "P G"],
    mask: Bool[ArrayLike, "B T"],
    *,
    ref_logp: Float[ArrayLike, "B T"] | None = None,
    normalize_std: bool = True,
    ddof: int = 1,
    eps: float = 1e-6,
    **policy_kw: Any,
) -> tuple[Float[Array, ""], PolicyAux]:
    """GRPO (DeepSeekMath, arXiv 2402.03300 eq. 3) and its variants as one loss.

    ``A_b`` from :func:`group_advantages` is broadcast over the valid tokens
    of row ``b`` and fed to :func:`policy_loss`. The variants are keyword
    choices: Dr. GRPO is ``normalize_std=False, agg="seq_mean_token_sum_norm"``;
    DAPO is ``clip_eps_high=0.28, agg="token_mean"``; the GRPO paper is
    ``agg="seq_mean_token_mean", kl_coef=0.04`` with ``ref_logp``.

    Args:
      logp, old_logp, mask: ``[B, T]``, rows prompt-major (``b = p * G + g``).
      rewards: ``[P, G]`` with ``P * G == B``.
      ref_logp: optional ``[B, T]`` reference log-probs for the KL term.
      normalize_std, ddof, eps: see :func:`group_advantages`.
      **policy_kw: any keyword of :func:`policy_loss` (``clip_eps``,
        ``clip_eps_high``, ``clip_c``, ``agg``, ``max_len``, ``kl_coef``,
        ``kl_estimator``, ``denominator``).

    Returns:
      ``(loss, aux)`` as :func:`policy_loss`.
    """
    _split_policy_kw(policy_kw, "grpo_loss")
    b, t = check_bt("grpo_loss", logp=logp, old_logp=old_logp, mask=mask, ref_logp=ref_logp)
    check_rewards("grpo_loss", rewards, b)
    adv_seq = group_advantages(rewards, normalize_std=normalize_std, ddof=ddof, eps=eps)
    adv_tok = jnp.broadcast_to(adv_seq.reshape(b, 1), (b, t))
    return policy_loss(logp, old_logp, adv_tok, mask, ref_logp=ref_logp, **policy_kw)
