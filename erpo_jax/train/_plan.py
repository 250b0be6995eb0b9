"""``erpo-jax plan``: per-device memory of an RL step, compiled ahead of time, nothing allocated.

For a model preset on a ``(data, fsdp, tensor)`` mesh of simulated CPU
devices, :func:`plan_memory` builds the model under ``nnx.eval_shape`` (no
parameter is ever allocated), places every abstract array with the
trainer's sharding rules, and lowers and compiles the trainer's own jitted
pieces on ``jax.ShapeDtypeStruct`` arguments:

- the update step of ``erpo_jax.train._step.make_update_fn`` (forward,
  backward, gradient accumulation and AdamW), whose ``temp_size_in_bytes``
  is the step's activations and temporaries (gradients included);
- the sampler's jitted prefill and decode loop (``erpo_jax.sampling``),
  whose temporaries are reported beside the KV cache.

Parameters and optimizer state are counted from the abstract shapes and
their shardings (bytes of each leaf over the number of shards its spec
splits it into), the KV cache from the shardings the compiled prefill gives
it (analytically, rows over ``data * fsdp``, when the sampler is not
compiled); the compiled argument sizes are printed as a check. The parts
never all live at once (the rollout holds the KV cache, the update its
activations), so the total is the persistent state plus the larger phase.

XLA's simulated devices must exist before JAX starts its backends, so
:func:`plan_command` runs the plan in a fresh Python process with
``XLA_FLAGS=--xla_force_host_platform_device_count=<data*fsdp*tensor>``.
The figures come from XLA:CPU's buffer assignment; an accelerator's compiler
fuses differently, so they are estimates, not promises.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "PlanError",
    "format_plan",
    "group_shape",
    "kv_cache_bytes",
    "parse_mesh",
    "plan_command",
    "plan_memory",
    "plan_report",
]

GIB = float(1 << 30)
_CHILD_ENV = "ERPO_JAX_PLAN_CHILD"
_AXES = ("data", "fsdp", "tensor")
_GROUP_SIZE = 8
_TOTAL_STEPS = 100  # only HolderPO's p schedule reads it; memory does not depend on it

# The compiled code never runs: only XLA's buffer assignment is read, and that
# is settled on HLO before machine code is generated. These options make
# XLA:CPU's code generation cheap (measured on a tiny update step on a busy
# 2-core machine: 93 s -> 9.5 s, temp size equal within 128 bytes).
_COMPILE_OPTIONS: dict[str, str | bool] = {
    "xla_backend_optimization_level": "0",
    "xla_cpu_use_fusion_emitters": False,
}


class PlanError(ValueError):
    """A bad ``erpo-jax plan`` argument; the message starts with the flag's name."""


def parse_mesh(text: str) -> tuple[int, int, int]:
    """``"data=1,fsdp=8,tensor=1"`` -> ``(1, 8, 1)``; an axis left out is 1.

    Raises:
      PlanError: an entry without ``=``, an unknown or repeated axis, or a
        size that is not a positive int (the message names ``--mesh``).
    """
    sizes = dict.fromkeys(_AXES, 1)
    seen: set[str] = set()
    usage = f"--mesh {text!r}: expected data=N,fsdp=N,tensor=N with positive ints"
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep:
            raise PlanError(f"{usage} ({item!r} has no '=')")
        if name not in sizes or name in seen:
            raise PlanError(f"{usage} ({'repeated' if name in seen else 'unknown'} axis {name!r})")
        try:
            size = int(value)
        except ValueError:
            raise PlanError(f"{usage} ({name}={value.strip()!r} is not an int)") from None
        if size < 1:
            raise PlanError(f"{usage} ({name}={size})")
        sizes[name] = size
        seen.add(name)
    if not seen:
        raise PlanError(f"{usage} (no axis given)")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def group_shape(batch: int) -> tuple[int, int]:
    """``(P, G)`` for ``batch`` rows: G = 8 per prompt, or the largest divisor of B below 8."""
    g = min(_GROUP_SIZE, batch)
    while batch % g:
        g -= 1
    return batch // g, g


@dataclasses.dataclass(frozen=True)
class _Request:
    """The validated command line."""

    model: str
    mesh: tuple[int, int, int]
    batch: int
    prompt_len: int
    new_tokens: int
    device_gib: float | None
    loss: str
    dtype: str
    lora_rank: int
    micro_batches: int
    remat: bool
    logp_chunk_size: int | None = None
    sequence_parallel: bool = True
    attention_impl: str = "auto"
    gather_params: bool | None = None


# What --attention-impl accepts: the implementations that compile on the
# simulated CPU devices the plan runs on (cudnn and splash need their own).
PLAN_ATTENTION_IMPLS = ("auto", "xla", "chunked")


