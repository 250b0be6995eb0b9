"""Reading run directories and comparing methods over seeds.

The study (``experiments/summarize.py``) and the ``training_curves`` notebook
both use these, and so can any user with ``erpo-jax train`` run directories:

    from erpo_jax import analysis
    runs = {"grpo": analysis.load_runs("runs/study/toy/grpo/s*"),
            "erpo": analysis.load_runs("runs/study/toy/erpo/s*")}
    fig = analysis.plot_curves(runs, ["reward_mean", "entropy_mean"])

Intervals are Student-t 95% intervals over seeds (runs are independent
replicates); differences between two methods are paired by seed, which
removes the variation the seed puts into the prompts and the initial samples
that both methods share. matplotlib is imported only by the plotting
functions.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = [
    "RunData",
    "curve",
    "load_run",
    "load_runs",
    "moving_average",
    "paired_difference",
    "plot_curves",
    "t_interval",
]


@dataclasses.dataclass(frozen=True)
class RunData:
    """One run directory's records.

    Attributes:
      path: the run directory.
      seed: ``seed`` from its ``config.yaml``.
      config: the resolved config (nested dict).
      steps: per-step training records, in step order (``metrics.jsonl``).
      evals: held-out evaluations by step (the ``eval/`` records, prefix removed).
      summary: ``summary.json`` (None while the run is unfinished).
    """

    path: Path
    seed: int
    config: dict[str, Any]
    steps: list[dict[str, Any]]
    evals: dict[int, dict[str, Any]]
    summary: dict[str, Any] | None

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of a per-step key (NaN where a step lacks it)."""
        steps = np.array([r["step"] for r in self.steps], dtype=np.int64)
        values = np.array([float(r.get(key, math.nan)) for r in self.steps], dtype=np.float64)
        return steps, values

    def eval_series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of a held-out evaluation key, e.g. ``pass_at_1_sampled``."""
        steps = np.array(sorted(self.evals), dtype=np.int64)
        values = np.array([float(self.evals[s].get(key, math.nan)) for s in steps])
        return steps, values


def load_run(path: str | Path) -> RunData:
    """Reads a run directory written by ``erpo-jax train``.

    Raises:
      FileNotFoundError: the directory has no ``metrics.jsonl`` or ``config.yaml``.
    """
    from erpo_jax.train._metrics import read_metrics

    path = Path(path)
    for name in ("metrics.jsonl", "config.yaml"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a run directory: {name} is missing")
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    steps: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for record in read_metrics(path / "metrics.jsonl"):
        step = int(record["step"])
        ev = {k[5:]: v for k, v in record.items() if k.startswith("eval/")}
        rest = {k: v for k, v in record.items() if not k.startswith("eval/")}
        if len(rest) > 1:  # more than the step itself: a training record
            steps[step] = rest  # a resumed run rewrites its steps; the last one wins
            # Runs before 2026-11-29 put a periodic evaluation into the record of
            # the update that preceded it: it was taken after step + 1 updates.
            step += 1
        if ev:
            evals.setdefault(step, {}).update(ev)
    summary = None
    if (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text())
    return RunData(
        path=path,
        seed=int(config.get("seed", 0)),
        config=config,
        steps=[steps[s] for s in sorted(steps)],
        evals=evals,
        summary=summary,
    )


def load_runs(pattern: str | Iterable[str | Path], *, finished_only: bool = False) -> list[RunData]:
    """Loads every run directory matching a glob pattern (or in a list), sorted by seed."""
    paths = sorted(glob.glob(pattern)) if isinstance(pattern, str) else list(pattern)
    runs = [
        load_run(p) for p in paths if Path(p).is_dir() and (Path(p) / "metrics.jsonl").is_file()
    ]
    if finished_only:
        runs = [r for r in runs if r.finished]
    return sorted(runs, key=lambda r: r.seed)


def t_interval(
    values: Sequence[float] | np.ndarray, confidence: float = 0.95
) -> tuple[float, float, float]:
    """``(mean, low, high)``: the Student-t interval of the mean over independent replicates.

    One value gives ``(value, nan, nan)``: no interval from a single seed.
    """
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95
) -> tuple[float, float, float, int]:
    """``(mean, low, high, n)`` of ``a[s] - b[s]`` over the seeds both have (t interval)."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    mean, low, high = t_interval(diffs, confidence)
    return mean, low, high, len(seeds)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` values (the first ones average what exists)."""
    x = np.asarray(values, dtype=np.float64)
    if window <= 1 or x.size == 0:
        return x
    csum = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, x.size + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def curve(runs: Sequence[RunData], key: str, *, smooth: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values [runs, steps])`` of a per-step key over the steps all runs reached."""
    if not runs:
        return np.zeros(0, np.int64), np.zeros((0, 0))
    n = min(len(r.steps) for r in runs)
    steps = runs[0].series(key)[0][:n]
    values = np.stack([moving_average(r.series(key)[1][:n], smooth) for r in runs])
    return steps, values


def _band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cols = [t_interval(values[:, j]) for j in range(values.shape[1])]
    mean, lo, hi = (np.array(c) for c in zip(*cols, strict=True))
    return mean, lo, hi


def plot_curves(
    groups: Mapping[str, Sequence[RunData]],
    keys: Sequence[str],
    *,
    smooth: int = 10,
    titles: Mapping[str, str] | None = None,
    ncols: int = 2,
    eval_key: str | None = None,
):
    """One panel per key, one line per group (mean over seeds) with its 95% t band.

    Args:
      groups: label -> the runs of that method (one per seed).
      keys: per-step metric keys (``reward_mean``, ``entropy_mean``, ...);
        groups that lack a key (e.g. ``cdp_frac`` outside ERPO) are left out of its panel.
      smooth: trailing moving-average window over steps.
      titles: key -> panel title.
      ncols: panels per row.
      eval_key: also a first panel of this held-out evaluation key
        (e.g. ``pass_at_1_sampled``), at the evaluated steps.

    Returns:
      the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    titles = dict(titles or {})
    panels = ([f"eval/{eval_key}"] if eval_key else []) + list(keys)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.4 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, panel in enumerate(panels):
        ax = axes[i // ncols][i % ncols]
        for j, (label, runs) in enumerate(groups.items()):
            if not runs:
                continue
            color = colors[j % len(colors)]
            if panel.startswith("eval/"):
                key = panel[5:]
                common = sorted(set.intersection(*(set(r.evals) for r in runs)))
                if not common:
                    continue
                values = np.array([[r.evals[s].get(key, math.nan) for s in common] for r in runs])
                x = np.array(common)
                style = {"marker": "o"}
            else:
                x, values = curve(runs, panel, smooth=smooth)
                if np.all(np.isnan(values)):
                    continue
                style = {}
            mean, lo, hi = _band(values)
            ax.plot(x, mean, color=color, label=f"{label} (n={len(runs)})", lw=1.6, **style)
            if len(runs) > 1:
                ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
        ax.set_title(titles.get(panel, panel), fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for k in range(len(panels), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)  # a method absent from the first panel too
    handles, labels = list(legend.values()), list(legend)
    fig.legend(
        handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9, frameon=False
    )
    fig.tight_layout(rect=(0, 0.04 + 0.025 * math.ceil(len(labels) / 4), 1, 1))
    return fig
