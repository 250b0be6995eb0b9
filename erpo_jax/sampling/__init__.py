"""KV-cache sampling that returns, with every token, its log-prob and the entropy it was drawn from.

``sample(model, prompt_tokens[B, S], prompt_mask, key, *, max_new_tokens, ...)``
runs one jitted prefill and a jitted ``lax.while_loop`` of decode steps and
returns :class:`SampleOutput` ``(tokens, logp, entropy, mask, lengths,
truncated_entropy)``, all ``[B, T]`` except ``lengths [B]``. ``logp`` and
``entropy`` are those of the temperature-scaled full-vocabulary distribution,
the quantities the trainer recomputes, so ERPO gets its entropies without a
second pass. Top-k / top-p / min-p, greedy decoding, stop ids and stop
strings, group sampling (:func:`repeat_for_groups`) and REFT first-token
diversification (:func:`reft_first_tokens`, ``first_token="reft"``) are built in.

The one-step pieces (:func:`sample_from_logits`, :func:`score_tokens`,
:func:`truncation_mask`) are pure functions of arrays.
"""

from erpo_jax.sampling._groups import GroupedPrompts, reft_first_tokens, repeat_for_groups
from erpo_jax.sampling._hosts import global_rows, local_rows
from erpo_jax.sampling._logits import (
    StepSample,
    full_logp_and_entropy,
    sample_from_logits,
    score_tokens,
    truncation_mask,
)
from erpo_jax.sampling._sampler import (
    AUTO_DECODE_PHASES,
    GATHER_FRACTION,
    SampleOutput,
    bucket_length,
    compiled_cache_sizes,
    gathered_layout,
    resolve_decode_phases,
    sample,
)

__all__ = [
    "AUTO_DECODE_PHASES",
    "GATHER_FRACTION",
    "GroupedPrompts",
    "SampleOutput",
    "StepSample",
    "bucket_length",
    "compiled_cache_sizes",
    "full_logp_and_entropy",
    "gathered_layout",
    "global_rows",
    "local_rows",
    "reft_first_tokens",
    "repeat_for_groups",
    "resolve_decode_phases",
    "sample",
    "sample_from_logits",
    "score_tokens",
    "truncation_mask",
]
