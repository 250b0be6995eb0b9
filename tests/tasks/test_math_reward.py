"""math_reward / MathVerifier: extraction, equivalences, time limits, crashes."""

from __future__ import annotations

import textwrap
import time
import warnings

import numpy as np
import pytest

from erpo_jax import tasks
from erpo_jax.tasks import (
    MathVerifier,
    VerifierTimeoutWarning,
    _math_verifier,
    extract_boxed,
    extract_completion_answer,
    extract_gsm8k,
    extract_reference_answer,
    math_reward,
    normalize_answer,
)

TIMEOUT_S = 1.0
# Slack for a loaded 2-core machine: killing a worker, starting its
# replacement and scheduling the parent all happen around the deadline.
SLACK_S = 8.0


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(num_workers=2, timeout_s=TIMEOUT_S) as v:
        yield v


@pytest.fixture(scope="module")
def patient_verifier():
    """For answers that must be checked, not timed out: a loaded CI machine can take
    seconds for one sympy comparison (the truth table asserts no timeouts)."""
    with MathVerifier(num_workers=2, timeout_s=30.0) as v:
        yield v


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{5}", "5"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{a_{b_{c}}} end", "a_{b_{c}}"),
        ("\\boxed 7 and more", "7"),
        ("\\fbox{3}", "3"),
        ("$\\boxed{ 10\\text{ cm} }$.", "10\\text{ cm}"),
        ("\\boxed{\\boxed{3}}", "3"),
        ("unclosed \\boxed{\\frac{1}{2}", None),
        ("no box here", None),
        ("\\boxedx{3}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_gsm8k_and_completion_and_reference():
    assert extract_gsm8k("12 - 2 = 10.\n#### 10") == "10"
    assert extract_gsm8k("#### 1,000.\nextra") == "1,000"
    assert extract_gsm8k("nothing") is None
    assert extract_completion_answer("x \\boxed{4} #### 5") == "4"
    assert extract_completion_answer("#### 5") == "5"
    assert extract_completion_answer("The answer is 5.") is None
    assert extract_reference_answer("The roots are $\\boxed{\\{2, 3\\}}$.") == "\\{2, 3\\}"
    assert extract_reference_answer("He has <<3*4=12>>12.\n#### 12") == "12"
    assert extract_reference_answer("  \\dfrac{1}{3} ") == "\\dfrac{1}{3}"
    assert extract_reference_answer("   ") is None


@pytest.mark.parametrize(
    "a, b, equal",
    [
        ("0.5", "\\frac{1}{2}", True),
        ("\\dfrac{1}{2}", "1/2", True),
        (".50", "$\\tfrac12$", False),  # "\frac12" without braces is not a plain number
        ("1,000", "1000", True),
        ("12.0", "12", True),
        ("\\text{(A)}", "(A)", True),
        ("\\left( 1, 2 \\right)", "(1,2)", True),
        ("x = 3.", "x=3", True),
        ("10\\text{ cm}", "10", False),  # units are kept by the strict fallback
        ("50\\%", "50", False),
        ("1/3", "0.333", False),
        ("-\\frac{3}{4}", "-0.75", True),
    ],
)
def test_normalize_answer(a, b, equal):
    assert (normalize_answer(a) == normalize_answer(b)) is equal


# ----------------------------------------------------------- truth table

# (completion, reference, expected reward)
TRUTH_TABLE = [
    # fractions and decimals
    ("... so \\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "1/2", 1.0),
    ("\\boxed{\\frac12}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.333333}", "\\frac{1}{3}", 1.0),
    ("\\boxed{0.33}", "\\frac{1}{3}", 0.0),
    ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
    # units, percent, degrees, text
    ("\\boxed{10\\text{ cm}}", "10", 1.0),
    ("\\boxed{10}", "10\\text{ cm}", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{\\text{Monday}}", "\\text{Monday}", 1.0),
    ("\\boxed{\\text{(B)}}", "(B)", 1.0),
    # symbolic
    ("\\boxed{1 + x^2}", "x^2+1", 1.0),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2", 1.0),
    ("\\boxed{5\\sqrt{2}}", "\\sqrt{50}", 1.0),
    ("\\boxed{9\\pi}", "9\\pi", 1.0),
    ("\\boxed{28.27}", "9\\pi", 0.0),
    ("\\boxed{\\{3, 2\\}}", "\\{2, 3\\}", 1.0),
    ("\\boxed{x = 4}", "4", 1.0),
    ("\\boxed{(2, 1)}", "(1, 2)", 0.0),
    # nesting and last box
    ("\\boxed{\\frac{\\frac{1}{2}}{2}}", "\\frac{1}{4}", 1.0),
    ("first \\boxed{3}, finally \\boxed{4}", "4", 1.0),
    ("first \\boxed{4}, finally \\boxed{3}", "4", 0.0),
    ("unclosed \\boxed{4", "4", 0.0),
    # GSM8K formats and full-solution references
    ("He has 10 left.\n#### 10", "He had 12.\n#### 10", 1.0),
    ("#### 1,000", "1000", 1.0),
    ("so \\boxed{1000}", "It makes <<250*4=1000>>1,000 toys.\n#### 1,000", 1.0),
    ("\\boxed{\\frac{5}{6}}", "We get $\\boxed{\\frac{5}{6}}$.", 1.0),
    # no answer, empty reference
    ("The answer is 5.", "5", 0.0),
    ("", "5", 0.0),
    ("\\boxed{5}", "", 0.0),
    ("\\boxed{}", "5", 0.0),
]


def test_truth_table_batch(patient_verifier):
    completions, references, expected = zip(*TRUTH_TABLE, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VerifierTimeoutWarning)
        rewards = patient_verifier.score(list(completions), list(references))
    assert rewards.dtype == np.float32 and rewards.shape == (len(TRUTH_TABLE),)
    wrong = [
        (c, r, e, float(g))
        for c, r, e, g in zip(completions, references, expected, rewards, strict=True)
        if g != e
    ]
    assert not wrong, wrong


def test_math_reward_public_function():
    assert math_reward("... so the answer is \\boxed{\\dfrac{1}{2}}.", "0.5") == 1.0
    assert math_reward("\\boxed{3}", "The answer is $\\boxed{4}$.") == 0.0
    assert isinstance(math_reward("\\boxed{1}", "1"), float)
    assert tasks.math_rewards(["\\boxed{2}", "#### 3"], ["2", "4"]).tolist() == [1.0, 0.0]


def test_score_argument_errors(verifier):
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        verifier.score(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="sequences of str"):
        verifier.score("\\boxed{1}", "1")
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(timeout_s=0.0)
    with pytest.raises(ValueError, match="num_workers"):
        MathVerifier(num_workers=0)


# ------------------------------------------------------------ adversarial

ADVERSARIAL = [
    # a power tower that SymPy evaluates in C: uninterruptible without a process kill
    ("\\boxed{9^{9^{9^{9}}}}", "1"),
    ("\\boxed{2^{2^{2^{2^{2^{2}}}}}}", "0"),
    # moderately nested braces: exponential time in the LaTeX parser
    ("\\boxed{" + "{" * 40 + "1" + "}" * 40 + "}", "2"),
    # deeply nested braces: over max_answer_chars, string fallback only
    ("\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "2"),
    # a huge completion without a closed box: linear-time extraction
    ("\\boxed{" * 100_000, "1"),
    ("x" * 1_000_000 + "\\boxed{3}", "3"),
]


def test_adversarial_inputs_return_within_time_limit(verifier):
    completions, references = zip(*ADVERSARIAL, strict=True)
    before = verifier.stats.num_timeouts
    start = time.monotonic()
    with pytest.warns(VerifierTimeoutWarning, match="time limit"):
        rewards = verifier.score(list(completions), list(references))
    elapsed = time.monotonic() - start
    assert rewards.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    timed_out = verifier.stats.num_timeouts - before
    assert timed_out >= 2  # at least the two power towers
    # Two workers: the slow checks run two at a time, one time limit each.
    assert elapsed < (timed_out + 1) // 2 * TIMEOUT_S + SLACK_S
    # Workers killed at their deadline were replaced: the verifier still works.
    assert verifier.score(["\\boxed{0.5}"], ["\\frac{1}{2}"]).tolist() == [1.0]


def test_single_adversarial_call_returns_within_limit(verifier):
    verifier.score(["\\boxed{1}"], ["2"])  # make sure a worker is up before timing
    start = time.monotonic()
    with pytest.warns(VerifierTimeoutWarning):
        reward = verifier("\\boxed{8^{8^{8^{8}}}}", "1")
    assert reward == 0.0
    assert time.monotonic() - start < TIMEOUT_S + SLACK_S


def test_repeated_hanging_answer_costs_one_time_limit():
    with MathVerifier(num_workers=1, timeout_s=TIMEOUT_S) as v:
        v.score(["\\boxed{1}"], ["2"])  # start the worker before timing
        start = time.monotonic()
        with pytest.warns(VerifierTimeoutWarning, match="8 completions, 1 distinct answers hit"):
            rewards = v.score(["\\boxed{7^{7^{7^{7}}}}"] * 8, ["5"] * 8)
        assert rewards.tolist() == [0.0] * 8
        assert v.stats.num_timeouts == 1
        assert time.monotonic() - start < TIMEOUT_S + SLACK_S
        # The timeout is remembered: asking again costs nothing and warns nothing.
        with warnings.catch_warnings():
            warnings.simplefilter("error", VerifierTimeoutWarning)
            assert v("\\boxed{7^{7^{7^{7}}}}", "5") == 0.0
        assert v.stats.num_cached == 1


# --------------------------------------------- worker crashes and failed starts

_FAKE_WORKER = textwrap.dedent(
    """
    import json, os, sys
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["pred"] == "crash":
            os._exit(3)
        print(json.dumps({"id": request["id"], "ok": request["pred"] == request["gold"],
                          "error": "ValueError" if request["pred"] == "err" else None}),
              flush=True)
    """
)


def test_worker_crash_is_counted_not_raised(tmp_path, monkeypatch):
    script = tmp_path / "fake_worker.py"
    script.write_text(_FAKE_WORKER)
    monkeypatch.setattr(_math_verifier, "_WORKER_SCRIPT", script)
    with MathVerifier(num_workers=1, timeout_s=5.0) as v:
        completions = ["\\boxed{crash}", "\\boxed{ab}", "\\boxed{err}", "\\boxed{crash}"]
        with pytest.warns(
            VerifierTimeoutWarning,
            match="4 completions, 0 distinct answers hit .* 3 failed in the checker",
        ):
            rewards = v.score(completions, ["x", "ab", "x", "y"])
        assert rewards.tolist() == [0.0, 1.0, 0.0, 0.0]
        assert v.stats.num_errors == 3 and v.stats.num_timeouts == 0
        assert v.stats.num_string_match == 1 and v.stats.num_symbolic == 3


def test_workers_that_never_start_raise_a_clear_error(tmp_path, monkeypatch):
    script = tmp_path / "broken_worker.py"
    script.write_text("import sys\nsys.exit(7)\n")
    monkeypatch.setattr(_math_verifier, "_WORKER_SCRIPT", script)
    with MathVerifier(num_workers=1) as v:
        with pytest.raises(RuntimeError, match=r"failing to start \(exit code 7\)"):
            v.score(["\\boxed{1}"], ["2"])


def test_fixture_references_score_their_own_answers(patient_verifier):
    """Loader and verifier agree: each shipped problem's answer matches its reference."""
    from pathlib import Path

    from erpo_jax.tasks import load_math_file

    data = Path(__file__).resolve().parents[1] / "data"
    problems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tasks.MalformedRowWarning)
        for name in ("math_sample.jsonl", "math500_sample.jsonl", "gsm8k_sample.jsonl"):
            problems += list(load_math_file(data / name))
    completions = [f"Thus the answer is $\\boxed{{{p.answer}}}$." for p in problems]
    references = [p.solution or p.answer for p in problems]
    assert patient_verifier.score(completions, references).tolist() == [1.0] * len(problems)
    # and a wrong answer fails against every one of them
    assert patient_verifier.score(["\\boxed{-7}"] * len(problems), references).sum() == 0.0
