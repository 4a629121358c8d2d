"""Pods run from images: pulled from a real registry, run by runc in the image's filesystem, user and entrypoint.

The images: a small probe image built here with buildah on the debootstrapped bookworm base of
tests/packaging/test_image_build.py (USER app 1000, WORKDIR, ENV, ENTRYPOINT ["/bin/echo", "EP"], CMD ["CMD"]),
and the operator image of that same module, pushed to the `registry` fixture (docker-registry on 127.0.0.1).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from k8s_harness import Cluster, wait_until
from k8s_harness.fixtures import TIMINGS

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "packaging"))
from test_image_build import BASE_IMAGE, IMAGE, Buildah, cache_dir, locked, make_base_image  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

PROBE = "localhost/dreambooth-test/kubelet-probe:2"
# What the probe pods print into their termination message: what the container saw, from inside.
SEEN = r"""
import json, os, sys
osr = dict(l.split("=", 1) for l in open("/etc/os-release").read().split("\n") if "=" in l)
seen = {
    "os": osr["PRETTY_NAME"].strip('"'), "prefix": sys.prefix, "uid": os.getuid(), "gid": os.getgid(),
    "groups": sorted(os.getgroups()), "cwd": os.getcwd(), "home": os.environ.get("HOME"),
    "greeting": os.environ.get("GREETING"), "path": os.environ.get("PATH"), "repo": os.path.exists(REPO),
    "pid": os.getpid(), "hostname": open("/etc/hostname").read().strip(),
}
try:
    open("/root-write-test", "w").write("x")
    seen["rootfs"] = "writable"
except OSError as e:
    seen["rootfs"] = e.strerror
