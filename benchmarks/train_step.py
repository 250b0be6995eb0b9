"""Seconds per full RL step of the erpo_jax trainer against TRL's ``GRPOTrainer``.

One step is everything between two optimizer updates: sample ``G``
completions for each of ``P`` prompts, score them (a cheap token-based reward,
so verification costs ~0), compute the loss, backpropagate and apply AdamW.
Both sides train the same tiny random Qwen3 (``_tiny_qwen3.py``), float32, on
CPU, with the same thread count: ``P = 16`` prompts of 32 tokens, ``G = 8``
completions each, exactly 128 new tokens per completion (EOS cannot end a
row early, so every row runs to 128), temperature 1, no top-k/top-p, beta 0
(no reference model, no KL), one optimizer update per generation
(``num_iterations = 1``: the 128 completions are one batch of one update).

Each implementation runs in its own subprocess of this script, with its
thread pools pinned by ``pin_threads`` before torch or jax is imported, so
neither sees the other's workers. The first ``--warmup`` steps (compilation,
allocator warm-up) are discarded; the median of the next ``--steps`` is
reported. Prints one JSON line per (implementation, loss) with ``impl``,
``loss``, ``step_seconds``, ``tokens_per_second`` (new tokens per second of
full step) and the splits each side has, then a ``ratio`` line when both
sides measured GRPO.

TRL's splits come from timing wrappers in a ``GRPOTrainer`` subclass and a
``TrainerCallback`` (TRL's own profiling timings only go to wandb/mlflow):
``rollout_seconds`` is ``_generate_and_score_completions`` (tokenize,
``model.generate``, decode, reward, advantages), ``generate_seconds`` the
``_generate_single_turn`` call inside it, ``update_seconds`` the rest of the
step (``loss_forward_seconds`` = ``compute_loss``, ``backward_seconds`` =
backward + gradient clipping + the trainer's bookkeeping, ``optimizer_seconds``
= ``optimizer.step``). ``cpu_seconds`` (process CPU time per step) and
``load_average_1m`` (before and after the run) show when other processes
shared the cores: torch's OpenMP workers spin-wait at every op, so on a busy
machine a step can take many times its quiet-machine time.
TRL is configured for this workload, not with its defaults: float32 (its
default is bf16), no gradient checkpointing (its default; pass
``--trl-gradient-checkpointing`` to measure it), ``loss_type="grpo"`` (its
default is ``"dapo"``), the whole batch of 128 in one micro-batch.
TRL is a benchmark-only peer, not a dependency; when it is not importable
its line says ``skipped``.

    python benchmarks/train_step.py --threads 2 --impl all

Targets: erpo_jax GRPO step >= 3x faster than TRL's GRPO step;
erpo_jax ERPO step <= 1.1x erpo_jax GRPO step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _tiny_qwen3 import TINY_QWEN3, pin_threads

# Prefix of the worker's result lines on its stdout (libraries print there too).
_ROW = "@row "
# TRL ``loss_type`` values this benchmark measures when they are in ``--loss``.
TRL_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo")


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="measured steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="steps discarded before measuring")
    p.add_argument("--impl", choices=["erpo_jax", "trl", "all"], default="all")
    p.add_argument(
        "--loss",
        type=lambda s: [x for x in s.split(",") if x],
        default=["grpo", "erpo"],
        help="comma-separated losses; TRL measures those it has (grpo, dr_grpo, dapo, bnpo); "
        "erpo_current is ERPO with loss.progress_source=current",
    )
    p.add_argument(
        "--trl-micro-batch",
        type=int,
        default=0,
        help="TRL per_device_train_batch_size (0: the whole batch of prompts x group)",
    )
    p.add_argument(
        "--micro-batches",
        type=lambda s: None if s == "auto" else int(s),
        default=None,
        help="erpo_jax micro-batches of the update and scoring passes (auto: the trainer's "
        "default, train.micro_batches: null)",
    )
    p.add_argument("--trl-gradient-checkpointing", action="store_true")
    p.add_argument("--worker", choices=["erpo_jax", "trl"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _common(args) -> dict:
    return {
        "bench": "train_step",
        "model": "qwen3-tiny(V=4096,D=256,F=768,L=4,H=8,KV=4,tied)",
        "dtype": "float32",
        "prompts": args.prompts,
        "group": args.group,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "temperature": 1.0,
        "beta": 0.0,
        "threads": args.threads,
        "device": "cpu",
    }


def _median(xs):
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------
# erpo_jax: the trainer's own jitted pieces (benchmarks/_erpo_step.py)
# ---------------------------------------------------------------------------
def measure_erpo_jax(args, loss_name: str) -> dict:
    """One erpo_jax row for ``loss_name`` on the workload of the module docstring.

    Runs in the erpo_jax worker subprocess, after ``pin_threads``. Should train
    the tiny Qwen3 from ``_tiny_qwen3.tiny_qwen3_pair()`` for ``args.warmup``
    discarded and ``args.steps`` measured steps and return
    ``{**_common(args), "impl": "erpo_jax", "loss": loss_name,
    "step_seconds": median, "tokens_per_second": ..., ...splits}``.
    """
    from _erpo_step import measure

    return measure(args, loss_name, _common(args))


# ---------------------------------------------------------------------------
# TRL GRPOTrainer
# ---------------------------------------------------------------------------
def _word_tokenizer(vocab_size: int):
    """A local tokenizer whose ids are the model's: token ``i >= 2`` is the word ``t{i}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Id 0 is EOS (and, set by TRL, the pad token; min_new_tokens keeps it from ending a row),
    # id 1 is unk. Special tokens are matched as substrings, so they must not look like words.
    vocab = {"<eos>": 0, "<unk>": 1} | {f"t{i}": i for i in range(2, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def _even_token_reward(completion_ids, **_):
    """Fraction of even token ids: deterministic and ~free."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def _trl_one(args, loss_name: str) -> dict:
    import numpy as np
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Qwen3Config, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    p, g, s, t = args.prompts, args.group, args.prompt_len, args.new_tokens
    batch = p * g
    micro = args.trl_micro_batch or batch
    if batch % micro:
        raise ValueError(f"--trl-micro-batch {micro} must divide prompts x group = {batch}")
    accum = batch // micro
    n_steps = args.warmup + args.steps

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**TINY_QWEN3), dtype=torch.float32)
    tokenizer = _word_tokenizer(TINY_QWEN3["vocab_size"])
    rng = np.random.default_rng(0)
    # Ids from 2: neither EOS/pad (0) nor unk (1) appears in a prompt.
    ids = rng.integers(2, TINY_QWEN3["vocab_size"], (p * n_steps, s))
    dataset = Dataset.from_dict({"prompt": [" ".join(f"t{i}" for i in row) for row in ids]})
    assert tokenizer(dataset[0]["prompt"])["input_ids"] == ids[0].tolist()

    clock: dict[str, list[float]] = {}
    marks: dict[str, float] = {}

    def add(name, seconds):
        clock.setdefault(name, []).append(seconds)

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            add("rollout", time.perf_counter() - t0)
            return out

        def _generate_single_turn(self, *a, **kw):
            t0 = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*a, **kw)
            add("generate", time.perf_counter() - t0)
            lengths = {len(c) for c in completion_ids}
            assert lengths == {t}, f"completion lengths {sorted(lengths)}, want all {t}"
            return completion_ids, logprobs

        def compute_loss(self, *a, **kw):
            t0 = time.perf_counter()
            out = super().compute_loss(*a, **kw)
            clock["loss_forward"][-1] += time.perf_counter() - t0  # summed over micro-batches
            return out

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            clock.setdefault("begin", []).append(time.perf_counter())
            marks["cpu_begin"] = time.process_time()
            clock.setdefault("loss_forward", []).append(0.0)

        def on_pre_optimizer_step(self, *_, **__):
            marks["pre_opt"] = time.perf_counter()

        def on_optimizer_step(self, *_, **__):
            add("optimizer", time.perf_counter() - marks["pre_opt"])

        def on_step_end(self, *_, **__):
            add("step", time.perf_counter() - clock["begin"][-1])
            add("cpu", time.process_time() - marks["cpu_begin"])

    with tempfile.TemporaryDirectory() as out_dir:
        config = GRPOConfig(
            output_dir=out_dir,
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=args.trl_gradient_checkpointing,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=accum,
            steps_per_generation=accum,
            num_iterations=1,
            num_generations=g,
            max_completion_length=t,
            generation_kwargs={"min_new_tokens": t},
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=0.0,
            loss_type=loss_name,
            learning_rate=1e-5,
            max_steps=n_steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
        )
        trainer = TimedGRPOTrainer(
            model=model,
            reward_funcs=_even_token_reward,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[StepClock()],
        )
        torch_threads = torch.get_num_threads()
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        trainer.train()
        train_wall = time.perf_counter() - t0
        load_after = os.getloadavg()[0]
        optim = getattr(trainer.args.optim, "value", str(trainer.args.optim))

    assert len(clock["step"]) == n_steps, (len(clock["step"]), n_steps)
    w = args.warmup
    step = clock["step"][w:]
    rollout = clock["rollout"][w:]
    loss_fwd = clock["loss_forward"][w:]
    optimizer = clock["optimizer"][w:]
    update = [a - b for a, b in zip(step, rollout, strict=True)]
    backward = [u - f - o for u, f, o in zip(update, loss_fwd, optimizer, strict=True)]
    new_tokens = batch * t
    step_s = _median(step)
    return {
        **_common(args),
        "impl": "trl",
        "loss": loss_name,
        "step_seconds": step_s,
        "tokens_per_second": new_tokens / step_s,
        "rollout_seconds": _median(rollout),
        "generate_seconds": _median(clock["generate"][w:]),
        "rollout_tokens_per_second": new_tokens / _median(clock["generate"][w:]),
        "update_seconds": _median(update),
        "loss_forward_seconds": _median(loss_fwd),
        "backward_seconds": _median(backward),
        "optimizer_seconds": _median(optimizer),
        "step_seconds_each": [round(x, 3) for x in clock["step"]],
        # Process CPU time per step (all threads) and the machine's 1-minute load
        # average around the run: a wall time far above cpu_seconds / threads, or a
        # load above the thread count, means other processes shared the cores.
        "cpu_seconds": _median(clock["cpu"][w:]),
        "load_average_1m": [round(load_before, 2), round(load_after, 2)],
        "warmup_steps": w,
        "measured_steps": len(step),
        "train_wall_seconds": train_wall,
        "trl_loss_type": loss_name,
        "micro_batch": micro,
        "gradient_accumulation_steps": accum,
        "gradient_checkpointing": args.trl_gradient_checkpointing,
        "optim": optim,
        "attn": model.config._attn_implementation,
        "torch_threads": torch_threads,
        "trl": trl.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def measure_trl(args) -> list[dict]:
    """One TRL row per loss in ``--loss`` that TRL has (``loss_type``)."""
    try:
        import trl  # noqa: F401
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except Exception as e:  # ImportError, or a dependency that fails to import
        return [{"impl": "trl", "skipped": f"trl is not importable: {e!r}"}]
    losses = [name for name in args.loss if name in TRL_LOSSES]
    if not losses:
        return [{"impl": "trl", "skipped": f"none of --loss {args.loss} is in {TRL_LOSSES}"}]
    return [_trl_one(args, name) for name in losses]


# ---------------------------------------------------------------------------
# driver: each implementation in its own pinned subprocess
# ---------------------------------------------------------------------------
def _worker(args) -> None:
    # Thread counts must be fixed before torch or jax starts its pools.
    pin_threads(args.threads)
    if args.worker == "trl":
        rows = measure_trl(args)
    else:
        rows = []
        for loss_name in args.loss:
            try:
                rows.append(measure_erpo_jax(args, loss_name))
            except NotImplementedError as e:
                rows.append({"impl": "erpo_jax", "loss": loss_name, "skipped": str(e)})
    for row in rows:
        print(_ROW + json.dumps(row), flush=True)


def _run_isolated(impl: str, argv: list[str]) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", impl]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith(_ROW):
            rows.append(json.loads(line[len(_ROW) :]))
        else:  # the library's own prints (TRL logs) go to stderr, not into the JSON stream
            print(line, file=sys.stderr)
    if proc.returncode != 0:
        rows.append({"impl": impl, "error": f"worker exited with status {proc.returncode}"})
    return rows


def _ratio_row(rows: list[dict]) -> dict | None:
    step = {(r["impl"], r.get("loss")): r["step_seconds"] for r in rows if r.get("step_seconds")}
    out = {}
    if ("erpo_jax", "grpo") in step and ("trl", "grpo") in step:
        out["grpo_speedup_vs_trl"] = step["trl", "grpo"] / step["erpo_jax", "grpo"]
    if ("erpo_jax", "grpo") in step and ("erpo_jax", "erpo") in step:
        out["erpo_over_grpo"] = step["erpo_jax", "erpo"] / step["erpo_jax", "grpo"]
    return {"bench": "train_step", "impl": "ratio", **out} if out else None


def main():
    args = _parse()
    if args.worker:
        return _worker(args)
    impls = ["erpo_jax", "trl"] if args.impl == "all" else [args.impl]
    rows = []
    for impl in impls:
        for row in _run_isolated(impl, sys.argv[1:]):
            print(json.dumps(row), flush=True)
            rows.append(row)
    ratio = _ratio_row(rows)
    if ratio:
        print(json.dumps(ratio), flush=True)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
