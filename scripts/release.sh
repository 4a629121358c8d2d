#!/usr/bin/env bash
# Release VERSION to REGISTRY: build both images from the Dockerfile, push them, package the chart and push it as
# an OCI artifact, then print every reference with its digest.
#
#   scripts/release.sh 0.2.0 ghcr.io/dreambooth-operator
#
#   REGISTRY/operator:VERSION                      the operator (Dockerfile target operator)
#   REGISTRY/trainer:VERSION                       the trainer, CUDA torch from PyPI (TORCH_VARIANT=cuda)
#   REGISTRY/trainer:VERSION-cpu                   the trainer, CPU torch (TORCH_VARIANT=cpu)
#   oci://REGISTRY/charts/dreambooth-operator     the chart, version VERSION
#
# The packaged chart points at these images: image.repository is REGISTRY/operator (tag = appVersion = VERSION)
# and the CRD's default trainer image is REGISTRY/trainer:VERSION (REGISTRY/trainer:VERSION-cpu when the CUDA
# build is skipped: then it is the release's only trainer). The repository's own chart is left as it is.
#
# Environment:
#   BASE_IMAGE            base of both images, pinned by digest (name@sha256:...); default: the Dockerfile's
#                         PYTHON_IMAGE. A base that is not pinned is refused: a release must be rebuildable.
#   RELEASE_SKIP_CUDA=1   no CUDA trainer (tests; registries for CPU-only clusters)
#   RELEASE_PLAIN_HTTP=1  the registry speaks plain HTTP (buildah --tls-verify=false, helm --plain-http)
#   RELEASE_WHEELS=DIR    the Dockerfile's `wheels` build context; default: a folder with the CPU torch wheel
#                         made by this machine's `pip download` (point PIP_EXTRA_INDEX_URL at
#                         https://download.pytorch.org/whl/cpu where pip does not find torch==X+cpu by itself)
#   RELEASE_PIP_NO_INDEX=1  install only from RELEASE_WHEELS, no index (offline, as the tests build)
#   BUILDAH               the buildah command, with storage flags if any (default: buildah)
#   HELM                  helm 3.8+ (default: helm on PATH, else the tests' tools cache)
# Needs buildah (and, for the builds, root or a rootless buildah setup), helm and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "release.sh: $*" >&2; exit 1; }
[ $# -eq 2 ] || die "usage: scripts/release.sh VERSION REGISTRY   (e.g. 0.2.0 ghcr.io/dreambooth-operator)"
VERSION=$1
REGISTRY=${2%/}
[[ $VERSION =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "VERSION $VERSION: give MAJOR.MINOR.PATCH, e.g. 0.2.0"
case $REGISTRY in
  *://*) die "REGISTRY $REGISTRY: give host[:port][/path] without a scheme (plain HTTP: RELEASE_PLAIN_HTTP=1)" ;;
esac

# One version everywhere (tests/packaging/test_version.py checks the rest of the tree).
repo_version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
chart_version=$(sed -n 's/^version: *//p' charts/dreambooth-operator/Chart.yaml)
app_version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/dreambooth-operator/Chart.yaml)
for pair in "pyproject.toml:$repo_version" "Chart.yaml version:$chart_version" "Chart.yaml appVersion:$app_version"; do
  [ "${pair##*:}" = "$VERSION" ] || die "VERSION $VERSION, but ${pair%:*} says ${pair##*:}: bump the tree first (README.md, Releasing)"
done

BASE_IMAGE=${BASE_IMAGE:-$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)}
[[ $BASE_IMAGE == *@sha256:* ]] || die "BASE_IMAGE $BASE_IMAGE is not pinned by digest: give name@sha256:..."

read -r -a BUILDAH_CMD <<< "${BUILDAH:-buildah}"
if [ -n "${HELM:-}" ]; then
  :
elif command -v helm >/dev/null; then
  HELM=helm
else
  HELM=$(python3 tests/cluster/k8s_harness/tools.py path helm) || die "helm not found: install helm 3.8+ or set HELM"
fi
tls=()
plain=()
if [ "${RELEASE_PLAIN_HTTP:-0}" = 1 ]; then tls=(--tls-verify=false); plain=(--plain-http); fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wheels=${RELEASE_WHEELS:-}
if [ -z "$wheels" ]; then
  wheels=$work/wheels
  torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
  python3 -m pip download --quiet --no-deps --only-binary=:all: "torch==${torch_version}+cpu" -d "$wheels" \
    || die "this machine's pip finds no torch==${torch_version}+cpu: set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu or RELEASE_WHEELS=DIR"
fi
no_index=0
[ "${RELEASE_PIP_NO_INDEX:-0}" = 1 ] && no_index=1
# Same created time for the same commit: a rebuild differs only where its inputs do.
epoch=$(git log -1 --format=%ct 2>/dev/null || date +%s)

build() {  # name target tag build-args...
  local name=$1 target=$2 tag=$3; shift 3
  local args=()
  for a in "$@"; do args+=(--build-arg "$a"); done
  echo "=== build $name: $tag" >&2
  local t0=$(date +%s)
  "${BUILDAH_CMD[@]}" bud --quiet --layers --isolation chroot --network host --timestamp "$epoch" \
    --target "$target" --build-arg "PYTHON_IMAGE=$BASE_IMAGE" --build-arg "PIP_NO_INDEX=$no_index" "${args[@]}" \
    --build-context "wheels=$wheels" -t "$tag" -f Dockerfile . >/dev/null
  echo "=== built $name in $(( $(date +%s) - t0 ))s" >&2
}

push() {  # name tag -> "name tag@digest"
  local name=$1 tag=$2
  local t0=$(date +%s)
  "${BUILDAH_CMD[@]}" push --quiet "${tls[@]}" --digestfile "$work/$name.digest" "$tag" "docker://$tag" >&2
  echo "=== pushed $name in $(( $(date +%s) - t0 ))s" >&2
  echo "$name $tag@$(cat "$work/$name.digest")"
}

refs=()
build operator operator "$REGISTRY/operator:$VERSION"
build trainer-cpu trainer "$REGISTRY/trainer:$VERSION-cpu" TORCH_VARIANT=cpu
default_trainer=$REGISTRY/trainer:$VERSION-cpu
if [ "${RELEASE_SKIP_CUDA:-0}" != 1 ]; then
  build trainer trainer "$REGISTRY/trainer:$VERSION" TORCH_VARIANT=cuda
  default_trainer=$REGISTRY/trainer:$VERSION
fi
refs+=("$(push operator "$REGISTRY/operator:$VERSION")")
refs+=("$(push trainer-cpu "$REGISTRY/trainer:$VERSION-cpu")")
[ "${RELEASE_SKIP_CUDA:-0}" != 1 ] && refs+=("$(push trainer "$REGISTRY/trainer:$VERSION")")

# The chart, pointed at this release's images.
chart=$work/chart/dreambooth-operator
mkdir -p "$work/chart"
cp -r charts/dreambooth-operator "$chart"
python3 - "$chart" "$REGISTRY/operator" "$default_trainer" <<'EOF'
import re, sys
from pathlib import Path
chart, operator, trainer = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
values = chart / "values.yaml"
text, n = re.subn(r"(?m)^(  repository: ).*$", rf"\g<1>{operator}", values.read_text(), count=1)
assert n == 1, "values.yaml: no image.repository line"
# The built-in default trainer image is the operator's (no longer a CRD schema default, which would beat every
# DreamBoothRuntime): point it at this registry's trainer.
text, n = re.subn(r'(?m)^(  defaultTrainerImage: ).*$', rf'\g<1>"{trainer}"', text, count=1)
assert n == 1, "values.yaml: no operator.defaultTrainerImage line"
values.write_text(text)
EOF
"$HELM" lint --quiet "$chart" >/dev/null
"$HELM" package "$chart" --destination "$work" >/dev/null
t0=$(date +%s)
out=$("$HELM" push "$work/dreambooth-operator-$VERSION.tgz" "oci://$REGISTRY/charts" "${plain[@]}" 2>&1) \
  || die "helm push failed: $out"
echo "=== pushed chart in $(( $(date +%s) - t0 ))s" >&2
digest=$(sed -n 's/^Digest: *//p' <<< "$out")
[ -n "$digest" ] || die "helm push printed no digest: $out"
refs+=("chart oci://$REGISTRY/charts/dreambooth-operator:$VERSION@$digest")

echo "released $VERSION (base $BASE_IMAGE; chart default trainer $default_trainer):"
for r in "${refs[@]}"; do
  printf '  %-12s %s\n' "${r%% *}" "${r#* }"
done