def _positive(flag: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PlanError(f"{flag} {value!r}: must be a positive int")
    return value


def _request(args: argparse.Namespace) -> _Request:
    """The command line checked flag by flag (nothing compiled yet)."""
    from erpo_jax.models import COMPUTE_DTYPES, PRESETS
    from erpo_jax.train._config import LOSS_NAMES

    if args.model not in PRESETS:
        raise PlanError(f"--model {args.model!r}: not a preset; choose one of {', '.join(PRESETS)}")
    mesh = parse_mesh(args.mesh)
    batch = _positive("--batch", args.batch)
    rows = mesh[0] * mesh[1]
    if batch % rows:
        raise PlanError(
            f"--batch {batch}: rows shard over data*fsdp={rows} devices; use a multiple of {rows}"
        )
    prompt_len = _positive("--prompt-len", args.prompt_len)
    new_tokens = _positive("--new-tokens", args.new_tokens)
    if args.device_gib is not None and not args.device_gib > 0:
        raise PlanError(f"--device-gib {args.device_gib!r}: must be > 0")
    if args.loss not in LOSS_NAMES:
        raise PlanError(f"--loss {args.loss!r}: choose one of {', '.join(LOSS_NAMES)}")
    if args.dtype not in COMPUTE_DTYPES:
        raise PlanError(f"--dtype {args.dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}")
    if not isinstance(args.lora_rank, int) or args.lora_rank < 0:
        raise PlanError(
            f"--lora-rank {args.lora_rank!r}: must be an int >= 0 (0: full fine-tuning)"
        )
    if args.loss == "arca" and args.lora_rank == 0:
        raise PlanError("--lora-rank 0: --loss arca needs LoRA adapters (e.g. --lora-rank 16)")
    micro = _positive("--micro-batches", args.micro_batches)
    prompts, group = group_shape(batch)
    if prompts % micro:
        raise PlanError(
            f"--micro-batches {micro}: must divide the {prompts} prompt groups of --batch "
            f"{batch} (micro-batches hold whole groups of {group} rows)"
        )
    return _Request(
        model=args.model,
        mesh=mesh,
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        device_gib=None if args.device_gib is None else float(args.device_gib),
        loss=args.loss,
        dtype=args.dtype,
        lora_rank=args.lora_rank,
        micro_batches=micro,
        remat=bool(args.remat),
        logp_chunk_size=(
            None
            if getattr(args, "logp_chunk_size", None) is None
            else _positive("--logp-chunk-size", args.logp_chunk_size)
        ),
        sequence_parallel=bool(getattr(args, "sequence_parallel", True)),
        attention_impl=_attention_impl(getattr(args, "attention_impl", "auto")),
        gather_params=getattr(args, "gather_params", None),
    )


def _planned_attention(impl: str, prompt_bucket: int, new_tokens: int) -> str:
    """The implementation a plan compiles for ``impl``.

    ``auto`` resolves by backend (``erpo_jax.models.attention``): on the
    simulated CPU devices of a plan it would always be ``chunked``, which
    understates a TPU or float32 GPU run, where short sequences get ``xla``.
    So ``auto`` plans the accelerators' length rule: ``chunked`` from
    ``2**20`` (query, key) pairs per row and head, ``xla`` below (a bf16 GPU
    run's ``cudnn`` needs about what ``chunked`` does, so short plans are
    conservative there).
    """
    if impl != "auto":
        return impl
    from erpo_jax.models.attention import auto_by_length

    length = prompt_bucket + new_tokens
    return auto_by_length(length, length)


def _attention_impl(value: Any) -> str:
    if value in PLAN_ATTENTION_IMPLS:
        return value
    hint = (
        " (it runs only on its own devices; the plan compiles on simulated CPU devices: use "
        "chunked, which has the same O(S * block) memory)"
        if value in ("cudnn", "splash")
        else ""
    )
    raise PlanError(
        f"--attention-impl {value!r}: choose one of {', '.join(PLAN_ATTENTION_IMPLS)}{hint}"
    )


# ------------------------------------------------------------------ sharding


def _param_shardings(tree: Any, mesh: Any, head_dim: int) -> Any:
    """A ``NamedSharding`` per leaf by ``erpo_jax.models.param_partition_spec``.

    The rule reads a parameter's name from the last key of its path. In an
    ``nnx.State`` (and in an optimizer state built from one) that key is the
    ``nnx.Variable``'s ``value``, so the name is the key before it.
    """
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    from erpo_jax.models import param_partition_spec

    def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        if len(names) > 1 and names[-1] == "value":
            names = names[:-1]
        spec = param_partition_spec(names, np.shape(leaf), mesh, head_dim=head_dim)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, tree)


def _placed(tree: Any, shardings: Any) -> Any:
    import jax

    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings
    )


