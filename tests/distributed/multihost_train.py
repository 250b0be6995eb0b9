"""One process of a multi-host run on CPU, for tests/distributed/test_multihost.py.

``python multihost_train.py PROCESS_ID NUM_PROCESSES PORT WORKDIR CHECKPOINT``

The run has 4 CPU devices in all: ``4 / NUM_PROCESSES`` per process, the
processes joined by ``jax.distributed`` (gloo collectives) through
``localhost:PORT``. Each process:

1. trains ``erpo-jax train``'s loop (``train``) for 2 ERPO steps on the tiny
   checkpoint with ``mesh.data=2, mesh.fsdp=2``, the run directory
   ``WORKDIR/run`` (process 0 writes metrics and summary), with a stand-in
   reward the random policy earns (even completion lengths);
2. samples its own rows (``sample(..., mesh=)``, one key split over all rows,
   stop strings) and writes them to ``WORKDIR/sample_<PROCESS_ID>.npz``;
3. checks token ids of a global array (an out-of-vocabulary id on the last
   process is refused on every process) and exports the mesh-placed policy
   with ``save_hf_checkpoint`` to ``WORKDIR/export`` (process 0 writes).

With ``NUM_PROCESSES=1`` it is the single-process reference of the same
run. Prints ``OK``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

pid, procs, port, workdir, checkpoint = sys.argv[1:6]
pid, procs = int(pid), int(procs)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // procs}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from erpo_jax.models import load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from erpo_jax.models.decoder import _check_ids  # noqa: E402
from erpo_jax.sampling import global_rows, local_rows, sample  # noqa: E402
from erpo_jax.tasks import CountdownTask  # noqa: E402
from erpo_jax.train import MeshConfig, load_config, make_mesh, place_params, train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from tests.train.test_train_loop import _overrides  # noqa: E402

# The tiny run of the train-loop tests, on a (data=2, fsdp=2) mesh.
overrides = _overrides(
    checkpoint, "steps=2", "checkpoint_every=1", "eval_every=0", "mesh.data=2", "mesh.fsdp=2"
)
if procs > 1:
    overrides += [
        "mesh.distributed=true",
        f"mesh.coordinator_address=localhost:{port}",
        f"mesh.num_processes={procs}",
        f"mesh.process_id={pid}",
    ]
# A random tiny policy never solves Countdown: a reward it does earn (even
# completion lengths, in characters) gives the groups advantages and the
# update a gradient to compare. Rewards are scored in-process.
CountdownTask.reward = lambda self, completion, problem: float(len(completion) % 2 == 0)
train(load_config(None, overrides), out=os.path.join(workdir, "run"), log=lambda _: None)
assert jax.process_count() == procs and jax.device_count() == 4, jax.devices()

# --- the sampler alone: each process feeds its own rows --------------------
model, config = load_hf_checkpoint(checkpoint)
graphdef, params = nnx.split(model)
mesh = make_mesh(MeshConfig(data=2, fsdp=2), jax.devices())
placed = place_params(params, mesh, head_dim=config.head_dim)
P, G, S, T = 4, 4, 6, 10
rng = np.random.default_rng(0)
prompts = rng.integers(3, 90, (P, S)).astype(np.int32)
starts = np.array([2, 3, 0, 1])  # left padding: process 0's prompts are narrower
pmask = np.arange(S)[None] >= starts[:, None]
rows = slice(pid * P // procs, (pid + 1) * P // procs)
local_p = prompts[rows][:, pmask[rows].any(axis=0)]  # trim the shared left padding
local_m = pmask[rows][:, pmask[rows].any(axis=0)]
tokens, mask = np.repeat(local_p, G, axis=0), np.repeat(local_m, G, axis=0)


class Chars:
    """Ids as letters: a tokenizer for the stop-string check."""

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)


out = sample(
    (graphdef, placed),
    tokens,
    mask,
    jax.random.key(3),
    max_new_tokens=T,
    temperature=1.0,
    eos_ids=(2,),
    pad_id=0,
    group_size=G,
    stop_strings=("C", "QQ"),
    tokenizer=Chars(),
    stop_check_every=2,
    mesh=mesh,
)
np.savez(
    os.path.join(workdir, f"sample_{pid}.npz"),
    **{f: local_rows(getattr(out, f)) for f in ("tokens", "logp", "entropy", "mask", "lengths")},
)

# --- arrays spread over the processes: the id check and the HF export -------
ids = np.full((4 // procs, 5), 3, np.int32)  # 4 rows in all, one a device
_check_ids(global_rows(mesh, ids), config.vocab_size)  # in range: passes
ids[-1, 4] = config.vocab_size + 7 if pid == procs - 1 else 3  # only the last process's rows
try:
    _check_ids(global_rows(mesh, ids), config.vocab_size)
except ValueError as err:  # every process refuses, its own rows in range or not
    assert str(config.vocab_size + 7) in str(err), err
else:
    raise AssertionError("an out-of-vocabulary id on another process was not refused")
# Every process gathers the sharded weights; process 0 writes them.
save_hf_checkpoint(nnx.merge(graphdef, placed), config, os.path.join(workdir, "export"))
print("OK")
