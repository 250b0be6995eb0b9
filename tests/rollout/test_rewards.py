"""RewardPool: rewards from worker processes, per-sample deadlines, failures scored 0.0 and counted."""

from __future__ import annotations

import gc
import math
import time
import warnings

import numpy as np
import pytest
from rollout.reward_fns import SLOW_S, LoadsNowhere, cd_reward, expected, length_times

from erpo_jax.rollout._rewards import RewardPool, RewardScores, RewardTimeoutWarning
from erpo_jax.tasks import generate_countdown, solve_countdown

TIMEOUT_S = 1.0
# Slack for a loaded 2-core machine: killing a worker, starting its
# replacement and scheduling the parent all happen around the deadline.
SLACK_S = 3.0


@pytest.fixture(scope="module")
def pool():
    # One pool for the module, as a trainer keeps one for a run: the tests
    # after a timeout or a crash also check that the replaced worker serves.
    with RewardPool(length_times, timeout_s=TIMEOUT_S, num_workers=2) as p:
        yield p


def wait_until_ready(pool: RewardPool) -> None:
    """Score tiny batches until every worker has started, so timings exclude start-up.

    Each ``score`` call reads the start-up messages of all workers; replacement
    workers (after a timeout or a crash) take a second or more to start here.
    """
    give_up = time.monotonic() + 60.0
    while not all(worker.ready for worker in pool._workers):
        assert time.monotonic() < give_up, "workers did not start within 60 s"
        pool.score(["a"], [1.0])
        time.sleep(0.02)


