#!/usr/bin/env bash
# Stop the cluster started by up.sh (or the one whose state folder is given, or every recorded one with --all).
# Only the PIDs the harness recorded are signalled; its network namespaces, bridge and cgroups are removed.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PY ]] || PY=python3
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m k8s_harness down "$@"
