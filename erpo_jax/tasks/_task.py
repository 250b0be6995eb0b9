"""The ``Task`` protocol: what the rollout needs to know about a task, and its two implementations.

A task turns a problem into prompt text, knows the problem's reference
answer, scores a completion, extracts the answer a majority vote counts, and
names the strings that end a completion. The rollout, the evaluation and the
trainer see only this protocol; a user adds a task by writing one class with
these members (and registering it in :data:`TASKS` if the command line should
know it by name).

Rewards run in worker processes (``erpo_jax.rollout.RewardPool``), so a task
object must pickle: keep configuration in plain fields and import heavy
libraries inside the methods.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

from erpo_jax.tasks._answers import (
    extract_completion_answer,
    extract_reference_answer,
    normalize_answer,
)
from erpo_jax.tasks._countdown import (
    CountdownProblem,
    countdown_prompt,
    countdown_reward,
    extract_countdown_answer,
)
from erpo_jax.tasks._sources import MathProblem, format_math_prompt

__all__ = ["TASKS", "CountdownTask", "MathTask", "Task", "make_task"]


@runtime_checkable
class Task(Protocol):
    """One verifiable task. Every member is host-side Python.

    Attributes:
      name: short name (``"countdown"``, ``"math"``) used in records.
      stop_strings: strings that end a completion besides EOS ids (may be empty).

    An optional attribute ``sandbox_rewards`` (default True when absent)
    says whether :meth:`reward` must run in worker processes with a deadline;
    a task whose reward is bounded pure Python may set it to False.
    """

    name: str
    stop_strings: tuple[str, ...]

    def prompt(self, problem: Any, tokenizer: Any) -> str:
        """The prompt text of ``problem`` (template applied)."""
        ...

    def add_special_tokens(self, tokenizer: Any) -> bool:
        """Whether encoding the prompt should add the tokenizer's special tokens.

        False when :meth:`prompt` already wrote them (a chat template does).
        """
        ...

    def reference(self, problem: Any) -> str:
        """The reference answer as a string, for records."""
        ...

    def source(self, problem: Any) -> str:
        """Where the problem came from (a file row, a generator key), for records."""
        ...

    def reward(self, completion: str, problem: Any) -> float:
        """The verifiable reward of ``completion`` for ``problem`` (1.0 correct, 0.0 not)."""
        ...

    def answer(self, completion: str) -> tuple[str | None, str | None]:
        """``(the extracted final answer, its voting key)``; ``(None, None)`` when there is none."""
        ...


@dataclasses.dataclass(frozen=True)
class CountdownTask:
    """The Countdown toy task: reach a target with +, -, *, / over the given numbers.

    Problems are :class:`CountdownProblem`; the reward is
    :func:`countdown_reward` (exact rational arithmetic, each number at most once).
    """

    name: str = "countdown"
    stop_strings: tuple[str, ...] = ()
    # Pure Python with bounded work (safe ``ast`` parsing, small exact
    # arithmetic): cheap enough to score in-process, without worker deadlines.
    sandbox_rewards: bool = False

    def prompt(self, problem: CountdownProblem, tokenizer: Any = None) -> str:
        return countdown_prompt(problem)

    def add_special_tokens(self, tokenizer: Any = None) -> bool:
        return True

    def reference(self, problem: CountdownProblem) -> str:
        return str(problem.target)

    def source(self, problem: CountdownProblem) -> str:
        return problem.key

    def reward(self, completion: str, problem: CountdownProblem) -> float:
        return countdown_reward(completion, list(problem.numbers), problem.target)

    def answer(self, completion: str) -> tuple[str | None, str | None]:
        found = extract_countdown_answer(completion)
        if not found:
            return None, None
        return found, "".join(found.split())


@dataclasses.dataclass(frozen=True)
class MathTask:
    """MATH / GSM8K / AIME style problems with a final boxed (or ``####``) answer.

    The reward follows ``erpo_jax.tasks.math_reward``: the completion's last
    ``\\boxed{}`` (or GSM8K ``####``) against the reference, equal after strict
    normalization, else ``math-verify`` equivalence. It runs ``math-verify``
    in-process, because the caller's worker pool supplies the deadline.

    Attributes:
      template: prompt template for :func:`format_math_prompt`
        (``"auto"``, ``"chat"``, ``"qwen_math"``, ``"plain"``).
      think: open a ``<think>`` block in the prompt.
      max_answer_chars: longer answers are compared by string only.
    """

    name: str = "math"
    stop_strings: tuple[str, ...] = ()
    template: str = "auto"
    think: bool = False
    max_answer_chars: int = 1000

    def prompt(self, problem: MathProblem, tokenizer: Any = None) -> str:
        return format_math_prompt(
            problem.problem, template=self.template, tokenizer=tokenizer, think=self.think
        )

    def add_special_tokens(self, tokenizer: Any = None) -> bool:
        # A chat template writes its own special tokens.
        chat = self.template in ("auto", "chat") and bool(getattr(tokenizer, "chat_template", None))
        return not chat

    def reference(self, problem: MathProblem) -> str:
        return problem.answer

    def source(self, problem: MathProblem) -> str:
        return problem.source

    def reward(self, completion: str, problem: MathProblem) -> float:
        answer = extract_completion_answer(completion)
        if answer is None:
            return 0.0
        gold = extract_reference_answer(problem.answer) or problem.answer
        if normalize_answer(answer) == normalize_answer(gold):
            return 1.0
        if len(answer) > self.max_answer_chars:
            return 0.0
        from erpo_jax.tasks._verify_worker import check_equivalent

        return 1.0 if check_equivalent(gold, answer) else 0.0

    def answer(self, completion: str) -> tuple[str | None, str | None]:
        found = extract_completion_answer(completion)
        if found is None:
            return None, None
        return found, normalize_answer(found)


TASKS: dict[str, type] = {"countdown": CountdownTask, "math": MathTask}
"""Tasks known by name to the command line and the trainer's config."""


def make_task(name: str, **options: Any) -> Task:
    """The task called ``name`` with ``options`` (its dataclass fields).

    Raises:
      ValueError: an unknown name (the message lists the known ones) or an
        unknown option (named).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    fields = {f.name for f in dataclasses.fields(cls)} - {"name"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(
            f"task {name!r}: unknown option(s) {', '.join(unknown)}; allowed: "
            f"{', '.join(sorted(fields))}"
        )
    return cls(**options)
