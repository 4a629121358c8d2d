"""The operator on a real v1.20 control plane with the process kubelet: failure policy, recovery, cleanup.

These tests replace the trainer with a small fake (podTemplate.command) that follows the launcher contract —
termination message, exit codes, SIGTERM -> exit 75, rank 0 serving /progress — so each policy row can be
provoked on demand. The real trainer end to end is in test_operator_e2e.py.

The manifests, the operator process and the waits are in operator_support.py (shared with the other
test_operator_* files and benchmarks/operator_scale.py); the `operator` and `jobs` fixtures in conftest.py.
"""

from __future__ import annotations

import time

import pytest
from k8s_harness import ApiError, Cluster, wait_until
from operator_support import Jobs, OperatorProcess, fake_job

pytestmark = pytest.mark.cluster


def _reasons(jobs: Jobs, name: str) -> list[str]:
    return [e["reason"] for e in jobs.events(name)]


# ---------------------------------------------------------------------------------------------------- tests


def test_invalid_manifests_are_refused_by_the_apiserver(cluster: Cluster, namespace: str) -> None:
    j = Jobs(cluster, namespace)
    cases = [
        ({"resources": {"nodes": 0}}, "spec.resources.nodes"),
        ({"method": "sdxl"}, "spec.method"),
        ({"training": {"instanceDataDir": "s3://x/", "pretrainedModelNameOrPath": "m"}}, "spec.training.instancePrompt"),
        ({"training": {**fake_job("x")["spec"]["training"], "checkpointingSteps": "often"}}, "spec.training.checkpointingSteps"),
        ({"training": {**fake_job("x")["spec"]["training"], "resolution": 4}}, "spec.training.resolution"),
        ({"runPolicy": {"backoffLimit": -1}}, "spec.runPolicy.backoffLimit"),
    ]  # fmt: skip
    for i, (patch, field) in enumerate(cases):
        job = fake_job(f"bad-{i}")
        job["spec"].update(patch)
        with pytest.raises(ApiError) as err:
            j.create(job)
        assert err.value.status == 422 and field in str(err.value), (patch, str(err.value))
    # Valid manifests get the schema's training defaults; the sections a DreamBoothRuntime can fill get none (the
    # operator applies those under the runtime when it accepts the job: status.effectiveSpec).
    stored = j.create({"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamBoothJob", "metadata": {"name": "ok"},
                       "spec": {"training": {"pretrainedModelNameOrPath": "m", "instanceDataDir": "s3://d/",
                                             "instancePrompt": "p"}}})  # fmt: skip
    spec = stored["spec"]
    assert spec["method"] == "full" and not {"resources", "runPolicy", "storage", "podTemplate", "hub"} & set(spec)
    assert spec["training"]["checkpointingSteps"] == 500 and "learningRate" not in spec["training"]


def test_fake_gang_runs_to_success_with_progress_and_printer_columns(jobs: Jobs, cluster: Cluster) -> None:
    jobs.create(fake_job("ok", seconds=14))
    st = jobs.wait_phase("ok", "Running", 60)
    assert st["attempt"] == 1 and [p["metadata"]["name"] for p in jobs.pods("ok")] == ["ok-a1-0", "ok-a1-1"]
    pod = jobs.pods("ok")[0]
    assert pod["spec"]["hostname"] == "ok-0" and pod["spec"]["subdomain"] == "ok"
    assert cluster.kube_api.exists(f"/api/v1/namespaces/{jobs.ns}/services/ok")
    # Progress comes from rank 0's /progress (polled at most every 10 s).
    st = jobs.wait("ok", lambda s: s.get("step") is not None, 30, "progress in status")
    assert st["maxSteps"] == 1000 and st["loss"] == 0.25 and st["eta"] == "42s"
    assert st["lastCheckpoint"]["uri"] == "s3://fake/checkpoint-2"
    assert st["validationImages"] == ["s3://fake/validation/0.png"]
    table = cluster.kubectl("get", "dbj", "-n", jobs.ns).stdout
    assert table.split("\n")[0].split() == ["NAME", "PHASE", "STEP", "MAX", "LOSS", "ETA", "LAST-CHECKPOINT",
                                            "PREEMPTIONS", "AGE"]  # fmt: skip
    st = jobs.wait_phase("ok", "Succeeded", 60)
    assert st["completionTime"] and st["restarts"] == 0 and st["preemptions"] == 0
    assert {"AttemptStarted", "AllPodsRunning", "Completed"} <= set(_reasons(jobs, "ok"))
    assert 'dreambooth_operator_jobs{phase="Succeeded"} 1.0' in jobs.operator.metrics()  # type: ignore[union-attr]


