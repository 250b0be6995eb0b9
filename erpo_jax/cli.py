"""The ``erpo-jax`` command line.

Subcommands that exist today:

- ``erpo-jax info``: versions, JAX backend and devices, and the loss
  functions and their modes, as JSON (what to paste into a bug report, and a
  quick check that a pod host sees its accelerators).
- ``erpo-jax countdown``: write a split of the Countdown toy task as JSONL.

``train``, ``eval`` and ``plan`` arrive with the trainer issues.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
