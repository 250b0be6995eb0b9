"""Gradient accumulation over micro-batches reproduces the full batch exactly.

The train step computes token advantages on the whole batch (they need
whole groups and no parameters), then runs the policy loss micro-batch by
micro-batch with the whole batch's aggregation denominator. Summing the
micro-batch losses and gradients must give the full-batch loss and gradient,
for every aggregation mode.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import make_batch

from erpo_jax import losses as L


@pytest.mark.parametrize("n_micro", [2, 4])
@pytest.mark.parametrize("agg", L.AGG_MODES)
@pytest.mark.parametrize("method", ["grpo", "erpo"])
def test_microbatch_accumulation_is_exact(method, agg, n_micro):
    p, g, t = 4, 3, 7
    x = make_batch(50, p, g, t, "empty_rows", nan_pad=True)
    if method == "grpo":
        adv = np.broadcast_to(
            np.asarray(L.group_advantages(x["rewards"])).reshape(-1, 1), (p * g, t)
        )
    else:
        adv = np.asarray(
            L.erpo_token_advantages(
                x["rewards"],
                x["entropy"],
                x["mask"],
                old_logp=x["old_logp"],
                ref_logp=x["ref_logp"],
            )
        )
    kw = {"agg": agg, "max_len": 9, "clip_eps_high": 0.28, "kl_coef": 0.05}

    def loss_fn(logp, old, a, mask, ref, denominator=None):
        return L.policy_loss(logp, old, a, mask, ref_logp=ref, denominator=denominator, **kw)[0]

    full, full_grad = jax.value_and_grad(loss_fn)(
        x["logp"], x["old_logp"], adv, x["mask"], x["ref_logp"]
    )

    _, den = L.aggregate_parts(np.zeros((p * g, t), np.float32), x["mask"], agg=agg, max_len=9)
    rows = np.split(np.arange(p * g), n_micro)
    total, grads = 0.0, []
    for r in rows:
        value, grad = jax.value_and_grad(loss_fn)(
            x["logp"][r], x["old_logp"][r], adv[r], x["mask"][r], x["ref_logp"][r], den
        )
        total += float(value)
        grads.append(np.asarray(grad))
    np.testing.assert_allclose(total, float(full), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.concatenate(grads), full_grad, rtol=1e-6, atol=1e-8)

    # The same identity through numerators: sum_i num_i / max(sum_i den_i, 1).
    nums, dens = zip(
        *(
            L.aggregate_parts(
                L.policy_token_loss(x["logp"][r], x["old_logp"][r], adv[r], x["mask"][r],
                                    ref_logp=x["ref_logp"][r], clip_eps_high=0.28, kl_coef=0.05)[0],
                x["mask"][r], agg=agg, max_len=9,
            )
            for r in rows
        ),
        strict=True,
    )  # fmt: skip
    np.testing.assert_allclose(
        sum(map(float, nums)) / max(sum(map(float, dens)), 1.0), float(full), rtol=1e-6
    )


@pytest.mark.parametrize("n_micro", [2, 4])
@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("holder", {"p": -1.0, "clip_eps_high": 0.3}),
        ("holder", {"p": 0.5, "clip_level": "token"}),
        ("gspo", {}),
    ],
)
def test_sequence_loss_microbatches_with_denominator_are_exact(name, kw, n_micro):
    # Sequence losses divide the sum of row losses by the row count: passing
    # the whole batch's B as `denominator` to each micro-batch makes their
    # losses and gradients sum to the full batch's.
    x = make_batch(51, 4, 3, 7, "empty_rows", nan_pad=True)
    fn = L.gspo_loss if name == "gspo" else L.holder_loss
    b = x["mask"].shape[0]
    # Ratios near 1 so that GSPO's tiny clip range leaves some rows unclipped.
    old = np.where(x["mask"], x["logp"] + 1e-4 * np.sign(x["adv_tok"]), x["old_logp"])

    def loss_fn(logp, old, adv, mask, denominator=None):
        return fn(logp, old, adv, mask, denominator=denominator, **kw)[0]

    full, full_grad = jax.value_and_grad(loss_fn)(x["logp"], old, x["adv_seq"], x["mask"])
    total, grads = 0.0, []
    for r in np.split(np.arange(b), n_micro):
        value, grad = jax.value_and_grad(loss_fn)(
            x["logp"][r], old[r], x["adv_seq"][r], x["mask"][r], float(b)
        )
        total += float(value)
        grads.append(np.asarray(grad))
    np.testing.assert_allclose(total, float(full), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.concatenate(grads), full_grad, rtol=1e-6, atol=1e-8)
    assert np.abs(full_grad).max() > 0
