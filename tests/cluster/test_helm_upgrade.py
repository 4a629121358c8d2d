"""`helm upgrade` from 0.1.0 to this release with a job running, as docs/install.md and CHANGELOG.md say it goes.

0.1.0 is built from its commit (2dc2f54, the state before this round): its operator image from its own Dockerfile
and its chart, pointed at the tests' registry as a 0.1.0 release would have been (values' image repository, the
CRD's default trainer image). The job's trainer is this tree's CPU trainer image tagged 0.1.0: what matters is
that a job keeps the reference it was created with. Steps as a team runs them: apply the new CRD, `helm upgrade`,
then check that the running job keeps its image through a preemption and finishes, and that a job created after
the upgrade gets the new default image (from the operator, recorded in its status.effectiveSpec).

Opt-in (TIERS=upgrade or DREAMBOOTH_UPGRADE_TEST=1): the 0.1.0 operator image build and two more training jobs do
not fit the default run's budget.
"""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from k8s_harness import Cluster, wait_until
from operator_support import Jobs
from test_helm_install import FAST, OperatorPod, _apply, _dog_lora, _no_operator_left

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.slow,
    pytest.mark.upgrade,
    pytest.mark.skipif(
        os.environ.get("DREAMBOOTH_UPGRADE_TEST") != "1",
        reason="opt-in: TIERS=upgrade bash scripts/test.sh (or DREAMBOOTH_UPGRADE_TEST=1)",
    ),
]

REPO = Path(__file__).resolve().parents[2]
OLD_COMMIT = "2dc2f54"
OLD, NEW = "0.1.0", "0.2.0"
RELEASE = "dreambooth-operator"
OP_NS = "dreambooth-system"
CHART = "charts/dreambooth-operator"


def _old_release(registry_host: str, helm: Path, work: Path, trainer_ref: str) -> None:
    """Build and push 0.1.0 as it would have been released: operator image, trainer tag, chart."""
    import images  # tests/ is on sys.path (tests/conftest.py)

    src = work / "src"
    src.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", OLD_COMMIT], cwd=REPO, capture_output=True, check=True)
    tar = work / "src.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as t:
        t.extractall(src, filter="data")
    b = images.buildah_or_skip()
    operator = f"{registry_host}/operator:{OLD}"
    with images.locked(b.root / ".lock"):
        # 0.1.0's Dockerfile installs its locks from the package index (it has no wheelhouse option).
        b("bud", "--quiet", "--pull=never", "--isolation", "chroot", "--network", "host", "--layers",
          "--target", "operator", "--build-arg", f"PYTHON_IMAGE={b.base_reference()}", "-t", operator,
          "-f", str(src / "Dockerfile"), str(src), timeout=1800)  # fmt: skip
        b("push", "--quiet", "--tls-verify=false", operator, f"docker://{operator}", timeout=600)
        b("push", "--quiet", "--tls-verify=false", trainer_ref, f"docker://{registry_host}/trainer:{OLD}", timeout=600)
    chart = src / CHART
    values = chart / "values.yaml"
    text, n = re.subn(r"(?m)^(  repository: ).*$", rf"\g<1>{registry_host}/operator", values.read_text(), count=1)
    assert n == 1, "0.1.0 values.yaml: no image.repository line"
    values.write_text(text)
    for crd in (chart / "crds").glob("*.yaml"):
        text, n = re.subn(r"(?m)^(\s+default: )\S+/trainer:\S+$", rf"\g<1>{registry_host}/trainer:{OLD}",
                          crd.read_text())  # fmt: skip
        assert n == 1, f"0.1.0 {crd.name}: no default trainer image"
        crd.write_text(text)
    subprocess.run([str(helm), "package", str(chart), "--destination", str(work)], check=True, capture_output=True)
    subprocess.run([str(helm), "push", str(work / f"dreambooth-operator-{OLD}.tgz"), f"oci://{registry_host}/charts",
                    "--plain-http"], check=True, capture_output=True)  # fmt: skip


