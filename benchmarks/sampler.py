"""Sampling throughput of ``erpo_jax.sampling.sample`` against ``transformers`` ``generate``.

Both sample the same tiny random Qwen3 (weights made by torch, saved with
``save_pretrained`` and loaded by ``load_hf_checkpoint``), float32, on CPU,
with the same thread count, in the same process: ``B`` prompts of ``S``
tokens, ``T`` new tokens each (no EOS, so every row runs to ``T``),
temperature 1, no truncation, and per-token log-probs and entropies of the
sampling distribution returned. ``transformers`` gets them the usual way:
``generate(..., output_logits=True)`` then a log-softmax over the stacked
logits (timed with the generation). Prints one JSON line per implementation
and a summary line with the speed ratio; the erpo_jax compile time is
reported separately (first call minus a steady-state call).

    python benchmarks/sampler.py --threads 2

Target (issue 4): erpo_jax >= 5x transformers tokens/s on CPU.
"""

from __future__ import annotations

import json
import sys
import time

from _tiny_qwen3 import (
    median_seconds,
    pin_threads,
    tiny_qwen3_pair,
    transformers_sampler,
    workload_parser,
)


def _parse():
    return workload_parser(__doc__.splitlines()[0], batch=16).parse_args()


def main():
    args = _parse()
    # Thread counts must be fixed before either library starts its pools.
    pin_threads(args.threads)
    import jax
    import numpy as np
    import torch

    from erpo_jax.sampling import sample

    hf_config, torch_model, model = tiny_qwen3_pair()
    rng = np.random.default_rng(0)
    b, s, t = args.batch, args.prompt_len, args.new_tokens
    tokens = rng.integers(0, hf_config.vocab_size, (b, s)).astype(np.int32)
    mask = np.ones_like(tokens, bool)

    common = {
        "bench": "sampler",
        "model": "qwen3-tiny(V=4096,D=256,F=768,L=4,H=8,KV=4,tied)",
        "dtype": "float32",
        "batch": b,
        "prompt_len": s,
        "new_tokens": t,
        "temperature": 1.0,
        "threads": args.threads,
        "device": jax.devices()[0].device_kind,
    }
    n_tokens = b * t

    key = jax.random.key(0)

    def ours():
        out = sample(model, tokens, mask, key, max_new_tokens=t, temperature=1.0, eos_ids=())
        return jax.block_until_ready(out)

    t0 = time.perf_counter()
    out = ours()
    first_s = time.perf_counter() - t0
    assert int(out.lengths.min()) == t

    theirs = transformers_sampler(torch_model, tokens, mask, t)

    # Blocks, not alternation: torch's OpenMP workers spin after each call and
    # would steal cores from XLA's pool if the two were interleaved call by call.
    jax_s = median_seconds(ours, args.repeats)
    torch_s = median_seconds(theirs, args.repeats)
    new, _, torch_entropy = theirs()
    assert tuple(new.shape) == (b, t)

    rows = [
        {
            **common,
            "impl": "erpo_jax",
            "seconds": jax_s,
            "tokens_per_s": n_tokens / jax_s,
            "compile_s": first_s - jax_s,
            "mean_entropy": float(np.asarray(out.entropy).mean()),
        },
        {
            **common,
            "impl": f"transformers-{torch.__version__}",
            "attn": torch_model.config._attn_implementation,
            "seconds": torch_s,
            "tokens_per_s": n_tokens / torch_s,
            "mean_entropy": float(torch_entropy.mean()),
        },
        {**common, "impl": "ratio", "speedup_vs_transformers": torch_s / jax_s},
    ]
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
