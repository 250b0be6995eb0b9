"""Peak memory and time of the chunked vs unchunked log-prob + entropy head.

``token_logp_and_entropy`` at Qwen's vocabulary (V = 151,936) on 4,096
tokens, forward and forward+backward (``value_and_grad`` to hidden and
unembedding, as the trainer uses it). Peak memory is XLA's compile-time
buffer assignment for the whole program (``memory_analysis()``: temporaries
plus outputs plus arguments), which is what the device must hold; time is
the median wall time of the jitted call. Prints one JSON line per
configuration.

    python benchmarks/logp_entropy_memory.py --tokens 4096 --vocab 151936 --width 256

Target (issue 3): chunked peak <= 1/8 of unchunked at <= 1.3x its time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--width", type=int, default=256, help="D, the hidden size")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument(
        "--vocab-chunk-sizes",
        type=int,
        nargs="*",
        default=[8192],
        help="vocabulary tiles, each run with the smallest --chunk-sizes value",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["forward", "value_and_grad"])
    p.add_argument(
        "--no-run", action="store_true", help="only compile and report memory (no timing)"
    )
    return p.parse_args()


def main():
    args = _parse()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from erpo_jax.ops import token_logp_and_entropy

    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((1, args.tokens, args.width)), jnp.float32)
    unembed = jnp.asarray(rng.standard_normal((args.width, args.vocab)) * 0.05, jnp.float32)
    tokens = jnp.asarray(rng.integers(0, args.vocab, (1, args.tokens)), jnp.int32)

    def make(mode, chunk_size, vocab_chunk_size):
        def head(h, w):
            logp, entropy = token_logp_and_entropy(
                h, w, tokens, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size
            )
            return jnp.sum(logp) + jnp.sum(entropy)

        if mode == "forward":
            return jax.jit(head)
        return jax.jit(jax.value_and_grad(head, argnums=(0, 1)))

    results = {}
    for mode in args.modes:
        cases = [(None, None)] + [(c, None) for c in args.chunk_sizes]
        cases += [(min(args.chunk_sizes), v) for v in args.vocab_chunk_sizes]
        for chunk_size, vocab_chunk_size in cases:
            fn = make(mode, chunk_size, vocab_chunk_size)
            t0 = time.perf_counter()
            compiled = fn.lower(hidden, unembed).compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            peak = (
                mem.temp_size_in_bytes
                + mem.output_size_in_bytes
                + mem.argument_size_in_bytes
                - mem.alias_size_in_bytes
            )
            row = {
                "bench": "logp_entropy_memory",
                "mode": mode,
                "chunk_size": chunk_size,
                "vocab_chunk_size": vocab_chunk_size,
                "tokens": args.tokens,
                "vocab": args.vocab,
                "width": args.width,
                "device": jax.devices()[0].device_kind,
                "peak_bytes": int(peak),
                "temp_bytes": int(mem.temp_size_in_bytes),
                "compile_s": compile_s,
            }
            if not args.no_run:
                jax.block_until_ready(compiled(hidden, unembed))
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(compiled(hidden, unembed))
                    times.append(time.perf_counter() - t0)
                row["seconds"] = statistics.median(times)
            del compiled
            base = results.get((mode, None))
            if base is not None:
                row["peak_ratio_vs_unchunked"] = row["peak_bytes"] / base["peak_bytes"]
                if "seconds" in row:
                    row["time_ratio_vs_unchunked"] = row["seconds"] / base["seconds"]
            results[
                (mode, chunk_size)
                if vocab_chunk_size is None
                else (mode, chunk_size, vocab_chunk_size)
            ] = row
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
