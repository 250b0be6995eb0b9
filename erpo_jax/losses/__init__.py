"""Pure loss and credit functions: arrays in, ``(loss, aux)`` out.

Nothing here knows about models, samplers or configs, and nothing is jitted at
module level: the caller jits, vmaps, pmaps or shard_maps. Formulas follow
METHOD.md (docs/method.md says which ERPO parts follow the paper and which
are our documented choices).
"""

from erpo_jax.losses._advantages import group_advantages
from erpo_jax.losses._check import (
    AGG_MODES,
    CLIP_LEVELS,
    GATE_MODES,
    KL_ESTIMATORS,
    PROGRESS_SOURCES,
)
from erpo_jax.losses._credit import arca_token_advantages, arca_token_weights, high_entropy_mask
from erpo_jax.losses._erpo import (
    ErpoAux,
    ErpoTerms,
    bucket_ids,
    bucket_normalize,
    entropy_gate,
    erpo_loss,
    erpo_token_advantages,
    erpo_token_terms,
    progress_signal,
    result_anchored_synthesis,
)
from erpo_jax.losses._grpo import grpo_loss
from erpo_jax.losses._holder import (
    HolderAux,
    gspo_loss,
    holder_loss,
    holder_p_schedule,
    log_power_mean,
)
from erpo_jax.losses._policy import (
    PolicyAux,
    aggregate,
    aggregate_parts,
    kl_penalty,
    policy_loss,
    policy_token_loss,
)

__all__ = [
    "AGG_MODES",
    "CLIP_LEVELS",
    "GATE_MODES",
    "KL_ESTIMATORS",
    "PROGRESS_SOURCES",
    "ErpoAux",
    "ErpoTerms",
    "HolderAux",
    "PolicyAux",
    "aggregate",
    "aggregate_parts",
    "arca_token_advantages",
    "arca_token_weights",
    "bucket_ids",
    "bucket_normalize",
    "entropy_gate",
    "erpo_loss",
    "erpo_token_advantages",
    "erpo_token_terms",
    "group_advantages",
    "grpo_loss",
    "gspo_loss",
    "high_entropy_mask",
    "holder_loss",
    "holder_p_schedule",
    "kl_penalty",
    "log_power_mean",
    "policy_loss",
    "policy_token_loss",
    "progress_signal",
    "result_anchored_synthesis",
]
