"""ERPO: token-level entropy-regulated policy optimization.

"ERPO: Token-Level Entropy-Regulated Policy Optimization for Large Reasoning
Models" (Yu, Li et al., 2026, arXiv 2603.28204), METHOD.md section 2. The
token advantage is built from three parts, each a pure function here so that
a notebook can show it on its own:

1. :func:`entropy_gate` (paper Eq. 7): a sigmoid of the group-z-scored
   sampler entropy, large on "critical decision pivots".
2. :func:`bucket_normalize` (Eq. 8-9): the implicit progress signal
   :func:`progress_signal` z-scored among sibling tokens at the same relative
   position of the group's answers.
3. :func:`result_anchored_synthesis` (Eq. 10): the outcome advantage fixes
   the direction, the gate fixes where credit goes.

What follows the paper and what is ours (see docs/method.md): the gate, the
bucket normalization and ``Psi = W * sign(A) * s_hat`` follow the two public
readings of Eq. 7-10; the defaults ``gamma=5``, ``K=10``, ``beta=0.1``,
``eta=0.2`` come from a public re-implementation; the final assembly
``A_tok = A * omega + eta * Psi`` and its three ``gate_mode`` choices are our
documented choice, since the paper does not publish it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from erpo_jax.losses._advantages import group_advantages
from erpo_jax.losses._check import (
    GATE_MODES,
    check_bt,
    check_choice,
    check_rewards,
    check_rows,
    is_static_zero,
)
from erpo_jax.losses._policy import _split_policy_kw, policy_loss
from erpo_jax.ops import (
    inverse_spread,
    masked_group_moments,
    masked_mean,
    masked_quantile,
    masked_sum,
)
from erpo_jax.typing import Array, ArrayLike, Bool, Float, Int

__all__ = [
    "ErpoAux",
    "bucket_ids",
    "bucket_normalize",
    "entropy_gate",
    "erpo_loss",
    "erpo_token_advantages",
    "progress_signal",
    "result_anchored_synthesis",
]


class ErpoAux(NamedTuple):
    """Diagnostics of :func:`erpo_loss`: every :class:`PolicyAux` field, then ERPO's own."""

    pg_loss: Array
    kl: Array
    approx_kl: Array
    clip_frac_low: Array
    clip_frac_high: Array
    dual_clip_frac: Array
    ratio_mean: Array
    adv_abs_mean: Array
    num_tokens: Array
    gate_mean: Array  # mean W over valid tokens
    cdp_frac: Array  # fraction of valid tokens with W > 0.5 ("critical decision pivots")
    entropy_mean: Array  # mean sampler entropy over valid tokens
    entropy_p90: Array  # 90th percentile of the sampler entropy over valid tokens
    psi_abs_mean: Array  # mean |eta * Psi|, the size of the progress term
    adv_seq_abs_mean: Array  # mean |A_b| over rows


def _check_group(fn: str, b: int, group_size: int) -> None:
    if group_size < 1 or b % group_size:
        raise ValueError(
            f"{fn}: group_size={group_size} must divide the number of rows B={b} "
            "(rows are prompt-major, B = P*G)"
        )


def entropy_gate(
    entropy: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    group_size: int,
    gamma: float = 5.0,
    eps: float = 1e-6,
) -> Float[Array, "B T"]:
    """Entropy-aware gate ``W = sigmoid(gamma * z)`` (ERPO Eq. 7, METHOD.md 2(i)).

    ``z[b, t] = (H[b, t] - mean_group(H)) / (std_group(H) + eps)`` with the
    mean and population std over the valid tokens of all rows of the prompt's
    group. Tokens whose entropy is high relative to sibling answers get
    ``W`` near 1, confident ones near 0.

    Args:
      entropy: ``[B, T]`` entropies of the rollout policy at each sampled
        position (data: never differentiated).
      mask: ``[B, T]`` valid tokens.
      group_size: ``G``, the number of rows per prompt.
      gamma: sharpness of the sigmoid.
      eps: added to the std.

    Returns:
      ``[B, T]`` float32 gate in (0, 1), 0 on masked positions.
    """
    b, _ = check_bt("entropy_gate", entropy=entropy, mask=mask)
    _check_group("entropy_gate", b, group_size)
    mask = jnp.asarray(mask, bool)
    h = jax.lax.stop_gradient(jnp.where(mask, jnp.asarray(entropy, jnp.float32), 0.0))
    mean, std, count = masked_group_moments(h, mask, group_size)
    # Per-group affine map z = (h - mean) * inv, applied row-wise.
    inv = inverse_spread(mean, std, count, eps=eps)
    z = (h - jnp.repeat(mean, group_size)[:, None]) * jnp.repeat(inv, group_size)[:, None]
    return jnp.where(mask, jax.nn.sigmoid(gamma * z), 0.0)


