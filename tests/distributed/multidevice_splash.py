"""Run by tests/distributed/test_multidevice.py in a fresh process with 8 CPU devices.

The splash-attention kernel (Pallas interpret mode off TPU) under
``shard_map`` on a (data=2, fsdp=2, tensor=2) mesh: rows split over
(data, fsdp), heads over tensor. Value and gradient at the real queries
equal the unsharded ``xla`` path, and the output keeps the rows' sharding.
Also on a mesh whose KV heads do not divide the tensor axis (heads then
stay whole). Prints ``OK``.
"""

from __future__ import annotations

import os
import warnings

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from erpo_jax.models import attention as A
from erpo_jax.train import MeshConfig, make_mesh

warnings.filterwarnings("ignore", message="attention_impl='splash' off TPU")
assert jax.device_count() == 8
rng = np.random.default_rng(0)
B, S, N, H = 4, 140, 4, 16


def check(mesh_shape, kv_heads):
    mesh = make_mesh(MeshConfig(*mesh_shape), jax.devices())
    q = jnp.asarray(rng.normal(size=(B, S, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, kv_heads, S, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, kv_heads, S, H)), jnp.float32)
    mask = np.ones((B, S), bool)
    mask[1, :11] = False
    mask[3, :3] = False
    mask = jnp.asarray(mask)
    slots = jnp.arange(S, dtype=jnp.int32)
    w = jnp.asarray(rng.normal(size=(B, S, N * H)), jnp.float32)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    q, k, v, mask = (jax.device_put(x, rows) for x in (q, k, v, mask))

    def loss(q, k, v, impl, m):
        out = A.attention(q, k, v, slots, mask, impl=impl, mesh=m)
        return jnp.sum(jnp.where(mask[..., None], out * w, 0.0)), out

    grad = jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True), static_argnums=(3, 4))
    (gs, out_s) = grad(q, k, v, "splash", mesh)
    (gx, out_x) = grad(q, k, v, "xla", None)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(out_s)[real], np.asarray(out_x)[real], atol=2e-5)
    for name, a, b in zip("qkv", gs, gx, strict=True):
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * scale, err_msg=name)
    # The kernel runs per device (shard_map), not on gathered inputs.
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: loss(q, k, v, "splash", mesh))(q, k, v))
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    spec = out_s.sharding.spec
    assert spec and spec[0] == ("data", "fsdp"), out_s.sharding


check((2, 2, 2), kv_heads=2)  # heads split over tensor
check((2, 2, 2), kv_heads=1)  # 1 KV head does not divide tensor=2: heads stay whole
print("OK")
