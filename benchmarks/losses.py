"""Loss + gradient wall time of GRPO and ERPO (jitted, after warm-up).

Prints one JSON line per case, then one line per shape with the ERPO/GRPO
ratio. Not a test: numbers depend on the machine; docs/benchmarks.md records
the ones measured, with the machine.

    python benchmarks/losses.py                       # B in {64, 256}, T in {512, 2048}
    python benchmarks/losses.py --batch 64 --length 512 --repeats 5
    PYTHONPATH=/tmp/erpo_old python benchmarks/losses.py   # another checkout's erpo_jax

The last form times an older commit (``git worktree add /tmp/erpo_old
<commit>``) with this script; every JSON line records which ``erpo_jax`` was
imported (``erpo_jax`` field). Cases the older code lacks are skipped.

Cases: ``grpo`` / ``erpo`` are the end-to-end ``grpo_loss`` / ``erpo_loss``
under ``value_and_grad`` (advantages computed inside); ``+aux`` also returns
the diagnostics; ``erpo_advantages_once`` + ``erpo_policy_step`` is how the
train step runs ERPO (advantages once per batch, then the differentiated
policy loss on them); ``erpo_terms_once`` returns every per-token term
(``erpo_token_terms``) instead of the advantage alone.

ERPO here runs everything the paper's method needs inside the step: the
entropy gate, the bucket normalization of the progress signal (eta > 0, so
``ref_logp`` is used), the synthesis and the clipped surrogate with a KL
term; GRPO gets the same KL term, so the ratio measures ERPO's extra work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from erpo_jax import losses as L


def _batch(b: int, t: int, g: int, seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(t // 4, t + 1, size=b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    logp = rng.normal(-1.5, 0.7, (b, t)).astype(np.float32)
    data = {
        "logp": logp,
        "old_logp": (logp + rng.normal(0, 0.1, (b, t))).astype(np.float32),
        "ref_logp": (logp + rng.normal(0, 0.2, (b, t))).astype(np.float32),
        "entropy": rng.gamma(1.5, 0.8, (b, t)).astype(np.float32),
        "rewards": rng.integers(0, 2, (b // g, g)).astype(np.float32),
        "mask": mask,
    }
    return {k: jnp.asarray(v) for k, v in data.items()}


def _steps(agg: str):
    def grpo(logp, x):
        return L.grpo_loss(logp, x["old_logp"], x["rewards"], x["mask"], ref_logp=x["ref_logp"],
                           kl_coef=0.01, agg=agg)  # fmt: skip

    def erpo(logp, x):
        return L.erpo_loss(logp, x["old_logp"], x["rewards"], x["entropy"], x["mask"],
                           ref_logp=x["ref_logp"], kl_coef=0.01, agg=agg)  # fmt: skip

    steps = {}
    for name, fn in (("grpo", grpo), ("erpo", erpo)):
        # "loss+grad": what a train step differentiates; the diagnostics in
        # aux are dead code here and XLA drops them. "+aux" also returns
        # them (ERPO's entropy p90 is an exact sort of all valid entropies).
        steps[name] = jax.jit(jax.value_and_grad(lambda lp, x, fn=fn: fn(lp, x)[0]))
        steps[name + "+aux"] = jax.jit(jax.value_and_grad(fn, has_aux=True))

    # The train-step path: token advantages need no parameters, so a train
    # step computes them once per rollout batch and differentiates only the
    # policy loss (per micro-batch, per PPO epoch); the same holds for GRPO.
    def erpo_advantages(_, x):
        return L.erpo_token_advantages(x["rewards"], x["entropy"], x["mask"],
                                       old_logp=x["old_logp"], ref_logp=x["ref_logp"])  # fmt: skip

    def erpo_policy(logp, x):
        return L.policy_loss(logp, x["old_logp"], x["adv_tok"], x["mask"], ref_logp=x["ref_logp"],
                             kl_coef=0.01, agg=agg)[0]  # fmt: skip

    steps["erpo_advantages_once"] = jax.jit(erpo_advantages)
    steps["erpo_policy_step"] = jax.jit(jax.value_and_grad(erpo_policy))
    if hasattr(L, "erpo_token_terms"):  # absent before issue 8

        def erpo_terms(_, x):
            return L.erpo_token_terms(x["rewards"], x["entropy"], x["mask"],
                                      old_logp=x["old_logp"], ref_logp=x["ref_logp"])  # fmt: skip

        steps["erpo_terms_once"] = jax.jit(erpo_terms)
    return steps


def _time(fn, logp, x, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(logp, x))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(logp, x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="B = P*G rows")
    parser.add_argument("--length", type=int, nargs="+", default=[512, 2048], help="T tokens")
    parser.add_argument("--group", type=int, default=8, help="G completions per prompt")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per case (median)")
    parser.add_argument("--agg", default="token_mean", choices=L.AGG_MODES)
    args = parser.parse_args()

    machine = {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "erpo_jax": os.path.dirname(os.path.dirname(os.path.abspath(L.__file__))),
    }
    steps = _steps(args.agg)
    for b in args.batch:
        for t in args.length:
            x = _batch(b, t, args.group)
            x["adv_tok"] = steps["erpo_advantages_once"](x["logp"], x)
            med = {}
            for name, fn in steps.items():
                med[name], compile_s = _time(fn, x["logp"], x, args.repeats)
                print(json.dumps({
                    "bench": "loss_and_grad", "loss": name, "B": b, "T": t, "G": args.group,
                    "agg": args.agg, "median_ms": round(med[name] * 1e3, 3),
                    "compile_s": round(compile_s, 3), "repeats": args.repeats, **machine,
                }), flush=True)  # fmt: skip
            print(json.dumps({
                "bench": "loss_and_grad_ratio", "B": b, "T": t,
                "erpo_over_grpo": round(med["erpo"] / med["grpo"], 3),
                "with_aux_erpo_over_grpo": round(med["erpo+aux"] / med["grpo+aux"], 3),
                "policy_step_erpo_over_grpo": round(med["erpo_policy_step"] / med["grpo"], 3),
            }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