def progress_signal(
    old_logp: Float[ArrayLike, "B T"],
    ref_logp: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    beta: float = 0.1,
) -> Float[Array, "B T"]:
    """Implicit per-token progress ``s = beta * (old_logp - ref_logp)`` (ERPO Eq. 8).

    The rollout policy's log-likelihood drift from the reference, an implicit
    process reward in the DPO sense; detached, 0 on masked positions.
    """
    check_bt("progress_signal", old_logp=old_logp, ref_logp=ref_logp, mask=mask)
    mask = jnp.asarray(mask, bool)
    old = jnp.where(mask, jnp.asarray(old_logp, jnp.float32), 0.0)
    ref = jnp.where(mask, jnp.asarray(ref_logp, jnp.float32), 0.0)
    return jax.lax.stop_gradient(jnp.where(mask, beta * (old - ref), 0.0))


def _valid_positions(mask: Array) -> Array:
    """``pos = cumsum(mask) - 1`` along each row, with a fast path for prefix masks.

    The sampler's masks are right-padded prefixes, where ``pos`` is simply
    ``t``. A prefix test costs one elementwise pass, a cumsum several on CPU;
    ``lax.cond`` runs only the branch it needs (under ``vmap`` both run and
    the result is selected, which is still correct).
    """
    t = mask.shape[-1]
    is_prefix = jnp.all(mask[..., 1:] <= mask[..., :-1])
    return jax.lax.cond(
        is_prefix,
        # "+ 0 * m" makes the branch depend on the mask, so that both branches
        # carry the same varying-axes type inside shard_map; XLA folds it away.
        lambda m: jnp.arange(t, dtype=jnp.int32) + 0 * m.astype(jnp.int32),
        lambda m: jnp.cumsum(m, axis=-1, dtype=jnp.int32) - 1,
        mask,
    )


def bucket_ids(mask: Bool[ArrayLike, "B T"], *, num_buckets: int = 10) -> Int[Array, "B T"]:
    """Relative-position bucket ``k = min(floor(K * pos / n_b), K - 1)`` of each valid token.

    ``pos`` is the token's rank among its row's valid tokens and ``n_b`` the
    row's count; integer arithmetic, so bucket edges are exact. Masked
    positions get ``K`` (one past the last bucket).
    """
    check_bt("bucket_ids", mask=mask)
    if num_buckets < 1:
        raise ValueError(f"bucket_ids: num_buckets={num_buckets} must be >= 1")
    mask = jnp.asarray(mask, bool)
    pos = _valid_positions(mask)
    n = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.int32), 1)
    num = num_buckets * pos
    # Integer division has no SIMD instruction on CPUs and dominated this
    # function; a float quotient is within one of the exact floor, and the
    # two integer comparisons below make it exact.
    k = jnp.floor(num.astype(jnp.float32) / n.astype(jnp.float32)).astype(jnp.int32)
    k = k - (k * n > num) + ((k + 1) * n <= num)
    k = jnp.minimum(k, num_buckets - 1)
    return jnp.where(mask, k, num_buckets)


def _bucket_counts(mask: Array, num_buckets: int) -> Array:
    """Tokens of each row in each bucket, ``[B, K]``, from the row lengths alone.

    Bucket ``k`` holds the ranks ``pos`` with ``k * n <= K * pos < (k + 1) * n``,
    i.e. ``ceil((k + 1) n / K) - ceil(k n / K)`` of them: no pass over tokens.
    """
    n = jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.int32)
    edges = jnp.arange(num_buckets + 1, dtype=jnp.int32)[None, :] * n
    starts = (edges + num_buckets - 1) // num_buckets
    return starts[:, 1:] - starts[:, :-1]


