"""The image locks install: `pip install --no-index -r docker/requirements-X.txt '.[X]'` into a fresh venv.

Not a text comparison: pip resolves the project and its extra against exactly the wheels the lock pins (plus the
build tools and, for the trainer, the CPU torch wheel the Dockerfile installs before the lock) with no index,
so a dependency missing from a lock, or pinned at a version the project refuses, fails here as the image build
would. The wheels come from the shared wheelhouse (tests/images.py: `pip download` of the locks through this
machine's pip cache); each install sees only its own lock's wheels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from pkg_support import REPO

sys.path.insert(0, str(REPO / "tests"))

import images  # noqa: E402

pytestmark = [pytest.mark.packaging, pytest.mark.slow]

IMPORTS = {
    "operator": "import dreambooth_operator.handlers, kopf, kubernetes.client",
    "trainer": "import dreambooth_trainer.train, diffusers, peft, accelerate, transformers, boto3, tensorboard",
}


def pins(lock: Path) -> set[tuple[str, str]]:
    out = set()
    for line in lock.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            out.add((canonicalize_name(req.name), spec.version))
    return out


def only_these_wheels(wheelhouse: Path, wanted: set[tuple[str, str]], dest: Path) -> Path:
    """A find-links folder holding exactly the wanted (name, version) wheels, as links into the wheelhouse."""
    dest.mkdir()
    found = set()
    for wheel in wheelhouse.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        key = (name, str(version))
        if key in wanted:
            (dest / wheel.name).symlink_to(wheel)
            found.add(key)
    missing = wanted - found
    assert not missing, f"the wheelhouse lacks {sorted(missing)}: delete {wheelhouse}/.complete and rerun"
    return dest


def build_tools() -> set[tuple[str, str]]:
    return {(canonicalize_name(r.name), next(iter(r.specifier)).version) for r in map(Requirement, images.BUILD_TOOLS)}


def pip_env() -> dict[str, str]:
    # No PIP_* variables and no config files: this machine's pip.conf adds local indexes and find-links.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def offline_install(tmp_path: Path, links: Path, *args: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    """A fresh venv, then `pip install --no-index --find-links links ARGS`; returns (python, result)."""
    venv = tmp_path / "venv"
    if not venv.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    proc = subprocess.run(
        [py, "-m", "pip", "install", "--quiet", "--no-compile", "--no-index", "--find-links", str(links), *args],
        capture_output=True, text=True, env=pip_env(), timeout=1800, cwd=tmp_path,
    )  # fmt: skip
    return py, proc


@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    if os.geteuid() != 0:
        pytest.skip("shares the buildah cache's wheelhouse (root)")
    return images.wheelhouse()


@pytest.mark.parametrize("extra", ["operator", "trainer"])
def test_lock_installs_with_no_index(extra: str, wheelhouse: Path, tmp_path: Path) -> None:
    wanted = pins(images.LOCKS[extra]) | build_tools()
    if extra == "trainer":
        wanted.add(("torch", images.TORCH_CPU.split("==")[1]))
    links = only_these_wheels(wheelhouse, wanted, tmp_path / "wheels")
    if extra == "trainer":
        # As in the Dockerfile: torch's own layer first (its CUDA or CPU build is chosen there), then the lock.
        _, proc = offline_install(tmp_path, links, "--no-deps", images.TORCH_CPU)
        assert proc.returncode == 0, proc.stderr[-3000:]
    py, proc = offline_install(tmp_path, links, "-r", str(images.LOCKS[extra]), f"{REPO}[{extra}]")
    assert proc.returncode == 0, proc.stderr[-5000:]
    check = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True, env=pip_env(), timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    imported = subprocess.run([py, "-c", IMPORTS[extra]], capture_output=True, text=True, timeout=600,
                              cwd=tmp_path, env={**pip_env(), "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert imported.returncode == 0, imported.stderr[-3000:]


def test_a_lock_missing_a_dependency_fails(wheelhouse: Path, tmp_path: Path) -> None:
    """The check is live: the operator lock without multidict (which aiohttp needs) does not install."""
    wanted = {p for p in pins(images.LOCKS["operator"]) if p[0] != "multidict"} | build_tools()
    links = only_these_wheels(wheelhouse, wanted, tmp_path / "wheels")
    lock = tmp_path / "requirements-operator.txt"
    kept = [line for line in images.LOCKS["operator"].read_text().splitlines() if not line.startswith("multidict==")]
    lock.write_text("\n".join(kept) + "\n")
    _, proc = offline_install(tmp_path, links, "-r", str(lock), f"{REPO}[operator]")
    assert proc.returncode != 0 and "multidict" in proc.stderr, proc.stderr[-2000:]
