"""Mixed precision: float32 parameters, bfloat16 compute, float32 statistics.

``Decoder(config, dtype=bfloat16, param_dtype=float32)`` must run its big
matmuls (the seven projections of every block) on bfloat16 operands while
RMSNorm's rsqrt, RoPE's cos/sin, the attention softmax and the head's
logsumexp stay float32, and its parameter gradients, optimizer state and
loss stay float32. A statistic computed in bfloat16 by mistake moves results
only by about bfloat16's own error, which any value tolerance for a bfloat16
model must allow, so these tests read the dtypes from the traced programs
(every equation, nested scan, remat and custom-VJP jaxprs included).
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxprs import equations

from erpo_jax.models import Decoder, ModelConfig
from erpo_jax.ops import token_logp_and_entropy
from erpo_jax.train import (
    LossConfig,
    OptimizerConfig,
    make_loss_fn,
    make_optimizer,
    make_update_fn,
    split_policy,
)

# D = 32, F = 48, 4 query heads and 2 KV heads of 8; V = 97 occurs in no other
# dimension, so a matmul with a 97-wide operand is the unembedding's.
CONFIG = ModelConfig(
    "qwen3",
    97,
    32,
    48,
    2,
    4,
    2,
    8,
    qk_norm=True,
    max_position_embeddings=64,
    eos_token_ids=(2,),
    pad_token_id=0,
)
V = CONFIG.vocab_size
LINEARS = 7  # q, k, v, o, gate, up and down projections of a block

# The float32 statistics: RMSNorm (rsqrt), RoPE (cos, sin), softmax and
# logsumexp (reduce_max, exp, log).
STATS = ("rsqrt", "cos", "sin", "reduce_max", "exp", "log")

F32, BF16 = np.dtype(jnp.float32), np.dtype(jnp.bfloat16)


def _model(config: ModelConfig = CONFIG, **kw) -> Decoder:
    return Decoder(config, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0), **kw)


def _inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, V, (2, 9)).astype(np.int32)
    mask = np.ones((2, 9), bool)
    mask[1, :3] = False  # left padding
    return jnp.asarray(tokens), jnp.asarray(mask)


def _dtypes(eqn) -> tuple[np.dtype, ...]:
    return tuple(np.dtype(v.aval.dtype) for v in eqn.invars)


def _stat_dtypes(jaxpr) -> dict[str, set[np.dtype]]:
    """Operand dtypes of every statistic primitive (:data:`STATS`), by primitive."""
    found = collections.defaultdict(set)
    for eqn in equations(jaxpr):
        if eqn.primitive.name in STATS:
            found[eqn.primitive.name].update(_dtypes(eqn))
    return dict(found)


def _matmuls(jaxpr) -> dict[str, list]:
    """Every ``dot_general`` by role: ``attention`` (batched over rows and KV heads),
    ``head`` (an operand as wide as the vocabulary: the logits, or their gradients)
    and ``projection`` (the rest: the linears, their input and weight gradients)."""
    roles = collections.defaultdict(list)
    for eqn in equations(jaxpr):
        if eqn.primitive.name != "dot_general":
            continue
        (_, _), (batch_lhs, _) = eqn.params["dimension_numbers"]
        shapes = [v.aval.shape for v in eqn.invars]
        if batch_lhs:
            roles["attention"].append(eqn)
        elif any(V in shape for shape in shapes):
            roles["head"].append(eqn)
        else:
            roles["projection"].append(eqn)
    return roles


def _assert_float32_stats(jaxpr, want: tuple[str, ...]) -> None:
    found = _stat_dtypes(jaxpr)
    assert set(want) <= set(found), f"missing from the program: {set(want) - set(found)}"
    for name, dtypes in found.items():
        assert dtypes == {F32}, f"{name} runs on {sorted(d.name for d in dtypes)}, not float32"


@pytest.mark.parametrize(
    ("impl", "scan_layers"), [("xla", False), ("chunked", True)], ids=["xla", "chunked-scan-remat"]
)
def test_bf16_forward_keeps_norms_rope_and_softmax_in_float32(impl, scan_layers):
    """The logits forward: statistics in float32, every matmul on bfloat16 operands,
    the logits accumulated in float32."""
    model = _model(attention_impl=impl, attention_block=4, scan_layers=scan_layers,
                   remat=scan_layers)  # fmt: skip
    graphdef, params = nnx.split(model)
    tokens, mask = _inputs()

    def forward(params):
        return nnx.merge(graphdef, params)(tokens, mask)

    jaxpr = jax.make_jaxpr(forward)(params)
    assert jaxpr.out_avals[0].dtype == F32
    # No logsumexp in the logits forward: the head computes it (next test).
    _assert_float32_stats(jaxpr, ("rsqrt", "cos", "sin", "reduce_max", "exp"))
    roles = _matmuls(jaxpr)
    # One block's body under scan, both blocks unrolled.
    assert len(roles["projection"]) >= LINEARS * (1 if scan_layers else CONFIG.num_layers)
    assert roles["attention"] and len(roles["head"]) == 1
    for role, eqns in roles.items():
        for eqn in eqns:
            assert _dtypes(eqn) == (BF16, BF16), (role, _dtypes(eqn), eqn)
    (logits,) = roles["head"]
    assert np.dtype(logits.outvars[0].aval.dtype) == F32


@pytest.mark.parametrize(
    ("impl", "scan_layers"), [("xla", False), ("chunked", True)], ids=["xla", "chunked-scan-remat"]
)
def test_bf16_gradient_through_the_head_keeps_statistics_and_param_grads_float32(impl, scan_layers):
    """The training path (hidden states, then the chunked log-prob/entropy head) under
    ``jax.grad``: statistics in float32 forward and backward, the projections and their
    gradients on bfloat16 operands, the head accumulating in float32, float32 gradients."""
    model = _model(attention_impl=impl, attention_block=4, scan_layers=scan_layers,
                   remat=scan_layers)  # fmt: skip
    graphdef, params = nnx.split(model)
    tokens, mask = _inputs()
    targets = jnp.roll(tokens, -1, axis=1)

    def loss(params):
        m = nnx.merge(graphdef, params)
        hidden = m.hidden_states(tokens, mask)
        logp, entropy = token_logp_and_entropy(hidden, m.unembedding(), targets, chunk_size=4)
        assert hidden.dtype == BF16 and logp.dtype == entropy.dtype == F32
        return -jnp.mean(logp) + 0.1 * jnp.mean(entropy)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    _assert_float32_stats(jaxpr, STATS)
    roles = _matmuls(jaxpr)
    # Each linear's forward, input gradient and weight gradient, at least once.
    assert len(roles["projection"]) >= 3 * LINEARS
    for eqn in roles["projection"]:
        assert _dtypes(eqn) == (BF16, BF16), (_dtypes(eqn), eqn)
    # The logits and their two gradients accumulate in float32.
    assert len(roles["head"]) >= 3
    for eqn in roles["head"]:
        assert np.dtype(eqn.outvars[0].aval.dtype) == F32, eqn

    # The gradients are the program's outputs, one per parameter, in its dtype.
    shapes = [(x.shape, F32) for x in jax.tree.leaves(params)]
    assert all(x.dtype == F32 for x in jax.tree.leaves(params))
    assert [(a.shape, np.dtype(a.dtype)) for a in jaxpr.out_avals] == shapes


def _batch(t=5):
    """Two prompts of four tokens, two completions each (ragged, one of length 1)."""
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, V, (2, 4)).astype(np.int32).repeat(2, axis=0)
    pmask = np.ones((4, 4), bool)
    pmask[:2, :1] = False  # left padding on the first prompt
    mask = np.arange(t)[None] < np.array([t, 2, 1, t - 1])[:, None]
    tokens = np.where(mask, rng.integers(3, V, (4, t)), 0).astype(np.int32)
    return {
        "prompt_tokens": jnp.asarray(prompt),
        "prompt_mask": jnp.asarray(pmask),
        "tokens": jnp.asarray(tokens),
        "mask": jnp.asarray(mask),
        "rewards": jnp.asarray([[1.0, 0.0], [0.0, 1.0]], jnp.float32),
        # Read only by the logp-mismatch metrics (old_from_forward).
        "sampler_logp": jnp.full((4, t), -4.0, jnp.float32),
    }


def test_one_update_of_a_bf16_model_keeps_float32_params_optimizer_state_and_loss():
    """One AdamW step moves every norm weight (initialized to exactly 1) by the learning
    rate, 1e-4: representable in float32 (spacing 6e-8 below 1) but not in bfloat16
    (spacing 3.9e-3), so the parameters must have been updated and kept in float32."""
    lr = 1e-4
    # One block: this test is about the update around the model (compile time).
    model = _model(dataclasses.replace(CONFIG, num_layers=1))
    graphdef, trainable, frozen = split_policy(model, lora=False)
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=lr), 10, trainable)
    cfg = LossConfig(name="grpo")
    update = make_update_fn(
        graphdef,
        tx,
        schedule,
        make_loss_fn(cfg, max_len=5, total_steps=10),
        cfg,
        micro_batches=1,
        max_len=5,
        temperature=1.0,
        chunk_size=None,
        vocab_chunk_size=None,
        arca=False,
        old_from_forward=True,
    )
    before = jax.tree.map(np.asarray, trainable)
    state = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.int32(0)}
    state, metrics = update(state, frozen, _batch())

    for path, x in jax.tree_util.tree_leaves_with_path(state["params"]):
        assert x.dtype == F32, (jax.tree_util.keystr(path), x.dtype)
    floats = [
        x for x in jax.tree.leaves(state["opt_state"]) if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    # Adam's first and second moments, one of each per parameter.
    assert len(floats) == 2 * len(jax.tree.leaves(trainable))
    assert all(x.dtype == F32 for x in floats), {x.dtype for x in floats}
    for key in ("loss", "grad_norm"):
        assert metrics[key].dtype == F32 and np.isfinite(float(metrics[key])), key
    assert float(metrics["grad_norm"]) > 0

    # Adam's first step is lr * g / (|g| + eps), lr * sign(g) where |g| >> eps: every
    # norm weight moves by at most lr and (all gradients here being far above eps)
    # by more than lr / 2. Stored in bfloat16 it would move by 0 or >= 3.9e-3.
    new, old = state["params"], before
    for name, moved, was in (
        ("final_norm", new["final_norm"], old["final_norm"]),
        ("attn_norm", new["layers"]["attn_norm"], old["layers"]["attn_norm"]),
        ("mlp_norm", new["layers"]["mlp_norm"], old["layers"]["mlp_norm"]),
    ):
        np.testing.assert_array_equal(np.asarray(was[...]), 1.0)
        step = np.abs(np.asarray(moved[...]) - 1.0)
        assert ((step > lr / 2) & (step <= lr * 1.001)).all(), (name, step.min(), step.max())