def bucket_normalize(
    signal: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    group_size: int,
    num_buckets: int = 10,
    eps: float = 1e-6,
) -> Float[Array, "B T"]:
    """Bucket-based implicit normalization (ERPO Eq. 9, METHOD.md 2(ii)).

    Each row is cut into ``K`` buckets by relative position
    (:func:`bucket_ids`); a token's signal is z-scored with the mean and
    population std of the valid tokens of its group that fall in the same
    bucket: ``s_hat = (s - mean_{group,k}) / (std_{group,k} + eps)``. This
    puts long and short answers, easy and hard prompts, on one scale.

    Args:
      signal: ``[B, T]`` per-token signal (typically :func:`progress_signal`).
      mask: ``[B, T]`` valid tokens.
      group_size: ``G``.
      num_buckets: ``K``.
      eps: added to the std.

    Returns:
      ``[B, T]`` float32, 0 on masked positions.
    """
    b, t = check_bt("bucket_normalize", signal=signal, mask=mask)
    _check_group("bucket_normalize", b, group_size)
    mask = jnp.asarray(mask, bool)
    s = jax.lax.stop_gradient(jnp.where(mask, jnp.asarray(signal, jnp.float32), 0.0))
    k = bucket_ids(mask, num_buckets=num_buckets)
    p = b // group_size
    # Shift by the group mean first: the one-pass variance E[x^2] - E[x]^2
    # below then loses only ~1e-7 * (1 + offset^2 / var) of relative
    # precision, where offset is a bucket's distance from its group's mean.
    # Shift by the group mean first: the one-pass variance E[x^2] - E[x]^2
    # below then loses only ~1e-7 * (1 + offset^2 / var) of relative
    # precision, where offset is a bucket's distance from its group's mean.
    group_count = jnp.sum(mask.reshape(p, -1), axis=-1, dtype=jnp.float32)
    shift = masked_sum(s.reshape(p, -1), mask.reshape(p, -1), axis=-1) / jnp.maximum(group_count, 1)
    x = jnp.where(mask, s - jnp.repeat(shift, group_size)[:, None], 0.0)
    # One segment per (prompt, bucket) plus a spare one for masked tokens: a
    # single scatter-add of (x, x^2) pairs, O(B*T) whatever K is. Counts come
    # from the row lengths (_bucket_counts), not from a pass over tokens.
    group = jnp.arange(b, dtype=jnp.int32)[:, None] // group_size
    seg = jnp.where(mask, group * num_buckets + k, p * num_buckets).reshape(-1)
    xf = x.reshape(-1)
    sums = jax.ops.segment_sum(jnp.stack([xf, xf * xf], axis=-1), seg, p * num_buckets + 1)
    counts = _bucket_counts(mask, num_buckets).reshape(p, group_size, num_buckets).sum(axis=1)
    counts = jnp.append(counts.reshape(-1), 0).astype(jnp.float32)
    mean = sums[:, 0] / jnp.maximum(counts, 1.0)
    std = jnp.sqrt(jnp.maximum(sums[:, 1] / jnp.maximum(counts, 1.0) - mean * mean, 0.0))
    # The degenerate-spread test must see the signal's own mean, not the shifted one.
    inv = inverse_spread(mean + jnp.append(shift.repeat(num_buckets), 0.0), std, counts, eps=eps)
    # Gather each token's bucket statistics in one pass: z = (x - mean) * inv.
    table = jnp.stack([mean, inv], axis=-1)[seg]
    z = (xf - table[:, 0]) * table[:, 1]
    return jnp.where(mask, z.reshape(b, t), 0.0)


def result_anchored_synthesis(
    adv_seq: Float[ArrayLike, " B"],
    gate: Float[ArrayLike, "B T"],
    s_hat: Float[ArrayLike, "B T"] | None,
    mask: Bool[ArrayLike, "B T"],
    *,
    eta: float = 0.2,
    gate_mode: str = "redistribute",
) -> Float[Array, "B T"]:
    """Result-anchored advantage synthesis (ERPO Eq. 10, METHOD.md 2(iii)).

    ``Psi = W * sign(A_b) * s_hat`` and ``A_tok = A_b * omega + eta * Psi``
    with ``omega`` from ``gate_mode`` (our documented choice; the paper does
    not publish the assembly):

    - ``"redistribute"`` (default): ``omega = n_b * W / sum_t W``, mean 1
      over the row, so the row's total credit equals GRPO's but is moved
      onto high-entropy tokens;
    - ``"amplify"``: ``omega = 1 + W``;
    - ``"none"``: ``omega = 1`` (with ``eta=0`` this is GRPO exactly).

    Args:
      adv_seq: ``[B]`` outcome advantages ``A_b``.
      gate: ``[B, T]`` gate ``W`` from :func:`entropy_gate`.
      s_hat: ``[B, T]`` normalized progress from :func:`bucket_normalize`;
        may be None when ``eta`` is 0.
      mask: ``[B, T]`` valid tokens.
      eta: weight of the progress term.
      gate_mode: ``"redistribute"``, ``"amplify"`` or ``"none"``.

    Returns:
      ``[B, T]`` float32 token advantages, 0 on masked positions, detached.
    """
    fn = "result_anchored_synthesis"
    check_choice(fn, "gate_mode", gate_mode, GATE_MODES)
    b, _ = check_bt(fn, gate=gate, s_hat=s_hat, mask=mask)
    check_rows(fn, "adv_seq", adv_seq, b)
    if s_hat is None and not is_static_zero(eta):
        raise ValueError(f"{fn}: eta={eta} needs `s_hat`, which is None")
    mask = jnp.asarray(mask, bool)
    a = jnp.asarray(adv_seq, jnp.float32)[:, None]
    w = jnp.where(mask, jnp.asarray(gate, jnp.float32), 0.0)
    if gate_mode == "redistribute":
        n = jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.float32)
        w_sum = jnp.sum(w, axis=-1, keepdims=True)
        omega = jnp.where(w_sum > 0, n * w / jnp.where(w_sum > 0, w_sum, 1.0), 0.0)
    elif gate_mode == "amplify":
        omega = 1.0 + w
    else:
        omega = jnp.ones_like(w)
    adv_tok = a * omega
    if not is_static_zero(eta):
        s = jnp.where(mask, jnp.asarray(s_hat, jnp.float32), 0.0)
        adv_tok = adv_tok + eta * (w * jnp.sign(a) * s)
    return jax.lax.stop_gradient(jnp.where(mask, adv_tok, 0.0))


