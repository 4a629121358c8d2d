"""A team's first hour, end to end, from the registry only: the project's main end-to-end test.

`helm install` of the released chart from OCI runs the released operator image as the chart's Deployment, with
its own ServiceAccount token and in-cluster config (the node mounts token, CA and namespace and sets
KUBERNETES_SERVICE_HOST/PORT to the `kubernetes` Service, which the test kubelet routes to the apiserver as
kube-proxy would). `kubectl apply -f examples/dog-lora.yaml`, with the lines marked CHANGE changed, trains on two
pods of the released CPU trainer image against SeaweedFS; one pod preempted mid-run costs nothing; a missing
image is named and ends the job. No host-process pod takes part.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from k8s_harness import Cluster, wait_until
from operator_support import Jobs

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
VERSION = "0.2.0"
RELEASE = "dreambooth-operator"
OP_NS = "dreambooth-system"
WEIGHTS = "pytorch_lora_weights.safetensors"
# The operator's clocks shortened through the chart's values, as an impatient team might set them.
FAST = ["--set", "operator.resyncSeconds=2", "--set", "operator.backoffBaseSeconds=1",
        "--set", "operator.imagePullTimeoutSeconds=20"]  # fmt: skip
# What the examples need besides their CHANGE lines to fit this machine (2 CPU cores, no GPU, the tiny model):
# scale only. Everything else — requests, limits, tolerations, run policy, learning rate — stays as shipped.
CPU_SCALE: dict[str, Any] = {
    "training": {"resolution": 32, "maxTrainSteps": 8, "checkpointingSteps": 2, "mixedPrecision": "no",
                 "numValidationImages": 1},
    "resources": {"nodes": 2},
}  # fmt: skip


class OperatorPod:
    """The chart's operator pod (for Jobs.explain: its log)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def pod(self) -> dict[str, Any]:
        pods = self.cluster.kube_api.get(
            f"/api/v1/namespaces/{OP_NS}/pods", labelSelector="app.kubernetes.io/component=operator"
        )["items"]
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        assert live, f"no operator pod in {OP_NS}: {[p['metadata']['name'] for p in pods]}"
        return max(live, key=lambda p: p["metadata"]["creationTimestamp"])

    def log(self, lines: int = 60) -> str:
        try:
            text = self.cluster.pod_log(OP_NS, self.pod()["metadata"]["name"])
        except (KeyError, AssertionError) as e:
            return f"(no operator log: {e})"
        return "\n".join(text.splitlines()[-lines:])


def _helm_failure(cluster: Cluster, proc: Any) -> str:
    pods = cluster.kubectl("get", "pods", "-n", OP_NS, "-o", "wide", check=False).stdout
    described = cluster.kubectl("describe", "pods", "-n", OP_NS, check=False).stdout[-3000:]
    return f"{proc.stdout}\n{proc.stderr}\n{pods}\n{described}"


@pytest.fixture(scope="module")
def installed(cluster: Cluster, released: Any) -> Iterator[OperatorPod]:
    chart_ref, _ = released.refs["chart"]
    repo = chart_ref.rsplit(":", 1)[0]  # oci://<registry>/charts/dreambooth-operator
    t0 = time.monotonic()
    proc = cluster.helm("install", RELEASE, repo, "--version", VERSION, "--plain-http", "--namespace", OP_NS,
                        "--create-namespace", *FAST, "--wait", "--timeout", "5m", check=False)  # fmt: skip
    assert proc.returncode == 0, _helm_failure(cluster, proc)
    print(f"\nhelm install (from OCI) -> operator Ready: {time.monotonic() - t0:.1f} s")
    try:
        yield OperatorPod(cluster)
    finally:
        cluster.helm("uninstall", RELEASE, "--namespace", OP_NS, "--wait", "--timeout", "2m", check=False)
        _no_operator_left(cluster)


