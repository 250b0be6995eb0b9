"""Run by tests/distributed/test_multidevice.py in a fresh process with 8 CPU devices.

``sample(..., mesh=...)`` on meshes of 8 devices (data=8; data=2 x fsdp=2 x
tensor=2) with the parameters placed by the trainer's rules: the rows are
sharded over (data, fsdp), the outputs come back sharded by rows (not
replicated), and they equal the single-device outputs (same keys), with
and without prefix sharing, with REFT and with decode phases. A row count that does not divide
over the row shards is a clear error. Prints ``OK``.

``python multidevice_sampler.py NAME@DATAxFSDPxTENSOR`` (e.g. ``plain@8x1x1``)
runs one case on one mesh, the default test tier's quick check; with no
argument, every case on both meshes (the slow tier, ~3 min on 2 cores).
"""

from __future__ import annotations

import dataclasses
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from erpo_jax.models import Decoder, ModelConfig
from erpo_jax.sampling import sample
from erpo_jax.train import MeshConfig, make_mesh, place_params

assert jax.device_count() == 8, jax.devices()
config = dataclasses.replace(
    ModelConfig.preset("qwen3-0.6b"),
    vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False,
)  # fmt: skip
model = Decoder(config, rngs=nnx.Rngs(0))
graphdef, params = nnx.split(model)
rng = np.random.default_rng(0)
P, G, S, T = 4, 4, 6, 8
prompts = rng.integers(3, 128, (P, S)).astype(np.int32)
pmask = np.arange(S)[None] >= np.array([0, 2, 1, 4])[:, None]  # left padding
tokens, mask = np.repeat(prompts, G, axis=0), np.repeat(pmask, G, axis=0)
key = jax.random.key(7)
cases = {
    "plain": dict(),
    "groups": dict(group_size=G),  # prefix sharing
    "reft": dict(group_size=G, first_token="reft", reft_top_n=8, reft_k=2),
    # three decode loops over a cache grown between them, kept sharded
    "phases": dict(group_size=G, decode_phases=3),
}
meshes = [(8, 1, 1), (2, 2, 2)]
if len(sys.argv) > 1:  # one case on one mesh: NAME@DATAxFSDPxTENSOR
    name, shape = sys.argv[1].split("@")
    cases = {name: cases[name]}
    meshes = [tuple(int(n) for n in shape.split("x"))]
common = dict(max_new_tokens=T, temperature=1.0, eos_ids=(2,), pad_id=0)
want = {name: sample(model, tokens, mask, key, **common, **kw) for name, kw in cases.items()}

for shape in meshes:
    mesh = make_mesh(MeshConfig(*shape), jax.devices())
    placed = place_params(params, mesh, head_dim=config.head_dim)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    shards = shape[0] * shape[1]  # rows over (data, fsdp), replicated over tensor
    for name, kw in cases.items():
        got = sample((graphdef, placed), tokens, mask, key, mesh=mesh, **common, **kw)
        ref = want[name]
        for field in got._fields:
            value = getattr(got, field)
            where = (shape, name, field, value.sharding)
            assert value.sharding.is_equivalent_to(rows, value.ndim), where
            # Not replicated: each device holds only its own B / shards rows.
            assert not value.sharding.is_fully_replicated, where
            assert {s.data.shape[0] for s in value.addressable_shards} == {P * G // shards}, where
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
        np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(ref.mask))
        np.testing.assert_allclose(np.asarray(got.logp), np.asarray(ref.logp), atol=2e-5)
        np.testing.assert_allclose(np.asarray(got.entropy), np.asarray(ref.entropy), atol=2e-5)

mesh = make_mesh(MeshConfig(8, 1, 1), jax.devices())
try:
    sample(model, tokens[:12], mask[:12], key, mesh=mesh, **common)
except ValueError as err:
    assert "12 rows, which do not divide over the mesh's 8 row shards" in str(err), err
else:
    raise AssertionError("12 rows on 8 row shards must be refused")
print("OK")
