"""The process kubelet runs pods as real processes and reports status like a kubelet."""

from __future__ import annotations

import base64
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from k8s_harness import Cluster, wait_until
from k8s_harness.testing import PodRecorder, condition, python_pod, terminated

pytestmark = pytest.mark.cluster


def _host_dir(tmp_path: Path) -> dict:
    tmp_path.chmod(0o777)
    return {"name": "out", "hostPath": {"path": str(tmp_path), "type": "Directory"}}


def test_scheduled_pod_runs_a_process_and_fails_with_exit_code_3(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    k = cluster.kube_api
    k.create(
        f"/api/v1/namespaces/{namespace}/configmaps",
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cfg"},
            "data": {"greeting": "hello", "settings.json": '{"a": 1}'},
        },
    )
    k.create(
        f"/api/v1/namespaces/{namespace}/secrets",
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds"},
            "data": {"key": base64.b64encode(b"s3cr3t").decode()},
        },
    )
    code = """
        import json, os, sys
        out = {
            "python": sys.executable, "pid": os.getpid(), "hostname": os.uname().nodename, "cwd": os.getcwd(),
            "env": {k: os.environ.get(k) for k in
                    ["POD_NAME", "POD_NS", "POD_IP", "GREETING", "SECRET", "COMBINED", "CPU_MILLIS", "MISSING_OPT"]},
            "cfg": open("/etc/cfg/settings.json").read(), "secret_file": open("/etc/creds/key").read(),
            "shm_writable": os.access("/dev/shm", os.W_OK), "scratch": os.listdir("/scratch"),
        }
        open("/scratch/x", "w").write("scratch works")
        open("/out/result.json", "w").write(json.dumps(out))
        open("/dev/termination-log", "w").write("bad input: no instance images")
        sys.exit(3)
    """
    pod = python_pod(
        "exit3",
        code,
        env=[
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
            {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "key"}}},
            {"name": "MISSING_OPT", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}}},
            {"name": "COMBINED", "value": "$(GREETING)-$(POD_NAME)"},
            {"name": "CPU_MILLIS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1m"}}},
        ],
        volumes=[
            _host_dir(tmp_path),
            {"name": "cfg", "configMap": {"name": "cfg"}},
            {"name": "creds", "secret": {"secretName": "creds"}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
            {"name": "scratch", "emptyDir": {}},
        ],
        mounts=[
            {"name": "out", "mountPath": "/out"},
            {"name": "cfg", "mountPath": "/etc/cfg", "readOnly": True},
            {"name": "creds", "mountPath": "/etc/creds", "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "scratch", "mountPath": "/scratch"},
        ],
        resources={"limits": {"nvidia.com/gpu": "2", "cpu": "1"}, "requests": {"cpu": "100m", "memory": "64Mi"}},
    )
    cluster.apply(pod, namespace)
    p = cluster.wait_pod_phase(namespace, "exit3", "Failed", "Succeeded", timeout=60)
    assert p["status"]["phase"] == "Failed"
    assert p["spec"]["nodeName"] in ("node-0", "node-1")  # bound by kube-scheduler
    assert condition(p, "PodScheduled")["status"] == "True"
    t = terminated(p)
    assert t is not None
    assert t["exitCode"] == 3 and t["reason"] == "Error"
    assert t["message"] == "bad input: no instance images"
    assert p["status"]["containerStatuses"][0]["restartCount"] == 0
    import json

    out = json.loads((tmp_path / "result.json").read_text())
    assert Path(out["python"]).resolve() == Path(sys.executable).resolve()  # the venv's python, by PATH
    assert out["pid"] == 1  # PID 1 of its own PID namespace, as in a container
    assert out["hostname"] == "exit3"
    assert out["env"] == {
        "POD_NAME": "exit3",
        "POD_NS": namespace,
        "POD_IP": p["status"]["podIP"],
        "GREETING": "hello",
        "SECRET": "s3cr3t",
        "COMBINED": "hello-exit3",
        "CPU_MILLIS": "1000",
        "MISSING_OPT": None,
    }
    assert out["cfg"] == '{"a": 1}' and out["secret_file"] == "s3cr3t"
    assert out["shm_writable"] and out["scratch"] == []
    # The finished pod never goes back to Running.
    time.sleep(1.5)
    assert cluster.pod(namespace, "exit3")["status"]["phase"] == "Failed"
    # The scratch file landed in the pod's own volume folder, not at /scratch on the host.
    assert not Path("/scratch/x").exists()


def test_deleted_pod_main_process_gets_sigterm_others_sigkill_after_grace(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    code = """
        import os, signal, subprocess, sys, time
        # Like torchrun's workers: children in their own sessions, which ignore SIGTERM.
        kids = [subprocess.Popen([sys.executable, "-c",
                 "import signal, time; signal.signal(signal.SIGTERM, lambda *a: open('/out/child-term', 'a').write('x'));"
                 " time.sleep(1000)"], start_new_session=True) for _ in range(2)]
        def on_term(*_):
            open("/out/main-term", "w").write(str(time.time()))  # and keep running: SIGKILL must come
        signal.signal(signal.SIGTERM, on_term)
        open("/out/ready", "w").write("1")
        while True:
            time.sleep(0.1)
    """
    cluster.apply(
        python_pod(
            "victim", code, grace=3, volumes=[_host_dir(tmp_path)], mounts=[{"name": "out", "mountPath": "/out"}]
        ),
        namespace,
    )
    cluster.wait_pod_phase(namespace, "victim", "Running")
    wait_until(lambda: (tmp_path / "ready").exists(), 30, 0.1, "pod ready file")
    info = wait_until(
        lambda: (i := cluster.pod_info(namespace, "victim")) and len(i["containers"]["main"]["processes"]) >= 4 and i,
        10,
        0.1,
        "pod processes",
    )
    host_pids = info["containers"]["main"]["processes"]  # shim, PID 1, two children
    rec = PodRecorder(cluster.kube_api, namespace, "victim")
    t0 = time.time()
    cluster.kube_api.delete(f"/api/v1/namespaces/{namespace}/pods/victim")
    assert rec.wait_deleted(30), "pod was not removed"
    elapsed = time.time() - t0
    assert (tmp_path / "main-term").exists(), "main process got no SIGTERM"
    assert float((tmp_path / "main-term").read_text()) - t0 < 2
    assert not (tmp_path / "child-term").exists(), "SIGTERM went to more than the main process"
    assert 3 <= elapsed < 10, elapsed
    for pid in host_pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    # Before the deletion watchers saw the final status: terminated by SIGKILL (137), phase Failed.
    last = [o for t, o in rec.events if t == "MODIFIED"][-1]
    assert last["status"]["phase"] == "Failed"
    assert terminated(last)["exitCode"] == 137


def test_pod_asking_for_more_gpus_than_any_node_stays_unschedulable(cluster: Cluster, namespace: str) -> None:
    cluster.apply(python_pod("greedy", "pass", resources={"limits": {"nvidia.com/gpu": "9"}}), namespace)

    def unschedulable() -> dict | None:
        p = cluster.pod(namespace, "greedy")
        c = condition(p, "PodScheduled") if p else None
        return p if c and c["status"] == "False" and c["reason"] == "Unschedulable" else None

    p = wait_until(unschedulable, 30, 0.2, "PodScheduled=False/Unschedulable")
    assert p["status"]["phase"] == "Pending"
    assert "Insufficient nvidia.com/gpu" in condition(p, "PodScheduled")["message"]
    assert not p["spec"].get("nodeName")


def test_no_capacity_keeps_pods_unschedulable_until_capacity_returns(cluster: Cluster, namespace: str) -> None:
    for n in cluster.nodes:
        cluster.set_node_capacity(n.name, **{"nvidia.com/gpu": 0})
    try:
        wait_until(
            lambda: all(
                cluster.kube_api.get(f"/api/v1/nodes/{n.name}")["status"]["allocatable"].get("nvidia.com/gpu") == "0"
                for n in cluster.nodes
            ),
            10,
        )
        cluster.apply(
            python_pod("waits", "print('got a gpu')", resources={"limits": {"nvidia.com/gpu": "1"}}), namespace
        )
        wait_until(
            lambda: (
                (c := condition(cluster.pod(namespace, "waits"), "PodScheduled")) and c["reason"] == "Unschedulable"
            ),
            30,
            0.2,
            "Unschedulable",
        )
    finally:
        for n in cluster.nodes:
            cluster.set_node_capacity(n.name, **{"nvidia.com/gpu": n.gpus})
    # With capacity back, the scheduler binds it (it retries unschedulable pods) and it runs to completion.
    cluster.wait_pod_phase(namespace, "waits", "Succeeded", timeout=90)


def test_restart_policy_on_failure_counts_restarts(cluster: Cluster, namespace: str) -> None:
    code = """
        import os, sys
        marker = "/state/attempt"
        n = int(open(marker).read()) if os.path.exists(marker) else 0
        open(marker, "w").write(str(n + 1))
        print("attempt", n)
        sys.exit(0 if n >= 1 else 7)
    """
    cluster.apply(
        python_pod(
            "flaky",
            code,
            restart_policy="OnFailure",
            volumes=[{"name": "w", "emptyDir": {}}],
            mounts=[{"name": "w", "mountPath": "/state"}],
        ),
        namespace,
    )
    p = cluster.wait_pod_phase(namespace, "flaky", "Succeeded", "Failed", timeout=60)
    assert p["status"]["phase"] == "Succeeded"
    cs = p["status"]["containerStatuses"][0]
    assert cs["restartCount"] == 1
    assert cs["lastState"]["terminated"]["exitCode"] == 7
    assert "attempt 1" in cluster.pod_log(namespace, "flaky")


def test_eviction_and_preemption_mark_disruption_and_delete(cluster: Cluster, namespace: str) -> None:
    loop = "import time\nwhile True: time.sleep(0.2)"
    for name in ("evictee", "preemptee"):
        cluster.apply(python_pod(name, loop, grace=1), namespace)
    for name in ("evictee", "preemptee"):
        cluster.wait_pod_phase(namespace, name, "Running")
    recs = {name: PodRecorder(cluster.kube_api, namespace, name) for name in ("evictee", "preemptee")}
    cluster.evict(namespace, "evictee")
    cluster.preempt(namespace, "preemptee")
    for name, reason in (("evictee", "EvictionByEvictionAPI"), ("preemptee", "PreemptionByScheduler")):
        assert recs[name].wait_deleted(30), name
        seen = [condition(o, "DisruptionTarget") for t, o in recs[name].events if t == "MODIFIED"]
        assert any(c and c["reason"] == reason for c in seen), (name, seen)


def test_graceful_node_shutdown_fails_pods_with_reason_terminated(cluster: Cluster, namespace: str) -> None:
    node = cluster.nodes[-1].name
    code = """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: (open("/dev/termination-log", "w").write("emergency ckpt"),
                                                  sys.exit(75)))
        print("handler installed", flush=True)
        while True:
            time.sleep(0.1)
    """
    cluster.apply(python_pod("on-doomed-node", code, grace=5, node=node), namespace)
    cluster.wait_pod_phase(namespace, "on-doomed-node", "Running")
    wait_until(lambda: "handler installed" in cluster.pod_log(namespace, "on-doomed-node"), 30, 0.1, "handler")
    cluster.node_shutdown(node, grace_seconds=5)
    try:
        p = cluster.wait_pod_phase(namespace, "on-doomed-node", "Failed", timeout=30)
        assert p["status"]["reason"] == "Terminated"
        assert condition(p, "DisruptionTarget")["reason"] == "TerminationByKubelet"
        t = terminated(p)
        assert t["exitCode"] == 75 and t["message"] == "emergency ckpt"
        n = cluster.kube_api.get(f"/api/v1/nodes/{node}")
        assert condition(n, "Ready")["status"] == "False"
    finally:
        cluster.node_recover(node)
        wait_until(lambda: cluster._node_ready(node), 30)


def test_node_lost_kills_processes_silently_and_stops_reporting(cluster: Cluster, namespace: str) -> None:
    node, other = cluster.nodes[0].name, cluster.nodes[1].name
    server = """
        import socket, time
        s = socket.socket()
        s.bind(("0.0.0.0", 7070))
        s.listen(1)
        c, _ = s.accept()
        c.sendall(b"hello")
        time.sleep(1000)
    """
    cluster.apply(python_pod("on-lost-node", server, node=node), namespace)
    ip = cluster.wait_pod_phase(namespace, "on-lost-node", "Running")["status"]["podIP"]
    peer = f"""
        import socket, sys, time
        for _ in range(100):
            try:
                s = socket.create_connection(("{ip}", 7070), timeout=5)
                break
            except OSError:
                time.sleep(0.1)
        assert s.recv(5) == b"hello"
        print("connected", flush=True)
        s.settimeout(8)
        try:
            data = s.recv(100)
            verdict = "closed" if not data else "data"
        except TimeoutError:
            verdict = "silence"
        except OSError as e:
            verdict = f"error {{e}}"
        open("/dev/termination-log", "w").write(verdict)
    """
    cluster.apply(python_pod("peer", peer, node=other), namespace)
    cluster.wait_pod(namespace, "peer", lambda p: "connected" in cluster.pod_log(namespace, "peer"), 60)
    pids = cluster.pod_info(namespace, "on-lost-node")["containers"]["main"]["processes"]
    cluster.node_lost(node)
    try:
        n = cluster.kube_api.get(f"/api/v1/nodes/{node}")
        assert condition(n, "Ready")["status"] == "Unknown"
        wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), 10, 0.1, "processes gone")
        # A dead machine sends no FIN/RST: its peer hears nothing (and would hit its own timeout).
        assert terminated(cluster.wait_pod_phase(namespace, "peer", "Succeeded", timeout=30))["message"] == "silence"
        # Nobody reports for a dead node: the API still says Running.
        assert cluster.pod(namespace, "on-lost-node")["status"]["phase"] == "Running"
        # Deleting the pod leaves it Terminating: no kubelet completes the deletion.
        cluster.kube_api.delete(f"/api/v1/namespaces/{namespace}/pods/on-lost-node", grace_period_seconds=1)
        time.sleep(2)
        assert cluster.pod(namespace, "on-lost-node")["metadata"].get("deletionTimestamp")
    finally:
        cluster.node_recover(node)
    # Back online, the kubelet finishes the deletion.
    cluster.wait_pod_gone(namespace, "on-lost-node", timeout=30)
    wait_until(lambda: cluster._node_ready(node), 30)


def test_run_as_user_is_ignored_only_when_other_uids_cannot_start_python() -> None:
    from k8s_harness.kubelet import ignore_run_as_user

    # Not pytest's tmp_path: it lies below a root-only folder.
    with tempfile.TemporaryDirectory() as tmp:
        _check_run_as_user_decision(Path(tmp), ignore_run_as_user)


def _check_run_as_user_decision(tmp_path: Path, ignore_run_as_user: Callable[[str | None, list[str]], bool]) -> None:
    open_dir = tmp_path / "open" / "bin"
    open_dir.mkdir(parents=True)
    closed = tmp_path / "closed"
    (closed / "bin").mkdir(parents=True)
    tmp_path.chmod(0o755)
    (tmp_path / "open").chmod(0o755)
    closed.chmod(0o700)
    assert ignore_run_as_user(None, [str(open_dir / "python")]) is False
    assert ignore_run_as_user("auto", [str(open_dir), str(closed / "bin" / "python")]) is True
    # The environment decides when it says so either way.
    assert ignore_run_as_user("0", [str(closed / "bin" / "python")]) is False
    assert ignore_run_as_user("1", [str(open_dir)]) is True
