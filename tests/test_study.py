"""The study tooling: erpo_jax.analysis (intervals, run loading), experiments/study.py
(grid expansion, identical budgets, resumability, errors) and experiments/summarize.py
(tables, paired differences and the verdict rule), on run directories written here."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from erpo_jax import analysis

ROOT = Path(__file__).resolve().parents[1]
TOY_GRID = ROOT / "experiments" / "grids" / "toy.yaml"


def _module(name: str):
    path = ROOT / "experiments" / f"{name}.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


study = _module("study")
summarize = _module("summarize")


# ------------------------------------------------------------------ statistics


def test_t_interval_hand_values():
    # mean 2, sd 1, n 3: half-width t_{0.975, 2} / sqrt(3) = 4.302652729749464 / 1.7320508
    mean, lo, hi = analysis.t_interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert hi - mean == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-9)
    assert mean - lo == pytest.approx(hi - mean, rel=1e-9)
    # all-equal replicates: a zero-width interval, not NaN
    assert analysis.t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    # one seed: no interval; NaNs are dropped
    m1, lo1, hi1 = analysis.t_interval([0.25, math.nan])
    assert m1 == 0.25 and math.isnan(lo1) and math.isnan(hi1)


def test_paired_difference_uses_only_common_seeds():
    a = {0: 1.0, 1: 3.0, 2: 5.0}
    b = {0: 0.0, 1: 1.0, 2: 2.0, 3: 100.0}  # seed 3 has no partner
    mean, _, hi, n = analysis.paired_difference(a, b)
    assert n == 3 and mean == 2.0  # diffs 1, 2, 3
    assert hi - mean == pytest.approx(4.302652729749464 / math.sqrt(3))


def test_moving_average_is_trailing():
    np.testing.assert_allclose(
        analysis.moving_average(np.array([1.0, 2.0, 3.0, 4.0]), 2), [1.0, 1.5, 2.5, 3.5]
    )
    np.testing.assert_allclose(analysis.moving_average(np.array([4.0, 2.0]), 1), [4.0, 2.0])


# ------------------------------------------------------------------ run directories


def _fake_run(path: Path, seed: int, *, loss: str, after: dict, entropy0=0.2, steps=4) -> None:
    """A run directory as erpo-jax train writes it (config, metrics, summary)."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "loss": {"name": loss}}))
    before = {"pass_at_1_sampled": 0.1, "mean_token_entropy": entropy0}
    lines = [json.dumps({"step": 0, **{f"eval/{k}": v for k, v in before.items()}})]
    for s in range(steps):
        lines.append(json.dumps({"step": s, "reward_mean": 0.1 * s + seed, "entropy_mean": 0.5}))
    lines.append(json.dumps({"step": steps, **{f"eval/{k}": v for k, v in after.items()}}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = {"before": before, "after": after, "wall_seconds": 120.0 + seed}
    (path / "summary.json").write_text(json.dumps(summary))


def test_load_run_splits_training_and_eval_records(tmp_path):
    run_dir = tmp_path / "r"
    _fake_run(run_dir, 3, loss="grpo", after={"pass_at_1_sampled": 0.4})
    # a resumed run repeats step 2 (the last record wins) and a torn last line is skipped
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "reward_mean": 9.0}) + "\n" + '{"step": 5, "rew')
    run = analysis.load_run(run_dir)
    assert run.seed == 3 and run.finished
    steps, reward = run.series("reward_mean")
    np.testing.assert_array_equal(steps, [0, 1, 2, 3])
    np.testing.assert_allclose(reward, [3.0, 3.1, 9.0, 3.3])
    assert sorted(run.evals) == [0, 4]
    assert run.eval_series("pass_at_1_sampled")[1].tolist() == [0.1, 0.4]
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl is missing"):
        analysis.load_run(tmp_path)


# ------------------------------------------------------------------ the grid


def test_toy_grid_expands_to_every_method_and_seed_with_identical_budgets():
    grid = study.load_grid(TOY_GRID)
    main = [r for r in grid.runs if r.part == "main"]
    assert len(grid.methods) == 14 and len(main) == 14 * 5
    assert {r.seed for r in main} == {0, 1, 2, 3, 4}
    assert len([r for r in grid.runs if r.part == "sweep"]) == 6 * 3
    # seed-major order: all of seed 0 before any of seed 1
    assert [r.seed for r in main] == sorted(r.seed for r in main)

    from erpo_jax.train import config_to_dict, load_config

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    # Identical budgets: at one seed, configs differ only in what defines the method.
    method_keys = ("loss.", "rollout.reft", "rollout.dynamic_sampling", "model.lora_rank")
    configs = {
        r.method: dict(flat(config_to_dict(load_config(None, list(r.overrides)))))
        for r in main
        if r.seed == 0
    }
    base = configs["grpo"]
    for method, cfg in configs.items():
        differing = {k for k in base if cfg[k] != base[k]}
        assert all(k.startswith(method_keys) for k in differing), (method, differing)
    assert configs["grpo"]["steps"] == 100 and configs["arca"]["model.lora_rank"] == 16
    assert configs["erpo_no_progress"]["loss.eta"] == 0
    assert configs["dapo"]["rollout.dynamic_sampling"] is True