def _no_operator_left(cluster: Cluster) -> None:
    """This operator watches every namespace: the tests after this module run their own, so none may linger."""
    path = f"/api/v1/namespaces/{OP_NS}/pods"

    def gone() -> bool:
        return not cluster.kube_api.get(path, labelSelector="app.kubernetes.io/component=operator")["items"]

    try:
        wait_until(gone, 60, 1, "the operator pod gone after helm uninstall")
    except TimeoutError:
        for pod in cluster.kube_api.get(path, labelSelector="app.kubernetes.io/component=operator")["items"]:
            cluster.kubectl("delete", "pod", "-n", OP_NS, pod["metadata"]["name"], "--grace-period=0", "--force",
                            check=False)  # fmt: skip
        wait_until(gone, 60, 1, "the operator pod force-deleted")


def test_the_operator_runs_as_the_charts_pod_with_its_own_service_account(
    installed: OperatorPod, cluster: Cluster, released: Any
) -> None:
    pod = installed.pod()
    spec, st = pod["spec"], pod["status"]
    assert spec["serviceAccountName"] == RELEASE
    op_ref, op_digest = released.refs["operator"]
    cs = st["containerStatuses"][0]
    # The released image itself, pulled from the registry, not this machine's files.
    assert cs["image"] == op_ref and cs["imageID"].endswith(f"@{op_digest}"), cs
    assert cs["ready"] and cs["containerID"].startswith("runc://"), cs
    s = requests.Session()
    s.trust_env = False
    assert s.get(f"http://{st['podIP']}:8080/healthz", timeout=5).status_code == 200
    # It reaches the apiserver with nothing but in-cluster config: no kubeconfig was given, so the watch it has
    # running (and the jobs below) prove the mounted token works; the token is the ServiceAccount's own.
    kubeconfig = cluster.as_service_account(OP_NS, RELEASE, create=False)
    assert cluster.kubectl("auth", "can-i", "get", "secrets", "-n", "default",
                           kubeconfig=kubeconfig, check=False).stdout.strip() == "no"  # fmt: skip
    env = {e["name"]: e.get("value") for e in spec["containers"][0].get("env") or []}
    assert "KUBECONFIG" not in env


def _example(name: str, changes: dict[str, str]) -> dict[str, Any]:
    """The shipped example with exactly its CHANGE lines edited (by key), as a user does it in an editor."""
    lines = (EXAMPLES / name).read_text().splitlines(keepends=True)
    todo = dict(changes)
    for i, line in enumerate(lines):
        if "# CHANGE" not in line:
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9]+):\s*(.*?)\s+# CHANGE", line)
        assert m, f"{name}: a CHANGE line that is not `key: value  # CHANGE`: {line!r}"
        key = m.group(2)
        assert key in todo, f"{name}: the test does not know what a user puts in its CHANGE line {key!r}"
        lines[i] = f"{m.group(1)}{key}: {todo.pop(key)}\n"
    assert not todo, f"{name}: no CHANGE line for {sorted(todo)}"
    doc = yaml.safe_load("".join(lines))
    for section, values in CPU_SCALE.items():
        doc["spec"][section].update(values)
    return doc


