#!/usr/bin/env bash
# One short accelerator check (GPU or TPU): decode tokens/s with its fraction of
# the HBM roofline, and train-step MFU, for a Qwen3-0.6B-shaped random model in
# bf16. Installs the project with the matching JAX extra, then prints JSON lines.
#   bash benchmarks/accelerator.sh            # auto-detects nvidia-smi (cuda) or TPU
#   EXTRA=cuda bash benchmarks/accelerator.sh # or EXTRA=tpu
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${EXTRA:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then EXTRA=cuda; else EXTRA=tpu; fi
fi
python3 -m venv .venv-accel && . .venv-accel/bin/activate
pip install -q -e ".[${EXTRA}]"
python -c "import jax; print(jax.devices())"
python benchmarks/accelerator.py "$@"
