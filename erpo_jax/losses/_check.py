"""Argument checks shared by the loss functions.

Shapes are static under ``jit``, so every check here runs at trace time and
costs nothing in the compiled step. Errors name the function, the argument,
the shape it has and the shape it should have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
GATE_MODES = ("redistribute", "amplify", "none")
CLIP_LEVELS = ("sequence", "token")
PROGRESS_SOURCES = ("old", "current")


def check_choice(fn: str, name: str, value: Any, allowed: Sequence[str]) -> None:
    """Raise a ValueError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(
            f"{fn}: {name}={value!r} is not supported; allowed values: "
            + ", ".join(repr(a) for a in allowed)
        )


def check_bt(fn: str, **arrays: Any) -> tuple[int, int]:
    """Check that every given (non-None) array is rank 2 with one common ``[B, T]`` shape.

    Returns:
      ``(B, T)``.
    """
    shape = None
    first = None
    for name, x in arrays.items():
        if x is None:
            continue
        s = tuple(jnp.shape(x))
        if len(s) != 2:
            raise ValueError(f"{fn}: `{name}` must be [B, T] (rank 2), got shape {s}")
        if shape is None:
            shape, first = s, name
        elif s != shape:
            names = ", ".join(n for n, v in arrays.items() if v is not None)
            raise ValueError(
                f"{fn}: `{name}` has shape {s} but `{first}` has shape {shape}; "
                f"{names} must all share one [B, T] shape"
            )
    assert shape is not None, "check_bt needs at least one array"
    return shape


def check_rows(fn: str, name: str, x: Any, b: int) -> None:
    """Check that ``x`` is a ``[B]`` vector."""
    s = tuple(jnp.shape(x))
    if s != (b,):
        raise ValueError(f"{fn}: `{name}` must have shape [B] = ({b},), got {s}")


def check_rewards(fn: str, rewards: Any, b: int | None = None) -> tuple[int, int]:
    """Check ``rewards`` is ``[P, G]`` with ``G >= 2`` and, if given, ``P * G == B``."""
    s = tuple(jnp.shape(rewards))
    if len(s) != 2:
        raise ValueError(f"{fn}: `rewards` must be [P, G] (rank 2), got shape {s}")
    p, g = s
    if g < 2:
        raise ValueError(
            f"{fn}: `rewards` has shape {s}: group size G={g}, but group-relative "
            "advantages need G >= 2 completions per prompt"
        )
    if b is not None and p * g != b:
        raise ValueError(
            f"{fn}: `rewards` has shape {s} (P*G={p * g}) but the token arrays have "
            f"B={b} rows; rows must be prompt-major with B = P*G"
        )
    return p, g


def concrete_float(x: Any) -> float | None:
    """``float(x)`` when ``x`` is known at trace time, else None.

    Hyperparameters may be Python numbers, NumPy scalars, concrete JAX
    scalars or tracers (a schedule value inside ``jit``). Range checks run on
    the first three and are skipped for a tracer, whose value is unknown
    until the program runs; the arithmetic never converts a hyperparameter
    with ``float``, so a traced value flows through it unchanged.
    """
    if x is None or isinstance(x, jax.core.Tracer):
        return None
    try:
        return float(x)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        return None


def is_static_zero(x: Any) -> bool:
    """True when ``x`` is known at trace time and equal to zero.

    A traced value is never "static zero": its value is unknown at trace
    time, so the code paths that a zero would skip (the KL term, ERPO's
    progress signal) stay in the program and their inputs are required.
    """
    return concrete_float(x) == 0.0
