"""Decode phases with and without stop strings: grouped-rollout tokens/s for 1 and N phases.

``sample(..., decode_phases=N)`` decodes in N loops over a KV cache grown
between them, so early steps attend to fewer empty slots. With stop strings
the host checks every ``stop_check_every`` steps split the decode into
chunks, and each chunk runs the phases it overlaps (each phase's loop
compiled once). This measures both against one loop.

Model: the tiny random Qwen3 of ``_tiny_qwen3.py`` built directly in
erpo_jax (``Decoder`` with its own random init; no torch), float32, on CPU.
``P = 16`` prompts of ``S`` random tokens, ``G = 8`` rows each (the
trainer's grouped rollout: each prompt's cache shared by its rows),
exactly ``T`` new tokens per row (no EOS ids, and a stop string that no
token decodes to: every row runs all ``T`` steps, so only the loop's
structure differs), temperature 1.

One JSON line per (``stop_check_every``, ``decode_phases``): ``seconds``
(median of ``--repeats`` calls after a warm-up call; the settings are
timed in alternating rounds so that drift of the machine's speed hits all
alike), ``tokens_per_s``, ``compile_s`` (first call minus the median) and
``tokens_equal`` (the share of tokens equal to one loop's with the same
key: the caches' sizes differ, so float rounding can flip a near-tie draw
and a row then diverges). ``stop_check_every`` 0 is no stop strings.

    python benchmarks/decode_phases.py --threads 2
"""

from __future__ import annotations

import json
import statistics
import time

from _tiny_qwen3 import pin_xla_threads, tiny_qwen3_decoder, workload_parser
from stop_strings import ALPHABET, CharTokenizer

GROUP = 8
NEVER = "z"  # no token decodes to it
assert NEVER not in ALPHABET


def _parse():
    p = workload_parser(__doc__.splitlines()[0], batch=128)
    p.add_argument("--phases", type=int, default=8, help="decode phases to compare with 1")
    p.add_argument("--check-every", default="0,16", help="stop_check_every values (0: none)")
    return p.parse_args()


def main():
    args = _parse()
    pin_xla_threads(args.threads)  # before jax is imported
    import jax
    import numpy as np

    from erpo_jax.sampling import repeat_for_groups, sample

    model = tiny_qwen3_decoder()
    config = model.config
    b, s, t = args.batch, args.prompt_len, args.new_tokens
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.vocab_size, (b // GROUP, s)).astype(np.int32)
    rows = repeat_for_groups(
        prompts, np.ones_like(prompts, bool), jax.random.key(0), group_size=GROUP
    )

    def run(check_every: int, phases: int):
        stops = {} if check_every == 0 else {
            "stop_strings": (NEVER,), "tokenizer": CharTokenizer(), "stop_check_every": check_every
        }  # fmt: skip
        out = sample(model, rows.tokens, rows.mask, rows.keys, max_new_tokens=t, temperature=1.0,
                     eos_ids=(), group_size=GROUP, decode_phases=phases, **stops)  # fmt: skip
        return jax.block_until_ready(out)

    settings = [(int(k), n) for k in args.check_every.split(",") for n in (1, args.phases)]
    first, tokens = {}, {}
    for k, n in settings:
        t0 = time.perf_counter()
        tokens[k, n] = np.asarray(run(k, n).tokens)
        first[k, n] = time.perf_counter() - t0
    times: dict[tuple[int, int], list[float]] = {x: [] for x in settings}
    for _ in range(args.repeats):  # alternating rounds
        for k, n in settings:
            t0 = time.perf_counter()
            run(k, n)
            times[k, n].append(time.perf_counter() - t0)
    for k, n in settings:
        seconds = statistics.median(times[k, n])
        print(json.dumps({
            "bench": "decode_phases",
            "model": "qwen3-tiny(V=4096,D=256,F=768,L=4,H=8,KV=4,tied),random-init",
            "dtype": "float32", "rows": b, "group": GROUP, "prompt_len": s, "new_tokens": t,
            "threads": args.threads, "stop_check_every": k, "decode_phases": n,
            "seconds": seconds, "tokens_per_s": b * t / seconds,
            "compile_s": first[k, n] - seconds,
            "tokens_equal": float((tokens[k, n] == tokens[k, 1]).mean()),
            "jax": jax.__version__,
        }))  # fmt: skip


if __name__ == "__main__":
    main()
