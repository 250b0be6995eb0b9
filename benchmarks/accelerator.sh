#!/usr/bin/env bash
# One short accelerator check (GPU or TPU), printing JSON lines and test results:
#   1. decode tokens/s with its fraction of the HBM roofline, and train-step
#      MFU, for a Qwen3-0.6B-shaped random model in bf16 (accelerator.py);
#   2. on a GPU with torch: the rollout against transformers generate on the
#      same device, weights and rows (accelerator.py --bench rollout);
#   3. the accelerator-only tests (pytest -m gpu: cuDNN attention parity);
#   4. the float32 and bf16 parity against transformers on the device
#      (tests/models/test_hf_parity.py; needs torch);
#   5. attention memory and time, xla / chunked / cuDNN in bf16, at S = 1k,
#      4k and 8k (attention.py);
#   6. the decode bench again with 4 decode phases (the sampler's auto rule
#      keeps one loop off CPU; this measures what phases give on the device).
# Stages 4-6 each run under a time limit (STAGE_TIMEOUT seconds, default
# 240), after the first three, so a short lease still gets those.
# Uses the current python3 when its JAX already sees an accelerator and the
# project's requirements import; otherwise installs the project with the
# matching JAX extra into .venv-accel first.
#   bash benchmarks/accelerator.sh            # auto-detects nvidia-smi (cuda) or TPU
#   EXTRA=cuda bash benchmarks/accelerator.sh # or EXTRA=tpu
# Extra arguments go to accelerator.py (e.g. --rows 128 --new-tokens 256).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! $PY -c "import jax, sys, erpo_jax.train; sys.exit(jax.default_backend() == 'cpu')"; then
  if [ -z "${EXTRA:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then EXTRA=cuda; else EXTRA=tpu; fi
  fi
  python3 -m venv .venv-accel && . .venv-accel/bin/activate && pip install -q -e ".[${EXTRA}]" || exit 1
  PY=python
fi
$PY -c "import jax, flax; print({'jax': jax.__version__, 'flax': flax.__version__, 'devices': [str(d) for d in jax.devices()]})"
status=0
$PY benchmarks/accelerator.py "$@" || status=1
if $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  # JAX takes 75% of the device memory by default; leave torch room.
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 $PY benchmarks/accelerator.py --bench rollout "$@" || status=1
fi
# tests/conftest.py pins the CPU unless JAX_PLATFORMS is set; empty means "any".
JAX_PLATFORMS= $PY -m pytest -m gpu -n 0 -p no:cacheprovider -q tests/models/test_attention_gpu.py \
  || status=1
limit=${STAGE_TIMEOUT:-240}
if $PY -c "import torch, transformers" 2>/dev/null; then
  JAX_PLATFORMS= timeout "$limit" $PY -m pytest -n 0 -p no:cacheprovider -q \
    tests/models/test_hf_parity.py || status=1
fi
impls="xla chunked"
if $PY -c "import sys, jax; sys.exit(jax.default_backend() != 'gpu')"; then impls="$impls cudnn"; fi
JAX_PLATFORMS= timeout "$limit" $PY benchmarks/attention.py --dtype bfloat16 --impls $impls \
  --lengths 1024 4096 8192 || status=1
timeout "$limit" $PY benchmarks/accelerator.py --bench decode --decode-phases 4 "$@" || status=1
exit $status