def test_bad_input_exit_64_fails_at_once_naming_the_field(jobs: Jobs) -> None:
    jobs.create(fake_job("bad", seconds=1, env={"FAKE_CODE": "64"}))
    st = jobs.wait_phase("bad", "Failed", 60)
    assert st["restarts"] == 0 and st["attempt"] == 1
    failed = jobs.condition("bad", "Failed")
    assert failed["reason"] == "BadInput" and "spec.training.instanceDataDir" in failed["message"]
    ev = [e for e in jobs.events("bad") if e["reason"] == "BadInput"]
    assert ev and ev[0]["type"] == "Warning"
    time.sleep(3)
    assert jobs.pods("bad", attempt=2) == []


def test_invalid_spec_fails_without_pods(jobs: Jobs) -> None:
    job = fake_job("nockpt", training={"checkpointingSteps": 500})
    job["spec"]["training"]["typoFeild"] = 1  # kept by the schema, named by the operator
    jobs.create(job)
    st = jobs.wait_phase("nockpt", "Failed", 30)
    assert "spec.training.typoFeild" in st["message"] or "checkpointingSteps" in st["message"]
    assert jobs.pods("nockpt") == []
    assert "InvalidSpec" in _reasons(jobs, "nockpt")


def test_crash_backs_off_then_fails(jobs: Jobs) -> None:
    jobs.create(fake_job("crash", seconds=1, env={"FAKE_CODE": "70"}, run_policy={"backoffLimit": 1}))
    st = jobs.wait_phase("crash", "Failed", 90)
    assert st["restarts"] == 2 and st["attempt"] == 2 and st["preemptions"] == 0
    failed = jobs.condition("crash", "Failed")
    assert failed["reason"] == "BackoffLimitExceeded" and "exit 70" in failed["message"]
    assert _reasons(jobs, "crash").count("TrainerCrashed") == 1


def test_unschedulable_is_waiting_for_resources(jobs: Jobs) -> None:
    jobs.create(fake_job("big", resources={"gpusPerNode": 64}))
    st = jobs.wait_phase("big", "WaitingForResources", 60)
    cond = jobs.condition("big", "WaitingForResources")
    assert "nvidia.com/gpu" in cond["message"] and st["restarts"] == 0
    assert "Unschedulable" in _reasons(jobs, "big")


def test_deleted_pod_is_a_preemption_and_a_new_attempt_runs(jobs: Jobs, cluster: Cluster) -> None:
    jobs.create(fake_job("pre", seconds=20, env={"FAKE_CODE_A1": "0"}))
    jobs.wait_phase("pre", "Running", 60)
    cluster.kube_api.delete(f"/api/v1/namespaces/{jobs.ns}/pods/pre-a1-1")
    st = jobs.wait("pre", lambda s: s.get("preemptions") == 1, 30, "preemption counted")
    assert st["restarts"] == 0
    # The new gang starts only after every pod of the old one is gone.
    st = jobs.wait("pre", lambda s: s.get("attempt") == 2 and s.get("phase") == "Running", 60, "attempt 2 running")
    assert jobs.pods("pre", attempt=1) == []
    assert [p["metadata"]["name"] for p in jobs.pods("pre")] == ["pre-a2-0", "pre-a2-1"]
    st = jobs.wait_phase("pre", "Succeeded", 60)
    assert (st["preemptions"], st["restarts"], st["attempt"]) == (1, 0, 2)


