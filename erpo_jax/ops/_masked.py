"""Masked reductions that never let masked values leak.

Every reduction here selects with ``jnp.where(mask, x, 0)`` instead of
multiplying by the mask: ``nan * 0`` is ``nan``, and even a finite ``inf * 0``
poisons a gradient. Denominators are ``max(count, 1)`` so that an all-masked
row or group gives a finite zero rather than ``0 / 0``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from erpo_jax.typing import Array, ArrayLike, Bool, Float

__all__ = [
    "inverse_spread",
    "masked_group_moments",
    "masked_group_zscore",
    "masked_mean",
    "masked_quantile",
    "masked_sum",
    "zscore",
]


def masked_sum(
    x: Float[ArrayLike, "..."],
    mask: Bool[ArrayLike, "..."],
    axis: int | tuple[int, ...] | None = None,
) -> Float[Array, "..."]:
    """Sum of ``x`` over ``axis`` where ``mask`` is True, in float32.

    Args:
      x: values; masked entries may hold anything, NaN and inf included.
      mask: boolean array broadcastable to ``x``.
      axis: axes to reduce, ``None`` for all.

    Returns:
      The float32 sum of the selected entries (0 where none is selected).
    """
    x = jnp.asarray(x, jnp.float32)
    return jnp.sum(jnp.where(mask, x, 0.0), axis=axis)


def masked_mean(
    x: Float[ArrayLike, "..."],
    mask: Bool[ArrayLike, "..."],
    axis: int | tuple[int, ...] | None = None,
) -> Float[Array, "..."]:
    """Mean of ``x`` over the entries selected by ``mask``; 0 where none is selected."""
    mask = jnp.asarray(mask, bool)
    count = jnp.sum(mask, axis=axis, dtype=jnp.float32)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def masked_group_moments(
    x: Float[ArrayLike, "B T"], mask: Bool[ArrayLike, "B T"], group_size: int
) -> tuple[Float[Array, " P"], Float[Array, " P"], Float[Array, " P"]]:
    """Mean, population std and valid-token count over each group of rows.

    Rows are prompt-major: the group of prompt ``p`` is rows
    ``p * group_size ... (p + 1) * group_size - 1``. Statistics are taken over
    the valid tokens of all rows of the group together (METHOD.md section 2,
    "group statistics").

    Args:
      x: ``[B, T]`` values.
      mask: ``[B, T]`` validity.
      group_size: ``G``; ``B`` must be a multiple of it (checked by callers).

    Returns:
      ``(mean[P], std[P], count[P])`` in float32; a group with no valid token
      has mean 0 and std 0. Computed by the corrected two-pass algorithm
      (:func:`_corrected_two_pass`), accurate to float32 rounding whatever
      the offset of the values from zero.
    """
    x = jnp.asarray(x, jnp.float32)
    mask = jnp.asarray(mask, bool)
    b, t = x.shape
    xg = jnp.where(mask, x, 0.0).reshape(b // group_size, group_size * t)
    mg = mask.reshape(b // group_size, group_size * t)
    shift, corr, std, count = _corrected_two_pass(xg, mg)
    return shift + corr, std, count


def _corrected_two_pass(x: Array, mask: Array) -> tuple[Array, Array, Array, Array]:
    """Corrected two-pass moments over the last axis: ``(shift, corr, std, count)``.

    Pass one takes the plain mean ``shift``; pass two sums the deviations
    ``d = x - shift`` and their squares, giving the correction
    ``corr = sum(d) / n`` (the rounding error of ``shift``) and the population
    variance ``sum(d^2) / n - corr^2`` (Chan, Golub and LeVeque's corrected
    two-pass algorithm). Its relative error is ``O(n u)`` whatever the
    offset of the values from zero, where the one-pass ``E[x^2] - E[x]^2``
    loses ``offset^2 / var`` more. The mean is ``shift + corr``; a z-score
    computed as ``((x - shift) - corr) / std`` keeps the digits that rounding
    the mean to one float32 would drop (they matter when the spread is a few
    ulps of the mean, e.g. near-constant entropies).
    """
    count = jnp.sum(mask, axis=-1, dtype=jnp.float32)
    denom = jnp.maximum(count, 1.0)
    shift = jnp.sum(jnp.where(mask, x, 0.0), axis=-1) / denom
    d = jnp.where(mask, x - shift[..., None], 0.0)
    corr = jnp.sum(d, axis=-1) / denom
    var = jnp.sum(d * d, axis=-1) / denom - corr * corr
    return shift, corr, jnp.sqrt(jnp.maximum(var, 0.0)), count


def masked_group_zscore(
    x: Float[ArrayLike, "B T"],
    mask: Bool[ArrayLike, "B T"],
    group_size: int,
    *,
    eps: float,
) -> Float[Array, "B T"]:
    """``(x - mean_group) / (std_group + eps)`` per token, 0 where masked or degenerate.

    The statistics are :func:`masked_group_moments` (population std over the
    valid tokens of each group of ``group_size`` prompt-major rows), computed
    by the corrected two-pass algorithm; a degenerate group (see
    :func:`inverse_spread`) gives exactly 0. Masked entries may hold anything.
    """
    x = jnp.asarray(x, jnp.float32)
    mask = jnp.asarray(mask, bool)
    b, t = x.shape
    xg = jnp.where(mask, x, 0.0).reshape(b // group_size, group_size * t)
    mg = mask.reshape(b // group_size, group_size * t)
    shift, corr, std, count = _corrected_two_pass(xg, mg)
    inv = inverse_spread(shift + corr, std, count, eps=eps)
    z = ((xg - shift[:, None]) - corr[:, None]) * inv[:, None]
    return jnp.where(mask, z.reshape(b, t), 0.0)


def _sortable_key(x: Array) -> Array:
    """float32 -> uint32 whose unsigned order is the float order (negative floats flipped)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _float_of_key(key: Array) -> Array:
    bits = jnp.where((key >> 31) == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _kth_smallest_key(key: Array, mask: Array, rank: Array) -> Array:
    """The key of the ``rank``-th smallest (0-based) selected entry, by radix selection.

    Builds the answer bit by bit, from the top: the largest ``ans`` with
    ``#{selected key < ans} <= rank`` is that entry's key. 32 counting passes,
    each a fused compare-and-sum, instead of a full sort (which XLA:CPU runs
    single-threaded and which was 20x slower at a million entries).
    """

    def body(i, ans):
        trial = ans | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        below = jnp.sum(mask & (key < trial), dtype=jnp.int32)
        return jnp.where(below <= rank, trial, ans)

    return jax.lax.fori_loop(0, 32, body, jnp.uint32(0))


def masked_quantile(
    x: Float[ArrayLike, "..."], mask: Bool[ArrayLike, "..."], q: float | Float[ArrayLike, ""]
) -> Float[Array, ""]:
    """The ``q``-quantile of the selected entries of ``x`` (NumPy's "linear" rule).

    Works under ``jit`` with a data-dependent number ``n`` of selected
    entries: it interpolates between the order statistics of ranks
    ``floor(q * (n - 1))`` and the next one, exactly as ``numpy.quantile``
    does. The order statistic is found by radix selection on the float bits
    (:func:`_kth_smallest_key`), the next one as the smallest selected value
    above it: O(32 n) work and no sort.

    Returns:
      A float32 scalar; ``+inf`` when nothing is selected (so that a
      ``x >= quantile`` test selects nothing).
    """
    x = jnp.asarray(x, jnp.float32).reshape(-1)
    mask = jnp.asarray(mask, bool).reshape(-1)
    n = jnp.sum(mask, dtype=jnp.int32)
    rank = q * jnp.maximum(n - 1, 0).astype(jnp.float32)
    lo = jnp.floor(rank).astype(jnp.int32)
    frac = rank - lo.astype(jnp.float32)
    key = _sortable_key(x)
    k_lo = _kth_smallest_key(key, mask, lo)
    x_lo = _float_of_key(k_lo)
    # The next order statistic: the same value if it repeats, else the
    # smallest selected value above it.
    repeats = jnp.sum(mask & (key <= k_lo), dtype=jnp.int32) >= lo + 2
    k_next = jnp.min(jnp.where(mask & (key > k_lo), key, jnp.uint32(0xFFFFFFFF)))
    x_hi = jnp.where(repeats, x_lo, _float_of_key(k_next))
    # lo + frac * (hi - lo) would be nan if hi were +inf; frac is 0 exactly
    # when rank is an integer, so select instead.
    value = jnp.where(frac > 0, x_lo + frac * (x_hi - x_lo), x_lo)
    return jnp.where(n > 0, value, jnp.inf)


# A spread this small relative to the mean is below float32 resolution (about
# 8 ulps): it is rounding noise, not signal.
_DEGENERATE_REL_STD = 1e-6


def inverse_spread(
    mean: Float[ArrayLike, "..."],
    std: Float[ArrayLike, "..."],
    count: Float[ArrayLike, "..."],
    *,
    eps: float,
    floor: float | Float[ArrayLike, ""] = 0.0,
) -> Float[Array, "..."]:
    """``1 / (max(std, floor) + eps)``, or exactly 0 where the statistics are degenerate.

    A set of one value, or of values equal to float32 resolution, has no
    spread: mathematically every z-score is 0. Computed in float32, the
    residue ``x - mean`` is rounding noise of order ``1e-7 * |x|``, and under
    ``jit`` XLA may round the two sides differently; dividing that noise by
    ``std + eps`` (with ``eps`` ~1e-6) would turn it into z-scores of order
    0.1 that depend on the compiler. So where ``count <= 1`` or
    ``std <= 1e-6 * |mean|`` the factor is 0, and z-scores are exactly 0, as
    in exact arithmetic. Computing the factor once per set (group, bucket)
    and multiplying per token is also cheaper than a per-token division.
    ``floor`` (ERPO's ``progress_std_floor``, may be traced) bounds the
    divisor from below; the degenerate test looks at ``std`` itself.
    A non-finite ``std`` (values whose squares overflow float32) gives 0 too.
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    degenerate = (jnp.asarray(count) <= 1) | (std <= _DEGENERATE_REL_STD * jnp.abs(mean))
    divisor = jnp.maximum(std, jnp.asarray(floor, jnp.float32)) + eps
    return jnp.where(degenerate | ~jnp.isfinite(divisor), 0.0, 1.0 / divisor)


def zscore(
    x: Float[ArrayLike, "..."],
    mean: Float[ArrayLike, "..."],
    std: Float[ArrayLike, "..."],
    count: Float[ArrayLike, "..."],
    *,
    eps: float,
) -> Float[Array, "..."]:
    """``(x - mean) / (std + eps)``, exactly 0 where the statistics are degenerate.

    See :func:`inverse_spread` for what "degenerate" means and why.
    """
    x = jnp.asarray(x, jnp.float32)
    return (x - jnp.asarray(mean, jnp.float32)) * inverse_spread(mean, std, count, eps=eps)