@pytest.fixture(scope="module")
def old_installed(cluster: Cluster, released: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """0.1.0 installed from OCI the way its docs said (CRD from the chart, then helm install); yields the chart
    repository. Puts the repository's CRD back afterwards, for the tests that follow."""
    from k8s_harness import tools

    chart_ref, _ = released.refs["chart"]
    registry_host = chart_ref.removeprefix("oci://").split("/", 1)[0]
    t0 = time.monotonic()
    _old_release(registry_host, tools.tool_path("helm"), tmp_path_factory.mktemp("v0.1.0"),
                 released.refs["trainer-cpu"][0])  # fmt: skip
    print(f"\n0.1.0 built and released: {time.monotonic() - t0:.1f} s")
    repo = chart_ref.rsplit(":", 1)[0]
    try:
        _apply_crds(cluster, repo, OLD)
        proc = cluster.helm("install", RELEASE, repo, "--version", OLD, "--plain-http", "--namespace", OP_NS,
                            "--create-namespace", "--set", "operator.resyncSeconds=2",
                            "--set", "operator.backoffBaseSeconds=1", "--wait", "--timeout", "5m", check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield repo
    finally:
        cluster.helm("uninstall", RELEASE, "--namespace", OP_NS, "--wait", "--timeout", "2m", check=False)
        _no_operator_left(cluster)
        cluster.kubectl("apply", "-f", str(REPO / "crds"))


def _apply_crds(cluster: Cluster, repo: str, version: str) -> None:
    """docs/install.md's step one of an upgrade: the chart's CRDs applied by hand (Helm never upgrades them) —
    `apply` creates the ones new in this release, `replace` drops 0.1.0's schema defaults (apply keeps a field it
    did not itself set, and a lingering image default would pin every new job to the old trainer)."""
    crds = cluster.helm("show", "crds", repo, "--version", version, "--plain-http").stdout
    cluster.kubectl("apply", "-f", "-", input=crds)
    cluster.kubectl("replace", "-f", "-", input=crds)


def _pod_images(jobs: Jobs, name: str) -> set[str]:
    return {p["spec"]["containers"][0]["image"] for p in jobs.pods(name)}


def test_upgrade_from_0_1_0_keeps_a_running_jobs_image_and_new_jobs_get_the_new_one(
    old_installed: str, cluster: Cluster, namespace: str, storage: dict[str, Any], released: Any, tmp_path: Path
) -> None:
    op = OperatorPod(cluster)
    jobs = Jobs(cluster, namespace, op)  # type: ignore[arg-type] - duck-typed: it has .log()
    registry_host = old_installed.removeprefix("oci://").split("/", 1)[0]
    old_trainer = f"{registry_host}/trainer:{OLD}"

    # A job that leaves spec.resources.image out: the CRD's default at creation time is what it keeps.
    doc = _dog_lora(storage, "unused", "before")
    del doc["spec"]["resources"]["image"]
    doc["spec"]["podTemplate"]["env"] = [{"name": "DREAMBOOTH_TEST_STEP_DELAY_SECONDS", "value": "2"}]
    _apply(cluster, namespace, doc, tmp_path)
    jobs.wait("before", lambda s: (s.get("step") or 0) >= 2, 600, "step 2 under the 0.1.0 operator")
    assert jobs.get("before")["spec"]["resources"]["image"] == old_trainer

    _apply_crds(cluster, old_installed, NEW)
    proc = cluster.helm("upgrade", RELEASE, old_installed, "--version", NEW, "--plain-http", "--namespace", OP_NS,
                        *FAST, "--wait", "--timeout", "5m", check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_until(lambda: op.pod()["spec"]["containers"][0]["image"] == released.refs["operator"][0], 120, 1,
               "the 0.2.0 operator pod")  # fmt: skip

    # The running job: its image through a preemption, to the end.
    running = [p["metadata"]["name"] for p in jobs.pods("before") if not p["metadata"].get("deletionTimestamp")]
    cluster.preempt(namespace, sorted(running)[-1])
    jobs.wait("before", lambda s: s.get("preemptions") == 1, 180, "the preemption counted by the new operator")
    jobs.wait("before", lambda s: s.get("attempt") == 2, 180, "attempt 2")
    wait_until(lambda: _pod_images(jobs, "before") == {old_trainer}, 120, 1, "attempt 2's pods")
    st = jobs.wait_phase("before", "Succeeded", 900)
    assert (st["attempt"], st["preemptions"], st["restarts"]) == (2, 1, 0), st

    # A job created after the upgrade: the new operator's default (operator.defaultTrainerImage, set by
    # release.sh), the 0.2.0 trainer. 0.2.0's CRD writes no default into the spec: the image the job keeps is
    # the one snapshotted into its status when the operator accepted it.
    env = {e["name"]: e.get("value") for e in op.pod()["spec"]["containers"][0].get("env", [])}
    assert env.get("DREAMBOOTH_DEFAULT_TRAINER_IMAGE") == released.refs["trainer-cpu"][0], env
    after = _dog_lora(storage, "unused", "after")
    del after["spec"]["resources"]["image"]
    _apply(cluster, namespace, after, tmp_path)
    assert "image" not in jobs.get("after")["spec"].get("resources", {})
    jobs.wait("after", lambda s: (s.get("step") or 0) >= 1, 600, "the new job training")
    assert jobs.get("after")["status"]["effectiveSpec"]["resources"]["image"] == released.refs["trainer-cpu"][0]
    assert _pod_images(jobs, "after") == {released.refs["trainer-cpu"][0]}
    cluster.kubectl("delete", "dreamboothjob", "after", "-n", namespace, "--wait=false")
