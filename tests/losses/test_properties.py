"""Identities and transformations: exact equivalences, masking, dtypes, grads, vmap."""

from __future__ import annotations

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_batch
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads

from erpo_jax import losses as L


@pytest.mark.parametrize("agg", L.AGG_MODES)
@pytest.mark.parametrize("kind", ["ragged", "empty_rows"])
def test_erpo_without_gate_or_progress_is_grpo_exactly(agg, kind):
    x = make_batch(21, 3, 4, 8, kind, nan_pad=True)
    kw = {"agg": agg, "clip_eps_high": 0.28, "clip_c": 3.0, "kl_coef": 0.02}
    grpo, _ = L.grpo_loss(
        x["logp"], x["old_logp"], x["rewards"], x["mask"], ref_logp=x["ref_logp"], **kw
    )
    erpo, _ = L.erpo_loss(
        x["logp"], x["old_logp"], x["rewards"], x["entropy"], x["mask"],
        ref_logp=x["ref_logp"], gate_mode="none", eta=0.0, **kw,
    )  # fmt: skip
    assert float(erpo) == float(grpo)


def test_holder_p1_token_clipping_is_grpo():
    x = make_batch(22, 3, 4, 8, "empty_rows", nan_pad=True)
    adv_seq = L.group_advantages(x["rewards"]).reshape(-1)
    grpo, _ = L.grpo_loss(
        x["logp"], x["old_logp"], x["rewards"], x["mask"], agg="seq_mean_token_mean"
    )
    holder, _ = L.holder_loss(
        x["logp"], x["old_logp"], adv_seq, x["mask"], p=1.0, clip_level="token"
    )
    np.testing.assert_allclose(float(holder), float(grpo), rtol=1e-5, atol=1e-6)
    # Gradients agree too: the token-level HolderPO at p = 1 is the same objective.
    g1 = jax.grad(
        lambda lp: L.grpo_loss(
            lp, x["old_logp"], x["rewards"], x["mask"], agg="seq_mean_token_mean"
        )[0]
    )(x["logp"])
    g2 = jax.grad(
        lambda lp: L.holder_loss(lp, x["old_logp"], adv_seq, x["mask"], p=1.0, clip_level="token")[
            0
        ]
    )(x["logp"])
    np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-6)


def _erpo(x, **kw):
    return L.erpo_loss(
        x["logp"],
        x["old_logp"],
        x["rewards"],
        x["entropy"],
        x["mask"],
        ref_logp=x["ref_logp"],
        **kw,
    )[0]


@pytest.mark.parametrize("agg", L.AGG_MODES)
def test_extra_padding_columns_change_nothing(agg):
    x = make_batch(23, 2, 4, 6, "ragged")
    padded = {}
    for k, v in x.items():
        if v.ndim == 2 and k != "rewards":
            fill = False if v.dtype == bool else np.nan
            padded[k] = np.concatenate([v, np.full((v.shape[0], 5), fill, v.dtype)], axis=1)
        else:
            padded[k] = v
    kw = {"agg": agg, "max_len": 16, "kl_coef": 0.1}
    np.testing.assert_allclose(float(_erpo(padded, **kw)), float(_erpo(x, **kw)), rtol=1e-6)


