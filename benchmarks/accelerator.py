"""Decode throughput and train-step MFU on an accelerator, for a Qwen3-0.6B-shaped random model.

Run through ``benchmarks/accelerator.sh`` on a GPU or TPU machine. Prints
JSON lines:

- ``decode``: ``erpo_jax.sampling.sample`` in bfloat16 on ``--rows`` rows
  (``--prompt-len`` prompt tokens, exactly ``--new-tokens`` new tokens each,
  prefix shared per group of ``--group``), new tokens per second, and the
  fraction of the HBM-bandwidth roofline it reaches: each decode step must
  read every parameter once and the whole KV cache written so far, so
  ``roofline_frac = bytes_read_per_second / hbm_bytes_per_second``
  (``bytes_per_step_gb``). ``read_roofline_frac`` counts what the sampler
  actually streams instead (``bytes_read_per_step_gb``): each group's prompt
  once, and each row's slots of the decode phase's cache, written or not.
- ``train_step``: the trainer's jitted update (``make_update_fn``, GRPO loss,
  AdamW, float32 parameters, bfloat16 compute) on ``--train-rows`` rows of
  ``--prompt-len + --new-tokens`` tokens; model FLOPs utilisation with
  ``6 * N * tokens`` plus causal attention ``6 * L * S^2 * N_heads *
  head_dim`` (forward + backward) over the device's dense bf16 peak.

- ``rollout`` (``--bench rollout``, needs torch): the RL rollout against
  ``transformers`` ``generate`` on the same device, the same random weights
  (written by ``save_hf_checkpoint``, read by ``from_pretrained``) and the
  same rows: ``--peer-prompts`` prompts x ``--group`` completions,
  ``--peer-prompt-len`` prompt tokens, exactly ``--peer-new-tokens`` new
  tokens, bfloat16, temperature 1, log-probs and entropies returned.
  ``transformers`` is timed twice: with ``output_logits=True`` and a
  log-softmax for the entropies (what a rollout needs), and tokens only (its
  lower bound). Median of ``--repeats`` calls after a warm-up call. Run it in
  its own process with ``XLA_PYTHON_CLIENT_MEM_FRACTION`` below 0.5 so that
  torch has room (``accelerator.sh`` does).

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
    p.add_argument(
        "--bench",
        choices=("model", "rollout", "decode"),
        default="model",
        help="model: decode and train_step; rollout: against transformers generate; "
        "decode: the decode bench alone",
    )
    p.add_argument(
        "--decode-phases",
        type=int,
        default=None,
        help="sample(decode_phases=N) for the decode bench (default: the sampler's auto rule, "
        "one loop off CPU)",
    )
    p.add_argument("--peer-prompts", type=int, default=8)
    p.add_argument("--peer-prompt-len", type=int, default=128)
    p.add_argument("--peer-new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-decode", action="store_true", help="model bench: train_step only")
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
    if args.bench == "rollout":
        _rollout_vs_transformers(config, args, common)
        return

    # ---------------------------------------------------------------- decode
    if not args.skip_decode:
        _decode(config, args, common, hbm_gbps)
    if args.bench == "decode":
        return
    # ------------------------------------------------------------ train step
    model = Decoder(config, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=True,
                    scan_layers=True, rngs=nnx.Rngs(0))  # fmt: skip
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(0)
    s, t = args.prompt_len, args.new_tokens
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


def _decode(config, args, common, hbm_gbps) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from erpo_jax.models import Decoder
    from erpo_jax.sampling import resolve_decode_phases, sample

    model = Decoder(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(0)
    b, s, t = args.rows, args.prompt_len, args.new_tokens
    prompts = np.repeat(rng.integers(0, config.vocab_size, (b // args.group, s)), args.group, 0)
    mask = np.ones((b, s), bool)
    kw = dict(max_new_tokens=t, eos_ids=(), group_size=args.group, max_length=s + t,
              decode_phases=args.decode_phases)  # fmt: skip
    t0 = time.perf_counter()
    jax.block_until_ready(sample(model, prompts, mask, jax.random.key(0), **kw).tokens)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = sample(model, prompts, mask, jax.random.key(1), **kw)
    jax.block_until_ready(out.tokens)
    seconds = time.perf_counter() - t0
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2  # bf16
    mean_cache = s + t / 2
    bytes_per_step = n_params * 2 + b * mean_cache * kv_per_token
    phases = resolve_decode_phases(args.decode_phases, t)
    read_per_step = n_params * 2 + _cache_slots_read(b, args.group, s, t, phases) * kv_per_token
    row = {**common, "bench": "decode", "rows": b, "prompt_len": s, "new_tokens": t,
           "decode_phases": phases,
           "seconds": seconds, "compile_seconds": first - seconds,
           "tokens_per_second": b * t / seconds,
           "bytes_per_step_gb": bytes_per_step / 1e9,
           "bytes_read_per_step_gb": read_per_step / 1e9}  # fmt: skip
    if hbm_gbps:
        row["roofline_frac"] = bytes_per_step * t / seconds / (hbm_gbps * 1e9)
        row["read_roofline_frac"] = read_per_step * t / seconds / (hbm_gbps * 1e9)
    print(json.dumps(row), flush=True)


def _cache_slots_read(b: int, group: int, s: int, t: int, phases: int) -> float:
    """KV-cache slots the sampler streams per decode step, averaged over its ``t - 1`` steps.

    Each group's ``s`` prompt slots are read once (the shared prefix), and
    each row reads its own slots of the step's phase cache: all ``t - 1``
    with one loop, ``end - 1`` in the phase ending before step ``end``
    (the sampler's own split, ``phase_ends``). ``bytes_per_step_gb`` instead
    counts ``s + t / 2`` slots per row, the cache written so far on average.
    """
    from erpo_jax.sampling._sampler import phase_ends

    steps = range(1, t)
    ends = phase_ends(t, phases)
    own = [next(e - 1 for e in ends if j < e) for j in steps]
    return (b // group) * s + b * sum(own) / max(1, len(own))


def _rollout_vs_transformers(config, args, common) -> None:
    """erpo_jax ``sample`` against ``transformers`` ``generate``: same weights, rows, device."""
    import os
    import statistics
    import sys
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _tiny_qwen3 import transformers_sampler

    from erpo_jax.models import Decoder, load_hf_checkpoint, save_hf_checkpoint
    from erpo_jax.sampling import repeat_for_groups, sample

    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    p, g = args.peer_prompts, args.group
    s, t = args.peer_prompt_len, args.peer_new_tokens
    if args.smoke:
        p, s, t = 2, 8, 8
    with tempfile.TemporaryDirectory() as ckpt:
        init = Decoder(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
        save_hf_checkpoint(init, config, ckpt)
        del init
        model, _ = load_hf_checkpoint(ckpt, dtype=jnp.bfloat16)
        theirs_model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
    theirs_model = theirs_model.to(torch_device).eval()
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, config.vocab_size, (p, s)).astype(np.int32)
    mask = np.ones_like(prompts, bool)
    grouped = repeat_for_groups(prompts, mask, jax.random.key(0), group_size=g)
    row = {**common, "bench": "rollout", "rows": p * g, "group": g, "prompt_len": s,
           "new_tokens": t, "dtype": "bfloat16", "torch_device": torch_device}  # fmt: skip

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return out, first, statistics.median(times)

    def ours():
        out = sample(model, grouped.tokens, grouped.mask, grouped.keys, max_new_tokens=t,
                     temperature=1.0, eos_ids=(), group_size=g)  # fmt: skip
        return jax.block_until_ready(out)

    out, first, seconds = timed(ours)
    assert int(out.lengths.min()) == t
    secs = {"erpo_jax": seconds}
    print(json.dumps({**row, "impl": "erpo_jax", "seconds": seconds, "compile_s": first - seconds,
                      "tokens_per_second": p * g * t / seconds,
                      "mean_entropy": float(np.asarray(out.entropy, np.float32).mean()),
                      "mean_neg_logp": float(-np.asarray(out.logp, np.float32).mean())}),
          flush=True)  # fmt: skip
    for impl, with_logits in (("transformers", True), ("transformers-tokens-only", False)):
        fn = transformers_sampler(theirs_model, prompts, mask, t, num_return_sequences=g,
                                  with_logits=with_logits)  # fmt: skip
        (_, logp, entropy), _, seconds = timed(fn)
        secs[impl] = seconds
        extra = {}
        if with_logits:
            extra = {"mean_entropy": float(entropy.float().mean()),
                     "mean_neg_logp": float(-logp.float().mean())}  # fmt: skip
        print(json.dumps({**row, "impl": impl, "seconds": seconds, "torch": torch.__version__,
                          "transformers": transformers.__version__,
                          "attn": theirs_model.config._attn_implementation,
                          "tokens_per_second": p * g * t / seconds, **extra}),
              flush=True)  # fmt: skip
        if torch_device == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps({**row, "impl": "ratio",
                      "speedup_vs_transformers": secs["transformers"] / secs["erpo_jax"],
                      "speedup_vs_transformers_tokens_only":
                          secs["transformers-tokens-only"] / secs["erpo_jax"]}),
          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
