"""Evaluation of a policy on a task: pass@1 (greedy and sampled), pass@k, maj@k and sampling stats.

:func:`evaluate` samples completions with :func:`erpo_jax.sampling.sample`
(one greedy completion and ``num_samples`` sampled ones per problem), scores
them with the task's verifier (``countdown_reward``, or a ``MathVerifier``
with its per-answer time limit), and returns an :class:`EvalResult`: one
record per completion and a JSON-able summary.

Metrics (``P`` problems, ``n = num_samples`` samples each; a sample is
*correct* when its reward is at least 1, so 0/1 rewards count as given and a
partial-credit ``reward_fn`` counts only full credit):

- ``pass_at_1_greedy``: mean reward of the greedy completions.
- ``pass_at_1_sampled``: mean reward of all sampled completions.
- ``pass_at_k[k]``, ``k = 1..n``: mean over problems of the unbiased
  estimator ``pass_at_k(n, c, k)`` (Chen et al. 2021, eq. 1).
- ``maj_at_k[k]``: mean over problems of ``maj_at_k`` on the first ``k``
  samples, voting on the task's extracted answer (Countdown: the answer
  expression without spaces; math: ``normalize_answer`` of the final answer).
- ``mean_response_length``: completion tokens (EOS included) per completion.
- ``mean_token_entropy``: the sampler's per-token ``entropy`` (the
  temperature-scaled full-vocabulary distribution) averaged over all
  completion tokens.
- ``truncated_frac``: completions that used all ``max_new_tokens`` without
  ending in an EOS id or a stop string.

Sampling is batched in fixed shapes: ``batch_size`` prompts per sampler call
(times ``num_samples`` rows for sampled completions), the last batch padded
by repeating its last prompt, so the sampler compiles once per prompt-length
bucket. Row keys are derived from ``key`` and the problem's index, so the
completions do not depend on ``batch_size``.

JAX and the sampler are imported when :func:`evaluate` first runs, so
importing ``erpo_jax.tasks`` stays light.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from erpo_jax.tasks._answers import extract_completion_answer, normalize_answer
from erpo_jax.tasks._countdown import (
    CountdownProblem,
    countdown_prompt,
    countdown_reward,
    extract_countdown_answer,
)
from erpo_jax.tasks._math_verifier import MathVerifier
from erpo_jax.tasks._metrics import maj_at_k, pass_at_k
from erpo_jax.tasks._sources import MathProblem, format_math_prompt

if TYPE_CHECKING:
    from erpo_jax.models import Decoder

__all__ = ["EVAL_TASKS", "EvalResult", "EvalSample", "evaluate"]

EVAL_TASKS: tuple[str, ...] = ("countdown", "math")
"""Task names :func:`evaluate` (and ``erpo-jax eval --task``) accept."""

Problem = CountdownProblem | MathProblem
RewardFn = Callable[[str, Any], float]


@dataclasses.dataclass(frozen=True)
class EvalSample:
    """One scored completion.

    Attributes:
      problem_index: position of the problem in the evaluated list.
      kind: ``"greedy"`` or ``"sampled"``.
      sample_index: 0 for the greedy completion; ``0..n-1`` among the sampled ones.
      prompt: the prompt text given to the model (template applied).
      completion: the decoded completion (special tokens skipped).
      reference: Countdown: the target; math: the reference answer.
      source: Countdown: the problem's key (``"numbers -> target"``); math:
        the row's ``file:row``.
      reward: the verifier's (or ``reward_fn``'s) score.
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
    """What :func:`evaluate` returns.

    Attributes:
      summary: JSON-able metrics and settings (see the module docstring).
      samples: one :class:`EvalSample` per completion, ordered by problem,
        the greedy one first, then the sampled ones by ``sample_index``.
    """

    summary: dict[str, Any]
    samples: tuple[EvalSample, ...]

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``summary.json`` and ``samples.jsonl`` into ``out_dir`` (created if missing).

        Returns:
          The two paths.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary_path = out / "summary.json"
        samples_path = out / "samples.jsonl"
        summary_path.write_text(json.dumps(self.summary, indent=2) + "\n")
        with samples_path.open("w", encoding="utf-8") as f:
            for record in self.samples:
                f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
        return summary_path, samples_path


