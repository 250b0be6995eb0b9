"""Run a study grid: every (method, seed) of a grid file through ``erpo-jax train``.

    python experiments/study.py --grid experiments/grids/toy.yaml            # everything
    python experiments/study.py --grid experiments/grids/toy.yaml --list     # status only
    python experiments/study.py --grid experiments/grids/toy.yaml --methods grpo,erpo --seeds 0,1
    python experiments/study.py --grid experiments/grids/toy.yaml --part sweep --jobs 2

Each run gets its own directory, ``<out>/<method>/s<seed>``, with the
trainer's ``config.yaml``, ``metrics.jsonl``, checkpoints and
``summary.json``, and its log next to it (``s<seed>.log``). The grid is
resumable: a run with ``summary.json`` is done and skipped, a run with a
complete checkpoint continues with ``--resume``, and anything else starts
again from scratch. Every run's config is built and checked before the first
one starts, so a typo in the grid fails at once, naming the run and the key.
Runs go in seed-major order (every method's seed 0, then seed 1, ...), so an
interrupted grid still pairs methods by seed. ``--jobs N`` runs N trainers at
once, each with the cores divided between them.

``experiments/summarize.py`` turns the finished runs into the tables, plots
and verdict of ``docs/results/<name>.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

_GRID_KEYS = {"name", "out", "baseline", "seeds", "common", "methods", "sweep"}
_SWEEP_KEYS = {"base", "seeds", "factors"}


class GridError(ValueError):
    """A malformed grid file; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the grid."""

    method: str
    seed: int
    overrides: tuple[str, ...]
    directory: Path
    part: str  # "main" or "sweep"

    @property
    def log(self) -> Path:
        return self.directory.with_suffix(".log")


@dataclasses.dataclass(frozen=True)
class Grid:
    """A parsed grid file."""

    name: str
    out: Path
    baseline: str
    runs: tuple[Run, ...]
    methods: tuple[str, ...]  # main-part methods, in file order
    sweep: dict[str, list[tuple[str, Any]]]  # sweep method -> [(key, value)]
    sweep_base: str | None


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise GridError(f"{where} must be a list of 'key=value' strings, got {value!r}")
    return list(value)


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) for v in value):
        raise GridError(f"{where} must be a non-empty list of ints, got {value!r}")
    return list(value)


def sweep_method_name(base: str, key: str, value: Any) -> str:
    """The method name of one sweep point, e.g. ``erpo@gamma=1``."""
    return f"{base}@{key.split('.')[-1]}={value}"


def load_grid(path: str | os.PathLike[str]) -> Grid:
    """Parses and checks a grid file (see experiments/grids/toy.yaml).

    Raises:
      GridError: a missing or unknown key, or a value of the wrong type.
      FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise GridError(f"{path}: the grid must be a mapping with keys {sorted(_GRID_KEYS)}")
    unknown = set(raw) - _GRID_KEYS
    if unknown:
        raise GridError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_GRID_KEYS)}")
    for key in ("name", "out", "seeds", "methods"):
        if key not in raw:
            raise GridError(f"{path}: missing key {key!r}")
    out = Path(raw["out"])
    seeds = _seeds(raw["seeds"], f"{path}: seeds")
    common = _strings(raw.get("common", []), f"{path}: common")
    methods = raw["methods"]
    if not isinstance(methods, dict) or not methods:
        raise GridError(f"{path}: methods must be a mapping of name -> list of overrides")
    baseline = raw.get("baseline", next(iter(methods)))
    if baseline not in methods:
        raise GridError(f"{path}: baseline {baseline!r} is not a method; methods: {list(methods)}")
    runs: list[Run] = []
    for seed in seeds:
        for name, overrides in methods.items():
            ov = _strings(overrides, f"{path}: methods.{name}")
            runs.append(
                Run(name, seed, (*common, *ov, f"seed={seed}"), out / name / f"s{seed}", "main")
            )
    sweep_methods: dict[str, list[tuple[str, Any]]] = {}
    sweep_base = None
    if raw.get("sweep"):
        sweep = raw["sweep"]
        if not isinstance(sweep, dict) or set(sweep) - _SWEEP_KEYS:
            raise GridError(f"{path}: sweep must be a mapping with keys {sorted(_SWEEP_KEYS)}")
        sweep_base = sweep.get("base")
        if sweep_base not in methods:
            raise GridError(f"{path}: sweep.base {sweep_base!r} is not a method: {list(methods)}")
        sweep_seeds = _seeds(sweep.get("seeds", seeds), f"{path}: sweep.seeds")
        factors = sweep.get("factors")
        if not isinstance(factors, dict) or not factors:
            raise GridError(f"{path}: sweep.factors must map config keys to lists of values")
        base_ov = _strings(methods[sweep_base], f"{path}: methods.{sweep_base}")
        for seed in sweep_seeds:
            for key, values in factors.items():
                if not isinstance(values, list) or not values:
                    raise GridError(f"{path}: sweep.factors.{key} must be a non-empty list")
                for value in values:
                    name = sweep_method_name(sweep_base, key, value)
                    sweep_methods[name] = [(key, value)]
                    ov = (*common, *base_ov, f"{key}={value}", f"seed={seed}")
                    folder = out / "sweep" / name.replace("@", "_") / f"s{seed}"
                    runs.append(Run(name, seed, ov, folder, "sweep"))
    return Grid(
        name=str(raw["name"]),
        out=out,
        baseline=baseline,
        runs=tuple(runs),
        methods=tuple(methods),
        sweep=sweep_methods,
        sweep_base=sweep_base,
    )


