"""Token credit beyond ERPO: high-entropy minority tokens and ARCA.

Both return arrays that reshape a token advantage; compose them with
:func:`erpo_jax.losses.policy_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from erpo_jax.losses._check import check_bt, check_rows, concrete_float
from erpo_jax.ops import masked_quantile
from erpo_jax.typing import Array, ArrayLike, Bool, Float

__all__ = ["arca_token_advantages", "arca_token_weights", "high_entropy_mask"]


def high_entropy_mask(
    entropy: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    top_fraction: float | Array = 0.2,
) -> Bool[Array, "B T"]:
    """Valid tokens whose entropy is in the top ``top_fraction`` of the batch.

    "Beyond the 80/20 rule: high-entropy minority tokens drive effective RL
    for LLM reasoning" (arXiv 2506.01939, Sec. 5): keep the policy gradient
    only on the forking tokens. The threshold is the ``1 - top_fraction``
    quantile of the valid entropies (NumPy's linear rule, see
    :func:`erpo_jax.ops.masked_quantile`); tokens at or above it are kept, so
    ties at the threshold are all kept. Use the result as the mask of any
    token loss, e.g. ``policy_loss(..., mask=high_entropy_mask(H, mask))``
    (with ``agg="token_mean"`` the loss averages over kept tokens, as the
    paper does).

    Args:
      entropy: ``[B, T]`` sampler entropies (data).
      mask: ``[B, T]`` valid tokens.
      top_fraction: fraction of valid tokens to keep, in (0, 1]; may be a
        traced scalar.

    Returns:
      ``[B, T]`` bool, a subset of ``mask`` (all False when nothing is valid).
    """
    check_bt("high_entropy_mask", entropy=entropy, mask=mask)
    frac = concrete_float(top_fraction)
    if frac is not None and not 0.0 < frac <= 1.0:
        raise ValueError(f"high_entropy_mask: top_fraction={top_fraction} must lie in (0, 1]")
    mask = jnp.asarray(mask, bool)
    h = jax.lax.stop_gradient(jnp.where(mask, jnp.asarray(entropy, jnp.float32), 0.0))
    # No float(): top_fraction may be a traced schedule value.
    tau = masked_quantile(h, mask, 1.0 - jnp.asarray(top_fraction, jnp.float32))
    return mask & (h >= tau)


def arca_token_weights(
    residual_norm: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    power: float = 2.0,
    eps: float = 1e-8,
) -> Float[Array, "B T"]:
    """ARCA token weights ``w_t = (alpha_t + eps)^k / sum_t (alpha_t + eps)^k`` per row.

    ARCA (arXiv 2606.00257; METHOD.md section 3): ``alpha_t`` is how far the
    LoRA adapter moves the last hidden state at token ``t``,
    ``||h_t(adapter on) - h_t(adapter off)||_2``; ``k = power`` (2 in the
    paper's code). Computed in log space so that large norms or powers do
    not overflow; detached.

    Args:
      residual_norm: ``[B, T]`` non-negative norms ``alpha``.
      mask: ``[B, T]`` valid tokens.
      power: exponent ``k``.
      eps: added to ``alpha`` before the power.

    Returns:
      ``[B, T]`` float32 weights summing to 1 over each non-empty row, 0 elsewhere.
    """
    check_bt("arca_token_weights", residual_norm=residual_norm, mask=mask)
    mask = jnp.asarray(mask, bool)
    alpha = jax.lax.stop_gradient(jnp.where(mask, jnp.asarray(residual_norm, jnp.float32), 1.0))
    logits = jnp.where(mask, power * jnp.log(jnp.abs(alpha) + eps), -jnp.inf)
    # A softmax over each row's valid tokens; an all-masked row would be
    # 0/0, so it gets a dummy finite row and is zeroed afterwards.
    any_valid = jnp.any(mask, axis=-1, keepdims=True)
    w = jax.nn.softmax(jnp.where(any_valid, logits, 0.0), axis=-1)
    return jnp.where(mask, w, 0.0)


def arca_token_advantages(
    adv_seq: Float[ArrayLike, " B"],
    residual_norm: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    power: float = 2.0,
    eps: float = 1e-8,
) -> Float[Array, "B T"]:
    """ARCA token advantages ``A_b * n_b * w_t`` (METHOD.md section 3).

    ARCA's loss ``-mean_b A_b sum_t w_t logp_t`` equals :func:`policy_loss`
    with these advantages and ``agg="seq_mean_token_mean"`` (at ratio 1;
    the clipped surrogate adds PPO's trust region on top).

    Args:
      adv_seq: ``[B]`` outcome advantages.
      residual_norm, mask, power, eps: see :func:`arca_token_weights`.

    Returns:
      ``[B, T]`` float32, 0 on masked positions, detached.
    """
    b, _ = check_bt("arca_token_advantages", residual_norm=residual_norm, mask=mask)
    check_rows("arca_token_advantages", "adv_seq", adv_seq, b)
    mask = jnp.asarray(mask, bool)
    w = arca_token_weights(residual_norm, mask, power=power, eps=eps)
    n = jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.float32)
    a = jax.lax.stop_gradient(jnp.asarray(adv_seq, jnp.float32))[:, None]
    return jnp.where(mask, a * n * w, 0.0)