# ------------------------------------------------------------------ validation


def _check_positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"evaluate: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _resolve_task(problems: Sequence[Any], task: str | None) -> str:
    if task is not None and task not in EVAL_TASKS:
        raise ValueError(f"evaluate: unknown task {task!r}; allowed: {', '.join(EVAL_TASKS)}")
    if not problems:
        raise ValueError("evaluate: problems is empty; nothing to evaluate")
    kinds = {"countdown": CountdownProblem, "math": MathProblem}
    if task is None:
        first = problems[0]
        matches = [name for name, cls in kinds.items() if isinstance(first, cls)]
        if not matches:
            raise ValueError(
                "evaluate: cannot infer the task from problems of type "
                f"{type(first).__name__}; pass CountdownProblem or MathProblem items"
            )
        task = matches[0]
    cls = kinds[task]
    for i, problem in enumerate(problems):
        if not isinstance(problem, cls):
            raise ValueError(
                f"evaluate: task={task!r} needs {cls.__name__} items, but problems[{i}] is "
                f"{type(problem).__name__}"
            )
    return task


# ------------------------------------------------------------- tokenizer glue


def _encode(tokenizer: Any, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each text, for a ``transformers`` or a raw ``tokenizers`` tokenizer."""
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        encoded = tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [list(e.ids) for e in encoded]
    out = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return [list(ids) for ids in out]


def _decode(tokenizer: Any, rows: list[list[int]]) -> list[str]:
    if hasattr(tokenizer, "decode_batch"):  # tokenizers.Tokenizer
        return list(tokenizer.decode_batch(rows, skip_special_tokens=True))
    return list(tokenizer.batch_decode(rows, skip_special_tokens=True))


def _left_pad(ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``[N, S]`` left-padded ids and mask; ``S`` is the longest row."""
    width = max(len(row) for row in ids)
    tokens = np.full((len(ids), width), pad_id, np.int32)
    mask = np.zeros((len(ids), width), bool)
    for i, row in enumerate(ids):
        if row:
            tokens[i, width - len(row) :] = row
            mask[i, width - len(row) :] = True
    return tokens, mask


def _special_id(tokenizer: Any, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    return None


# --------------------------------------------------------------- task pieces


def _prompt_text(task: str, problem: Any, tokenizer: Any, template: str, think: bool) -> str:
    if task == "countdown":
        return countdown_prompt(problem)
    return format_math_prompt(problem.problem, template=template, tokenizer=tokenizer, think=think)


def _reference(task: str, problem: Any) -> tuple[str, str]:
    """(reference, source) strings of a problem for the records."""
    if task == "countdown":
        return str(problem.target), problem.key
    return problem.answer, problem.source


def _extract(task: str, completion: str) -> tuple[str | None, str | None]:
    """(the extracted answer, its voting key) of a completion."""
    if task == "countdown":
        answer = extract_countdown_answer(completion)
        if not answer:
            return None, None
        return answer, "".join(answer.split())
    answer = extract_completion_answer(completion)
    if answer is None:
        return None, None
    return answer, normalize_answer(answer)


def _score(
    task: str,
    completions: list[str],
    problems: list[Any],
    reward_fn: RewardFn | None,
    verifier: MathVerifier | None,
) -> list[float]:
    if reward_fn is not None:
        return [float(reward_fn(c, p)) for c, p in zip(completions, problems, strict=True)]
    if task == "countdown":
        return [
            countdown_reward(c, list(p.numbers), p.target)
            for c, p in zip(completions, problems, strict=True)
        ]
    assert verifier is not None
    return verifier.score(completions, [p.answer for p in problems]).tolist()


# ----------------------------------------------------------------- metrics


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _completion_stats(records: Sequence[EvalSample], token_entropy_sum: float) -> dict[str, Any]:
    tokens = sum(r.length for r in records)
    return {
        "num_completions": len(records),
        "mean_reward": _mean([r.reward for r in records]),
        "mean_response_length": _mean([r.length for r in records]),
        "mean_token_entropy": token_entropy_sum / max(tokens, 1) if records else None,
        "truncated_frac": _mean([float(r.truncated) for r in records]),
        "no_answer_frac": _mean([float(r.answer is None) for r in records]),
    }


def _sampled_metrics(
    rewards: np.ndarray, votes: list[list[str | None]]
) -> tuple[dict[str, float], dict[str, float]]:
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


# ---------------------------------------------------------------- the loop


def _as_key(key: Any):
    import jax
    import jax.numpy as jnp

    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return jax.random.key(int(key))
    arr = key if isinstance(key, jax.Array) else jnp.asarray(key)
    if jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key):
        if arr.shape != ():
            raise ValueError(f"evaluate: key must be a single PRNG key, got shape {arr.shape}")
        return arr
    if arr.dtype == jnp.uint32 and arr.shape == (2,):
        return jax.random.wrap_key_data(arr)
    raise ValueError(
        "evaluate: key must be an int seed or one PRNG key (jax.random.key or raw uint32 [2]), "
        f"got dtype {arr.dtype}, shape {arr.shape}"
    )


def evaluate(
    model: Decoder | tuple[Any, Any],
    tokenizer: Any,
    problems: Sequence[CountdownProblem] | Sequence[MathProblem],
    *,
    task: str | None = None,
    num_samples: int = 8,
    temperature: float = 1.0,
    top_p: float | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    key: Any = 0,
    greedy: bool = True,
    reward_fn: RewardFn | None = None,
    verifier: MathVerifier | None = None,
    eos_ids: Sequence[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    template: str = "auto",
    think: bool = False,
    progress: bool = True,
) -> EvalResult:
    """Sample, score and summarize a policy on a list of problems.

    For each problem: one greedy completion (``greedy=True``) and
    ``num_samples`` completions at ``temperature`` / ``top_p``, all with
    :func:`erpo_jax.sampling.sample` from left-padded prompts. Rewards come
    from ``countdown_reward`` or a ``MathVerifier`` (or ``reward_fn``);
    metrics are defined in this module's docstring.

    Args:
      model: an :class:`erpo_jax.models.Decoder` or its ``(graphdef, state)`` pair.
      tokenizer: a ``transformers`` tokenizer (``load_tokenizer``) or a
        ``tokenizers.Tokenizer``; encodes prompts and decodes completions.
      problems: ``CountdownProblem`` items (``generate_countdown``) or
        ``MathProblem`` items (``load_math_file``, a ``LoadedProblems`` works).
      task: ``"countdown"`` or ``"math"``; None infers it from the items.
      num_samples: n, sampled completions per problem (0: greedy only);
        pass@k and maj@k are reported for k = 1..n.
      temperature: sampling temperature, > 0 (0 makes the samples greedy too).
      top_p: nucleus mass in (0, 1], or None.
      max_new_tokens: T, completion budget; hitting it without EOS or a stop
        string counts as truncated.
      batch_size: prompts per sampler call (a sampled call has
        ``batch_size * num_samples`` rows); the last batch is padded; at most
        ``len(problems)``.
      key: an int seed or a PRNG key. Problem ``i``'s rows use
        ``split(fold_in(key, i), num_samples)``.
      greedy: also decode one greedy completion per problem.
      reward_fn: ``(completion, problem) -> float`` replacing the task's verifier.
      verifier: the ``MathVerifier`` for ``task="math"``; None builds one
        (default limits) and closes it at the end. Its statistics over this
        call are reported in ``summary["verifier"]``.
      eos_ids: ids that end a completion; None: the model config's
        ``eos_token_ids`` plus the tokenizer's ``eos_token_id``.
      stop_strings: strings that end a completion (checked on the host).
      template: math prompt template for ``format_math_prompt`` (``"auto"``
        applies the tokenizer's chat template when it has one).
      think: open a ``<think>`` block in math prompts.
      progress: show a tqdm progress bar (stderr).

    Returns:
      :class:`EvalResult` with the per-completion records and the summary.

    Raises:
      ValueError: a bad argument, named in the message (an empty
        ``problems``, an unknown ``task``, problems of the wrong type,
        ``num_samples < 0``, ``batch_size < 1``, ``max_new_tokens < 1``,
        ``greedy=False`` with ``num_samples=0``), or a sampler error (a
        prompt that does not fit the context with ``max_new_tokens``).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from tqdm.auto import tqdm

    from erpo_jax.sampling import repeat_for_groups, sample

    start = time.perf_counter()
    items: list[Any] = list(problems)
    task = _resolve_task(items, task)
    n = _check_positive_int("num_samples", num_samples, minimum=0)
    batch_size = _check_positive_int("batch_size", batch_size)
    max_new_tokens = _check_positive_int("max_new_tokens", max_new_tokens)
    if not greedy and n == 0:
        raise ValueError("evaluate: greedy=False with num_samples=0 leaves nothing to sample")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)) or (
        temperature < 0
    ):
        raise ValueError(f"evaluate: temperature must be a finite number >= 0, got {temperature!r}")
    key = _as_key(key)

    config = model.config if not isinstance(model, tuple) else nnx.merge(*model).config
    if eos_ids is None:
        eos = list(config.eos_token_ids)
        tok_eos = _special_id(tokenizer, "eos_token_id")
        if tok_eos is not None and tok_eos not in eos and tok_eos < config.vocab_size:
            eos.append(tok_eos)
        eos_ids = tuple(eos)
    eos_set = {int(e) for e in eos_ids}
    pad_id = _special_id(tokenizer, "pad_token_id")
    if pad_id is None or not 0 <= pad_id < config.vocab_size:
        pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    stops = tuple(stop_strings or ())

    prompts = [_prompt_text(task, p, tokenizer, template, think) for p in items]
    # A chat template writes its own special tokens; plain prompts get the
    # tokenizer's usual ones (the Countdown tokenizer's <bos>).
    chat = (
        task == "math"
        and template in ("auto", "chat")
        and bool(getattr(tokenizer, "chat_template", None))
    )
    prompt_ids = _encode(tokenizer, prompts, add_special_tokens=not chat)
    for i, row in enumerate(prompt_ids):
        if not row:
            raise ValueError(f"evaluate: the prompt of problems[{i}] encodes to no tokens")

    own_verifier = task == "math" and reward_fn is None and verifier is None
    if own_verifier:
        verifier = MathVerifier()
    stats_before = dataclasses.asdict(verifier.stats) if verifier is not None else None

    p_total = len(items)
    # A batch wider than the problem list would only sample padding.
    batch_size = min(batch_size, p_total)
    num_batches = -(-p_total // batch_size)
    phases = [("greedy", 1)] if greedy else []
    if n:
        phases.append(("sampled", n))
    records: list[EvalSample] = []
    entropy_sums = {"greedy": 0.0, "sampled": 0.0}
    sampling_s = scoring_s = 0.0

    def row_keys(first: int, group: int):
        idx = jnp.arange(first, first + batch_size)
        keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), group))(idx)
        return keys.reshape(-1)

    bar = tqdm(
        total=p_total * len(phases),
        desc=f"eval {task}",
        unit="prompt",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        for kind, group in phases:
            rewards_so_far: list[float] = []
            for b in range(num_batches):
                first = b * batch_size
                real = min(batch_size, p_total - first)
                # Pad the last batch with copies of its last prompt: a fixed
                # batch shape keeps the sampler's compiled code.
                idx = [first + min(j, real - 1) for j in range(batch_size)]
                tokens, mask = _left_pad([prompt_ids[i] for i in idx], pad_id)
                grouped = repeat_for_groups(tokens, mask, key, group_size=group)
                t0 = time.perf_counter()
                out = sample(
                    model,
                    grouped.tokens,
                    grouped.mask,
                    row_keys(first, group),
                    max_new_tokens=max_new_tokens,
                    temperature=0.0 if kind == "greedy" else float(temperature),
                    top_p=None if kind == "greedy" else top_p,
                    eos_ids=eos_ids,
                    stop_strings=stops or None,
                    tokenizer=tokenizer if stops else None,
                    pad_id=pad_id,
                )
                out_tokens, out_mask, out_entropy, lengths = jax.device_get(
                    (out.tokens, out.mask, out.entropy, out.lengths)
                )
                sampling_s += time.perf_counter() - t0
                rows = real * group
                completion_ids: list[list[int]] = [
                    out_tokens[r, : lengths[r]].tolist() for r in range(rows)
                ]
                texts = _decode(tokenizer, completion_ids)
                row_problems = [items[first + r // group] for r in range(rows)]
                t0 = time.perf_counter()
                rewards = _score(task, texts, row_problems, reward_fn, verifier)
                scoring_s += time.perf_counter() - t0
                for r in range(rows):
                    length = int(lengths[r])
                    ent = float(np.sum(np.where(out_mask[r], out_entropy[r], 0.0)))
                    entropy_sums[kind] += ent
                    ended = length > 0 and (
                        int(out_tokens[r, length - 1]) in eos_set
                        or (bool(stops) and any(s in texts[r] for s in stops))
                    )
                    answer, _ = _extract(task, texts[r])
                    reference, source = _reference(task, row_problems[r])
                    records.append(
                        EvalSample(
                            problem_index=first + r // group,
                            kind=kind,  # type: ignore[arg-type]
                            sample_index=r % group,
                            prompt=prompts[first + r // group],
                            completion=texts[r],
                            reference=reference,
                            source=source,
                            reward=float(rewards[r]),
                            answer=answer,
                            length=length,
                            mean_entropy=ent / max(length, 1),
                            truncated=length >= max_new_tokens and not ended,
                        )
                    )
                rewards_so_far.extend(rewards)
                bar.set_postfix(phase=kind, reward=f"{np.mean(rewards_so_far):.3f}")
                bar.update(real)
    finally:
        bar.close()
        if own_verifier and verifier is not None:
            verifier.close()

    kind_order = {"greedy": 0, "sampled": 1}
    records.sort(key=lambda r: (r.problem_index, kind_order[r.kind], r.sample_index))
    greedy_records = [r for r in records if r.kind == "greedy"]
    sampled_records = [r for r in records if r.kind == "sampled"]

    summary: dict[str, Any] = {
        "task": task,
        "num_problems": p_total,
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
        rewards_pn = np.array([r.reward for r in sampled_records], np.float64).reshape(p_total, n)
        votes = [
            [_extract(task, r.completion)[1] for r in sampled_records[i * n : (i + 1) * n]]
            for i in range(p_total)
        ]
        summary["pass_at_k"], summary["maj_at_k"] = _sampled_metrics(rewards_pn, votes)
    headline = sampled_records if n else greedy_records
    stats = _completion_stats(headline, entropy_sums["sampled" if n else "greedy"])
    for name in ("mean_response_length", "mean_token_entropy", "truncated_frac", "no_answer_frac"):
        summary[name] = stats[name]
    summary["greedy"] = _completion_stats(greedy_records, entropy_sums["greedy"])
    summary["sampled"] = _completion_stats(sampled_records, entropy_sums["sampled"])
    if verifier is not None and stats_before is not None:
        after = dataclasses.asdict(verifier.stats)
        summary["verifier"] = {k: after[k] - stats_before[k] for k in after}
    summary["sampling_seconds"] = round(sampling_s, 3)
    summary["scoring_seconds"] = round(scoring_s, 3)
    summary["wall_seconds"] = round(time.perf_counter() - start, 3)
    return EvalResult(summary=summary, samples=tuple(records))
