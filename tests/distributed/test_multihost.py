"""Multi-host on one machine: two CPU processes joined by ``jax.distributed``.

The same 4-device run (``mesh.data=2, mesh.fsdp=2``) once as one process
and once as two processes of 2 devices each
(``tests/distributed/multihost_train.py``). Each process feeds only its own
prompts and rows (PromptStream shards, ``make_array_from_process_local_data``,
the sampler's per-process rows and lockstep stop-string loop), yet:

- the two-process run logs the same per-step metrics and the same
  before/after evaluation as the single process (a prompt's sampling key is
  its position in the global stream, whatever the process count);
- each process's sampled rows are exactly the single process's rows at its
  positions.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from erpo_jax.models import Decoder, save_hf_checkpoint
from erpo_jax.tasks import build_countdown_tokenizer
from erpo_jax.train import TIMING_KEYS, read_metrics

SCRIPT = Path(__file__).with_name("multihost_train.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(procs: int, workdir: Path, checkpoint: Path, env: dict) -> list[subprocess.Popen]:
    workdir.mkdir(parents=True)
    port = _free_port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                str(SCRIPT),
                str(i),
                str(procs),
                str(port),
                str(workdir),
                str(checkpoint),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(procs)
    ]


def _finish(popens: list[subprocess.Popen]) -> None:
    outputs = []
    for p in popens:
        try:
            out, _ = p.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            for q in popens:
                q.kill()
            raise
        outputs.append(out)
    for p, out in zip(popens, outputs, strict=True):
        assert p.returncode == 0 and out.strip().endswith("OK"), out[-4000:]


def _comparable(path: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in TIMING_KEYS and not k.endswith("seconds")}
        for r in read_metrics(path)
    ]


@pytest.mark.slow  # three processes compile the tiny run: ~3 min on 2 cores
def test_two_processes_match_one(tmp_path):
    from tests.train.test_train_loop import CONFIG

    checkpoint = tmp_path / "tiny_policy"
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    model.lm_head.set_value(jnp.asarray(rng.normal(0.0, 0.5, (32, 100)), jnp.float32))
    save_hf_checkpoint(model, CONFIG, checkpoint)
    build_countdown_tokenizer(checkpoint)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)

    one, two = tmp_path / "one", tmp_path / "two"
    # The two runs in parallel: the 2-process run's processes wait on each
    # other in collectives anyway.
    single = _launch(1, one, checkpoint, env)
    pair = _launch(2, two, checkpoint, env)
    _finish(single)
    _finish(pair)

    a, b = _comparable(one / "run" / "metrics.jsonl"), _comparable(two / "run" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 4
    updates = [r for r in a if "loss" in r]
    assert len(updates) == 2 and all(r["grad_norm"] > 1e-3 for r in updates)  # real updates
    assert 0 < updates[0]["reward_mean"] < 1
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key, va in ra.items():
            if isinstance(va, float):
                # The rows of a batch are in another order (process 0 holds
                # stream positions 0, 2; process 1 holds 1, 3): sums differ
                # in rounding only.
                np.testing.assert_allclose(rb[key], va, rtol=2e-4, atol=1e-6, err_msg=key)
            else:
                assert rb[key] == va, key
    sa = json.loads((one / "run" / "summary.json").read_text())
    sb = json.loads((two / "run" / "summary.json").read_text())
    # Evaluations: the same samples, so the same pass rates and lengths; the
    # mean entropies are sums over rows laid out on other devices, and after
    # training the parameters differ by the update's summation order (rounding).
    for phase in ("before", "after"):
        assert sb[phase].keys() == sa[phase].keys()
        for key, va in sa[phase].items():
            if isinstance(va, float):
                np.testing.assert_allclose(sb[phase][key], va, rtol=2e-5, err_msg=f"{phase} {key}")
            else:
                assert sb[phase][key] == va, (phase, key)
    assert sorted(p.name for p in (two / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [
        "1",
        "2",
    ]

    ref = np.load(one / "sample_0.npz")
    parts = [np.load(two / f"sample_{i}.npz") for i in range(2)]
    assert parts[0]["tokens"].shape[0] == parts[1]["tokens"].shape[0] == 8
    for field in ("tokens", "mask", "lengths"):
        got = np.concatenate([p[field] for p in parts])
        np.testing.assert_array_equal(got, ref[field], err_msg=field)
    for field in ("logp", "entropy"):
        got = np.concatenate([p[field] for p in parts])
        np.testing.assert_allclose(got, ref[field], rtol=1e-5, atol=1e-6, err_msg=field)
    # The stop strings cut some rows short (the check ran per process).
    assert (ref["lengths"] < 10).any()

    # The export of weights sharded over two processes is the checkpoint the
    # run loaded, byte for byte (gathered, then written once).
    weights = (checkpoint / "model.safetensors").read_bytes()
    for run in (one, two):
        assert (run / "export" / "model.safetensors").read_bytes() == weights, run
