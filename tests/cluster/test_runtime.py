"""DreamBoothRuntime on the real apiserver: the runtime's defaults on the created pods (the job's own values
winning), the snapshot taken at acceptance (a runtime edited mid-run changes neither the running job's pods nor
its hash, not even across a new attempt), and a job whose runtime does not exist yet waiting, then starting.

Runtimes are cluster-scoped: each test names its own after its namespace and deletes it, and none is marked
default (it would reach every other test's jobs in the session).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from k8s_harness import ApiError, Cluster, wait_until
from operator_support import GROUP_PATH, IMAGE, Jobs, fake_job

pytestmark = pytest.mark.cluster
RUNTIMES = f"{GROUP_PATH}/dreamboothruntimes"
TOLERATION = {"key": "example.com/platform", "operator": "Exists", "effect": "NoSchedule"}


class Runtimes:
    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.api = cluster.kube_api
        self.prefix = namespace
        self.made: list[str] = []

    def name(self, suffix: str) -> str:
        return f"{self.prefix}-{suffix}"

    def create(self, suffix: str, spec: dict[str, Any]) -> dict[str, Any]:
        name = self.name(suffix)
        self.made.append(name)
        body = {"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamBoothRuntime", "metadata": {"name": name},
                "spec": spec}  # fmt: skip
        return self.api.create(RUNTIMES, body)

    def patch(self, suffix: str, spec: dict[str, Any]) -> None:
        self.api.patch(f"{RUNTIMES}/{self.name(suffix)}", {"spec": spec}, patch_type="merge")

    def cleanup(self) -> None:
        for name in self.made:
            try:
                self.api.delete(f"{RUNTIMES}/{name}")
            except ApiError as e:
                if e.status != 404:
                    raise


@pytest.fixture
def runtimes(cluster: Cluster, namespace: str) -> Iterator[Runtimes]:
    r = Runtimes(cluster, namespace)
    yield r
    r.cleanup()


def platform(seconds: int) -> dict[str, Any]:
    """The platform's defaults: image, labels, a toleration, env (the fake trainer's run time), requests."""
    return {
        "resources": {"image": IMAGE, "requests": {"memory": "80Mi"}, "limits": {"memory": "512Mi"}},
        "podTemplate": {
            "labels": {"team.example.com/cost-center": "platform", "team.example.com/tier": "gold"},
            "tolerations": [TOLERATION],
            "env": [{"name": "FAKE_SECONDS", "value": str(seconds)}, {"name": "PLATFORM_VAR", "value": "one"}],
        },
        "runPolicy": {"maxPreemptions": 7},
    }


def job_on(runtime: str, name: str) -> dict[str, Any]:
    """A fake job that leaves image and FAKE_SECONDS to its runtime and sets one label of its own."""
    job = fake_job(name, nodes=1)
    spec = job["spec"]
    del spec["resources"]["image"]
    spec["podTemplate"]["env"] = [e for e in spec["podTemplate"]["env"] if e["name"] != "FAKE_SECONDS"]
    spec["podTemplate"]["labels"] = {"team.example.com/cost-center": "vision"}
    spec["runtimeRef"] = {"name": runtime}
    return job


def _env(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0]["env"]}


def test_runtime_merge_on_the_pods_and_the_snapshot_survives_a_runtime_edit(
    jobs: Jobs, runtimes: Runtimes, cluster: Cluster
) -> None:
    runtimes.create("gpu", platform(seconds=600))
    jobs.create(job_on(runtimes.name("gpu"), "merged"))
    # The CRD wrote no defaults into the job: what it leaves out is the runtime's.
    assert "image" not in jobs.get("merged")["spec"]["resources"]  # type: ignore[index]
    st = jobs.wait_phase("merged", "Running", 90)
    assert st["runtime"] == runtimes.name("gpu") and st["effectiveSpec"]["resources"]["image"] == IMAGE
    assert st["effectiveSpec"]["runPolicy"]["maxPreemptions"] == 7
    digest = st["effectiveSpecHash"]
    (pod,) = jobs.pods("merged")
    c = pod["spec"]["containers"][0]
    # requests per resource: the job's (it sets cpu and memory); the limit only the runtime sets.
    assert c["image"] == IMAGE and c["resources"]["requests"]["memory"] == "64Mi"
    assert c["resources"]["limits"]["memory"] == "512Mi"
    labels = pod["metadata"]["labels"]
    assert labels["team.example.com/cost-center"] == "vision" and labels["team.example.com/tier"] == "gold"
    assert TOLERATION in pod["spec"]["tolerations"]
    env = _env(pod)
    assert env["FAKE_SECONDS"] == "600" and env["PLATFORM_VAR"] == "one"

    # The platform team edits the runtime mid-run: an image that does not exist, another label and variable.
    edited = platform(seconds=600)
    edited["resources"]["image"] = "host.invalid/nothing:here"
    edited["podTemplate"]["labels"]["team.example.com/tier"] = "silver"
    edited["podTemplate"]["env"][1]["value"] = "two"
    runtimes.patch("gpu", edited)
    # A new attempt (the pod deleted = a preemption) is built from the snapshot, not from the edited runtime.
    cluster.kubectl("delete", "pod", pod["metadata"]["name"], "-n", jobs.ns, "--wait=false")
    st = jobs.wait("merged", lambda s: s.get("attempt") == 2 and s.get("phase") == "Running", 90, "attempt 2 running")
    assert st["effectiveSpecHash"] == digest and st["preemptions"] == 1
    (pod2,) = jobs.pods("merged", attempt=2)
    assert pod2["spec"]["containers"][0]["image"] == IMAGE
    assert pod2["metadata"]["labels"]["team.example.com/tier"] == "gold" and _env(pod2)["PLATFORM_VAR"] == "one"

    # A job created after the edit gets the edited runtime (and, here, its image that cannot be pulled).
    jobs.create(job_on(runtimes.name("gpu"), "after-edit"))
    st = jobs.wait("after-edit", lambda s: s.get("effectiveSpecHash"), 60, "the second job accepted")
    assert st["effectiveSpecHash"] != digest
    assert st["effectiveSpec"]["resources"]["image"] == "host.invalid/nothing:here"
    for name in ("merged", "after-edit"):
        cluster.kubectl("delete", "dreamboothjob", name, "-n", jobs.ns, "--wait=false")


def test_a_missing_runtime_waits_naming_it_then_the_job_starts(
    jobs: Jobs, runtimes: Runtimes, cluster: Cluster
) -> None:
    name = runtimes.name("later")
    jobs.create(job_on(name, "waits"))
    jobs.wait("waits", lambda s: s.get("phase") == "WaitingForResources", 60, "waiting for its runtime")
    cond = jobs.condition("waits", "WaitingForResources")
    assert cond["reason"] == "RuntimeNotFound" and repr(name) in cond["message"], cond
    assert "spec.runtimeRef.name" in cond["message"] and not jobs.pods("waits")
    assert "RuntimeNotFound" in [e["reason"] for e in jobs.events("waits")]
    runtimes.create("later", platform(seconds=600))
    st = jobs.wait_phase("waits", "Running", 90)
    assert st["runtime"] == name and jobs.condition("waits", "WaitingForResources")["status"] == "False"
    wait_until(lambda: len(jobs.pods("waits")) == 1, 30, 0.5, "the job's pod")
    assert _env(jobs.pods("waits")[0])["PLATFORM_VAR"] == "one"
    cluster.kubectl("delete", "dreamboothjob", "waits", "-n", jobs.ns, "--wait=false")
