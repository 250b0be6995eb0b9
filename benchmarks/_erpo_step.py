"""The erpo_jax half of train_step.py: one full RL step built from the trainer's own pieces.

The step is what ``erpo_jax.train``'s loop runs, minus text decoding (the
benchmark's reward reads token ids, as TRL's side does): the jitted KV-cache
sampler (``erpo_jax.sampling.sample``, no EOS so every row runs to T), the
reward on the host, then the jitted, state-donating update
(``make_update_fn``) with AdamW, each group's prompt run once
(``group_size``). As in the trainer (``old_logp_in_update``): the loss
takes ``old_logp`` from the update's own forward (one update per step)
unless it needs ``old_logp`` and ``ref_logp`` from one compiled function
(ERPO's progress signal), which then scores both first. ``beta 0`` is the workload's KL
coefficient: GRPO has no reference forward; ERPO keeps its defaults
(``eta = 0.2``), whose progress signal needs the reference forward.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

# Loss names beyond LOSS_NAMES that this benchmark accepts in --loss.
_LOSS_VARIANTS = {
    # ERPO with the progress signal from the current policy (METHOD.md's
    # progress_source=current): old_logp then comes from the update's forward
    # and only the reference is scored, what the exact default pays for.
    "erpo_current": {"name": "erpo", "progress_source": "current"},
}


def measure(args: Any, loss_name: str, common: dict[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from _tiny_qwen3 import tiny_qwen3_pair

    from erpo_jax.sampling import sample
    from erpo_jax.train import (
        LossConfig,
        MeshConfig,
        OptimizerConfig,
        make_loss_fn,
        make_mesh,
        make_optimizer,
        make_score_fn,
        make_update_fn,
        place_params,
        place_state,
        resolve_micro_batches,
        split_policy,
    )

    _, _, model = tiny_qwen3_pair()
    p, g, s, t = args.prompts, args.group, args.prompt_len, args.new_tokens
    b = p * g
    cfg = LossConfig(kl_coef=0.0, **_LOSS_VARIANTS.get(loss_name, {"name": loss_name}))
    graphdef, trainable, frozen = split_policy(model, lora=False)
    # Placed as the trainer places them (one device here): one compilation.
    mesh = make_mesh(MeshConfig())
    hd = model.config.head_dim
    trainable = place_params(trainable, mesh, head_dim=hd)
    frozen = place_params(frozen, mesh, head_dim=hd)
    ref = jax.tree.map(jnp.copy, trainable) if cfg.needs_reference else None
    steps = args.warmup + args.steps
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-6), steps, trainable)
    loss_fn = make_loss_fn(cfg, max_len=t, total_steps=steps)
    chunk = dict(chunk_size=None, vocab_chunk_size=None, group_size=g)
    on_policy = not cfg.needs_old_ref_pair  # the trainer's old_logp_in_update at one update/step
    # micro_batches=None: the trainer's default (train.micro_batches: null),
    # chosen from the shapes (resolve_micro_batches); --micro-batches sets it.
    micro = args.micro_batches
    update = make_update_fn(graphdef, tx, schedule, loss_fn, cfg, micro_batches=micro, max_len=t,
                            temperature=1.0, arca=False, old_from_forward=on_policy,
                            **chunk)  # fmt: skip
    score = make_score_fn(graphdef, temperature=1.0, entropy=False, micro_batches=micro,
                          **chunk)  # fmt: skip  # as the trainer
    state = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.int32(0)}
    state = place_state(state, mesh)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    rows: list[dict[str, float]] = []
    for i in range(steps):
        prompts = rng.integers(2, vocab, (p, s)).astype(np.int32)
        prompt_tokens = np.repeat(prompts, g, axis=0)
        prompt_mask = np.ones((b, s), bool)
        t0 = time.perf_counter()
        full = (graphdef, _merge(state["params"], frozen))
        # As the trainer's rollout (erpo_jax.rollout.generate): grouped rows,
        # each prompt prefilled once and its KV cache shared by its G rows.
        out = sample(full, prompt_tokens, prompt_mask, jax.random.key(i), max_new_tokens=t,
                     temperature=1.0, eos_ids=(), group_size=g)  # fmt: skip
        tokens, mask, entropy = jax.device_get((out.tokens, out.mask, out.entropy))
        t1 = time.perf_counter()
        rewards = ((tokens % 2 == 0) & mask).sum(-1) / np.maximum(mask.sum(-1), 1)
        batch = {
            "prompt_tokens": jnp.asarray(prompt_tokens),
            "prompt_mask": jnp.asarray(prompt_mask),
            "tokens": out.tokens,
            "mask": out.mask,
            "entropy": out.entropy,
            "rewards": jnp.asarray(rewards.reshape(p, g), jnp.float32),
        }
        t2 = time.perf_counter()
        if on_policy:
            batch["sampler_logp"] = out.logp
        else:
            batch["old_logp"], _ = score(state["params"], frozen, batch, True)
        if ref is not None:
            batch["ref_logp"], _ = score(ref, frozen, batch, True)
        state, metrics = update(state, frozen, batch)
        jax.block_until_ready(metrics["loss"])
        t3 = time.perf_counter()
        del entropy
        if i >= args.warmup:
            rows.append({"step": t3 - t0, "rollout": t1 - t0, "reward": t2 - t1,
                         "update": t3 - t2})  # fmt: skip
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {
        **common,
        "impl": "erpo_jax",
        "loss": loss_name,
        "step_seconds": med["step"],
        "rollout_seconds": med["rollout"],
        "reward_seconds": med["reward"],
        "update_seconds": med["update"],
        "tokens_per_second": b * t / med["step"],
        "reference_forward": ref is not None,
        "micro_batches": resolve_micro_batches(micro, groups=p, rows=b, row_tokens=s + t),
        "jax": jax.__version__,
    }


def _merge(params: Any, frozen: Any) -> Any:
    from flax import nnx

    return nnx.merge_state(params, frozen)