def test_disruption_target_preemption(jobs: Jobs, cluster: Cluster) -> None:
    jobs.create(fake_job("dt", seconds=30))
    jobs.wait_phase("dt", "Running", 60)
    cluster.preempt(jobs.ns, "dt-a1-0")
    st = jobs.wait("dt", lambda s: s.get("preemptions") == 1, 30, "preemption counted")
    assert jobs.condition("dt", "Preempted")["reason"] in ("DisruptionTarget", "PodDeleted")
    st = jobs.wait("dt", lambda s: s.get("attempt") == 2, 60, "attempt 2")
    assert st["restarts"] == 0


def test_operator_restart_mid_run_creates_no_duplicates(jobs: Jobs, operator: OperatorProcess) -> None:
    jobs.create(fake_job("rs", seconds=25))
    jobs.wait_phase("rs", "Running", 60)
    operator.kill()
    time.sleep(3)
    operator.start()
    time.sleep(8)
    assert [p["metadata"]["name"] for p in jobs.pods("rs")] == ["rs-a1-0", "rs-a1-1"]
    st = jobs.wait_phase("rs", "Succeeded", 60)
    assert st["attempt"] == 1 and st["preemptions"] == 0 and st["restarts"] == 0


def test_pod_deleted_while_operator_is_down_is_found_on_restart(jobs: Jobs, operator: OperatorProcess,
                                                                 cluster: Cluster) -> None:  # fmt: skip
    jobs.create(fake_job("gone", seconds=40))
    jobs.wait_phase("gone", "Running", 60)
    operator.kill()
    cluster.kube_api.delete(f"/api/v1/namespaces/{jobs.ns}/pods/gone-a1-0")
    wait_until(lambda: cluster.pod(jobs.ns, "gone-a1-0") is None, 30, 0.2, "pod gone")
    operator.start()
    st = jobs.wait("gone", lambda s: s.get("attempt") == 2 and s.get("phase") == "Running", 60, "attempt 2")
    assert st["preemptions"] == 1 and len(jobs.pods("gone")) == 2


def test_suspend_and_resume(jobs: Jobs) -> None:
    jobs.create(fake_job("sus", seconds=60))
    jobs.wait_phase("sus", "Running", 60)
    jobs.patch_spec("sus", {"runPolicy": {"suspend": True}})
    st = jobs.wait("sus", lambda s: s.get("phase") == "Suspended" and
                   (jobs.condition("sus", "Suspended").get("reason") == "Suspended"), 60, "suspended")  # fmt: skip
    assert jobs.pods("sus") == [] and st["preemptions"] == 0 and st["restarts"] == 0
    jobs.patch_spec("sus", {"runPolicy": {"suspend": False}})
    st = jobs.wait("sus", lambda s: s.get("attempt") == 2 and s.get("phase") == "Running", 60, "resumed")
    assert "Resumed" in _reasons(jobs, "sus")


def test_training_edit_is_refused_while_running(jobs: Jobs) -> None:
    jobs.create(fake_job("edit", seconds=40))
    jobs.wait_phase("edit", "Running", 60)
    training = fake_job("edit")["spec"]["training"]
    jobs.patch_spec("edit", {"training": {**training, "learningRate": 0.5}})
    jobs.wait("edit", lambda s: any(c["type"] == "SpecChangeRefused" and c["status"] == "True"
                                    for c in s.get("conditions", [])), 30, "edit refused")  # fmt: skip
    cond = jobs.condition("edit", "SpecChangeRefused")
    assert "spec.training.learningRate" in cond["message"]
    assert "TrainingEdited" in _reasons(jobs, "edit")
    assert jobs.status("edit")["phase"] == "Running"


def test_job_deletion_removes_pods_service_and_configmap(jobs: Jobs, cluster: Cluster) -> None:
    jobs.create(fake_job("del", seconds=60))
    jobs.wait_phase("del", "Running", 60)
    job = jobs.get("del")
    assert job is not None and not job["metadata"].get("finalizers")
    cluster.kube_api.delete(f"{jobs.base}/del")
    ns = jobs.ns
    wait_until(lambda: jobs.get("del") is None, 30, 0.2, "job gone (no finalizer blocks it)")
    wait_until(lambda: jobs.pods("del") == [], 60, 0.5, "pods garbage-collected")
    wait_until(lambda: not cluster.kube_api.exists(f"/api/v1/namespaces/{ns}/services/del"), 60, 0.5, "service gone")
    wait_until(
        lambda: not cluster.kube_api.exists(f"/api/v1/namespaces/{ns}/configmaps/del-config"), 60, 0.5, "cm gone"
    )


