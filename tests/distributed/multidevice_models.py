"""Run by tests/distributed/test_multidevice.py in a fresh process with 8 CPU devices.

Saves a tiny random decoder in Hugging Face format, loads it onto a
(fsdp=4, tensor=2) mesh with ``load_hf_checkpoint(..., mesh=...)``, and checks
that the parameters are really sharded over the devices and that the jitted
forward on the sharded model gives the single-device logits. On a
(fsdp=2, tensor=4) mesh the attention projections split over ``tensor`` only
in whole heads (the 2 KV heads do not divide by 4: k/v_proj replicate over
``tensor``). Then sequence
parallelism (``Decoder(residual_sharding=...)`` on a (fsdp=2, tensor=4) mesh,
with remat and scanned layers): the same value and gradients as without it,
for a sequence length the tensor axis does not divide, and less compiled
temporary memory for a longer one. Prints ``OK``.
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
from jax.sharding import Mesh, PartitionSpec

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

# Tensor splits keep whole heads: on tensor=4, the 4 query heads split one a
# device, while the 2 KV heads cannot, so k/v_proj are replicated over
# `tensor` instead of cut into half-heads of 8 columns (the same rule as
# the trainer's place_params).
head_mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("fsdp", "tensor"))
with tempfile.TemporaryDirectory() as path:
    save_hf_checkpoint(model, config, path)
    by_heads, _ = load_hf_checkpoint(path, mesh=head_mesh)
for name, spec, side, width in (
    ("q_proj", (None, "fsdp", "tensor"), -1, config.head_dim),
    ("k_proj", (None, "fsdp", None), -1, config.num_kv_heads * config.head_dim),
    ("v_proj", (None, "fsdp", None), -1, config.num_kv_heads * config.head_dim),
    ("o_proj", (None, "tensor", "fsdp"), -2, config.head_dim),
):
    weight = getattr(by_heads.layers, name)[...]
    assert tuple(weight.sharding.spec) == spec, (name, weight.sharding.spec)
    assert weight.sharding.shard_shape(weight.shape)[side] == width, (name, weight.shape)

graphdef, st = nnx.split(sharded)
forward = jax.jit(lambda st, t, m: nnx.merge(graphdef, st)(t, m))
got = np.asarray(forward(st, jnp.asarray(tokens), jnp.asarray(mask)))
np.testing.assert_allclose(got[mask], want[mask], rtol=1e-4, atol=1e-4)

# ---- sequence parallelism: the residual stream split over the tensor axis
from erpo_jax.train._config import MeshConfig  # noqa: E402
from erpo_jax.train._mesh import batch_sharding, make_mesh, place_params, residual_sharding  # noqa: E402

sp_mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
residual = residual_sharding(sp_mesh)
assert residual is not None and residual.spec[1] == "tensor", residual
# Without a tensor axis (or with sequence parallelism off) only the rows are
# pinned, over (data, fsdp); one device needs no pin.
rows_only = PartitionSpec(("data", "fsdp"), None, None)
assert residual_sharding(make_mesh(MeshConfig(data=2, fsdp=4, tensor=1))).spec == rows_only
assert residual_sharding(sp_mesh, sequence_parallel=False).spec == rows_only
assert residual_sharding(make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])) is None


def policy(sp: bool, cfg: ModelConfig = config) -> Decoder:
    return Decoder(cfg, scan_layers=True, remat=True, attention_impl="chunked",
                   attention_block=128, rngs=nnx.Rngs(0),
                   residual_sharding=residual if sp else None)  # fmt: skip


def objective(graphdef):
    def f(params, tokens, mask):
        logits = nnx.merge(graphdef, params)(tokens, mask)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(mask[:, 1:], picked, 0.0)) / jnp.sum(mask[:, 1:])

    return jax.jit(jax.value_and_grad(f))


def compiled_step(sp: bool, tokens, mask, cfg: ModelConfig = config):
    graphdef, params = nnx.split(policy(sp, cfg))
    params = place_params(params, sp_mesh, head_dim=cfg.head_dim)
    rows = batch_sharding(sp_mesh, 2)
    tokens, mask = jax.device_put(tokens, rows), jax.device_put(mask, rows)
    step = objective(graphdef)
    return step, params, tokens, mask


# S = 10 does not divide over tensor=4: the compiler pads the split.
base = compiled_step(False, jnp.asarray(tokens), jnp.asarray(mask))
split = compiled_step(True, jnp.asarray(tokens), jnp.asarray(mask))
(want_loss, want_grad), (got_loss, got_grad) = base[0](*base[1:]), split[0](*split[1:])
np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5)
for w, g in zip(jax.tree.leaves(want_grad), jax.tree.leaves(got_grad), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4, atol=1e-6)

# Memory: 12 layers at 1,024 tokens, where the block inputs remat keeps
# dominate; with the split each device keeps a quarter of them (measured
# 8.65 MB -> 5.45 MB of temporaries).
deep = dataclasses.replace(config, num_layers=12)
long_tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 1024)).astype(np.int32))
long_mask = jnp.ones((2, 1024), bool)
temps = {}
for sp in (False, True):
    step, params, t, m = compiled_step(sp, long_tokens, long_mask, deep)
    temps[sp] = step.lower(params, t, m).compile().memory_analysis().temp_size_in_bytes
assert temps[True] < 0.75 * temps[False], temps
print("OK")