def check_configs(runs: list[Run]) -> None:
    """Builds every run's config (no compilation); a bad override names the run.

    Raises:
      GridError: a run's overrides do not make a valid config.
    """
    from erpo_jax.train import ConfigError, load_config

    for run in runs:
        try:
            load_config(None, list(run.overrides))
        except ConfigError as err:
            raise GridError(f"run {run.method} seed {run.seed}: {err}") from err


def run_status(run: Run) -> str:
    """``done`` (summary.json), ``resume`` (a complete checkpoint) or ``todo``."""
    if (run.directory / "summary.json").is_file():
        return "done"
    if (run.directory / "checkpoints").is_dir():
        from erpo_jax.train._checkpoint import RunCheckpointer

        if RunCheckpointer(run.directory, keep=1).latest_step() is not None:
            return "resume"
    return "todo"


def command(run: Run, resume: bool) -> list[str]:
    """The ``erpo-jax train`` command line of one run."""
    cmd = [sys.executable, "-m", "erpo_jax.cli", "train", "--out", str(run.directory)]
    if resume:
        cmd.append("--resume")
    return [*cmd, *run.overrides]


def _env(jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    if jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen={threads > 1}"
        ).strip()
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def execute(run: Run, jobs: int) -> tuple[Run, int, float]:
    """Runs (or resumes) one run, logging to ``run.log``; returns its exit code and seconds."""
    status = run_status(run)
    if status == "done":
        return run, 0, 0.0
    if status == "todo" and run.directory.exists():
        shutil.rmtree(run.directory)  # an interrupted run with no complete checkpoint
    run.directory.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run.log, "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command(run, False))}\n")
        log.flush()
        rc = subprocess.call(
            command(run, status == "resume"), stdout=log, stderr=subprocess.STDOUT, env=_env(jobs)
        )
    return run, rc, time.perf_counter() - t0


def select(grid: Grid, args: argparse.Namespace) -> list[Run]:
    runs = [r for r in grid.runs if args.part in ("all", r.part)]
    if args.methods:
        wanted = args.methods.split(",")
        known = set(grid.methods) | set(grid.sweep)
        bad = [m for m in wanted if m not in known]
        if bad:
            raise GridError(f"--methods: unknown {bad}; the grid has {sorted(known)}")
        runs = [r for r in runs if r.method in wanted]
    if args.seeds:
        seeds = {int(s) for s in args.seeds.split(",")}
        runs = [r for r in runs if r.seed in seeds]
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", required=True, help="grid YAML, e.g. experiments/grids/toy.yaml")
    parser.add_argument("--part", choices=("main", "sweep", "all"), default="all")
    parser.add_argument("--methods", default=None, help="comma-separated method names")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds")
    parser.add_argument("--jobs", type=int, default=1, help="trainers at once (cores are shared)")
    parser.add_argument("--list", action="store_true", help="print each run's status and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.grid)
        runs = select(grid, args)
        check_configs(runs)
    except (GridError, FileNotFoundError) as err:
        print(f"study: {err}", file=sys.stderr)
        return 2
    if args.list or args.dry_run:
        for run in runs:
            status = run_status(run)
            line = f"{status:6s} {run.method:28s} s{run.seed}  {run.directory}"
            if args.dry_run and status != "done":
                line += "\n    " + " ".join(command(run, status == "resume"))
            print(line)
        return 0
    pending = [r for r in runs if run_status(r) != "done"]
    print(
        f"study {grid.name}: {len(runs) - len(pending)} of {len(runs)} runs done; "
        f"running {len(pending)} with {args.jobs} at a time",
        file=sys.stderr,
    )
    failed = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for run, rc, seconds in pool.map(lambda r: execute(r, args.jobs), pending):
            state = "ok" if rc == 0 else f"FAILED (exit {rc}, log {run.log})"
            print(f"{run.method} s{run.seed}: {state} in {seconds:.0f} s", file=sys.stderr)
            if rc:
                failed.append(run)
    if failed:
        print(
            f"study: {len(failed)} run(s) failed; rerun the same command to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
