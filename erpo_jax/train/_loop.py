"""The RL loop behind ``erpo-jax train``.

One step: take ``P`` prompts from the grain pipeline; sample ``G``
completions each (``erpo_jax.rollout.generate``); score them in the reward
worker pool; with DAPO dynamic sampling, drop all-equal groups and sample
more; recompute ``old_logp`` and, when the loss needs it, ``ref_logp`` with
one shared jitted forward; then ``num_iterations`` passes of
``mini_batches`` optimizer updates, each micro-batched inside one jitted,
state-donating step. Metrics go to ``metrics.jsonl``, TensorBoard and a tqdm
bar; held-out evaluation runs before the first step, every ``eval_every``
steps and after the last; Orbax checkpoints every ``checkpoint_every`` steps.

Determinism (exact resume): the step-``i`` sampling key is
``fold_in(key(seed), i)``, the data order is the grain iterator's (its state
is checkpointed), rewards are deterministic functions of text, and the
parameters and optimizer state are restored bit for bit. A resumed run
therefore repeats the uninterrupted run's per-step metrics, timings aside.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from erpo_jax.train._config import (
    ConfigError,
    RunConfig,
    config_diff,
    config_to_dict,
    config_to_yaml,
)

__all__ = ["TIMING_KEYS", "train", "use_compilation_cache"]

TIMING_KEYS = (
    "rollout_seconds",
    "reward_seconds",
    "update_seconds",
    "step_seconds",
    "tokens_per_second",
    "score_seconds",
)
"""Metrics that measure time (they differ between otherwise identical runs)."""

_EVAL_KEYS = (
    "pass_at_1_sampled",
    "pass_at_1_greedy",
    "pass_at_k",
    "maj_at_k",
    "mean_response_length",
    "mean_token_entropy",
    "truncated_frac",
    "no_answer_frac",
    "skipped_long_prompts",
)
_EVAL_SEED_OFFSET = 1_000_003  # eval keys are disjoint from training keys


@dataclasses.dataclass
class _Run:
    """Everything built once per run (host objects and compiled functions)."""

    config: RunConfig
    out: Path
    mesh: Any
    graphdef: Any
    frozen: Any
    ref: Any  # (trainable, frozen) of the reference, or None
    tokenizer: Any
    task: Any
    eos_ids: tuple[int, ...]
    pad_id: int
    score_fn: Any
    update_fn: Any
    tx: Any
    pool: Any
    stream: Any
    eval_problems: list[Any]
    reft_marker: tuple[int, ...]
    prompt_budget: int = 0  # the longest prompt (tokens) a rollout accepts
    trainable0: Any = None  # the initial trainable parameters (placed)
    keep_fn: Any = None  # the jitted 80/20 keep-mask, built on first use
    mini_split: Any = None  # the jitted mini-batch split, built on first use
    old_in_update: bool = False  # old_logp is the update's own forward (old_logp_in_update)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _resolve_checkpoint(cfg: RunConfig, log: Callable[[str], None]) -> Path:
    if cfg.model.checkpoint == "toy":
        if cfg.data.task != "countdown":
            raise ConfigError(
                "config: model.checkpoint=toy is the Countdown base model; "
                "set data.task=countdown or point model.checkpoint at a checkpoint"
            )
        from erpo_jax.train._toy_model import build_toy_base_model

        return Path(build_toy_base_model(cfg.model.toy_data_dir, seed=0, log=log))
    from erpo_jax.models import checkpoint_dir

    return checkpoint_dir(cfg.model.checkpoint, label="model.checkpoint")


def _eval_problems(cfg: RunConfig) -> list[Any]:
    from erpo_jax.train._data import load_prompt_source

    d = cfg.data
    if d.source == "countdown":
        # A fixed seed: every run (any seed, any method) is evaluated on the
        # same held-out problems, those of `erpo-jax eval`.
        source = load_prompt_source(
            "countdown", split="test", level=d.level, num_problems=cfg.eval.num_problems, seed=0
        )
    elif d.eval_path is not None:
        source = load_prompt_source("file", path=d.eval_path)
    else:
        source = load_prompt_source(d.source, path=d.path, name=d.name, split=d.eval_split)
    return list(source)[: cfg.eval.num_problems]


def old_logp_in_update(cfg: RunConfig) -> bool:
    """Whether ``old_logp`` comes from the update's own forward, detached.

    True when ``train.recompute_old_logp`` holds, the batch gets exactly one
    optimizer update (``num_iterations = mini_batches = 1``, so the policy
    being updated is the one that sampled) and the loss does not need
    ``old_logp`` and ``ref_logp`` from one function
    (:attr:`LossConfig.needs_old_ref_pair`). The recomputed ``old_logp`` then
    equals the update's ``logp``, so its scoring forward is skipped (as TRL
    does on-policy); a reference, when the loss has one (KL > 0), still gets
    its own. ERPO's progress signal keeps the separate ``old_logp`` forward,
    which holds it exactly 0 at step 0.
    """
    t = cfg.train
    return (
        t.recompute_old_logp
        and t.num_iterations == 1
        and t.mini_batches == 1
        and not cfg.loss.needs_old_ref_pair
    )


def _build(cfg: RunConfig, out: Path, log: Callable[[str], None]) -> _Run:
    from flax import nnx

    from erpo_jax.models import add_lora, load_hf_checkpoint, load_tokenizer, resolve_eos_ids
    from erpo_jax.rollout import RewardPool, prompt_budget
    from erpo_jax.tasks import make_task
    from erpo_jax.train._data import PromptStream, load_prompt_source
    from erpo_jax.train._losses import make_loss_fn
    from erpo_jax.train._mesh import make_mesh, place_params, residual_sharding
    from erpo_jax.train._step import make_optimizer, make_score_fn, make_update_fn, split_policy

    mesh = make_mesh(cfg.mesh)
    d = cfg.data
    task_options: dict[str, Any] = {"stop_strings": tuple(cfg.rollout.stop_strings)}
    if d.task == "math":
        task_options.update(template=d.template, think=d.think)
    task = make_task(d.task, **task_options)
    source = load_prompt_source(
        d.source,
        path=d.path,
        name=d.name,
        split=d.split,
        level=d.level,
        num_problems=d.num_problems,
        seed=cfg.seed,
    )
    local_p = cfg.rollout.prompts_per_step // jax.process_count()
    stream = PromptStream(source, batch_size=local_p, seed=cfg.seed, shuffle=d.shuffle)
    eval_problems = _eval_problems(cfg)
    if jax.process_count() > 1:
        _check_multihost(cfg, mesh, len(eval_problems))

    checkpoint = _resolve_checkpoint(cfg, log)
    dtype = jnp.dtype(cfg.model.dtype)
    model, model_config = load_hf_checkpoint(
        checkpoint,
        dtype=dtype,
        param_dtype=jnp.float32,
        remat=cfg.model.remat,
        scan_layers=cfg.model.scan_layers,
        attention_impl=cfg.model.attention_impl,
        attention_block=cfg.model.attention_block,
        residual_sharding=residual_sharding(mesh, sequence_parallel=cfg.model.sequence_parallel),
        attention_mesh=mesh,
    )
    tokenizer = load_tokenizer(checkpoint)
    eos_ids = resolve_eos_ids(model_config, tokenizer, checkpoint)
    tok_pad = getattr(tokenizer, "pad_token_id", None)
    pad_id = (
        tok_pad
        if isinstance(tok_pad, int) and 0 <= tok_pad < model_config.vocab_size
        else (model_config.pad_token_id if model_config.pad_token_id is not None else 0)
    )
    lora = cfg.model.lora_rank > 0
    if lora:
        add_lora(
            model, rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha, rngs=nnx.Rngs(cfg.seed)
        )
    graphdef, trainable, frozen = split_policy(model, lora=lora)
    hd = model_config.head_dim
    trainable = place_params(trainable, mesh, head_dim=hd)
    frozen = place_params(frozen, mesh, head_dim=hd)
    ref = None
    if cfg.loss.needs_reference:
        # LoRA: the reference is the base model, i.e. the same state with the
        # adapters off. Full fine-tuning: a frozen copy of the initial weights.
        ref = None if lora else jax.tree.map(jnp.copy, trainable)
    total_updates = cfg.steps * cfg.train.num_iterations * cfg.train.mini_batches
    tx, schedule = make_optimizer(cfg.optimizer, total_updates, trainable)
    temperature = cfg.rollout.temperature
    chunk = dict(
        # None: the head picks at once or chunked from the shapes it is traced with
        chunk_size=cfg.model.logp_chunk_size or "auto",
        vocab_chunk_size=cfg.model.vocab_chunk_size,
        # one weight-gradient partial sum per row shard: one all-reduce per call
        row_shards=mesh.shape["data"] * mesh.shape["fsdp"],
        # a group's G rows share one prompt: its positions run once per group
        group_size=cfg.rollout.group_size,
    )
    # Old and reference log-probs only: no entropy pass over the vocabulary.
    # In chunks the size of the update's micro-batches (auto: from the shapes).
    micro = cfg.train.micro_batches
    score_micro = None if micro is None else micro * cfg.train.mini_batches
    score_fn = make_score_fn(
        graphdef, temperature=temperature, entropy=False, micro_batches=score_micro, **chunk
    )
    old_in_update = old_logp_in_update(cfg)
    loss_fn = make_loss_fn(cfg.loss, max_len=cfg.rollout.max_new_tokens, total_steps=total_updates)
    update_fn = make_update_fn(
        graphdef,
        tx,
        schedule,
        loss_fn,
        cfg.loss,
        micro_batches=cfg.train.micro_batches,
        max_len=cfg.rollout.max_new_tokens,
        temperature=temperature,
        arca=cfg.loss.name == "arca",
        old_from_forward=old_in_update,
        **chunk,
    )
    inline = cfg.rollout.reward_workers == 0 or not getattr(task, "sandbox_rewards", True)
    pool = RewardPool(
        task.reward,
        timeout_s=cfg.rollout.reward_timeout_s,
        num_workers=max(cfg.rollout.reward_workers, 1),
        inline=inline,
    )
    marker: tuple[int, ...] = ()
    if cfg.rollout.reft and cfg.rollout.reft_marker:
        enc = tokenizer(cfg.rollout.reft_marker, add_special_tokens=False)["input_ids"]
        marker = tuple(int(i) for i in enc)
    run = _Run(
        cfg,
        out,
        mesh,
        graphdef,
        frozen,
        ref,
        tokenizer,
        task,
        eos_ids,
        pad_id,
        score_fn,
        update_fn,
        tx,
        pool,
        stream,
        eval_problems,
        marker,
    )
    run.trainable0 = trainable
    run.old_in_update = old_in_update
    run.prompt_budget = prompt_budget(
        model_config.max_position_embeddings,
        cfg.rollout.max_new_tokens,
        cfg.rollout.max_prompt_tokens,
    )
    return run


# ------------------------------------------------------------------ rollout


def _sampling_options(cfg: RunConfig, marker: tuple[int, ...]):
    from erpo_jax.rollout import SamplingOptions

    r = cfg.rollout
    return SamplingOptions(
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_k=r.top_k,
        top_p=r.top_p,
        min_p=r.min_p,
        reft=r.reft,
        reft_top_n=r.reft_top_n,
        reft_k=r.reft_k,
        reft_marker=marker,
        stop_check_every=r.stop_check_every,
        decode_phases=r.decode_phases,
        gather_params=r.gather_params,
    )


def _left_pad_to(a: np.ndarray, width: int, fill: Any) -> np.ndarray:
    if a.shape[1] == width:
        return a
    pad = np.full((a.shape[0], width - a.shape[1]), fill, a.dtype)
    return np.concatenate([pad, a], axis=1)


def code_version() -> dict[str, Any]:
    """``{"erpo_jax": version, "git_commit": hash or None, "git_dirty": bool or None}``.

    The commit is read only when the package is imported from its own git
    checkout (an editable install); an installed copy reports None.
    """
    import subprocess

    from erpo_jax import __version__

    root = Path(__file__).resolve().parents[2]
    commit, dirty = None, None

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is not None and Path(top).resolve() == root and (root / "erpo_jax").is_dir():
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
    return {"erpo_jax": __version__, "git_commit": commit, "git_dirty": dirty}


def _check_multihost(cfg: RunConfig, mesh: Any, eval_size: int) -> None:
    """Several processes: each must feed its own rows of every sampler call.

    Raises:
      ConfigError: the row axes do not split over the processes, or a
        rollout's or an evaluation's rows do not divide over them (named).
    """
    procs, shards = jax.process_count(), _rows(mesh)
    if shards % procs:
        raise ConfigError(
            f"config keys mesh.data x mesh.fsdp = {shards} must be a multiple of the {procs} "
            "processes, so that each process feeds its own rows (put the devices of different "
            "hosts on mesh.data or mesh.fsdp, not mesh.tensor)"
        )
    rows = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    if rows % shards:
        raise ConfigError(
            f"config keys rollout.prompts_per_step x rollout.group_size = {rows} rows must "
            f"divide over mesh.data x mesh.fsdp = {shards} devices with {procs} processes"
        )
    per_call = min(cfg.eval.batch_size, eval_size) * procs
    groups = ([1] if cfg.eval.greedy else []) + (
        [cfg.eval.num_samples] if cfg.eval.num_samples else []
    )
    for group in groups:
        if (per_call * group) % shards:
            raise ConfigError(
                f"config key eval.batch_size={cfg.eval.batch_size}: {per_call // procs} prompts "
                f"x {group} samples x {procs} processes do not divide over mesh.data x "
                f"mesh.fsdp = {shards} devices; with several processes every evaluation call "
                "must (choose a batch size that makes them)"
            )


def _rows(mesh: Any) -> int:
    """Devices the batch rows are sharded over."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


