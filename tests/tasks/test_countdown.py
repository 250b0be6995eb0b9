"""Countdown: generator determinism and splits, brute-force solver, safe reward."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest

from erpo_jax.tasks import (
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


def _naive_reachable(numbers):
    """Reference solver: repeatedly combine two items of a list (the classic search)."""
    found = set()

    def search(items):
        for value in items:
            found.add(value)
        for i, j in itertools.permutations(range(len(items)), 2):
            rest = [items[k] for k in range(len(items)) if k not in (i, j)]
            a, b = items[i], items[j]
            results = [a + b, a - b, a * b] + ([a / b] if b else [])
            for r in results:
                search([*rest, r])

    search([Fraction(x) for x in numbers])
    return {int(v) for v in found if v.denominator == 1}


@pytest.mark.parametrize("numbers", [(1, 2), (3, 3, 8), (4, 7, 9), (1, 5, 5, 5), (2, 3, 10, 7)])
def test_reachable_matches_naive_search(numbers):
    assert countdown_reachable(numbers) == _naive_reachable(numbers)


def test_solver_finds_valid_expressions_and_reports_impossible():
    assert solve_countdown([3, 3, 8, 8], 24) is not None  # 8 / (3 - 8 / 3)
    expr = solve_countdown([3, 3, 8, 8], 24)
    assert countdown_reward(f"Answer: {expr}", [3, 3, 8, 8], 24) == 1.0
    assert solve_countdown([1, 1], 5) is None
    assert solve_countdown([2, 3], 7) is None


@pytest.mark.parametrize("level", sorted(COUNTDOWN_LEVELS))
def test_generator_is_deterministic_solvable_and_in_range(level):
    first = generate_countdown(30, seed=7, split="train", level=level)
    again = generate_countdown(30, seed=7, split="train", level=level)
    other = generate_countdown(30, seed=8, split="train", level=level)
    assert first == again
    assert first != other
    spec = COUNTDOWN_LEVELS[level]
    assert len({p.key for p in first}) == 30
    for p in first:
        assert len(p.numbers) == spec.num_numbers
        assert all(1 <= x <= spec.max_number for x in p.numbers)
        assert spec.min_target <= p.target <= spec.max_target
        assert p.target not in p.numbers
        expr = solve_countdown(p.numbers, p.target)
        assert expr is not None
        assert countdown_reward(f"Answer: {expr}", list(p.numbers), p.target) == 1.0
        assert countdown_split(p) == "train"


def test_splits_are_disjoint_across_seeds():
    train = {p.key for s in range(3) for p in generate_countdown(100, seed=s, level="easy")}
    test = {
        p.key for s in range(3) for p in generate_countdown(100, seed=s, split="test", level="easy")
    }
    assert train and test and not train & test
    # The split is a property of the problem, not of the order of its numbers.
    p = CountdownProblem((3, 5, 7), 22)
    assert countdown_split(p) == countdown_split(CountdownProblem((7, 3, 5), 22))


def test_split_fraction_is_roughly_respected():
    problems = [CountdownProblem((a, b, c), t) for a, b, c in [(1, 2, 3)] for t in range(2000)]
    share = sum(countdown_split(p, test_fraction=0.2) == "test" for p in problems) / 2000
    assert 0.17 < share < 0.23


def test_generator_errors():
    with pytest.raises(ValueError, match="unknown level 'extreme'"):
        generate_countdown(1, seed=0, level="extreme")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        generate_countdown(1, seed=0, split="valid")
    tiny = CountdownLevel(num_numbers=2, max_number=2, min_target=3, max_target=4)
    with pytest.raises(ValueError, match="found only"):
        generate_countdown(50, seed=0, level=tiny)
    with pytest.raises(ValueError, match="num_numbers"):
        CountdownLevel(num_numbers=1, max_number=5, min_target=1, max_target=5)


def test_prompt_format():
    p = CountdownProblem((3, 5, 7, 2), 24)
    assert countdown_prompt(p) == "Numbers: 3 5 7 2\nTarget: 24\n"


NUMS = [3, 5, 7, 1]

# (completion, reward) for numbers NUMS and target 24
REWARD_TABLE = [
    ("Answer: (7-3)*(5+1)", 1.0),
    ("Answer: (7 - 3) * (5 + 1)", 1.0),
    ("answer: (7-3)*(5+1)\n", 1.0),
    ("7-3=4\n5+1=6\nAnswer: (7-3)*(5+1) = 24", 1.0),
    ("Answer: (7-3)*(5+1) = 25", 0.0),  # a wrong claimed value
    ("<answer>(7-3)*(5+1)</answer>", 1.0),
    ("Answer: 1\nAnswer: (7-3)*(5+1)", 1.0),  # the last answer counts
    ("Answer: (7-3)*(5+1)\nAnswer: 1", 0.0),
    ("Answer: 3*(7+1)", 1.0),  # not every number has to be used
    ("Answer: 3*8", 0.0),  # 8 is not given
    ("Answer: 3*(7+1)*1", 0.0),  # 1 used twice
    ("Answer: (5+7)*(3-1)", 1.0),
    ("Answer: (3+3)*(5-1)", 0.0),  # 3 used twice, given once
    ("Answer: 7*3+3", 0.0),
    ("Answer: 24", 0.0),
    ("Answer: 5*(7-3/3)", 0.0),  # 3 reused
    ("Answer: (7-3)*(5+1)/(1-1)", 0.0),  # division by zero
    ("Answer: 3/0", 0.0),
    ("Answer: 3**2", 0.0),
    ("Answer: -3+27", 0.0),
    ("Answer: 2.0*12", 0.0),
    ("Answer: __import__('os').system('true')", 0.0),
    ("Answer: (7-3)*(5+1", 0.0),
    ("Answer: ", 0.0),
    ("(7-3)*(5+1)", 0.0),  # no answer marker
    ("Answer: 3_0-7+1", 0.0),  # underscores in literals are Python syntax, not arithmetic
    ("Answer: 0x18", 0.0),
    ("Answer: 7×3+5-1-" + "(" * 150 + "1" + ")" * 150, 0.0),  # over the length limit
]


@pytest.mark.parametrize("completion, expected", REWARD_TABLE)
def test_countdown_reward_truth_table(completion, expected):
    assert countdown_reward(completion, NUMS, 24) == expected


def test_rational_intermediates_are_allowed():
    # 8 / (3 - 8/3) = 24 goes through 1/3.
    assert countdown_reward("Answer: 8/(3-8/3)", [3, 3, 8, 8], 24) == 1.0
    assert countdown_reward("Answer: 7÷2×4", [7, 2, 4], 14) == 1.0
    assert countdown_reward("Answer: 7/2", [7, 2], 3) == 0.0  # 3.5 is not 3


def test_evaluate_and_extract():
    assert evaluate_countdown_expression("(1+2)*3") == (Fraction(9), [1, 2, 3])
    assert evaluate_countdown_expression("1/(2-2)") is None
    assert evaluate_countdown_expression("abs(3)") is None
    assert evaluate_countdown_expression("(" * 100 + "1" + ")" * 100) is None
    assert extract_countdown_answer("x\nANSWER: 1+2\nmore") == "1+2"
    assert extract_countdown_answer("no answer") is None
