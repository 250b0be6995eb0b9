"""One RL train step (ERPO, micro-batched) on 8 simulated devices equals the single-device step.

Meshes (data, fsdp, tensor) = (8,1,1), (2,4,1) and (1,4,2): parameters placed
by the trainer's sharding rules (erpo_jax.train.place_params), the batch
sharded over (data, fsdp) (global_batch), then the jitted score forward and
update. Loss, metrics and updated parameters must match one device to 1e-5.
The model is built as the trainer builds it, with sequence parallelism on
the mesh with a tensor axis.
Run by tests/distributed/test_multidevice.py with XLA_FLAGS set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from erpo_jax.models import Decoder, ModelConfig
from erpo_jax.train import (
    LossConfig,
    MeshConfig,
    global_batch,
    make_loss_fn,
    make_mesh,
    make_score_fn,
    make_update_fn,
    place_params,
    residual_sharding,
    split_policy,
)

assert jax.device_count() == 8, jax.devices()

# Widths divisible by 4 (fsdp) and heads by 2 (tensor), so every rule applies.
CONFIG = ModelConfig(
    "qwen3",
    64,
    32,
    64,
    2,
    4,
    2,
    8,
    qk_norm=True,
    max_position_embeddings=64,
    eos_token_ids=(2,),
    pad_token_id=0,
)
P, G, S, T = 8, 4, 4, 6


def batch_arrays():
    rng = np.random.default_rng(0)
    b = P * G
    lengths = rng.integers(1, T + 1, b)
    mask = np.arange(T)[None] < lengths[:, None]
    pmask = np.ones((P, S), bool)
    pmask[::3, :2] = False
    rewards = rng.integers(0, 2, (P, G)).astype(np.float32)
    # The trainer's layout: a group's G rows share their prompt, which the
    # update and the scoring forward run once per group (group_size=G).
    return {
        "prompt_tokens": np.repeat(rng.integers(3, 64, (P, S)).astype(np.int32), G, axis=0),
        "prompt_mask": np.repeat(pmask, G, axis=0),
        "tokens": np.where(mask, rng.integers(3, 64, (b, T)), 0).astype(np.int32),
        "mask": mask,
        "rewards": rewards,
        "entropy": rng.gamma(1.5, 0.8, (b, T)).astype(np.float32),
    }


def one_step(mesh_cfg: MeshConfig, devices, shards=None):
    mesh = make_mesh(mesh_cfg, devices)
    # As the trainer builds it: sequence parallelism on meshes with tensor > 1.
    model = Decoder(CONFIG, rngs=nnx.Rngs(0), residual_sharding=residual_sharding(mesh))
    graphdef, trainable, frozen = split_policy(model, lora=False)
    hd = CONFIG.head_dim
    trainable = place_params(trainable, mesh, head_dim=hd)
    frozen = place_params(frozen, mesh, head_dim=hd)
    ref = jax.tree.map(jnp.copy, trainable)
    cfg = LossConfig(name="erpo", kl_coef=0.01)
    if shards is None:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
    # SGD with lr 1: the parameter change is the gradient itself, so matching
    # parameters means matching gradients (Adam's normalization would turn
    # float32 reduction-order noise on near-zero gradients into 1e-3 steps).
    tx = optax.sgd(1.0)
    loss_fn = make_loss_fn(cfg, max_len=T, total_steps=4)
    update = make_update_fn(
        graphdef,
        tx,
        optax.constant_schedule(1.0),
        loss_fn,
        cfg,
        micro_batches=2,
        max_len=T,
        temperature=1.0,
        chunk_size=16,
        vocab_chunk_size=None,
        arca=False,
        row_shards=shards,  # (1, 4, 2): micro-batches take a slice of each shard's rows
        group_size=G,
    )
    score = make_score_fn(
        graphdef,
        temperature=1.0,
        chunk_size=16,
        vocab_chunk_size=None,
        row_shards=shards,
        group_size=G,
        micro_batches=2,  # rows in 2 chunks (of each shard's rows), joined back in order
    )
    batch = global_batch(batch_arrays(), mesh)
    old, _ = score(trainable, frozen, batch, True)
    batch["old_logp"] = old - 0.01
    batch["ref_logp"], _ = score(ref, frozen, batch, True)
    state = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.int32(0)}
    state, metrics = update(state, frozen, batch)
    params = jax.device_get(state["params"])
    # How many parameters are really split across devices (not just named axes of size 1).
    split = sum(
        leaf.sharding.shard_shape(leaf.shape) != leaf.shape
        for leaf in jax.tree.leaves(state["params"])
    )
    return jax.device_get(metrics), params, split


# The loss's aux metrics are means over micro-batches, so they depend on which
# groups share a micro-batch: the one-device reference uses the same split
# (row_shards) as the mesh it is compared with. The gradient does not depend on it.
references = {s: one_step(MeshConfig(data=1), jax.devices()[:1], shards=s) for s in (1, 4, 8)}
assert abs(float(references[1][0]["loss"])) > 1e-6
for a, b in zip(jax.tree.leaves(references[1][1]), jax.tree.leaves(references[4][1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg="split by 4 row shards")
for shape in ((8, 1, 1), (2, 4, 1), (1, 4, 2)):
    ref_metrics, ref_params, _ = references[shape[0] * shape[1]]
    metrics, params, specs = one_step(
        MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2]), jax.devices()
    )
    for key in ("loss", "grad_norm", "clip_frac_low", "cdp_frac", "kl"):
        np.testing.assert_allclose(
            metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6, err_msg=f"{shape} {key}"
        )
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=str(shape))
    # The updated parameters stay sharded by the rules (none split on a pure data mesh).
    assert (specs > 0) == (shape[1] * shape[2] > 1), (shape, specs)
    print(shape, f"matches one device; {specs} parameters split across devices")
print("OK")
