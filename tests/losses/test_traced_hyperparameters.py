"""Every numeric hyperparameter works as a traced scalar under ``jit``.

A training loop passes schedule values (``optax`` schedules of the step) as
arrays into one jitted step. Each loss is called once jitted with every
numeric hyperparameter as a traced argument and once eagerly with the same
values as Python floats; the two must agree. Only ``agg``, ``kl_estimator``,
``gate_mode``, ``num_buckets`` (and the other string or bool choices) are
static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_batch

from erpo_jax import losses as L

X = make_batch(91, 3, 4, 9, "holes", nan_pad=True)

POLICY_HP = {"clip_eps": 0.15, "clip_eps_high": 0.28, "clip_c": 2.5, "kl_coef": 0.07}
ERPO_HP = {"gamma": 3.0, "beta": 0.3, "eta": 0.4, "progress_std_floor": 0.02}


def _call(name, hp):
    """The loss ``name`` with hyperparameters ``hp`` (floats or traced scalars)."""
    x = X
    if name == "policy":
        return L.policy_loss(
            x["logp"], x["old_logp"], x["adv_tok"], x["mask"], ref_logp=x["ref_logp"], **hp
        )
    if name == "grpo":
        return L.grpo_loss(x["logp"], x["old_logp"], x["rewards"], x["mask"],
                           ref_logp=x["ref_logp"], **hp)  # fmt: skip
    if name in ("erpo", "erpo_current"):
        source = {"progress_source": "current"} if name == "erpo_current" else {}
        return L.erpo_loss(x["logp"], x["old_logp"], x["rewards"], x["entropy"], x["mask"],
                           ref_logp=x["ref_logp"], **source, **hp)  # fmt: skip
    if name == "erpo_terms":
        return L.erpo_token_terms(x["rewards"], x["entropy"], x["mask"], old_logp=x["old_logp"],
                                  ref_logp=x["ref_logp"], **hp)  # fmt: skip
    if name == "entropy_mask":
        return L.high_entropy_mask(x["entropy"], x["mask"], **hp)
    if name in ("holder", "holder_token"):
        level = "token" if name == "holder_token" else "sequence"
        return L.holder_loss(x["logp"], x["old_logp"], x["adv_seq"], x["mask"],
                             clip_level=level, **hp)  # fmt: skip
    if name == "gspo":
        return L.gspo_loss(x["logp"], x["old_logp"], x["adv_seq"], x["mask"], **hp)
    if name == "parts":
        g = L.entropy_gate(x["entropy"], x["mask"], group_size=4, gamma=hp["gamma"])
        s = L.progress_signal(x["old_logp"], x["ref_logp"], x["mask"], beta=hp["beta"])
        s_hat = L.bucket_normalize(s, x["mask"], group_size=4, std_floor=hp["progress_std_floor"])
        adv = L.result_anchored_synthesis(x["adv_seq"], g, s_hat, x["mask"], eta=hp["eta"])
        return g, s, s_hat, adv
    raise AssertionError(name)


CASES = [
    ("policy", POLICY_HP),
    ("grpo", POLICY_HP),
    ("erpo", {**POLICY_HP, **ERPO_HP}),
    ("erpo", {**POLICY_HP, **ERPO_HP, "eta": 0.0}),  # a traced zero is not "static zero"
    ("erpo_current", ERPO_HP),
    ("erpo_terms", ERPO_HP),
    ("parts", ERPO_HP),
    ("entropy_mask", {"top_fraction": 0.3}),
    ("holder", {"p": -0.7, "clip_eps": 0.1, "clip_eps_high": 0.3}),
    ("holder_token", {"p": 1.5, "clip_eps": 0.1, "clip_eps_high": 0.3}),
    ("holder", {"p": 0.0, "clip_eps": 0.2, "denominator": 20.0}),
    ("gspo", {"clip_eps": 2e-2, "clip_eps_high": 5e-2, "denominator": 16.0}),
]


@pytest.mark.parametrize(("name", "hp"), CASES, ids=[f"{n}-{sorted(h)}" for n, h in CASES])
def test_traced_hyperparameters_match_python_floats(name, hp):
    traced = jax.jit(lambda hp: _call(name, hp))
    got = traced({k: jnp.float32(v) for k, v in hp.items()})
    want = _call(name, hp)
    if hp.get("eta", 1.0) == 0.0:
        # A traced eta = 0 computes the progress signal (its value is unknown
        # at trace time), so ErpoAux's progress fields are filled; a static
        # 0 skips it and reports 0. Everything else agrees.
        progress = ("psi_abs_mean", "progress_abs_mean", "progress_std_mean")
        assert float(got[1].progress_abs_mean) > 0.0 == float(want[1].progress_abs_mean)
        got = (got[0], got[1]._replace(**{f: jnp.float32(0.0) for f in progress}))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-6
        )


def test_one_compilation_serves_every_schedule_value():
    step = jax.jit(lambda hp: _call("erpo", hp)[0])
    hp = {**POLICY_HP, **ERPO_HP}
    values = []
    for scale in (0.5, 1.0, 1.5):
        values.append(float(step({k: jnp.float32(v * scale) for k, v in hp.items()})))
    assert step._cache_size() == 1
    assert len(set(values)) == 3  # each value really changes the loss
    want = float(_call("erpo", {k: v * 1.5 for k, v in hp.items()})[0])
    np.testing.assert_allclose(values[-1], want, rtol=1e-5)
