"""The operator on a real v1.20 control plane with the process kubelet: failure policy, recovery, cleanup.

These tests replace the trainer with a small fake (podTemplate.command) that follows the launcher contract —
termination message, exit codes, SIGTERM -> exit 75, rank 0 serving /progress — so each policy row can be
provoked on demand. The real trainer end to end is in test_operator_e2e.py.

Helpers here (OperatorProcess, fake_job, JobWatcher) are imported by the other test_operator_* files.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from k8s_harness import ApiError, Cluster, wait_until
from k8s_harness.util import WaitAbort, free_port

pytestmark = pytest.mark.cluster


def _interpreter_readable_by_others() -> bool:
    """Can a non-root uid run this venv's Python (its stdlib may live under a private /root/.pyenv)?"""
    real = Path(os.path.realpath(sys.executable))
    return all(os.stat(p).st_mode & 0o005 == 0o005 for p in [*real.parents][:-1] if p.exists())


# Trainer pods run as uid 1000 (restricted security context). On this machine the interpreter may sit in a
# root-only folder; then the process kubelet (started by the session fixture, after collection) must ignore
# runAsUser, or no pod of ours can even start Python.
if not _interpreter_readable_by_others():
    os.environ.setdefault("DREAMBOOTH_KUBELET_IGNORE_RUN_AS_USER", "1")
REPO = Path(__file__).resolve().parents[2]
GROUP_PATH = "/apis/dreambooth.dev/v1alpha1"
IMAGE = "dreambooth-test/python:local"

# A stand-in trainer that keeps the launcher contract. FAKE_SECONDS: run time; FAKE_CODE (or FAKE_CODE_A<n> for
# attempt n): exit code at the end; FAKE_RANK: only that rank exits, the others wait for the teardown.
FAKE_TRAINER = textwrap.dedent(
    """
    import json, os, signal, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    attempt = int(os.environ["DREAMBOOTH_ATTEMPT"])
    rank = int(os.environ["PET_NODE_RANK"])
    seconds = float(os.environ.get("FAKE_SECONDS", "3"))
    code = int(os.environ.get(f"FAKE_CODE_A{attempt}", os.environ.get("FAKE_CODE", "0")))
    start = time.time()
    def step():
        return int((time.time() - start) * 2)
    def message(reason, text, step):
        with open(os.environ["TERMINATION_MESSAGE_PATH"], "w") as f:
            json.dump({"reason": reason, "step": step, "checkpointUri": None, "message": text}, f)
    def on_term(*_):
        message("preempted", "SIGTERM: stopped at step %d" % step(), step())
        os._exit(75)
    signal.signal(signal.SIGTERM, on_term)
    class Progress(BaseHTTPRequestHandler):
        def do_GET(self):
            doc = {"phase": "training", "step": step(), "maxSteps": 1000, "loss": 0.25, "stepsPerSecond": 2.0,
                   "etaSeconds": 42, "lastCheckpoint": {"step": 2, "uri": "s3://fake/checkpoint-2",
                   "time": "2026-01-01T00:00:00Z"}, "validationImages": ["s3://fake/validation/0.png"]}
            body = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    if rank == 0:
        server = ThreadingHTTPServer((os.environ.get("POD_IP") or "0.0.0.0", int(os.environ["PROGRESS_PORT"])), Progress)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("fake trainer: attempt", attempt, "rank", rank, "exit", code, "after", seconds, "s", flush=True)
    while time.time() - start < seconds:
        time.sleep(0.1)
    if os.environ.get("FAKE_RANK") not in (None, str(rank)):
        while True:
            time.sleep(1)
    if code == 64:
        message("bad-input", "--instance_data_dir (spec.training.instanceDataDir): no images in s3://fake/dog/", step())
    else:
        message("completed" if code == 0 else "crash", "exit %d" % code, step())
    sys.exit(code)
    """
)


def fake_job(
    name: str,
    *,
    nodes: int = 2,
    seconds: float = 3,
    env: dict[str, str] | None = None,
    run_policy: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    command: list[str] | None = None,
) -> dict[str, Any]:
    fake_env = {"FAKE_SECONDS": str(seconds), **(env or {})}
    return {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": name},
        "spec": {
            "method": "lora",
            "training": {
                "pretrainedModelNameOrPath": "s3://fake/model/",
                "instanceDataDir": "s3://fake/dog/",
                "instancePrompt": "a photo of sks dog",
                "outputDir": f"s3://fake/runs/{name}/",
                "maxTrainSteps": 100,
                "checkpointingSteps": 10,
                **(training or {}),
            },
            "resources": {
                "nodes": nodes,
                "gpusPerNode": 0,
                "image": IMAGE,
                "requests": {"cpu": "100m", "memory": "64Mi", "ephemeral-storage": "100Mi"},
                **(resources or {}),
            },
            "podTemplate": {
                "command": command or ["python", "-u", "-c", FAKE_TRAINER],
                "env": [{"name": k, "value": v} for k, v in fake_env.items()],
            },
            "runPolicy": {
                "terminationGracePeriodSeconds": 5,
                "backoffLimit": 1,
                "schedulingTimeoutSeconds": 300,
                "progressDeadlineSeconds": 300,
                **(run_policy or {}),
            },
        },
    }


