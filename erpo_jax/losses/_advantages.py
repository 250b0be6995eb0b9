"""Outcome advantages shared by a group of completions of one prompt."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from erpo_jax.losses._check import check_rewards
from erpo_jax.typing import Array, ArrayLike, Float

__all__ = ["group_advantages"]


def group_advantages(
    rewards: Float[ArrayLike, "P G"],
    *,
    normalize_std: bool = True,
    ddof: int = 1,
    eps: float = 1e-6,
) -> Float[Array, "P G"]:
    """Group-relative outcome advantages (GRPO, and Dr. GRPO without the std).

    Implements METHOD.md section 1 (DeepSeekMath, arXiv 2402.03300, eq. 3 of
    the GRPO outcome-supervision setting; Dr. GRPO, arXiv 2503.20783)::

        A[p, g] = (r[p, g] - mean_g r[p]) / (std_g r[p] + eps)     # normalize_std=True
        A[p, g] =  r[p, g] - mean_g r[p]                            # normalize_std=False

    A group whose rewards are all equal gets exactly 0, not the rounding noise
    of ``r - mean`` divided by ``eps``.

    Args:
      rewards: ``[P, G]`` scalar rewards, one row per prompt; ``G >= 2``.
      normalize_std: divide by the group standard deviation (GRPO) or not
        (Dr. GRPO).
      ddof: delta degrees of freedom of the std (1: sample std, the GRPO
        reference code; 0: population std).
      eps: added to the std before dividing.

    Returns:
      ``[P, G]`` float32 advantages, never differentiated (rewards are data).

    Raises:
      ValueError: ``rewards`` is not rank 2 or has ``G < 2``.
    """
    _, g = check_rewards("group_advantages", rewards)
    if ddof < 0 or ddof >= g:
        raise ValueError(f"group_advantages: ddof={ddof} must satisfy 0 <= ddof < G={g}")
    r = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32))
    mean = jnp.mean(r, axis=-1, keepdims=True)
    centred = r - mean
    adv = centred
    if normalize_std:
        std = jnp.sqrt(jnp.sum(centred * centred, axis=-1, keepdims=True) / (g - ddof))
        adv = centred / (std + eps)
    constant = jnp.max(r, axis=-1, keepdims=True) == jnp.min(r, axis=-1, keepdims=True)
    return jnp.where(constant, 0.0, adv)
