"""The admission webhook on the real v1.20 apiserver: a bad DreamBoothJob is refused at `kubectl apply` and at
`kubectl apply --dry-run=server`, with the operator's own field-naming message, before anything is stored.

The operator runs as a host process (OperatorProcess) serving the webhook over TLS; the
ValidatingWebhookConfiguration reaches it by its ``url:`` form (https://127.0.0.1:PORT/...), which needs no
Service routing: the test cluster has no kube-proxy. The chart's ``service:`` form is checked separately with the
webhook server in a pod behind a Service: the harness's apiserver runs with --enable-aggregator-routing=true,
which makes 1.20 call Service webhooks at the Service's endpoint (pod) IPs, reachable from the host. Each
configuration only selects its test's namespace (by a label), so the rest of the session never goes through it.
"""

from __future__ import annotations

import base64
import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_harness import ApiError, Cluster, wait_until
from k8s_harness.pki import Pki
from k8s_harness.util import free_port
from operator_support import IMAGE, Jobs, OperatorProcess, fake_job

from dreambooth_operator import webhook

pytestmark = pytest.mark.cluster
HOOK = "validate.dreambooth.dev"
HOOK_RUNTIMES = "runtimes.validate.dreambooth.dev"


def _webhook_config(name: str, namespace: str, client: dict[str, Any], ca: Path) -> dict[str, Any]:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": HOOK,
            "clientConfig": {**client, "caBundle": base64.b64encode(ca.read_bytes()).decode()},
            "rules": [{"apiGroups": ["dreambooth.dev"], "apiVersions": ["v1alpha1"],
                       "operations": ["CREATE", "UPDATE"], "resources": ["dreamboothjobs"]}],
            "namespaceSelector": {"matchLabels": {"dreambooth.dev/webhook-test": namespace}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 10,
        }, {
            # DreamBoothRuntimes are cluster-scoped (a namespaceSelector never skips them): this test's runtimes
            # are picked by a label, so no other test's runtime goes through this configuration.
            "name": HOOK_RUNTIMES,
            "clientConfig": {**client, "caBundle": base64.b64encode(ca.read_bytes()).decode()},
            "rules": [{"apiGroups": ["dreambooth.dev"], "apiVersions": ["v1alpha1"], "scope": "Cluster",
                       "operations": ["CREATE", "UPDATE"], "resources": ["dreamboothruntimes"]}],
            "objectSelector": {"matchLabels": {"dreambooth.dev/webhook-test": namespace}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 10,
        }],
    }  # fmt: skip


@pytest.fixture
def hooked(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    pki = Pki(tmp_path / "pki")
    pki.create_ca()
    pair = pki.issue("webhook", "dreambooth-operator-webhook", server_sans=("IP:127.0.0.1",))
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(pair.cert, certs / webhook.CERT_FILE)
    shutil.copy(pair.key, certs / webhook.KEY_FILE)
    port = free_port()
    op = OperatorProcess(cluster, namespace, tmp_path, DREAMBOOTH_WEBHOOK_CERT_DIR=str(certs),
                         DREAMBOOTH_WEBHOOK_PORT=str(port)).start()  # fmt: skip
    cluster.kubectl("label", "namespace", namespace, f"dreambooth.dev/webhook-test={namespace}")
    config_name = f"dreambooth-test-{namespace}"
    config = _webhook_config(config_name, namespace, {"url": f"https://127.0.0.1:{port}{webhook.PATH}"}, pki.ca.cert)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(config))
    try:
        yield op
    finally:
        cluster.kubectl("delete", "validatingwebhookconfiguration", config_name, "--ignore-not-found", check=False)
        op.stop()


