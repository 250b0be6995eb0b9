"""Flax NNX decoders for Llama 3, Qwen2/2.5 and Qwen3, HF checkpoint I/O, LoRA.

One :class:`Decoder` covers all families; they differ by
:class:`ModelConfig` fields. ``load_hf_checkpoint(path)`` gives
``(model, config)`` with ``model(tokens, mask) -> logits``;
``model.hidden_states`` and ``model.unembedding()`` feed
``erpo_jax.ops.token_logp_and_entropy``; ``model.prefill`` /
``model.decode_step`` drive a sampler on a fixed-size :class:`KVCache`
(with ``model.decode_consts``, made once outside the decode loop);
``share_kv_prefix`` turns a cache of ``P`` prompts into one for their
``P * G`` continuations that stores and reads each prompt once.
"""

from erpo_jax.models.checkpoint import (
    checkpoint_dir,
    load_hf_checkpoint,
    load_tokenizer,
    param_partition_spec,
    save_hf_checkpoint,
)
from erpo_jax.models.config import PRESETS, SUPPORTED_MODEL_TYPES, ModelConfig, RopeScaling
from erpo_jax.models.decoder import COMPUTE_DTYPES, DecodeConsts, Decoder, positions_from_mask
from erpo_jax.models.eos import END_OF_TURN_TOKENS, resolve_eos_ids
from erpo_jax.models.kv_cache import KVCache, SharedPrefix, init_kv_cache, share_kv_prefix
from erpo_jax.models.lora import LORA_TARGETS, add_lora, merge_lora
from erpo_jax.models.scoring import completion_hidden_states, score_completions

__all__ = [
    "COMPUTE_DTYPES",
    "END_OF_TURN_TOKENS",
    "LORA_TARGETS",
    "PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "DecodeConsts",
    "Decoder",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "SharedPrefix",
    "add_lora",
    "checkpoint_dir",
    "completion_hidden_states",
    "init_kv_cache",
    "load_hf_checkpoint",
    "load_tokenizer",
    "merge_lora",
    "param_partition_spec",
    "positions_from_mask",
    "resolve_eos_ids",
    "save_hf_checkpoint",
    "score_completions",
    "share_kv_prefix",
]
