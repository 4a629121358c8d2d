"""The reconciler end to end against an in-memory apiserver and a scripted kubelet (no cluster, no processes).

Each scenario drives the job through the same reconcile function the operator runs, moving a fake clock, and
checks the status, the pods and the Events the way a user would see them.
"""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dreambooth_operator import status as S
from dreambooth_operator.plan import PlanOptions
from dreambooth_operator.reconciler import Reconciler
from dreambooth_operator.resources import LABEL_ATTEMPT, LABEL_JOB_UID

pytestmark = pytest.mark.unit
START = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


class ApiError(Exception):
    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = json.dumps({"message": message})


def ts(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


class FakeKube:
    """Enough of an apiserver: objects by name, 409 on duplicates, graceful pod deletion, request counts."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.other: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.calls: list[str] = []
        self.fail_create_of: dict[str, int] = {}  # object name -> HTTP status, once
        self.fail_message = "spec.volumes[4].persistentVolumeClaim.claimName: Required value"
        self.created_pods: list[str] = []
        self.runtimes: dict[str, dict[str, Any]] = {}
        self.rv = 1

    # KubeApi
    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append("get_job")
        job = self.jobs.get((namespace, name))
        return copy.deepcopy(job) if job else None

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any],
                         resource_version: str | None = None) -> dict[str, Any] | None:  # fmt: skip
        self.calls.append("patch_status")
        job = self.jobs.get((namespace, name))
        if job is None:
            return None
        if resource_version is not None and resource_version != job["metadata"].get("resourceVersion"):
            raise ApiError(409, "the object has been modified")
        job["status"] = merge(job.get("status") or {}, status)
        self.bump(job)
        return copy.deepcopy(job)

    def bump(self, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def delete_job(self, namespace: str, name: str, uid: str) -> None:
        self.calls.append("delete_job")
        self.jobs.pop((namespace, name), None)

    def list_pods(self, namespace: str, job_uid: str) -> list[dict[str, Any]]:
        self.calls.append("list_pods")
        return [copy.deepcopy(p) for (ns, _), p in sorted(self.pods.items())
                if ns == namespace and p["metadata"]["labels"].get(LABEL_JOB_UID) == job_uid]  # fmt: skip

    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append("get_configmap")
        return copy.deepcopy(self.other.get(("ConfigMap", namespace, name)))

    def get_node(self, name: str) -> dict[str, Any] | None:
        self.calls.append("get_node")
        return copy.deepcopy(self.nodes.get(name))

    def get_runtime(self, name: str) -> dict[str, Any] | None:
        self.calls.append("get_runtime")
        return copy.deepcopy(self.runtimes.get(name))

    def list_runtimes(self) -> list[dict[str, Any]]:
        self.calls.append("list_runtimes")
        return [copy.deepcopy(r) for _, r in sorted(self.runtimes.items())]

    def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        self.calls.append(f"create_{obj['kind']}")
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        if name in self.fail_create_of:
            raise ApiError(self.fail_create_of.pop(name), self.fail_message)
        obj = copy.deepcopy(obj)
        obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp=ts(self.clock.now))
        if obj["kind"] == "Pod":
            if (ns, name) in self.pods:
                return None
            obj["status"] = {"phase": "Pending"}
            self.pods[(ns, name)] = obj
            self.created_pods.append(name)
            return copy.deepcopy(obj)
        key = (obj["kind"], ns, name)
        if key in self.other:
            return None
        self.other[key] = obj
        return copy.deepcopy(obj)

    def patch_pod(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.calls.append("patch_pod")
        pod = self.pods.get((namespace, name))
        if pod is not None:
            pod["metadata"].setdefault("annotations", {}).update(patch["metadata"]["annotations"])

    def delete_pod(self, namespace: str, name: str, grace_seconds: int | None = None) -> None:
        self.calls.append("delete_pod" if grace_seconds is None else "force_delete_pod")
        pod = self.pods.get((namespace, name))
        if pod is None:
            return
        finished = pod["status"].get("phase") in ("Succeeded", "Failed")
        grace = pod["spec"]["terminationGracePeriodSeconds"] if grace_seconds is None else grace_seconds
        if finished or grace == 0 or pod["status"].get("phase") == "Pending":
            del self.pods[(namespace, name)]
        elif not pod["metadata"].get("deletionTimestamp"):
            pod["metadata"]["deletionTimestamp"] = ts(self.clock.now + timedelta(seconds=grace))

    def create_event(self, namespace: str, event: dict[str, Any]) -> None:
        self.calls.append("create_event")
        self.events.append(event)

    # ----- the scripted kubelet and cluster -----

    def job_pods(self, name: str = "dog", attempt: int | None = None) -> list[dict[str, Any]]:
        out = [p for p in self.pods.values() if p["metadata"]["name"].startswith(f"{name}-a")]
        if attempt is not None:
            out = [p for p in out if p["metadata"]["labels"][LABEL_ATTEMPT] == str(attempt)]
        return sorted(out, key=lambda p: p["metadata"]["name"])

    def run(self, pod: dict[str, Any], ip: str = "10.0.0.1") -> None:
        pod["spec"]["nodeName"] = "node-1"
        pod["status"] = {
            "phase": "Running", "podIP": ip,
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "trainer", "state": {"running": {"startedAt": ts(self.clock.now)}}}],
        }  # fmt: skip

    def run_all(self, attempt: int | None = None) -> None:
        for i, pod in enumerate(self.job_pods(attempt=attempt)):
            if pod["status"]["phase"] == "Pending":
                self.run(pod, f"10.0.0.{i + 1}")

    def exit(self, pod: dict[str, Any], code: int, message: dict[str, Any] | str = "", reason: str = "Error") -> None:
        text = json.dumps(message) if isinstance(message, dict) else message
        pod["status"]["phase"] = "Succeeded" if code == 0 else "Failed"
        pod["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": code, "reason": "Completed" if code == 0 else reason, "message": text,
            "finishedAt": ts(self.clock.now)}}}]  # fmt: skip

    def unschedulable(self, pod: dict[str, Any]) -> None:
        pod["status"] = {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}]}  # fmt: skip

    def kubelet_finishes_deletions(self, code: int = 75) -> None:
        """Deleted pods get SIGTERM, write an emergency checkpoint, exit 75 and disappear."""
        for key, pod in list(self.pods.items()):
            if pod["metadata"].get("deletionTimestamp"):
                del self.pods[key]

    def event_reasons(self) -> list[str]:
        return [e["reason"] for e in self.events]


class Clock:
    def __init__(self) -> None:
        self.now = START
        self.mono = 1000.0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.mono += seconds


def job_manifest(**spec: Any) -> dict[str, Any]:
    training = {
        "pretrainedModelNameOrPath": "s3://models/tiny/", "instanceDataDir": "s3://data/dog/",
        "instancePrompt": "a photo of sks dog", "outputDir": "s3://runs/dog/", "maxTrainSteps": 20,
        "checkpointingSteps": 5, "resolution": 64,
    }  # fmt: skip
    body: dict[str, Any] = {
        "method": "lora",
        "training": training,
        "resources": {"nodes": 2, "gpusPerNode": 0, "image": "trainer:test"},
        "runPolicy": {"backoffLimit": 1, "maxPreemptions": 5, "terminationGracePeriodSeconds": 30,
                      "schedulingTimeoutSeconds": 300, "progressDeadlineSeconds": 600},
    }  # fmt: skip
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return body


class Env:
    def __init__(self, **spec: Any) -> None:
        self.clock = Clock()
        self.kube = FakeKube(self.clock)
        self.progress: dict[str, Any] | None = None
        self.fetches: list[str] = []
        self.reconciler = self.new_reconciler()
        self.kube.jobs[("ns", "dog")] = {
            "apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamBoothJob",
            "metadata": {"name": "dog", "namespace": "ns", "uid": "uid-1", "generation": 1,
                         "creationTimestamp": ts(START)},
            "spec": job_manifest(**spec),
        }  # fmt: skip

    def new_reconciler(self) -> Reconciler:
        """A fresh operator process: nothing in memory, same apiserver."""
        return Reconciler(self.kube, PlanOptions(backoff_base_seconds=10), clock=self.clock, fetch=self._fetch,
                          monotonic=lambda: self.clock.mono)  # fmt: skip

    def _fetch(self, ip: str, port: int) -> dict[str, Any] | None:
        self.fetches.append(ip)
        return self.progress

    def reconcile(self) -> dict[str, Any]:
        self.reconciler.reconcile("ns", "dog")
        return self.status()

    def status(self) -> dict[str, Any]:
        job = self.kube.jobs.get(("ns", "dog"))
        return (job or {}).get("status") or {}

    def cond(self, type_: str) -> dict[str, Any]:
        return next((c for c in self.status().get("conditions", []) if c["type"] == type_), {})

    def edit_spec(self, **spec: Any) -> None:
        job = self.kube.jobs[("ns", "dog")]
        job["spec"] = job_manifest(**spec)
        job["metadata"]["generation"] += 1
        self.kube.bump(job)


def done(step: int = 20) -> dict[str, Any]:
    return {"reason": "completed", "step": step, "checkpointUri": "s3://runs/dog/checkpoint-20", "message": "done"}


def test_happy_path_fills_every_status_field() -> None:
    env = Env()
    st = env.reconcile()
    assert st["attempt"] == 1 and st["phase"] == "Created"
    assert [p["metadata"]["name"] for p in env.kube.job_pods()] == ["dog-a1-0", "dog-a1-1"]
    assert ("ConfigMap", "ns", "dog-config") in env.kube.other and ("Service", "ns", "dog") in env.kube.other
    assert st["gangCreated"] == 1 and st["trainingHash"] and st["startTime"] == ts(START)
    assert st["outputUri"] == "s3://runs/dog/" and st["logsUri"] == "s3://runs/dog/logs/attempt-1/"
    assert "AttemptStarted" in env.kube.event_reasons()
    # Pods first, then one status write saying "attempt 1, gang created"; the created pods are taken from the
    # create responses, not listed again.
    assert env.kube.calls.count("list_pods") == 1 and env.kube.calls.count("patch_status") == 1
    assert env.kube.calls.index("create_Pod") < env.kube.calls.index("patch_status")

    env.kube.run_all()
    env.progress = {"phase": "training", "step": 7, "maxSteps": 20, "loss": 0.123, "stepsPerSecond": 2.0,
                    "etaSeconds": 6.5, "lastCheckpoint": {"step": 5, "uri": "s3://runs/dog/checkpoint-5",
                                                          "time": "2026-01-01T12:00:03Z"},
                    "validationImages": ["s3://runs/dog/validation/step-5-0.png"],
                    "startupSeconds": {"sync": 41.5, "load": 9.0, "data": 1.25, "firstStep": 2.0, "other": 3.0,
                                       "total": 56.75}}  # fmt: skip
    env.clock.advance(11)
    st = env.reconcile()
    assert st["phase"] == "Running" and env.cond("Running")["status"] == "True"
    assert (st["step"], st["maxSteps"], st["loss"], st["stepsPerSecond"]) == (7, 20, 0.123, 2.0)
    assert st["etaSeconds"] == 6 and st["eta"] == "6s" and st["trainerPhase"] == "training"
    # Where the attempt's start-up went, as rank 0 timed it (docs/design.md, /progress startupSeconds).
    assert st["startupSeconds"] == {"sync": 41.5, "load": 9.0, "data": 1.25, "firstStep": 2.0, "other": 3.0,
                                    "total": 56.75}  # fmt: skip
    assert st["lastCheckpoint"] == {"step": 5, "uri": "s3://runs/dog/checkpoint-5", "time": "2026-01-01T12:00:03Z"}
    # Checkpointed: its time is the checkpoint's (what a checkpoint-aware scheduler compares); not a phase.
    checkpointed = env.cond("Checkpointed")
    assert (checkpointed["status"], checkpointed["reason"]) == ("True", "CheckpointPublished")
    assert checkpointed["lastTransitionTime"] == "2026-01-01T12:00:03Z" and "checkpoint-5" in checkpointed["message"]
    assert st["validationImages"] == ["s3://runs/dog/validation/step-5-0.png"]
    assert env.fetches == ["10.0.0.1"]  # rank 0 only
    # The same time on every running pod, for schedulers that pick preemption victims by checkpoint freshness;
    # written once per new checkpoint, not at every reconcile.
    for pod in env.kube.job_pods():
        assert pod["metadata"]["annotations"]["dreambooth.dev/last-checkpoint-time"] == "2026-01-01T12:00:03Z"
    assert env.kube.calls.count("patch_pod") == 2
    env.clock.advance(11)
    env.reconcile()
    assert env.kube.calls.count("patch_pod") == 2

    env.clock.advance(5)
    final_images = ["s3://runs/dog/validation/step-20-0.png"]
    pods = env.kube.job_pods()
    # Rank 0's pod names the final validation's images, which ran after the last /progress poll; rank 1's none.
    env.kube.exit(pods[0], 0, {**done(), "validationImages": final_images})
    env.kube.exit(pods[1], 0, done())
    st = env.reconcile()
    assert st["phase"] == "Succeeded" and st["completionTime"] == ts(env.clock.now)
    assert st["validationImages"] == final_images
    # The final model named by the completion message is not a checkpoint: the last polled one stands.
    assert st["step"] == 20 and st["lastCheckpoint"]["step"] == 5 and st["eta"] == "0s"
    assert st["preemptions"] == 0 and st["restarts"] == 0 and st["observedGeneration"] == 1
    assert "Completed" in env.kube.event_reasons()
    # Finished pods stay for `kubectl logs`.
    assert len(env.kube.job_pods()) == 2


def test_status_is_patched_only_when_it_changes() -> None:
    env = Env()
    env.reconcile()
    env.kube.run_all()
    env.reconcile()
    before = env.kube.calls.count("patch_status")
    for _ in range(5):
        env.clock.advance(3)
        env.reconcile()
    assert env.kube.calls.count("patch_status") == before
    # An idle reconcile costs one GET and one LIST.
    env.kube.calls.clear()
    env.reconcile()
    assert env.kube.calls == ["get_job", "list_pods"]


def test_progress_is_polled_at_most_every_10_seconds() -> None:
    env = Env()
    env.reconcile()
    env.kube.run_all()
    for _ in range(10):
        env.reconcile()
        env.clock.advance(2)
    assert len(env.fetches) == 2  # t=0 and t=10


def test_pod_deleted_by_someone_else_is_a_preemption_and_resumes() -> None:
    env = Env()
    env.reconcile()
    env.kube.run_all()
    env.reconcile()
    env.progress = {"phase": "training", "step": 9, "maxSteps": 20,
                    "lastCheckpoint": {"step": 5, "uri": "s3://runs/dog/checkpoint-5"}}  # fmt: skip
    env.clock.advance(10)
    env.reconcile()
    env.kube.delete_pod("ns", "dog-a1-1")  # spot reclaim / kubectl delete pod
    env.clock.advance(1)
    st = env.reconcile()
    assert st["preemptions"] == 1 and st["restarts"] == 0 and st["phase"] == "Preempted"
    assert env.cond("Preempted")["reason"] == S.R_POD_DELETED
    # The whole gang gets SIGTERM; no new pods while any old one is still stopping.
    assert all(p["metadata"].get("deletionTimestamp") for p in env.kube.job_pods(attempt=1))
    assert env.kube.job_pods(attempt=2) == []
    env.clock.advance(5)
    env.reconcile()
    assert env.kube.job_pods(attempt=2) == []
    env.kube.kubelet_finishes_deletions()
    st = env.reconcile()
    assert st["attempt"] == 2 and st["logsUri"].endswith("attempt-2/")
    assert [p["metadata"]["name"] for p in env.kube.job_pods()] == ["dog-a2-0", "dog-a2-1"]
    env.kube.run_all()
    env.clock.advance(11)
    st = env.reconcile()
    assert st["phase"] == "Running" and env.cond("Preempted")["status"] == "False"
    assert st["preemptions"] == 1 and st["restarts"] == 0
    assert env.kube.event_reasons().count("Preempted") == 1


def test_pod_gone_without_trace_is_a_preemption() -> None:
    env = Env()
    env.reconcile()
    env.kube.run_all()
    env.reconcile()
    del env.kube.pods[("ns", "dog-a1-0")]  # force-deleted while the operator was away
    st = env.reconcile()
    assert st["preemptions"] == 1 and env.cond("Preempted")["reason"] == S.R_POD_DELETED


def test_operator_restart_creates_no_duplicates() -> None:
    env = Env()
    # The first operator dies half-way through creating the gang, before any status write.
    env.kube.fail_create_of["dog-a1-1"] = 503
    with pytest.raises(ApiError):
        env.reconcile()
    assert env.status() == {} and [p["metadata"]["name"] for p in env.kube.job_pods()] == ["dog-a1-0"]
    env.reconciler = env.new_reconciler()
    env.reconcile()
    env.reconciler = env.new_reconciler()
    env.reconcile()
    assert env.kube.created_pods == ["dog-a1-0", "dog-a1-1"]
    # Status lost entirely (e.g. restored from backup): the attempt is recovered from the pods' labels.
    env.kube.run_all()
    env.kube.jobs[("ns", "dog")]["status"] = {}
    env.reconciler = env.new_reconciler()
    st = env.reconcile()
    assert st["attempt"] == 1 and env.kube.created_pods == ["dog-a1-0", "dog-a1-1"]


def test_crash_backs_off_then_fails_with_the_reason() -> None:
    env = Env()
    env.reconcile()
    env.kube.run_all()
    env.reconcile()
    env.clock.advance(30)
    pods = env.kube.job_pods()
    env.kube.exit(pods[0], 70, {"reason": "crash", "message": "RuntimeError: boom", "step": 3})
    env.kube.exit(pods[1], 70, "Traceback...\nRuntimeError: peer gone")
    st = env.reconcile()
    assert st["restarts"] == 1 and st["preemptions"] == 0 and st["endedReason"] == S.R_CRASH
    assert "TrainerCrashed" in env.kube.event_reasons()
    assert env.kube.job_pods() == []  # finished pods of a retried attempt are removed
    env.clock.advance(5)
    st = env.reconcile()
    assert st["phase"] == "Pending" and "starts in 5 s" in st["message"]
    assert env.kube.job_pods() == []
    env.clock.advance(6)
    st = env.reconcile()
    assert st["attempt"] == 2 and len(env.kube.job_pods(attempt=2)) == 2
    env.kube.run_all()
    env.reconcile()
    env.clock.advance(30)
    for pod in env.kube.job_pods():
        env.kube.exit(pod, 70, {"reason": "crash", "message": "RuntimeError: boom again"})
    st = env.reconcile()
    assert st["phase"] == "Failed" and st["restarts"] == 2
    failed = env.cond("Failed")
    assert failed["reason"] == S.R_BACKOFF_LIMIT and "boom again" in failed["message"]
    assert st["completionTime"] == ts(env.clock.now)
    env.clock.advance(100)
    env.reconcile()
    assert env.kube.job_pods(attempt=3) == []


def test_bad_input_fails_at_once() -> None:
    env = Env()
    env.reconcile()
    env.kube.run_all()
    pods = env.kube.job_pods()
    env.kube.exit(pods[0], 64, {"reason": "bad-input", "message": "--instance_data_dir (spec.training.instanceDataDir): "
                                "no images in s3://data/dog/"})  # fmt: skip
    st = env.reconcile()
    assert st["phase"] == "Failed" and st["restarts"] == 0
    assert env.cond("Failed")["reason"] == S.R_BAD_INPUT
    assert "spec.training.instanceDataDir" in st["message"]
    assert env.kube.job_pods()[1]["metadata"].get("deletionTimestamp")  # the peer is stopped


def test_invalid_spec_fails_naming_the_field_without_pods() -> None:
    env = Env(training={**job_manifest()["training"], "withPriorPreservation": True, "classDataDir": "s3://c/"})
    st = env.reconcile()
    assert st["phase"] == "Failed" and env.cond("Failed")["reason"] == S.R_INVALID_SPEC
    assert "spec.training.classPrompt" in st["message"]
    assert env.kube.created_pods == []
    warning = [e for e in env.kube.events if e["reason"] == S.R_INVALID_SPEC]
    assert warning and warning[0]["type"] == "Warning" and "classPrompt" in warning[0]["message"]


def test_apiserver_refusal_of_a_built_pod_fails_the_job() -> None:
    env = Env()
    env.kube.fail_create_of["dog-config"] = 422
    st = env.reconcile()
    assert st["phase"] == "Failed" and "refused ConfigMap" in st["message"] and "claimName" in st["message"]


def test_pod_security_admission_refusal_fails_the_job_and_other_403s_retry() -> None:
    env = Env()
    env.kube.fail_message = (
        'pods "dog-a1-0" is forbidden: violates PodSecurity "baseline:latest": hostPath volumes (volume "node")'
    )
    env.kube.fail_create_of["dog-a1-0"] = 403
    st = env.reconcile()
    assert st["phase"] == "Failed" and "violates PodSecurity" in st["message"] and "hostPath" in st["message"]
    # A 403 that is not Pod Security (RBAC not bound yet) is no verdict on the job: it is raised and retried.
    env = Env()
    env.kube.fail_message = 'pods is forbidden: User "system:serviceaccount:x:y" cannot create resource "pods"'
    env.kube.fail_create_of["dog-a1-0"] = 403
    with pytest.raises(ApiError):
        env.reconcile()


def test_unschedulable_waits_without_cost_then_times_out() -> None:
    env = Env()
    env.reconcile()
    for pod in env.kube.job_pods():
        env.kube.unschedulable(pod)
    st = env.reconcile()
    assert st["phase"] == "WaitingForResources" and st["restarts"] == 0
    assert "Insufficient nvidia.com/gpu" in env.cond("WaitingForResources")["message"]
    assert "autoscaler" in env.cond("WaitingForResources")["message"]
    env.clock.advance(200)
    assert env.reconcile()["restarts"] == 0
    env.clock.advance(101)
    st = env.reconcile()
    assert st["restarts"] == 1 and st["endedReason"] == S.R_SCHEDULING_TIMEOUT


def test_gpu_oom_retries_once_with_memory_savers() -> None:
    env = Env(runPolicy={"backoffLimit": 0})
    env.reconcile()
    env.kube.run_all()
    env.reconcile()
    env.clock.advance(20)
    for pod in env.kube.job_pods():
        env.kube.exit(pod, 71, {"reason": "gpu-oom", "message": "CUDA out of memory"})
    st = env.reconcile()
    assert st["memorySavers"] is True and st["restarts"] == 0
    gpu = [e for e in env.kube.events if e["reason"] == S.R_GPU_OOM]
    assert gpu and "no longer bit-exact" in gpu[0]["message"]
    st = env.reconcile()
    assert st["attempt"] == 2
    for pod in env.kube.job_pods(attempt=2):
        env_vars = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env_vars["DREAMBOOTH_MEMORY_SAVERS"] == "1"
    env.kube.run_all()
    env.reconcile()
    for pod in env.kube.job_pods():
        env.kube.exit(pod, 71, {"reason": "gpu-oom", "message": "CUDA out of memory"})
    st = env.reconcile()
    assert st["phase"] == "Failed" and env.cond("Failed")["reason"] == S.R_GPU_OOM


def test_suspend_and_resume() -> None:
    env = Env()
    env.reconcile()
    env.kube.run_all()
    env.reconcile()
    env.edit_spec(runPolicy={"suspend": True})
    st = env.reconcile()
    assert st["phase"] == "Suspended" and env.cond("Suspended")["reason"] == S.R_SUSPEND_REQUESTED
    assert all(p["metadata"].get("deletionTimestamp") for p in env.kube.job_pods())
    env.kube.kubelet_finishes_deletions()
    st = env.reconcile()
    assert st["phase"] == "Suspended" and env.cond("Suspended")["reason"] == S.R_SUSPENDED
    assert st["preemptions"] == 0 and st["restarts"] == 0 and env.kube.job_pods() == []
    env.clock.advance(60)
    env.edit_spec(runPolicy={"suspend": False})
    st = env.reconcile()
    assert st["attempt"] == 2 and len(env.kube.job_pods(attempt=2)) == 2
    assert env.cond("Suspended")["status"] == "False" and st["startTime"] == ts(env.clock.now)
    assert "Resumed" in env.kube.event_reasons()


def test_created_suspended_runs_nothing() -> None:
    env = Env(runPolicy={"suspend": True})
    st = env.reconcile()
    assert st["phase"] == "Suspended" and env.kube.created_pods == []


def test_training_edit_is_refused_and_the_accepted_config_kept() -> None:
    env = Env()
    env.reconcile()
    env.kube.run_all()
    env.reconcile()
    config_before = copy.deepcopy(env.kube.other[("ConfigMap", "ns", "dog-config")])
    env.edit_spec(training={**job_manifest()["training"], "learningRate": 0.1})
    st = env.reconcile()
    refused = env.cond("SpecChangeRefused")
    assert refused["status"] == "True" and "spec.training.learningRate" in refused["message"]
    assert st["phase"] == "Running"
    assert [e["type"] for e in env.kube.events if e["reason"] == S.R_TRAINING_EDITED] == ["Warning"]
    # A new attempt still runs the accepted settings.
    env.kube.delete_pod("ns", "dog-a1-0")
    env.reconcile()
    env.kube.kubelet_finishes_deletions()
    env.reconcile()
    assert len(env.kube.job_pods(attempt=2)) == 2
    assert env.kube.other[("ConfigMap", "ns", "dog-config")] == config_before
    env.edit_spec()  # reverted
    env.reconcile()
    assert env.cond("SpecChangeRefused")["status"] == "False"


def test_active_deadline_fails_and_stops_the_pods() -> None:
    env = Env(runPolicy={"activeDeadlineSeconds": 100})
    env.reconcile()
    env.kube.run_all()
    env.reconcile()
    env.clock.advance(101)
    st = env.reconcile()
    assert st["phase"] == "Failed" and env.cond("Failed")["reason"] == S.R_DEADLINE
    assert all(p["metadata"].get("deletionTimestamp") for p in env.kube.job_pods())


def test_ttl_deletes_the_finished_job() -> None:
    env = Env(runPolicy={"ttlSecondsAfterFinished": 60})
    env.reconcile()
    env.kube.run_all()
    for pod in env.kube.job_pods():
        env.kube.exit(pod, 0, done())
    env.reconcile()
    env.clock.advance(30)
    env.reconcile()
    assert ("ns", "dog") in env.kube.jobs
    env.clock.advance(31)
    assert env.reconciler.reconcile("ns", "dog") is None
    assert ("ns", "dog") not in env.kube.jobs


def test_node_lost_is_a_preemption_and_dead_pods_are_force_deleted() -> None:
    env = Env()
    env.reconcile()
    env.kube.run_all()
    env.reconcile()
    env.kube.nodes["node-1"] = {"status": {"conditions": [
        {"type": "Ready", "status": "Unknown", "lastTransitionTime": ts(env.clock.now)}]}}  # fmt: skip
    for pod in env.kube.job_pods():
        pod["status"]["conditions"][1]["status"] = "False"
    env.clock.advance(30)
    assert env.reconcile()["preemptions"] == 0
    env.clock.advance(31)
    st = env.reconcile()
    assert st["preemptions"] == 1 and env.cond("Preempted")["reason"] == S.R_NODE_LOST
    # Nobody will ever confirm these deletions: after the grace period (+30 s) they are forced.
    env.clock.advance(30 + 31)
    env.reconcile()
    assert "force_delete_pod" in env.kube.calls
    st = env.reconcile()
    assert st["attempt"] == 2 and len(env.kube.job_pods(attempt=2)) == 2


def test_disruption_target_preemption() -> None:
    env = Env()
    env.reconcile()
    env.kube.run_all()
    env.reconcile()
    pod = env.kube.job_pods()[0]
    pod["status"]["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
                                        "message": "preempted by a higher-priority pod"})  # fmt: skip
    st = env.reconcile()
    assert st["preemptions"] == 1 and env.cond("Preempted")["reason"] == S.R_DISRUPTION


def test_hung_gang_is_torn_down_and_counted() -> None:
    env = Env()
    env.reconcile()
    env.kube.run_all()
    env.progress = {"phase": "training", "step": 3, "maxSteps": 20}
    env.reconcile()
    for _ in range(6):
        env.clock.advance(100)
        env.reconcile()
    assert env.status()["restarts"] == 0
    env.clock.advance(100)
    st = env.reconcile()
    assert st["restarts"] == 1 and st["endedReason"] == S.R_HUNG


def test_metrics_count_requests_preemptions_and_writes() -> None:
    from dreambooth_operator.metrics import Metrics

    env = Env()
    metrics = Metrics()
    env.reconciler.metrics = metrics
    env.reconcile()
    env.kube.run_all()
    env.reconcile()
    env.kube.delete_pod("ns", "dog-a1-0")
    env.reconcile()
    text = metrics.render().decode()
    assert 'dreambooth_operator_preemptions_total{namespace="ns",reason="PodDeleted"} 1.0' in text
    assert "dreambooth_operator_status_writes_total" in text
    assert 'dreambooth_operator_job_attempt{dreambooth_job="dog",namespace="ns"} 1.0' in text
    assert 'dreambooth_operator_job_preemptions{dreambooth_job="dog",namespace="ns"} 1.0' in text
    assert 'dreambooth_operator_job_preemptions_without_progress{dreambooth_job="dog",namespace="ns"}' in text
    assert 'dreambooth_build_info{component="operator"' in text


def test_emergency_checkpoint_from_the_termination_message() -> None:
    env = Env()
    env.reconcile()
    env.kube.run_all()
    env.reconcile()
    stopped = {"reason": "Preempted", "step": 9, "checkpointUri": "s3://runs/dog/checkpoint-9",
               "message": "emergency checkpoint at step 9 published"}  # fmt: skip
    for pod in env.kube.job_pods():
        env.kube.exit(pod, 75, stopped)
    st = env.reconcile()
    assert st["preemptions"] == 1 and st["lastCheckpoint"]["step"] == 9
    assert st["lastCheckpoint"]["uri"] == "s3://runs/dog/checkpoint-9"
    # The emergency checkpoint moves the Checkpointed condition's time to when the pods said so.
    assert env.cond("Checkpointed")["lastTransitionTime"] == st["lastCheckpoint"]["time"]
    assert "checkpoint-9" in env.cond("Checkpointed")["message"]
    assert env.cond("Preempted")["reason"] == S.R_LAUNCHER_PREEMPTED
    assert "emergency checkpoint at step 9" in env.cond("Preempted")["message"]


def test_gang_above_max_nodes_fails_naming_the_field_without_pods() -> None:
    """Issue 17, item 5: 20,000 nodes made every reconcile build 20,000 pods; the chart's bound refuses it."""
    env = Env(resources={"nodes": 257})
    st = env.reconcile()
    assert st["phase"] == "Failed" and env.cond("Failed")["reason"] == S.R_INVALID_SPEC
    assert "spec.resources.nodes" in st["message"] and "operator.maxNodes" in st["message"]
    assert env.kube.created_pods == []


def test_a_reconcile_builds_only_the_pods_it_creates(monkeypatch: pytest.MonkeyPatch) -> None:
    from dreambooth_operator import plan as plan_module

    env = Env(resources={"nodes": 50})
    env.kube.fail_create_of["dog-a1-1"] = 503  # the first operator dies after creating one pod
    with pytest.raises(ApiError):
        env.reconcile()
    built: list[int] = []
    real = plan_module.build_pod
    monkeypatch.setattr(
        plan_module, "build_pod", lambda job, attempt, i, *a: built.append(i) or real(job, attempt, i, *a)
    )
    present = {int(p["metadata"]["name"].rsplit("-", 1)[1]) for p in env.kube.job_pods()}
    assert 1 not in present and len(present) < 50
    env.reconciler = env.new_reconciler()
    env.reconcile()
    assert sorted(built) == sorted(set(range(50)) - present) and len(env.kube.job_pods()) == 50


def test_metrics_say_since_when_a_job_waits_and_why_it_ended() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from dreambooth_operator.metrics import Metrics

    env = Env()
    metrics = Metrics()
    env.reconciler.metrics = metrics
    env.reconcile()
    for pod in env.kube.job_pods():
        env.kube.unschedulable(pod)
    env.reconcile()
    since = S.parse_time(env.cond("WaitingForResources")["lastTransitionTime"])
    assert since is not None
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }
    key = ("dreambooth_operator_job_waiting_since_timestamp_seconds", (("dreambooth_job", "dog"), ("namespace", "ns")))
    assert samples[key] == since.timestamp()
    env.clock.advance(301)
    env.reconcile()
    text = metrics.render().decode()
    assert 'dreambooth_operator_restarts_total{namespace="ns",reason="SchedulingTimeout"} 1.0' in text
    assert "dreambooth_operator_job_waiting_since_timestamp_seconds{" not in text
    metrics.job_gone("ns", "dog")
    assert 'dreambooth_job="dog"' not in metrics.render().decode()

    env = Env()
    env.reconciler.metrics = metrics
    env.reconcile()
    env.kube.run_all()
    env.kube.exit(env.kube.job_pods()[0], 64, {"reason": "bad-input", "message": "spec.training.instanceDataDir: none"})
    assert env.reconcile()["phase"] == "Failed"
    assert 'dreambooth_operator_jobs_ended_total{namespace="ns",phase="Failed",reason="BadInput"} 1.0' in (
        metrics.render().decode()
    )
