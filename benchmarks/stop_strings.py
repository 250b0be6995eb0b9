"""Stop-string efficiency of ``erpo_jax.sampling.sample``: how close it gets to an ideal loop.

The sampler decodes in a jitted ``lax.while_loop`` that stops at
``stop_at`` or when every row is done; with stop strings it runs chunks of
``stop_check_every`` steps, and between chunks the host decodes the new
tokens (``StopStringMatcher``) and marks the rows that completed a stop
string as done. A row's stop therefore becomes known to the device only at
the end of its chunk: the loop runs on to the chunk's end (at most
``stop_check_every - 1`` wasted steps after the last row stops) and never
further, and every step computes all ``B`` rows (fixed shapes), finished
ones included. This measures what that costs.

Model: the tiny random Qwen3 of ``_tiny_qwen3.py`` built directly in
erpo_jax (``Decoder`` with its own random init; no torch), float32, on CPU.
``B`` prompts of ``S`` random tokens, up to ``T`` new tokens, temperature 1,
no truncation, no EOS ids (``eos_ids=()``).

1. ``baseline``: no stop strings, every row runs all ``T`` steps (one device
   call). ``seconds``, ``s_per_step = seconds / T``; and ``prefill_s``, the
   same call with ``max_new_tokens=1`` (prefill and first token only), from
   which ``decode_s_per_step = (seconds - prefill_s) / (T - 1)``.
2. ``stop``, one line per ``stop_check_every`` in ``--check-every``: a toy
   tokenizer decodes token ``i`` to the character ``"abcdefgh"[i % 8]`` and
   the stop string is ``"h"``, so each sampled token (near-uniform over the
   4096 ids of a random model) stops its row with probability about 1/8 and
   completion lengths are geometric (mean about 8; the longest of 128 rows
   typically 30-45). Fields: ``seconds`` (median of ``--repeats`` calls after
   a warm-up call), ``longest`` (max of ``lengths``, the last row's stop),
   ``mean_length``, ``steps_run`` (completion columns the sampler filled:
   the first from the prefill, the rest from decode-loop iterations),
   ``host_checks``, ``wasted_steps = steps_run - longest`` and
   ``row_step_utilisation = sum(lengths) / (B * steps_run)`` (the share of
   computed row-steps that are kept; the rest are finished rows carried
   along). ``steps_run`` and ``host_checks`` are read, in one extra untimed
   call with the same key, from the loop state each call of the sampler's
   jitted decode loop returns (``_sampler._decode_jit`` is wrapped for that
   call only), and checked against the chunk arithmetic
   ``min(T, 1 + ceil((longest - 1) / k) * k)``: the loop must stop at the
   first host check after the last row's stop, never later.
   Two overhead ratios against an ideal loop that stops exactly when the
   last row stops: ``overhead_vs_ideal = seconds / (s_per_step *
   longest)`` (the prefill spread over all ``T`` steps, so it is charged
   too little to a short run and this ratio reads high), and
   ``overhead_vs_ideal_prefill_apart = seconds / (prefill_s +
   decode_s_per_step * (longest - 1))``. 1.0 is ideal; what is above it is
   the wasted steps of the last chunk plus the host checks (one
   device-to-host copy, one decode per live row, one dispatch per chunk).
3. ``summary``: the ratios by ``stop_check_every``.

The stop-string outputs are checked (assertions): every row's kept tokens
are a prefix of the row (mask contiguous, padding after), its text ends
with the first ``"h"`` it contains or it runs to ``T`` without one, and the
kept tokens equal the baseline's first tokens of the row (a row's draws do
not depend on stop strings).

    python benchmarks/stop_strings.py --threads 2

Issue 11: the loop does not run on to the end of a host-check chunk once
every row is done, and finished rows cost as little as the design allows.
"""

from __future__ import annotations

import json
import math
import sys

from _tiny_qwen3 import median_seconds, pin_xla_threads, tiny_qwen3_decoder, workload_parser

ALPHABET = "abcdefgh"
STOP = "h"


class CharTokenizer:
    """Token ``i`` decodes to ``ALPHABET[i % len(ALPHABET)]``: one character per token."""

    def decode(self, ids: list[int]) -> str:
        return "".join(ALPHABET[i % len(ALPHABET)] for i in ids)


def _parse():
    p = workload_parser(__doc__.splitlines()[0], batch=128)
    p.add_argument("--check-every", default="1,4,16,64", help="comma-separated stop_check_every")
    return p.parse_args()


