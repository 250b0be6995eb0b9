"""Prompts -> G completions -> decoded text -> rewards -> statistics.

The sampling half of RL and of evaluation, shared by the trainer and
:func:`evaluate`:

- :func:`generate`: encode a task's prompts (left-padded to power-of-two
  buckets), sample ``G`` completions each with ``erpo_jax.sampling.sample``,
  decode; returns a :class:`Rollout`.
- :class:`RewardPool`: score completions with a task's reward in worker
  processes with a per-sample deadline; a verifier that hangs or raises
  scores 0 and is counted, never raised.
- :func:`evaluate`: pass@1 (greedy, sampled), pass@k, maj@k, length,
  entropy, truncation on held-out problems; a thin caller of the two above.
"""

from erpo_jax.rollout._evaluate import (
    EVAL_TASKS,
    EvalResult,
    EvalSample,
    as_key,
    evaluate,
    resolve_task,
)
from erpo_jax.rollout._generate import (
    LongPromptWarning,
    Rollout,
    SamplingOptions,
    decode,
    encode_prompts,
    generate,
    problem_keys,
    prompt_budget,
    split_long_prompts,
)
from erpo_jax.rollout._rewards import RewardPool, RewardScores, RewardTimeoutWarning

__all__ = [
    "EVAL_TASKS",
    "EvalResult",
    "EvalSample",
    "LongPromptWarning",
    "RewardPool",
    "RewardScores",
    "RewardTimeoutWarning",
    "Rollout",
    "SamplingOptions",
    "as_key",
    "decode",
    "encode_prompts",
    "evaluate",
    "generate",
    "problem_keys",
    "prompt_budget",
    "resolve_task",
    "split_long_prompts",
]
