"""Peer set-up shared by the benchmarks: thread pools, one tiny Qwen3 in both, timing."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
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


def tiny_qwen3_decoder() -> Any:
    """The tiny Qwen3 built directly in erpo_jax, with its own random init (no torch).

    Imports jax: call it after :func:`pin_xla_threads`.
    """
    from flax import nnx

    from erpo_jax.models import Decoder, ModelConfig

    config = ModelConfig.from_hf({"model_type": "qwen3", **TINY_QWEN3})
    return Decoder(config, rngs=nnx.Rngs(0))


def workload_parser(description: str, *, batch: int | None = None) -> argparse.ArgumentParser:
    """The flags of the rollout workload the sampling benchmarks share.

    ``--threads`` (2), ``--batch`` (rows, when ``batch`` is given),
    ``--prompt-len`` (32), ``--new-tokens`` (128), ``--repeats`` (3); a
    benchmark adds its own flags to the returned parser.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=2)
    if batch is not None:
        p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    return p


def pin_xla_threads(threads: int) -> None:
    """Fix XLA's thread count (CPU platform); call before jax is imported.

    XLA:CPU has no flag for its thread-pool size: it sizes the pool by the
    CPUs this process may run on. So with fewer ``threads`` than available
    CPUs the process is pinned to the first ``threads`` of them (Linux
    ``sched_setaffinity``; elsewhere only Eigen's multithreading follows).
    """
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
    )
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if 0 < threads < len(cpus):
            os.sched_setaffinity(0, cpus[:threads])


def pin_threads(threads: int) -> None:
    """Fix XLA's and torch's thread counts; call before jax or torch is imported."""
    pin_xla_threads(threads)
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)


def tiny_qwen3_pair(save_dir: str | None = None, **load_kw: Any) -> tuple[Any, Any, Any]:
    """``(hf_config, torch_model, our_model)`` with the same random weights.

    The torch model is written with ``save_pretrained`` (to ``save_dir``,
    which is kept for other loaders, or else to a temporary directory) and
    read back by ``erpo_jax.models.load_hf_checkpoint(**load_kw)``.
    """
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from erpo_jax.models import load_hf_checkpoint

    hf_config = Qwen3Config(**TINY_QWEN3)
    torch_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    if save_dir is not None:
        torch_model.save_pretrained(save_dir)
        model, _ = load_hf_checkpoint(save_dir, **load_kw)
        return hf_config, torch_model, model
    with tempfile.TemporaryDirectory() as path:
        torch_model.save_pretrained(path)
        model, _ = load_hf_checkpoint(path, **load_kw)
    return hf_config, torch_model, model


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``, after one untimed warm-up call."""
    fn()  # warm-up (allocator, thread pools)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def transformers_sampler(
    torch_model: Any,
    tokens: Any,
    mask: Any,
    new_tokens: int,
    num_return_sequences: int = 1,
    *,
    with_logits: bool = True,
) -> Callable[[], tuple[Any, Any, Any]]:
    """A call of ``generate`` that returns ``(new_tokens, logp, entropy)``, each ``[B, T]``.

    ``B = len(tokens) * num_return_sequences``, rows prompt-major. Temperature
    1, no truncation, no EOS (every row runs to ``new_tokens``); log-probs and
    entropies of the sampling distribution come the usual way,
    ``output_logits=True`` then a log-softmax over the stacked logits, inside
    the call so they are timed with the generation. ``with_logits=False``
    times the tokens alone (``logp`` and ``entropy`` are then ``None``). The
    inputs go to the model's device; on CUDA the call waits for the device.
    """
    import torch

    device = next(torch_model.parameters()).device
    input_ids = torch.tensor(tokens, dtype=torch.long, device=device)
    attention_mask = torch.tensor(mask, dtype=torch.long, device=device)
    s = input_ids.shape[1]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def generate():
        with torch.inference_mode():
            gen = torch_model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                num_return_sequences=num_return_sequences,
                output_logits=with_logits,
                return_dict_in_generate=True,
                pad_token_id=0,
                eos_token_id=None,
            )
            if not with_logits:
                sync()
                return gen.sequences[:, s:], None, None
            logits = torch.stack(gen.logits, dim=1).float()  # [B, T, V]
            logq = torch.log_softmax(logits, dim=-1)
            new = gen.sequences[:, s:]
            logp = logq.gather(-1, new[..., None])[..., 0]
            entropy = -(logq.exp() * logq).sum(-1)
            sync()
            return new, logp, entropy

    return generate
