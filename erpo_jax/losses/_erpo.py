"""ERPO: token-level entropy-regulated policy optimization.

"ERPO: Token-Level Entropy-Regulated Policy Optimization for Large Reasoning
Models" (Yu, Li et al., 2026, arXiv 2603.28204), METHOD.md section 2. The
paper's equations could not be read in full; equation numbers below are
those of the public re-implementation, whose reading two independent
sources agree on. The token advantage is built from three parts, each a pure
function here so that a notebook can show it on its own:

1. :func:`progress_signal` (Eq. 7): the implicit per-token progress
   ``s = beta * clip(old_logp - ref_logp, -20, 20)``.
2. :func:`entropy_gate` (Eq. 8): a sigmoid of the group-z-scored sampler
   entropy, large on "critical decision pivots".
3. :func:`bucket_normalize` (Eq. 9): ``s`` z-scored among sibling tokens at
   the same relative position of the group's answers.
4. :func:`result_anchored_synthesis` (Eq. 10): the outcome advantage fixes
   the direction, the gate fixes where credit goes.

:func:`erpo_token_terms` returns every intermediate as an :class:`ErpoTerms`;
:func:`erpo_token_advantages` only the token advantage; :func:`erpo_loss` the
clipped policy loss on it with diagnostics (:class:`ErpoAux`).

What follows the paper and what is ours (see docs/method.md): the gate, the
bucket normalization and ``Psi = W * sign(A) * s_hat`` follow the two public
readings of Eq. 7-10; the defaults ``gamma=5``, ``K=10``, ``beta=0.1``,
``eta=0.2`` come from the public re-implementation; the final assembly
``A_tok = A * omega + eta * Psi`` and its three ``gate_mode`` choices are our
documented choice, since the paper does not publish it.

Numerics (METHOD.md section 2, "Numerical contract"): every set statistic
(the group's entropy moments, each bucket's progress moments) is computed by
the corrected two-pass algorithm, accurate to float32 rounding whatever the
offset of the set; redistribution is a softmax in log space; the progress
log-ratio is clipped to ``[-20, 20]``; so one extreme token never turns
another token or row into NaN.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from erpo_jax.losses._advantages import group_advantages
from erpo_jax.losses._check import (
    GATE_MODES,
    PROGRESS_SOURCES,
    check_bt,
    check_choice,
    check_rewards,
    check_rows,
    concrete_float,
    is_static_zero,
)
from erpo_jax.losses._policy import LOG_RATIO_CLIP, PolicyAux, _split_policy_kw, policy_loss
from erpo_jax.ops import inverse_spread, masked_mean, masked_quantile
from erpo_jax.ops._masked import masked_group_zscore
from erpo_jax.typing import Array, ArrayLike, Bool, Float, Int

__all__ = [
    "ErpoAux",
    "ErpoTerms",
    "bucket_ids",
    "bucket_normalize",
    "entropy_gate",
    "erpo_loss",
    "erpo_token_advantages",
    "erpo_token_terms",
    "progress_signal",
    "result_anchored_synthesis",
]

# Entropies are data from the sampler, below log(V) < 20 nats for any real
# vocabulary. A non-finite or absurd value is clamped to this bound (NaN
# counts as 0) so that the group's moments stay finite: one such token
# shifts its group's statistics but never turns them into NaN.
_ENTROPY_BOUND = 1e6


class ErpoAux(NamedTuple):
    """Diagnostics of :func:`erpo_loss`: every :class:`PolicyAux` field, then ERPO's own.

    Float32 scalars. "Valid tokens" are those with ``mask`` True. The
    progress fields (``psi_abs_mean``, ``progress_abs_mean``,
    ``progress_std_mean``) are 0 when ``eta`` is statically 0, because the
    progress signal is then not computed.
    """

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
    # Fraction of valid tokens with W > 0.5, i.e. (for gamma > 0) entropy
    # strictly above its group's mean entropy: the "critical decision
    # pivots". A degenerate group (z = 0, W = 0.5) contributes none.
    cdp_frac: Array
    entropy_mean: Array  # mean sampler entropy over valid tokens
    entropy_p90: Array  # 90th percentile of the sampler entropy over valid tokens
    psi_abs_mean: Array  # mean |Psi| over valid tokens (eta not applied)
    adv_seq_abs_mean: Array  # mean |A_b| over rows
    # Among valid tokens of rows with A_b != 0, the fraction whose token
    # advantage has another sign than A_b (sign(A_tok) != sign(A_b)); 0 when
    # there are none.
    sign_flip_frac: Array
    omega_max: Array  # max omega over valid tokens (0 when there are none)
    # Mean over non-empty rows of (sum_t omega)^2 / (n_b sum_t omega^2): the
    # effective fraction of a row's tokens that carry its credit (1 = even).
    eff_token_frac: Array
    progress_abs_mean: Array  # mean |s| over valid tokens, before normalization
    # Mean over non-empty (prompt, bucket) sets of the population std of s in
    # the set: the spread that bucket normalization divides by (before the floor).
    progress_std_mean: Array


class ErpoTerms(NamedTuple):
    """Every intermediate of ERPO's token advantage, each ``[B, T]`` float32, 0 where masked.

    METHOD.md section 2; equation numbers of the public re-implementation.
    ``adv_tok = A_b * omega + eta * psi`` with ``A_b`` from
    :func:`~erpo_jax.losses.group_advantages`. ``progress``,
    ``progress_hat`` and ``psi`` are 0 when the progress signal is not
    computed (``eta`` statically 0 and its log-probs not given).
    """

    gate: Array  # W = sigmoid(gamma * z), Eq. 8
    progress: Array  # s = beta * clip(old_logp - ref_logp, -20, 20), Eq. 7
    progress_hat: Array  # s_hat, s z-scored within (prompt, bucket), Eq. 9
    psi: Array  # Psi = W * sign(A_b) * s_hat (no W with psi_gate=False), Eq. 10
    omega: Array  # credit weight of gate_mode
    adv_tok: Array  # the token advantage, exactly erpo_token_advantages'


def _check_group(fn: str, b: int, group_size: int) -> None:
    if group_size < 1 or b % group_size:
        raise ValueError(
            f"{fn}: group_size={group_size} must divide the number of rows B={b} "
            "(rows are prompt-major, B = P*G)"
        )


def _gate_argument(entropy: Any, mask: Array, group_size: int, gamma: Any, eps: float) -> Array:
    """``gamma * z`` with ``z`` the group z-score of the (cleaned) entropy; 0 where masked."""
    h = jnp.where(mask, jnp.asarray(entropy, jnp.float32), 0.0)
    h = jnp.clip(jnp.where(jnp.isnan(h), 0.0, h), -_ENTROPY_BOUND, _ENTROPY_BOUND)
    z = masked_group_zscore(jax.lax.stop_gradient(h), mask, group_size, eps=eps)
    return jnp.asarray(gamma, jnp.float32) * z


def entropy_gate(
    entropy: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    group_size: int,
    gamma: float | Array = 5.0,
    eps: float = 1e-6,
    log_space: bool = False,
) -> Float[Array, "B T"]:
    """Entropy-aware gate ``W = sigmoid(gamma * z)`` (ERPO Eq. 8, METHOD.md 2(i)).

    ``z[b, t] = (H[b, t] - mean_group(H)) / (std_group(H) + eps)`` with the
    mean and population std over the valid tokens of all rows of the prompt's
    group (corrected two-pass moments; a degenerate group, see
    :func:`erpo_jax.ops.inverse_spread`, gives ``z = 0``). Tokens whose
    entropy is high relative to sibling answers get ``W`` near 1, confident
    ones near 0. A NaN entropy counts as 0 nats and any entropy is clamped to
    ``[-1e6, 1e6]``, so one bad value cannot make its group NaN.

    Args:
      entropy: ``[B, T]`` entropies of the rollout policy at each sampled
        position (data: never differentiated).
      mask: ``[B, T]`` valid tokens.
      group_size: ``G``, the number of rows per prompt.
      gamma: sharpness of the sigmoid (may be traced).
      eps: added to the std.
      log_space: return ``log W = log_sigmoid(gamma * z)`` instead, which
        stays finite where ``W`` underflows to 0 in float32 (what
        ``gate_mode="redistribute"`` needs; pass it to
        :func:`result_anchored_synthesis` as ``log_gate``).

    Returns:
      ``[B, T]`` float32 gate in (0, 1) (or its log), 0 on masked positions.
    """
    b, _ = check_bt("entropy_gate", entropy=entropy, mask=mask)
    _check_group("entropy_gate", b, group_size)
    mask = jnp.asarray(mask, bool)
    y = _gate_argument(entropy, mask, group_size, gamma, eps)
    out = jax.nn.log_sigmoid(y) if log_space else jax.nn.sigmoid(y)
    return jnp.where(mask, out, 0.0)


def progress_signal(
    old_logp: Float[ArrayLike, "B T"],
    ref_logp: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    beta: float | Array = 0.1,
) -> Float[Array, "B T"]:
    """Implicit per-token progress ``s = beta * clip(old_logp - ref_logp, -20, 20)`` (ERPO Eq. 7).

    The rollout policy's log-likelihood drift from the reference, an implicit
    process reward in the DPO sense; detached, 0 on masked positions. The
    log-ratio is clipped to ``[-20, 20]`` like the importance ratio, so a
    valid token with ``ref_logp = -inf`` gives ``s = 20 * beta``, not inf; a
    NaN log-ratio (both log-probs ``-inf``, or a NaN input) counts as 0.
    For METHOD's ``progress_source="current"`` pass the detached current
    ``logp`` as ``old_logp``.

    Args:
      old_logp, ref_logp: ``[B, T]`` log-probs of the sampled tokens under the
        rollout (or current) and reference policies.
      mask: ``[B, T]`` valid tokens.
      beta: scale of the signal (may be traced).
    """
    check_bt("progress_signal", old_logp=old_logp, ref_logp=ref_logp, mask=mask)
    mask = jnp.asarray(mask, bool)
    old = jnp.where(mask, jnp.asarray(old_logp, jnp.float32), 0.0)
    ref = jnp.where(mask, jnp.asarray(ref_logp, jnp.float32), 0.0)
    d = old - ref
    d = jnp.clip(jnp.where(jnp.isnan(d), 0.0, d), -LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    s = jnp.asarray(beta, jnp.float32) * d
    return jax.lax.stop_gradient(jnp.where(mask, s, 0.0))


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


class _BucketStats(NamedTuple):
    s_hat: Array  # [B, T]
    std: Array  # [P, K] population std of each (prompt, bucket) set
    set_size: Array  # [P, K] valid tokens in each set


def _compact_rows(x: Array, mask: Array) -> Array:
    """Move each row's valid entries to its front, in order (identity for prefix masks).

    A prefix mask, what the sampler produces, needs no work; ``lax.cond``
    runs the scatter only for masks with holes.
    """
    b, t = x.shape
    is_prefix = jnp.all(mask[:, 1:] <= mask[:, :-1])

    def compact(x: Array, m: Array) -> Array:
        pos = jnp.cumsum(m, axis=-1, dtype=jnp.int32) - 1
        pos = jnp.where(m, pos, t)  # masked entries go out of bounds and are dropped
        rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
        return jnp.zeros_like(x).at[rows, pos].set(x, mode="drop")

    # Both branches read x and the mask (x is already 0 where masked), so they
    # carry the same varying-axes type inside shard_map.
    return jax.lax.cond(is_prefix, lambda x, m: jnp.where(m, x, 0.0), compact, x, mask)


def _bucket_stats(
    s: Array, mask: Array, group_size: int, num_buckets: int, eps: float, std_floor: Any
) -> _BucketStats:
    """Corrected two-pass moments of every (prompt, bucket) set and the z-scores they give.

    Bucket ``k`` of a row with ``n`` valid tokens holds the ranks
    ``ceil(k n / K) <= pos < ceil((k + 1) n / K)``: a contiguous run of the
    row's (compacted) valid tokens, at most ``L = ceil(T / K)`` long. Each
    run is cut out as one dynamic slice, which lays the batch out as
    ``[P, G, K, L]``; both passes of the corrected two-pass algorithm are
    then plain reductions over the G and L axes. Each token then takes its
    set's ``(shift, corr, inv)`` by ``K - 1`` compare-and-selects on its
    rank. No scatter (except the compaction of masks with holes) and no
    per-token gather: on CPU this is faster than the single scatter-add of
    ``(x, x^2)`` and the gather that the one-pass variance needed
    (docs/benchmarks.md).
    """
    b, t = s.shape
    k_count = num_buckets
    p = b // group_size
    length = -(-t // k_count)
    x = jnp.where(mask, s, 0.0)
    n_b = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    edges = jnp.arange(k_count + 1, dtype=jnp.int32)[None, :] * n_b[:, None]
    starts = (edges + k_count - 1) // k_count  # [B, K + 1]: ceil(k n / K)
    sizes = starts[:, 1:] - starts[:, :-1]  # [B, K]
    xp = jnp.pad(_compact_rows(x, mask), ((0, 0), (0, length)))

    def row_slices(row: Array, row_starts: Array) -> Array:
        return jax.vmap(lambda a: jax.lax.dynamic_slice_in_dim(row, a, length))(row_starts)

    runs = jax.vmap(row_slices)(xp, starts[:, :-1])  # [B, K, L]
    valid = jnp.arange(length, dtype=jnp.int32)[None, None, :] < sizes[:, :, None]
    runs = runs.reshape(p, group_size, k_count, length)
    valid = valid.reshape(p, group_size, k_count, length)
    count = jnp.sum(sizes.reshape(p, group_size, k_count), axis=1).astype(jnp.float32)
    denom = jnp.maximum(count, 1.0)
    # Pass one: the plain mean. Pass two: deviations from it, whose mean is
    # the rounding error of the first (corr) and whose squares give the
    # variance without the cancellation of E[x^2] - E[x]^2.
    shift = jnp.sum(jnp.where(valid, runs, 0.0), axis=(1, 3)) / denom
    dev = jnp.where(valid, runs - shift[:, None, :, None], 0.0)
    corr = jnp.sum(dev, axis=(1, 3)) / denom
    var = jnp.sum(dev * dev, axis=(1, 3)) / denom - corr * corr
    std = jnp.sqrt(jnp.maximum(var, 0.0))
    inv = inverse_spread(shift + corr, std, count, eps=eps, floor=std_floor)
    # Each token's (shift, corr, inv): its bucket is the last k whose first
    # rank starts[k] <= pos (the same k as bucket_ids). K - 1 compare-and-
    # selects per token fuse into one elementwise loop, about 20x cheaper on
    # CPU than a gather from the [B, K] table, and need no bucket id.
    pos = _valid_positions(mask)
    rows = [jnp.repeat(v, group_size, axis=0) for v in (shift, corr, inv)]  # [B, K] each
    tok_shift, tok_corr, tok_inv = (v[:, :1] for v in rows)
    for k in range(1, k_count):
        hit = pos >= starts[:, k : k + 1]
        tok_shift = jnp.where(hit, rows[0][:, k : k + 1], tok_shift)
        tok_corr = jnp.where(hit, rows[1][:, k : k + 1], tok_corr)
        tok_inv = jnp.where(hit, rows[2][:, k : k + 1], tok_inv)
    z = ((x - tok_shift) - tok_corr) * tok_inv
    return _BucketStats(jnp.where(mask, z, 0.0), std, count)


def bucket_normalize(
    signal: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    group_size: int,
    num_buckets: int = 10,
    eps: float = 1e-6,
    std_floor: float | Array = 0.0,
) -> Float[Array, "B T"]:
    """Bucket-based implicit normalization (ERPO Eq. 9, METHOD.md 2(ii)).

    Each row is cut into ``K`` buckets by relative position
    (:func:`bucket_ids`); a token's signal is z-scored with the mean and
    population std of the valid tokens of its group that fall in the same
    bucket: ``s_hat = (s - mean_{group,k}) / (max(std_{group,k}, std_floor) + eps)``.
    This puts long and short answers, easy and hard prompts, on one scale.
    A degenerate set (one token, or ``std <= 1e-6 |mean|``; see
    :func:`erpo_jax.ops.inverse_spread`) gives ``s_hat = 0``. The moments are
    corrected two-pass, accurate whatever the set's offset from zero or from
    the group's mean.

    Args:
      signal: ``[B, T]`` per-token signal (typically :func:`progress_signal`,
        which is finite on valid tokens; a non-finite value here would make
        its own (prompt, bucket) set NaN, and no other set).
      mask: ``[B, T]`` valid tokens.
      group_size: ``G``.
      num_buckets: ``K``.
      eps: added to the std.
      std_floor: lower bound on the std (METHOD's ``progress_std_floor``;
        may be traced).

    Returns:
      ``[B, T]`` float32, 0 on masked positions.
    """
    b, _ = check_bt("bucket_normalize", signal=signal, mask=mask)
    _check_group("bucket_normalize", b, group_size)
    if num_buckets < 1:
        raise ValueError(f"bucket_normalize: num_buckets={num_buckets} must be >= 1")
    mask = jnp.asarray(mask, bool)
    s = jax.lax.stop_gradient(jnp.where(mask, jnp.asarray(signal, jnp.float32), 0.0))
    return _bucket_stats(s, mask, group_size, num_buckets, eps, std_floor).s_hat


class _Synthesis(NamedTuple):
    omega: Array
    psi: Array
    adv_tok: Array


# Below this gate argument sigmoid(y) = exp(y) / (1 + exp(y)) equals exp(y)
# to float32 precision (the relative difference is exp(y) < 1e-26), and
# sigmoid(y) itself is still a normal float32 (> 8e-27).
_LOG_SPACE_BELOW = -60.0


def _redistribution_weights(
    gate: Array, mask: Array, gate_arg: Array | None, log_gate: Array | None
) -> Array:
    """Unnormalized ``exp(log W - max_t log W)`` per row, 0 where masked.

    This is ``softmax_t(log W)`` before the division by its row sum (which
    is at least 1, from the row's largest gate). From the gate argument
    ``y = gamma z`` (the internal path) it is ``W / W_max`` while the row's
    largest gate is a normal float32 (``y_max >= -60``), a ratio accurate
    to a few ulps, and ``exp(y - y_max)`` below, where ``W = exp(y)`` to
    float32 precision; both equal ``exp(log_sigmoid(y) - log_sigmoid(y_max))``
    to float32 rounding, and neither is all zero on a non-empty row. From
    ``log_gate`` it is computed literally. From ``gate`` alone (public
    callers) it is ``W / W_max``, and a row whose gates are all exactly 0
    gets equal weights (omega = 1).
    """
    if gate_arg is not None:
        y = jnp.where(mask, gate_arg, -jnp.inf)
        y_max = jnp.max(y, axis=-1, keepdims=True)
        y_max = jnp.where(jnp.isfinite(y_max), y_max, 0.0)  # empty rows
        ratio = gate / jax.nn.sigmoid(y_max)
        e = jnp.where(y_max < _LOG_SPACE_BELOW, jnp.exp(y - y_max), ratio)
    elif log_gate is not None:
        lw = jnp.where(mask, log_gate, -jnp.inf)
        top = jnp.max(lw, axis=-1, keepdims=True)
        e = jnp.exp(lw - jnp.where(jnp.isfinite(top), top, 0.0))
    else:
        top = jnp.max(jnp.where(mask, gate, 0.0), axis=-1, keepdims=True)
        e = jnp.where(top > 0, gate / jnp.where(top > 0, top, 1.0), 1.0)
    return jnp.where(mask, e, 0.0)


def _synthesis(
    adv_seq: Array,
    gate: Array,
    s_hat: Array | None,
    mask: Array,
    *,
    eta: Any,
    gate_mode: str,
    psi_gate: bool,
    gate_arg: Array | None = None,
    log_gate: Array | None = None,
) -> _Synthesis:
    a = adv_seq[:, None]
    w = jnp.where(mask, gate, 0.0)
    if gate_mode == "redistribute":
        # omega = n_b * softmax_t(log W) over the row's valid tokens, with
        # log W = log_sigmoid(gamma z): a gate that underflows to 0 in float32
        # still has a finite logit, so no row loses its credit.
        e = _redistribution_weights(w, mask, gate_arg, log_gate)
        total = jnp.sum(e, axis=-1, keepdims=True)
        n = jnp.sum(mask, axis=-1, keepdims=True, dtype=jnp.float32)
        omega = n * e / jnp.maximum(total, 1.0)
    elif gate_mode == "amplify":
        omega = 1.0 + w
    else:
        omega = jnp.ones_like(w)
    omega = jnp.where(mask, omega, 0.0)
    adv_tok = a * omega
    if s_hat is None:
        psi = jnp.zeros_like(w)
    else:
        psi = jnp.sign(a) * jnp.where(mask, s_hat, 0.0)
        if psi_gate:
            psi = w * psi
        if not is_static_zero(eta):
            adv_tok = adv_tok + jnp.asarray(eta, jnp.float32) * psi
    sg = jax.lax.stop_gradient
    return _Synthesis(sg(omega), sg(psi), sg(jnp.where(mask, adv_tok, 0.0)))


def result_anchored_synthesis(
    adv_seq: Float[ArrayLike, " B"],
    gate: Float[ArrayLike, "B T"],
    s_hat: Float[ArrayLike, "B T"] | None,
    mask: Bool[ArrayLike, "B T"],
    *,
    eta: float | Array = 0.2,
    gate_mode: str = "redistribute",
    psi_gate: bool = True,
    log_gate: Float[ArrayLike, "B T"] | None = None,
) -> Float[Array, "B T"]:
    """Result-anchored advantage synthesis (ERPO Eq. 10, METHOD.md 2(iii)).

    ``Psi = W * sign(A_b) * s_hat`` (``sign(A_b) * s_hat`` with
    ``psi_gate=False``, the public re-implementation's form) and
    ``A_tok = A_b * omega + eta * Psi`` with ``omega`` from ``gate_mode``
    (our documented choice; the paper does not publish the assembly):

    - ``"redistribute"`` (default): ``omega = n_b * softmax_t(log W)`` over
      the row's valid tokens, mean 1 over the row, so at ``eta = 0`` the
      row's total credit equals GRPO's but is moved onto high-entropy
      tokens (with ``eta > 0`` the progress term adds to it);
    - ``"amplify"``: ``omega = 1 + W``;
    - ``"none"``: ``omega = 1`` (with ``eta=0`` this is GRPO exactly).

    Args:
      adv_seq: ``[B]`` outcome advantages ``A_b``.
      gate: ``[B, T]`` gate ``W`` from :func:`entropy_gate`.
      s_hat: ``[B, T]`` normalized progress from :func:`bucket_normalize`;
        may be None when ``eta`` is statically 0.
      mask: ``[B, T]`` valid tokens.
      eta: weight of the progress term (may be traced).
      gate_mode: ``"redistribute"``, ``"amplify"`` or ``"none"``.
      psi_gate: keep ``W`` in ``Psi`` (METHOD's form) or drop it.
      log_gate: ``[B, T]`` ``log W`` from ``entropy_gate(..., log_space=True)``
        for ``"redistribute"``; it stays finite where ``W`` underflows.
        Without it the weights are ``W / max_t W``, and a row whose gates
        are all exactly 0 gets ``omega = 1``.

    Returns:
      ``[B, T]`` float32 token advantages, 0 on masked positions, detached.
    """
    fn = "result_anchored_synthesis"
    check_choice(fn, "gate_mode", gate_mode, GATE_MODES)
    b, _ = check_bt(fn, gate=gate, s_hat=s_hat, mask=mask, log_gate=log_gate)
    check_rows(fn, "adv_seq", adv_seq, b)
    if s_hat is None and not is_static_zero(eta):
        raise ValueError(f"{fn}: eta={eta} needs `s_hat`, which is None")
    mask = jnp.asarray(mask, bool)
    a = jax.lax.stop_gradient(jnp.asarray(adv_seq, jnp.float32))
    w = jax.lax.stop_gradient(jnp.asarray(gate, jnp.float32))
    lw = None if log_gate is None else jax.lax.stop_gradient(jnp.asarray(log_gate, jnp.float32))
    sh = None if s_hat is None else jax.lax.stop_gradient(jnp.asarray(s_hat, jnp.float32))
    return _synthesis(
        a, w, sh, mask, eta=eta, gate_mode=gate_mode, psi_gate=psi_gate, log_gate=lw
    ).adv_tok


class _ErpoParts(NamedTuple):
    adv_seq: Array  # [B]
    terms: ErpoTerms
    bucket: _BucketStats | None  # None when the progress signal is not computed


def _erpo_parts(
    fn: str,
    rewards: Any,
    entropy: Any,
    mask: Any,
    *,
    logp: Any,
    old_logp: Any,
    ref_logp: Any,
    gamma: Any,
    num_buckets: int,
    beta: Any,
    eta: Any,
    gate_mode: str,
    psi_gate: bool,
    progress_std_floor: Any,
    progress_source: str,
    eps: float,
    normalize_std: bool,
    ddof: int,
    progress: str,
) -> _ErpoParts:
    """Everything of METHOD.md section 2.

    ``progress`` says when to compute the progress signal: ``"needed"``
    (only when ``eta`` may be non-zero, so ``eta = 0`` needs no log-probs) or
    ``"available"`` (also when ``eta`` is statically 0 but its log-probs are
    given, for :func:`erpo_token_terms`).
    """
    check_choice(fn, "gate_mode", gate_mode, GATE_MODES)
    check_choice(fn, "progress_source", progress_source, PROGRESS_SOURCES)
    b, _ = check_bt(fn, entropy=entropy, mask=mask, logp=logp, old_logp=old_logp, ref_logp=ref_logp)
    _, g = check_rewards(fn, rewards, b)
    if num_buckets < 1:
        raise ValueError(f"{fn}: num_buckets={num_buckets} must be >= 1")
    floor = concrete_float(progress_std_floor)
    if floor is not None and floor < 0.0:
        raise ValueError(f"{fn}: progress_std_floor={progress_std_floor} must be >= 0")
    source_name = "old_logp" if progress_source == "old" else "logp"
    source = old_logp if progress_source == "old" else logp
    inputs = ((source_name, source), ("ref_logp", ref_logp))
    missing = [name for name, v in inputs if v is None]
    if not is_static_zero(eta):
        if missing:
            raise ValueError(
                f"{fn}: eta={eta} uses the progress signal beta * ({source_name} - ref_logp) "
                f"(progress_source={progress_source!r}), but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} None; pass them or set eta=0"
            )
        want_progress = True
    else:
        want_progress = progress == "available" and not missing

    mask = jnp.asarray(mask, bool)
    adv_seq = group_advantages(rewards, normalize_std=normalize_std, ddof=ddof, eps=eps).reshape(b)
    y = _gate_argument(entropy, mask, g, gamma, eps)
    gate = jnp.where(mask, jax.nn.sigmoid(y), 0.0)
    zeros = jnp.zeros(mask.shape, jnp.float32)
    s, bucket = zeros, None
    if want_progress:
        s = progress_signal(jax.lax.stop_gradient(source), ref_logp, mask, beta=beta)
        bucket = _bucket_stats(s, mask, g, num_buckets, eps, progress_std_floor)
    syn = _synthesis(
        adv_seq,
        gate,
        None if bucket is None else bucket.s_hat,
        mask,
        eta=eta,
        gate_mode=gate_mode,
        psi_gate=psi_gate,
        gate_arg=y,
    )
    terms = ErpoTerms(
        gate=gate,
        progress=s,
        progress_hat=zeros if bucket is None else bucket.s_hat,
        psi=syn.psi,
        omega=syn.omega,
        adv_tok=syn.adv_tok,
    )
    return _ErpoParts(adv_seq, terms, bucket)


def erpo_token_terms(
    rewards: Float[ArrayLike, "P G"],
    entropy: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    old_logp: Float[ArrayLike, "B T"] | None = None,
    ref_logp: Float[ArrayLike, "B T"] | None = None,
    logp: Float[ArrayLike, "B T"] | None = None,
    gamma: float | Array = 5.0,
    num_buckets: int = 10,
    beta: float | Array = 0.1,
    eta: float | Array = 0.2,
    gate_mode: str = "redistribute",
    psi_gate: bool = True,
    progress_std_floor: float | Array = 0.0,
    progress_source: str = "old",
    eps: float = 1e-6,
    normalize_std: bool = True,
    ddof: int = 1,
) -> ErpoTerms:
    """ERPO's token advantage and every intermediate, as an :class:`ErpoTerms`.

    Same arguments as :func:`erpo_token_advantages`, whose result is exactly
    the ``adv_tok`` field here. The fields are METHOD.md section 2's
    ``W`` (Eq. 8), ``s`` (Eq. 7), ``s_hat`` (Eq. 9), ``Psi`` and ``omega``
    (Eq. 10), each ``[B, T]`` float32 and 0 where masked, and they recompose
    as ``adv_tok = A_b * omega + eta * psi`` with ``A_b`` from
    :func:`group_advantages`. Under ``jit`` the fields a caller does not use
    are dead code, so this costs nothing over :func:`erpo_token_advantages`
    then. When ``eta`` is statically 0 the progress fields are still filled
    if the log-probs they need are given (0 otherwise).

    Args:
      rewards, entropy, mask, old_logp, ref_logp, logp, gamma, num_buckets,
        beta, eta, gate_mode, psi_gate, progress_std_floor, progress_source,
        eps, normalize_std, ddof: exactly as :func:`erpo_token_advantages`.

    Returns:
      An :class:`ErpoTerms`, detached.

    Raises:
      ValueError: as :func:`erpo_token_advantages`.
    """
    return _erpo_parts(
        "erpo_token_terms",
        rewards,
        entropy,
        mask,
        logp=logp,
        old_logp=old_logp,
        ref_logp=ref_logp,
        gamma=gamma,
        num_buckets=num_buckets,
        beta=beta,
        eta=eta,
        gate_mode=gate_mode,
        psi_gate=psi_gate,
        progress_std_floor=progress_std_floor,
        progress_source=progress_source,
        eps=eps,
        normalize_std=normalize_std,
        ddof=ddof,
        progress="available",
    ).terms


def erpo_token_advantages(
    rewards: Float[ArrayLike, "P G"],
    entropy: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    old_logp: Float[ArrayLike, "B T"] | None = None,
    ref_logp: Float[ArrayLike, "B T"] | None = None,
    logp: Float[ArrayLike, "B T"] | None = None,
    gamma: float | Array = 5.0,
    num_buckets: int = 10,
    beta: float | Array = 0.1,
    eta: float | Array = 0.2,
    gate_mode: str = "redistribute",
    psi_gate: bool = True,
    progress_std_floor: float | Array = 0.0,
    progress_source: str = "old",
    eps: float = 1e-6,
    normalize_std: bool = True,
    ddof: int = 1,
) -> Float[Array, "B T"]:
    """ERPO token advantages ``A_tok[B, T]`` (METHOD.md section 2, Eq. 7-10).

    ``A_b`` from :func:`group_advantages`; gate ``W`` from
    :func:`entropy_gate`; ``s_hat`` from :func:`bucket_normalize` of
    :func:`progress_signal`; assembled by :func:`result_anchored_synthesis`.
    :func:`erpo_token_terms` returns the same advantage with every
    intermediate.

    Args:
      rewards: ``[P, G]`` outcome rewards, ``P * G == B``.
      entropy: ``[B, T]`` sampler entropies (data).
      mask: ``[B, T]`` valid tokens.
      old_logp, ref_logp: ``[B, T]`` rollout and reference log-probs; needed
        only when ``eta`` may be non-zero (a traced ``eta`` counts as
        non-zero).
      logp: ``[B, T]`` current log-probs, used (detached) as the progress
        source when ``progress_source="current"``.
      gamma: gate sharpness (default 5.0, from the public re-implementation).
      num_buckets: ``K`` progress buckets (default 10; static).
      beta: scale of the progress signal (default 0.1).
      eta: weight of the progress term (default 0.2; statically 0 needs no
        ``ref_logp``).
      gate_mode: ``"redistribute"`` (default), ``"amplify"`` or ``"none"``
        (static).
      psi_gate: ``True`` (METHOD): ``Psi = W sign(A_b) s_hat``; ``False``
        drops ``W``, the public re-implementation's assembly.
      progress_std_floor: lower bound on each bucket's std in Eq. 9
        (default 0, the paper's form).
      progress_source: ``"old"`` (default): ``s`` from ``old_logp``;
        ``"current"``: from the detached current ``logp`` (the
        re-implementation's reading).
      eps: added to every std (advantage, gate and bucket z-scores).
      normalize_std, ddof: see :func:`group_advantages`.

    ``gamma``, ``beta``, ``eta`` and ``progress_std_floor`` may be traced
    scalars (schedules inside ``jit``); ``num_buckets``, ``gate_mode``,
    ``psi_gate`` and ``progress_source`` change the program and are static.

    Returns:
      ``[B, T]`` float32 token advantages, 0 where masked, detached.

    Raises:
      ValueError: shapes disagree, ``G < 2``, an unknown ``gate_mode`` or
        ``progress_source``, a negative ``progress_std_floor``, or ``eta``
        not statically 0 without the progress inputs (``old_logp`` or, with
        ``progress_source="current"``, ``logp``, and ``ref_logp``; the
        message names the missing one).
    """
    return _erpo_parts(
        "erpo_token_advantages",
        rewards,
        entropy,
        mask,
        logp=logp,
        old_logp=old_logp,
        ref_logp=ref_logp,
        gamma=gamma,
        num_buckets=num_buckets,
        beta=beta,
        eta=eta,
        gate_mode=gate_mode,
        psi_gate=psi_gate,
        progress_std_floor=progress_std_floor,
        progress_source=progress_source,
        eps=eps,
        normalize_std=normalize_std,
        ddof=ddof,
        progress="needed",
    ).terms.adv_tok


def erpo_loss(
    logp: Float[ArrayLike, "B T"],
    old_logp: Float[ArrayLike, "B T"],
    rewards: Float[ArrayLike, "P G"],
    entropy: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    *,
    ref_logp: Float[ArrayLike, "B T"] | None = None,
    gamma: float | Array = 5.0,
    num_buckets: int = 10,
    beta: float | Array = 0.1,
    eta: float | Array = 0.2,
    gate_mode: str = "redistribute",
    psi_gate: bool = True,
    progress_std_floor: float | Array = 0.0,
    progress_source: str = "old",
    eps: float = 1e-6,
    normalize_std: bool = True,
    ddof: int = 1,
    **policy_kw: Any,
) -> tuple[Float[Array, ""], ErpoAux]:
    """ERPO loss: :func:`policy_loss` with the token advantages of :func:`erpo_token_advantages`.

    Args:
      logp: ``[B, T]`` current-policy log-probs of the sampled tokens (the
        differentiated input; with ``progress_source="current"`` also the
        progress source, detached).
      old_logp: ``[B, T]`` rollout-policy log-probs (ratio and, by default,
        progress signal).
      rewards: ``[P, G]`` outcome rewards.
      entropy: ``[B, T]`` sampler entropies (data).
      mask: ``[B, T]`` valid tokens.
      ref_logp: ``[B, T]`` reference log-probs; needed when ``eta`` may be
        non-zero and used by the KL term when ``kl_coef != 0``.
      gamma, num_buckets, beta, eta, gate_mode, psi_gate, progress_std_floor,
        progress_source, eps, normalize_std, ddof: see
        :func:`erpo_token_advantages`.
      **policy_kw: keywords of :func:`policy_loss` (``clip_eps``,
        ``clip_eps_high``, ``clip_c``, ``agg``, ``max_len``, ``kl_coef``,
        ``kl_estimator``, ``denominator``). Numeric hyperparameters here and
        above may be traced scalars.

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
        logp=logp,
        old_logp=old_logp,
        ref_logp=ref_logp,
        gamma=gamma,
        num_buckets=num_buckets,
        beta=beta,
        eta=eta,
        gate_mode=gate_mode,
        psi_gate=psi_gate,
        progress_std_floor=progress_std_floor,
        progress_source=progress_source,
        eps=eps,
        normalize_std=normalize_std,
        ddof=ddof,
        progress="needed",
    )
    terms = parts.terms
    loss, paux = policy_loss(logp, old_logp, terms.adv_tok, mask, ref_logp=ref_logp, **policy_kw)
    return loss, _erpo_aux(paux, parts, entropy, jnp.asarray(mask, bool))


def _erpo_aux(paux: PolicyAux, parts: _ErpoParts, entropy: Any, mask: Array) -> ErpoAux:
    terms = parts.terms
    sg = jax.lax.stop_gradient
    h = jnp.where(mask, jnp.asarray(entropy, jnp.float32), 0.0)
    h = sg(jnp.clip(jnp.where(jnp.isnan(h), 0.0, h), -_ENTROPY_BOUND, _ENTROPY_BOUND))
    a = parts.adv_seq[:, None]
    directed = mask & (a != 0)
    flipped = directed & (jnp.sign(terms.adv_tok) != jnp.sign(a))
    n = jnp.sum(mask, axis=-1, dtype=jnp.float32)
    omega_sum = jnp.sum(terms.omega, axis=-1)
    omega_sq = jnp.sum(terms.omega * terms.omega, axis=-1)
    row_eff = omega_sum * omega_sum / jnp.maximum(n * omega_sq, jnp.finfo(jnp.float32).tiny)
    nonempty = n > 0
    zero = jnp.float32(0.0)
    progress_std_mean = zero
    if parts.bucket is not None:
        sets = parts.bucket.set_size > 0
        progress_std_mean = jnp.sum(jnp.where(sets, parts.bucket.std, 0.0)) / jnp.maximum(
            jnp.sum(sets, dtype=jnp.float32), 1.0
        )
    return ErpoAux(
        *paux,
        gate_mean=masked_mean(terms.gate, mask),
        cdp_frac=masked_mean((terms.gate > 0.5).astype(jnp.float32), mask),
        entropy_mean=masked_mean(h, mask),
        entropy_p90=jnp.where(jnp.any(mask), masked_quantile(h, mask, 0.9), 0.0),
        psi_abs_mean=zero if parts.bucket is None else masked_mean(jnp.abs(terms.psi), mask),
        adv_seq_abs_mean=jnp.mean(jnp.abs(parts.adv_seq)),
        sign_flip_frac=jnp.sum(flipped, dtype=jnp.float32)
        / jnp.maximum(jnp.sum(directed, dtype=jnp.float32), 1.0),
        omega_max=jnp.max(jnp.where(mask, terms.omega, 0.0), initial=0.0),
        eff_token_frac=jnp.sum(jnp.where(nonempty, row_eff, 0.0))
        / jnp.maximum(jnp.sum(nonempty, dtype=jnp.float32), 1.0),
        progress_abs_mean=zero
        if parts.bucket is None
        else masked_mean(jnp.abs(terms.progress), mask),
        progress_std_mean=progress_std_mean,
    )