def score_quietly(pool: RewardPool, completions, problems) -> RewardScores:
    """``pool.score``, asserting that it warned exactly when something failed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = pool.score(completions, problems)
    ours = [w for w in caught if issubclass(w.category, RewardTimeoutWarning)]
    assert len(ours) == (1 if scores.timeouts or scores.errors else 0), [
        str(w.message) for w in caught
    ]
    return scores


def test_rewards_from_workers(pool):
    completions = ["a", "bb", "ccc", "dddd", "eeeee"]
    problems = [1.0, 2.0, 3.0, 0.5, -1.0]
    scores = score_quietly(pool, completions, problems)
    assert scores.rewards.dtype == np.float32 and scores.rewards.shape == (5,)
    np.testing.assert_array_equal(scores.rewards, [1.0, 4.0, 9.0, 2.0, -5.0])
    assert (scores.timeouts, scores.errors, scores.first_error) == (0, 0, None)
    assert scores.seconds > 0


def test_many_samples_keep_their_order(pool):
    # Several chunks per worker: every reward must land on its own index.
    completions = ["x" * (i % 7 + 1) for i in range(200)]
    problems = [float(i) for i in range(200)]
    scores = score_quietly(pool, completions, problems)
    np.testing.assert_array_equal(scores.rewards, expected(completions, problems))


def test_hang_scores_zero_and_the_rest_continue(pool):
    # 40 samples on 2 workers go in chunks of 5; the hang sits mid-chunk, so
    # the samples before it (finished, results lost with the worker) and after
    # it must be rescored elsewhere.
    completions = ["y" * (i % 5 + 1) for i in range(40)]
    completions[7] = "hang"
    problems = [float(i % 3 + 1) for i in range(40)]
    wait_until_ready(pool)
    t0 = time.perf_counter()
    with pytest.warns(RewardTimeoutWarning, match="1 hit the 1 s time limit"):
        scores = pool.score(completions, problems)
    elapsed = time.perf_counter() - t0
    np.testing.assert_array_equal(scores.rewards, expected(completions, problems))
    assert (scores.timeouts, scores.errors) == (1, 0)
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + SLACK_S, elapsed

    # The killed worker was replaced: the next call scores everything, promptly.
    scores = score_quietly(pool, ["ab", "c", "def"], [1.0, 1.0, 2.0])
    np.testing.assert_array_equal(scores.rewards, [2.0, 1.0, 6.0])
    assert (scores.timeouts, scores.errors) == (0, 0)
    assert scores.seconds < TIMEOUT_S


def test_each_sample_has_its_own_deadline(pool):
    # N = 16 on 2 workers: chunks of 2, so the two slow samples share a chunk.
    # Each takes 0.6 s, under the limit; a deadline per chunk would kill the second.
    completions = ["slow", "slow"] + ["ab"] * 14
    wait_until_ready(pool)
    scores = score_quietly(pool, completions, [1.0] * 16)
    np.testing.assert_array_equal(scores.rewards, [4.0, 4.0] + [2.0] * 14)
    assert (scores.timeouts, scores.errors) == (0, 0)
    assert scores.seconds >= 2 * SLOW_S


def test_two_hangs_run_their_deadlines_in_parallel(pool):
    # Chunks of one sample: the two hangs go last, one to each worker.
    completions = ["ab", "abc", "a", "ab", "hang", "hang"]
    problems = [1.0] * 6
    wait_until_ready(pool)
    t0 = time.perf_counter()
    scores = score_quietly(pool, completions, problems)
    elapsed = time.perf_counter() - t0
    np.testing.assert_array_equal(scores.rewards, [2.0, 3.0, 1.0, 2.0, 0.0, 0.0])
    assert (scores.timeouts, scores.errors) == (2, 0)
    # One deadline after the other would take at least two time limits.
    assert TIMEOUT_S <= elapsed < 2 * TIMEOUT_S, elapsed


def test_raise_scores_zero_counts_an_error_and_warns(pool):
    with pytest.warns(RewardTimeoutWarning, match=r"ValueError: boom on 2\.0"):
        scores = pool.score(["a", "raise", "ccc"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(scores.rewards, [1.0, 0.0, 9.0])
    assert (scores.timeouts, scores.errors) == (0, 1)
    assert scores.first_error == "sample 1: ValueError: boom on 2.0"


@pytest.mark.parametrize("bad", ["nan", "inf", "str"])
def test_non_finite_or_non_numeric_return_is_an_error(pool, bad):
    scores = score_quietly(pool, ["ab", bad, "c"], [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(scores.rewards, [2.0, 0.0, 1.0])
    assert (scores.timeouts, scores.errors) == (0, 1)
    assert scores.first_error is not None and scores.first_error.startswith("sample 1:")


def test_first_error_is_the_lowest_index(pool):
    completions = ["a"] * 30 + ["nan"] + ["a"] * 10 + ["raise"]
    scores = score_quietly(pool, completions, [1.0] * len(completions))
    assert scores.errors == 2
    assert scores.first_error is not None and scores.first_error.startswith("sample 30:")


def test_a_worker_that_dies_costs_only_its_sample(pool):
    completions = ["ab", "die", "abc", "a", "abcd", "ab"]
    scores = score_quietly(pool, completions, [1.0] * 6)
    np.testing.assert_array_equal(scores.rewards, [2.0, 0.0, 3.0, 1.0, 4.0, 2.0])
    assert (scores.timeouts, scores.errors) == (0, 1)
    assert "died (exit code 3)" in scores.first_error
    scores = score_quietly(pool, ["abc"], [2.0])
    np.testing.assert_array_equal(scores.rewards, [6.0])


def test_problems_that_do_not_travel_are_errors(pool):
    # A lambda does not pickle here; LoadsNowhere pickles but does not unpickle
    # in the worker. Each costs its own chunk (one sample per chunk at N = 4).
    scores = score_quietly(pool, ["ab", "abc", "ab", "a"], [1.0, lambda: 0, LoadsNowhere(), 2.0])
    np.testing.assert_array_equal(scores.rewards, [2.0, 0.0, 0.0, 2.0])
    assert (scores.timeouts, scores.errors) == (0, 2)
    assert "sample 1: the problem or completion does not pickle" in scores.first_error


def test_inline_equals_workers(pool):
    completions = ["abc", "raise", "nan", "a", "str", "abcd", "ab"] * 3
    problems = [float(i) for i in range(len(completions))]
    inline = RewardPool(length_times, inline=True)
    a = score_quietly(inline, completions, problems)
    b = score_quietly(pool, completions, problems)
    np.testing.assert_array_equal(a.rewards, b.rewards)
    np.testing.assert_array_equal(a.rewards, expected(completions, problems))
    assert (a.timeouts, a.errors, a.first_error) == (b.timeouts, b.errors, b.first_error)
    assert a.errors == 9


def test_empty_batch(pool):
    for p in (pool, RewardPool(length_times, inline=True)):
        scores = score_quietly(p, [], [])
        assert scores.rewards.shape == (0,) and scores.rewards.dtype == np.float32
        assert (scores.timeouts, scores.errors, scores.first_error) == (0, 0, None)


def test_argument_errors_name_the_argument(pool):
    with pytest.raises(ValueError, match=r"completions and problems.*2 completions and 3 problems"):
        pool.score(["a", "b"], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="completions and problems"):
        RewardPool(length_times, inline=True).score(["a"], [])
    with pytest.raises(TypeError, match="completions"):
        pool.score("abc", [1.0, 2.0, 3.0])
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="timeout_s"):
            RewardPool(length_times, timeout_s=bad)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="num_workers"):
            RewardPool(length_times, num_workers=bad)
    with pytest.raises(TypeError, match="reward_fn must be callable"):
        RewardPool("not a function")
    # A lambda does not pickle: refused up front, unless scored in-process.
    with pytest.raises(TypeError, match=r"reward_fn must pickle.*inline=True"):
        RewardPool(lambda c, p: 1.0)
    np.testing.assert_array_equal(
        RewardPool(lambda c, p: 2.0, inline=True).score(["a"], [None]).rewards, [2.0]
    )


def test_reward_fn_that_does_not_load_in_workers_raises_clearly():
    with RewardPool(LoadsNowhere(), num_workers=1) as bad:
        with pytest.raises(RuntimeError, match="does not load in a fresh worker process"):
            bad.score(["a"], [None])


def test_close_stops_workers_and_closed_pool_refuses():
    with RewardPool(length_times, num_workers=1) as p:
        np.testing.assert_array_equal(p.score(["ab"], [1.0]).rewards, [2.0])
        processes = [w.process for w in p._workers]
    for process in processes:
        assert process.exitcode is not None
    with pytest.raises(RuntimeError, match="closed"):
        p.score(["a"], [1.0])
    p.close()  # idempotent

    # Dropping the last reference stops the workers too.
    p = RewardPool(length_times, num_workers=1)
    processes = [w.process for w in p._workers]
    del p
    gc.collect()
    for process in processes:
        process.join(timeout=5.0)
        assert process.exitcode is not None


def test_countdown_rewards():
    problems = generate_countdown(48, seed=3, level="easy")
    completions = []
    for i, problem in enumerate(problems):
        solution = solve_countdown(problem.numbers, problem.target)
        assert solution is not None
        # Right answers, a wrong value, and a right value with an illegal literal.
        completions.append(
            [f"Answer: {solution}", f"Answer: {solution} + 1", f"Answer: {problem.target}"][i % 3]
        )
    with RewardPool(cd_reward, timeout_s=5.0, num_workers=2) as p:
        scores = score_quietly(p, completions, problems)
        # Per-call cost once warm, on 128 samples: a loose bound, far above the
        # ~0.02 s measured, that only a design sending per-sample messages
        # across a cold pool would break.
        batch = (completions * 3)[:128], (problems * 3)[:128]
        p.score(*batch)
        seconds = min(p.score(*batch).seconds for _ in range(3))
    direct = [cd_reward(c, q) for c, q in zip(completions, problems, strict=True)]
    np.testing.assert_array_equal(scores.rewards, direct)
    np.testing.assert_array_equal(scores.rewards, [1.0 if i % 3 == 0 else 0.0 for i in range(48)])
    assert (scores.timeouts, scores.errors) == (0, 0)
    assert seconds < 0.5, seconds
