"""scripts/release.sh against a real registry (docker-registry on loopback): what it prints is what a team pulls.

The release builds from the cached base and wheelhouse (tests/images.py) with the same build arguments as
test_image_build.py, so its layers come from that test's cache; the CUDA trainer is skipped
(RELEASE_SKIP_CUDA=1). Each printed reference is then pulled by digest into an empty buildah storage and the
chart with `helm pull oci://...`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from pkg_support import REPO, Helm, one

sys.path.insert(0, str(REPO / "tests"))

import images  # noqa: E402
from registry import Registry  # noqa: E402

pytestmark = [pytest.mark.packaging, pytest.mark.slow]

VERSION = "0.2.0"
RELEASE = REPO / "scripts" / "release.sh"


def release(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(RELEASE), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def released(registry: Registry, chart: Helm) -> dict[str, tuple[str, str]]:
    """name -> (reference, digest) as release.sh printed them."""
    rel = images.release(images.buildah_or_skip(), registry.host, chart.binary, VERSION)
    print(rel.output)
    assert set(rel.refs) == {"operator", "trainer-cpu", "chart"}, rel.output
    return rel.refs


def test_images_pull_by_digest(released: dict[str, tuple[str, str]], registry: Registry, tmp_path: Path) -> None:
    """Into an empty storage: every layer comes from the registry, and the image is the one built here."""
    built = images.Buildah(images.cache_dir())
    fresh = images.Buildah(tmp_path / "pull")
    assert released["operator"][0] == f"{registry.host}/operator:{VERSION}"
    assert released["trainer-cpu"][0] == f"{registry.host}/trainer:{VERSION}-cpu"
    for name in ("operator", "trainer-cpu"):
        ref, digest = released[name]
        repository, tag = ref.removeprefix(registry.host + "/").split(":")
        assert registry.manifest_digest(repository, tag) == digest, f"{ref}: the registry serves another manifest"
        fresh("pull", "--quiet", "--tls-verify=false", f"docker://{registry.host}/{repository}@{digest}", timeout=900)
        pulled = fresh.inspect(f"{registry.host}/{repository}@{digest}")
        assert pulled["FromImageID"] == built.inspect(ref)["FromImageID"], (
            f"{name}: pulled config differs from the build"
        )
    config = fresh.config(f"{registry.host}/trainer@{released['trainer-cpu'][1]}")
    assert config["User"] == "1000:1000" and config["Entrypoint"] == ["python", "-m", "dreambooth_trainer.launch"]


def test_chart_pulls_from_oci_and_points_at_the_release(
    released: dict[str, tuple[str, str]], registry: Registry, chart: Helm, tmp_path: Path
) -> None:
    ref, digest = released["chart"]
    assert ref == f"oci://{registry.host}/charts/dreambooth-operator:{VERSION}"
    pulled = chart.run("pull", f"oci://{registry.host}/charts/dreambooth-operator", "--version", VERSION,
                       "--plain-http", "--destination", str(tmp_path))  # fmt: skip
    assert f"Digest: {digest}" in pulled.stdout + pulled.stderr
    (tmp_path / "by-digest").mkdir()
    by_digest = chart.run("pull", f"oci://{registry.host}/charts/dreambooth-operator@{digest}", "--plain-http",
                          "--destination", str(tmp_path / "by-digest"))  # fmt: skip
    assert by_digest.returncode == 0
    archive = tmp_path / f"dreambooth-operator-{VERSION}.tgz"
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    unpacked = tmp_path / "x" / "dreambooth-operator"
    meta = yaml.safe_load((unpacked / "Chart.yaml").read_text())
    assert (meta["version"], meta["appVersion"]) == (VERSION, VERSION)
    docs = [d for d in yaml.safe_load_all(chart.run("template", "dbo", str(unpacked)).stdout) if d]
    image = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"{registry.host}/operator:{VERSION}"
    # A CPU-only release: its only trainer is the operator's built-in default (chart operator.defaultTrainerImage),
    # passed to the operator's container; the CRD holds no image default, which would beat every DreamBoothRuntime.
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DREAMBOOTH_DEFAULT_TRAINER_IMAGE"] == f"{registry.host}/trainer:{VERSION}-cpu"
    crd = yaml.safe_load((unpacked / "crds" / "dreambooth.dev_dreamboothjobs.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    props = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert "default" not in props["resources"].get("properties", {}).get("image", {})


def test_release_refuses_a_version_the_tree_does_not_say() -> None:
    proc = release("9.9.9", "127.0.0.1:1")
    assert proc.returncode == 1
    assert "VERSION 9.9.9, but pyproject.toml says 0.2.0: bump the tree first" in proc.stderr


def test_release_refuses_a_base_not_pinned_by_digest() -> None:
    proc = release(VERSION, "127.0.0.1:1", env={"BASE_IMAGE": "python:3.11-slim-bookworm"})
    assert proc.returncode == 1
    assert "BASE_IMAGE python:3.11-slim-bookworm is not pinned by digest" in proc.stderr