class _ErpoParts(NamedTuple):
    adv_seq: Array
    gate: Array
    s_hat: Array | None
    adv_tok: Array


def _erpo_parts(
    fn: str,
    rewards: Any,
    entropy: Any,
    mask: Any,
    *,
    old_logp: Any,
    ref_logp: Any,
    gamma: float,
    num_buckets: int,
    beta: float,
    eta: float,
    gate_mode: str,
    eps: float,
    normalize_std: bool,
    ddof: int,
) -> _ErpoParts:
    check_choice(fn, "gate_mode", gate_mode, GATE_MODES)
    b, _ = check_bt(fn, entropy=entropy, mask=mask, old_logp=old_logp, ref_logp=ref_logp)
    _, g = check_rewards(fn, rewards, b)
    if not is_static_zero(eta):
        missing = [n for n, v in (("old_logp", old_logp), ("ref_logp", ref_logp)) if v is None]
        if missing:
            raise ValueError(
                f"{fn}: eta={eta} uses the progress signal beta * (old_logp - ref_logp), "
                f"but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} None; "
                "pass them or set eta=0"
            )
    adv_seq = group_advantages(rewards, normalize_std=normalize_std, ddof=ddof, eps=eps).reshape(b)
    gate = entropy_gate(entropy, mask, group_size=g, gamma=gamma, eps=eps)
    s_hat = None
    if not is_static_zero(eta):
        s = progress_signal(old_logp, ref_logp, mask, beta=beta)
        s_hat = bucket_normalize(s, mask, group_size=g, num_buckets=num_buckets, eps=eps)
    adv_tok = result_anchored_synthesis(adv_seq, gate, s_hat, mask, eta=eta, gate_mode=gate_mode)
    return _ErpoParts(adv_seq, gate, s_hat, adv_tok)


def erpo_token_advantages(
    rewards: Float[ArrayLike, "P G"],
    entropy: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    old_logp: Float[ArrayLike, "B T"] | None = None,
    ref_logp: Float[ArrayLike, "B T"] | None = None,
    gamma: float = 5.0,
    num_buckets: int = 10,
    beta: float = 0.1,
    eta: float = 0.2,
    gate_mode: str = "redistribute",
    eps: float = 1e-6,
    normalize_std: bool = True,
    ddof: int = 1,
) -> Float[Array, "B T"]:
    """ERPO token advantages ``A_tok[B, T]`` (METHOD.md section 2, all three parts).

    ``A_b`` from :func:`group_advantages`; gate ``W`` from
    :func:`entropy_gate`; ``s_hat`` from :func:`bucket_normalize` of
    :func:`progress_signal`; assembled by :func:`result_anchored_synthesis`.

    Args:
      rewards: ``[P, G]`` outcome rewards, ``P * G == B``.
      entropy: ``[B, T]`` sampler entropies (data).
      mask: ``[B, T]`` valid tokens.
      old_logp, ref_logp: ``[B, T]`` rollout and reference log-probs; needed
        only when ``eta != 0``.
      gamma: gate sharpness (default 5.0, from a public re-implementation).
      num_buckets: ``K`` progress buckets (default 10).
      beta: scale of the progress signal (default 0.1).
      eta: weight of the progress term (default 0.2; 0 needs no ``ref_logp``).
      gate_mode: ``"redistribute"`` (default), ``"amplify"`` or ``"none"``.
      eps: added to every std (advantage, gate and bucket z-scores).
      normalize_std, ddof: see :func:`group_advantages`.

    Returns:
      ``[B, T]`` float32 token advantages, 0 where masked, detached.

    Raises:
      ValueError: shapes disagree, ``G < 2``, an unknown ``gate_mode``, or
        ``eta != 0`` without ``old_logp`` / ``ref_logp`` (the message names
        the missing one).
    """
    return _erpo_parts(
        "erpo_token_advantages",
        rewards,
        entropy,
        mask,
        old_logp=old_logp,
        ref_logp=ref_logp,
        gamma=gamma,
        num_buckets=num_buckets,
        beta=beta,
        eta=eta,
        gate_mode=gate_mode,
        eps=eps,
        normalize_std=normalize_std,
        ddof=ddof,
    ).adv_tok


