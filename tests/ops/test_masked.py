"""Masked statistics against NumPy on the selected entries."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from erpo_jax import ops


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.8, 0.9, 1.0])
@pytest.mark.parametrize("n_valid", [1, 2, 7, 40])
def test_masked_quantile_matches_numpy(q, n_valid):
    rng = np.random.default_rng(n_valid)
    x = rng.normal(size=(5, 8)).astype(np.float32)
    mask = np.zeros(40, bool)
    mask[rng.permutation(40)[:n_valid]] = True
    mask = mask.reshape(5, 8)
    x[~mask] = np.nan
    got = jax.jit(ops.masked_quantile, static_argnums=2)(x, mask, q)
    np.testing.assert_allclose(float(got), np.quantile(x[mask].astype(np.float64), q), rtol=1e-6)


def test_masked_quantile_of_nothing_is_inf():
    assert (
        float(ops.masked_quantile(np.ones((2, 2), np.float32), np.zeros((2, 2), bool), 0.5))
        == np.inf
    )


def test_group_moments_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (6, 5)).astype(np.float32)
    mask = rng.random((6, 5)) > 0.4
    mask[2:4] = False  # an empty group
    x[~mask] = np.inf
    mean, std, count = ops.masked_group_moments(x, mask, 2)
    for p in range(3):
        vals = x[2 * p : 2 * p + 2][mask[2 * p : 2 * p + 2]].astype(np.float64)
        assert float(count[p]) == len(vals)
        want_mean = vals.mean() if len(vals) else 0.0
        want_std = vals.std() if len(vals) else 0.0
        np.testing.assert_allclose(
            [float(mean[p]), float(std[p])], [want_mean, want_std], rtol=1e-5, atol=1e-6
        )


def test_masked_sum_and_mean_ignore_nan():
    x = np.array([[1.0, np.nan], [np.inf, 4.0]], np.float32)
    mask = np.array([[True, False], [False, True]])
    assert float(ops.masked_sum(x, mask)) == 5.0
    np.testing.assert_array_equal(ops.masked_mean(x, mask, axis=1), [1.0, 4.0])
    assert float(ops.masked_mean(x, np.zeros_like(mask))) == 0.0
    grad = jax.grad(lambda a: ops.masked_mean(a, mask))(x)
    np.testing.assert_array_equal(grad, [[0.5, 0.0], [0.0, 0.5]])


def test_zscore_is_exactly_zero_without_spread():
    # One value, or values equal to float32 resolution: z = 0 exactly.
    z = ops.zscore(np.float32(3.0), np.float32(3.0000002), np.float32(1e-7), 5, eps=1e-6)
    assert float(z) == 0.0
    assert float(ops.zscore(np.float32(2.0), np.float32(1.0), np.float32(0.0), 1, eps=1e-6)) == 0.0
    z = ops.zscore(np.float32(2.0), np.float32(1.0), np.float32(0.5), 4, eps=1e-6)
    assert float(z) == pytest.approx(1.0 / (0.5 + 1e-6), rel=1e-6)


def test_group_moments_and_zscores_are_accurate_far_from_zero():
    # Tight groups far from zero (1e3 +- 1e-2) and near-constant ones
    # (2.5 +- 1e-5, about 40 float32 ulps): the corrected two-pass moments
    # match float64 on the same float32 inputs, and so do the z-scores, which
    # keep the digits that rounding the mean to one float32 would drop.
    from erpo_jax.ops._masked import masked_group_zscore

    rng = np.random.default_rng(1)
    x = np.concatenate(
        [1e3 + 1e-2 * rng.normal(size=(2, 50)), 2.5 + 1e-5 * rng.normal(size=(2, 50))]
    ).astype(np.float32)
    mask = rng.random((4, 50)) > 0.2
    x[~mask] = np.nan
    mean, std, count = ops.masked_group_moments(x, mask, 2)
    z = np.asarray(masked_group_zscore(x, mask, 2, eps=1e-6), np.float64)
    for p in range(2):
        vals = x[2 * p : 2 * p + 2][mask[2 * p : 2 * p + 2]].astype(np.float64)
        assert float(count[p]) == len(vals)
        np.testing.assert_allclose(float(mean[p]), vals.mean(), rtol=1e-7)
        np.testing.assert_allclose(float(std[p]), vals.std(), rtol=1e-4)
        want = (x[2 * p : 2 * p + 2].astype(np.float64) - vals.mean()) / (vals.std() + 1e-6)
        got = z[2 * p : 2 * p + 2]
        np.testing.assert_allclose(
            got[mask[2 * p : 2 * p + 2]], want[mask[2 * p : 2 * p + 2]], atol=1e-4
        )
        np.testing.assert_array_equal(got[~mask[2 * p : 2 * p + 2]], 0.0)


def test_inverse_spread_floor_and_overflow():
    inv = ops.inverse_spread(
        np.float32([0.0, 0.0, 0.0, 1.0]),
        np.float32([0.5, 0.5, np.inf, 1e-8]),
        np.float32([4, 4, 4, 4]),
        eps=1e-6,
        floor=np.float32(2.0),
    )
    # std below the floor: 1 / (floor + eps); overflowed std: 0; degenerate
    # (std <= 1e-6 |mean|): 0 whatever the floor.
    np.testing.assert_allclose(inv, [1 / (2.0 + 1e-6), 1 / (2.0 + 1e-6), 0.0, 0.0], rtol=1e-6)
    assert float(ops.inverse_spread(0.0, 3.0, 4, eps=0.0, floor=2.0)) == pytest.approx(1 / 3)
