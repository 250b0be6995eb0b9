"""Evaluation estimators over ``n`` samples per prompt: pass@k and maj@k."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

__all__ = ["maj_at_k", "majority_vote", "pass_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct.

    The probability that a uniformly random size-``k`` subset of the ``n``
    samples holds at least one correct sample,
    ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code", eq. 1), computed in the numerically
    stable product form ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``, which
    never forms the huge binomials.

    Args:
      n: samples drawn for the prompt, ``n >= 1``.
      c: correct samples among them, ``0 <= c <= n``.
      k: subset size, ``1 <= k <= n``.

    Returns:
      pass@k in ``[0, 1]``.

    Example:
      >>> pass_at_k(4, 1, 2)
      0.5
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"pass_at_k: {name} must be an int, got {value!r}")
    if n < 1:
        raise ValueError(f"pass_at_k: n must be >= 1, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c must be in 0..n={n}, got c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must be in 1..n={n}, got k={k}")
    if n - c < k:
        return 1.0  # every size-k subset holds a correct sample
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def majority_vote(answers: Sequence[Hashable | None]) -> int | None:
    """Index of the first sample carrying the most frequent answer.

    ``None`` answers (no extractable answer) do not vote. Ties go to the
    answer seen first. Returns None when no sample has an answer.
    """
    counts: dict[Hashable, int] = {}
    first: dict[Hashable, int] = {}
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        counts[answer] = counts.get(answer, 0) + 1
        first.setdefault(answer, i)
    if not counts:
        return None
    best = max(counts, key=lambda a: (counts[a], -first[a]))
    return first[best]


def maj_at_k(answers: Sequence[Hashable | None], correct: Sequence[bool | float], k: int) -> float:
    """maj@k: whether the majority answer of the first ``k`` samples is correct.

    Answers are compared as given, so pass normalized answers (e.g.
    ``normalize_answer(extract_completion_answer(text))``) to make ``0.5``
    and ``\\frac{1}{2}`` vote together. The winning answer's correctness is
    that of its first sample (``majority_vote``); no answer at all scores 0.

    Args:
      answers: ``n`` final answers of one prompt's samples, None where missing.
      correct: ``n`` correctness flags or 0/1 rewards of the same samples.
      k: votes to use, ``1 <= k <= n``.

    Returns:
      1.0 or 0.0.
    """
    if len(answers) != len(correct):
        raise ValueError(
            f"maj_at_k: answers and correct must have the same length, "
            f"got {len(answers)} and {len(correct)}"
        )
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj_at_k: k must be in 1..n={len(answers)}, got k={k}")
    winner = majority_vote(answers[:k])
    if winner is None:
        return 0.0
    return 1.0 if correct[winner] else 0.0
