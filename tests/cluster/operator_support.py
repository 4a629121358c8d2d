"""What the operator's cluster tests and benchmarks/operator_scale.py share: DreamBoothJob manifests, the operator
as a process, and reading/waiting on jobs, their pods and Events.

Import as ``operator_support`` with ``tests/cluster`` on ``sys.path`` (pytest puts it there for tests in
``tests/cluster``; the benchmark inserts it). ``tests/cluster/conftest.py`` re-exports the ``operator`` and
``jobs`` fixtures defined at the end.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from k8s_harness import ApiError, Cluster, tools, wait_until
from k8s_harness.util import WaitAbort, free_port

GROUP_PATH = "/apis/dreambooth.dev/v1alpha1"
REPO = Path(__file__).resolve().parents[2]
DOG = REPO / "examples" / "data" / "dog"
IMAGE = "host.invalid/python:local"
# Shortened clocks for tests: the operator retries after 1 s, 2 s ... and re-reads every job every 2 s.
TEST_TIMINGS = {"DREAMBOOTH_BACKOFF_BASE_SECONDS": "1", "DREAMBOOTH_OPERATOR_RESYNC_SECONDS": "2"}

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


def dreambooth_job(
    name: str,
    training: dict[str, Any],
    *,
    nodes: int = 1,
    requests_: dict[str, str] | None = None,
    resources: dict[str, Any] | None = None,
    pod_template: dict[str, Any] | None = None,
    run_policy: dict[str, Any] | None = None,
    storage: dict[str, Any] | None = None,
    method: str = "lora",
) -> dict[str, Any]:
    """A DreamBoothJob (LoRA unless ``method`` says) on CPU pods of the test image; every other section as given."""
    spec: dict[str, Any] = {
        "method": method,
        "training": training,
        "resources": {
            "nodes": nodes,
            "gpusPerNode": 0,
            "image": IMAGE,
            "requests": requests_ or {"cpu": "100m", "memory": "64Mi", "ephemeral-storage": "100Mi"},
            **(resources or {}),
        },
        "podTemplate": pod_template or {},
        "runPolicy": run_policy or {},
    }
    if storage is not None:
        spec["storage"] = storage
    return {"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamBoothJob", "metadata": {"name": name}, "spec": spec}


def tiny_training(name: str, bucket: str, steps: int, **extra: Any) -> dict[str, Any]:
    """spec.training of a real run on the tiny model, data and output in the ``storage`` fixture's bucket."""
    return {
        "pretrainedModelNameOrPath": f"s3://{bucket}/models/tiny/",
        "instanceDataDir": f"s3://{bucket}/data/dog/",
        "instancePrompt": "a photo of sks dog",
        "outputDir": f"s3://{bucket}/runs/{name}/",
        "resolution": 32,
        "trainBatchSize": 1,
        "maxTrainSteps": steps,
        "checkpointingSteps": 2,
        "seed": 7,
        **extra,
    }


def fake_training(name: str, bucket: str = "fake", **overrides: Any) -> dict[str, Any]:
    """spec.training that the schema and the operator accept; nothing reads the S3 paths (the pods never train)."""
    return {
        "pretrainedModelNameOrPath": f"s3://{bucket}/model/",
        "instanceDataDir": f"s3://{bucket}/dog/",
        "instancePrompt": "a photo of sks dog",
        "outputDir": f"s3://{bucket}/runs/{name}/",
        "maxTrainSteps": 100,
        "checkpointingSteps": 10,
        **overrides,
    }


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
    """A job whose pods run FAKE_TRAINER (or ``command``)."""
    fake_env = {"FAKE_SECONDS": str(seconds), **(env or {})}
    return dreambooth_job(
        name,
        fake_training(name, **(training or {})),
        nodes=nodes,
        resources=resources,
        pod_template={
            "command": command or ["python", "-u", "-c", FAKE_TRAINER],
            "env": [{"name": k, "value": v} for k, v in fake_env.items()],
        },
        run_policy={
            "terminationGracePeriodSeconds": 5,
            "backoffLimit": 1,
            "schedulingTimeoutSeconds": 300,
            "progressDeadlineSeconds": 300,
            **(run_policy or {}),
        },  # fmt: skip
    )


