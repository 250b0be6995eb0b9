"""The accelerator benchmark runs where it is meant to be run: rarely, on a lent GPU.

``benchmarks/accelerator.sh`` is run only when a GPU or TPU is lent (minutes
of device time, one try), so its Python parts are smoke-run here on the CPU
with tiny shapes (``--smoke``): a broken flag or a renamed trainer function
then fails this test instead of the device run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _rows(*args: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_accelerator_model_bench_smoke_runs_decode_phases_and_a_train_step():
    rows = _rows("benchmarks/accelerator.py", "--smoke", "--decode-phases", "2")
    decode, train = (next(r for r in rows if r.get("bench") == b) for b in ("decode", "train_step"))
    assert (decode["rows"], decode["new_tokens"], decode["decode_phases"]) == (16, 16, 2)
    assert decode["tokens_per_second"] == pytest.approx(16 * 16 / decode["seconds"])
    # Slots per step, 16 rows in groups of 8, prompt 16, 16 new tokens (15 decode
    # steps), KV bytes per slot 2 * 2 layers * 2 KV heads * 16 * 2 (bf16) = 256:
    # the cache written so far averages 16 + 16 / 2 slots per row; the sampler
    # streams each group's prompt once and, in 2 phases ending before steps 9
    # and 16, 8 own slots for 8 steps and 15 for 7.
    needed = 16 * (16 + 16 / 2)
    read = 2 * 16 + 16 * (8 * 8 + 7 * 15) / 15
    gap = (decode["bytes_per_step_gb"] - decode["bytes_read_per_step_gb"]) * 1e9
    assert gap == pytest.approx((needed - read) * 256, rel=1e-6)
    assert train["rows"] == 16 and train["seconds"] > 0
    assert 0 < train["loss"] < 10  # a finite GRPO loss of a random model


def test_accelerator_decode_bench_defaults_to_the_auto_rule():
    rows = _rows("benchmarks/accelerator.py", "--smoke", "--bench", "decode")
    assert [r["bench"] for r in rows] == ["decode"]  # no train step
    assert rows[0]["decode_phases"] == 1  # 16 new tokens: one loop by the auto rule


def test_attention_bench_runs_in_bfloat16():
    rows = _rows(
        "benchmarks/attention.py", "--dtype", "bfloat16", "--lengths", "128", "--repeats", "1"
    )
    assert [(r["impl"], r["dtype"], r["seq_len"]) for r in rows] == [
        ("xla", "bfloat16", 128),
        ("chunked", "bfloat16", 128),
    ]
    assert all(r["temp_mib"] > 0 and r["value_and_grad_seconds"] > 0 for r in rows)


@pytest.mark.slow
def test_accelerator_rollout_bench_smoke_against_transformers():
    pytest.importorskip("transformers")
    rows = _rows("benchmarks/accelerator.py", "--smoke", "--bench", "rollout", "--repeats", "1")
    impls = [r["impl"] for r in rows]
    assert impls[0] == "erpo_jax" and "transformers" in impls and impls[-1] == "ratio"
