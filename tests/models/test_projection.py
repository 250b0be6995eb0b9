"""The decoder's projection ``x @ w`` with its hand-written weight gradient, against autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxprs import equations

from erpo_jax.models.decoder import _project

HIGHEST = jax.lax.Precision.HIGHEST


def _autodiff(x, w, precision):
    return jnp.einsum("...i,io->...o", x, w, precision=precision)


@pytest.mark.parametrize(("d_in", "d_out"), [(8, 24), (24, 8), (16, 16)])
def test_value_and_gradients_equal_autodiff(d_in, d_out):
    rng = np.random.default_rng(d_in * 100 + d_out)
    x = jnp.asarray(rng.normal(size=(3, 5, d_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(3, 5, d_out)), jnp.float32)

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w, HIGHEST) * ct)

    np.testing.assert_allclose(_project(x, w, HIGHEST), _autodiff(x, w, HIGHEST), rtol=1e-6)
    got = jax.grad(loss(_project), argnums=(0, 1))(x, w)
    want = jax.grad(loss(_autodiff), argnums=(0, 1))(x, w)
    # The weight gradient against NumPy in float64 too: sum over tokens of x^T ct.
    x64, ct64 = np.asarray(x, np.float64), np.asarray(ct, np.float64)
    np.testing.assert_allclose(got[1], np.einsum("bsi,bso->io", x64, ct64), rtol=1e-5, atol=1e-5)
    for g, h in zip(got, want, strict=True):
        assert g.shape == h.shape and g.dtype == h.dtype
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_keep_their_dtypes():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(8, 32)), jnp.bfloat16)
    got = jax.grad(lambda x, w: jnp.sum(_project(x, w, None).astype(jnp.float32)), (0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(_autodiff(x, w, None).astype(jnp.float32)), (0, 1))(x, w)
    for g, h in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(h, np.float32), rtol=1e-2)


@pytest.mark.parametrize(("d_in", "d_out", "first"), [(8, 24, "x"), (24, 8, "dy")])
def test_weight_gradient_contracts_the_narrower_operand(d_in, d_out, first):
    """The token contraction of the weight gradient takes the narrower array as its left
    operand, the one XLA:CPU lays out again; autodiff always takes the cotangent."""
    x = jnp.ones((2, 3, d_in), jnp.float32)
    w = jnp.ones((d_in, d_out), jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(_project(x, w, HIGHEST)) ** 2))(w).jaxpr

    token_contractions = [
        e
        for e in equations(jaxpr)
        if e.primitive.name == "dot_general" and e.params["dimension_numbers"][0][0] == (0, 1)
    ]
    assert len(token_contractions) == 1
    lhs = token_contractions[0].invars[0].aval.shape[-1]
    assert lhs == (d_in if first == "x" else d_out)


@pytest.mark.parametrize("case", ["large_offset_tiny_spread", "inf_on_a_token", "one_token"])
def test_hard_inputs_give_autodiffs_gradients(case):
    """Values far from zero with a tiny spread, an inf on a real token (non-finite gradients
    exactly where autodiff has them), and a single-token row."""
    rng = np.random.default_rng(7)
    shape = (1, 1, 8) if case == "one_token" else (2, 4, 8)
    x = rng.normal(size=shape)
    if case == "large_offset_tiny_spread":
        x = 1e4 + 1e-3 * x
    x = jnp.asarray(x, jnp.float32)
    if case == "inf_on_a_token":
        x = x.at[1, 2, 3].set(jnp.inf)
    w = jnp.asarray(rng.normal(size=(8, 24)), jnp.float32)
    ct = jnp.asarray(rng.normal(size=(*shape[:2], 24)), jnp.float32)

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w, HIGHEST) * ct)

    got = jax.grad(loss(_project), argnums=(0, 1))(x, w)
    want = jax.grad(loss(_autodiff), argnums=(0, 1))(x, w)
    for g, h in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.isfinite(g), np.isfinite(h))
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-5)
    if case == "inf_on_a_token":
        assert not np.isfinite(np.asarray(got[1])[3]).any()  # w's row 3 meets the inf
        assert np.isfinite(np.asarray(got[1])[:3]).all()
    if case == "large_offset_tiny_spread":
        # dW = sum over tokens of x^T ct, in float64: about 1e4 * column sums of ct.
        want64 = np.einsum("bsi,bso->io", np.asarray(x, np.float64), np.asarray(ct, np.float64))
        np.testing.assert_allclose(got[1], want64, rtol=1e-5)
