"""Memory and time of attention implementations (``xla`` vs ``chunked``) against sequence length.

One grouped-query attention call, ``value_and_grad`` with respect to q, k
and v (what a training step does per layer), causal, batch 1, at each
``--lengths`` S. Memory is XLA's compile-time temporary buffer size
(``memory_analysis().temp_size_in_bytes``), what the device must hold
beyond inputs and outputs; time is the median wall time of the jitted call
(``--no-run`` skips it: compile only). Prints one JSON line per
(implementation, length).

    python benchmarks/attention.py --lengths 1024 4096 8192

Issue 11's requirement: chunked memory grows at most about linearly in S.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--impls", nargs="+", default=["xla", "chunked"])
    p.add_argument("--heads", type=int, default=8, help="query heads N")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=512, help="keys per chunked block")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-up-to", type=int, default=8192, help="time only S <= this")
    p.add_argument("--no-run", action="store_true", help="compile and report memory only")
    p.add_argument(
        "--no-causal-blocks",
        action="store_true",
        help="chunked without causal_offset: every query block over every key block",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="q, k, v dtype (cudnn needs bfloat16)",
    )
    return p.parse_args()


def main():
    args = _parse()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from erpo_jax.models.attention import attention

    for s in args.lengths:
        rng = np.random.default_rng(0)
        dtype = jnp.dtype(args.dtype)
        q = jnp.asarray(rng.standard_normal((1, s, args.heads, args.head_dim)), dtype)
        k = jnp.asarray(rng.standard_normal((1, args.kv_heads, s, args.head_dim)), dtype)
        v = jnp.asarray(rng.standard_normal((1, args.kv_heads, s, args.head_dim)), dtype)
        q_slots = jnp.arange(s, dtype=jnp.int32)
        kv_mask = jnp.ones((1, s), bool)
        for impl in args.impls:

            def loss(q, k, v, impl=impl, q_slots=q_slots, kv_mask=kv_mask):
                # causal_offset=0: queries at slots arange(S), as the decoder calls
                # it (chunked then skips the key blocks after each query block).
                out = attention(q, k, v, q_slots, kv_mask, impl=impl, block_size=args.block,
                                causal_offset=None if args.no_causal_blocks else 0)  # fmt: skip
                return jnp.sum(jnp.square(out.astype(jnp.float32)))

            fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            t0 = time.perf_counter()
            compiled = fn.lower(q, k, v).compile()
            compile_s = time.perf_counter() - t0
            mem = compiled.memory_analysis()
            row = {
                "impl": impl,
                "seq_len": s,
                "heads": args.heads,
                "kv_heads": args.kv_heads,
                "head_dim": args.head_dim,
                "dtype": args.dtype,
                "causal_blocks": impl == "chunked" and not args.no_causal_blocks,
                "block": args.block if impl == "chunked" else None,
                "temp_mib": mem.temp_size_in_bytes / 2**20,
                "compile_seconds": round(compile_s, 2),
            }
            if not args.no_run and s <= args.time_up_to:
                jax.block_until_ready(compiled(q, k, v))
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(compiled(q, k, v))
                    times.append(time.perf_counter() - t0)
                row["value_and_grad_seconds"] = statistics.median(times)
            row.update(backend=jax.default_backend(), machine=platform.processor() or "cpu")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
