"""Reward functions for the RewardPool tests.

They live in a module of their own, importable as ``rollout.reward_fns``
(``tests/`` is on ``sys.path``), so that they pickle by reference and the
spawned worker processes can import them; pytest imports test modules under
names a fresh process cannot.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np

from erpo_jax.tasks import countdown_reward

SLOW_S = 0.6  # under the tests' 1 s limit alone, over it twice in a row


def length_times(completion: str, problem: float) -> float:
    """A reward whose completion names its misbehaviour, else ``len(completion) * problem``."""
    if completion == "hang":
        while True:
            time.sleep(1.0)
    if completion == "slow":
        time.sleep(SLOW_S)
    if completion == "raise":
        raise ValueError(f"boom on {problem}")
    if completion == "nan":
        return math.nan
    if completion == "inf":
        return math.inf
    if completion == "str":
        return "1.0"  # type: ignore[return-value]
    if completion == "die":
        os._exit(3)
    return float(len(completion) * problem)


def expected(completions: list[str], problems: list[float]) -> np.ndarray:
    """What ``length_times`` should score, with 0.0 for every misbehaving completion."""
    bad = {"hang", "raise", "nan", "inf", "str", "die"}
    return np.array(
        [0.0 if c in bad else len(c) * p for c, p in zip(completions, problems, strict=True)],
        np.float32,
    )


def cd_reward(completion: str, problem) -> float:
    """The Countdown reward of ``completion`` for a ``CountdownProblem``."""
    return countdown_reward(completion, list(problem.numbers), problem.target)


def _raise_on_load():
    raise ImportError("this reward function does not load here")


class LoadsNowhere:
    """Callable and picklable, but unpickling it raises: a reward_fn workers cannot load."""

    def __call__(self, completion: str, problem) -> float:
        return 1.0

    def __reduce__(self):
        return (_raise_on_load, ())