_MAX_REFILLS = 32  # batches drawn at most to replace prompts that are too long


def _next_prompts(run: _Run, p: int) -> tuple[list[Any], int]:
    """``p`` prompts from the stream that fit the prompt budget, and how many were skipped.

    Too-long prompts are skipped with a :class:`LongPromptWarning` and replaced
    by the next ones (the rest of the batch that supplied the last replacement
    is not used).

    With several processes, every process draws as many batches as the one
    that needs the most: the streams stay in lockstep, so the one stream state
    a checkpoint saves (``PromptStream.state`` is the same on every process)
    is every process's position, and the error below is raised by all
    processes together rather than by one while the others wait in a
    collective.

    Raises:
      ValueError: ``_MAX_REFILLS`` batches in a row held too few prompts that fit.
    """
    from erpo_jax.rollout import LongPromptWarning, split_long_prompts
    from erpo_jax.sampling._hosts import global_max

    problems: list[Any] = []
    skipped = 0
    for _ in range(_MAX_REFILLS):
        batch = run.stream.next_batch()
        fit, long = split_long_prompts(run.task, run.tokenizer, batch, run.prompt_budget)
        problems.extend(batch[i] for i in fit)
        skipped += len(long)
        fewest = -global_max(-len(problems))
        if fewest >= p:  # every process has its p prompts
            break
    else:
        where = " (on the process with the fewest)" if jax.process_count() > 1 else ""
        raise ValueError(
            f"rollout: {_MAX_REFILLS} batches of prompts gave only {fewest} of the "
            f"{p} prompts that fit rollout.max_prompt_tokens={run.prompt_budget} tokens"
            f"{where} ({skipped} skipped here); raise it (or model context) or filter the data"
        )
    if skipped:
        warnings.warn(
            f"rollout: skipped {skipped} prompt(s) longer than {run.prompt_budget} tokens "
            "(rollout.max_prompt_tokens); counted in skipped_long_prompts",
            LongPromptWarning,
            stacklevel=2,
        )
    return problems[:p], skipped


