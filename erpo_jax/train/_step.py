"""The jitted pieces of an RL step: the optimizer, the scoring forward and the update.

- :func:`make_optimizer`: Optax AdamW with warmup and a constant or cosine
  schedule, global-norm clipping; no decay on norms and biases.
- :func:`split_policy`: the model as ``(graphdef, trainable, frozen)``; with
  LoRA only ``nnx.LoRAParam`` is trainable.
- :func:`make_score_fn`: ``(trainable, frozen, batch) -> (logp, entropy)``,
  one cache-free forward through the chunked head. The policy's recomputed
  ``old_logp`` and the reference's ``ref_logp`` go through this same
  compiled function, so at step 0 (reference = policy) they agree bit for
  bit and ERPO's progress signal is exactly 0.
- :func:`make_update_fn`: ``(state, frozen, batch) -> (state, metrics)``, one
  optimizer update on a mini-batch of whole groups, gradient-accumulated over
  ``micro_batches`` chunks with the mini-batch's aggregation denominator, so
  the accumulated gradient equals the full mini-batch gradient exactly
  (``None``: :func:`resolve_micro_batches` picks the count from the traced
  shapes). The state is donated. With ``old_from_forward`` (one update per batch, no
  reference), ``old_logp`` is the update's own forward, detached, as TRL
  does on-policy: no separate scoring pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from erpo_jax.models import completion_hidden_states
from erpo_jax.ops import token_logp_and_entropy
from erpo_jax.train._config import LossConfig, OptimizerConfig
from erpo_jax.train._losses import loss_denominator

__all__ = [
    "AUTO_MICRO_TOKENS",
    "ROW_KEYS",
    "make_optimizer",
    "make_schedule",
    "make_score_fn",
    "make_update_fn",
    "resolve_micro_batches",
    "split_policy",
]

ROW_KEYS = (
    "prompt_tokens",
    "prompt_mask",
    "tokens",
    "mask",
    "old_logp",
    "sampler_logp",
    "ref_logp",
    "entropy",
    "token_keep",
)
"""Batch entries with one row per completion (split by rows into micro-batches)."""

AUTO_MICRO_TOKENS = 4096
"""Tokens per device per micro-batch that ``micro_batches=None`` aims at on CPU."""


def resolve_micro_batches(
    micro_batches: int | None,
    *,
    groups: int,
    rows: int,
    row_tokens: int,
    row_shards: int = 1,
    backend: str | None = None,
) -> int:
    """The micro-batches a scoring or update pass over ``rows`` rows runs in.

    An int is checked (``>= 1``, dividing ``groups``) and kept. ``None``
    ("auto") is 1 on GPU and TPU, where a larger batch keeps the matmuls
    busy and ``erpo-jax plan`` sizes micro-batches for memory. On the CPU
    backend it is the fewest micro-batches of whole groups in which a
    device holds at most :data:`AUTO_MICRO_TOKENS` tokens (``row_tokens``:
    prompt plus completion columns per row), or one group each when no
    count gets there. The rule is what was measured (docs/benchmarks.md,
    "Micro-batches by default on CPU"): the tiny-Qwen3 GRPO update of 128
    rows x 160 tokens took 3.3-3.8 s in 8 or 16 micro-batches against
    4.2-4.5 s in one, alternating, on the 2-core Xeon, since each
    micro-batch's activations stay in cache and its temporaries are a
    fraction of the whole batch's (XLA:CPU page-faults a fresh temporary
    buffer in on every call: 0.8 million faults per update in one
    micro-batch, 0.18 million in 8).
    """
    if micro_batches is not None:
        if (
            isinstance(micro_batches, bool)
            or not isinstance(micro_batches, int)
            or micro_batches < 1
        ):
            raise ValueError(
                f"micro_batches must be None (auto) or a positive int, got {micro_batches!r}"
            )
        if groups % micro_batches:
            raise ValueError(
                f"micro_batches={micro_batches} must divide the {groups} groups of the batch "
                "(micro-batches hold whole groups)"
            )
        return micro_batches
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu" or groups <= 1:
        return 1
    for m in range(1, groups + 1):
        if groups % m == 0 and -(-rows // (m * row_shards)) * row_tokens <= AUTO_MICRO_TOKENS:
            return m
    return groups


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer step: linear warmup, then constant or cosine decay."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0 if warmup else cfg.learning_rate,
            cfg.learning_rate,
            warmup,
            max(total_steps, warmup + 1),
            cfg.learning_rate * cfg.min_lr_ratio,
        )
    if warmup:
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, cfg.learning_rate, warmup),
                optax.constant_schedule(cfg.learning_rate),
            ],
            [warmup],
        )
    return optax.constant_schedule(cfg.learning_rate)


def make_optimizer(
    cfg: OptimizerConfig, total_steps: int, params: Any
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)``: global-norm clipping then AdamW (no decay on 1-D norms and biases)."""
    schedule = make_schedule(cfg, total_steps)
    decay_mask = jax.tree.map(lambda x: jnp.ndim(x) > 1 and x.shape[-1] > 1, params)
    # Stacked per-layer norms are [L, D]; they are 2-D but still norms.
    decay_mask = jax.tree_util.tree_map_with_path(
        lambda path, m: (
            m
            and not any(
                "norm" in str(getattr(k, "key", "")) or "bias" in str(getattr(k, "key", ""))
                for k in path
            )
        ),
        decay_mask,
    )
    parts = []
    if cfg.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule


