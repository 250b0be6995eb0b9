"""The matmul precision that a compute dtype asks for."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matmul_precision(dtype) -> jax.lax.Precision | None:
    """``HIGHEST`` for float32 compute, else the backend default.

    float32 means float32: GPUs would otherwise run float32 matmuls in TF32
    and TPUs in one bfloat16 pass (about 1e-3 relative error), while
    ``transformers`` (torch keeps TF32 off for matmuls) computes them in full
    float32. Half-precision operands are exact in either mode, so they keep
    the fast default. On CPU both settings are the same computation.
    """
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
