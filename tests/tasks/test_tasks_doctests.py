"""The examples in the erpo_jax.tasks docstrings run and hold."""

from __future__ import annotations

import doctest

import pytest

from erpo_jax.tasks import _countdown, _math_verifier, _metrics


@pytest.mark.parametrize("module", [_countdown, _math_verifier, _metrics])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_public_names_are_exported_and_documented():
    from erpo_jax import tasks

    for name in tasks.__all__:
        obj = getattr(tasks, name)
        if callable(obj):
            assert obj.__doc__, f"erpo_jax.tasks.{name} has no docstring"
    assert {"math_reward", "countdown_reward", "pass_at_k"} <= set(tasks.__all__)