def test_grid_errors_name_the_key(tmp_path):
    bad = tmp_path / "g.yaml"
    bad.write_text("name: x\nout: o\nseeds: [0]\nmethods: {a: [loss.name=grpo]}\nsedes: [1]\n")
    with pytest.raises(study.GridError, match=r"unknown key.*sedes"):
        study.load_grid(bad)
    bad.write_text("name: x\nout: o\nseeds: [0]\n")
    with pytest.raises(study.GridError, match="missing key 'methods'"):
        study.load_grid(bad)
    bad.write_text("name: x\nout: o\nseeds: [0]\nmethods: {a: [loss.nmae=grpo]}\n")
    grid = study.load_grid(bad)
    with pytest.raises(study.GridError, match=r"run a seed 0: .*loss\.nmae"):
        study.check_configs(list(grid.runs))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        study.load_grid(tmp_path / "missing.yaml")
    assert study.main(["--grid", str(bad), "--list"]) == 2


def test_run_status_and_resume_command(tmp_path):
    run = study.Run("grpo", 1, ("loss.name=grpo", "seed=1"), tmp_path / "grpo" / "s1", "main")
    assert study.run_status(run) == "todo"
    cmd = study.command(run, resume=True)
    assert cmd[-3:] == ["--resume", "loss.name=grpo", "seed=1"]
    assert cmd[cmd.index("--out") + 1] == str(run.directory)
    _fake_run(run.directory, 1, loss="grpo", after={})
    assert study.run_status(run) == "done"


# ------------------------------------------------------------------ the summary


def test_verdict_rule():
    assert summarize.judge(0.05, 0.01, 0.09, 5, +1) == "supported"
    assert summarize.judge(-3.0, -5.0, -1.0, 5, -1) == "supported"  # shorter answers
    assert summarize.judge(0.05, -0.01, 0.09, 5, +1).startswith("not shown")
    assert summarize.judge(-0.05, -0.09, -0.01, 5, +1).startswith("contradicted")
    assert summarize.judge(0.05, math.nan, math.nan, 1, +1).startswith("undecided")


def test_summary_tables_and_verdict_from_run_directories(tmp_path):
    out = tmp_path / "study"
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(
        yaml.safe_dump(
            {
                "name": "mini",
                "out": str(out),
                "baseline": "grpo",
                "seeds": [0, 1, 2],
                "methods": {"grpo": ["loss.name=grpo"], "erpo": ["loss.name=erpo"]},
            }
        )
    )
    # ERPO beats GRPO by 0.10, 0.12, 0.14 at seeds 0, 1, 2: paired mean 0.12.
    for seed in range(3):
        _fake_run(
            out / "grpo" / f"s{seed}",
            seed,
            loss="grpo",
            after={
                "pass_at_1_sampled": 0.2,
                "pass_at_1_greedy": 0.3,
                "mean_token_entropy": 0.1,
                "mean_response_length": 20.0,
            },
        )
        _fake_run(
            out / "erpo" / f"s{seed}",
            seed,
            loss="erpo",
            after={
                "pass_at_1_sampled": 0.3 + 0.02 * seed,
                "pass_at_1_greedy": 0.3,
                "mean_token_entropy": 0.1,
                "mean_response_length": 20.0,
            },
        )
    results = tmp_path / "results"
    assert summarize.main(["--grid", str(grid_file), "--results", str(results)]) == 0
    text = (results / "mini.md").read_text()
    assert "Finished runs: 6 of 6" in text
    half = 4.302652729749464 * 0.02 / math.sqrt(3)
    assert f"| erpo | 3 | +0.120 [{0.12 - half:.3f}, {0.12 + half:.3f}]" in text
    assert "(held-out pass@1, sampled)**: supported" in text
    assert "(held-out pass@1, greedy)**: not shown" in text
    assert "| erpo | 3 | 0.320 ± 0.050 |" in text  # mean 0.32, half-width 0.0497
    assert (results / "mini_methods.png").stat().st_size > 1000
