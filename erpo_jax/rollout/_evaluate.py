"""Evaluation of a policy on a task: pass@1 (greedy and sampled), pass@k, maj@k and sampling stats.

:func:`evaluate` is a thin caller of the rollout: for each batch of problems
it :func:`generate`-s one greedy completion and ``num_samples`` sampled ones,
scores them through a :class:`RewardPool`, and summarizes.

Metrics (``P`` problems, ``n = num_samples`` samples each; a sample is
*correct* when its reward is at least 1, so 0/1 rewards count as given and a
partial-credit ``reward_fn`` counts only full credit):

- ``pass_at_1_greedy``: mean reward of the greedy completions.
- ``pass_at_1_sampled``: mean reward of all sampled completions.
- ``pass_at_k[k]``, ``k = 1..n``: mean over problems of the unbiased
  estimator ``pass_at_k(n, c, k)`` (Chen et al. 2021, eq. 1).
- ``maj_at_k[k]``: mean over problems of ``maj_at_k`` on the first ``k``
  samples, voting on the task's answer key (``Task.answer``).
- ``mean_response_length``: completion tokens (EOS included) per completion.
- ``mean_token_entropy``: the sampler's per-token ``entropy`` averaged over
  all completion tokens.
- ``truncated_frac``: completions that used all ``max_new_tokens`` without
  ending in an EOS id or a stop string.

Sampling is batched in fixed shapes: ``batch_size`` prompts per sampler call,
the last batch padded by repeating its last prompt. Problem ``i`` uses the
key ``fold_in(key, i)``, so completions do not depend on ``batch_size``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np

from erpo_jax.rollout._generate import (
    LongPromptWarning,
    SamplingOptions,
    generate,
    problem_keys,
    prompt_budget,
    split_long_prompts,
)
from erpo_jax.rollout._rewards import RewardPool
from erpo_jax.sampling._hosts import multihost, row_shards
from erpo_jax.tasks import (
    TASKS,
    CountdownProblem,
    MathProblem,
    Task,
    maj_at_k,
    make_task,
    pass_at_k,
)

__all__ = ["EVAL_TASKS", "EvalResult", "EvalSample", "as_key", "evaluate", "resolve_task"]

EVAL_TASKS: tuple[str, ...] = tuple(TASKS)
"""Task names :func:`evaluate` (and ``erpo-jax eval --task``) accept."""

RewardFn = Callable[[str, Any], float]
_PROBLEM_TYPES: dict[str, type] = {"countdown": CountdownProblem, "math": MathProblem}


@dataclasses.dataclass(frozen=True)
class EvalSample:
    """One scored completion.

    Attributes:
      problem_index: position of the problem in the evaluated list.
      kind: ``"greedy"`` or ``"sampled"``.
      sample_index: 0 for the greedy completion; ``0..n-1`` among the sampled ones.
      prompt: the prompt text given to the model (template applied).
      completion: the decoded completion (special tokens skipped).
      reference: the task's reference answer (Countdown: the target).
      source: where the problem came from (Countdown: ``"numbers -> target"``;
        math: the row's ``file:row``).
      reward: the task's (or ``reward_fn``'s) score.
      answer: the extracted final answer, None when there is none.
      length: completion tokens, EOS or the stop-string token included.
      mean_entropy: mean of the sampler's per-token entropy over the completion.
      truncated: True when the completion hit ``max_new_tokens`` without
        an EOS id or a stop string.
    """

    problem_index: int
    kind: Literal["greedy", "sampled"]
    sample_index: int
    prompt: str
    completion: str
    reference: str
    source: str
    reward: float
    answer: str | None
    length: int
    mean_entropy: float
    truncated: bool

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-able dict (one line of ``samples.jsonl``)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` returns: a JSON-able ``summary`` and one record per completion."""

    summary: dict[str, Any]
    samples: tuple[EvalSample, ...]

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``summary.json`` and ``samples.jsonl`` into ``out_dir``; return the two paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary_path = out / "summary.json"
        samples_path = out / "samples.jsonl"
        summary_path.write_text(json.dumps(self.summary, indent=2) + "\n")
        with samples_path.open("w", encoding="utf-8") as f:
            for record in self.samples:
                f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
        return summary_path, samples_path


