"""pass@k against the closed form and brute-force enumeration; maj@k."""

from __future__ import annotations

import itertools
from math import comb

import numpy as np
import pytest

from erpo_jax.tasks import maj_at_k, majority_vote, pass_at_k


def test_hand_computed():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-12)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-12)  # pass@1 is c / n
    assert pass_at_k(5, 1, 5) == 1.0  # n - c < k


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_against_subset_enumeration(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_against_closed_form_comb_ratio():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 200))
        c = int(rng.integers(0, n + 1))
        k = int(rng.integers(1, n + 1))
        exact = 1.0 - (comb(n - c, k) / comb(n, k) if n - c >= k else 0.0)
        assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-9)


def test_large_n_is_finite_and_monotone_in_k():
    values = [pass_at_k(5000, 3, k) for k in (1, 10, 100, 1000, 4997, 4998)]
    assert all(np.isfinite(values)) and values == sorted(values)
    assert values[-2] == pytest.approx(1.0 - 1.0 / comb(5000, 3), abs=1e-15)
    assert values[-1] == 1.0


@pytest.mark.parametrize(
    "n, c, k, match",
    [
        (0, 0, 1, "n must be >= 1"),
        (4, 5, 1, "c must be in 0..n=4"),
        (4, 1, 0, "k must be in 1..n=4"),
        (4, 1, 5, "k must be in 1..n=4"),
    ],
)
def test_argument_errors(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)
    # A TypeError either way: ours, or the runtime type checker's under the jaxtyping hook.
    with pytest.raises(TypeError):
        pass_at_k(4, 1.0, 1)


def test_majority_vote_and_maj_at_k():
    answers = ["1/2", "3", None, "3", "1/2", "1/2"]
    correct = [True, False, False, False, True, True]
    assert majority_vote(answers) == 0
    assert majority_vote(answers[:4]) == 1  # "3" has two votes, "1/2" one
    assert majority_vote(["a", "b"]) == 0  # a tie goes to the answer seen first
    assert majority_vote([None, None]) is None
    assert maj_at_k(answers, correct, 1) == 1.0
    assert maj_at_k(answers, correct, 4) == 0.0
    assert maj_at_k(answers, correct, 6) == 1.0
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    with pytest.raises(ValueError, match=r"k must be in 1\.\.n=6"):
        maj_at_k(answers, correct, 7)
    with pytest.raises(ValueError, match="same length"):
        maj_at_k(answers, correct[:2], 1)
