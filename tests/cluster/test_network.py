"""Pod network: own network namespace per pod, cluster DNS for hostname/subdomain + headless Services."""

from __future__ import annotations

import socket
import threading

import pytest
from k8s_harness import Cluster
from k8s_harness.testing import python_pod, terminated

pytestmark = pytest.mark.cluster

PORT = 29500  # the same port for every server: pods must not share a port space

SERVER = f"""
    import socket
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", {PORT}))
    s.listen(8)
    print("listening", flush=True)
    while True:
        c, _ = s.accept()
        data = c.recv(1024)
        c.sendall(socket.gethostname().encode() + b":" + data)
        c.close()
"""

CLIENT = f"""
    import socket, sys, time
    name = sys.argv[1] if len(sys.argv) > 1 else None
    target, msg = "{{target}}", "{{msg}}"
    deadline = time.time() + 60
    while True:
        try:
            ip = socket.gethostbyname(target)
            with socket.create_connection((target, {PORT}), timeout=5) as c:
                c.sendall(msg.encode())
                reply = c.recv(1024).decode()
            break
        except OSError as e:
            if time.time() > deadline:
                open("/dev/termination-log", "w").write(f"{{target}}: {{e}}")
                sys.exit(1)
            time.sleep(0.2)
    open("/dev/termination-log", "w").write(f"{{ip}} {{reply}}")
"""

RESOLVE_ONLY = """
    import socket, sys
    try:
        socket.gethostbyname("{target}")
    except OSError as e:
        open("/dev/termination-log", "w").write(f"unresolved: {{e}}")
        sys.exit(2)
    open("/dev/termination-log", "w").write("resolved")
"""


def _headless(name: str, app: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"app": app},
            "ports": [{"name": "rdzv", "port": PORT}],
        },
    }


def test_pairs_reach_each_other_by_dns_name_on_the_same_port(cluster: Cluster, namespace: str) -> None:
    # Two gangs at once, each server on the same port 29500, each client dialling its own server by name.
    for gang in ("a", "b"):
        cluster.apply(_headless(f"gang-{gang}", f"gang-{gang}"), namespace)
        cluster.apply(
            python_pod(
                f"{gang}-0",
                SERVER,
                labels={"app": f"gang-{gang}"},
                hostname=f"{gang}-0",
                subdomain=f"gang-{gang}",
                grace=1,
            ),
            namespace,
        )
    for gang in ("a", "b"):
        target = f"{gang}-0.gang-{gang}.{namespace}.svc.cluster.local"
        code = CLIENT.replace("{target}", target).replace("{msg}", f"hello-{gang}")
        cluster.apply(
            python_pod(
                f"{gang}-1", code, labels={"app": f"gang-{gang}"}, hostname=f"{gang}-1", subdomain=f"gang-{gang}"
            ),
            namespace,
        )
    for gang in ("a", "b"):
        p = cluster.wait_pod_phase(namespace, f"{gang}-1", "Succeeded", "Failed", timeout=90)
        t = terminated(p)
        server = cluster.pod(namespace, f"{gang}-0")
        assert p["status"]["phase"] == "Succeeded", t
        # Reached its own gang's server (its hostname answers), at that pod's IP.
        assert t["message"] == f"{server['status']['podIP']} {gang}-0:hello-{gang}"
    # Each pod had its own address.
    ips = {cluster.pod(namespace, n)["status"]["podIP"] for n in ("a-0", "a-1", "b-0", "b-1")}
    assert len(ips) == 4


def test_dns_name_needs_hostname_subdomain_and_the_service(cluster: Cluster, namespace: str) -> None:
    # A pod that forgot `subdomain`, and a pod whose Service does not exist: neither name resolves.
    cluster.apply(_headless("svc", "dns"), namespace)
    cluster.apply(python_pod("nosub", SERVER, labels={"app": "dns"}, hostname="nosub", grace=1), namespace)
    cluster.apply(
        python_pod("nosvc", SERVER, labels={"app": "other"}, hostname="nosvc", subdomain="missing", grace=1), namespace
    )
    cluster.apply(
        python_pod("good", SERVER, labels={"app": "dns"}, hostname="good", subdomain="svc", grace=1), namespace
    )
    for n in ("nosub", "nosvc", "good"):
        cluster.wait_pod_phase(namespace, n, "Running")
    checks = {
        "q-nosub": f"nosub.svc.{namespace}.svc.cluster.local",
        "q-nosvc": f"nosvc.missing.{namespace}.svc.cluster.local",
        "q-good": f"good.svc.{namespace}.svc.cluster.local",
        "q-short": "good.svc",  # via the search path, as in a real pod
    }
    for name, target in checks.items():
        cluster.apply(python_pod(name, RESOLVE_ONLY.format(target=target)), namespace)
    results = {}
    for name in checks:
        p = cluster.wait_pod_phase(namespace, name, "Succeeded", "Failed", timeout=60)
        results[name] = terminated(p)["message"]
    assert results["q-good"] == "resolved"
    assert results["q-short"] == "resolved"
    assert results["q-nosub"].startswith("unresolved")
    assert results["q-nosvc"].startswith("unresolved")


def test_pods_reach_a_loopback_server_through_an_exposed_host_port(cluster: Cluster, namespace: str) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]

    def serve() -> None:
        c, _ = srv.accept()
        c.sendall(b"from-host:" + c.recv(100))
        c.close()

    threading.Thread(target=serve, daemon=True).start()
    address = cluster.expose_host_port(port)
    host, _, p = address.partition(":")
    code = f"""
        import socket
        with socket.create_connection(("{host}", {p}), timeout=10) as c:
            c.sendall(b"ping")
            open("/dev/termination-log", "w").write(c.recv(100).decode())
    """
    cluster.apply(python_pod("dial-host", code), namespace)
    pod = cluster.wait_pod_phase(namespace, "dial-host", "Succeeded", "Failed", timeout=60)
    assert terminated(pod)["message"] == "from-host:ping"
    srv.close()
