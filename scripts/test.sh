#!/usr/bin/env bash
# Every test tier, set up from nothing: .venv, the local Kubernetes (built once, cached), SeaweedFS (started by
# the tests themselves). Each tier prints its wall time. Pick tiers with TIERS="unit integration" (default: all
# but the opt-in tiers extended, upgrade and cuda-image).
# Extra arguments go to every pytest call (e.g. -x, -k NAME). The slowest tests of each tier are printed, so a
# budget overrun names its cause.
set -uo pipefail
cd "$(dirname "$0")/.."
TIERS=${TIERS:-"lint unit integration cluster packaging"}
bash scripts/setup.sh || exit 1
. .venv/bin/activate
# One intra-op thread per process: default threading on a shared 2-core machine is up to 100x slower.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
failed=()
summary=()
run_tier() {
  local name=$1; shift
  local t0=$(date +%s)
  echo "=== tier $name: start $(date -u +%H:%M:%S)"
  "$@"
  local rc=$?
  [ $rc -eq 5 ] && rc=0   # pytest: no tests collected in this tier
  local dt=$(( $(date +%s) - t0 ))
  echo "=== tier $name: exit $rc, wall ${dt}s"
  summary+=("$name ${dt}s rc=$rc")
  [ $rc -eq 0 ] || failed+=("$name")
}
# Debian's tools the cluster and packaging tiers use (root only; a non-root run skips what needs them):
# buildah + debootstrap build images without a Docker engine, docker-registry is the real OCI registry,
# runc runs containers from images: the test cluster's image pods and the packaging tier's (crun 1.8 refuses
# this machine's hybrid cgroup layout); prometheus (with promtool) checks the chart's alerts and scrapes a
# real job in tests/{packaging,cluster}/test_monitoring.py; iptables routes the kubernetes Service's address to
# the apiserver for pods (the test cluster's kube-proxy); chromium (headless) renders the validation gallery of
# `dreambooth images` (tests/cluster/test_user_cli.py).
SYSTEM_PKGS=(buildah debootstrap docker-registry runc prometheus iptables chromium)
case " $TIERS " in *" cluster "*|*" packaging "*|*" cuda-image "*|*" upgrade "*|*" extended "*)
  missing=()
  for p in "${SYSTEM_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ "$(id -u)" = 0 ] && [ ${#missing[@]} -gt 0 ]; then
    run_tier system-deps bash -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${missing[*]} >/dev/null"
  fi ;;
esac
for tier in $TIERS; do
  case $tier in
    lint) run_tier lint bash -c "ruff check . && ruff format --check ." ;;
    unit) run_tier unit python -m pytest tests/unit -q "$@" ;;
    # Both cores: most integration tests run one single-threaded process at a time. Files stay whole on one
    # worker (module fixtures and a file's shared references are built once). PYTEST_WORKERS=0: serial.
    integration) run_tier integration python -m pytest tests/integration -q -m "not extended" --durations=15 \
      -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@" ;;
    cluster)
      run_tier k8s-build bash .ci/k8s-build.sh
      run_tier cluster python -m pytest tests/cluster -q -m "not extended" --durations=15 "$@" ;;
    packaging)
      run_tier packaging python -m pytest tests/packaging -q --durations=10 "$@" ;;
    extended)
      # Opt-in: slow variants of behaviour the default tiers already cover (a second SIGTERM, world size 2 of
      # SDXL, a 20 s S3 outage at the storage layer, operator restart + suspend on the real trainer).
      run_tier k8s-build bash .ci/k8s-build.sh
      run_tier extended python -m pytest tests/integration tests/cluster -q -m extended --durations=15 "$@" ;;
    upgrade)
      # Opt-in: helm upgrade from 0.1.0, whose operator image is built from its commit (pip from the index).
      run_tier k8s-build bash .ci/k8s-build.sh
      run_tier upgrade env DREAMBOOTH_UPGRADE_TEST=1 python -m pytest tests/cluster/test_helm_upgrade.py -q "$@" ;;
    cuda-image)
      # Opt-in (not in the default TIERS): the CUDA trainer image, ~4 GB from PyPI, ~15 GB of disk.
      run_tier cuda-image env DREAMBOOTH_CUDA_IMAGE=1 python -m pytest tests/packaging/test_image_build.py -q -m cuda_image "$@" ;;
    *) echo "unknown tier $tier"; failed+=("$tier") ;;
  esac
done
echo "=== summary: ${summary[*]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "=== FAILED tiers: ${failed[*]}"
  exit 1
fi
echo "=== all tiers passed"
