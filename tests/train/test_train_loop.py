"""``erpo_jax.train.train`` end to end on a tiny random model: outputs, metrics, exact resume.

Every run here uses the same tiny shapes (4 prompts x 4 completions, 10 new
tokens, 4 held-out problems), so the sampler, the scoring forward and the
update compile once per process. The resume test kills a real
``erpo-jax train`` process with SIGKILL and resumes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from erpo_jax.models import Decoder, ModelConfig, save_hf_checkpoint
from erpo_jax.tasks import build_countdown_tokenizer
from erpo_jax.train import TIMING_KEYS, ConfigError, load_config, read_metrics, train

CONFIG = ModelConfig(
    "qwen3",
    100,
    32,
    64,
    2,
    4,
    2,
    8,
    qk_norm=True,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_ids=(2,),
    pad_token_id=0,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_policy")
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    model.lm_head.set_value(jnp.asarray(rng.normal(0.0, 0.5, (32, 100)), jnp.float32))
    save_hf_checkpoint(model, CONFIG, path)
    build_countdown_tokenizer(path)
    return path


def _overrides(checkpoint, *extra):
    return [
        f"model.checkpoint={checkpoint}",
        "rollout.prompts_per_step=4",
        "rollout.group_size=4",
        "rollout.max_new_tokens=10",
        "rollout.reward_workers=0",
        "data.num_problems=40",
        "eval.num_problems=4",
        "eval.num_samples=2",
        "eval.batch_size=4",
        "progress=false",
        "optimizer.learning_rate=1e-2",
        *extra,
    ]


REQUIRED = (
    "step",
    "loss",
    "reward_mean",
    "skipped_long_prompts",
    "reward_std",
    "zero_std_group_frac",
    "response_length_mean",
    "response_length_max",
    "truncated_frac",
    "entropy_mean",
    "entropy_p90",
    "clip_frac_low",
    "clip_frac_high",
    "approx_kl",
    "kl",
    "grad_norm",
    "learning_rate",
    "logp_mismatch_mean",
    "logp_mismatch_max",
    "rollout_seconds",
    "reward_seconds",
    "update_seconds",
    "step_seconds",
    "tokens_per_second",
    "verifier_timeouts",
    # ERPO's own diagnostics
    "gate_mean",
    "cdp_frac",
    "psi_abs_mean",
)


def test_train_writes_outputs_and_metrics(checkpoint, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, _overrides(checkpoint, "steps=3", "checkpoint_every=2", "eval_every=2"))
    summary = train(cfg, out=out, log=lambda _: None)
    assert set(summary) >= {"before", "after", "wall_seconds"}
    # Provenance: the commit of this checkout (an editable install) ran steps 0..
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    (code,) = summary["code_history"]
    assert code["from_step"] == 0 and code["erpo_jax"] == "0.1.0"
    if head.returncode == 0:  # a git checkout (CI clones one)
        assert code["git_commit"] == head.stdout.strip()
    for part in ("before", "after"):
        assert set(summary[part]) >= {"pass_at_1_sampled", "pass_at_1_greedy", "pass_at_k"}
    assert json.loads((out / "summary.json").read_text())["after"] == summary["after"]
    assert load_config(out / "config.yaml") == cfg  # the resolved config reloads
    everything = read_metrics(out / "metrics.jsonl")
    records = [r for r in everything if "loss" in r]
    assert [r["step"] for r in records] == [0, 1, 2]
    # Evaluations after 0, 2 (eval_every) and 3 (the last) updates, each its own record.
    evals = [r for r in everything if "eval/pass_at_1_sampled" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    assert not any("loss" in r for r in evals)
    assert summary["periodic"]["step_2"]["pass_at_1_sampled"] == evals[1]["eval/pass_at_1_sampled"]
    for r in records:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert 0.0 <= r["reward_mean"] <= 1.0 and r["response_length_max"] <= 10
        # The passes ran on the longest completion rounded up to a multiple of
        # ceil(10 / train.length_buckets=4) = 3 columns, at most the budget 10.
        width = r["completion_width"]
        assert r["response_length_max"] <= width <= min(r["response_length_max"] + 2, 10)
        assert width % 3 == 0 or width == 10
        assert r["learning_rate"] == pytest.approx(1e-2)
    # Recomputed old_logp at step 0 equals the reference forward: ERPO's progress is 0.
    # old_logp is recomputed by the same compiled forward as ref_logp, and the
    # policy equals the reference at step 0: ERPO's progress signal is exactly 0.
    assert records[0]["progress_abs_mean"] == 0.0
    # After step 0 the policy has moved from the reference only if step 0 had
    # a gradient (a random policy often scores 0 everywhere: no signal).
    assert (records[1]["progress_abs_mean"] > 0.0) == (records[0]["grad_norm"] > 0.0)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 3]
    # Resuming this run with a different config names every differing key
    # (before anything is built or overwritten).
    changed = load_config(
        None,
        _overrides(checkpoint, "steps=4", "checkpoint_every=2", "eval_every=2", "loss.eta=0.5",
                   "seed=4"),
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"loss.eta \(checkpoint: 0.2, now: 0.5\); seed"):
        train(changed, out=out, resume=True, log=lambda _: None)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [0, 1, 2]


def test_dynamic_sampling_and_grpo(checkpoint, tmp_path):
    cfg = load_config(
        None,
        _overrides(
            checkpoint,
            "steps=1",
            "loss.name=dapo",
            "rollout.dynamic_sampling=true",
            "rollout.max_sampling_tries=2",
            "train.mini_batches=2",  # two updates per step, each on 2 of the 4 groups
        ),
    )
    train(cfg, out=tmp_path / "dapo", log=lambda _: None)
    (record,) = [r for r in read_metrics(tmp_path / "dapo" / "metrics.jsonl") if "loss" in r]
    # A random policy almost never solves Countdown: every group is all-zero,
    # so dynamic sampling tries twice and fills the batch with dropped groups.
    assert record["sampling_tries"] == 2
    assert record["dynamic_sampling_filled"] == 4
    assert record["zero_std_group_frac"] == 1.0


def _cli(checkpoint, out, *extra):
    flags = [e for e in extra if e.startswith("--")]
    keys = [e for e in extra if not e.startswith("--")]
    cmd = [
        sys.executable,
        "-m",
        "erpo_jax.cli",
        "train",
        "--out",
        str(out),
        *flags,
        *_overrides(checkpoint, "steps=6", "checkpoint_every=2", "eval_every=2", *keys),
    ]
    return cmd


def _comparable(path):
    return [
        {k: v for k, v in r.items() if k not in TIMING_KEYS and not k.endswith("seconds")}
        for r in read_metrics(path)
    ]


@pytest.mark.slow  # three training processes, ~2 min on 2 cores
def test_kill_and_resume_repeats_the_uninterrupted_run(checkpoint, tmp_path):
    # The three processes share a persistent compilation cache: the second and
    # third reuse the first one's executables instead of compiling again.
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cli(checkpoint, full), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(
        _cli(checkpoint, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    while time.time() < deadline:
        steps = [r["step"] for r in read_metrics(killed / "metrics.jsonl") if "loss" in r]
        # Kill after step 3, once checkpoint 2 is complete (Orbax renames it
        # from a temporary name when the save is finished).
        if steps and max(steps) >= 3 and (killed / "checkpoints" / "2").is_dir():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()  # it really died mid-run
    resumed = subprocess.run(
        _cli(checkpoint, killed, "--resume"), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _comparable(full / "metrics.jsonl"), _comparable(killed / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert a == b
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((killed / "summary.json").read_text())
    assert sa["after"] == sb["after"] and sa["before"] == sb["before"]
    # The resumed run records both starts: from step 0, and from its checkpoint.
    assert sb["resumed_from"] in (2, 4)
    assert [c["from_step"] for c in sb["code_history"]] == [0, sb["resumed_from"]]
