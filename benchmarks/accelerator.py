"""Decode throughput and train-step MFU on an accelerator, for a Qwen3-0.6B-shaped random model.

Run through ``benchmarks/accelerator.sh`` on a GPU or TPU machine. Prints
JSON lines:

- ``decode``: ``erpo_jax.sampling.sample`` in bfloat16 on ``--rows`` rows
  (``--prompt-len`` prompt tokens, exactly ``--new-tokens`` new tokens each,
  prefix shared per group of ``--group``), new tokens per second, and the
  fraction of the HBM-bandwidth roofline it reaches: each decode step must
  read every parameter once and the whole KV cache written so far, so
  ``roofline_frac = bytes_read_per_second / hbm_bytes_per_second``.
- ``train_step``: the trainer's jitted update (``make_update_fn``, GRPO loss,
  AdamW, float32 parameters, bfloat16 compute) on ``--train-rows`` rows of
  ``--prompt-len + --new-tokens`` tokens; model FLOPs utilisation with
  ``6 * N * tokens`` plus causal attention ``6 * L * S^2 * N_heads *
  head_dim`` (forward + backward) over the device's dense bf16 peak.

Peaks come from the table below by ``device_kind`` or from
``--peak-tflops`` / ``--hbm-gbps``. ``--smoke`` runs tiny shapes anywhere
(CPU included) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import time

# device_kind substring -> (dense bf16 TFLOP/s, HBM GB/s), vendors' data sheets.
PEAKS = {
    "H200": (989.0, 4800.0),
    "H100": (989.0, 3350.0),
    "A100": (312.0, 2039.0),
    "L4": (121.0, 300.0),
    "TPU v5 lite": (197.0, 819.0),
    "TPU v5e": (197.0, 819.0),
    "TPU v5p": (459.0, 2765.0),
    "TPU v4": (275.0, 1228.0),
    "TPU v6": (918.0, 1640.0),
}


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--rows", type=int, default=256, help="decode rows B = P * G")
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--train-rows", type=int, default=32)
    p.add_argument("--micro-batches", type=int, default=4, help="must divide train-rows / group")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--hbm-gbps", type=float, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, any backend")
    return p.parse_args()


def _peaks(kind: str, args) -> tuple[float | None, float | None]:
    flops, hbm = next((v for k, v in PEAKS.items() if k.lower() in kind.lower()), (None, None))
    return args.peak_tflops or flops, args.hbm_gbps or hbm


def main() -> None:
    args = _parse()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from erpo_jax.models import Decoder, ModelConfig
    from erpo_jax.sampling import sample
    from erpo_jax.train import (
        LossConfig,
        OptimizerConfig,
        make_loss_fn,
        make_optimizer,
        make_update_fn,
        split_policy,
    )

    config = ModelConfig.preset(args.preset)
    if args.smoke:
        config = ModelConfig("qwen3", 512, 64, 128, 2, 4, 2, 16, qk_norm=True)
        args.rows, args.prompt_len, args.new_tokens, args.train_rows = 16, 16, 16, 16
        args.micro_batches = 2
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    peak_tflops, hbm_gbps = _peaks(kind, args)
    common = {"device": kind, "backend": jax.default_backend(),
              "preset": "tiny (smoke)" if args.smoke else args.preset,
              "smoke": args.smoke, "jax": jax.__version__}  # fmt: skip

    # ---------------------------------------------------------------- decode
    model = Decoder(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(0)
    b, s, t = args.rows, args.prompt_len, args.new_tokens
    prompts = np.repeat(rng.integers(0, config.vocab_size, (b // args.group, s)), args.group, 0)
    mask = np.ones((b, s), bool)
    kw = dict(max_new_tokens=t, eos_ids=(), group_size=args.group, max_length=s + t)
    jax.block_until_ready(sample(model, prompts, mask, jax.random.key(0), **kw).tokens)
    t0 = time.perf_counter()
    out = sample(model, prompts, mask, jax.random.key(1), **kw)
    jax.block_until_ready(out.tokens)
    seconds = time.perf_counter() - t0
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2  # bf16
    mean_cache = s + t / 2
    bytes_per_step = n_params * 2 + b * mean_cache * kv_per_token
    row = {**common, "bench": "decode", "rows": b, "prompt_len": s, "new_tokens": t,
           "seconds": seconds, "tokens_per_second": b * t / seconds,
           "bytes_per_step_gb": bytes_per_step / 1e9}  # fmt: skip
    if hbm_gbps:
        row["roofline_frac"] = bytes_per_step * t / seconds / (hbm_gbps * 1e9)
    print(json.dumps(row), flush=True)
    del model, out

    # ------------------------------------------------------------ train step
    model = Decoder(config, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=True,
                    scan_layers=True, rngs=nnx.Rngs(0))  # fmt: skip
    graphdef, trainable, frozen = split_policy(model, lora=False)
    cfg = LossConfig(name="grpo", kl_coef=0.0)
    tx, schedule = make_optimizer(OptimizerConfig(learning_rate=1e-6), 10, trainable)
    loss_fn = make_loss_fn(cfg, max_len=t, total_steps=10)
    update = make_update_fn(graphdef, tx, schedule, loss_fn, cfg,
                            micro_batches=args.micro_batches, max_len=t, temperature=1.0,
                            chunk_size=256, vocab_chunk_size=8192, arca=False)  # fmt: skip
    state = {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.int32(0)}
    r = args.train_rows
    batch = {
        "prompt_tokens": jnp.asarray(rng.integers(0, config.vocab_size, (r, s)), jnp.int32),
        "prompt_mask": jnp.ones((r, s), bool),
        "tokens": jnp.asarray(rng.integers(0, config.vocab_size, (r, t)), jnp.int32),
        "mask": jnp.ones((r, t), bool),
        "old_logp": jnp.full((r, t), -3.0, jnp.float32),
        "entropy": jnp.ones((r, t), jnp.float32),
        "rewards": jnp.asarray(rng.random((r // args.group, args.group)), jnp.float32),
    }
    state, metrics = update(state, frozen, batch)
    jax.block_until_ready(metrics["loss"])
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        state, metrics = update(state, frozen, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    step = sorted(times)[1]
    seq = s + t
    dense = n_params - config.vocab_size * config.hidden_size * (
        1 if config.tie_word_embeddings else 2
    )
    flops = 6 * dense * r * seq + 6 * config.vocab_size * config.hidden_size * r * t
    flops += 6 * config.num_layers * r * seq * seq * config.num_heads * config.head_dim
    row = {**common, "bench": "train_step", "rows": r, "seq_len": seq, "seconds": step,
           "tflops": flops / step / 1e12, "loss": float(metrics["loss"])}  # fmt: skip
    if peak_tflops:
        row["mfu"] = flops / step / (peak_tflops * 1e12)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