def split_policy(model: nnx.Module, *, lora: bool) -> tuple[Any, nnx.State, nnx.State]:
    """``(graphdef, trainable, frozen)``: LoRA adapters only, or every parameter."""
    graphdef, *states = nnx.split(model, nnx.LoRAParam if lora else nnx.Param, ...)
    trainable, frozen = states
    return graphdef, trainable, frozen


def _head(model, batch, *, temperature, chunk_size, vocab_chunk_size, use_lora, row_shards=1,
          group_size=1):  # fmt: skip
    hidden = completion_hidden_states(
        model,
        batch["prompt_tokens"],
        batch["prompt_mask"],
        batch["tokens"],
        batch["mask"],
        use_lora=use_lora,
        group_size=group_size,
    )
    logp, entropy = token_logp_and_entropy(
        hidden,
        model.unembedding(),
        batch["tokens"],
        temperature=temperature,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
        row_shards=row_shards,
    )
    return hidden, logp, entropy


def make_score_fn(
    graphdef: Any,
    *,
    temperature: float,
    chunk_size: int | str | None,
    vocab_chunk_size: int | None,
    row_shards: int = 1,
    group_size: int = 1,
    entropy: bool = True,
    micro_batches: int | None = 1,
) -> Callable[..., tuple[jax.Array, jax.Array | None]]:
    """A jitted ``(trainable, frozen, batch, use_lora) -> (logp [B,T], entropy [B,T])``.

    ``row_shards``: devices the batch rows are sharded over (see
    ``token_logp_and_entropy``). ``group_size``: contiguous rows that share
    one prompt, run once per group (see
    ``erpo_jax.models.completion_hidden_states``); 1 runs every row's prompt.
    ``entropy=False`` returns ``(logp, None)`` and skips the entropy's pass
    over the vocabulary (the trainer's old/reference scoring, which needs
    only ``logp``: 9-14% of a scoring forward of the tiny Qwen3 benchmark,
    vocabulary 4,096, on the 2-core Xeon). ``micro_batches``: the rows run
    in that many sequential chunks of whole groups (``None``:
    :func:`resolve_micro_batches`' choice from the traced shapes); each
    row's values are the same as in one pass.
    """

    def one(trainable, frozen, batch, use_lora):
        model = nnx.merge(graphdef, trainable, frozen)
        _, logp, ent = _head(
            model,
            batch,
            temperature=temperature,
            chunk_size=chunk_size,
            vocab_chunk_size=vocab_chunk_size,
            use_lora=use_lora,
            row_shards=row_shards,
            group_size=group_size,
        )
        return logp, ent if entropy else None

    def score(trainable, frozen, batch, use_lora):
        rows = {k: batch[k] for k in ("prompt_tokens", "prompt_mask", "tokens", "mask")}
        n = rows["tokens"].shape[0]
        groups = n // group_size if n % group_size == 0 else n
        micro = _micro_count(micro_batches, rows, groups, row_shards)
        if micro == 1:
            return one(trainable, frozen, rows, use_lora)
        chunks = _split_micro(rows, micro, row_shards, groups=groups)
        out = jax.lax.map(lambda mb: one(trainable, frozen, mb, use_lora), chunks)
        return jax.tree.map(lambda x: _join_micro(x, groups, micro, row_shards), out)

    return jax.jit(score, static_argnums=(3,))


