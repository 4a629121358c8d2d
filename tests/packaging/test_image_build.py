"""Build the Dockerfile's `operator` target with Debian's buildah (no daemon, no registry) and run it.

No container registry is reachable here, so the base image is made locally: a Debian bookworm root from
debootstrap (Debian's Python 3.11, python3-venv) committed as ``localhost/dreambooth-test/python:3.11-bookworm``
and passed as ``--build-arg PYTHON_IMAGE``. The Dockerfile is otherwise built as it is, fetching the pinned locks
from PyPI. Base image and layers are cached in ``$DREAMBOOTH_BUILDAH_CACHE`` (default
``~/.cache/dreambooth-operator/buildah``): cold ~4-5 min (debootstrap ~3 min), warm ~15 s.

Needs root and ``apt-get install buildah debootstrap``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pkg_support import REPO

pytestmark = [pytest.mark.packaging, pytest.mark.slow]

BASE_IMAGE = "localhost/dreambooth-test/python:3.11-bookworm"
IMAGE = "localhost/dreambooth-operator:packaging-test"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# python-is-python3: the Dockerfile says `python`, as the official image does.
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def cache_dir() -> Path:
    base = os.environ.get("DREAMBOOTH_BUILDAH_CACHE") or str(Path.home() / ".cache" / "dreambooth-operator" / "buildah")
    return Path(base)


class Buildah:
    def __init__(self, root: Path) -> None:
        self.root = root
        # Our own storage (overlay on this machine's ext4), never the system's /var/lib/containers.
        self.base = [
            "buildah",
            "--root",
            str(root / "storage"),
            "--runroot",
            str(root / "run"),
            "--storage-driver",
            "overlay",
        ]

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"buildah {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    def has_image(self, name: str) -> bool:
        # (buildah 1.28 has no `image exists`.)
        return self("inspect", "--type", "image", name, check=False).returncode == 0


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Two test runs on one machine must not debootstrap or commit into the same storage at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def make_base_image(b: Buildah) -> None:
    with tempfile.TemporaryDirectory(dir=b.root) as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(rootfs), DEBIAN_MIRROR],
            check=True, capture_output=True, timeout=900,
        )  # fmt: skip
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(rootfs / junk, ignore_errors=True)
        # This machine reaches PyPI through a TLS-inspecting proxy whose CA only the host's bundle holds: the stand-in
        # base trusts what the host trusts, so pip inside the build can verify PyPI. (An official image on a normal
        # network needs neither.)
        if HOST_CA_BUNDLE.exists():
            shutil.copyfile(HOST_CA_BUNDLE, rootfs / "etc" / "ssl" / "certs" / "ca-certificates.crt")
        ctr = b("from", "scratch").stdout.strip()
        try:
            b("copy", ctr, f"{rootfs}/", "/")
            b("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "--env", "LANG=C.UTF-8", "--env", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt", ctr)  # fmt: skip
            b("commit", "--quiet", ctr, BASE_IMAGE)
        finally:
            b("rm", ctr, check=False)


@pytest.fixture(scope="module")
def buildah() -> Buildah:
    if os.geteuid() != 0:
        pytest.skip("buildah's chroot isolation and overlay storage need root here")
    missing = [tool for tool in ("buildah", "debootstrap") if not shutil.which(tool)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed: apt-get install -y buildah debootstrap")
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    b = Buildah(root)
    with locked(root / ".lock"):
        if not b.has_image(BASE_IMAGE):
            make_base_image(b)
    return b


@pytest.fixture(scope="module")
def operator_image(buildah: Buildah) -> str:
    with locked(buildah.root / ".lock"):
        buildah(
            "bud", "--pull=never", "--isolation", "chroot", "--network", "host", "--layers",
            "--target", "operator", "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}",
            "-t", IMAGE, "-f", "Dockerfile", ".",
            timeout=900,
        )  # fmt: skip
        # Layers of earlier builds that no tag points at any more: keep the cache from growing run after run.
        buildah("rmi", "--prune", check=False)
    return IMAGE


def run_in(b: Buildah, image: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    ctr = b("from", "--pull=never", image).stdout.strip()
    try:
        return b("run", "--isolation", "chroot", ctr, "--", *cmd, check=False, timeout=120)
    finally:
        b("rm", ctr, check=False)


def test_operator_image_runs_help(buildah: Buildah, operator_image: str) -> None:
    proc = run_in(buildah, operator_image, "python", "-m", "dreambooth_operator", "--help")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "usage: dreambooth operator" in proc.stdout and "--metrics-port" in proc.stdout


def test_operator_image_is_non_root_without_torch(buildah: Buildah, operator_image: str) -> None:
    config = json.loads(buildah("inspect", "--type", "image", operator_image).stdout)["OCIv1"]["config"]
    assert config["User"] == "10001:10001" and config["Entrypoint"] == ["python", "-m", "dreambooth_operator"]
    proc = run_in(buildah, operator_image, "python", "-c",
                  "import os, importlib.util as u; import kopf, dreambooth_operator.handlers; "
                  "print(os.getuid(), u.find_spec('torch') is None)")  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.split() == ["10001", "True"], proc.stdout + proc.stderr
