"""Numerics shared by several erpo_jax packages.

Masked statistics (``masked_sum``, ``masked_mean``, ``masked_group_moments``)
select with ``jnp.where`` so that NaN or inf in masked positions never leak
into a value or a gradient.
"""

from erpo_jax.ops._logp_entropy import AUTO_LOGITS_BYTES, auto_chunk_size, token_logp_and_entropy
from erpo_jax.ops._masked import (
    inverse_spread,
    masked_group_moments,
    masked_mean,
    masked_quantile,
    masked_sum,
    zscore,
)
from erpo_jax.ops._precision import matmul_precision

__all__ = [
    "AUTO_LOGITS_BYTES",
    "auto_chunk_size",
    "inverse_spread",
    "masked_group_moments",
    "masked_mean",
    "masked_quantile",
    "masked_sum",
    "matmul_precision",
    "token_logp_and_entropy",
    "zscore",
]
