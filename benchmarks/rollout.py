"""Grouped rollout throughput: erpo_jax ``sample`` against Tunix's ``Sampler`` and ``generate``.

The rollout of one RL step: ``P`` prompts of ``S`` tokens, ``G`` completions
per prompt (``P * G`` rows, prompt-major), ``T`` new tokens each (no EOS, so
every row runs to ``T``), temperature 1, no truncation, per-token log-probs
and entropies of the sampling distribution returned. All implementations
sample the same tiny random Qwen3 of ``_tiny_qwen3.py`` (weights made by
torch, saved with ``save_pretrained`` and loaded from that directory by
erpo_jax and by Tunix), float32, on CPU, with the same thread count:

1. ``erpo_jax`` ``sample(..., group_size=G)`` with its defaults: each prompt
   is prefilled once and its KV cache shared by its ``G`` rows, and the
   decode loop runs in ``decode_phases`` parts by the sampler's auto rule
   (8 on CPU from 128 new tokens; the row's ``decode_phases`` field);
2. ``erpo_jax-no-prefix-sharing``: the same call with ``share_prefix=False``
   (all ``P * G`` rows prefilled; same outputs), to show what sharing gains;
   ``erpo_jax-decode-phases-N`` (``--decode-phases N``, default 1, the one
   loop over the whole cache; 0 skips it): the same call with
   ``decode_phases=N`` (same outputs to float rounding);
3. ``transformers`` ``generate(..., num_return_sequences=G,
   output_logits=True)`` plus a log-softmax over the stacked logits for the
   entropies (timed with the generation);
4. Tunix's ``Sampler`` (``tunix.generate.sampler``, ``google-tunix`` on PyPI)
   with Tunix's own Qwen3 (``tunix.models.qwen3``, loaded from the same
   safetensors), on the same ``P * G`` rows (it has no group option). Its
   ``Sampler`` takes strings, so a tokenizer that maps space-separated ids
   to ids stands in; its per-call host work (tokenizing, decoding, one list
   per row) is part of what is timed. It returns per-token log-probs
   (``return_logprobs``) but no entropies, so it is measured twice:
   ``tunix`` returns the logits as well (``return_logits``) and the entropies
   are a log-softmax over them (as for ``transformers``); ``tunix-logprobs``
   returns the log-probs only (no entropies; field ``entropy``).

Tunix pins ``safetensors<0.8``, so installing it next to erpo_jax would
downgrade ``transformers`` (5.24.0 to 5.12.1 at the time of writing); it
runs in its own environment, given by ``--tunix-python`` (by
default ``.venv-tunix/bin/python`` when it exists), as a subprocess of this
script that loads the same checkpoint. If it cannot run, its line says
``skipped`` with the reason. Set it up with::

    python -m venv .venv-tunix
    .venv-tunix/bin/pip install google-tunix==0.1.7 jax==0.10.2 jaxlib==0.10.2 flax==0.12.8

Prints one JSON line per implementation (``impl``, ``rows``,
``new_tokens``, ``seconds`` = median of ``--repeats`` calls after a warm-up
call, ``tokens_per_s`` = rows * new tokens / seconds, ``compile_s`` = first
call minus a steady-state call for the jitted ones, ``mean_entropy`` and
``mean_neg_logp`` to sanity-compare the outputs) and a summary line with the
speed ratios.

    python benchmarks/rollout.py --threads 2

Targets (issue 11): erpo_jax >= 2x Tunix's tokens/s and >= 3x transformers'
tokens/s, in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

from _tiny_qwen3 import (
    median_seconds,
    pin_threads,
    pin_xla_threads,
    tiny_qwen3_pair,
    transformers_sampler,
    workload_parser,
)

# Prefix of the Tunix worker's result lines on its stdout (libraries print there too).
_ROW = "@row "
_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_TUNIX_PYTHON = os.path.join(_HERE, os.pardir, ".venv-tunix", "bin", "python")
MODEL = "qwen3-tiny(V=4096,D=256,F=768,L=4,H=8,KV=4,tied)"


def _parse(argv=None):
    p = workload_parser(__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument(
        "--tunix-python",
        default=_DEFAULT_TUNIX_PYTHON if os.path.exists(_DEFAULT_TUNIX_PYTHON) else None,
        help="python of an environment with google-tunix (default: .venv-tunix/bin/python "
        "when it exists); 'none' skips Tunix",
    )
    p.add_argument(
        "--decode-phases",
        type=int,
        default=1,
        help="also time erpo_jax with sample(decode_phases=N) (impl erpo_jax-decode-phases-N) "
        "against the default (auto); 0 skips that row",
    )
    p.add_argument("--worker-checkpoint", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _common(args) -> dict:
    return {
        "bench": "rollout",
        "model": MODEL,
        "dtype": "float32",
        "prompts": args.prompts,
        "group": args.group,
        "rows": args.prompts * args.group,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "temperature": 1.0,
        "threads": args.threads,
    }


def _row(common: dict, impl: str, seconds: float, **extra) -> dict:
    n_tokens = common["rows"] * common["new_tokens"]
    return {**common, "impl": impl, "seconds": seconds, "tokens_per_s": n_tokens / seconds, **extra}


# ---------------------------------------------------------------------------
# Tunix, in its own environment (run as this script with --worker-checkpoint)
# ---------------------------------------------------------------------------
class _IdTokenizer:
    """Tunix's tokenizer protocol over strings of space-separated ids.

    No BOS is added (``bos_id`` None). ``pad_id`` is ``V``, outside the
    vocabulary: Tunix masks every buffer position that holds the pad id out
    of attention, sampled tokens included, so an in-vocabulary pad would
    change the model; the prompts are never padded, so the pad id never
    reaches the embedding.
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, **_) -> list[int]:
        return [int(x) for x in text.split()]

    def decode(self, ids, **_) -> str:
        return " ".join(map(str, ids))

    def bos_id(self):
        return None

    def eos_id(self) -> int:
        return -1  # never sampled

    def pad_id(self) -> int:
        return self.vocab_size