def _collect(run: _Run, params: Any, step: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Rollout + rewards (+ DAPO dynamic sampling): the host batch and its statistics."""
    from erpo_jax.rollout import generate, problem_keys
    from erpo_jax.sampling._hosts import global_max

    cfg = run.config
    p, g = cfg.rollout.prompts_per_step // jax.process_count(), cfg.rollout.group_size
    options = _sampling_options(cfg, run.reft_marker)
    step_key = jax.random.fold_in(jax.random.key(cfg.seed), step)
    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    stats = {
        "rollout_seconds": 0.0,
        "reward_seconds": 0.0,
        "verifier_timeouts": 0,
        "verifier_errors": 0,
        "sampling_tries": 0,
        "skipped_long_prompts": 0,
    }
    all_rewards, all_lengths, all_trunc = [], [], []
    tries = cfg.rollout.max_sampling_tries if cfg.rollout.dynamic_sampling else 1
    for attempt in range(tries):
        problems, skipped = _next_prompts(run, p)
        stats["skipped_long_prompts"] += skipped
        t0 = time.perf_counter()
        # A prompt's key is its position in the step's global batch in stream
        # order (process i holds positions i, i + n, ...; see PromptStream), so
        # a run samples the same completions for the same prompts whatever
        # the number of processes.
        keys = problem_keys(
            jax.random.fold_in(step_key, attempt),
            np.arange(p) * jax.process_count() + jax.process_index(),
        )
        rollout = generate(
            (run.graphdef, _merged(run, params)),
            run.tokenizer,
            run.task,
            problems,
            keys,
            group_size=g,
            options=options,
            eos_ids=run.eos_ids,
            pad_id=run.pad_id,
            # rows over (data, fsdp) when they divide; with several processes
            # each feeds its own rows (they must divide: checked at start)
            mesh=run.mesh if (p * g * jax.process_count()) % _rows(run.mesh) == 0 else None,
        )
        host = jax.device_get(
            {
                k: getattr(rollout, k)
                for k in ("prompt_tokens", "prompt_mask", "tokens", "logp", "entropy", "mask")
            }
        )
        stats["rollout_seconds"] += time.perf_counter() - t0
        row_problems = [problems[r // g] for r in range(p * g)]
        scores = run.pool.score(rollout.texts, row_problems)
        stats["reward_seconds"] += scores.seconds
        stats["verifier_timeouts"] += scores.timeouts
        stats["verifier_errors"] += scores.errors
        stats["sampling_tries"] += 1
        rewards = np.asarray(scores.rewards, np.float32).reshape(p, g)
        all_rewards.append(rewards)
        all_lengths.append(rollout.lengths)
        all_trunc.append(rollout.truncated)
        for i in range(p):
            rows = slice(i * g, (i + 1) * g)
            group = {k: np.asarray(v[rows]) for k, v in host.items()}
            group["rewards"] = rewards[i : i + 1]
            informative = bool(np.ptp(rewards[i]) > 0)
            (kept if informative or not cfg.rollout.dynamic_sampling else dropped).append(group)
        # Every process samples in every try (the sampler is one program over
        # all of them): stop when every process has its batch.
        if -global_max(-len(kept)) >= p:
            break
    filled = max(p - len(kept), 0)
    groups = kept[:p] + dropped[:filled]
    width = global_max(max(gr["prompt_tokens"].shape[1] for gr in groups))
    batch = {}
    for key in ("prompt_tokens", "prompt_mask", "tokens", "logp", "entropy", "mask", "rewards"):
        parts = [gr[key] for gr in groups]
        if key in ("prompt_tokens", "prompt_mask"):
            fill = run.pad_id if key == "prompt_tokens" else False
            parts = [_left_pad_to(x, width, fill) for x in parts]
        batch[key] = np.concatenate(parts, axis=0)
    batch["sampler_logp"] = batch.pop("logp")
    # Every sampled group of every process, for the statistics.
    r = _all_processes(np.concatenate(all_rewards, axis=0))
    lengths = _all_processes(np.concatenate(all_lengths))
    trunc = _all_processes(np.concatenate(all_trunc))
    counted = ("verifier_timeouts", "verifier_errors", "skipped_long_prompts")
    totals = _all_processes(np.asarray([[filled, *(stats[k] for k in counted)]])).sum(axis=0)
    filled = int(totals[0])
    stats.update({k: int(t) for k, t in zip(counted, totals[1:], strict=True)})
    stats.update(
        reward_mean=float(r.mean()),
        reward_std=float(r.std()),
        zero_std_group_frac=float(np.mean(np.ptp(r, axis=1) == 0)),
        response_length_mean=float(lengths.mean()),
        response_length_max=float(lengths.max()),
        truncated_frac=float(trunc.mean()),
        dynamic_sampling_filled=float(filled),
        generated_tokens=float(lengths.sum()),
    )
    return batch, stats


def _all_processes(local: np.ndarray) -> np.ndarray:
    """``local`` of every process, concatenated along axis 0 in process order."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def _merged(run: _Run, params: Any) -> Any:
    """The policy's full state for the sampler: trainable and frozen parameters together."""
    from flax import nnx

    return nnx.merge_state(params, run.frozen)


# --------------------------------------------------------------------- step


def _step_metrics_from_tokens(entropy: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    valid = entropy[mask]
    if valid.size == 0:
        return {"entropy_mean": 0.0, "entropy_p90": 0.0}
    return {"entropy_mean": float(valid.mean()), "entropy_p90": float(np.quantile(valid, 0.9))}


_COMPLETION_KEYS = ("tokens", "mask", "entropy", "sampler_logp")  # the [B, T] arrays


def completion_width(mask: np.ndarray, budget: int, buckets: int) -> int:
    """The columns a step's passes need (see ``train.length_buckets``).

    The longest completion in ``mask [B, T]`` (the longest over all
    processes), rounded up to a multiple of ``ceil(budget / buckets)`` and at
    most ``budget``; at least one quantum when every row is empty.
    """
    from erpo_jax.sampling._hosts import global_max

    used = np.flatnonzero(np.asarray(mask).any(axis=0))
    longest = global_max(int(used[-1]) + 1 if used.size else 1)
    quantum = -(-budget // buckets)
    return min(budget, -(-longest // quantum) * quantum)


def _rl_step(run: _Run, state: dict[str, Any], step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from erpo_jax.losses import high_entropy_mask
    from erpo_jax.train._mesh import global_batch
    from erpo_jax.train._step import _split_micro, logp_gap

    cfg = run.config
    t_start = time.perf_counter()
    host, stats = _collect(run, state["params"], step)
    t0 = time.perf_counter()
    width = completion_width(host["mask"], cfg.rollout.max_new_tokens, cfg.train.length_buckets)
    host = {k: v[:, :width] if k in _COMPLETION_KEYS else v for k, v in host.items()}
    batch = global_batch(host, run.mesh)
    mask = batch["mask"]
    mismatch = None  # on-policy: the update measures it (old_logp_in_update)
    if not run.old_in_update:
        logp, _ = run.score_fn(state["params"], run.frozen, batch, True)
        sampler = batch.pop("sampler_logp")
        total, largest = logp_gap(logp, sampler, mask)
        mismatch = (total / jnp.maximum(jnp.sum(mask), 1), largest)
        batch["old_logp"] = logp if cfg.train.recompute_old_logp else sampler
    if cfg.loss.needs_reference:
        if run.ref is None:  # LoRA: the base model is the reference
            ref_logp, _ = run.score_fn(state["params"], run.frozen, batch, False)
        else:
            ref_logp, _ = run.score_fn(run.ref, run.frozen, batch, True)
        batch["ref_logp"] = ref_logp
    if cfg.loss.name == "entropy_top20":
        if run.keep_fn is None:
            run.keep_fn = jax.jit(
                functools.partial(high_entropy_mask, top_fraction=cfg.loss.top_fraction)
            )
        batch["token_keep"] = run.keep_fn(batch["entropy"], mask)
    # Wait for the scoring passes, so score_seconds is their time and not
    # only their dispatch (the update waits for them anyway).
    jax.block_until_ready(batch)
    score_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    step_metrics: list[dict[str, Any]] = []
    minis = None
    if cfg.train.mini_batches > 1:
        # [mini_batches, rows / mini_batches, ...]: mini-batch m holds slice m of
        # every row shard's groups (contiguous groups on one device), so each
        # device keeps its own rows and nothing is gathered.
        if run.mini_split is None:
            run.mini_split = jax.jit(
                functools.partial(
                    _split_micro, micro=cfg.train.mini_batches, shards=_rows(run.mesh)
                )
            )
        minis = run.mini_split(batch)
    for _ in range(cfg.train.num_iterations):
        for m in range(cfg.train.mini_batches):
            mini = batch if minis is None else {k: v[m] for k, v in minis.items()}
            state, metrics = run.update_fn(state, run.frozen, mini)
            step_metrics.append(metrics)
    # One host transfer for the whole step's device metrics.
    device = jax.device_get({"updates": step_metrics, "mismatch": mismatch})
    update_s = time.perf_counter() - t0
    first, last = device["updates"][0], device["updates"][-1]
    record: dict[str, Any] = {}
    for key, value in first.items():
        # The first update sees old == current policy: its clip fractions and
        # KL describe this batch; the loss and gradient norm are the means.
        record[key] = float(value)
    record["loss"] = float(np.mean([float(m["loss"]) for m in device["updates"]]))
    record["grad_norm"] = float(np.mean([float(m["grad_norm"]) for m in device["updates"]]))
    record["learning_rate"] = float(last["learning_rate"])
    record.update(
        _step_metrics_from_tokens(_all_processes(host["entropy"]), _all_processes(host["mask"]))
    )
    if device["mismatch"] is not None:
        record["logp_mismatch_mean"] = float(device["mismatch"][0])
        record["logp_mismatch_max"] = float(device["mismatch"][1])
    step_s = time.perf_counter() - t_start
    record.update(stats)
    record["completion_width"] = width
    record.update(
        score_seconds=score_s,
        update_seconds=update_s,
        step_seconds=step_s,
        tokens_per_second=stats["generated_tokens"] / max(step_s, 1e-9),
    )
    return state, record


# --------------------------------------------------------------- evaluation


def _evaluate(run: _Run, params: Any) -> dict[str, Any]:
    from erpo_jax.rollout import evaluate

    cfg = run.config
    result = evaluate(
        (run.graphdef, _merged(run, params)),
        run.tokenizer,
        run.eval_problems,
        task=run.task,
        num_samples=cfg.eval.num_samples,
        temperature=cfg.eval.temperature,
        max_new_tokens=cfg.rollout.max_new_tokens,
        batch_size=cfg.eval.batch_size,
        key=jax.random.key(cfg.seed + _EVAL_SEED_OFFSET),
        greedy=cfg.eval.greedy,
        reward_pool=run.pool,
        eos_ids=run.eos_ids,
        pad_id=run.pad_id,
        progress=False,
        max_prompt_tokens=run.prompt_budget,
        mesh=run.mesh,
    )
    return {k: result.summary.get(k) for k in _EVAL_KEYS}


def _eval_record(summary: dict[str, Any]) -> dict[str, Any]:
    flat = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            for k, v in value.items():
                flat[f"eval/{key}/{k}"] = v
        else:
            flat[f"eval/{key}"] = value
    return flat


# --------------------------------------------------------------------- main


def use_compilation_cache(
    path: str | None, *, name: str = "config key compilation_cache_dir", off: str = "null"
) -> str | None:
    """Points JAX's persistent compilation cache at ``path`` (``~`` expanded).

    A cache already configured (``JAX_COMPILATION_CACHE_DIR``,
    ``jax.config``) is kept; ``None`` changes nothing. Returns the directory
    in use, or ``None``.

    Raises:
      ConfigError: ``path`` cannot be created; the message names the setting
        as ``name`` and says that ``off`` turns the cache off.
    """
    current = jax.config.values.get("jax_compilation_cache_dir")
    if current or path is None:
        return current or None
    directory = Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"{name}={path!r}: cannot create the directory ({e}); "
            f"give a writable path, or {off} to turn the cache off"
        ) from e
    jax.config.update("jax_compilation_cache_dir", str(directory))
    return str(directory)


def train(
    config: RunConfig,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    log: Callable[[str], None] = _say,
) -> dict[str, Any]:
    """Runs RL training as configured; returns the summary written to ``<out>/summary.json``.

    Args:
      config: the run (``load_config``).
      out: run directory (default: ``config.out``, else ``runs/train-<time>``).
      resume: continue from the latest complete checkpoint in ``out``.
      log: progress lines (stderr by default).

    Raises:
      ConfigError: a bad config, or ``resume`` with a config that differs
        from the checkpoint's in keys that define the run (all named).
      FileNotFoundError: ``resume`` without a checkpoint, a missing model
        checkpoint or data file (named).
    """
    from tqdm.auto import tqdm

    from erpo_jax.train._checkpoint import RunCheckpointer
    from erpo_jax.train._mesh import place_state
    from erpo_jax.train._metrics import MetricsWriter

    cfg = config
    use_compilation_cache(cfg.compilation_cache_dir)
    if cfg.mesh.distributed:
        m = cfg.mesh
        jax.distributed.initialize(
            coordinator_address=m.coordinator_address,
            num_processes=m.num_processes,
            process_id=m.process_id,
        )
    if cfg.rollout.prompts_per_step % jax.process_count():
        raise ConfigError(
            f"config key rollout.prompts_per_step={cfg.rollout.prompts_per_step} must be a "
            f"multiple of the {jax.process_count()} processes"
        )
    out_dir = Path(out or cfg.out or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
    wall0 = time.perf_counter()
    checkpointer = None
    start_step = 0
    if resume:
        if not (out_dir / "checkpoints").is_dir():
            raise FileNotFoundError(f"--resume: {out_dir / 'checkpoints'} does not exist")
        checkpointer = RunCheckpointer(out_dir, keep=cfg.keep_checkpoints)
        latest = checkpointer.latest_step()
        if latest is None:
            raise FileNotFoundError(
                f"--resume: no complete checkpoint in {out_dir / 'checkpoints'}"
            )
        saved = checkpointer.read_meta(latest)["config"]
        diff = config_diff(saved, config_to_dict(cfg), defaults=config_to_dict(RunConfig()))
        if diff:
            raise ConfigError(
                "--resume: the config differs from the checkpoint's in " + "; ".join(diff)
            )
        start_step = latest
    out_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (out_dir / "config.yaml").write_text(config_to_yaml(cfg))
    if checkpointer is None:
        checkpointer = RunCheckpointer(out_dir, keep=cfg.keep_checkpoints)

    run = _build(cfg, out_dir, log)
    trainable = run.trainable0
    state = {
        "params": trainable,
        "opt_state": run.tx.init(trainable),
        "step": jnp.zeros((), jnp.int32),
    }
    # Scalars (the step, optimizer counts) replicated on the mesh from the
    # start, as the update returns them: one compilation of the update.
    state = place_state(state, run.mesh)
    evals: dict[str, Any] = {}
    # Which code ran which steps: one entry per (re)start of the run.
    code_history = [{"from_step": start_step, **code_version()}]
    if resume:
        state, meta = checkpointer.restore(start_step, state)
        run.stream.restore(meta["data"])
        evals = meta.get("evals", {})
        code_history = meta.get("code_history", []) + code_history
        log(f"resumed from step {start_step} in {out_dir}")
    writer = MetricsWriter(out_dir, resume_step=start_step if resume else None)
    if f"step_{start_step}" in evals:  # the evaluation the checkpointed step ended with
        writer.write(start_step, _eval_record(evals[f"step_{start_step}"]))
    try:
        if "before" not in evals:
            evals["before"] = _evaluate(run, state["params"])
            writer.write(0, _eval_record(evals["before"]))
            log(
                f"before: pass@1 sampled {evals['before']['pass_at_1_sampled']:.4f}, "
                f"greedy {evals['before']['pass_at_1_greedy']}"
            )
        bar = tqdm(
            total=cfg.steps,
            initial=start_step,
            desc=f"train {cfg.loss.name}",
            disable=not cfg.progress or jax.process_index() != 0,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        for step in range(start_step, cfg.steps):
            profiling = cfg.profile_step == step
            if profiling:
                jax.profiler.start_trace(str(out_dir / "profile"))
            state, record = _rl_step(run, state, step)
            if profiling:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
            done = step + 1
            writer.write(step, record)
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                # After `done` updates: its own record at step `done`, as the
                # evaluations before the first (0) and after the last (steps).
                evals[f"step_{done}"] = _evaluate(run, state["params"])
                writer.write(done, _eval_record(evals[f"step_{done}"]))
            bar.set_postfix(
                reward=f"{record['reward_mean']:.3f}",
                entropy=f"{record['entropy_mean']:.3f}",
                tok_s=f"{record['tokens_per_second']:.0f}",
            )
            bar.update(1)
            last = done == cfg.steps
            if last or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                meta = {
                    "data": run.stream.state(),
                    "config": config_to_dict(cfg),
                    "step": done,
                    "seed": cfg.seed,
                    "evals": evals,
                    "code_history": code_history,
                }
                checkpointer.save(done, state, meta)
        bar.close()
        evals["after"] = _evaluate(run, state["params"])
        writer.write(cfg.steps, _eval_record(evals["after"]))
        checkpointer.wait()
    finally:
        writer.close()
        checkpointer.close()
        run.pool.close()
    summary = {
        "before": evals["before"],
        "after": evals["after"],
        "wall_seconds": round(time.perf_counter() - wall0, 2),
        "steps": cfg.steps,
        "loss": cfg.loss.name,
        "seed": cfg.seed,
        "resumed_from": start_step if resume else None,
        "code_history": code_history,
        "periodic": {k: v for k, v in evals.items() if k.startswith("step_")},
    }
    if jax.process_index() == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    b, a = evals["before"], evals["after"]
    log(
        f"pass@1 sampled {b['pass_at_1_sampled']:.4f} -> {a['pass_at_1_sampled']:.4f}; "
        f"greedy {b['pass_at_1_greedy']} -> {a['pass_at_1_greedy']}  ({out_dir})"
    )
    return summary