class OperatorProcess:
    """`python -m dreambooth_operator` against the test cluster, watching one namespace."""

    def __init__(self, cluster: Cluster, namespace: str, log_dir: Path, **env: str) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.log_path = log_dir / "operator.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> OperatorProcess:
        self.port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.cluster.kubeconfig),
            "DREAMBOOTH_OPERATOR_NAMESPACES": self.namespace,
            "METRICS_PORT": str(self.port),
            "LOG_LEVEL": "INFO",
            "DREAMBOOTH_BACKOFF_BASE_SECONDS": "1",
            "DREAMBOOTH_OPERATOR_RESYNC_SECONDS": "2",
            **self.env,
        }
        for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.pop(proxy, None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dreambooth_operator"], env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        wait_until(self._healthy, 60, 0.2, "operator /healthz")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.log()}")
        try:
            s = requests.Session()
            s.trust_env = False
            return s.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def metrics(self) -> str:
        s = requests.Session()
        s.trust_env = False
        return s.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text

    def kill(self) -> None:
        """SIGKILL: an operator crash (nothing flushed, nothing cleaned up)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Jobs:
    """Reading DreamBoothJobs, their pods and Events in one namespace; waits that show the operator log."""

    def __init__(self, cluster: Cluster, namespace: str, operator: OperatorProcess | None = None) -> None:
        self.cluster = cluster
        self.ns = namespace
        self.operator = operator
        self.api = cluster.kube_api

    @property
    def base(self) -> str:
        return f"{GROUP_PATH}/namespaces/{self.ns}/dreamboothjobs"

    def create(self, job: dict[str, Any]) -> dict[str, Any]:
        return self.api.create(self.base, job)

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.api.get(f"{self.base}/{name}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def status(self, name: str) -> dict[str, Any]:
        return (self.get(name) or {}).get("status") or {}

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.api.patch(f"{self.base}/{name}", {"spec": spec}, patch_type="merge")

    def pods(self, name: str, attempt: int | None = None) -> list[dict[str, Any]]:
        sel = f"dreambooth.dev/job-name={name}"
        if attempt is not None:
            sel += f",dreambooth.dev/attempt={attempt}"
        items = self.api.get(f"/api/v1/namespaces/{self.ns}/pods", labelSelector=sel)["items"]
        return sorted(items, key=lambda p: p["metadata"]["name"])

    def events(self, name: str) -> list[dict[str, Any]]:
        items = self.api.get(f"/api/v1/namespaces/{self.ns}/events",
                             fieldSelector=f"involvedObject.name={name},involvedObject.kind=DreamBoothJob")["items"]  # fmt: skip
        return sorted(items, key=lambda e: e.get("lastTimestamp") or "")

    def condition(self, name: str, ctype: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == ctype), {})

    def wait(self, name: str, predicate: Callable[[dict[str, Any]], Any], timeout: float, what: str) -> dict[str, Any]:
        def check() -> Any:
            st = self.status(name)
            if predicate(st):
                return True
            if st.get("phase") in ("Failed", "Succeeded"):
                raise WaitAbort(f"{name} ended {st.get('phase')} while waiting for {what}")
            return False

        try:
            wait_until(check, timeout, 0.25, what)
        except (TimeoutError, WaitAbort) as e:
            raise AssertionError(self.explain(name, f"{e}")) from None
        return self.status(name)

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        return self.wait(name, lambda s: s.get("phase") == phase, timeout, f"{name} phase {phase}")

    def explain(self, name: str, headline: str) -> str:
        pods = [(p["metadata"]["name"], p.get("status", {}).get("phase"), p["metadata"].get("deletionTimestamp"))
                for p in self.pods(name)]  # fmt: skip
        events = [f"{e['type']} {e['reason']}: {e['message']}" for e in self.events(name)]
        op = self.operator.log() if self.operator else ""
        logs = ""
        for pod in self.pods(name):
            with contextlib.suppress(Exception):
                full = self.cluster.pod_log(self.ns, pod["metadata"]["name"])
                if os.environ.get("DREAMBOOTH_TEST_LOG_DIR"):
                    Path(os.environ["DREAMBOOTH_TEST_LOG_DIR"], f"{pod['metadata']['name']}.log").write_text(full)
                tail = full[-3000:]
                logs += f"\n----- {pod['metadata']['name']} log (tail) -----\n{tail}"
        return (f"{headline}\nstatus: {json.dumps(self.status(name), indent=1)}\npods: {pods}\nevents:\n  "
                + "\n  ".join(events) + f"\noperator log:\n{op}{logs}")  # fmt: skip


@pytest.fixture
def operator(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(cluster, namespace, tmp_path).start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture
def jobs(cluster: Cluster, namespace: str, operator: OperatorProcess) -> Jobs:
    return Jobs(cluster, namespace, operator)


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
    # Valid manifests get the schema's defaults.
    stored = j.create({"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamBoothJob", "metadata": {"name": "ok"},
                       "spec": {"training": {"pretrainedModelNameOrPath": "m", "instanceDataDir": "s3://d/",
                                             "instancePrompt": "p"}}})  # fmt: skip
    spec = stored["spec"]
    assert spec["method"] == "full" and spec["resources"]["nodes"] == 1 and spec["runPolicy"]["backoffLimit"] == 3
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