def _tunix_sampler(args):
    """Tunix's Qwen3 from the checkpoint's safetensors, in a ``Sampler`` sized for the workload."""
    import jax.numpy as jnp
    from tunix.generate import sampler as tunix_sampler
    from tunix.models.qwen3 import model as tunix_qwen3
    from tunix.models.qwen3 import params as tunix_params

    ckpt = args.worker_checkpoint
    with open(os.path.join(ckpt, "config.json")) as f:
        hf = json.load(f)
    rope = hf.get("rope_parameters") or {}
    config = tunix_qwen3.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        head_dim=hf["head_dim"],
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(rope.get("rope_theta", hf.get("rope_theta", 1_000_000))),
        norm_eps=hf["rms_norm_eps"],
        use_tied_embedding=hf["tie_word_embeddings"],
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )
    model = tunix_params.create_model_from_safe_tensors(ckpt, config, dtype=jnp.float32)
    # Sampler(return_logits=True) sizes its logits buffer with
    # ``transformer.num_embed``, which tunix's Qwen3 (0.1.7) does not define
    # (AttributeError); set it, before the Sampler takes the graph.
    patched = not hasattr(model, "num_embed")
    if patched:
        model.num_embed = config.vocab_size
    sampler = tunix_sampler.Sampler(
        model,
        _IdTokenizer(config.vocab_size),
        tunix_sampler.CacheConfig(
            cache_size=args.prompt_len + args.new_tokens,
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
        ),
    )
    return sampler, patched, config.rope_theta