def logp_gap(
    logp: jax.Array, sampler_logp: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``(sum, max)`` of ``|logp - sampler_logp|`` over valid tokens (0 when none)."""
    gap = jnp.where(mask, jnp.abs(logp - sampler_logp), 0.0)
    return jnp.sum(gap), jnp.max(gap, initial=0.0)


def _shard_slices(groups: int, micro: int, shards: int) -> int:
    """Row shards a micro-batch takes a slice of: all when the groups divide, else 1."""
    return shards if groups % (shards * micro) == 0 else 1


def _micro_count(micro_batches: int | None, batch: dict[str, Any], groups: int,
                 row_shards: int) -> int:  # fmt: skip
    """:func:`resolve_micro_batches` for ``batch``'s traced rows and columns."""
    return resolve_micro_batches(
        micro_batches,
        groups=groups,
        rows=batch["tokens"].shape[0],
        row_tokens=batch["prompt_tokens"].shape[1] + batch["tokens"].shape[1],
        row_shards=row_shards,
    )


def _split_micro(
    batch: dict[str, Any], micro: int, shards: int = 1, *, groups: int | None = None
) -> dict[str, Any]:
    """Each entry reshaped to ``[micro, rows / micro, ...]`` (rewards by groups).

    With ``shards`` row shards (the batch rows split in that many contiguous
    blocks over the devices), micro-batch ``m`` takes the ``m``-th slice of
    every shard's rows instead of ``micro`` contiguous rows: each device
    keeps its own rows and the split moves no data. Slices hold whole
    groups; when the groups do not divide into ``shards * micro`` slices, the
    plain contiguous split is used. ``groups``: the batch's groups (default:
    the rows of its ``rewards [P, G]``).
    """
    groups = batch["rewards"].shape[0] if groups is None else groups
    s = _shard_slices(groups, micro, shards)

    def split(v):
        n = v.shape[0]
        blocks = v.reshape(s, micro, n // (s * micro), *v.shape[1:])
        return blocks.swapaxes(0, 1).reshape(micro, n // micro, *v.shape[1:])

    return {k: split(v) for k, v in batch.items()}


def _join_micro(x: jax.Array, groups: int, micro: int, shards: int = 1) -> jax.Array:
    """The inverse of :func:`_split_micro` for one ``[micro, rows / micro, ...]`` array."""
    s = _shard_slices(groups, micro, shards)
    n = x.shape[0] * x.shape[1]
    blocks = x.reshape(micro, s, n // (s * micro), *x.shape[2:])
    return blocks.swapaxes(0, 1).reshape(n, *x.shape[2:])


def make_update_fn(
    graphdef: Any,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    loss_fn: Callable[..., Any],
    loss_cfg: LossConfig,
    *,
    micro_batches: int | None,
    max_len: int,
    temperature: float,
    chunk_size: int | str | None,
    vocab_chunk_size: int | None,
    arca: bool,
    row_shards: int = 1,
    group_size: int = 1,
    old_from_forward: bool = False,
) -> Callable[..., tuple[dict[str, Any], dict[str, jax.Array]]]:
    """A jitted, state-donating ``(state, frozen, batch) -> (state, metrics)``.

    ``state`` is ``{"params", "opt_state", "step"}``; ``batch`` holds a
    mini-batch of whole groups (see :data:`ROW_KEYS`, plus ``rewards [P, G]``).
    Metrics: ``loss``, ``grad_norm``, ``learning_rate`` and the loss's aux
    fields (averaged over micro-batches). ``group_size`` as in
    :func:`make_score_fn` (micro-batches hold whole groups). ``micro_batches``:
    an int, or ``None`` for :func:`resolve_micro_batches`' choice from the
    traced batch (so each completion width of ``train.length_buckets`` gets
    its own).

    ``old_from_forward``: the batch has no ``old_logp``; it is this update's
    own ``logp``, detached (exact only when the batch gets one update, from
    the policy that sampled it: the importance ratio is then exactly 1).
    The batch's ``sampler_logp`` then gives the metrics
    ``logp_mismatch_mean`` / ``logp_mismatch_max`` (mean and max of
    ``|logp - sampler_logp|`` over valid tokens).
    """

    def micro_loss(params, frozen, mb, denominator, step):
        model = nnx.merge(graphdef, params, frozen)
        hidden, logp, _ = _head(
            model,
            mb,
            temperature=temperature,
            chunk_size=chunk_size,
            vocab_chunk_size=vocab_chunk_size,
            use_lora=True,
            row_shards=row_shards,
            group_size=group_size,
        )
        if arca:
            # ARCA's credit: how far the adapter moves the last hidden state,
            # from the same inputs with the adapter off (detached data).
            base = completion_hidden_states(
                model,
                mb["prompt_tokens"],
                mb["prompt_mask"],
                mb["tokens"],
                mb["mask"],
                use_lora=False,
                group_size=group_size,
            )
            diff = (hidden - base).astype(jnp.float32)
            mb = {**mb, "residual_norm": jax.lax.stop_gradient(jnp.linalg.norm(diff, axis=-1))}
        extra = {}
        if old_from_forward:
            detached = jax.lax.stop_gradient(logp)
            mb = {**mb, "old_logp": detached}
            total, largest = logp_gap(detached, mb["sampler_logp"], mb["mask"])
            extra = {"sum": total, "max": largest}
        loss, aux = loss_fn(logp, mb, denominator=denominator, step=step)
        return loss, (aux, extra)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def update(state, frozen, batch):
        params, step = state["params"], state["step"]
        denominator = loss_denominator(loss_cfg, batch["mask"], max_len=max_len)
        micro_count = _micro_count(micro_batches, batch, batch["rewards"].shape[0], row_shards)
        if micro_count == 1:
            (loss, (aux, extra)), grads = grad_fn(params, frozen, batch, denominator, step)
        else:
            micro = _split_micro(batch, micro_count, row_shards)

            def body(carry, mb):
                g_acc, l_acc, a_acc, e_acc = carry
                (loss, (aux, extra)), grads = grad_fn(params, frozen, mb, denominator, step)
                g_acc = jax.tree.map(jnp.add, g_acc, grads)
                a_acc = jax.tree.map(lambda a, b: a + b / micro_count, a_acc, aux)
                if extra:
                    e_acc = {"sum": e_acc["sum"] + extra["sum"],
                             "max": jnp.maximum(e_acc["max"], extra["max"])}  # fmt: skip
                return (g_acc, l_acc + loss, a_acc, e_acc), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            first = {k: v[0] for k, v in micro.items()}
            aux_shape, extra_shape = jax.eval_shape(
                lambda: grad_fn(params, frozen, first, denominator, step)[0][1]
            )
            aux0, extra0 = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype), (aux_shape, extra_shape)
            )
            init = (zeros, jnp.float32(0.0), aux0, extra0)
            (grads, loss, aux, extra), _ = jax.lax.scan(body, init, micro)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        if extra:
            valid = jnp.maximum(jnp.sum(batch["mask"], dtype=jnp.float32), 1.0)
            aux = {**aux, "logp_mismatch_mean": extra["sum"] / valid,
                   "logp_mismatch_max": extra["max"]}  # fmt: skip
        metrics = {
            **aux,
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": jnp.asarray(schedule(step), jnp.float32),
        }
        return {"params": params, "opt_state": opt_state, "step": step + 1}, metrics

    compiled: dict[str, Any] = {}

    def jitted(state):
        # The updated state keeps the input state's shardings (parameters and
        # optimizer state by the mesh rules; scalars replicated) and the
        # metrics come back replicated: fixed on the first call, when the
        # placed state is known (arrays or ShapeDtypeStructs with shardings).
        if "fn" not in compiled:
            leaf = next(
                (
                    x.sharding
                    for x in jax.tree.leaves(state)
                    if isinstance(getattr(x, "sharding", None), NamedSharding)
                ),
                None,
            )
            if leaf is None:
                compiled["fn"] = jax.jit(update, donate_argnums=(0,))
            else:
                rep = NamedSharding(leaf.mesh, PartitionSpec())
                state_sh = jax.tree.map(
                    lambda x: (
                        x.sharding
                        if isinstance(getattr(x, "sharding", None), NamedSharding)
                        else rep
                    ),
                    state,
                )
                compiled["fn"] = jax.jit(update, donate_argnums=(0,), out_shardings=(state_sh, rep))
        return compiled["fn"]

    def call(state, frozen, batch):
        return jitted(state)(state, frozen, batch)

    # Ahead-of-time lowering on abstract shapes (erpo-jax plan).
    call.lower = lambda state, frozen, batch: jitted(state).lower(state, frozen, batch)  # type: ignore[attr-defined]

    return call