def erpo_loss(
    logp: Float[ArrayLike, "B T"],
    old_logp: Float[ArrayLike, "B T"],
    rewards: Float[ArrayLike, "P G"],
    entropy: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    ref_logp: Float[ArrayLike, "B T"] | None = None,
    gamma: float = 5.0,
    num_buckets: int = 10,
    beta: float = 0.1,
    eta: float = 0.2,
    gate_mode: str = "redistribute",
    eps: float = 1e-6,
    normalize_std: bool = True,
    ddof: int = 1,
    **policy_kw: Any,
) -> tuple[Float[Array, ""], ErpoAux]:
    """ERPO loss: :func:`policy_loss` with the token advantages of :func:`erpo_token_advantages`.

    Args:
      logp: ``[B, T]`` current-policy log-probs of the sampled tokens.
      old_logp: ``[B, T]`` rollout-policy log-probs (ratio and progress signal).
      rewards: ``[P, G]`` outcome rewards.
      entropy: ``[B, T]`` sampler entropies (data).
      mask: ``[B, T]`` valid tokens.
      ref_logp: ``[B, T]`` reference log-probs; needed when ``eta != 0`` and
        used by the KL term when ``kl_coef != 0``.
      gamma, num_buckets, beta, eta, gate_mode, eps, normalize_std, ddof:
        see :func:`erpo_token_advantages`.
      **policy_kw: keywords of :func:`policy_loss`.

    Returns:
      ``(loss, aux)`` with ``aux`` an :class:`ErpoAux`.

    Example:
      >>> import numpy as np
      >>> rewards = np.array([[1.0, 0.0]], np.float32)
      >>> entropy = np.array([[2.0, 0.1, 0.1], [0.5, 0.5, 0.5]], np.float32)
      >>> mask = np.ones((2, 3), bool)
      >>> logp = np.full((2, 3), -1.0, np.float32)
      >>> loss, aux = erpo_loss(logp, logp, rewards, entropy, mask, eta=0.0)
      >>> round(float(loss), 6)  # ratio 1: minus the mean token advantage, 0 here
      0.0
      >>> round(float(aux.cdp_frac), 4)  # one token in six is above the group's mean entropy
      0.1667
    """
    _split_policy_kw(policy_kw, "erpo_loss")
    check_bt("erpo_loss", logp=logp, old_logp=old_logp, entropy=entropy, mask=mask)
    parts = _erpo_parts(
        "erpo_loss",
        rewards,
        entropy,
        mask,
        old_logp=old_logp,
        ref_logp=ref_logp,
        gamma=gamma,
        num_buckets=num_buckets,
        beta=beta,
        eta=eta,
        gate_mode=gate_mode,
        eps=eps,
        normalize_std=normalize_std,
        ddof=ddof,
    )
    loss, paux = policy_loss(logp, old_logp, parts.adv_tok, mask, ref_logp=ref_logp, **policy_kw)
    mask = jnp.asarray(mask, bool)
    h = jax.lax.stop_gradient(jnp.where(mask, jnp.asarray(entropy, jnp.float32), 0.0))
    psi_abs_mean = jnp.float32(0.0)
    if parts.s_hat is not None:
        # |eta * W * sign(A) * s_hat|, without building the advantage twice.
        psi = jnp.abs(eta * parts.gate * parts.s_hat) * (parts.adv_seq != 0)[:, None]
        psi_abs_mean = masked_mean(psi, mask)
    aux = ErpoAux(
        *paux,
        gate_mean=masked_mean(parts.gate, mask),
        cdp_frac=masked_mean((parts.gate > 0.5).astype(jnp.float32), mask),
        entropy_mean=masked_mean(h, mask),
        entropy_p90=jnp.where(jnp.any(mask), masked_quantile(h, mask, 0.9), 0.0),
        psi_abs_mean=psi_abs_mean,
        adv_seq_abs_mean=jnp.mean(jnp.abs(parts.adv_seq)),
    )
    return loss, aux