def resolve_task(problems: Sequence[Any], task: str | Task | None, **task_options: Any) -> Task:
    """The :class:`Task` for ``problems``: given, named, or inferred from the item type.

    Raises:
      ValueError: no problems, an unknown name (lists the known ones), or
        items of the wrong type (names the first bad index).
    """
    if not problems:
        raise ValueError("evaluate: problems is empty; nothing to evaluate")
    if task is None:
        first = problems[0]
        names = [n for n, cls in _PROBLEM_TYPES.items() if isinstance(first, cls)]
        if not names:
            raise ValueError(
                "evaluate: cannot infer the task from problems of type "
                f"{type(first).__name__}; pass task= (a name or a Task object)"
            )
        task = names[0]
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"evaluate: unknown task {task!r}; allowed: {', '.join(TASKS)}")
        cls = _PROBLEM_TYPES.get(task)
        if cls is not None:
            for i, problem in enumerate(problems):
                if not isinstance(problem, cls):
                    raise ValueError(
                        f"evaluate: task={task!r} needs {cls.__name__} items, but "
                        f"problems[{i}] is {type(problem).__name__}"
                    )
        return make_task(task, **task_options)
    if not isinstance(task, Task):
        raise ValueError(f"evaluate: task must be a name or a Task object, got {type(task)}")
    return task


def as_key(key: Any) -> jax.Array:
    """A typed PRNG key from an int seed, a typed key, or raw ``uint32 [2]`` data."""
    import jax.numpy as jnp

    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return jax.random.key(int(key))
    arr = key if isinstance(key, jax.Array) else jnp.asarray(key)
    if jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key):
        if arr.shape != ():
            raise ValueError(f"key must be a single PRNG key, got shape {arr.shape}")
        return arr
    if arr.dtype == jnp.uint32 and arr.shape == (2,):
        return jax.random.wrap_key_data(arr)
    raise ValueError(
        "key must be an int seed or one PRNG key (jax.random.key or raw uint32 [2]), "
        f"got dtype {arr.dtype}, shape {arr.shape}"
    )


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"evaluate: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _rows_divide(mesh: Any, rows: int) -> bool:
    """Whether ``rows`` split evenly over ``mesh``'s row axes (False without a mesh)."""
    return mesh is not None and (rows * jax.process_count()) % row_shards(mesh) == 0


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _completion_stats(records: Sequence[EvalSample]) -> dict[str, Any]:
    tokens = sum(r.length for r in records)
    entropy = sum(r.mean_entropy * r.length for r in records)
    return {
        "num_completions": len(records),
        "mean_reward": _mean([r.reward for r in records]),
        "mean_response_length": _mean([r.length for r in records]),
        "mean_token_entropy": entropy / max(tokens, 1) if records else None,
        "truncated_frac": _mean([float(r.truncated) for r in records]),
        "no_answer_frac": _mean([float(r.answer is None) for r in records]),
    }


def _pass_and_majority(rewards: np.ndarray, votes: list[list[str | None]]):
    """pass@k and maj@k for k = 1..n from ``[P, n]`` rewards and voting keys."""
    p, n = rewards.shape
    correct = rewards >= 1.0
    counts = correct.sum(axis=1)
    pass_k = {
        str(k): float(np.mean([pass_at_k(n, int(c), k) for c in counts])) for k in range(1, n + 1)
    }
    maj_k = {
        str(k): float(np.mean([maj_at_k(votes[i], correct[i].tolist(), k) for i in range(p)]))
        for k in range(1, n + 1)
    }
    return pass_k, maj_k