def test_masked_equals_sliced():
    # Right-padded rows of equal length n: masking the tail = slicing it off.
    x = make_batch(24, 2, 3, 10, "full")
    n = 6
    masked = dict(x, mask=np.arange(10)[None, :].repeat(6, 0) < n)
    sliced = {k: (v[:, :n] if v.ndim == 2 and k != "rewards" else v) for k, v in x.items()}
    for agg in L.AGG_MODES:
        kw = {"agg": agg, "max_len": 12}
        np.testing.assert_allclose(
            float(_erpo(masked, **kw)), float(_erpo(sliced, **kw)), rtol=1e-6
        )
        a = L.holder_loss(masked["logp"], masked["old_logp"], x["adv_seq"], masked["mask"], p=0.5)[
            0
        ]
        b = L.holder_loss(sliced["logp"], sliced["old_logp"], x["adv_seq"], sliced["mask"], p=0.5)[
            0
        ]
        np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_bf16_in_f32_out():
    x = make_batch(25, 2, 4, 7, "ragged")
    bf = {k: (v.astype(jnp.bfloat16) if v.dtype == np.float32 else v) for k, v in x.items()}
    loss, aux = L.erpo_loss(
        bf["logp"],
        bf["old_logp"],
        bf["rewards"],
        bf["entropy"],
        bf["mask"],
        ref_logp=bf["ref_logp"],
    )
    assert loss.dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in aux)
    for fn in (
        lambda: L.group_advantages(bf["rewards"]),
        lambda: L.erpo_token_advantages(bf["rewards"], bf["entropy"], bf["mask"], eta=0.0),
        lambda: L.holder_loss(bf["logp"], bf["old_logp"], bf["adv_seq"], bf["mask"], p=0.5)[0],
        lambda: L.policy_token_loss(bf["logp"], bf["old_logp"], bf["adv_tok"], bf["mask"])[0],
        lambda: L.arca_token_weights(bf["residual_norm"], bf["mask"]),
    ):
        assert fn().dtype == jnp.float32
    # The bf16 loss is the f32 loss of the rounded inputs.
    f32_of_bf16 = {
        k: (np.asarray(v, np.float32) if v.dtype == jnp.bfloat16 else v) for k, v in bf.items()
    }
    np.testing.assert_allclose(float(loss), float(_erpo(f32_of_bf16)), rtol=1e-5)


def _losses_of_logp(x):
    """Each loss as a function of the differentiated input ``logp`` only."""
    adv_seq = x["adv_seq"]
    return {
        "policy": lambda lp: L.policy_loss(lp, x["old_logp"], x["adv_tok"], x["mask"], kl_coef=0.1, ref_logp=x["ref_logp"], clip_c=3.0)[0],
        "grpo": lambda lp: L.grpo_loss(lp, x["old_logp"], x["rewards"], x["mask"], agg="seq_mean_token_sum_norm")[0],
        "erpo": lambda lp: L.erpo_loss(lp, x["old_logp"], x["rewards"], x["entropy"], x["mask"], ref_logp=x["ref_logp"], kl_coef=0.05)[0],
        "holder_seq": lambda lp: L.holder_loss(lp, x["old_logp"], adv_seq, x["mask"], p=-1.5)[0],
        "holder_tok": lambda lp: L.holder_loss(lp, x["old_logp"], adv_seq, x["mask"], p=0.0, clip_level="token")[0],
    }  # fmt: skip


@pytest.mark.parametrize("name", ["policy", "grpo", "erpo", "holder_seq", "holder_tok"])
def test_gradients_check_and_ignore_padding(name):
    clean = make_batch(26, 2, 3, 6, "empty_rows")
    dirty = make_batch(26, 2, 3, 6, "empty_rows", nan_pad=True)
    f_clean, f_dirty = _losses_of_logp(clean)[name], _losses_of_logp(dirty)[name]
    g_clean = jax.grad(f_clean)(clean["logp"])
    g_dirty = jax.grad(f_dirty)(dirty["logp"])
    assert np.all(np.isfinite(g_dirty))
    np.testing.assert_array_equal(np.asarray(g_dirty)[~clean["mask"]], 0.0)
    np.testing.assert_allclose(g_dirty, g_clean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        float(f_dirty(dirty["logp"])), float(f_clean(clean["logp"])), rtol=1e-6
    )
    # Finite differences in float64 logic; the losses compute in float32, so the
    # check uses float32 tolerances (jax.test_util's defaults for float32).
    check_grads(f_clean, (clean["logp"],), order=1, modes=["rev"], eps=1e-3, atol=2e-2, rtol=2e-2)


def test_vmap_over_independent_batches():
    xs = [make_batch(30 + i, 2, 4, 5, "ragged") for i in range(3)]
    stacked = {k: np.stack([x[k] for x in xs]) for k in xs[0]}
    # Jitted: an eager vmap runs every op of the loss one by one (minutes on 2 cores).
    fn = jax.jit(functools.partial(L.erpo_loss, agg="seq_mean_token_mean"))
    vm = jax.jit(jax.vmap(lambda a, b, r, h, m, ref: fn(a, b, r, h, m, ref_logp=ref)[0]))(
        stacked["logp"], stacked["old_logp"], stacked["rewards"], stacked["entropy"], stacked["mask"], stacked["ref_logp"]
    )  # fmt: skip
    loop = [
        float(
            fn(
                x["logp"],
                x["old_logp"],
                x["rewards"],
                x["entropy"],
                x["mask"],
                ref_logp=x["ref_logp"],
            )[0]
        )
        for x in xs
    ]
    np.testing.assert_allclose(vm, loop, rtol=1e-5)