def _apply(cluster: Cluster, namespace: str, doc: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    cluster.kubectl("apply", "-n", namespace, "-f", str(path))


def _dog_lora(storage: dict[str, Any], image: str, name: str) -> dict[str, Any]:
    bucket, spec = storage["bucket"], storage["spec"]
    doc = _example("dog-lora.yaml", {
        "endpoint": spec["endpoint"], "region": spec["region"], "pathStyle": "true",
        "credentialsSecret": spec["credentialsSecret"],
        "pretrainedModelNameOrPath": f"s3://{bucket}/models/tiny/", "instanceDataDir": f"s3://{bucket}/data/dog/",
        "instancePrompt": "a photo of sks dog", "outputDir": f"s3://{bucket}/runs/{name}/", "image": image,
    })  # fmt: skip
    doc["metadata"]["name"] = name
    return doc


def _weights(storage: dict[str, Any], name: str, scratch: Path) -> dict[str, Any]:
    from trainer_utils import weights  # tests/ is on sys.path (tests/conftest.py)

    scratch.mkdir(parents=True, exist_ok=True)
    storage["client"].download_file(storage["bucket"], f"runs/{name}/{WEIGHTS}", str(scratch / WEIGHTS))
    return weights(scratch, "lora")


_UNINTERRUPTED: dict[str, Any] = {}


def _uninterrupted(jobs: Jobs, cluster: Cluster, storage: dict[str, Any], image: str, tmp_path: Path) -> Any:
    if "weights" not in _UNINTERRUPTED:
        t0 = time.monotonic()
        _apply(cluster, jobs.ns, _dog_lora(storage, image, "sks-dog"), tmp_path)
        st = jobs.wait("sks-dog", lambda s: (s.get("step") or 0) >= 1, 600, "the first training step")
        print(f"\nkubectl apply -> first training step (2 pods, CPU trainer image): {time.monotonic() - t0:.1f} s")
        st = jobs.wait_phase("sks-dog", "Succeeded", 900)
        assert (st["attempt"], st["restarts"], st["preemptions"]) == (1, 0, 0), st
        _UNINTERRUPTED["weights"] = _weights(storage, "sks-dog", tmp_path / "sks-dog")
    return _UNINTERRUPTED["weights"]


def _webhook_trust(cluster: Cluster) -> tuple[str, str]:
    secret = cluster.kube_api.get(f"/api/v1/namespaces/{OP_NS}/secrets/{RELEASE}-webhook-tls")
    config = cluster.kube_api.get(f"/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/{RELEASE}")
    return secret["data"]["ca.crt"], config["webhooks"][0]["clientConfig"]["caBundle"]


def test_the_charts_webhook_refuses_a_bad_job_at_apply(
    installed: OperatorPod, cluster: Cluster, namespace: str, released: Any
) -> None:
    """The chart as installed: its ValidatingWebhookConfiguration, Service, generated certificate and the operator
    pod serving it (the apiserver reaches the pod's IP: --enable-aggregator-routing, no kube-proxy here); a `helm
    upgrade` keeps the certificate (lookup), so the apiserver's trust never breaks."""
    doc = yaml.safe_load((EXAMPLES / "dog-lora.yaml").read_text())
    doc["spec"]["trainng"] = {}  # a misspelt key the CRD schema lets through

    def refused() -> None:
        proc = cluster.kubectl("apply", "-n", namespace, "--dry-run=server", "-f", "-", input=yaml.safe_dump(doc),
                               check=False)  # fmt: skip
        assert proc.returncode != 0
        assert 'admission webhook "validate.dreambooth.dev" denied the request: spec.trainng' in proc.stderr, (
            proc.stderr + installed.log()
        )

    refused()
    ca, bundle = _webhook_trust(cluster)
    assert ca == bundle
    chart_ref, _ = released.refs["chart"]
    proc = cluster.helm("upgrade", RELEASE, chart_ref.rsplit(":", 1)[0], "--version", VERSION, "--plain-http",
                        "--namespace", OP_NS, "--reuse-values", "--wait", "--timeout", "5m", check=False)  # fmt: skip
    assert proc.returncode == 0, _helm_failure(cluster, proc)
    assert _webhook_trust(cluster) == (ca, bundle)
    refused()


def test_dog_lora_as_a_user_applies_it_succeeds_with_the_model_in_s3(
    installed: OperatorPod, cluster: Cluster, namespace: str, storage: dict[str, Any], trainer_image: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    jobs = Jobs(cluster, namespace, installed)  # type: ignore[arg-type] - duck-typed: it has .log()
    _uninterrupted(jobs, cluster, storage, trainer_image, tmp_path)
    pods = jobs.pods("sks-dog")
    assert len(pods) == 2 and all(p["status"]["phase"] == "Succeeded" for p in pods), [
        (p["metadata"]["name"], p["status"]["phase"]) for p in pods
    ]
    for p in pods:
        cs = p["status"]["containerStatuses"][0]
        assert cs["imageID"].endswith(trainer_image.rsplit("@", 1)[1]), cs
    keys = {o["Key"] for o in storage["client"].list_objects_v2(Bucket=storage["bucket"], Prefix="runs/sks-dog/")
            ["Contents"]}  # fmt: skip
    assert f"runs/sks-dog/{WEIGHTS}" in keys and any("/logs/attempt-1/" in k for k in keys), sorted(keys)


def test_dog_lora_preempted_mid_run_resumes_bit_identical(
    installed: OperatorPod, cluster: Cluster, namespace: str, storage: dict[str, Any], trainer_image: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    from trainer_utils import assert_identical

    jobs = Jobs(cluster, namespace, installed)  # type: ignore[arg-type] - duck-typed: it has .log()
    reference = _uninterrupted(jobs, cluster, storage, trainer_image, tmp_path)
    doc = _dog_lora(storage, trainer_image, "sks-dog-pre")
    # The trainer's test knob slows steps so the preemption lands mid-run (it never changes the math).
    # Slow enough that the operator's progress poll (every 10 s) sees step 2 well before the end (step 8).
    doc["spec"]["podTemplate"]["env"] = [{"name": "DREAMBOOTH_TEST_STEP_DELAY_SECONDS", "value": "4"}]
    _apply(cluster, namespace, doc, tmp_path)
    jobs.wait("sks-dog-pre", lambda s: (s.get("step") or 0) >= 2, 600, "step 2")
    cluster.preempt(namespace, "sks-dog-pre-a1-1")
    jobs.wait("sks-dog-pre", lambda s: s.get("preemptions") == 1, 120, "the preemption counted")
    st = jobs.wait_phase("sks-dog-pre", "Succeeded", 900)
    assert (st["preemptions"], st["restarts"], st["attempt"]) == (1, 0, 2), st
    assert_identical(_weights(storage, "sks-dog-pre", tmp_path / "pre"), reference)


def test_a_job_whose_image_does_not_exist_fails_naming_it(
    installed: OperatorPod, cluster: Cluster, namespace: str, storage: dict[str, Any], released: Any,
    tmp_path: Path,
) -> None:  # fmt: skip
    jobs = Jobs(cluster, namespace, installed)  # type: ignore[arg-type] - duck-typed: it has .log()
    registry = released.refs["operator"][0].split("/", 1)[0]
    missing = f"{registry}/trainer:0.0.0-missing"
    _apply(cluster, namespace, _dog_lora(storage, missing, "sks-dog-typo"), tmp_path)
    # While the kubelet retries, the job says why it is not running yet.
    st = jobs.wait("sks-dog-typo", lambda s: "ImagePull" in jobs.condition("sks-dog-typo", "Starting").get("message", "")
                   or s.get("phase") == "Failed", 120, "the pull failure shown")  # fmt: skip
    st = jobs.wait_phase("sks-dog-typo", "Failed", 180)
    failed = jobs.condition("sks-dog-typo", "Failed")
    assert failed["reason"] == "ImagePullFailed", failed
    assert missing in failed["message"] and "spec.resources.image" in failed["message"], failed
    assert st["restarts"] == 0 and st["attempt"] == 1, st
    wait_until(lambda: jobs.pods("sks-dog-typo") == [], 60, 0.5, "the failed job's pods removed, not left pulling")


def test_an_operator_image_that_does_not_exist_is_named_in_the_pod_status(cluster: Cluster, released: Any) -> None:
    chart_ref, _ = released.refs["chart"]
    ns = cluster.ensure_namespace()
    try:
        proc = cluster.helm("install", "typo", chart_ref.rsplit(":", 1)[0], "--version", VERSION, "--plain-http",
                            "--namespace", ns, "--set", "image.tag=0.0.0-missing",
                            "--wait", "--timeout", "20s", check=False)  # fmt: skip
        assert proc.returncode != 0, "helm --wait reported success for an image that does not exist"

        def waiting() -> Any:
            pods = cluster.kube_api.get(f"/api/v1/namespaces/{ns}/pods")["items"]
            states = [
                cs.get("state", {}).get("waiting") for p in pods for cs in p["status"].get("containerStatuses") or []
            ]
            return next((w for w in states if w and w.get("reason") in ("ErrImagePull", "ImagePullBackOff")), None)

        w = wait_until(waiting, 60, 0.5, "the operator pod's pull failure")
        assert "operator:0.0.0-missing" in w["message"], w
    finally:
        cluster.helm("uninstall", "typo", "--namespace", ns, check=False)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
