# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Training curves: comparing methods over seeds
#
# Loads `erpo-jax train` run directories (each holds `config.yaml`,
# `metrics.jsonl` and, once finished, `summary.json`), groups them by method,
# and plots every per-step quantity as the mean over seeds with a 95%
# Student-t band, next to the held-out accuracy at the evaluated steps. A
# table then gives each method's final held-out numbers with their intervals
# and its difference from the baseline, paired by seed.
#
# It reads the toy study's layout (`runs/study/toy/<method>/s<seed>`, from
# `python experiments/study.py --grid experiments/grids/toy.yaml`) by default;
# point `RUN_GLOBS` at any run directories of your own. The helpers are in
# `erpo_jax.analysis`.
#
# **When no run directory matches** (a fresh clone, CI), the notebook trains
# two tiny runs itself, GRPO and ERPO, 12 steps and one seed each (about a
# minute or two on a laptop CPU), so that it always runs top to bottom. Those
# curves show the plotting only; 12 steps of one seed say nothing about the
# methods.

# %%
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

# Run from the repository root (relative paths below), also when opened from notebooks/.
_here = Path.cwd().resolve()
for _p in [_here, *_here.parents]:
    if (_p / "pyproject.toml").is_file() and (_p / "erpo_jax").is_dir():
        os.chdir(_p)
        break
# tqdm (progress bars of the library) warns that ipywidgets is missing; text bars are fine.
warnings.filterwarnings("ignore", message="IProgress not found")

import matplotlib.pyplot as plt

from erpo_jax import analysis

# %% [markdown]
# ## Parameters
#
# `RUN_GLOBS`: method label -> a glob pattern of its run directories (one per
# seed). The first entry, or `BASELINE`, is the reference of the paired
# differences. The environment variable `ERPO_JAX_NOTEBOOK_RUN_GLOBS` (a JSON
# object of the same form) overrides it, and `ERPO_JAX_NOTEBOOK_CHECKPOINT`
# sets the model of the fallback runs (default: the toy Countdown base model).

# %%
RUN_GLOBS = {
    "GRPO": "runs/study/toy/grpo/s*",
    "ERPO": "runs/study/toy/erpo/s*",
    "ERPO, gate off": "runs/study/toy/erpo_gate_off/s*",
    "ERPO, no progress (eta=0)": "runs/study/toy/erpo_no_progress/s*",
}
BASELINE = "GRPO"
KEYS = ["reward_mean", "entropy_mean", "response_length_mean", "cdp_frac", "sign_flip_frac"]
EVAL_KEY = "pass_at_1_sampled"  # held-out panel; None to leave it out
SMOOTH = 10  # trailing moving average over steps
ONLY_FINISHED = True  # a method with finished runs shows only those
FALLBACK_STEPS = 12  # length of the fallback runs
TITLES = {
    "eval/pass_at_1_sampled": "held-out pass@1 (sampled)",
    "reward_mean": "training reward",
    "entropy_mean": "token entropy (nats)",
    "response_length_mean": "response length (tokens)",
    "cdp_frac": "CDP fraction (gate > 0.5; ERPO only)",
    "sign_flip_frac": "sign-flip fraction (ERPO only)",
}

if os.environ.get("ERPO_JAX_NOTEBOOK_RUN_GLOBS"):
    RUN_GLOBS = json.loads(os.environ["ERPO_JAX_NOTEBOOK_RUN_GLOBS"])
    BASELINE = next(iter(RUN_GLOBS))
CHECKPOINT = os.environ.get("ERPO_JAX_NOTEBOOK_CHECKPOINT") or "toy"

# %% [markdown]
# ## Load the runs

# %%
groups = {}
for label, pattern in RUN_GLOBS.items():
    runs = analysis.load_runs(pattern)
    finished = [r for r in runs if r.finished]
    if ONLY_FINISHED and finished:
        runs = finished
    if runs:
        groups[label] = runs
    status = ", ".join(
        f"s{r.seed}: {len(r.steps)} steps{'' if r.finished else ' (running)'}"
        for r in analysis.load_runs(pattern)
    )
    print(f"{label:28s} {pattern:40s} {status or 'no runs'}")

# %% [markdown]
# ## Fallback: two tiny runs
#
# Only when nothing above matched. `erpo_jax.train.train` with the default toy
# config, shrunk: 2 prompts x 4 answers per step, `FALLBACK_STEPS` steps, 8
# held-out problems x 4 samples every 4 steps (evaluation batches have the
# training batch's shape, so nothing compiles twice). The runs go to a
# temporary directory.

