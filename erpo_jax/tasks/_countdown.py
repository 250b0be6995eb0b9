"""Countdown: reach a target with + - * / over a few given numbers.

The CPU-scale reasoning task of erpo_jax. A problem is a multiset of 3 or 4
positive integers and an integer target; an answer is an arithmetic
expression that uses each given number at most once (a number given twice
may be used twice) and evaluates exactly to the target. Several expressions
usually reach a target, so a policy must choose among paths: exploration
matters.

Arithmetic is exact (``fractions.Fraction``) and **rational intermediates are
allowed**: ``(7 - 5 / 5) * 4 = 24`` and ``8 / (3 - 8 / 3) = 24`` are both
correct. Division by zero makes an answer wrong; unary minus, powers, other
operators, decimals and any non-integer literal are rejected.

Problems are generated from a seed and split into train and test by a hash of
the problem itself, so the splits are disjoint whatever the seeds: no test
problem is ever generated for training.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import random
import re
from collections import Counter
from fractions import Fraction
from typing import Literal

__all__ = [
    "COUNTDOWN_LEVELS",
    "CountdownLevel",
    "CountdownProblem",
    "countdown_prompt",
    "countdown_reachable",
    "countdown_reward",
    "countdown_split",
    "evaluate_countdown_expression",
    "extract_countdown_answer",
    "generate_countdown",
    "solve_countdown",
]

Split = Literal["train", "test"]


@dataclasses.dataclass(frozen=True)
class CountdownLevel:
    """A difficulty level of the generator.

    Attributes:
      num_numbers: how many numbers a problem gives (2 to 6; 3 or 4 in the presets).
      max_number: given numbers are drawn uniformly from ``1..max_number``.
      min_target: smallest target (inclusive).
      max_target: largest target (inclusive).
    """

    num_numbers: int
    max_number: int
    min_target: int
    max_target: int

    def __post_init__(self):
        if not 2 <= self.num_numbers <= 6:
            raise ValueError(f"CountdownLevel.num_numbers must be in 2..6, got {self.num_numbers}")
        if self.max_number < 1:
            raise ValueError(f"CountdownLevel.max_number must be >= 1, got {self.max_number}")
        if not 0 <= self.min_target <= self.max_target:
            raise ValueError(
                "CountdownLevel needs 0 <= min_target <= max_target, got "
                f"min_target={self.min_target}, max_target={self.max_target}"
            )


COUNTDOWN_LEVELS: dict[str, CountdownLevel] = {
    "easy": CountdownLevel(num_numbers=3, max_number=10, min_target=1, max_target=50),
    "medium": CountdownLevel(num_numbers=4, max_number=10, min_target=10, max_target=100),
    "hard": CountdownLevel(num_numbers=4, max_number=25, min_target=50, max_target=500),
}
"""Preset levels: ``easy`` (3 numbers up to 10, target 1-50), ``medium``
(4 numbers up to 10, target 10-100), ``hard`` (4 numbers up to 25, target 50-500)."""


@dataclasses.dataclass(frozen=True)
class CountdownProblem:
    """One Countdown problem.

    Attributes:
      numbers: the given numbers, in the order shown to the model.
      target: the value to reach.
    """

    numbers: tuple[int, ...]
    target: int

    @property
    def key(self) -> str:
        """Canonical identity (sorted numbers and target), used for splits and dedup."""
        return " ".join(map(str, sorted(self.numbers))) + " -> " + str(self.target)


def countdown_split(problem: CountdownProblem, *, test_fraction: float = 0.1) -> Split:
    """The split a problem belongs to, from a SHA-256 hash of its canonical key.

    The same numbers in any order with the same target always land in the
    same split, whatever seed generated them.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    digest = hashlib.sha256(problem.key.encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2.0**64
    return "test" if bucket < test_fraction else "train"


def _reachable_with_expressions(numbers: tuple[int, ...]) -> dict[Fraction, str]:
    """Every value some expression over a sub-multiset of ``numbers`` reaches.

    Dynamic programming over subsets (by bitmask): the values of a subset are
    the single number, or ``a op b`` for ``a`` from one half of a split and
    ``b`` from the other. Each value keeps one witness expression.
    """
    n = len(numbers)
    values: list[dict[Fraction, str]] = [{} for _ in range(1 << n)]
    for i, x in enumerate(numbers):
        values[1 << i][Fraction(x)] = str(x)
    # Subsets in order of size, so both halves are done before their union.
    for mask in sorted(range(1, 1 << n), key=lambda m: m.bit_count()):
        if mask.bit_count() < 2:
            continue
        table = values[mask]
        sub = (mask - 1) & mask
        while sub:
            other = mask ^ sub
            if sub < other:  # each unordered split once; both operand orders below
                for a, ea in values[sub].items():
                    pa = ea if ea.isdigit() else f"({ea})"
                    for b, eb in values[other].items():
                        pb = eb if eb.isdigit() else f"({eb})"
                        table.setdefault(a + b, f"{pa}+{pb}")
                        table.setdefault(a * b, f"{pa}*{pb}")
                        table.setdefault(a - b, f"{pa}-{pb}")
                        table.setdefault(b - a, f"{pb}-{pa}")
                        if b:
                            table.setdefault(a / b, f"{pa}/{pb}")
                        if a:
                            table.setdefault(b / a, f"{pb}/{pa}")
            sub = (sub - 1) & mask
    reachable: dict[Fraction, str] = {}
    for mask in sorted(range(1, 1 << n), key=lambda m: m.bit_count()):
        for value, expr in values[mask].items():
            reachable.setdefault(value, expr)
    return reachable


def countdown_reachable(numbers: tuple[int, ...] | list[int]) -> set[int]:
    """Integers reachable from ``numbers`` (each used at most once), by brute force.

    The integer values of the same subset search as ``solve_countdown``.
    """
    reachable = _reachable_with_expressions(tuple(numbers))
    return {int(v) for v in reachable if v.denominator == 1}


def solve_countdown(numbers: tuple[int, ...] | list[int], target: int) -> str | None:
    """One expression over ``numbers`` that equals ``target``, or None if none exists.

    Brute force over all sub-multisets and operator trees, exact arithmetic.
    The expression uses as few numbers as possible and is accepted by
    ``countdown_reward``.
    """
    return _reachable_with_expressions(tuple(numbers)).get(Fraction(target))


def generate_countdown(
    num_problems: int,
    *,
    seed: int,
    split: str = "train",
    level: str | CountdownLevel = "medium",
    test_fraction: float = 0.1,
) -> list[CountdownProblem]:
    """Distinct, solvable Countdown problems of one split, deterministic in ``seed``.

    Numbers are drawn uniformly from ``1..level.max_number``; the target is
    drawn uniformly among the integers in ``[min_target, max_target]`` that
    some expression reaches, that are not a given number (those would be
    trivial), and whose problem belongs to ``split`` (by ``countdown_split``)
    and was not drawn before. So train and test never share a problem.

    Args:
      num_problems: how many problems to return.
      seed: any int; the same seed, split, level and fraction give the same list.
      split: ``"train"`` or ``"test"``.
      level: a name in ``COUNTDOWN_LEVELS`` or a ``CountdownLevel``.
      test_fraction: share of all problems that belong to the test split.

    Returns:
      ``num_problems`` problems. Raises ValueError if the level has too few
      distinct problems in the split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"generate_countdown: split must be 'train' or 'test', got {split!r}")
    if isinstance(level, str):
        if level not in COUNTDOWN_LEVELS:
            raise ValueError(
                f"generate_countdown: unknown level {level!r}; "
                f"choose one of {sorted(COUNTDOWN_LEVELS)} or pass a CountdownLevel"
            )
        level_name, level = level, COUNTDOWN_LEVELS[level]
    else:
        level_name = repr(level)
    if num_problems < 0:
        raise ValueError(f"generate_countdown: num_problems must be >= 0, got {num_problems}")
    # A string seed makes random.Random use SHA-512: stable across runs and Python versions.
    rng = random.Random(f"countdown/{seed}/{split}/{level_name}/{test_fraction!r}")
    problems: list[CountdownProblem] = []
    seen: set[str] = set()
    max_draws = 200 * num_problems + 10_000
    for _ in range(max_draws):
        if len(problems) == num_problems:
            break
        numbers = tuple(rng.randint(1, level.max_number) for _ in range(level.num_numbers))
        # Filter the targets by split before choosing, rather than rejecting whole
        # problems afterwards: the test split would otherwise cost ten times the draws.
        candidates = [
            CountdownProblem(numbers, t)
            for t in sorted(countdown_reachable(numbers))
            if level.min_target <= t <= level.max_target and t not in numbers
        ]
        candidates = [
            p
            for p in candidates
            if p.key not in seen and countdown_split(p, test_fraction=test_fraction) == split
        ]
        if not candidates:
            continue
        problem = rng.choice(candidates)
        seen.add(problem.key)
        problems.append(problem)
    if len(problems) < num_problems:
        raise ValueError(
            f"generate_countdown: found only {len(problems)} distinct {split} problems of "
            f"level {level_name} in {max_draws} draws, fewer than num_problems={num_problems}; "
            "use a larger level or fewer problems"
        )
    return problems


COUNTDOWN_ANSWER_PREFIX = "Answer:"


def countdown_prompt(problem: CountdownProblem) -> str:
    """The prompt text of a problem, compact enough for a character-level model.

    The completion is expected to end with a line ``Answer: <expression>``
    (``<answer>...</answer>`` tags are accepted too), e.g.::

        Numbers: 3 5 7 2
        Target: 24
        Answer: (7-3)*(5+1)
    """
    numbers = " ".join(map(str, problem.numbers))
    return f"Numbers: {numbers}\nTarget: {problem.target}\n"


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_PREFIX = re.compile(re.escape(COUNTDOWN_ANSWER_PREFIX), re.IGNORECASE)
_ALLOWED_CHARS = re.compile(r"[0-9+\-*/() ]*")
_MAX_EXPRESSION_CHARS = 200


def extract_countdown_answer(completion: str) -> str | None:
    """The answer expression of a completion, or None.

    The content of the last ``<answer>...</answer>`` if any, else the rest of
    the line after the last ``Answer:`` (case-insensitive).
    """
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        return tags[-1].strip()
    ends = [m.end() for m in _ANSWER_PREFIX.finditer(completion)]
    if not ends:
        return None
    return completion[ends[-1] :].split("\n", 1)[0].strip()


def evaluate_countdown_expression(expression: str) -> tuple[Fraction, list[int]] | None:
    """Exact value of a Countdown expression and the integer literals it uses.

    Only non-negative integer literals, parentheses and binary ``+ - * /``
    are allowed (``×`` and ``÷`` are read as ``*`` and ``/``); the
    expression is parsed with ``ast`` and walked, never evaluated as code.
    Returns None for anything else, for division by zero, or for an
    expression over 200 characters.
    """
    expr = expression.replace("×", "*").replace("÷", "/").replace("\t", " ")
    if len(expr) > _MAX_EXPRESSION_CHARS or not _ALLOWED_CHARS.fullmatch(expr):
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    literals: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp):
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            if isinstance(node.op, ast.Div):
                return left / right  # ZeroDivisionError is caught below
        raise ValueError("disallowed syntax")

    try:
        value = walk(tree.body)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None
    return value, literals


def countdown_reward(completion: str, numbers: list[int], target: int) -> float:
    """1.0 if the completion's answer uses the numbers legally and equals the target.

    The answer is extracted with ``extract_countdown_answer``; a trailing
    ``= <target>`` is allowed. It must use only integer literals from
    ``numbers``, each at most as many times as it is given, and evaluate
    exactly (rational intermediates allowed) to ``target``. Anything else,
    including unparsable text and division by zero, scores 0.0.

    Example:
      >>> countdown_reward("Answer: (7-3)*(5+1)", [3, 5, 7, 1], 24)
      1.0
      >>> countdown_reward("Answer: 3*8", [3, 5, 7, 1], 24)
      0.0
    """
    answer = extract_countdown_answer(completion)
    if not answer:
        return 0.0
    if "=" in answer:
        expression, _, claimed = answer.rpartition("=")
        if claimed.strip() != str(target):
            return 0.0
        answer = expression
    result = evaluate_countdown_expression(answer)
    if result is None:
        return 0.0
    value, literals = result
    if Counter(literals) - Counter(numbers):
        return 0.0  # a literal not given, or used more often than given
    return 1.0 if value == target else 0.0
