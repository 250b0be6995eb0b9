"""Run by tests/distributed/test_multidevice.py in a fresh process with 8 CPU devices.

Saves a tiny random decoder in Hugging Face format, loads it onto a
(fsdp=4, tensor=2) mesh with ``load_hf_checkpoint(..., mesh=...)``, and checks
that the parameters are really sharded over the devices and that the jitted
forward on the sharded model gives the single-device logits. Prints ``OK``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from erpo_jax.models import Decoder, ModelConfig, load_hf_checkpoint, save_hf_checkpoint

assert jax.device_count() == 8, jax.devices()
config = dataclasses.replace(
    ModelConfig.preset("qwen3-0.6b"),
    vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False,
)  # fmt: skip
model = Decoder(config, rngs=nnx.Rngs(0))
rng = np.random.default_rng(0)
tokens = rng.integers(0, config.vocab_size, (4, 10)).astype(np.int32)
mask = np.arange(10)[None, :] >= np.array([0, 3, 1, 5])[:, None]  # left padding
want = np.asarray(model(jnp.asarray(tokens), jnp.asarray(mask)))

mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))
with tempfile.TemporaryDirectory() as path:
    save_hf_checkpoint(model, config, path)
    sharded, loaded_config = load_hf_checkpoint(path, mesh=mesh)
assert loaded_config == config, (loaded_config, config)

state = nnx.state(sharded, nnx.Param)
leaves = jax.tree.leaves(state)
spread = [len(x.sharding.device_set) for x in leaves]
assert max(spread) == 8, spread  # some weights span the whole mesh
assert any(not x.sharding.is_fully_replicated for x in leaves)
embed = sharded.embed[...]
assert embed.sharding.shard_shape(embed.shape) == (config.vocab_size // 2, config.hidden_size // 4)

graphdef, st = nnx.split(sharded)
forward = jax.jit(lambda st, t, m: nnx.merge(graphdef, st)(t, m))
got = np.asarray(forward(st, jnp.asarray(tokens), jnp.asarray(mask)))
np.testing.assert_allclose(got[mask], want[mask], rtol=1e-4, atol=1e-4)
print("OK")