def evaluate(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Any],
    *,
    task: str | Task | None = None,
    num_samples: int = 8,
    temperature: float = 1.0,
    top_p: float | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    key: Any = 0,
    greedy: bool = True,
    reward_fn: RewardFn | None = None,
    reward_pool: RewardPool | None = None,
    eos_ids: Sequence[int] | None = None,
    pad_id: int | None = None,
    template: str = "auto",
    think: bool = False,
    progress: bool = True,
    use_lora: bool = True,
    max_prompt_tokens: int | None = None,
    samples_path: str | Path | None = None,
    mesh: Any = None,
) -> EvalResult:
    """Sample, score and summarize a policy on a list of problems.

    Args:
      model: a ``Decoder`` or its ``(graphdef, state)`` pair.
      tokenizer: a ``transformers`` or ``tokenizers`` tokenizer.
      problems: the task's problems (``CountdownProblem``, ``MathProblem``, ...).
      task: a :class:`erpo_jax.tasks.Task`, a task name, or None to infer it.
      num_samples: n, sampled completions per problem (0: greedy only).
      temperature: sampling temperature, finite and ``>= 0``.
      top_p: nucleus mass in (0, 1], or None.
      max_new_tokens: T, completion budget.
      batch_size: prompts per sampler call (at most ``len(problems)``).
      key: an int seed or a PRNG key.
      greedy: also decode one greedy completion per problem.
      reward_fn: ``(completion, problem) -> float`` replacing the task's reward
        (run in-process).
      reward_pool: the pool that scores completions; None: an in-process one
        for tasks that declare ``sandbox_rewards = False`` (Countdown), else a
        worker pool with a 10 s per-sample limit, closed at the end.
      eos_ids: ids that end a completion; None: the model config's.
      pad_id: padding id; None: the tokenizer's, else the config's, else 0.
      template, think: math prompt options (used when ``task`` is a name).
      progress: tqdm progress bar on stderr.
      use_lora: sample with the LoRA adapters applied.
      max_prompt_tokens: skip (with a :class:`LongPromptWarning`, counted in
        ``summary["skipped_long_prompts"]``) problems whose prompt is longer;
        None: the model's ``max_position_embeddings`` minus ``max_new_tokens``.
      samples_path: append each scored completion to this JSONL file as soon
        as its batch is scored, so an interrupted evaluation leaves its partial
        results (the file is started afresh; :meth:`EvalResult.write` later
        rewrites it in order).
      mesh: shard each sampler call's rows (and KV cache) over this
        ``jax.sharding.Mesh``'s ``(data, fsdp)`` axes, as the trainer's
        rollout does (:func:`erpo_jax.sampling.sample`). A phase whose rows
        per call (``batch_size`` x samples) do not divide over them samples
        unsharded instead; results are the same either way. Multi-host
        (several processes): every process evaluates all the problems, as its
        own rows of each sampler call, and gets the same result; the rows per
        call must then divide.

    Returns:
      :class:`EvalResult`. ``summary["verifier"]`` counts scored samples,
      timeouts and errors of the reward. ``problem_index`` is the position in
      ``problems`` (skipped problems keep their numbers out of the records).

    Raises:
      ValueError: a bad argument, named in the message.
    """
    from flax import nnx
    from tqdm.auto import tqdm

    start = time.perf_counter()
    items = list(problems)
    options = {"template": template, "think": think} if task in ("math", None) else {}
    if task is None and items and not isinstance(items[0], MathProblem):
        options = {}
    the_task = resolve_task(items, task, **options)
    n = _check_int("num_samples", num_samples, 0)
    batch_size = min(_check_int("batch_size", batch_size, 1), len(items))
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    if not greedy and n == 0:
        raise ValueError("evaluate: greedy=False with num_samples=0 leaves nothing to sample")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)) or (
        temperature < 0
    ):
        raise ValueError(f"evaluate: temperature must be a finite number >= 0, got {temperature!r}")
    key = as_key(key)
    config = model.config if not isinstance(model, tuple) else nnx.merge(*model).config
    if max_prompt_tokens is not None:
        _check_int("max_prompt_tokens", max_prompt_tokens, 1)
    budget = prompt_budget(config.max_position_embeddings, max_new_tokens, max_prompt_tokens)
    kept, skipped = split_long_prompts(the_task, tokenizer, items, budget)
    if not kept:
        raise ValueError(
            f"evaluate: every one of the {len(items)} prompts is longer than the prompt budget "
            f"of {budget} tokens (max_prompt_tokens, or max_position_embeddings="
            f"{config.max_position_embeddings} minus max_new_tokens={max_new_tokens})"
        )
    if skipped:
        warnings.warn(
            f"evaluate: skipped {len(skipped)} of {len(items)} problems whose prompt is longer "
            f"than {budget} tokens (problems {skipped[:8]}{' ...' if len(skipped) > 8 else ''})",
            LongPromptWarning,
            stacklevel=2,
        )
    items = [items[i] for i in kept]
    batch_size = min(batch_size, len(items))
    if eos_ids is None:
        eos_ids = tuple(config.eos_token_ids)
    if pad_id is None:
        tok_pad = getattr(tokenizer, "pad_token_id", None)
        if isinstance(tok_pad, int) and 0 <= tok_pad < config.vocab_size:
            pad_id = tok_pad
        else:
            pad_id = config.pad_token_id if config.pad_token_id is not None else 0

    own_pool = reward_pool is None
    if reward_pool is None:
        if reward_fn is not None:
            reward_pool = RewardPool(reward_fn, inline=True)
        else:
            inline = not getattr(the_task, "sandbox_rewards", True)
            reward_pool = RewardPool(the_task.reward, inline=inline)
    sampling = SamplingOptions(
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=top_p
    )
    phases = ([("greedy", 1)] if greedy else []) + ([("sampled", n)] if n else [])
    num_batches = -(-len(items) // batch_size)
    records: list[EvalSample] = []
    counts = {"num_scored": 0, "num_timeouts": 0, "num_errors": 0}
    sampling_s = scoring_s = 0.0
    stream = None
    if samples_path is not None:
        Path(samples_path).parent.mkdir(parents=True, exist_ok=True)
        stream = open(samples_path, "w", encoding="utf-8")
    bar = tqdm(
        total=len(items) * len(phases),
        desc=f"eval {the_task.name}",
        unit="prompt",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for kind, group in phases:
            so_far: list[float] = []
            phase_mesh = mesh if _rows_divide(mesh, batch_size * group) else None
            if phase_mesh is None and multihost(mesh):
                raise ValueError(
                    f"evaluate: {kind} rows per call (batch_size={batch_size} x {group}) times "
                    f"{jax.process_count()} processes do not divide over the mesh's row "
                    "shards (data x fsdp); choose eval.batch_size so that they do"
                )
            for b in range(num_batches):
                first = b * batch_size
                real = min(batch_size, len(items) - first)
                # Pad the last batch with its last prompt: fixed shapes keep compiled code.
                idx = [first + min(j, real - 1) for j in range(batch_size)]
                t0 = time.perf_counter()
                rollout = generate(
                    model,
                    tokenizer,
                    the_task,
                    [items[i] for i in idx],
                    problem_keys(key, [kept[i] for i in idx]),
                    group_size=group,
                    options=sampling,
                    eos_ids=eos_ids,
                    pad_id=pad_id,
                    greedy=kind == "greedy",
                    use_lora=use_lora,
                    mesh=phase_mesh,
                )
                entropy, mask = jax.device_get((rollout.entropy, rollout.mask))
                sampling_s += time.perf_counter() - t0
                rows = real * group
                row_problems = [items[first + r // group] for r in range(rows)]
                scores = reward_pool.score(rollout.texts[:rows], row_problems)
                scoring_s += scores.seconds
                counts["num_scored"] += rows
                counts["num_timeouts"] += scores.timeouts
                counts["num_errors"] += scores.errors
                batch_records = []
                for r in range(rows):
                    length = int(rollout.lengths[r])
                    answer, _ = the_task.answer(rollout.texts[r])
                    ent = float(np.sum(np.where(mask[r], entropy[r], 0.0)))
                    batch_records.append(
                        EvalSample(
                            problem_index=kept[first + r // group],
                            kind=kind,  # type: ignore[arg-type]
                            sample_index=r % group,
                            prompt=rollout.prompts[r // group],
                            completion=rollout.texts[r],
                            reference=the_task.reference(row_problems[r]),
                            source=the_task.source(row_problems[r]),
                            reward=float(scores.rewards[r]),
                            answer=answer,
                            length=length,
                            mean_entropy=ent / max(length, 1),
                            truncated=bool(rollout.truncated[r]),
                        )
                    )
                records.extend(batch_records)
                if stream is not None:
                    for record in batch_records:
                        stream.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
                    stream.flush()
                so_far.extend(scores.rewards[:rows].tolist())
                bar.set_postfix(phase=kind, reward=f"{np.mean(so_far):.3f}")
                bar.update(real)
    finally:
        bar.close()
        if stream is not None:
            stream.close()
        if own_pool:
            reward_pool.close()

    order = {"greedy": 0, "sampled": 1}
    records.sort(key=lambda r: (r.problem_index, order[r.kind], r.sample_index))
    greedy_records = [r for r in records if r.kind == "greedy"]
    sampled_records = [r for r in records if r.kind == "sampled"]
    summary: dict[str, Any] = {
        "task": the_task.name,
        "num_problems": len(items),
        "skipped_long_prompts": len(skipped),
        "max_prompt_tokens": budget,
        "num_samples": n,
        "temperature": float(temperature),
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "pass_at_1_greedy": _mean([r.reward for r in greedy_records]),
        "pass_at_1_sampled": _mean([r.reward for r in sampled_records]),
        "pass_at_k": {},
        "maj_at_k": {},
    }
    if n:
        rewards = np.array([r.reward for r in sampled_records], np.float64).reshape(len(items), n)
        votes = [
            [the_task.answer(r.completion)[1] for r in sampled_records[i * n : (i + 1) * n]]
            for i in range(len(items))
        ]
        summary["pass_at_k"], summary["maj_at_k"] = _pass_and_majority(rewards, votes)
    stats = _completion_stats(sampled_records if n else greedy_records)
    for name in ("mean_response_length", "mean_token_entropy", "truncated_frac", "no_answer_frac"):
        summary[name] = stats[name]
    summary["greedy"] = _completion_stats(greedy_records)
    summary["sampled"] = _completion_stats(sampled_records)
    summary["verifier"] = counts
    summary["sampling_seconds"] = round(sampling_s, 3)
    summary["scoring_seconds"] = round(scoring_s, 3)
    summary["wall_seconds"] = round(time.perf_counter() - start, 3)
    return EvalResult(summary=summary, samples=tuple(records))