open("/dev/termination-log", "w").write(json.dumps(seen))
"""


@dataclass
class Images:
    probe: str  # <registry>/dreambooth-test/probe:2
    probe_digest: str
    base: str
    operator: str
    host: str


def _build_probe(b: Buildah) -> None:
    ctr = b("from", "--pull=never", BASE_IMAGE).stdout.strip()
    try:
        b("run", "--isolation", "chroot", ctr, "--", "sh", "-c",
          "echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1000:' >> /etc/group "
          "&& mkdir -p /home/app /srv/app && chown 1000:1000 /home/app /srv/app")  # fmt: skip
        b("config", "--user", "app", "--workingdir", "/srv/app", "--env", "GREETING=from-image",
          "--entrypoint", '["/bin/echo", "EP"]', "--cmd", '["CMD"]', ctr)  # fmt: skip
        b("commit", "--quiet", ctr, PROBE)
    finally:
        b("rm", ctr, check=False)


@pytest.fixture(scope="module")
def images(registry: Any) -> Iterator[Images]:
    b = Buildah(cache_dir())
    cache_dir().mkdir(parents=True, exist_ok=True)
    with locked(b.root / ".lock"):
        if not b.has_image(BASE_IMAGE):
            make_base_image(b)
        if not b.has_image(PROBE):
            _build_probe(b)
        b("bud", "--pull=never", "--isolation", "chroot", "--network", "host", "--layers",
          "--target", "operator", "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}",
          "-t", IMAGE, "-f", "Dockerfile", ".", timeout=900)  # fmt: skip
        refs = {}
        for name, src in (("probe", PROBE), ("base", BASE_IMAGE), ("operator", IMAGE)):
            ref = f"{registry.host}/dreambooth-test/{name}:1"
            b("push", "--tls-verify=false", src, f"docker://{ref}")
            refs[name] = ref
    digest = registry.manifest_digest("dreambooth-test/probe", "1")
    yield Images(refs["probe"], digest, refs["base"], refs["operator"], registry.host)


def _pod(name: str, image: str, **container: Any) -> dict[str, Any]:
    spec = {"restartPolicy": "Never", "terminationGracePeriodSeconds": 2}
    spec.update(container.pop("pod_spec", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {**spec, "containers": [{"name": "main", "image": image, **container}]},
    }


def _terminated(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["status"]["containerStatuses"][0]["state"]["terminated"]


def _waiting(cluster: Cluster, ns: str, name: str, *reasons: str, timeout: float = 60) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        pod = cluster.pod(ns, name) or {}
        for st in (pod.get("status") or {}).get("containerStatuses") or []:
            w = st.get("state", {}).get("waiting")
            if w and w.get("reason") in reasons:
                return w
        return None

    return wait_until(check, timeout, 0.2, f"{name} waiting with {reasons}")


def test_the_container_sees_the_image_not_the_host(cluster: Cluster, namespace: str, images: Images) -> None:
    seen_code = SEEN.replace("REPO", repr(str(REPO)))
    cluster.apply(
        _pod("seen", images.probe, command=["python3", "-c", seen_code],
             env=[{"name": "PATH", "value": "/usr/bin:/bin"}],
             pod_spec={"securityContext": {"supplementalGroups": [4242]}}),
        namespace,
    )  # fmt: skip
    pod = cluster.wait_pod_phase(namespace, "seen", "Succeeded", "Failed", timeout=120)
    term = _terminated(pod)
    assert pod["status"]["phase"] == "Succeeded", (term, cluster.pod_log(namespace, "seen"))
    seen = json.loads(term["message"])
    assert seen["os"] == "Debian GNU/Linux 12 (bookworm)"
    assert seen["prefix"] == "/usr" and not seen["repo"], seen  # Debian's python3, no trace of this repo
    assert (seen["uid"], seen["gid"], seen["home"], seen["cwd"]) == (1000, 1000, "/home/app", "/srv/app")
    assert 4242 in seen["groups"]
    assert seen["greeting"] == "from-image" and seen["path"] == "/usr/bin:/bin"  # image ENV, pod env wins
    assert seen["pid"] == 1 and seen["hostname"] == "seen"
    assert seen["rootfs"] == "Permission denied"  # uid 1000 on the image's root-owned /
    st = pod["status"]["containerStatuses"][0]
    assert st["imageID"] == f"{images.host}/dreambooth-test/probe@{images.probe_digest}"
    assert st["containerID"].startswith("runc://")


@pytest.mark.parametrize(
    ("command", "args", "printed"),
    [
        (None, None, "EP CMD"),  # ENTRYPOINT + CMD
        (None, ["A1"], "EP A1"),  # args replace CMD
        (["/bin/echo", "C1"], None, "C1"),  # command replaces ENTRYPOINT and drops CMD
        (["/bin/echo", "C1"], ["A1"], "C1 A1"),
    ],
    ids=["image-only", "args", "command", "command+args"],
)
def test_entrypoint_and_cmd_against_command_and_args(
    cluster: Cluster, namespace: str, images: Images, command: list[str] | None, args: list[str] | None, printed: str
) -> None:
    container: dict[str, Any] = {}
    if command:
        container["command"] = command
    if args:
        container["args"] = args
    cluster.apply(_pod("ep", images.probe, **container), namespace)
    pod = cluster.wait_pod_phase(namespace, "ep", "Succeeded", "Failed", timeout=120)
    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    assert cluster.pod_log(namespace, "ep").strip() == printed


def test_operator_image_runs_as_its_user_from_its_venv(cluster: Cluster, namespace: str, images: Images) -> None:
    """The real operator image: its ENTRYPOINT with the pod's args, its /opt/venv, UID 10001, read-only root."""
    cluster.apply(
        _pod("op-help", images.operator, args=["--help"],
             securityContext={"readOnlyRootFilesystem": True, "runAsNonRoot": True}),
        namespace,
    )  # fmt: skip
    code = f"import sys, os; print(sys.prefix, os.getuid(), os.path.exists({str(REPO)!r}))"
    cluster.apply(_pod("op-prefix", images.operator, command=["python", "-c", code]), namespace)
    for name in ("op-help", "op-prefix"):
        pod = cluster.wait_pod_phase(namespace, name, "Succeeded", "Failed", timeout=120)
        assert pod["status"]["phase"] == "Succeeded", (pod["status"], cluster.pod_log(namespace, name))
    assert "usage: dreambooth operator" in cluster.pod_log(namespace, "op-help")
    assert cluster.pod_log(namespace, "op-prefix").split() == ["/opt/venv", "10001", "False"]


def test_volumes_inside_a_read_only_root_and_run_as_user(cluster: Cluster, namespace: str, images: Images) -> None:
    code = (
        "import os\n"
        "open('/scratch/out', 'w').write(str(os.getuid()))\n"
        "try:\n    open('/srv/app/x', 'w')\nexcept OSError as e:\n    print(e.strerror)\n"
        "print(open('/cfg/key').read(), os.stat('/scratch').st_dev != os.stat('/').st_dev)\n"
    )
    cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"key": "v"}},
                  namespace)  # fmt: skip
    cluster.apply(
        _pod("ro", images.probe, command=["python3", "-c", code],
             securityContext={"readOnlyRootFilesystem": True, "runAsUser": 2000, "runAsGroup": 2000},
             volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}, {"name": "cfg", "mountPath": "/cfg"}],
             pod_spec={"volumes": [{"name": "scratch", "emptyDir": {}},
                                   {"name": "cfg", "configMap": {"name": "cfg"}}]}),
        namespace,
    )  # fmt: skip
    pod = cluster.wait_pod_phase(namespace, "ro", "Succeeded", "Failed", timeout=120)
    assert pod["status"]["phase"] == "Succeeded", cluster.pod_log(namespace, "ro")
    assert cluster.pod_log(namespace, "ro").split("\n")[:2] == ["Read-only file system", "v True"]


