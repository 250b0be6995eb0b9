"""Run by tests/distributed/test_multidevice.py in a fresh process with 8 CPU devices.

Checks that the pure losses work under ``pmap`` and ``shard_map`` and that a
data-parallel loss (rows split over devices by whole prompt groups, numerator
and denominator summed with ``psum``) equals the single-device loss and
gradient. Prints ``OK`` at the end; any failure raises.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from conftest import make_batch

from erpo_jax import losses as L

N = 8
assert jax.device_count() == N, jax.devices()
P, G, T = 16, 4, 12  # two prompts per device
x = make_batch(80, P, G, T, "empty_rows", nan_pad=True)
ARGS = ("logp", "old_logp", "rewards", "entropy", "mask", "ref_logp")


def erpo(logp, old_logp, rewards, entropy, mask, ref_logp, agg="token_mean"):
    return L.erpo_loss(
        logp, old_logp, rewards, entropy, mask, ref_logp=ref_logp, agg=agg, kl_coef=0.05
    )


# The single-device references are jitted: eagerly, each ERPO call would run
# op by op (about 0.7 s each on 2 cores).
erpo_ref = jax.jit(erpo, static_argnames="agg")

# pmap: each device sees its own two prompts.
shards = {k: x[k].reshape(N, -1, *x[k].shape[1:]) for k in ARGS}
pm_loss, pm_aux = jax.pmap(erpo)(*(shards[k] for k in ARGS))
for d in range(N):
    want, want_aux = erpo_ref(*(shards[k][d] for k in ARGS))
    np.testing.assert_allclose(pm_loss[d], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pm_aux.gate_mean[d], want_aux.gate_mean, rtol=1e-5)

holder = jax.pmap(lambda a, b, c, m: L.holder_loss(a, b, c, m, p=0.5)[0])(
    shards["logp"], shards["old_logp"], x["adv_seq"].reshape(N, -1), shards["mask"]
)
holder_ref = jax.jit(lambda a, b, c, m: L.holder_loss(a, b, c, m, p=0.5)[0])
for d in range(N):
    want = holder_ref(
        shards["logp"][d],
        shards["old_logp"][d],
        x["adv_seq"].reshape(N, -1)[d],
        shards["mask"][d],
    )
    np.testing.assert_allclose(holder[d], want, rtol=1e-5)

# shard_map data parallelism: token advantages per shard (whole groups), loss
# numerators and denominators psum-ed, gradients summed by sharding.
mesh = Mesh(np.array(jax.devices()), ("data",))
row = PartitionSpec("data")

for agg in L.AGG_MODES:

    def local_loss(logp, old_logp, rewards, entropy, mask, ref_logp, agg=agg):
        adv = L.erpo_token_advantages(rewards, entropy, mask, old_logp=old_logp, ref_logp=ref_logp)
        tok, _ = L.policy_token_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.05)
        num, den = L.aggregate_parts(tok, mask, agg=agg)
        num, den = jax.lax.psum(num, "data"), jax.lax.psum(den, "data")
        return num / jnp.maximum(den, 1.0)

    sharded = jax.shard_map(local_loss, mesh=mesh, in_specs=(row,) * 6, out_specs=PartitionSpec())
    value, grad = jax.jit(jax.value_and_grad(sharded))(*(x[k] for k in ARGS))
    want, want_grad = jax.jit(
        jax.value_and_grad(lambda lp, agg=agg: erpo(lp, *(x[k] for k in ARGS[1:]), agg=agg)[0])
    )(x["logp"])
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    assert len(grad.sharding.device_set) == N

print("OK")
