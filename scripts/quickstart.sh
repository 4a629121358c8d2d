#!/usr/bin/env bash
# The quickstart: set up .venv, then run examples/quickstart.yaml (a LoRA DreamBooth run on the tiny model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec dreambooth run examples/quickstart.yaml "$@"
