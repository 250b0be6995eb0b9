"""Summarize a study grid: the table with 95% intervals, paired differences, plots, verdict.

    python experiments/summarize.py --grid experiments/grids/toy.yaml     # docs/results/toy.md

Reads every finished run of the grid (``summary.json`` present; unfinished
runs are counted and left out) and writes ``<results>/<name>.md`` and its
PNG plots. Every figure in the tables is a mean over seeds with a Student-t
95% interval; each method's difference from the baseline is paired by seed
(only the seeds both finished). The verdict is computed from those paired
intervals by fixed rules stated in the file, never tuned by hand: a claim is
"supported" only when the whole interval lies on the claimed side of zero.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study import Grid, GridError, load_grid

from erpo_jax.analysis import RunData, load_run, paired_difference, t_interval

# (column, summary getter, format, label)
_FINAL = "after"


def _metric(run: RunData, name: str) -> float:
    s = run.summary or {}
    before, after = s.get("before", {}), s.get(_FINAL, {})
    if name == "pass1_sampled":
        return float(after.get("pass_at_1_sampled", math.nan))
    if name == "pass1_greedy":
        return float(after.get("pass_at_1_greedy", math.nan))
    if name == "pass8":
        return float(after.get("pass_at_k", {}).get("8", math.nan))
    if name == "length":
        return float(after.get("mean_response_length", math.nan))
    if name == "entropy":
        return float(after.get("mean_token_entropy", math.nan))
    if name == "entropy_ratio":
        start = before.get("mean_token_entropy", math.nan)
        return float(after.get("mean_token_entropy", math.nan)) / float(start)
    if name == "minutes":
        return float(s.get("wall_seconds", math.nan)) / 60
    raise KeyError(name)


COLUMNS = [
    ("pass1_sampled", "pass@1 sampled", "{:.3f}"),
    ("pass1_greedy", "pass@1 greedy", "{:.3f}"),
    ("pass8", "pass@8", "{:.3f}"),
    ("length", "length (tokens)", "{:.1f}"),
    ("entropy", "entropy end", "{:.3f}"),
    ("entropy_ratio", "entropy end/start", "{:.2f}"),
    ("minutes", "wall (min)", "{:.1f}"),
]


def _fmt(mean: float, lo: float, hi: float, fmt: str) -> str:
    if math.isnan(mean):
        return "–"
    if math.isnan(lo):
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {fmt.format((hi - lo) / 2)}"


def _fmt_diff(mean: float, lo: float, hi: float, n: int, fmt: str) -> str:
    if n == 0 or math.isnan(mean):
        return "–"
    if math.isnan(lo):
        return f"{fmt.format(mean)} (n=1)"
    sign = "+" if mean >= 0 else ""
    return f"{sign}{fmt.format(mean)} [{fmt.format(lo)}, {fmt.format(hi)}]"


def collect(grid: Grid) -> tuple[dict[str, list[RunData]], dict[str, int]]:
    """Finished runs by method, and the count of unfinished ones by method."""
    finished: dict[str, list[RunData]] = {}
    unfinished: dict[str, int] = {}
    for run in grid.runs:
        finished.setdefault(run.method, [])
        if (run.directory / "summary.json").is_file():
            finished[run.method].append(load_run(run.directory))
        else:
            unfinished[run.method] = unfinished.get(run.method, 0) + 1
    return finished, unfinished


def by_seed(runs: list[RunData], name: str) -> dict[int, float]:
    return {r.seed: _metric(r, name) for r in runs}


def table(methods: list[str], runs: dict[str, list[RunData]]) -> list[str]:
    head = "| method | seeds | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for m in methods:
        cells = []
        for name, _, fmt in COLUMNS:
            cells.append(_fmt(*t_interval(list(by_seed(runs[m], name).values())), fmt))
        lines.append(f"| {m} | {len(runs[m])} | " + " | ".join(cells) + " |")
    return lines


def diff_table(methods: list[str], runs: dict[str, list[RunData]], baseline: str) -> list[str]:
    cols = COLUMNS[:-1]
    head = f"| method − {baseline} | paired seeds | " + " | ".join(c[1] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    for m in methods:
        if m == baseline:
            continue
        cells, n = [], 0
        for name, _, fmt in cols:
            mean, lo, hi, n = paired_difference(
                by_seed(runs[m], name), by_seed(runs[baseline], name)
            )
            cells.append(_fmt_diff(mean, lo, hi, n, fmt))
        lines.append(f"| {m} | {n} | " + " | ".join(cells) + " |")
    return lines


def judge(mean: float, lo: float, hi: float, n: int, direction: int) -> str:
    """The fixed rule: supported iff the whole 95% interval is on the claimed side of 0."""
    if n < 2 or math.isnan(lo):
        return f"undecided (only {n} paired seed{'s' if n != 1 else ''})"
    lower, upper = sorted((direction * lo, direction * hi))
    if lower > 0:
        return "supported"
    if upper < 0:
        return "contradicted (the interval is entirely on the other side of 0)"
    return "not shown (the interval contains 0)"


def verdict(runs: dict[str, list[RunData]], baseline: str, method: str = "erpo") -> list[str]:
    if method not in runs or baseline not in runs:
        return []
    claims = [
        ("ERPO reaches higher accuracy than GRPO (held-out pass@1, sampled)", "pass1_sampled", +1),
        ("ERPO reaches higher accuracy than GRPO (held-out pass@1, greedy)", "pass1_greedy", +1),
        ("ERPO's entropy collapses more slowly (end/start entropy ratio)", "entropy_ratio", +1),
        ("ERPO gives shorter answers (mean response length)", "length", -1),
    ]
    lines = []
    for text, name, direction in claims:
        mean, lo, hi, n = paired_difference(
            by_seed(runs[method], name), by_seed(runs[baseline], name)
        )
        fmt = dict((c[0], c[2]) for c in COLUMNS)[name]
        lines.append(
            f"- **{text}**: {judge(mean, lo, hi, n, direction)}. "
            f"ERPO − GRPO = {_fmt_diff(mean, lo, hi, n, fmt)} over {n} paired seeds."
        )
    return lines


def ablation_lines(runs: dict[str, list[RunData]], base: str, ablations: list[str]) -> list[str]:
    lines = [
        f"| ablation − {base} | paired seeds | pass@1 sampled | pass@1 greedy | entropy end/start "
        "| length |",
        "|---|---|---|---|---|---|",
    ]
    for m in ablations:
        cells, n = [], 0
        for name in ("pass1_sampled", "pass1_greedy", "entropy_ratio", "length"):
            fmt = dict((c[0], c[2]) for c in COLUMNS)[name]
            mean, lo, hi, n = paired_difference(by_seed(runs[m], name), by_seed(runs[base], name))
            cells.append(_fmt_diff(mean, lo, hi, n, fmt))
        lines.append(f"| {m} | {n} | " + " | ".join(cells) + " |")
    return lines


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{model}, {os.cpu_count()} cores{mem}, CPU only ({platform.system()})"


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


PLOT_KEYS = ["reward_mean", "entropy_mean", "response_length_mean", "cdp_frac", "sign_flip_frac"]
PLOT_TITLES = {
    "eval/pass_at_1_sampled": "held-out pass@1 (sampled)",
    "reward_mean": "training reward (= accuracy), 10-step mean",
    "entropy_mean": "token entropy of the rollouts (nats)",
    "response_length_mean": "response length (tokens)",
    "cdp_frac": "ERPO: CDP token fraction (gate > 0.5)",
    "sign_flip_frac": "ERPO: sign-flip fraction",
}


def plots(grid: Grid, runs: dict[str, list[RunData]], results: Path) -> list[tuple[str, str]]:
    import matplotlib

    from erpo_jax.analysis import plot_curves

    matplotlib.use("Agg")
    figures = []
    families = [m for m in grid.methods if "_" not in m or m in ("dr_grpo", "entropy_top20")]
    erpo_like = [m for m in grid.methods if m.startswith("erpo")]
    sets = [
        ("methods", [grid.baseline] + [m for m in families if m != grid.baseline]),
        ("ablations", [grid.baseline, *erpo_like]),
        (
            "reft_arca",
            [grid.baseline, "erpo"]
            + [m for m in grid.methods if m.endswith("reft")]
            + [m for m in grid.methods if m == "arca"],
        ),
    ]
    shown: set[str] = set()
    for tag, methods in sets:
        groups = {m: runs[m] for m in dict.fromkeys(methods) if runs.get(m)}
        if not groups or set(groups) <= shown:
            continue  # nothing that an earlier figure did not already show
        shown |= set(groups)
        fig = plot_curves(
            groups, PLOT_KEYS, eval_key="pass_at_1_sampled", titles=PLOT_TITLES, smooth=10, ncols=2
        )
        name = f"{grid.name}_{tag}.png"
        fig.savefig(results / name, dpi=80)
        figures.append((tag, name))
    return figures


def write(grid: Grid, results: Path, argv: list[str], notes: Path | None = None) -> Path:
    runs, unfinished = collect(grid)
    results.mkdir(parents=True, exist_ok=True)
    main_methods = [m for m in grid.methods if runs.get(m)]
    lines = [
        f"# The {grid.name} study: ERPO against GRPO and its relatives",
        "",
        f"Generated by `python experiments/summarize.py {' '.join(argv)}` on "
        f"{time.strftime('%Y-%m-%d')} at commit `{commit()}`.",
        f"Runs: `python experiments/study.py --grid {grid_path(argv)}` (resumable).",
        f"Machine: {machine()}.",
        "",
        f"Finished runs: {sum(len(v) for v in runs.values())} of {len(grid.runs)}"
        + (
            "; unfinished: " + ", ".join(f"{m} ({n})" for m, n in unfinished.items())
            if unfinished
            else ""
        )
        + ".",
        "",
        "Each cell is the mean over seeds ± the half-width of a Student-t 95% interval "
        "(no ± with one seed). Evaluation: the held-out problems of the run config, "
        "after the last step; entropy is the mean token entropy of the held-out sampled "
        "completions, and end/start is its ratio to the evaluation before the first step. "
        "Wall time is that of each run on this machine, with other work running at the same "
        "time for some runs, so it compares methods only roughly.",
        "",
        "## Final held-out results",
        "",
        *table(main_methods, runs),
        "",
        f"## Differences from {grid.baseline}, paired by seed",
        "",
        "Mean of (method − baseline) over the seeds both finished, with its 95% t interval.",
        "",
        *diff_table(main_methods, runs, grid.baseline),
        "",
        "## Verdict on the paper's claims",
        "",
        "Rule, fixed before the runs: a claim is *supported* when the paired 95% interval of "
        "ERPO − GRPO lies entirely on the claimed side of zero, *contradicted* when it lies "
        "entirely on the other side, and *not shown* otherwise.",
        "",
        *verdict(runs, grid.baseline),
        "",
    ]
    ablations = [m for m in main_methods if m.startswith("erpo_") and not m.endswith("reft")]
    if "erpo" in runs and ablations:
        lines += [
            "## Which ERPO component carries the effect",
            "",
            "Each ablation minus full ERPO, paired by seed: a component matters when removing "
            "it moves a figure with an interval that excludes zero.",
            "",
            *ablation_lines(runs, "erpo", ablations),
            "",
        ]
    if grid.sweep:
        sweep = [m for m in grid.sweep if runs.get(m)]
        if sweep and grid.sweep_base:
            lines += [
                f"## Sensitivity of {grid.sweep_base} (one factor at a time)",
                "",
                *table([grid.sweep_base, *sweep], runs),
                "",
                *ablation_lines(runs, grid.sweep_base, sweep),
                "",
            ]
    if notes is not None and notes.is_file():
        # Hand-written reading of the numbers (kept beside the grid, so a
        # regenerated summary keeps it); it must be revised as runs finish.
        lines += ["## Notes (hand-written)", "", notes.read_text().strip(), ""]
    figures = plots(grid, runs, results)
    if figures:
        lines += ["## Plots", ""]
        for tag, name in figures:
            lines += [f"### {tag}", "", f"![{tag}]({name})", ""]
    path = results / f"{grid.name}.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def grid_path(argv: list[str]) -> str:
    return argv[argv.index("--grid") + 1] if "--grid" in argv else "GRID"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", required=True)
    parser.add_argument("--results", default="docs/results", help="output folder")
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.grid)
    except (GridError, FileNotFoundError) as err:
        print(f"summarize: {err}", file=sys.stderr)
        return 2
    # Hand-written notes beside the grid file: <grid stem>_notes.md.
    notes = Path(args.grid).with_name(Path(args.grid).stem + "_notes.md")
    path = write(grid, Path(args.results), argv, notes)
    print(f"summarize: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
