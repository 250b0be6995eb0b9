"""Run by tests/distributed/test_multidevice.py in a fresh process with 8 CPU devices.

Pure data parallelism (mesh ``data=8``, parameters replicated, batch rows
sharded) must need no collective on activations. The compiled HLO of
value_and_grad of (1) the chunked log-prob/entropy head and (2) the whole
policy scoring (``score_completions``) is checked: no all-gather, all-to-all
or collective-permute at all, and every all-reduce carries only scalars
(the global token mean) or parameter gradients, whose shapes are those of
the parameters; the gradient of the sharded input stays sharded. Then FSDP
(mesh ``fsdp=8``, weights split over the rows' axis): with the trainer's
``residual_sharding`` pin, no collective carries a whole-batch float
activation (it does without the pin); and ``sample(..., mesh=)`` there
gathers the parameters over fsdp once, so its decode loop has no array
collective, with the same outputs as on the sharded parameters (in bf16
compute, gathered already cast: the outputs of one device). Prints ``OK``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from erpo_jax.models import Decoder, ModelConfig, score_completions
from erpo_jax.ops import token_logp_and_entropy

assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("data",))
rows = NamedSharding(mesh, PartitionSpec("data"))
replicated = NamedSharding(mesh, PartitionSpec())
_SHAPE = re.compile(r"[a-z0-9]+\[([0-9,]*)\]")
_FORBIDDEN = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")


_OP = re.compile(
    r"\s(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start|-done)?\("
)


_BODY = re.compile(r"body=(%[\w.\-]+)")


def collectives(hlo: str) -> tuple[list[str], list[tuple[int, ...]], list[str]]:
    """Forbidden collective lines, the result shapes of every all-reduce, and the
    all-reduces that sit inside a loop body (once per iteration)."""
    bodies = set(_BODY.findall(hlo))
    bad, reduced, in_loop = [], [], []
    computation = ""
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            computation = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
        match = _OP.search(line)
        if not match or "=" not in line[: match.start()]:
            continue
        op, phase = match.group(1), match.group(2) or ""
        if op in _FORBIDDEN:
            bad.append(line.strip())
        elif phase != "-done":  # all-reduce or all-reduce-start
            result_type = line[line.index("=") + 1 : match.start()]
            for dims in _SHAPE.findall(result_type):
                reduced.append(tuple(int(d) for d in dims.split(",") if d))
            if computation in bodies:
                in_loop.append(line.strip()[:120])
    return bad, reduced, in_loop


# ---------------------------------------------------------------- 1: the head
B, T, D, V = 16, 32, 64, 256
rng = np.random.default_rng(0)
hidden = jax.device_put(rng.normal(size=(B, T, D)).astype(np.float32), rows)
unembed = jax.device_put((0.1 * rng.normal(size=(D, V))).astype(np.float32), replicated)
tokens = jax.device_put(rng.integers(0, V, (B, T)).astype(np.int32), rows)


def head_loss(h, u, tok, vocab_chunk):
    logp, ent = token_logp_and_entropy(
        h, u, tok, chunk_size=8, vocab_chunk_size=vocab_chunk, row_shards=8
    )
    return jnp.mean(logp) + 0.1 * jnp.mean(ent)


for vocab_chunk in (None, 64):  # whole vocabulary per chunk, and vocabulary tiles
    compiled = (
        jax.jit(jax.value_and_grad(functools.partial(head_loss, vocab_chunk=vocab_chunk), (0, 1)))
        .lower(hidden, unembed, tokens)
        .compile()
    )
    bad, reduced, in_loop = collectives(compiled.as_text())
    assert not bad, bad
    assert all(s in ((), (D, V)) for s in reduced), reduced  # scalars and d(unembed) only
    assert reduced.count((D, V)) == 1, reduced  # the weight gradient is summed once ...
    assert not in_loop, in_loop  # ... after the chunk loop, not once per chunk
    _, (g_hidden, g_unembed) = compiled.output_shardings
    assert g_hidden.is_equivalent_to(rows, 3), g_hidden
    assert g_unembed.is_equivalent_to(replicated, 2), g_unembed

# ---------------------------------------------------------------- 2: the policy
config = dataclasses.replace(
    ModelConfig.preset("qwen3-0.6b"),
    vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=False,
)  # fmt: skip
graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0)))
params = jax.device_put(params, replicated)
# Stacked [layers, ...] parameters are reduced per layer when the layers are
# unrolled, and a weight's gradient may be reduced before its transpose.
param_shapes = {tuple(x.shape)[i:] for x in jax.tree.leaves(params) for i in (0, 1)}
param_shapes |= {s[::-1] for s in param_shapes}
S, T2 = 8, 12
batch = {
    "prompt_tokens": rng.integers(0, 128, (B, S)).astype(np.int32),
    "prompt_mask": np.arange(S)[None] >= rng.integers(0, S, B)[:, None],
    "tokens": rng.integers(0, 128, (B, T2)).astype(np.int32),
    "mask": np.arange(T2)[None] < rng.integers(1, T2 + 1, B)[:, None],
}
batch = {k: jax.device_put(v, rows) for k, v in batch.items()}


def policy_loss(p, b):
    model = nnx.merge(graphdef, p)
    logp, ent = score_completions(
        model,
        b["prompt_tokens"],
        b["prompt_mask"],
        b["tokens"],
        b["mask"],
        chunk_size=4,
        row_shards=8,
    )
    m = b["mask"].astype(jnp.float32)
    return jnp.sum((logp + 0.1 * ent) * m) / jnp.sum(m)


compiled = jax.jit(jax.value_and_grad(policy_loss)).lower(params, batch).compile()
bad, reduced, in_loop = collectives(compiled.as_text())
assert not bad, bad
assert not in_loop, in_loop
activation = [s for s in reduced if s and s not in param_shapes]
assert not activation, activation  # only parameter gradients and scalars are reduced
assert any(s in param_shapes for s in reduced), reduced

# ---------------------------------------------------------------- 3: FSDP
# On fsdp=8 the weights' input side is split over the same axis as the rows.
# With the residual stream's rows pinned (residual_sharding), each device
# keeps its own rows and gathers the weights; unpinned, XLA ran the matmuls
# with all rows on every device and the contraction split, gathering and
# all-reducing [B, S, D]-shaped activations (on Qwen3-1.7B: [64, 4095, 6144]
# bf16 all-reduces, 52.7 against 21.0 GiB of update temporaries a device).
from erpo_jax.train import MeshConfig  # noqa: E402
from erpo_jax.train._mesh import batch_sharding, make_mesh, place_params, residual_sharding  # noqa: E402

fsdp_mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
fsdp_batch = {k: jax.device_put(np.asarray(v), batch_sharding(fsdp_mesh, v.ndim))
              for k, v in batch.items()}  # fmt: skip
L = S + T2 - 1  # the forward's positions


def activation_collectives(residual):
    """Collectives on whole-batch [B, L, ...] float activations (token ids aside)."""
    global graphdef
    model = Decoder(config, rngs=nnx.Rngs(0), residual_sharding=residual)
    graphdef, p = nnx.split(model)
    p = place_params(p, fsdp_mesh, head_dim=config.head_dim)
    hlo = jax.jit(jax.value_and_grad(policy_loss)).lower(p, fsdp_batch).compile().as_text()
    found = []
    for line in hlo.splitlines():
        match = _OP.search(line)
        if not match or "=" not in line[: match.start()] or match.group(2) == "-done":
            continue
        for kind, dims in re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", line[: match.start()]):
            shape = tuple(int(d) for d in dims.split(",") if d)
            if kind.startswith(("f", "bf")) and shape[:2] == (B, L):
                found.append((match.group(1), kind, shape))
    return found


pinned = residual_sharding(fsdp_mesh)
assert pinned is not None and pinned.spec == PartitionSpec(("data", "fsdp"), None, None), pinned
assert not activation_collectives(pinned), activation_collectives(pinned)
assert activation_collectives(None)  # the test tells the two apart

# ---------------------------------------------------------------- 4: sampling on FSDP
# sample(..., mesh=) on fsdp=8 gathers the parameters over fsdp once
# (gather_params): its decode loop then needs no collective but the loop's
# scalar "all rows done" flag. Without the gather, XLA split every matmul's
# contraction over fsdp and all-reduced activations and logits each step.
from erpo_jax.sampling import _sampler, sample  # noqa: E402

sampler_params = place_params(
    nnx.split(Decoder(config, rngs=nnx.Rngs(0)))[1], fsdp_mesh, head_dim=config.head_dim
)
sampler_graphdef = nnx.split(Decoder(config, rngs=nnx.Rngs(0)))[0]
_decode_jit = _sampler._decode_jit


def abstract(x):
    if isinstance(x, jax.Array):  # uncommitted scalars follow the mesh, as in the call
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if x.committed else None)
    return x


def sample_and_decode_hlo(gather):
    """``sample``'s outputs and its decode loop's compiled HLO (lowered again from
    the first call's argument shapes and shardings)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append((jax.tree.map(abstract, args), kwargs))
        return _decode_jit(*args, **kwargs)

    _sampler._decode_jit = spy
    try:
        out = sample(
            (sampler_graphdef, sampler_params),
            batch["prompt_tokens"][:, :S],
            batch["prompt_mask"][:, :S] | (np.arange(S) == S - 1),
            jax.random.key(5),
            max_new_tokens=6,
            eos_ids=(),
            mesh=fsdp_mesh,
            decode_phases=1,
            gather_params=gather,
        )
    finally:
        _sampler._decode_jit = _decode_jit
    args, kwargs = calls[0]
    return out, _decode_jit.lower(*args, **kwargs).compile().as_text()


def array_collectives(hlo):
    """Collectives whose result is not a scalar."""
    found = []
    for line in hlo.splitlines():
        match = _OP.search(line)
        if not match or "=" not in line[: match.start()] or match.group(2) == "-done":
            continue
        shapes = re.findall(r"[a-z0-9]+\[([0-9,]*)\]", line[: match.start()])
        if any(dims for dims in shapes):
            found.append(line.strip()[:120])
    return found


gathered, hlo_gathered = sample_and_decode_hlo(True)
sharded, hlo_sharded = sample_and_decode_hlo(False)
assert not array_collectives(hlo_gathered), array_collectives(hlo_gathered)
assert array_collectives(hlo_sharded)  # the test tells the two apart
assert gathered.tokens.sharding.is_equivalent_to(batch_sharding(fsdp_mesh, 2), 2)
np.testing.assert_array_equal(np.asarray(gathered.tokens), np.asarray(sharded.tokens))
for field in ("logp", "entropy"):  # the same values, summed in another order
    np.testing.assert_allclose(np.asarray(getattr(gathered, field)),
                               np.asarray(getattr(sharded, field)), rtol=1e-5, atol=1e-5)  # fmt: skip
# Gathered leaves keep every split but fsdp's (tensor is 1 here: whole); params
# not on the mesh, or gather_params=False, or a budget too small under auto,
# gather nothing.
layout = _sampler.gathered_layout(sampler_params, fsdp_mesh, True)
assert all("fsdp" not in str(t.sharding.spec) and t.sharding.is_fully_replicated
           for t in jax.tree.leaves(layout))  # fmt: skip
assert _sampler.gathered_layout(sampler_params, fsdp_mesh, False) is None
assert _sampler.gathered_layout(sampler_params, fsdp_mesh, None, bytes_limit=1000) is None
assert _sampler.gathered_layout(sampler_params, fsdp_mesh, None, bytes_limit=10**9) is not None
assert _sampler.gathered_layout(sampler_params, mesh, True) is None  # data=8: no fsdp

# A bfloat16-compute model with float32 parameters: every weight but the norms
# is gathered already in bfloat16 (what the model computes with), so the
# rollout samples exactly what one device with the float32 parameters does.
bf16_layout = _sampler.gathered_layout(sampler_params, fsdp_mesh, True, dtype=jnp.bfloat16)
for path, t in jax.tree_util.tree_flatten_with_path(bf16_layout)[0]:
    name = str(path[-2].key if len(path) > 1 else path[-1])
    assert t.dtype == (jnp.float32 if name.endswith("norm") else jnp.bfloat16), (name, t.dtype)
bf16_graphdef = nnx.split(Decoder(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))[0]
one_device = jax.device_put(sampler_params, jax.devices()[0])
prompts = np.asarray(batch["prompt_tokens"][:, :S])


def bf16_sample(params, mesh):
    return sample((bf16_graphdef, params), prompts, np.ones_like(prompts, bool),
                  jax.random.key(6), max_new_tokens=5, eos_ids=(), mesh=mesh,
                  decode_phases=1, gather_params=True)  # fmt: skip


meshed, single = bf16_sample(sampler_params, fsdp_mesh), bf16_sample(one_device, None)
np.testing.assert_array_equal(np.asarray(meshed.tokens), np.asarray(single.tokens))
np.testing.assert_allclose(np.asarray(meshed.logp), np.asarray(single.logp), atol=1e-5)
print("OK")
