"""The Task protocol: Countdown and math implement it; tasks/ imports nothing above it."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

from erpo_jax.tasks import (
    CountdownProblem,
    CountdownTask,
    MathProblem,
    MathTask,
    Task,
    make_task,
)

PACKAGE = Path(__file__).resolve().parents[2] / "erpo_jax"


def test_countdown_task_members():
    task = CountdownTask()
    problem = CountdownProblem((3, 5, 2), 16)
    assert isinstance(task, Task)
    assert task.prompt(problem, None) == "Numbers: 3 5 2\nTarget: 16\n"
    assert task.reference(problem) == "16"
    assert task.reward("3+5=8\nAnswer: (3+5)*2", problem) == 1.0
    assert task.reward("Answer: 3*5+2", problem) == 0.0  # 17
    assert task.answer("x\nAnswer: ( 3+5 ) * 2") == ("( 3+5 ) * 2", "(3+5)*2")
    assert task.answer("no answer") == (None, None)
    assert task.add_special_tokens(None) is True
    assert task.sandbox_rewards is False


def test_math_task_members():
    task = MathTask(template="plain")
    problem = MathProblem(problem="What is 1/2 + 1/4?", answer="\\frac{3}{4}", source="f:1")
    assert isinstance(task, Task)
    assert task.prompt(problem, None).startswith("What is 1/2 + 1/4?\n")
    assert task.reference(problem) == "\\frac{3}{4}" and task.source(problem) == "f:1"
    assert task.reward("so \\boxed{\\frac{3}{4}}", problem) == 1.0
    assert task.reward("so \\boxed{0.75}", problem) == 1.0  # math-verify equivalence
    assert task.reward("so \\boxed{0.7}", problem) == 0.0
    assert task.reward("no box", problem) == 0.0
    assert task.answer("\\boxed{ 3/4 }")[0] == "3/4"


def test_tasks_pickle_for_worker_processes():
    for task in (CountdownTask(), MathTask(think=True)):
        assert pickle.loads(pickle.dumps(task)) == task


def test_make_task_errors_name_the_option():
    assert make_task("math", template="plain").template == "plain"
    with pytest.raises(ValueError, match=r"unknown task 'chess'; allowed: countdown, math"):
        make_task("chess")
    with pytest.raises(ValueError, match=r"unknown option\(s\) templte; allowed: .*template"):
        make_task("math", templte="plain")


def test_tasks_import_nothing_above_them():
    """DESIGN.md: tasks sit at the bottom; they never import models, sampling, rollout or train."""
    forbidden = (
        "erpo_jax.models",
        "erpo_jax.sampling",
        "erpo_jax.rollout",
        "erpo_jax.train",
        "erpo_jax.losses",
        "erpo_jax.ops",
        "jax",
        "flax",
    )
    for path in (PACKAGE / "tasks").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in forbidden), (
                    f"{path.name} imports {name}"
                )
