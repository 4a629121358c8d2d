#!/usr/bin/env bash
# Create .venv and install the project with every extra. Idempotent: a second run installs nothing new.
# On a machine without an NVIDIA GPU, torch==2.13.0 (a CPU wheel) goes in first: any other torch request would
# pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.dreambooth-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
t0=$(date +%s)
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing PyPI's default (CUDA) torch"
    python -m pip install -q "torch>=2.4"
  else
    echo "[setup] no GPU: installing torch==2.13.0 (CPU)"
    python -m pip install -q torch==2.13.0
  fi
fi
echo "[setup] installing dreambooth-operator[trainer,operator,cli,dev]"
python -m pip install -q -e ".[trainer,operator,cli,dev]"
touch "$stamp"
echo "[setup] done in $(( $(date +%s) - t0 ))s"
