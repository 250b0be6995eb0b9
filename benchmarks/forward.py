"""Forward-pass throughput of the erpo_jax decoder against ``transformers`` PyTorch.

Both run the same tiny random Qwen3 (the weights are saved by torch and loaded
by ``load_hf_checkpoint``) on the same batch, in float32, on CPU, with the
same thread count, in the same process. Prints one JSON line per
implementation and a summary line with the speed ratio.

    python benchmarks/forward.py --threads 2 --batch 16 --seq 160

Target (issue 3): erpo_jax >= 2x torch tokens/s at batch 16 x 160 on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from _tiny_qwen3 import pin_threads, tiny_qwen3_pair


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=160)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scan-layers", action="store_true")
    return p.parse_args()


def _timed_blocks(fns, repeats, rounds=2):
    """Median seconds of each function over ``rounds`` blocks of ``repeats`` calls.

    Calls are grouped in blocks (A A A B B B A A A ...) rather than alternated:
    torch's OpenMP workers spin for a while after each call and would steal
    the cores from XLA's pool (and back) if the two were interleaved call by call.
    """
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times, strict=True):
            fn()  # warm-up (compilation for JAX, allocator warm-up for torch)
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main():
    args = _parse()
    # Thread counts must be fixed before either library starts its pools.
    pin_threads(args.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    hf_config, torch_model, model = tiny_qwen3_pair(scan_layers=args.scan_layers)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, hf_config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(tokens, bool)

    common = {
        "bench": "forward",
        "model": "qwen3-tiny(V=4096,D=256,F=768,L=4,H=8,KV=4)",
        "dtype": "float32",
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "device": jax.devices()[0].device_kind,
    }
    n_tokens = args.batch * args.seq

    forward = nnx.jit(lambda m, t, k: m(t, k))
    jt, jm = jnp.asarray(tokens), jnp.asarray(mask)
    t0 = time.perf_counter()
    jax.block_until_ready(forward(model, jt, jm))
    compile_s = time.perf_counter() - t0
    tt, tm = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def torch_forward():
        with torch.inference_mode():
            return torch_model(input_ids=tt, attention_mask=tm).logits

    jax_s, torch_s = _timed_blocks(
        [lambda: jax.block_until_ready(forward(model, jt, jm)), torch_forward], args.repeats
    )
    with torch.inference_mode():
        max_diff = float(np.abs(np.asarray(forward(model, jt, jm)) - torch_forward().numpy()).max())

    rows = [
        {
            **common,
            "impl": "erpo_jax",
            "scan_layers": args.scan_layers,
            "seconds": jax_s,
            "tokens_per_s": n_tokens / jax_s,
            "compile_s": compile_s,
        },
        {
            **common,
            "impl": f"transformers-{torch.__version__}",
            "attn": torch_model.config._attn_implementation,
            "seconds": torch_s,
            "tokens_per_s": n_tokens / torch_s,
        },
        {
            **common,
            "impl": "ratio",
            "speedup_vs_torch": torch_s / jax_s,
            "max_abs_logit_diff": max_diff,
        },
    ]
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
