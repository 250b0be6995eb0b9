"""The ``erpo-jax`` command line.

Subcommands that exist today:

- ``erpo-jax info``: versions, JAX backend and devices, and the loss
  functions and their modes, as JSON (what to paste into a bug report, and a
  quick check that a pod host sees its accelerators).
- ``erpo-jax countdown``: write a split of the Countdown toy task as JSONL.
- ``erpo-jax eval``: evaluate a checkpoint on Countdown or a MATH/GSM8K file
  (pass@1 greedy and sampled, pass@k, maj@k, response length, token
  entropy, truncation); writes ``summary.json`` and ``samples.jsonl``.
  Without ``--checkpoint`` it evaluates the toy Countdown base model,
  training it on first use (minutes on a CPU) and reusing it after.

- ``erpo-jax train [--config FILE] [--out DIR] [--resume] [key=value ...]``:
  RL training (``erpo_jax.train``). With no arguments it is the embedded
  default job: ERPO on the toy Countdown task on CPU, printing the held-out
  accuracy before and after.
- ``erpo-jax plan --model PRESET --mesh data=..,fsdp=..,tensor=..``: per-device
  memory of the train step and the sampler, compiled ahead of time on
  abstract shapes over simulated devices, without allocating the model.

Bad arguments print one line naming the flag and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def _info(_: argparse.Namespace) -> int:
    import jax

    from erpo_jax import __version__, losses

    info = {
        "erpo_jax": __version__,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "process_count": jax.process_count(),
        "devices": [str(d) for d in jax.devices()],
        "losses": sorted(n for n in losses.__all__ if n.endswith("_loss")),
        "aggregations": list(losses.AGG_MODES),
        "erpo_gate_modes": list(losses.GATE_MODES),
        "kl_estimators": list(losses.KL_ESTIMATORS),
    }
    print(json.dumps(info, indent=2))
    return 0


def _countdown(args: argparse.Namespace) -> int:
    from erpo_jax.tasks import COUNTDOWN_LEVELS, countdown_prompt, generate_countdown

    if args.level not in COUNTDOWN_LEVELS:
        allowed = ", ".join(sorted(COUNTDOWN_LEVELS))
        print(
            f"erpo-jax countdown: --level {args.level!r} is unknown; allowed: {allowed}",
            file=sys.stderr,
        )
        return 2
    problems = generate_countdown(args.n, seed=args.seed, split=args.split, level=args.level)
    out = sys.stdout if args.out in (None, "-") else Path(args.out).open("w")
    try:
        for prob in problems:
            row = {
                "numbers": list(prob.numbers),
                "target": prob.target,
                "prompt": countdown_prompt(prob),
            }
            out.write(json.dumps(row) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


class _UsageError(Exception):
    """A bad command-line argument; the message names it. Exit status 2."""


def _load_countdown_rows(path: Path, n: int | None) -> list[Any]:
    """Countdown problems from a JSONL of ``{"numbers": [...], "target": int}`` rows
    (what ``erpo-jax countdown`` writes); malformed rows are skipped with a warning."""
    import warnings

    from erpo_jax.tasks import CountdownProblem

    problems, skipped = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                numbers = tuple(int(x) for x in row["numbers"])
                target = int(row["target"])
                if not numbers:
                    raise ValueError("empty numbers")
            except (ValueError, KeyError, TypeError) as err:
                skipped.append(f"{path}:{number} ({type(err).__name__}: {err})")
                continue
            problems.append(CountdownProblem(numbers, target))
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} malformed Countdown rows: {'; '.join(skipped[:5])}",
            stacklevel=2,
        )
    return problems[:n] if n is not None else problems


def _eval_problems(args: argparse.Namespace, level: str) -> tuple[list[Any], dict[str, Any]]:
    """The problems to evaluate and a description of where they came from."""
    from erpo_jax.tasks import COUNTDOWN_LEVELS, generate_countdown, load_math_file

    if args.data is not None:
        path = Path(args.data)
        if not path.exists():
            raise _UsageError(f"--data {args.data!r} does not exist")
        if args.task == "countdown":
            if path.is_dir():
                raise _UsageError(
                    f"--data {args.data!r} is a directory; countdown needs a JSONL file"
                )
            problems = _load_countdown_rows(path, args.n_problems)
            if not problems:
                raise _UsageError(
                    f"--data {args.data!r} holds no usable Countdown rows "
                    '(expected JSONL lines {"numbers": [...], "target": N})'
                )
            return problems, {"data": str(path)}
        try:
            loaded = load_math_file(path)
        except (FileNotFoundError, ImportError, OSError, UnicodeError) as err:
            raise _UsageError(f"--data {args.data!r}: {err}") from None
        if not len(loaded):
            first = (
                f"; first: {loaded.skipped[0].source}: {loaded.skipped[0].reason}"
                if loaded.skipped
                else ""
            )
            raise _UsageError(
                f"--data {args.data!r} holds no usable problems after skipping "
                f"{loaded.num_skipped} malformed rows{first}"
            )
        problems = list(loaded)[: args.n_problems] if args.n_problems else list(loaded)
        return problems, {"data": str(path), "skipped_rows": loaded.num_skipped}
    if args.task == "math":
        raise _UsageError(
            "--data is required for --task math (a MATH/GSM8K .jsonl, .json or .parquet file "
            "or a directory of them)"
        )
    if level not in COUNTDOWN_LEVELS:
        raise _UsageError(
            f"--level {level!r} is unknown; allowed: {', '.join(sorted(COUNTDOWN_LEVELS))}"
        )
    n = args.n_problems if args.n_problems is not None else 128
    try:
        problems = generate_countdown(n, seed=args.seed, split="test", level=level)
    except ValueError as err:
        raise _UsageError(f"--n-problems {n}: {err}") from None
    return problems, {"data": f"countdown:test:{level}", "level": level}


def _eval_checkpoint(args: argparse.Namespace) -> Path:
    """The checkpoint directory: --checkpoint, or the toy base model (built on first use)."""
    if args.checkpoint is not None:
        from erpo_jax.models import checkpoint_dir

        try:
            return checkpoint_dir(args.checkpoint, label="--checkpoint")
        except FileNotFoundError as err:
            raise _UsageError(str(err)) from None
    if args.task != "countdown":
        raise _UsageError(
            "--checkpoint is required for --task math (the default is the toy Countdown model)"
        )
    from erpo_jax.train import build_toy_base_model

    print(
        f"erpo-jax eval: toy base model under {args.data_dir} (built on first use)", file=sys.stderr
    )
    return Path(
        build_toy_base_model(args.data_dir, seed=0, log=lambda m: print(m, file=sys.stderr))
    )


def _eval(args: argparse.Namespace) -> int:
    try:
        return _run_eval(args)
    except _UsageError as err:
        print(f"erpo-jax eval: {err}", file=sys.stderr)
        return 2


def _run_eval(args: argparse.Namespace) -> int:
    from erpo_jax.rollout import EVAL_TASKS

    if args.task not in EVAL_TASKS:
        raise _UsageError(f"--task {args.task!r} is unknown; allowed: {', '.join(EVAL_TASKS)}")
    checks = [
        ("--n-problems", args.n_problems, args.n_problems is None or args.n_problems >= 1, ">= 1"),
        ("--num-samples", args.num_samples, args.num_samples >= 0, ">= 0"),
        ("--temperature", args.temperature, args.temperature >= 0, ">= 0"),
        ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1, "in (0, 1]"),
        ("--max-new-tokens", args.max_new_tokens,
         args.max_new_tokens is None or args.max_new_tokens >= 1, ">= 1"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
        ("--max-prompt-tokens", args.max_prompt_tokens,
         args.max_prompt_tokens is None or args.max_prompt_tokens >= 1, ">= 1"),
    ]  # fmt: skip
    for flag, value, ok, allowed in checks:
        if not ok:
            raise _UsageError(f"{flag} must be {allowed}, got {value}")
    from erpo_jax.models import COMPUTE_DTYPES

    # Here, not at load time: before the toy model's build, and naming the flag.
    if args.dtype not in COMPUTE_DTYPES:
        raise _UsageError(
            f"--dtype {args.dtype!r} is not supported; allowed: {', '.join(COMPUTE_DTYPES)}"
        )
    if args.no_greedy and args.num_samples == 0:
        raise _UsageError("--no-greedy with --num-samples 0 leaves nothing to evaluate")
    if args.data is None and args.task == "math":
        _eval_problems(args, "")  # raises the missing --data error before any model work
    from erpo_jax.train import ConfigError
    from erpo_jax.train._loop import use_compilation_cache

    try:  # before the toy model's build, which compiles too
        use_compilation_cache(
            args.compilation_cache_dir or None, name="--compilation-cache-dir", off="''"
        )
    except ConfigError as err:
        raise _UsageError(str(err)) from None
    checkpoint = _eval_checkpoint(args)
    meta: dict[str, Any] = {}
    meta_path = checkpoint / "train_meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, OSError):
            meta = {}
    level = args.level or meta.get("recipe", {}).get("level") or "easy"
    problems, source = _eval_problems(args, level)
    max_new_tokens = args.max_new_tokens or int(
        meta.get("max_new_tokens") or (64 if args.task == "countdown" else 1024)
    )

    import jax

    from erpo_jax.models import load_hf_checkpoint, load_tokenizer
    from erpo_jax.rollout import evaluate

    try:
        model, config = load_hf_checkpoint(
            checkpoint, dtype=args.dtype, attention_impl=args.attention_impl
        )
    except (FileNotFoundError, KeyError, ValueError, OSError) as err:
        raise _UsageError(f"--checkpoint {str(checkpoint)!r}: {err}") from None
    try:
        tokenizer = load_tokenizer(checkpoint)
    except (OSError, ValueError, TypeError) as err:
        raise _UsageError(
            f"--checkpoint {str(checkpoint)!r}: cannot load its tokenizer ({err})"
        ) from None
    from erpo_jax.models import resolve_eos_ids

    eos_ids = resolve_eos_ids(config, tokenizer, checkpoint)

    out = Path(args.out or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    start = time.perf_counter()
    try:
        result = evaluate(
            model,
            tokenizer,
            problems,
            task=args.task,
            num_samples=args.num_samples,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=max_new_tokens,
            batch_size=args.batch_size,
            key=jax.random.key(args.seed),
            greedy=not args.no_greedy,
            eos_ids=eos_ids,
            template=args.template,
            think=args.think,
            progress=not args.no_progress,
            max_prompt_tokens=args.max_prompt_tokens,
            samples_path=out / "samples.jsonl",  # written as it goes
        )
    except ValueError as err:  # e.g. prompts that do not fit the context
        raise _UsageError(str(err)) from None
    result.summary.update(
        checkpoint=str(checkpoint),
        seed=args.seed,
        **source,
        backend=jax.default_backend(),
        total_seconds=round(time.perf_counter() - start, 3),
    )
    summary_path, samples_path = result.write(out)
    print(json.dumps(result.summary, indent=2))
    print(f"erpo-jax eval: wrote {summary_path} and {samples_path}", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    from erpo_jax.train import ConfigError, load_config, train

    try:
        overrides = list(args.overrides)
        if args.dtype is not None:
            overrides.append(f"model.dtype={args.dtype}")
        config = load_config(args.config, overrides)
        train(config, out=args.out, resume=args.resume)
    except (ConfigError, FileNotFoundError) as err:
        print(f"erpo-jax train: {err}", file=sys.stderr)
        return 2
    return 0


def _plan(args: argparse.Namespace) -> int:
    from erpo_jax.train._plan import plan_command

    return plan_command(args)


def build_parser() -> argparse.ArgumentParser:
    from erpo_jax._defaults import DEFAULT_COMPILATION_CACHE_DIR

    parser = argparse.ArgumentParser(
        prog="erpo-jax", description="ERPO and the GRPO family in pure JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, devices and available losses as JSON")
    p.set_defaults(fn=_info)
    p = sub.add_parser("countdown", help="write Countdown toy-task problems as JSONL")
    p.add_argument("--n", type=int, default=10, help="number of problems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--level", default="easy", help="difficulty level (easy, medium, hard)")
    p.add_argument("--out", default=None, help="output file (default: stdout)")
    p.set_defaults(fn=_countdown)
    p = sub.add_parser(
        "eval",
        help="pass@1/pass@k/maj@k of a checkpoint on Countdown or a MATH/GSM8K file",
        description="Evaluate a checkpoint; writes summary.json and samples.jsonl to --out and "
        "prints the summary. Without --checkpoint: the toy Countdown base model (built on "
        "first use).",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="HF checkpoint directory (config.json, *.safetensors, tokenizer files); "
        "default: the toy Countdown base model",
    )
    p.add_argument("--task", default="countdown", help="countdown (default) or math")
    p.add_argument(
        "--data",
        default=None,
        help="math: a MATH/GSM8K/AIME .jsonl, .json or .parquet file or directory "
        "(required); countdown: optional JSONL from `erpo-jax countdown`, else "
        "generated test-split problems",
    )
    p.add_argument(
        "--level",
        default=None,
        help="countdown level of generated problems (easy, medium, hard; default: "
        "the checkpoint's training level, else easy)",
    )
    p.add_argument(
        "--n-problems",
        type=int,
        default=None,
        help="problems to evaluate (default: 128 generated Countdown problems, or "
        "every row of --data)",
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=8,
        help="sampled completions per problem, n (pass@k, maj@k for k = 1..n); 0: greedy only",
    )
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="completion budget (default: the toy model's, else 64 for countdown and "
        "1024 for math)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="prompts per sampler call")
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="skip (and count) longer prompts (default: the model's context minus the budget)",
    )
    p.add_argument("--seed", type=int, default=0, help="problem generation and sampling seed")
    p.add_argument("--out", default=None, help="output directory (default: runs/eval-<time>)")
    p.add_argument("--data-dir", default="runs/toy_models", help="cache root of the toy base model")
    p.add_argument(
        "--template",
        default="auto",
        choices=("auto", "chat", "qwen_math", "plain"),
        help="math prompt template (auto: the tokenizer's chat template if any)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        help="compute and parameter dtype: float32, bfloat16 or float16 (sampling runs in it)",
    )
    p.add_argument(
        "--attention-impl",
        default="auto",
        help="attention: auto, xla, chunked (memory linear in length) or cudnn (GPU)",
    )
    p.add_argument("--think", action="store_true", help="open a <think> block in math prompts")
    p.add_argument("--no-greedy", action="store_true", help="skip the greedy completions")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--compilation-cache-dir",
        default=DEFAULT_COMPILATION_CACHE_DIR,
        help="JAX's persistent compilation cache, as train's compilation_cache_dir "
        "(an empty string turns it off)",
    )
    p.set_defaults(fn=_eval)

    p = sub.add_parser(
        "train",
        help="RL training (default: ERPO on the toy Countdown task)",
        description="RL training. Config: dataclass defaults (the toy ERPO job), then --config "
        "YAML, then key=value overrides (e.g. loss.name=grpo steps=50 mesh.data=8). Writes "
        "config.yaml, metrics.jsonl, TensorBoard events, checkpoints/ and summary.json to --out.",
    )
    p.add_argument("--config", default=None, help="YAML config (e.g. experiments/configs/X.yaml)")
    p.add_argument("--out", default=None, help="run directory (default: runs/train-<time>)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --out"
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="compute dtype: float32, bfloat16 or float16 (same as model.dtype=...; "
        "parameters stay float32)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(fn=_train)

    p = sub.add_parser(
        "plan",
        help="per-device memory of the train step and sampler for a model preset on a mesh",
        description="Compiles the train step and the sampler ahead of time on abstract shapes "
        "over simulated devices and prints per-device GiB for parameters, optimizer state, "
        "activations/temporaries and the KV cache, without allocating the model.",
    )
    p.add_argument("--model", required=True, help="model preset name (see erpo_jax.models.PRESETS)")
    p.add_argument("--mesh", default="data=1,fsdp=1,tensor=1", help="data=..,fsdp=..,tensor=..")
    p.add_argument("--batch", type=int, default=64, help="completion rows per step, B = P*G")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--device-gib", type=float, default=None, help="memory per device, GiB")
    p.add_argument("--loss", default="grpo", help="loss.name (erpo adds the reference forward)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--remat", action="store_true", help="recompute block activations")
    p.add_argument(
        "--logp-chunk-size",
        type=int,
        default=None,
        help="the update's log-prob head in chunks of about this many tokens "
        "(model.logp_chunk_size; default: chosen from the shapes, as the trainer does)",
    )
    p.add_argument(
        "--sequence-parallel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with tensor > 1, split the update's residual stream along the sequence over the "
        "tensor axis, as the trainer does by default (model.sequence_parallel)",
    )
    p.add_argument(
        "--gather-params",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with fsdp > 1, plan the rollout on parameters gathered over fsdp "
        "(rollout.gather_params; default: auto, when they take at most 1/8 of --device-gib)",
    )
    p.add_argument(
        "--attention-impl",
        default="auto",
        help="model.attention_impl to plan with: auto (what auto picks on a GPU or TPU by "
        "length: chunked from 2**20 query-key pairs, xla below), xla (materialized scores) or "
        "chunked (memory linear in length). cudnn and splash need their own devices and are "
        "refused; chunked needs about the memory they do",
    )
    p.set_defaults(fn=_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
