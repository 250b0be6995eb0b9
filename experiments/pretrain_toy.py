"""Build (or find in the cache) the toy Countdown base model and print its summary.

    .venv/bin/python experiments/pretrain_toy.py                      # default recipe, seed 0
    .venv/bin/python experiments/pretrain_toy.py --seed 1 --level medium --steps 800

The model is trained by ``erpo_jax.tasks.build_toy_base_model``, the same
function the RL trainer calls, so a model built here is the one it reuses.
The checkpoint directory (HF format: config.json, model.safetensors,
tokenizer files, train_meta.json) is printed on the last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: list[str] | None = None) -> int:
    from erpo_jax.tasks import COUNTDOWN_LEVELS
    from erpo_jax.train import ToyModelRecipe, build_toy_base_model

    default = ToyModelRecipe()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="runs/toy_models", help="cache root")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--level", default=default.level, choices=sorted(COUNTDOWN_LEVELS))
    parser.add_argument("--steps", type=int, default=default.steps)
    parser.add_argument("--batch-size", type=int, default=default.batch_size)
    parser.add_argument("--learning-rate", type=float, default=default.learning_rate)
    parser.add_argument("--warmup-steps", type=int, default=default.warmup_steps)
    parser.add_argument("--num-layers", type=int, default=default.num_layers)
    parser.add_argument("--hidden-size", type=int, default=default.hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=default.intermediate_size)
    parser.add_argument("--num-heads", type=int, default=default.num_heads)
    parser.add_argument("--num-kv-heads", type=int, default=default.num_kv_heads)
    parser.add_argument("--num-train-problems", type=int, default=default.num_train_problems)
    parser.add_argument("--num-eval-problems", type=int, default=default.num_eval_problems)
    parser.add_argument(
        "--trace-mix",
        type=float,
        nargs=5,
        default=list(default.trace_mix),
        metavar=("CORRECT", "WRONG_ANSWER", "WRONG_ARITH", "REUSED", "TRUNCATED"),
        help="weights of the trace kinds",
    )
    parser.add_argument("--rebuild", action="store_true", help="train even if cached")
    args = parser.parse_args(argv)

    fields = {f.name for f in dataclasses.fields(ToyModelRecipe)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["trace_mix"] = tuple(args.trace_mix)
    try:
        recipe = ToyModelRecipe(**values)
    except ValueError as err:
        parser.error(str(err))
    path = build_toy_base_model(
        args.data_dir, seed=args.seed, recipe=recipe, rebuild=args.rebuild, log=print
    )
    meta = json.loads((path / "train_meta.json").read_text())
    summary = {
        k: meta[k]
        for k in (
            "seed",
            "steps",
            "final_loss",
            "pass_at_1_greedy",
            "pass_at_1_sampled",
            "eval_problems",
            "wall_seconds",
        )
    }
    print(json.dumps(summary))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