def _tunix_worker(args) -> list[dict]:
    """Rows for Tunix's ``Sampler`` on the checkpoint (and prompts) in ``--worker-checkpoint``."""
    pin_xla_threads(args.threads)
    common = _common(args)
    try:
        import jax
        import jax.numpy as jnp
        import numpy as np

        for name in ("tunix.generate.sampler", "tunix.models.qwen3.params"):
            importlib.import_module(name)
    except Exception as e:  # ImportError, or a dependency that fails to import
        return [{**common, "impl": "tunix", "skipped": f"tunix is not importable: {e!r}"}]
    from importlib.metadata import version

    try:
        sampler, patched, rope_theta = _tunix_sampler(args)
    except Exception as e:  # an API mismatch in loading or building
        return [{**common, "impl": "tunix", "skipped": f"set-up: {type(e).__name__}: {e}"}]
    prompts = np.load(os.path.join(args.worker_checkpoint, "prompts.npy"))  # [P, S], unpadded
    rows = np.repeat(prompts, args.group, axis=0)  # [P * G, S] prompt-major
    strings = [" ".join(map(str, r)) for r in rows]
    b, s, t = rows.shape[0], args.prompt_len, args.new_tokens

    @jax.jit
    def entropy_of(logits):  # [B, T, V] -> [B, T]
        logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -(jnp.exp(logq) * logq).sum(-1)

    def run(with_entropy: bool, seed: int = 0):
        out = sampler(
            strings,
            max_generation_steps=t,
            max_prompt_length=s,
            echo=False,
            return_logits=with_entropy,
            return_logprobs=True,
            eos_tokens=[-1],
            temperature=1.0,
            top_p=1.0,  # "top_p" mode; top_p 1 and no top_k is a plain categorical draw
            top_k=None,
            seed=seed,
        )
        entropy = None
        if with_entropy:
            entropy = np.asarray(entropy_of(np.stack(out.logits)))
        return out, entropy

    notes = (
        f"tunix {version('google-tunix')}, jax {jax.__version__}; Sampler has no group "
        "option, the prompts are repeated G times; tunix's Qwen3 applies RoPE with theta "
        f"1e6 whatever the config says (the checkpoint's is {rope_theta}), which changes the "
        "outputs slightly but not the cost"
    )
    result = []
    for with_entropy in (True, False):
        impl = "tunix" if with_entropy else "tunix-logprobs"
        try:
            result.append(_tunix_variant(common, impl, run, with_entropy, b, t, args.repeats))
        except Exception as e:  # an API mismatch: say so in the row, measure the rest
            result.append({**common, "impl": impl, "skipped": f"{type(e).__name__}: {e}"})
            continue
        result[-1]["notes"] = notes
        if with_entropy:
            result[-1]["entropy"] = "log-softmax over return_logits (timed)" + (
                "; needed model.num_embed = V set on tunix's Qwen3" if patched else ""
            )
        else:
            result[-1]["entropy"] = "not returned (Sampler returns log-probs, not entropies)"
    return result


def _tunix_variant(common, impl, run, with_entropy, b, t, repeats) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    out, entropy = run(with_entropy)
    first_s = time.perf_counter() - t0
    lengths = {len(x) for x in out.tokens}
    if lengths != {t}:
        raise RuntimeError(f"tunix returned completions of lengths {sorted(lengths)}, not {t}")
    logp = np.asarray(out.logprobs, np.float32)
    if logp.shape != (b, t):
        raise RuntimeError(f"tunix returned log-probs of shape {logp.shape}, not {(b, t)}")
    seconds = median_seconds(lambda: run(with_entropy), repeats)
    extra = {"compile_s": first_s - seconds, "mean_neg_logp": float(-logp.mean())}
    if entropy is not None:
        extra["mean_entropy"] = float(entropy.mean())
    return _row(common, impl, seconds, **extra)


