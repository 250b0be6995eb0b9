"""Prompt sources and verifiers: the Countdown toy task, MATH/GSM8K loaders, math answer checking.

Rewards (host-side Python, not jitted):

- ``math_reward(completion, reference)``: final-answer extraction (last
  ``\\boxed{}``, GSM8K ``####``) and equivalence by strict string
  normalization or ``math-verify``, the latter in worker processes with a
  per-answer time limit (``MathVerifier`` for batches and other limits).
- ``countdown_reward(completion, numbers, target)``: safe ``ast`` parsing and
  exact rational arithmetic.

Tasks and data: ``generate_countdown`` (seeded, disjoint train/test splits,
solvable only), ``build_countdown_tokenizer`` (character-level, HF format),
``load_math_file`` / ``load_hf_dataset`` / ``load_tfds_dataset`` and
``format_math_prompt``.

The ``Task`` protocol (prompt text, reference answer, reward, answer key,
stop strings) with ``CountdownTask`` and ``MathTask``; ``make_task(name)``.
A user adds a task by writing one class with those members.

Evaluation estimators: ``pass_at_k`` (unbiased), ``maj_at_k``. Sampling and
evaluating a policy live above this package, in ``erpo_jax.rollout``; this
package imports nothing from ``models`` or ``sampling``.

Importing this package is light (NumPy only); ``tokenizers``,
``math_verify``, ``pyarrow``, ``datasets`` and ``tensorflow_datasets`` are
imported when first needed.
"""

from erpo_jax.tasks._answers import (
    extract_boxed,
    extract_completion_answer,
    extract_gsm8k,
    extract_reference_answer,
    normalize_answer,
)
from erpo_jax.tasks._countdown import (
    COUNTDOWN_LEVELS,
    CountdownLevel,
    CountdownProblem,
    countdown_prompt,
    countdown_reachable,
    countdown_reward,
    countdown_split,
    evaluate_countdown_expression,
    extract_countdown_answer,
    generate_countdown,
    solve_countdown,
)
from erpo_jax.tasks._math_verifier import (
    MathVerifier,
    VerifierStats,
    VerifierTimeoutWarning,
    math_reward,
    math_rewards,
)
from erpo_jax.tasks._metrics import maj_at_k, majority_vote, pass_at_k
from erpo_jax.tasks._sources import (
    QWEN_MATH_INSTRUCTION,
    LoadedProblems,
    MalformedRowWarning,
    MathProblem,
    SkippedRow,
    format_math_prompt,
    load_hf_dataset,
    load_math_file,
    load_tfds_dataset,
    problems_from_rows,
)
from erpo_jax.tasks._task import TASKS, CountdownTask, MathTask, Task, make_task
from erpo_jax.tasks._tokenizer import COUNTDOWN_SPECIAL_TOKENS, build_countdown_tokenizer

__all__ = [
    "COUNTDOWN_LEVELS",
    "COUNTDOWN_SPECIAL_TOKENS",
    "QWEN_MATH_INSTRUCTION",
    "TASKS",
    "CountdownLevel",
    "CountdownProblem",
    "CountdownTask",
    "LoadedProblems",
    "MalformedRowWarning",
    "MathProblem",
    "MathTask",
    "MathVerifier",
    "SkippedRow",
    "Task",
    "VerifierStats",
    "VerifierTimeoutWarning",
    "build_countdown_tokenizer",
    "countdown_prompt",
    "countdown_reachable",
    "countdown_reward",
    "countdown_split",
    "evaluate_countdown_expression",
    "extract_boxed",
    "extract_completion_answer",
    "extract_countdown_answer",
    "extract_gsm8k",
    "extract_reference_answer",
    "format_math_prompt",
    "generate_countdown",
    "load_hf_dataset",
    "load_math_file",
    "load_tfds_dataset",
    "maj_at_k",
    "majority_vote",
    "make_task",
    "math_reward",
    "math_rewards",
    "normalize_answer",
    "pass_at_k",
    "problems_from_rows",
    "solve_countdown",
]