def test_run_as_non_root_is_checked_against_the_image_user(cluster: Cluster, namespace: str, images: Images) -> None:
    nonroot = {"runAsNonRoot": True}
    cluster.apply(_pod("root-image", images.base, command=["true"], securityContext=nonroot), namespace)
    w = _waiting(cluster, namespace, "root-image", "CreateContainerConfigError")
    assert "runAsNonRoot and image will run as root" in w["message"]
    # The probe's USER is a name: without runAsUser the kubelet cannot prove it is not root.
    cluster.apply(_pod("named-user", images.probe, securityContext=nonroot), namespace)
    w = _waiting(cluster, namespace, "named-user", "CreateContainerConfigError")
    assert "non-numeric user (app)" in w["message"]
    cluster.apply(_pod("uid-given", images.probe, securityContext={**nonroot, "runAsUser": 1000}), namespace)
    assert cluster.wait_pod_phase(namespace, "uid-given", "Succeeded", "Failed", timeout=120)["status"]["phase"] == (
        "Succeeded"
    )


def test_missing_image_is_err_image_pull_then_back_off(cluster: Cluster, namespace: str, images: Images) -> None:
    missing = f"{images.host}/dreambooth-test/no-such-image:0.0.1"
    cluster.apply(_pod("missing", missing), namespace)
    w = _waiting(cluster, namespace, "missing", "ErrImagePull")
    assert missing in w["message"] and "not found" in w["message"]
    w = _waiting(cluster, namespace, "missing", "ImagePullBackOff")
    assert f'Back-off pulling image "{missing}"' in w["message"]
    cluster.apply(_pod("never", f"{images.host}/dreambooth-test/probe:never-pulled", imagePullPolicy="Never"),
                  namespace)  # fmt: skip
    w = _waiting(cluster, namespace, "never", "ErrImageNeverPull", "ImagePullBackOff")
    assert "is not present with pull policy of Never" in w["message"]
    # No silent fallback to the host: an image without the host.invalid/ marker is pulled or fails.
    cluster.apply(_pod("unmarked", "dreambooth-test/python:local", command=["python", "-c", "pass"]), namespace)
    w = _waiting(cluster, namespace, "unmarked", "ErrImagePull", "ImagePullBackOff")
    assert "docker.io/dreambooth-test/python:local" not in w["message"]  # the user's reference, as written
    assert 'image "dreambooth-test/python:local"' in w["message"] and "registry" in w["message"]
    reasons = {e["reason"] for e in cluster.kube_api.get(f"/api/v1/namespaces/{namespace}/events")["items"]}
    assert {"Pulling", "Failed", "BackOff"} <= reasons


def test_pull_by_digest_and_pull_policies(cluster: Cluster, namespace: str, images: Images, registry: Any) -> None:
    node = {"nodeSelector": {"kubernetes.io/hostname": "node-0"}}
    by_digest = f"{images.host}/dreambooth-test/probe@{images.probe_digest}"
    cluster.apply(_pod("digest", by_digest, args=["by-digest"], pod_spec=node), namespace)
    pod = cluster.wait_pod_phase(namespace, "digest", "Succeeded", "Failed", timeout=120)
    assert cluster.pod_log(namespace, "digest").strip() == "EP by-digest"
    assert pod["status"]["containerStatuses"][0]["imageID"].endswith(images.probe_digest)

    # A tag that moves: node-0 has pulled it; IfNotPresent keeps what the node has, Always follows the registry.
    moving = f"{images.host}/dreambooth-test/moving:1"
    b = Buildah(cache_dir())
    with locked(b.root / ".lock"):
        b("push", "--tls-verify=false", PROBE, f"docker://{moving}")
    cluster.apply(_pod("first", moving, args=["first"], pod_spec=node), namespace)
    cluster.wait_pod_phase(namespace, "first", "Succeeded", "Failed", timeout=120)
    with locked(b.root / ".lock"):
        b("push", "--tls-verify=false", BASE_IMAGE, f"docker://{moving}")
    new_digest = registry.manifest_digest("dreambooth-test/moving", "1")
    ids = {}
    # One after the other: an Always pull moves the node's tag too (as on a real node), so order matters.
    for name, policy in (("ifnp", "IfNotPresent"), ("always", "Always")):
        cluster.apply(_pod(name, moving, command=["/bin/echo", "x"], imagePullPolicy=policy, pod_spec=node), namespace)
        pod = cluster.wait_pod_phase(namespace, name, "Succeeded", "Failed", timeout=120)
        ids[name] = pod["status"]["containerStatuses"][0]["imageID"].rsplit("@", 1)[1]
    assert ids["always"] == new_digest
    assert ids["ifnp"] == images.probe_digest != new_digest