# %%
fallback_dir = None
if not groups:
    from erpo_jax.train import load_config, train

    fallback_dir = Path(tempfile.mkdtemp(prefix="erpo_jax_curves_"))
    print(f"no run directory matched; training two tiny runs in {fallback_dir}")
    RUN_GLOBS = {"GRPO": str(fallback_dir / "grpo/s*"), "ERPO": str(fallback_dir / "erpo/s*")}
    BASELINE, SMOOTH = "GRPO", 3
    for label, loss in (("GRPO", "grpo"), ("ERPO", "erpo")):
        config = load_config(
            None,
            [
                f"loss.name={loss}",
                f"model.checkpoint={CHECKPOINT}",
                f"steps={FALLBACK_STEPS}",
                "seed=0",
                "rollout.prompts_per_step=2",
                "rollout.group_size=4",
                "eval_every=4",
                "eval.num_problems=8",
                "eval.batch_size=2",
                "eval.num_samples=4",
                "eval.greedy=false",
                "checkpoint_every=0",
                "progress=false",
            ],
        )
        summary = train(config, out=fallback_dir / loss / "s0", log=lambda _: None)
        print(f"{label}: {summary['steps']} steps in {summary['wall_seconds']:.0f} s")
        groups[label] = analysis.load_runs(RUN_GLOBS[label])

# %% [markdown]
# ## Curves
#
# One panel per quantity, one line per method (mean over its seeds, `n` in the
# legend) with the 95% t band over seeds (no band from a single seed).
# Per-step training quantities are smoothed by a trailing moving average of
# `SMOOTH` steps; the held-out panel is unsmoothed, at the evaluated steps.
# Methods that do not log a quantity (the gate diagnostics outside ERPO) are
# absent from its panel. Curves stop at the last step all of a method's runs
# reached.

# %%
fig = analysis.plot_curves(groups, KEYS, eval_key=EVAL_KEY, smooth=SMOOTH, titles=TITLES)
plt.show()

# %% [markdown]
# ## Final held-out numbers
#
# From each finished run's `summary.json` (`after`: the evaluation at the last
# step): mean over seeds with its 95% t interval, and the difference from the
# baseline paired by seed (only seeds both methods have). Entropy collapse is
# the ratio of the final to the initial held-out token entropy.


# %%
def final_metrics(run):
    """Final held-out numbers of one finished run (NaN where a metric is absent)."""
    after, before = run.summary.get("after") or {}, run.summary.get("before") or {}
    pass_k = after.get("pass_at_k") or {}
    k_max = max(pass_k, key=int) if pass_k else None

    def num(x):
        return math.nan if x is None else float(x)

    h0, h1 = num(before.get("mean_token_entropy")), num(after.get("mean_token_entropy"))
    return {
        "pass@1 sampled": num(after.get("pass_at_1_sampled")),
        "pass@1 greedy": num(after.get("pass_at_1_greedy")),
        f"pass@{k_max or 'k'}": num(pass_k.get(k_max)) if k_max else math.nan,
        "length": num(after.get("mean_response_length")),
        "entropy": h1,
        "entropy end/start": h1 / h0 if h0 and h0 > 0 else math.nan,
    }


finals = {
    label: {r.seed: final_metrics(r) for r in runs if r.finished} for label, runs in groups.items()
}
columns = list(next((m for f in finals.values() for m in f.values()), {}))


def fmt(mean, low, high):
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if math.isnan(low) else f"{mean:.3f} [{low:.3f}, {high:.3f}]"


table = {}
for label, by_seed in finals.items():
    row = {"n": len(by_seed)}
    for col in columns:
        row[col] = analysis.t_interval([m[col] for m in by_seed.values()])
    if label != BASELINE and BASELINE in finals:
        base = finals[BASELINE]
        row["Δ pass@1 vs " + BASELINE] = analysis.paired_difference(
            {s: m["pass@1 sampled"] for s, m in by_seed.items()},
            {s: m["pass@1 sampled"] for s, m in base.items()},
        )
    table[label] = row

for label, row in table.items():
    print(f"{label}  (finished runs: {row['n']})")
    for col in columns:
        print(f"    {col:22s} {fmt(*row[col])}")
    for col, value in row.items():
        if col.startswith("Δ"):
            mean, low, high, n = value
            print(f"    {col:22s} {fmt(mean, low, high)}  (paired over {n} seeds)")

# %% [markdown]
# Reading the table: an interval that contains 0 for a paired difference means
# these seeds cannot tell the method from the baseline. With the toy study's 5
# seeds a t interval is wide (t = 2.78 for 4 degrees of freedom): only large
# effects show. The study's own summary, with every method and the verdict on
# ERPO's three claims, is `docs/results/toy.md`
# (`python experiments/summarize.py --grid experiments/grids/toy.yaml`).