def main():
    args = _parse()
    pin_xla_threads(args.threads)  # before jax is imported
    import jax
    import numpy as np

    from erpo_jax.sampling import _sampler, sample

    model = tiny_qwen3_decoder()
    config = model.config
    b, s, t = args.batch, args.prompt_len, args.new_tokens
    check_every = [int(k) for k in args.check_every.split(",") if k.strip()]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (b, s)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    key = jax.random.key(0)
    tokenizer = CharTokenizer()
    pad_id = 0

    common = {
        "bench": "stop_strings",
        "model": "qwen3-tiny(V=4096,D=256,F=768,L=4,H=8,KV=4,tied),random-init",
        "dtype": "float32",
        "batch": b,
        "prompt_len": s,
        "new_tokens": t,
        "temperature": 1.0,
        "threads": args.threads,
        "device": jax.devices()[0].device_kind,
    }

    def run(max_new_tokens=t, **kw):
        out = sample(
            model,
            tokens,
            mask,
            key,
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            eos_ids=(),
            pad_id=pad_id,
            **kw,
        )
        return jax.block_until_ready(out)

    # 1. Baseline: every row runs all T steps.
    base = run()
    assert int(np.asarray(base.lengths).min()) == t
    base_s = median_seconds(run, args.repeats)
    prefill_s = median_seconds(lambda: run(max_new_tokens=1), args.repeats)
    s_per_step = base_s / t
    decode_s_per_step = (base_s - prefill_s) / max(t - 1, 1)
    base_tokens = np.asarray(base.tokens)
    print(
        json.dumps(
            {
                **common,
                "case": "baseline",
                "seconds": base_s,
                "s_per_step": s_per_step,
                "prefill_s": prefill_s,
                "decode_s_per_step": decode_s_per_step,
            }
        ),
        flush=True,
    )

    # 2. Stop strings, one line per stop_check_every.
    summary = {}
    for k in check_every:

        def stopped(k=k):
            return run(stop_strings=(STOP,), tokenizer=tokenizer, stop_check_every=k)

        # One untimed call with the decode loop wrapped: the step each chunk reached.
        real_decode = _sampler._decode_jit
        reached: list[int] = []

        def counting(*a, _real=real_decode, _reached=reached, **kw):
            state = _real(*a, **kw)
            _reached.append(int(state.step))
            return state

        _sampler._decode_jit = counting
        try:
            out = stopped()
        finally:
            _sampler._decode_jit = real_decode
        steps_run = reached[-1] if reached else 1  # the prefill fills column 0
        host_checks = len(reached) + 1  # one after the prefill, one after each chunk

        lengths = np.asarray(out.lengths)
        out_tokens = np.asarray(out.tokens)
        out_mask = np.asarray(out.mask)
        for row in range(b):
            n = int(lengths[row])
            assert n >= 1 and out_mask[row, :n].all() and not out_mask[row, n:].any(), row
            assert (out_tokens[row, n:] == pad_id).all(), row
            assert (out_tokens[row, :n] == base_tokens[row, :n]).all(), row
            text = tokenizer.decode(out_tokens[row, :n].tolist())
            if text.endswith(STOP):
                assert STOP not in text[:-1], (row, text)  # ends at the first stop
            else:
                assert n == t and STOP not in text, (row, text)
        longest = int(lengths.max())
        expected = min(t, 1 + math.ceil((longest - 1) / k) * k)
        assert steps_run == expected, (k, steps_run, expected, reached)

        seconds = median_seconds(stopped, args.repeats)
        ideal = s_per_step * longest
        ideal_apart = prefill_s + decode_s_per_step * (longest - 1)
        row = {
            **common,
            "case": "stop",
            "stop_check_every": k,
            "seconds": seconds,
            "longest": longest,
            "mean_length": float(lengths.mean()),
            "rows_stopped": int(
                sum(
                    tokenizer.decode(out_tokens[r, : lengths[r]].tolist()).endswith(STOP)
                    for r in range(b)
                )
            ),
            "steps_run": steps_run,
            "host_checks": host_checks,
            "wasted_steps": steps_run - longest,
            "row_step_utilisation": float(lengths.sum()) / (b * steps_run),
            "ideal_s": ideal,
            "overhead_vs_ideal": seconds / ideal,
            "ideal_prefill_apart_s": ideal_apart,
            "overhead_vs_ideal_prefill_apart": seconds / ideal_apart,
            "speedup_vs_baseline": base_s / seconds,
        }
        summary[k] = row
        print(json.dumps(row), flush=True)

    # 3. Summary.
    print(
        json.dumps(
            {
                **common,
                "case": "summary",
                "baseline_s": base_s,
                "by_check_every": {
                    str(k): {
                        "seconds": r["seconds"],
                        "longest": r["longest"],
                        "wasted_steps": r["wasted_steps"],
                        "overhead_vs_ideal": round(r["overhead_vs_ideal"], 3),
                        "overhead_vs_ideal_prefill_apart": round(
                            r["overhead_vs_ideal_prefill_apart"], 3
                        ),
                    }
                    for k, r in summary.items()
                },
                "best_check_every": min(summary, key=lambda k: summary[k]["seconds"])
                if summary
                else None,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