def _run_tunix(args, ckpt: str) -> list[dict]:
    common = _common(args)
    python = args.tunix_python
    if not python or python == "none":
        reason = "--tunix-python none" if python else "no --tunix-python and no .venv-tunix"
        return [{**common, "impl": "tunix", "skipped": reason}]
    if not os.path.exists(python):
        return [{**common, "impl": "tunix", "skipped": f"--tunix-python {python} does not exist"}]
    argv = [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("threads", "prompts", "group", "prompt_len", "new_tokens", "repeats")
    ]
    cmd = [python, os.path.abspath(__file__), *argv, "--worker-checkpoint", ckpt]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    rows = [json.loads(x[len(_ROW) :]) for x in proc.stdout.splitlines() if x.startswith(_ROW)]
    if proc.returncode != 0 or not rows:
        err = proc.stderr.strip().splitlines()
        last = err[-1] if err else "(no stderr)"
        reason = f"tunix worker exited with status {proc.returncode}: {last}"
        sys.stderr.write(proc.stderr)
        return [*rows, {**common, "impl": "tunix", "skipped": reason}]
    return rows


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------
def main():
    args = _parse()
    if args.worker_checkpoint:
        for row in _tunix_worker(args):
            print(_ROW + json.dumps(row), flush=True)
        return 0
    # Thread counts must be fixed before either library starts its pools.
    pin_threads(args.threads)
    import jax
    import numpy as np
    import torch
    import transformers

    from erpo_jax.sampling import repeat_for_groups, resolve_decode_phases, sample

    common = _common(args)
    p, g, s, t = args.prompts, args.group, args.prompt_len, args.new_tokens
    rows = []
    with tempfile.TemporaryDirectory() as ckpt:
        hf_config, torch_model, model = tiny_qwen3_pair(save_dir=ckpt)
        rng = np.random.default_rng(0)
        prompts = rng.integers(0, hf_config.vocab_size, (p, s)).astype(np.int32)
        mask = np.ones_like(prompts, bool)
        np.save(os.path.join(ckpt, "prompts.npy"), prompts)
        grouped = repeat_for_groups(prompts, mask, jax.random.key(0), group_size=g)

        def ours(share_prefix: bool, phases: int | None = None):
            def call():
                out = sample(
                    model,
                    grouped.tokens,
                    grouped.mask,
                    grouped.keys,
                    max_new_tokens=t,
                    temperature=1.0,
                    eos_ids=(),
                    group_size=g,
                    share_prefix=share_prefix,
                    decode_phases=phases,
                )
                return jax.block_until_ready(out)

            return call

        # Blocks, not alternation: torch's OpenMP workers spin after each call and
        # would steal cores from XLA's pool if the two were interleaved call by call.
        shared_out = None
        runs: list[tuple[str, bool, int | None]] = [
            ("erpo_jax", True, None),
            ("erpo_jax-no-prefix-sharing", False, None),
        ]
        if args.decode_phases > 0:
            runs.append((f"erpo_jax-decode-phases-{args.decode_phases}", True, args.decode_phases))
        for impl, share, phases in runs:
            fn = ours(share, phases)
            t0 = time.perf_counter()
            out = fn()
            first_s = time.perf_counter() - t0
            assert int(out.lengths.min()) == t
            seconds = median_seconds(fn, args.repeats)
            extra = {}
            if shared_out is None:
                shared_out = out
            else:  # same keys: the same completions up to float rounding
                extra["tokens_equal_to_shared"] = float(
                    np.mean(np.asarray(out.tokens) == np.asarray(shared_out.tokens))
                )
            rows.append(
                _row(
                    common,
                    impl,
                    seconds,
                    compile_s=first_s - seconds,
                    decode_phases=resolve_decode_phases(phases, t),
                    mean_entropy=float(np.asarray(out.entropy).mean()),
                    mean_neg_logp=float(-np.asarray(out.logp).mean()),
                    jax=jax.__version__,
                    **extra,
                )
            )
            print(json.dumps(rows[-1]), flush=True)

        theirs = transformers_sampler(torch_model, prompts, mask, t, num_return_sequences=g)
        seconds = median_seconds(theirs, args.repeats)
        new, logp, entropy = theirs()
        assert tuple(new.shape) == (p * g, t)
        hf_impl = f"transformers-{transformers.__version__}"
        rows.append(
            _row(
                common,
                hf_impl,
                seconds,
                torch=torch.__version__,
                attn=torch_model.config._attn_implementation,
                mean_entropy=float(entropy.mean()),
                mean_neg_logp=float(-logp.mean()),
            )
        )
        print(json.dumps(rows[-1]), flush=True)

        for row in _run_tunix(args, ckpt):
            rows.append(row)
            print(json.dumps(row), flush=True)

    secs = {r["impl"]: r["seconds"] for r in rows if "seconds" in r}
    ours_s = secs["erpo_jax"]
    summary = {"bench": "rollout", "impl": "ratio"}
    summary["prefix_sharing_speedup"] = secs["erpo_jax-no-prefix-sharing"] / ours_s
    phased = f"erpo_jax-decode-phases-{args.decode_phases}"
    if phased in secs:  # the default's speed-up over decode_phases=N
        summary[f"speedup_vs_decode_phases_{args.decode_phases}"] = secs[phased] / ours_s
        summary[f"decode_phases_{args.decode_phases}_vs_transformers"] = (
            secs[hf_impl] / secs[phased]
        )
    summary["speedup_vs_transformers"] = secs[hf_impl] / ours_s
    summary["target_vs_transformers"] = 3.0
    if "tunix" in secs:
        summary["speedup_vs_tunix"] = secs["tunix"] / ours_s
    if "tunix-logprobs" in secs:
        summary["speedup_vs_tunix_logprobs_only"] = secs["tunix-logprobs"] / ours_s
    summary["target_vs_tunix"] = 2.0
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
