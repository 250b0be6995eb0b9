"""Peer set-up shared by forward.py and sampler.py: thread pools, one tiny Qwen3 in both."""

from __future__ import annotations

import os
import tempfile
from typing import Any

# vocab 4096, hidden 256, intermediate 768, 4 layers, 8 heads, 4 KV heads, head_dim 32, tied.
TINY_QWEN3 = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    tie_word_embeddings=True,
)


def pin_threads(threads: int) -> None:
    """Fix XLA's and torch's thread counts; call before jax or torch is imported."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
        + f" intra_op_parallelism_threads={threads}"
    )
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)


def tiny_qwen3_pair(**load_kw: Any) -> tuple[Any, Any, Any]:
    """``(hf_config, torch_model, our_model)`` with the same random weights.

    The torch model is written with ``save_pretrained`` and read back by
    ``erpo_jax.models.load_hf_checkpoint(**load_kw)``.
    """
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from erpo_jax.models import load_hf_checkpoint

    hf_config = Qwen3Config(**TINY_QWEN3)
    torch_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as path:
        torch_model.save_pretrained(path)
        model, _ = load_hf_checkpoint(path, **load_kw)
    return hf_config, torch_model, model