def test_over_its_memory_limit_a_container_is_oom_killed(cluster: Cluster, namespace: str, images: Images) -> None:
    hog = "b = []\nwhile True:\n    b.append(bytearray(16 << 20))\n"
    cluster.apply(
        _pod("hog", images.probe, command=["python3", "-c", hog],
             resources={"limits": {"memory": "64Mi"}, "requests": {"memory": "64Mi"}}),
        namespace,
    )  # fmt: skip
    pod = cluster.wait_pod_phase(namespace, "hog", "Succeeded", "Failed", timeout=120)
    term = _terminated(pod)
    assert (pod["status"]["phase"], term["reason"], term["exitCode"]) == ("Failed", "OOMKilled", 137), term
    # The same program under a roomy limit is not killed by it (the limit is per container, not a global cap).
    cluster.apply(
        _pod("fits", images.probe, command=["python3", "-c", "b = bytearray(32 << 20); print(len(b))"],
             resources={"limits": {"memory": "256Mi"}}),
        namespace,
    )  # fmt: skip
    pod = cluster.wait_pod_phase(namespace, "fits", "Succeeded", "Failed", timeout=120)
    assert pod["status"]["phase"] == "Succeeded", _terminated(pod)


def test_pod_start_time_from_a_cached_image(cluster: Cluster, namespace: str, images: Images) -> None:
    """Benchmark (printed in the cluster tier's summary, not asserted): create → Running for a cached image."""
    cluster.apply(_pod("warm", images.probe, command=["sleep", "30"]), namespace)
    cluster.wait_pod_phase(namespace, "warm", "Running", timeout=120)
    # The kubelet's view of the container: its PID 1 (host PID) is in the container's cgroup, which
    # node_lost / deletion kill; the host sees the image's root through it.
    info = (cluster.pod_info(namespace, "warm") or {})["containers"]["main"]
    assert info["pid"] in info["processes"]
    assert "bookworm" in Path(f"/proc/{info['pid']}/root/etc/os-release").read_text()
    times = []
    for i in range(3):
        t = time.monotonic()
        cluster.apply(_pod(f"timed-{i}", images.probe, command=["sleep", "30"]), namespace)
        cluster.wait_pod_phase(namespace, f"timed-{i}", "Running", timeout=120)
        times.append(time.monotonic() - t)
    TIMINGS["pod create → Running, cached image (runc, 3 pods)"] = ", ".join(f"{t:.2f}s" for t in times)


def test_image_pod_network_probes_and_sigterm(cluster: Cluster, namespace: str, images: Images) -> None:
    """The pod's own netns (podIP reachable, readiness probe), and SIGTERM reaches the image's PID 1."""
    server = (
        "import http.server, signal, sys, threading\n"
        "def term(*_):\n"
        "    open('/dev/termination-log', 'w').write('SIGTERM to pid 1')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, term)\n"
        "s = http.server.HTTPServer(('', 8080), http.server.SimpleHTTPRequestHandler)\n"
        "threading.Thread(target=s.serve_forever, daemon=True).start()\n"
        "signal.pause()\n"
    )
    cluster.apply(
        _pod("web", images.probe, command=["python3", "-c", server], workingDir="/etc",
             readinessProbe={"httpGet": {"path": "/os-release", "port": 8080}, "periodSeconds": 1},
             pod_spec={"activeDeadlineSeconds": 20}),
        namespace,
    )  # fmt: skip

    def ready() -> dict[str, Any] | None:
        pod = cluster.pod(namespace, "web") or {}
        conds = {c["type"]: c["status"] for c in (pod.get("status") or {}).get("conditions") or []}
        return pod if conds.get("Ready") == "True" else None

    pod = wait_until(ready, 60, 0.2, "web Ready")
    ip = pod["status"]["podIP"]
    assert ip != cluster.host_ip
    with urllib.request.urlopen(f"http://{ip}:8080/os-release", timeout=5) as r:  # noqa: S310 - the pod's IP
        assert b"bookworm" in r.read()
    pod = cluster.wait_pod_phase(namespace, "web", "Failed", timeout=60)
    assert pod["status"]["reason"] == "DeadlineExceeded"
    assert _terminated(pod)["message"] == "SIGTERM to pid 1" and _terminated(pod)["exitCode"] == 0