def sleep_job(name: str, seconds: int) -> dict[str, Any]:
    """One pod that only sleeps, with tiny requests: many fit on the test nodes (the scale benchmark)."""
    return dreambooth_job(
        name,
        fake_training(name, bucket="bench"),
        requests_={"cpu": "10m", "memory": "16Mi", "ephemeral-storage": "10Mi"},
        pod_template={"command": ["sleep", str(seconds)]},
        run_policy={"terminationGracePeriodSeconds": 1},
    )


class OperatorProcess:
    """`python -m dreambooth_operator` against the test cluster, watching one namespace.

    ``test_timings`` shortens the resync and backoff clocks (tests); without it the operator runs with its
    defaults (the benchmark). ``env`` overrides anything (another KUBECONFIG, LOG_LEVEL, ...).
    """

    def __init__(self, cluster: Cluster, namespace: str, log_dir: Path, *, test_timings: bool = True,
                 **env: str) -> None:  # fmt: skip
        self.cluster = cluster
        self.namespace = namespace
        self.log_path = log_dir / "operator.log"
        self.env = {**(TEST_TIMINGS if test_timings else {}), **env}
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
def storage(cluster: Cluster, namespace: str, s3: Any, bucket: str) -> dict[str, Any]:
    """The test's bucket, reachable from pods, with the dog images in it and a credentials Secret."""
    cluster.expose_host_port(s3.s3_port)
    from dreambooth_trainer.tiny import ensure_tiny_model

    client = s3.client()
    for image in sorted(DOG.iterdir()):
        client.upload_file(str(image), bucket, f"data/dog/{image.name}")
    # The model comes from S3 like a real one (each pod syncs it down). tiny:// would make it in each pod, and
    # on a non-zero global rank that currently writes no weights (transformers' save_pretrained skips them).
    model = ensure_tiny_model()
    for f in sorted(p for p in model.rglob("*") if p.is_file()):
        client.upload_file(str(f), bucket, f"models/tiny/{f.relative_to(model)}")
    cluster.kube_api.create(f"/api/v1/namespaces/{namespace}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
        "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(s3.access_key.encode()).decode(),
                 "AWS_SECRET_ACCESS_KEY": base64.b64encode(s3.secret_key.encode()).decode()},
    })  # fmt: skip
    return {
        "spec": {"endpoint": f"http://{cluster.host_ip}:{s3.s3_port}", "region": s3.region, "pathStyle": True,
                 "credentialsSecret": "s3-creds"},
        "bucket": bucket,
        "client": client,
    }  # fmt: skip


def tiny_family_model(storage: dict[str, Any], family: str) -> str:
    """The tiny model of another family (``dreambooth tiny-model --family``) in the storage bucket, as an s3:// URI
    a job's pretrainedModelNameOrPath names (uploaded once per bucket)."""
    from dreambooth_trainer.tiny import ensure_tiny_model

    client, bucket, prefix = storage["client"], storage["bucket"], f"models/tiny-{family}/"
    if not client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount"):
        model = ensure_tiny_model(family=family)
        for f in sorted(p for p in model.rglob("*") if p.is_file()):
            client.upload_file(str(f), bucket, f"{prefix}{f.relative_to(model)}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="session")
def released(registry: Any) -> Any:
    """What a team pulls: scripts/release.sh run once per session into the tests' registry — the operator image,
    the CPU trainer image and the chart (``images.Released``: name -> reference, digest). Built from the
    packaging tier's cached layers, so a warm machine only pushes."""
    import images  # tests/ is on sys.path (tests/conftest.py)

    rel = images.release(images.buildah_or_skip(), registry.host, tools.tool_path("helm"))
    assert {"operator", "trainer-cpu", "chart"} <= set(rel.refs), rel.output
    return rel


@pytest.fixture(scope="session")
def trainer_image(released: Any) -> str:
    """The released CPU trainer image, pinned by digest (what the operator's e2e jobs run)."""
    return released.pinned("trainer-cpu")


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