def _device_bytes(tree: Any) -> int:
    """Bytes one device holds of an abstract tree whose leaves carry shardings."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.shape if leaf.sharding is None else leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


# ---------------------------------------------------------------------- plan


def head_logits_bytes(
    vocab: int,
    batch: int,
    length: int,
    *,
    micro_batches: int = 1,
    row_shards: int = 1,
    logp_chunk_size: int | None = None,
) -> int:
    """Per-device bytes of the update head's float32 logits at a time.

    The head runs per micro-batch of ``ceil(batch / micro_batches)`` rows, a
    device holding ``ceil(micro_rows / row_shards)`` of them; a chunk of
    ``logp_chunk_size`` tokens is ``ceil(chunk / micro_rows)`` positions of
    every row (``token_logp_and_entropy``), and unset, the chunk is what
    the trainer's ``"auto"`` picks (:func:`erpo_jax.ops.auto_chunk_size`).
    """
    from erpo_jax.ops import auto_chunk_size

    micro_rows = -(-batch // micro_batches)
    chunk = logp_chunk_size
    if chunk is None:
        chunk = auto_chunk_size(micro_rows, length, vocab, row_shards=row_shards)
    positions = length if chunk is None else max(1, min(length, -(-chunk // micro_rows)))
    return -(-micro_rows // row_shards) * positions * vocab * 4


def kv_cache_bytes(
    config: Any,
    *,
    batch: int,
    slots: int,
    dtype: str,
    row_shards: int,
    shared_prefix: int = 0,
    group_size: int = 1,
) -> int:
    """Per-device bytes of the sampler's KV cache with its rows sharded over ``row_shards``.

    Per layer a k ``[B, K, H, C]`` and a v ``[B, K, C, H]`` in the compute dtype:
    ``2 * L * (B / row_shards) * K * C * H * itemsize(dtype)``. With a
    ``shared_prefix`` of that many of the ``C`` slots (the prompt, stored once
    per group of ``group_size`` rows: ``sample(..., group_size=G)``), the rows
    hold ``C - shared_prefix`` slots each and the ``B / G`` prompts the prefix.
    """
    import numpy as np

    rows = -(-batch // row_shards)
    prompts = -(-(batch // group_size) // row_shards)
    row_slots = rows * (slots - shared_prefix) + prompts * shared_prefix
    per_layer = row_slots * config.num_kv_heads * config.head_dim
    return 2 * config.num_layers * per_layer * np.dtype(dtype).itemsize


def plan_memory(
    config: Any,
    mesh_shape: tuple[int, int, int],
    batch: int,
    prompt_len: int,
    new_tokens: int,
    *,
    loss: str = "grpo",
    dtype: str = "bfloat16",
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    micro_batches: int = 1,
    remat: bool = False,
    logp_chunk_size: int | None = None,
    attention_impl: str = "auto",
    sequence_parallel: bool = True,
    compile_update: bool = True,
    compile_sampler: bool = True,
    gather_params: bool | None = None,
    device_gib: float | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Per-device memory of one RL step of ``config`` on a mesh, compiled on abstract shapes.

    Runs in this process on its first ``data * fsdp * tensor`` devices (see
    :func:`plan_command` for simulated ones); nothing is allocated.

    Args:
      config: the :class:`erpo_jax.models.ModelConfig`.
      mesh_shape: ``(data, fsdp, tensor)``.
      batch: B, completion rows per step, ``P * G`` (:func:`group_shape`).
      prompt_len: S, prompt tokens (padded to the sampler's power-of-two bucket).
      new_tokens: T, the completion budget.
      loss: ``loss.name``; a loss that needs a reference adds its ``ref_logp``
        input and, for full fine-tuning, a frozen copy of the parameters.
      dtype: compute dtype (activations, KV cache); parameters and optimizer
        state are float32, as the trainer keeps them.
      lora_rank, lora_alpha: rank > 0 trains LoRA adapters only.
      micro_batches: gradient-accumulation chunks of the update.
      remat: recompute block activations in the backward pass.
      logp_chunk_size: the update's log-prob head in chunks of about this many
        tokens (``model.logp_chunk_size``; None: chosen from the shapes, as
        the trainer does, by ``erpo_jax.ops.auto_chunk_size``).
      attention_impl: ``model.attention_impl`` (``auto``, ``xla`` or
        ``chunked``). ``auto`` plans what it picks on a GPU or TPU by
        length (:func:`_planned_attention`), not what it picks on the CPU
        devices the plan compiles on.
      sequence_parallel: split the training forward's residual stream over
        the tensor axis (``model.sequence_parallel``; no-op when tensor is 1).
      compile_update: compile the update step (else its activations are 0).
      compile_sampler: compile the sampler's prefill and decode loop (else
        the sampler temporaries are 0 and the KV cache is the analytic figure).
      gather_params, device_gib: the rollout's ``sample(gather_params=)``
        (``rollout.gather_params``): with fsdp > 1 the sampler runs on
        parameters gathered over fsdp, whose copy counts in the rollout
        phase. None (auto) decides against ``device_gib`` as the sampler
        does against the device's memory (no ``device_gib``: gathered).
      log: ``log(str)`` for progress lines.

    Returns:
      A dict of per-device GiB: ``params_gib``, ``optimizer_gib``,
      ``ref_params_gib``, ``activations_gib``, ``batch_gib``,
      ``kv_cache_gib`` (``kv_cache_analytic_gib``: rows over data*fsdp),
      ``sampler_temp_gib``, ``train_peak_gib``, ``rollout_peak_gib``,
      ``total_gib``; the compiled ``memory_analysis`` figures (``compiled``),
      compile seconds (``seconds``) and the shapes used.

    Raises:
      PlanError: too few devices for the mesh, or sizes that do not divide.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from erpo_jax.models import Decoder, add_lora
    from erpo_jax.sampling import _sampler
    from erpo_jax.train._config import LossConfig, MeshConfig, OptimizerConfig
    from erpo_jax.train._losses import make_loss_fn
    from erpo_jax.train._mesh import batch_sharding, make_mesh, residual_sharding
    from erpo_jax.train._step import make_optimizer, make_update_fn, split_policy

    say = log or (lambda _msg: None)
    data, fsdp, tensor = mesh_shape
    n = data * fsdp * tensor
    if jax.device_count() < n:
        raise PlanError(
            f"--mesh data={data},fsdp={fsdp},tensor={tensor}: needs {n} devices, this process "
            f"has {jax.device_count()} (`erpo-jax plan` simulates them in a subprocess)"
        )
    row_shards = data * fsdp
    if batch % row_shards:
        raise PlanError(f"--batch {batch}: not a multiple of data*fsdp={row_shards}")
    prompts, group = group_shape(batch)
    if prompts % micro_batches:
        raise PlanError(f"--micro-batches {micro_batches}: must divide the {prompts} prompt groups")
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[:n])
    replicated = NamedSharding(mesh, PartitionSpec())
    compute = jnp.dtype(dtype)
    lora = lora_rank > 0
    loss_cfg = LossConfig(name=loss)
    residual = residual_sharding(mesh, sequence_parallel=sequence_parallel)
    planned_attention = _planned_attention(attention_impl, _sampler.bucket_length(prompt_len),
                                           new_tokens)  # fmt: skip

    def build() -> Decoder:
        # Layers scanned: one compiled block, so a 28-36 layer model compiles
        # as fast as a 2-layer one (the cached sampler path unrolls anyway).
        model = Decoder(config, dtype=compute, param_dtype=jnp.float32, scan_layers=True,
                        remat=remat, residual_sharding=residual,
                        attention_impl=planned_attention, rngs=nnx.Rngs(0))  # fmt: skip
        if lora:
            add_lora(model, rank=lora_rank, alpha=lora_alpha, rngs=nnx.Rngs(1))
        return model

    graphdef, trainable, frozen = split_policy(nnx.eval_shape(build), lora=lora)
    trainable = _placed(trainable, _param_shardings(trainable, mesh, config.head_dim))
    frozen = _placed(frozen, _param_shardings(frozen, mesh, config.head_dim))
    tx, schedule = make_optimizer(OptimizerConfig(), _TOTAL_STEPS, trainable)
    opt_shapes = jax.eval_shape(tx.init, trainable)
    opt_state = _placed(opt_shapes, _param_shardings(opt_shapes, mesh, config.head_dim))
    state = {
        "params": trainable,
        "opt_state": opt_state,
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
    }

    s_bucket = _sampler.bucket_length(prompt_len)
    t = new_tokens

    def rows(shape: tuple[int, ...], dt: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dt, sharding=batch_sharding(mesh, len(shape)))

    train_batch = {
        "prompt_tokens": rows((batch, s_bucket), jnp.int32),
        "prompt_mask": rows((batch, s_bucket), jnp.bool_),
        "tokens": rows((batch, t), jnp.int32),
        "mask": rows((batch, t), jnp.bool_),
        "old_logp": rows((batch, t), jnp.float32),
        "entropy": rows((batch, t), jnp.float32),
    }
    if loss_cfg.needs_reference:
        train_batch["ref_logp"] = rows((batch, t), jnp.float32)
    if loss == "entropy_top20":
        train_batch["token_keep"] = rows((batch, t), jnp.bool_)
    # Rewards are [P, G]: the P groups shard like rows when they divide.
    reward_sharding = batch_sharding(mesh, 2) if prompts % row_shards == 0 else replicated
    train_batch["rewards"] = jax.ShapeDtypeStruct((prompts, group), jnp.float32,
                                                  sharding=reward_sharding)  # fmt: skip

    params_bytes = _device_bytes(trainable) + _device_bytes(frozen)
    opt_bytes = _device_bytes(opt_state)
    # Full fine-tuning keeps a frozen copy of the initial parameters as the
    # reference; LoRA's reference is the same base with the adapters off.
    ref_bytes = _device_bytes(trainable) if loss_cfg.needs_reference and not lora else 0
    batch_bytes = _device_bytes(train_batch)
    slots = s_bucket + t - 1  # the sampler's cache: the prompt bucket and T - 1 decoded tokens
    share = _sampler.prefix_group(group, batch, row_shards, config)  # as sample(..., mesh=)
    kv_analytic = kv_cache_bytes(
        config, batch=batch, slots=slots, dtype=dtype, row_shards=row_shards,
        shared_prefix=s_bucket if share > 1 else 0, group_size=share,
    )  # fmt: skip
    seconds: dict[str, float] = {}
    compiled: dict[str, Any] = {
        "analytic_update_arguments_gib": (params_bytes + opt_bytes + batch_bytes + 4) / GIB
    }

    activations = 0
    if compile_update:
        loss_fn = make_loss_fn(loss_cfg, max_len=t, total_steps=_TOTAL_STEPS)
        update_fn: Any = make_update_fn(
            graphdef, tx, schedule, loss_fn, loss_cfg, micro_batches=micro_batches, max_len=t,
            temperature=1.0, chunk_size=logp_chunk_size or "auto", vocab_chunk_size=None,
            arca=loss == "arca",
            row_shards=row_shards,  # micro-batches split as the trainer splits them
            group_size=group,  # each group's prompt runs once, as in the trainer
        )  # fmt: skip
        say("compiling the update step ...")
        t0 = time.perf_counter()
        if not hasattr(update_fn, "lower"):
            raise RuntimeError(
                "erpo_jax.train._step.make_update_fn returned a function without .lower(state, "
                "frozen, batch); the plan compiles the trainer's jitted update ahead of time"
            )
        update = update_fn.lower(state, frozen, train_batch).compile(_COMPILE_OPTIONS)
        seconds["update"] = time.perf_counter() - t0
        update_mem = _memory(update)
        activations = update_mem.temp_size_in_bytes
        compiled["update"] = _memory_dict(update_mem)

    kv_bytes, sampler_temp, sampler_other, gathered_bytes = kv_analytic, 0, 0, 0
    if compile_sampler:
        static = _sampler._Static(
            greedy=False, top_k=None, use_top_p=False, use_min_p=False, max_new_tokens=t,
            cache_length=slots, pad_id=0, use_lora=True, group_size=0,
            # as sample(..., mesh=) does: a shared prefix when the prompts divide
            # over the row shards, state and KV cache pinned to the mesh
            prefix_group=share,
            reft_top_n=0, reft_k=0, mesh=mesh,
        )  # fmt: skip
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
        dyn_fields: dict[str, Any] = dict(
            temperature=scalar, top_p=scalar, min_p=scalar,
            eos_ids=jax.ShapeDtypeStruct((8,), jnp.int32, sharding=replicated),
            marker=jax.ShapeDtypeStruct((0,), jnp.int32, sharding=replicated),
        )  # fmt: skip
        dyn = _sampler._Dynamic(**dyn_fields)
        # The sampler gets the policy's whole state, as the trainer's rollout
        # does, and its rows sharded like the train batch.
        params = nnx.merge_state(trainable, frozen)
        limit = None if device_gib is None else int(device_gib * GIB)
        layout = _sampler.gathered_layout(
            params, mesh, gather_params, dtype=compute, bytes_limit=limit
        )
        if layout is not None:  # the copy sample() gathers for the rollout
            params = layout
            gathered_bytes = _device_bytes(params)
        key_shape = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
        keys = rows(key_shape.shape, key_shape.dtype)
        tokens, mask = rows((batch, s_bucket), jnp.int32), rows((batch, s_bucket), jnp.bool_)
        say("compiling the sampler's prefill ...")
        t0 = time.perf_counter()
        lowered = _sampler._prefill_jit.lower(graphdef, params, tokens, mask, keys, dyn,
                                              static=static)  # fmt: skip
        prefill = lowered.compile(_COMPILE_OPTIONS)
        seconds["prefill"] = time.perf_counter() - t0
        # The decode loop receives the prefill's state with the shardings the
        # compiler gave it, as it does at run time.
        loop_state = jax.tree.map(
            lambda info, sh: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sh),
            lowered.out_info, prefill.output_shardings,
        )  # fmt: skip
        say("compiling the sampler's decode loop ...")
        t0 = time.perf_counter()
        stop_at = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
        decode = _sampler._decode_jit.lower(graphdef, params, loop_state, keys, stop_at, dyn,
                                            static=static).compile(_COMPILE_OPTIONS)  # fmt: skip
        seconds["decode"] = time.perf_counter() - t0
        prefill_mem, decode_mem = _memory(prefill), _memory(decode)
        cache = loop_state.cache
        kv_bytes = _device_bytes((cache.k, cache.v))
        if cache.prefix is not None:
            kv_bytes += _device_bytes((cache.prefix.k, cache.prefix.v))
        # The loop's other buffers ([B, T] tokens, log-probs, ...) count as
        # sampler memory beside the larger of the two programs' temporaries.
        sampler_other = _device_bytes(loop_state) - kv_bytes
        sampler_temp = max(prefill_mem.temp_size_in_bytes, decode_mem.temp_size_in_bytes)
        compiled.update(
            prefill=_memory_dict(prefill_mem),
            decode=_memory_dict(decode_mem),
            kv_cache_spec=str(cache.k[0].sharding.spec),
        )

    persistent = params_bytes + opt_bytes + ref_bytes
    train_peak = persistent + batch_bytes + activations
    rollout_peak = persistent + gathered_bytes + kv_bytes + sampler_other + sampler_temp
    length = s_bucket + t - 1  # the update's forward runs on prompt + completion, less one
    scores = _attention_scores_bytes(config, batch, length, mesh_shape, micro_batches)
    logits = head_logits_bytes(
        config.vocab_size, batch, t, micro_batches=micro_batches, row_shards=row_shards,
        logp_chunk_size=logp_chunk_size,
    )  # fmt: skip
    return {
        "model_params": config.num_params,
        "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
        "batch": batch,
        "prompts": prompts,
        "group_size": group,
        "prompt_len": prompt_len,
        "prompt_bucket": s_bucket,
        "new_tokens": t,
        "cache_slots": slots,
        "kv_shared_prefix": s_bucket if share > 1 else 0,
        "loss": loss,
        "dtype": dtype,
        "lora_rank": lora_rank,
        "micro_batches": micro_batches,
        "remat": remat,
        "attention_impl": attention_impl,
        "attention_planned": planned_attention,
        "sequence_parallel": sequence_parallel and tensor > 1,
        "needs_reference": loss_cfg.needs_reference,
        "update_compiled": compile_update,
        "sampler_compiled": compile_sampler,
        "params_gib": params_bytes / GIB,
        "optimizer_gib": opt_bytes / GIB,
        "ref_params_gib": ref_bytes / GIB,
        "activations_gib": activations / GIB,
        "batch_gib": batch_bytes / GIB,
        "kv_cache_gib": kv_bytes / GIB,
        "kv_cache_analytic_gib": kv_analytic / GIB,
        "sampler_temp_gib": (sampler_temp + sampler_other) / GIB,
        "sampler_params_gib": gathered_bytes / GIB,
        "train_peak_gib": train_peak / GIB,
        "rollout_peak_gib": rollout_peak / GIB,
        "total_gib": max(train_peak, rollout_peak) / GIB,
        "attention_scores_gib": scores / GIB,
        "head_logits_gib": logits / GIB,
        "compiled": compiled,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def _attention_scores_bytes(
    config: Any, batch: int, length: int, mesh_shape: tuple[int, int, int], micro: int
) -> int:
    """One layer's float32 attention scores ``[rows, heads, L, L]`` on one device in the update."""
    data, fsdp, tensor = mesh_shape
    rows = -(-batch // (data * fsdp * micro))
    heads = config.num_heads // tensor if config.num_kv_heads % tensor == 0 else config.num_heads
    return rows * heads * length * length * 4


def _memory(compiled: Any) -> Any:
    mem = compiled.memory_analysis()
    if mem is None:
        raise RuntimeError("XLA returned no memory analysis for a compiled program")
    return mem


def _memory_dict(mem: Any) -> dict[str, float]:
    """The fields of ``Compiled.memory_analysis()`` in GiB."""
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")  # fmt: skip
    return {k.replace("_size_in_bytes", "_gib"): getattr(mem, k) / GIB for k in keys}


# -------------------------------------------------------------------- output


def _hints(plan: dict[str, Any], device_gib: float) -> list[str]:
    """Lines saying what would make the step fit (``to fit: ...``) and why (``note: ...``)."""
    m = plan["mesh"]
    row_shards, shards = m["data"] * m["fsdp"], m["fsdp"] * m["tensor"]
    state = plan["params_gib"] + plan["optimizer_gib"] + plan["ref_params_gib"]
    out = []
    if state > 0.4 * device_gib:
        ref = " + reference" if plan["ref_params_gib"] else ""
        out.append(
            f"to fit: parameters + optimizer state{ref} "
            f"take {state:.1f} GiB and divide by fsdp*tensor={shards}: fsdp={2 * m['fsdp']} "
            "halves them; LoRA (--lora-rank 16) keeps optimizer state for the adapters only"
        )
    if plan["train_peak_gib"] > device_gib and plan["update_compiled"]:
        act, micro = plan["activations_gib"], plan["micro_batches"]
        room = max(device_gib - plan["train_peak_gib"] + act, 1e-3)
        tips = []
        if not plan["remat"]:
            tips.append("--remat (keeps each layer's input instead of its internals)")
        if m["tensor"] > 1 and not plan.get("sequence_parallel", False):
            tips.append("--sequence-parallel (each tensor device keeps 1/tensor of those inputs)")
        # Micro-batches hold whole groups and keep rows divisible over data*fsdp.
        prompts, batch = plan["prompts"], plan["batch"]
        options = [
            k
            for k in range(micro + 1, prompts + 1)
            if prompts % k == 0 and (batch // k) % row_shards == 0
        ]
        if options:
            k = next((k for k in options if act * micro / k <= room), options[-1])
            tips.append(f"--micro-batches {k} (activations scale about with rows per "
                        f"micro-batch: ~{act * micro / k:.0f} GiB)")  # fmt: skip
        tips.append("more data/fsdp devices (rows divide over data*fsdp)")
        out.append(f"to fit: update activations take {act:.1f} GiB: " + "; ".join(tips))
        out.append(
            f"note: of these, one layer's float32 attention scores [rows, heads, S+T, S+T] are "
            f"{plan['attention_scores_gib']:.1f} GiB per device if materialized (the xla "
            "attention path; model.attention_impl=chunked keeps them O(S * block)), and the "
            "head's float32 "
            f"logits [rows, T, V] {plan['head_logits_gib']:.1f} GiB at a time "
            "(chunked to 256 MiB by default; model.logp_chunk_size / vocab_chunk_size "
            "in a run config set the chunk)"
        )
    if plan["rollout_peak_gib"] > device_gib and plan["kv_cache_gib"] > 0.2 * device_gib:
        out.append(
            f"to fit: the KV cache takes {plan['kv_cache_gib']:.1f} GiB: more data/fsdp devices "
            "(its rows divide over data*fsdp), fewer --new-tokens or rows per sampler call"
        )
    return out


def format_plan(plan: dict[str, Any], model_name: str, device_gib: float | None) -> str:
    """The human-readable table of a :func:`plan_memory` result."""
    m = plan["mesh"]
    tuning = f"LoRA rank {plan['lora_rank']}" if plan["lora_rank"] else "full fine-tuning"
    lines = [
        f"erpo-jax plan: {model_name} ({plan['model_params'] / 1e9:.2f}B parameters) on mesh "
        f"data={m['data']},fsdp={m['fsdp']},tensor={m['tensor']} "
        f"({m['data'] * m['fsdp'] * m['tensor']} simulated devices)",
        f"  B={plan['batch']} rows (P={plan['prompts']} prompts x G={plan['group_size']}), "
        f"prompt {plan['prompt_len']} (bucket {plan['prompt_bucket']}) + "
        f"{plan['new_tokens']} new tokens",
        f"  loss {plan['loss']}; compute {plan['dtype']}, parameters float32; {tuning}; "
        f"remat {'on' if plan['remat'] else 'off'}; micro-batches {plan['micro_batches']}; "
        f"attention {plan['attention_impl']}"
        + (
            f" (planned as {plan['attention_planned']}, as auto picks on GPU and TPU)"
            if plan["attention_impl"] == "auto"
            else ""
        ),
        "",
        f"  {'per device':<46}{'GiB':>9}",
    ]

    def row(label: str, gib: float, note: str = "") -> None:
        lines.append(f"  {label:<46}{gib:9.2f}" + (f"   {note}" if note else ""))

    row("parameters", plan["params_gib"], "from shapes and shardings")
    row("optimizer state (AdamW mu, nu)", plan["optimizer_gib"])
    if plan["ref_params_gib"]:
        row("reference parameters (frozen copy)", plan["ref_params_gib"], f"{plan['loss']} uses it")
    if plan["update_compiled"]:
        row("activations/temporaries (update step)", plan["activations_gib"], "compiled")
    else:
        row("activations/temporaries (update step)", 0.0, "not compiled")
    row("train batch", plan["batch_gib"])
    kv_note = "compiled sharding" if plan["sampler_compiled"] else "rows over data*fsdp"
    shared = plan.get("kv_shared_prefix", 0)
    shared = f", {shared} shared" if shared else ""  # the prompt, once per group
    row(f"KV cache ({plan['cache_slots']} slots{shared}, {plan['dtype']})", plan["kv_cache_gib"],
        kv_note)  # fmt: skip
    if plan.get("sampler_params_gib", 0):
        row("parameters gathered over fsdp for the rollout", plan["sampler_params_gib"])
    if plan["sampler_compiled"]:
        row("sampler temporaries (prefill, decode loop)", plan["sampler_temp_gib"], "compiled")
    else:
        row("sampler temporaries", 0.0, "not compiled")
    lines.append("  " + "-" * 55)
    row("train phase: state + batch + activations", plan["train_peak_gib"])
    row("rollout phase: state + KV cache + sampler", plan["rollout_peak_gib"])
    row("total (the larger phase)", plan["total_gib"])
    if device_gib is not None:
        fits = plan["total_gib"] <= device_gib
        lines.append(f"fits in {device_gib:g} GiB: {'yes' if fits else 'no'}")
        if not fits:
            lines.extend(f"  {h}" for h in _hints(plan, device_gib))
    c = plan["compiled"]
    if "update" in c:
        lines.append(
            f"check: compiled update arguments {c['update']['argument_gib']:.2f} GiB; "
            f"parameters + optimizer + batch {c['analytic_update_arguments_gib']:.2f} GiB"
        )
    if plan["sampler_compiled"]:
        lines.append(
            f"check: KV cache keys sharded {c['kv_cache_spec']} over [B, K, H, C] by the compiled "
            f"prefill; rows over data*fsdp alone would be {plan['kv_cache_analytic_gib']:.2f} GiB"
        )
    else:
        lines.append("note: the sampler was not compiled; its temporaries are not counted")
    if plan["seconds"]:
        secs = ", ".join(f"{k} {v:.0f} s" for k, v in plan["seconds"].items())
        lines.append(f"compile time: {secs} (XLA:CPU buffer assignment; an estimate)")
    return "\n".join(lines)


_JSON_KEYS = ("params_gib", "optimizer_gib", "ref_params_gib", "activations_gib", "batch_gib",
              "kv_cache_gib", "sampler_temp_gib", "sampler_params_gib", "train_peak_gib",
              "rollout_peak_gib", "total_gib")  # fmt: skip


def plan_report(
    plan: dict[str, Any], model_name: str, device_gib: float | None = None
) -> tuple[str, dict[str, Any]]:
    """``(table, summary)``: the printed table and the final JSON line's dict."""
    summary: dict[str, Any] = {
        "model": model_name,
        "mesh": plan["mesh"],
        "batch": plan["batch"],
        "prompt_len": plan["prompt_len"],
        "new_tokens": plan["new_tokens"],
    }
    summary.update({k: round(plan[k], 4) for k in _JSON_KEYS})
    summary["fits"] = None if device_gib is None else plan["total_gib"] <= device_gib
    summary["device_gib"] = device_gib
    summary["seconds"] = plan["seconds"]
    return format_plan(plan, model_name, device_gib), summary


# ----------------------------------------------------------------- commands


def _run(req: _Request) -> int:
    """The plan in this process, whose devices are the simulated mesh."""
    from erpo_jax.models import ModelConfig

    config = ModelConfig.preset(req.model)
    if req.prompt_len + req.new_tokens > config.max_position_embeddings:
        print(
            f"note: --prompt-len {req.prompt_len} + --new-tokens {req.new_tokens} exceeds "
            f"{req.model}'s max_position_embeddings={config.max_position_embeddings}, which the "
            "sampler enforces by default (max_length); planned anyway",
            file=sys.stderr,
        )
    try:
        plan = plan_memory(
            config, req.mesh, req.batch, req.prompt_len, req.new_tokens, loss=req.loss,
            dtype=req.dtype, lora_rank=req.lora_rank, micro_batches=req.micro_batches,
            remat=req.remat, logp_chunk_size=req.logp_chunk_size,
            sequence_parallel=req.sequence_parallel, attention_impl=req.attention_impl,
            gather_params=req.gather_params, device_gib=req.device_gib,
            log=lambda msg: print(msg, file=sys.stderr, flush=True),
        )  # fmt: skip
    except PlanError as err:
        print(f"erpo-jax plan: {err}", file=sys.stderr)
        return 2
    table, summary = plan_report(plan, req.model, req.device_gib)
    print(table)
    print(json.dumps(summary), flush=True)
    return 0


def plan_command(args: argparse.Namespace) -> int:
    """``erpo-jax plan``: check the flags, then plan in a process that has the mesh's devices.

    Returns the exit status: 0, or 2 after one ``erpo-jax plan: --flag ...``
    line on stderr for a bad argument.
    """
    try:
        req = _request(args)
    except PlanError as err:
        print(f"erpo-jax plan: {err}", file=sys.stderr)
        return 2
    if os.environ.get(_CHILD_ENV) == "1":
        return _run(req)
    # JAX reads the simulated device count once, when it starts its backends,
    # so a fresh process gets it right whatever this one has done already.
    n = req.mesh[0] * req.mesh[1] * req.mesh[2]
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]  # fmt: skip
    flags.append(f"--xla_force_host_platform_device_count={n}")
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    env[_CHILD_ENV] = "1"
    payload = json.dumps(dataclasses.asdict(req))
    cmd = [sys.executable, "-m", "erpo_jax.train._plan", payload]
    return subprocess.run(cmd, env=env, check=False).returncode


def _child_main(payload: str) -> int:
    fields = json.loads(payload)
    fields["mesh"] = tuple(fields["mesh"])
    return _run(_Request(**fields))


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
