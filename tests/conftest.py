"""Shared test set-up: deterministic NumPy batches for the loss tests.

Inputs come from ``numpy.random.default_rng`` with fixed seeds, never from
``jax.random``, and expected values come from ``tests/reference.py`` (naive
NumPy loops written from METHOD.md) or from arithmetic written in the test.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import settings

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the whole test session: the xdist
# workers and the tests' subprocesses (which inherit the environment) reuse
# each other's compiled programs instead of compiling the same HLO again.
# Compilation is most of the suite's time (the loss tests' eager calls alone
# compile hundreds of small programs per case), and the cached executable is
# the one a fresh compile would produce, so results do not change. The
# controller creates the directory before the workers start and removes it at
# the end; a developer's own JAX_COMPILATION_CACHE_DIR is used as it is.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="erpo_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")

MASK_KINDS = ("full", "ragged", "empty_rows", "holes")


def make_mask(rng: np.random.Generator, b: int, t: int, kind: str) -> np.ndarray:
    """Right-padded ragged masks, with all-masked rows or interior holes on request."""
    if kind == "full":
        return np.ones((b, t), bool)
    lengths = rng.integers(1, t + 1, size=b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    if kind == "empty_rows":
        mask[rng.permutation(b)[: max(1, b // 3)]] = False
    elif kind == "holes":
        mask &= rng.random((b, t)) > 0.3
    return mask


def make_batch(
    seed: int, p: int, g: int, t: int, mask_kind: str = "ragged", nan_pad: bool = False
) -> dict[str, np.ndarray]:
    """A float32 batch of every loss input; masked entries are NaN/inf if ``nan_pad``."""
    rng = np.random.default_rng(seed)
    b = p * g
    mask = make_mask(rng, b, t, mask_kind)
    logp = rng.normal(-1.5, 0.7, (b, t)).astype(np.float32)
    batch = {
        "logp": logp,
        "old_logp": (logp + rng.normal(0.0, 0.25, (b, t))).astype(np.float32),
        "ref_logp": (logp + rng.normal(0.0, 0.3, (b, t))).astype(np.float32),
        "entropy": rng.gamma(1.5, 0.8, (b, t)).astype(np.float32),
        "residual_norm": rng.gamma(2.0, 0.5, (b, t)).astype(np.float32),
        "adv_tok": rng.normal(0.0, 1.0, (b, t)).astype(np.float32),
        "adv_seq": rng.normal(0.0, 1.0, (b,)).astype(np.float32),
        # Binary rewards with a few all-equal groups, as verifiers produce.
        "rewards": rng.integers(0, 2, (p, g)).astype(np.float32),
        "mask": mask,
    }
    if nan_pad:
        for i, key in enumerate(
            ("logp", "old_logp", "ref_logp", "entropy", "residual_norm", "adv_tok")
        ):
            batch[key] = np.where(mask, batch[key], (np.nan, np.inf, -np.inf)[i % 3]).astype(
                np.float32
            )
    return batch


@pytest.fixture
def batch() -> dict[str, np.ndarray]:
    return make_batch(0, 3, 4, 9)


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