def test_node_lost_recovers_on_another_node(jobs: Jobs, cluster: Cluster) -> None:
    jobs.create(fake_job("lost", nodes=1, seconds=120, run_policy={"terminationGracePeriodSeconds": 2}))
    jobs.wait_phase("lost", "Running", 60)
    node = jobs.pods("lost")[0]["spec"]["nodeName"]
    cluster.node_lost(node)
    try:
        st = jobs.wait("lost", lambda s: s.get("preemptions") == 1, 150, "node loss seen as a preemption")
        st = jobs.wait("lost", lambda s: s.get("attempt") == 2 and s.get("phase") == "Running", 120, "attempt 2")
        new_node = jobs.pods("lost", attempt=2)[0]["spec"]["nodeName"]
        assert new_node != node and st["restarts"] == 0
    finally:
        cluster.node_recover(node)


HUB_TOKEN = "hf_clusterTestTokenNeverInPlainText42"
_CHECK_HUB_TOKEN = (
    "import hashlib, os\n"
    "if hashlib.sha256(os.environ.get('HF_TOKEN', '').encode()).hexdigest() != os.environ['WANT_TOKEN_SHA256']:\n"
    "    os.environ['FAKE_CODE'] = '70'\n"
)


def test_hub_token_from_a_secret_never_appears_in_plain_text(jobs: Jobs, cluster: Cluster) -> None:
    """Issue #15: spec.training.hubToken was copied into the job's ConfigMap. The token now comes from a Secret
    by reference; a token in the manifest is refused (InvalidSpec) without being echoed anywhere."""
    import hashlib
    import json

    from operator_support import FAKE_TRAINER

    ns = jobs.ns
    cluster.kube_api.create(
        f"/api/v1/namespaces/{ns}/secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"}, "stringData": {"token": HUB_TOKEN}},
    )
    good = fake_job(
        "hubref", nodes=1, seconds=2, command=["python", "-u", "-c", _CHECK_HUB_TOKEN + FAKE_TRAINER],
        env={"WANT_TOKEN_SHA256": hashlib.sha256(HUB_TOKEN.encode()).hexdigest()},
    )  # fmt: skip
    good["spec"]["hub"] = {"tokenSecretRef": {"name": "hf-token", "key": "token"}}
    jobs.create(good)
    jobs.wait("hubref", lambda s: s.get("attempt"), 60, "the first attempt")
    cm = cluster.kube_api.get(f"/api/v1/namespaces/{ns}/configmaps/hubref-config")
    pod = jobs.pods("hubref")[0]
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
    st = jobs.wait_phase("hubref", "Succeeded", 90)  # the pod checked that HF_TOKEN holds the Secret's token
    bad = fake_job("hubtoken", nodes=1, seconds=1)
    bad["spec"]["training"]["hubToken"] = HUB_TOKEN
    jobs.create(bad)
    bad_st = jobs.wait_phase("hubtoken", "Failed", 30)
    assert "spec.training.hubToken" in bad_st["message"] and "spec.hub.tokenSecretRef" in bad_st["message"]
    assert "InvalidSpec" in _reasons(jobs, "hubtoken") and jobs.pods("hubtoken") == []
    assert not cluster.kube_api.exists(f"/api/v1/namespaces/{ns}/configmaps/hubtoken-config")

    seen = {
        "configmap": json.dumps(cm),
        "pod spec": json.dumps(pod),
        "status": json.dumps([st, bad_st]),
        "events": json.dumps(jobs.events("hubref") + jobs.events("hubtoken")),
        "pod log": cluster.pod_log(ns, pod["metadata"]["name"]),
        "operator log": jobs.operator.log(100000),  # type: ignore[union-attr]
    }
    leaked = [where for where, text in seen.items() if HUB_TOKEN in text]
    assert not leaked, f"the Hub token appears in: {leaked}"
