"""Loading a checkpoint onto an 8-device (fsdp, tensor) mesh and running it sharded.

XLA_FLAGS must be set before jax is imported, so the check runs in a fresh
Python process (multidevice_models.py beside this file).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_load_onto_mesh_and_forward():
    script = Path(__file__).with_name("multidevice_models.py")
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("OK")
