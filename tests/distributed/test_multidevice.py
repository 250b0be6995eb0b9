"""Losses and models on 8 simulated CPU devices (pmap, shard_map, mesh placement).

XLA_FLAGS must be set before jax is imported, so each check is a script
beside this file, run in a fresh Python process; it prints ``OK`` last.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "script",
    [
        "multidevice_losses.py",  # pmap, and shard_map data parallelism with psum
        "multidevice_models.py",  # load_hf_checkpoint onto an (fsdp, tensor) mesh
        # compiled HLO under pure data parallelism: no collective on activations
        "multidevice_hlo.py",
        # the splash kernel (interpret mode) per device under shard_map (~20 s)
        "multidevice_splash.py",
        # sample(..., mesh=) on data=8, no groups: row-sharded outputs equal one device's (~20 s)
        "multidevice_sampler.py plain@8x1x1",
        # every sampler case on two meshes (~3.5 min)
        pytest.param("multidevice_sampler.py", marks=pytest.mark.slow),
        # one ERPO train step on 3 meshes equals one device (~2.5 min on 2 cores)
        pytest.param("multidevice_train_step.py", marks=pytest.mark.slow),
    ],
)
def test_on_eight_devices(script):
    script, *args = script.split()  # a script's arguments follow its name
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name(script)), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("OK")