def _with(job: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    job = copy.deepcopy(job)
    node = job
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return job


def _apply(cluster: Cluster, namespace: str, job: dict[str, Any], *extra: str) -> tuple[int, str]:
    r = cluster.kubectl("apply", "-n", namespace, *extra, "-f", "-", input=yaml.safe_dump(job), check=False)
    return r.returncode, r.stdout + r.stderr


def test_bad_jobs_are_refused_at_apply_by_the_webhook(
    cluster: Cluster, namespace: str, hooked: OperatorProcess
) -> None:
    good = fake_job("good", nodes=1)
    training = good["spec"]["training"]
    # (manifest, the field the refusal names, what the CRD schema alone would have done)
    cases: list[tuple[dict[str, Any], str]] = [
        # The schema cannot catch these: they pass it and used to be stored, then fail as InvalidSpec.
        (_with(good, "spec.podTemplate.nodeSelektor", {"gpu": "a100"}), "spec.podTemplate.nodeSelektor"),
        (_with(good, "spec.trainng", {}), "spec.trainng"),
        (_with(good, "spec.training", {**training, "outputDir": "runs/dog"}), "spec.training.outputDir"),
        (_with(good, "spec.resources", {**good["spec"]["resources"], "gpusPerNode": 2, "limits": {"nvidia.com/gpu": 4}}),
         "spec.resources.limits.nvidia.com/gpu"),
        (_with(good, "spec.podTemplate.env", [{"name": "AWS_ACCESS_KEY_ID", "value": "x"}]), "spec.podTemplate.env[0].name"),
        (_with(good, "spec.podTemplate.labels", {"dreambooth.dev/job-uid": "x"}), 'spec.podTemplate.labels["dreambooth.dev/job-uid"]'),
        (_with(good, "spec.training", {**training, "checkpointingSteps": 500}), "spec.training.checkpointingSteps"),
        (_with(good, "spec.training", {**training, "hubToken": "hf_secret"}), "spec.training.hubToken"),
        (_with(good, "spec.podTemplate.volumes", [{"name": "h", "hostPath": {"path": "/"}}]), "spec.podTemplate.volumes[0].hostPath"),
        (_with(good, "spec.resources", {**good["spec"]["resources"], "nodes": 300}), "spec.resources.nodes"),
        (_with(good, "spec.training", {**training, "learningRte": 1e-4}), "spec.training.learningRte"),
    ]  # fmt: skip
    for i, (job, field) in enumerate(cases):
        job["metadata"]["name"] = f"bad-{i}"
        for extra in (("--dry-run=server",), ()):
            rc, out = _apply(cluster, namespace, job, *extra)
            assert rc != 0, (field, extra, out)
            assert f'admission webhook "{HOOK}" denied the request: {field}' in out, (field, extra, out)
        assert Jobs(cluster, namespace).get(f"bad-{i}") is None
    # The did-you-mean text reaches kubectl as the operator wrote it.
    rc, out = _apply(cluster, namespace, cases[0][0])
    assert "nodeSelector" in out.split("denied the request:", 1)[1]
    # A valid job passes both ways.
    assert _apply(cluster, namespace, good, "--dry-run=server")[0] == 0
    rc, out = _apply(cluster, namespace, good)
    assert rc == 0, out


def test_a_bad_runtime_is_refused_at_apply_by_the_webhook(
    cluster: Cluster, namespace: str, hooked: OperatorProcess
) -> None:
    def runtime(spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamBoothRuntime",
                "metadata": {"name": f"{namespace}-rt", "labels": {"dreambooth.dev/webhook-test": namespace}},
                "spec": spec}  # fmt: skip

    cases = [
        ({"podTemplate": {"tolerationz": []}}, "spec.podTemplate.tolerationz", "spec.podTemplate.tolerations"),
        ({"podTemplate": {"env": [{"name": "AWS_ACCESS_KEY_ID", "value": "x"}]}}, "spec.podTemplate.env[0].name",
         "set by the operator"),
    ]  # fmt: skip
    for spec, field, words in cases:
        for extra in (("--dry-run=server",), ()):
            rc, out = _apply(cluster, namespace, runtime(spec), *extra)
            assert rc != 0 and f'admission webhook "{HOOK_RUNTIMES}" denied the request: {field}' in out, out
            assert words in out, out
    good = runtime({"podTemplate": {"tolerations": [{"key": "gpu", "operator": "Exists"}]}})
    assert _apply(cluster, namespace, good, "--dry-run=server")[0] == 0
    assert cluster.kubectl("get", "dbr", f"{namespace}-rt", check=False).returncode != 0  # nothing was stored


def test_training_edit_after_acceptance_is_refused_and_restart_still_serves(
    cluster: Cluster, namespace: str, hooked: OperatorProcess
) -> None:
    jobs = Jobs(cluster, namespace, hooked)
    job = fake_job("edit", nodes=1, seconds=60)
    job["spec"]["podTemplate"].update({
        "labels": {"kueue.x-k8s.io/priority-class": "high", "team.example.com/cost-center": "ml-42"},
        "annotations": {"team.example.com/owner": "Ada Lovelace <ada@example.com>"},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": {"dreambooth.dev/job-name": "edit"}}}],
    })  # fmt: skip
    assert _apply(cluster, namespace, job)[0] == 0
    jobs.wait("edit", lambda s: s.get("trainingHash"), 60, "the job accepted")
    # podTemplate metadata and scheduling reach the pods the apiserver stored, beside the operator's own.
    wait_until(lambda: jobs.pods("edit"), 60, 0.25, "the job's pod")
    (pod,) = jobs.pods("edit")
    labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
    assert labels["team.example.com/cost-center"] == "ml-42" and labels["kueue.x-k8s.io/priority-class"] == "high"
    assert (
        labels["dreambooth.dev/job-name"] == "edit" and labels["app.kubernetes.io/managed-by"] == "dreambooth-operator"
    )
    assert annotations["team.example.com/owner"] == "Ada Lovelace <ada@example.com>"
    assert pod["spec"]["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    edited = _with(job, "spec.training", {**job["spec"]["training"], "maxTrainSteps": 200})
    rc, out = _apply(cluster, namespace, edited)
    assert rc != 0 and f'admission webhook "{HOOK}" denied the request: spec.training' in out, out
    assert jobs.get("edit")["spec"]["training"]["maxTrainSteps"] == 100
    # Other spec edits and metadata edits still go through.
    assert cluster.kubectl("label", "dreamboothjob", "edit", "-n", namespace, "team=ml", check=False).returncode == 0
    # The operator restarted serves again (same certificate from its directory).
    hooked.stop()
    hooked.start()
    rc, out = _apply(cluster, namespace, _with(fake_job("after", nodes=1), "spec.trainng", {}), "--dry-run=server")
    assert rc != 0 and f'admission webhook "{HOOK}" denied the request: spec.trainng' in out, out
    with pytest.raises(ApiError):
        jobs.create(edited | {"metadata": {"name": "edit2"}, "spec": {**edited["spec"], "trainng": {}}})


# The webhook server alone (the operator's, with its limits), as the chart's container serves it.
SERVE = """
import asyncio, pathlib
from dreambooth_operator import webhook
async def main():
    await webhook.serve(webhook.Limits(), pathlib.Path("/certs"), 9443)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def test_a_service_webhook_reaches_its_pod_without_kube_proxy(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    """What the chart renders: clientConfig.service + caBundle for <service>.<namespace>.svc, served by a pod."""
    service = "dbj-webhook"
    pki = Pki(tmp_path / "pki")
    pki.create_ca()
    pair = pki.issue("webhook", "webhook", server_sans=(f"DNS:{service}.{namespace}.svc",))
    cluster.kubectl("create", "secret", "tls", "webhook-tls", "-n", namespace,
                    f"--cert={pair.cert}", f"--key={pair.key}")  # fmt: skip
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "webhook", "labels": {"app": "webhook"}},
        "spec": {"containers": [{"name": "webhook", "image": IMAGE, "command": ["python", "-c", SERVE],
                                 "ports": [{"name": "webhook", "containerPort": 9443}],
                                 "volumeMounts": [{"name": "tls", "mountPath": "/certs"}]}],
                 "volumes": [{"name": "tls", "secret": {"secretName": "webhook-tls"}}]},
    }  # fmt: skip
    svc = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": service},
        "spec": {"selector": {"app": "webhook"}, "ports": [{"port": 443, "targetPort": "webhook"}]},
    }  # fmt: skip
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all([pod, svc]))
    cluster.wait_pod_phase(namespace, "webhook", "Running", timeout=60)
    cluster.kubectl("label", "namespace", namespace, f"dreambooth.dev/webhook-test={namespace}")
    name = f"dreambooth-svc-test-{namespace}"
    client = {"service": {"name": service, "namespace": namespace, "path": webhook.PATH, "port": 443}}
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(_webhook_config(name, namespace, client, pki.ca.cert)))
    try:
        bad = _with(fake_job("typo", nodes=1), "spec.trainng", {})
        # The pod's server may still be binding when it is Running: the first calls may fail (failurePolicy Fail).
        last: list[str] = [""]

        def denied() -> bool:
            last[0] = _apply(cluster, namespace, bad, "--dry-run=server")[1]
            return "denied the request" in last[0]

        wait_until(denied, 30, 0.5, "the webhook pod answering through its Service")
        assert f'admission webhook "{HOOK}" denied the request: spec.trainng' in last[0], last[0]
        assert _apply(cluster, namespace, fake_job("good", nodes=1), "--dry-run=server")[0] == 0
    finally:
        cluster.kubectl("delete", "validatingwebhookconfiguration", name, "--ignore-not-found", check=False)