def test_no_recompile_on_new_values():
    fn = jax.jit(functools.partial(L.erpo_loss, agg="token_mean"))
    x, y = make_batch(40, 2, 4, 6), make_batch(41, 2, 4, 6)
    args = lambda b: (b["logp"], b["old_logp"], b["rewards"], b["entropy"], b["mask"])
    fn(*args(x), ref_logp=x["ref_logp"])
    size = fn._cache_size()
    fn(*args(y), ref_logp=y["ref_logp"])
    assert fn._cache_size() == size


def test_traced_hyperparameters():
    x = make_batch(42, 2, 4, 6)

    @jax.jit
    def step(p, kl_coef):
        h = L.holder_loss(x["logp"], x["old_logp"], x["adv_seq"], x["mask"], p=p)[0]
        k = L.policy_loss(
            x["logp"],
            x["old_logp"],
            x["adv_tok"],
            x["mask"],
            ref_logp=x["ref_logp"],
            kl_coef=kl_coef,
        )[0]
        return h, k

    sched = L.holder_p_schedule(100)
    assert float(sched(0)) == 2.0 and float(sched(100)) == -2.0 and float(sched(50)) == 0.0
    for s, kl_coef in ((0, 0.1), (50, 0.0), (75, 0.3)):
        h, k = step(sched(s), kl_coef)
        want = L.holder_loss(x["logp"], x["old_logp"], x["adv_seq"], x["mask"], p=float(sched(s)))[
            0
        ]
        np.testing.assert_allclose(float(h), float(want), rtol=1e-5)
        want_k = L.policy_loss(
            x["logp"], x["old_logp"], x["adv_tok"], x["mask"], ref_logp=x["ref_logp"],
            kl_coef=kl_coef,
        )[0]  # fmt: skip
        np.testing.assert_allclose(float(k), float(want_k), rtol=1e-5)
    # The traced kl_coef really enters the loss.
    assert abs(float(step(sched(0), 0.3)[1]) - float(step(sched(0), 0.0)[1])) > 1e-3


_finite = st.floats(-30.0, 30.0, allow_nan=False, width=32)


@jax.jit
def _all_losses_and_grads(logp, old, rewards, entropy, mask, p):
    """Every loss and its gradient, jitted once for the property test's fixed shapes."""
    out = []
    for agg in L.AGG_MODES:
        f = lambda a, agg=agg: L.erpo_loss(
            a, old, rewards, entropy, mask, ref_logp=old * 0.5, agg=agg, kl_coef=0.1
        )
        (loss, aux), grad = jax.value_and_grad(f, has_aux=True)(logp)
        out += [loss, grad, *aux]
    adv = L.group_advantages(rewards).reshape(-1)
    for level in L.CLIP_LEVELS:
        f = lambda a, level=level: L.holder_loss(a, old, adv, mask, p=p, clip_level=level)
        (loss, aux), grad = jax.value_and_grad(f, has_aux=True)(logp)
        out += [loss, grad, *aux]
    out.append(L.arca_token_weights(entropy * 1e3, mask, power=4.0))
    return out


@given(
    lr=st.lists(_finite, min_size=12, max_size=12),
    ent=st.lists(st.floats(0.0, 40.0, width=32), min_size=12, max_size=12),
    rw=st.lists(st.floats(-1e3, 1e3, width=32), min_size=4, max_size=4),
    lengths=st.lists(st.integers(0, 3), min_size=4, max_size=4),
    p=st.sampled_from([-2.0, -1e-6, 0.0, 1e-6, 1.0, 2.0]),
)
def test_extreme_inputs_stay_finite(lr, ent, rw, lengths, p):
    logp = np.array(lr, np.float32).reshape(4, 3)
    old = np.flip(logp, axis=1).copy()
    mask = np.arange(3)[None, :] < np.array(lengths)[:, None]
    entropy = np.array(ent, np.float32).reshape(4, 3)
    rewards = np.array(rw, np.float32).reshape(2, 2)
    for value in _all_losses_and_grads(logp, old, rewards, entropy, mask, np.float32(p)):
        assert np.all(np.isfinite(np.asarray(value)))


def test_doctests():
    from erpo_jax.losses import _erpo, _policy

    for module in (_policy, _erpo):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
