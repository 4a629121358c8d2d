#!/usr/bin/env bash
# Start a throw-away Kubernetes v1.20 cluster (etcd, apiserver, controller-manager, scheduler) plus the process
# kubelet, with the repo's crds/ installed. Builds the control plane on first use (~7 min, cached after).
# The processes keep running after this script returns. Use:   eval "$(tests/cluster/up.sh)"
# The last line printed is `export KUBECONFIG=...`. Stop with tests/cluster/down.sh.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PY ]] || PY=python3
[[ $(id -u) == 0 ]] || { echo "up.sh needs root (network namespaces, cgroups, mounts)" >&2; exit 1; }
bash "$ROOT/.ci/k8s-build.sh" >&2
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m k8s_harness up "$@"
