"""The process kubelet: registers Nodes and runs the pods bound to them as local processes.

One Python process serves every test Node. Each pod gets

* its own network namespace on the cluster's bridge (see ``netns.py``) and a podIP, a kubelet-style
  ``/etc/hosts`` and a ``/etc/resolv.conf`` pointing at the cluster DNS (``dns.py``),
* a folder ``<state>/pods/<uid>/`` holding its volumes (emptyDir, configMap, secret, downwardAPI, projected,
  hostPath), logs (``<container>.log``), termination-message files and private ``/tmp`` and ``$HOME``,
* per container a cgroup (``cgroup.kill`` stops every process, also those that started their own session, like
  torchrun's workers) and a shim (``shim.py``) that makes the container's namespaces and execs the command as
  PID 1 of a new PID namespace. The image is not pulled: the command runs on this machine with the project's
  virtualenv first on PATH (``python`` is the venv's).

Status is reported like a kubelet (Pending → Running → Succeeded/Failed, container states with exit codes,
``terminated.message`` from ``terminationMessagePath``, restartCount; a finished pod never goes back). A pod
being deleted gets SIGTERM on each container's main process only, every process of the pod gets SIGKILL after
the grace period, then the pod is deleted with grace period 0.

Test hooks (HTTP on 127.0.0.1, port in ``<state>/kubelet.json``): graceful node shutdown, node lost, node
recovered, node capacity changes, and pod introspection (PIDs, folders).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from . import oci
from .dns import ClusterDNS, DnsRecords
from .images import Image, ImageStore, PullError, container_argv, image_env, resolve_user
from .netns import PodNet, PodNetwork, add_service_dnat
from .rest import ApiError, Kube
from .util import expand, now_micro, now_rfc3339, parse_quantity, quantity_ceil_div

log = logging.getLogger("process-kubelet")

SHIM = Path(__file__).with_name("shim.py")
KUBELET_VERSION = "v1.20.2-process"
TERMINATION_MESSAGE_LIMIT = 4096
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The explicit marker of a host-process container: an image under this registry host (".invalid" never resolves,
# so no real image can be meant) runs this machine's files with the project's venv, as before images were pulled.
# Every other reference is pulled from its registry and run by runc; nothing falls back silently.
HOST_PROCESS_REGISTRY = "host.invalid"
# Image pull back-off: as the kubelet's 10 s doubling to 5 min, scaled down for tests.
# Where a pod finds its ServiceAccount's credentials, as every kubelet mounts them (client libraries' in-cluster
# config reads exactly these three files).
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Bound tokens of projected volumes live ~1 h on a real node and are refreshed there; pods here are short-lived,
# so one token per container start, valid for a day, stands in for the refresh.
SERVICE_ACCOUNT_TOKEN_SECONDS = 86400
PULL_BACKOFF_START = 2.0
PULL_BACKOFF_MAX = 20.0


def is_host_process(image: str) -> bool:
    return image.startswith(HOST_PROCESS_REGISTRY + "/")


# ====================================================================== configuration
@dataclass
class NodeConfig:
    name: str
    cpu: str = "8"
    memory: str = "32Gi"
    ephemeral_storage: str = "200Gi"
    gpus: int = 0
    pods: int = 110
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, Any]] = field(default_factory=list)
    # Once a node advertised GPUs it keeps the resource (at 0 when taken away): a merge patch cannot drop a key.
    gpu_resource: bool = False

    def __post_init__(self) -> None:
        self.gpu_resource = self.gpu_resource or self.gpus > 0

    def capacity(self) -> dict[str, str]:
        c = {
            "cpu": self.cpu,
            "memory": self.memory,
            "ephemeral-storage": self.ephemeral_storage,
            "pods": str(self.pods),
        }
        if self.gpu_resource:
            c["nvidia.com/gpu"] = str(self.gpus)
        return c

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NodeConfig:
        return cls(**{k.replace("-", "_"): v for k, v in d.items()})


def readable_by_others(paths: list[str]) -> bool:
    """Could a non-root uid reach these paths: every existing folder above them (and they) world-r-x?"""
    for path in paths:
        real = Path(os.path.realpath(path))
        for d in [real, *real.parents][:-1]:
            if d.is_dir() and d.stat().st_mode & 0o005 != 0o005:
                return False
    return True


def ignore_run_as_user(setting: str | None, python_paths: list[str]) -> bool:
    """Whether pods' runAsUser/runAsGroup are dropped (their containers then run as root).

    DREAMBOOTH_KUBELET_IGNORE_RUN_AS_USER: "1" always, "0" never, unset or "auto": only when a non-root uid
    could not even start this interpreter (e.g. a pyenv Python under a root-only /root): images are not pulled,
    every container runs this machine's Python, and a pod asking for uid 1000 would die before its first line.
    """
    if setting in ("0", "1"):
        return setting == "1"
    return not readable_by_others(python_paths)


def _find_cgroup_root() -> Path | None:
    """A writable cgroup v2 hierarchy (pure v2 at /sys/fs/cgroup, or the hybrid's /sys/fs/cgroup/unified)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            p = Path(parts[1])
            if os.access(p, os.W_OK):
                return p
    return None


# ====================================================================== watches
class Reflector(threading.Thread):
    """List + watch one resource path, calling ``handler(event_type, obj)``; re-lists on 410 and errors."""

    def __init__(self, kube: Kube, path: str, handler: Callable[[str, dict[str, Any]], None], name: str, **params: Any):
        super().__init__(name=f"reflector-{name}", daemon=True)
        self.kube = kube
        self.path = path
        self.handler = handler
        self.params = params
        self.known: dict[str, dict[str, Any]] = {}
        self.synced = threading.Event()
        self.stopping = threading.Event()

    @staticmethod
    def _key(o: dict[str, Any]) -> str:
        m = o["metadata"]
        return f"{m.get('namespace', '')}/{m['name']}/{m.get('uid', '')}"

    def _dispatch(self, t: str, o: dict[str, Any]) -> None:
        try:
            self.handler(t, o)
        except Exception:
            log.exception("handler for %s %s failed", t, self._key(o))

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                lst = self.kube.get(self.path, **self.params)
                rv = lst["metadata"]["resourceVersion"]
                items = lst.get("items") or []
                fresh = {self._key(o): o for o in items}
                for k in set(self.known) - set(fresh):
                    self._dispatch("DELETED", self.known[k])
                self.known = fresh
                for o in items:
                    self._dispatch("MODIFIED", o)
                self.synced.set()
                while not self.stopping.is_set():
                    for ev in self.kube.watch(self.path, rv, timeout_seconds=240, **self.params):
                        obj = ev["object"]
                        rv = obj["metadata"]["resourceVersion"]
                        if ev["type"] == "BOOKMARK":
                            continue
                        k = self._key(obj)
                        if ev["type"] == "DELETED":
                            self.known.pop(k, None)
                        else:
                            self.known[k] = obj
                        self._dispatch(ev["type"], obj)
            except ApiError as e:
                if e.status != 410:
                    log.warning("watch %s: %s", self.path, e)
                    time.sleep(1)
            except Exception as e:  # noqa: BLE001 - the apiserver may be restarting: retry
                if self.stopping.is_set():
                    return
                log.warning("watch %s failed: %r", self.path, e)
                time.sleep(1)


# ====================================================================== containers
@dataclass
class Container:
    name: str
    spec: dict[str, Any]
    init: bool
    cgroup: Path | None
    dir: Path
    restart_count: int = 0
    proc: subprocess.Popen[bytes] | None = None
    state: str = "waiting"  # waiting | running | terminated
    waiting_reason: str = "ContainerCreating"
    waiting_message: str = ""
    started_at: str = ""
    finished_at: str = ""
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""
    message: str = ""
    last_state: dict[str, Any] = field(default_factory=dict)
    term_sent: bool = False
    ready: bool = False
    restart_at: float = 0.0
    backoff: float = 1.0
    probe_ok: int = 0
    probe_fail: int = 0
    next_probe: float = 0.0
    image_id: str = ""  # "<registry>/<repo>@sha256:..." of the pulled image; "" for host-process containers
    bundle: Path | None = None  # runc bundle of the current run (overlay rootfs mounted under it)
    pull_backoff: float = PULL_BACKOFF_START
    pull_failed_at: float = 0.0

    @property
    def oom_path(self) -> Path:
        return self.dir / f"{self.name}.oom"

    @property
    def log_path(self) -> Path:
        return self.dir / f"{self.name}.log"

    @property
    def term_path(self) -> Path:
        return self.dir / f"{self.name}.termination-log"

    @property
    def err_path(self) -> Path:
        return self.dir / f"{self.name}.start-error"

    @property
    def pid_path(self) -> Path:
        return self.dir / f"{self.name}.pid1"

    def pid1(self) -> int | None:
        """Host PID of the container's PID 1 (the command), written by the shim after fork."""
        try:
            return int(self.pid_path.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def status(self) -> dict[str, Any]:
        image = self.spec.get("image", "")
        st: dict[str, Any] = {
            "name": self.name,
            "image": image,
            "imageID": self.image_id or f"process-kubelet://{image}",
            "ready": self.ready,
            "restartCount": self.restart_count,
            "started": self.state == "running",
            "lastState": self.last_state,
        }
        if self.state == "waiting":
            w: dict[str, Any] = {"reason": self.waiting_reason}
            if self.waiting_message:
                w["message"] = self.waiting_message
            st["state"] = {"waiting": w}
        elif self.state == "running":
            st["state"] = {"running": {"startedAt": self.started_at}}
            st["containerID"] = self.container_id
        else:
            st["state"] = {"terminated": self.terminated()}
            st["containerID"] = self.container_id
        return st

    @property
    def container_id(self) -> str:
        scheme = "runc" if self.image_id else "process"
        return f"{scheme}://{self.dir.name}/{self.name}/{self.restart_count}"

    def terminated(self) -> dict[str, Any]:
        t: dict[str, Any] = {
            "exitCode": self.exit_code if self.exit_code is not None else 137,
            "reason": self.reason or ("Completed" if self.exit_code == 0 else "Error"),
        }
        if self.signal:
            t["signal"] = self.signal
        if self.message:
            t["message"] = self.message
        if self.started_at:
            t["startedAt"] = self.started_at
        t["finishedAt"] = self.finished_at or now_rfc3339()
        t["containerID"] = self.container_id
        return t


class PodSetupPending(Exception):
    """A volume or env source is not there yet (missing ConfigMap/Secret): retry, the pod stays Pending."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class ImagePullFailed(PodSetupPending):
    """ErrImagePull / ErrImageNeverPull: the container waits, then ImagePullBackOff until the next try."""


def _home_of(rootfs: Path, uid: int) -> str:
    """HOME as containerd sets it: the uid's passwd entry in the image, else "/"."""
    with contextlib.suppress(OSError):
        for line in (rootfs / "etc" / "passwd").read_text().splitlines():
            parts = line.split(":")
            if len(parts) >= 6 and parts[2] == str(uid):
                return parts[5] or "/"
    return "/"


# ====================================================================== pod worker


def _mount_source(vm: dict[str, Any], vols: dict[str, Any], env: dict[str, str]) -> Path:
    """The host path a volumeMount binds: its volume's folder, or a subPath in it (made on first use)."""
    if vm["name"] not in vols:
        raise PodSetupPending("CreateContainerConfigError", f"volume {vm['name']} not found")
    src = Path(vols[vm["name"]]["path"])
    if vm.get("subPath"):
        src = src / expand(vm["subPath"], env)
        if not src.exists():
            src.mkdir(parents=True, exist_ok=True)
            src.chmod(0o777)
    return src


class PodWorker(threading.Thread):
    """Owns one pod from first sight until it is gone from the API."""

    def __init__(self, kubelet: ProcessKubelet, pod: dict[str, Any]):
        md = pod["metadata"]
        super().__init__(name=f"pod-{md['namespace']}/{md['name']}", daemon=True)
        self.k = kubelet
        self.kube = kubelet.kube
        self.uid: str = md["uid"]
        self.ns: str = md["namespace"]
        self.name: str = md["name"]
        self.node: str = pod["spec"]["nodeName"]
        self.pod = pod
        self.cv = threading.Condition()
        self.gone = False
        self.dir = kubelet.state_dir / "pods" / self.uid
        self.net: PodNet | None = None
        self.pod_ip = ""
        self.start_time = ""
        self.containers: list[Container] = []
        self.init_containers: list[Container] = []
        self.phase = "Pending"
        self.pod_reason = ""
        self.pod_message = ""
        self.extra_conditions: list[dict[str, Any]] = []
        self.terminal = False
        self.kill_deadline: float | None = None
        self.shutdown_grace: float | None = None
        self.lost = False
        self.was_lost = False
        self.last_status: dict[str, Any] | None = None
        self.cond_times: dict[str, tuple[str, str]] = {}
        self.mounted_tmpfs: list[Path] = []
        self.cgroup: Path | None = None
        self.initialized = False
        self.hostname: str = (pod["spec"].get("hostname") or self.name)[:63]
        self._ready_volumes: set[str] = set()

    # ---------------------------------------------------------------- events from the dispatcher
    def update(self, pod: dict[str, Any]) -> None:
        with self.cv:
            self.pod = pod
            self.cv.notify_all()

    def mark_gone(self, pod: dict[str, Any]) -> None:
        with self.cv:
            self.pod = pod
            self.gone = True
            self.cv.notify_all()

    def request_shutdown(self, grace: float) -> None:
        with self.cv:
            self.shutdown_grace = grace
            self.cv.notify_all()

    def set_lost(self, lost: bool) -> None:
        with self.cv:
            self.lost = lost
            if lost:
                self.was_lost = True
            self.cv.notify_all()

    def _wait(self, timeout: float) -> None:
        with self.cv:
            self.cv.wait(timeout)

    # ---------------------------------------------------------------- helpers
    @property
    def spec(self) -> dict[str, Any]:
        return self.pod["spec"]

    @property
    def deleting(self) -> bool:
        return self.gone or bool(self.pod["metadata"].get("deletionTimestamp"))

    def _grace(self) -> float:
        md = self.pod["metadata"]
        g = md.get("deletionGracePeriodSeconds")
        if g is None:
            g = self.spec.get("terminationGracePeriodSeconds", 30)
        # As the real kubelet: a force delete (0) still gives the containers a short chance.
        return float(max(int(g), 2 if self.gone or int(g) == 0 else 0))

    def all_containers(self) -> list[Container]:
        return self.init_containers + self.containers

    def info(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "namespace": self.ns,
            "name": self.name,
            "node": self.node,
            "dir": str(self.dir),
            "podIP": self.pod_ip,
            "netns": self.net.netns if self.net else None,
            "phase": self.phase,
            "containers": {
                c.name: {
                    "shimPid": c.proc.pid if c.proc else None,
                    "pid": c.pid1(),
                    "state": c.state,
                    "restartCount": c.restart_count,
                    "log": str(c.log_path),
                    "cgroup": str(c.cgroup) if c.cgroup else None,
                    "processes": self.k.cgroup_pids(c.cgroup) if c.cgroup else [],
                }
                for c in self.all_containers()
            },
        }

    # ---------------------------------------------------------------- main loop
    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("pod worker %s/%s crashed", self.ns, self.name)
            self._kill_all()
        finally:
            self._teardown()
            self.k.forget(self.uid)

    def _run(self) -> None:
        if self.pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            # Finished before we saw it (e.g. a kubelet restart): never run it again; just finish deletion.
            self.terminal = True
            self.phase = self.pod["status"]["phase"]
            self._await_deletion()
            return
        while not self._node_up():
            if self.gone:
                return
            self._wait(1.0)
        if self.deleting:
            self._delete_pod()
            return
        self.start_time = now_rfc3339()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._make_containers()
        self._patch_status()
        try:
            self._setup_sandbox()
        except Exception as e:
            log.exception("sandbox setup for %s/%s failed", self.ns, self.name)
            for c in self.all_containers():
                c.waiting_reason, c.waiting_message = "CreateContainerError", f"sandbox setup failed: {e}"
            self._patch_status()
            self._await_deletion()
            return
        self._patch_status()
        self._loop()
        self._await_deletion()

    def _node_up(self) -> bool:
        return self.k.node_state.get(self.node) == "up"

    def _make_containers(self) -> None:
        self.cgroup = self.k.make_cgroup(self.uid)
        for spec in self.spec.get("initContainers") or []:
            self.init_containers.append(Container(spec["name"], spec, True, None, self.dir))
        for spec in self.spec.get("containers") or []:
            self.containers.append(Container(spec["name"], spec, False, None, self.dir))
        for c in self.all_containers():
            if self.cgroup is not None:
                c.cgroup = self.k.make_cgroup(self.uid, c.name)

    # ---------------------------------------------------------------- sandbox
    def _setup_sandbox(self) -> None:
        (self.dir / "tmp").mkdir(exist_ok=True)
        (self.dir / "tmp").chmod(0o1777)
        (self.dir / "home").mkdir(exist_ok=True)
        if self.spec.get("hostNetwork"):
            self.pod_ip = self.k.host_ip
        else:
            self.net = self.k.network.add_pod()
            self.pod_ip = self.net.ip
        hostname = (self.spec.get("hostname") or self.name)[:63]
        lines = [
            "# Kubernetes-managed hosts file (process kubelet).",
            "127.0.0.1\tlocalhost",
            "::1\tlocalhost ip6-localhost ip6-loopback",
        ]
        if self.spec.get("subdomain"):
            fqdn = f"{hostname}.{self.spec['subdomain']}.{self.ns}.svc.cluster.local"
            lines.append(f"{self.pod_ip}\t{fqdn}\t{hostname}")
        else:
            lines.append(f"{self.pod_ip}\t{hostname}")
        for alias in self.spec.get("hostAliases") or []:
            lines.append(f"{alias['ip']}\t" + "\t".join(alias.get("hostnames") or []))
        (self.dir / "hosts").write_text("\n".join(lines) + "\n")
        (self.dir / "hostname").write_text(hostname + "\n")
        (self.dir / "resolv.conf").write_text(
            f"nameserver {self.k.host_ip}\n"
            f"search {self.ns}.svc.cluster.local svc.cluster.local cluster.local\n"
            "options ndots:5\n"
        )
        self.hostname = hostname

    def _volumes(self) -> dict[str, dict[str, Any]]:
        """Materialise every volume as a folder (or tmpfs) under the pod folder; name → {path}."""
        out: dict[str, dict[str, Any]] = {}
        vroot = self.dir / "volumes"
        vroot.mkdir(exist_ok=True)
        fs_group = (self.spec.get("securityContext") or {}).get("fsGroup")
        for vol in self.spec.get("volumes") or []:
            name = vol["name"]
            path = vroot / name
            if "hostPath" in vol:
                hp = vol["hostPath"]
                src = Path(hp["path"])
                t = hp.get("type", "")
                if t == "DirectoryOrCreate":
                    src.mkdir(parents=True, exist_ok=True)
                elif t == "FileOrCreate":
                    src.parent.mkdir(parents=True, exist_ok=True)
                    src.touch(exist_ok=True)
                if not src.exists():
                    raise PodSetupPending("ContainerCreating", f"hostPath {src} does not exist")
                out[name] = {"path": src}
                continue
            if path.exists() and name in self._ready_volumes:
                out[name] = {"path": path}
                continue
            if "emptyDir" in vol:
                ed = vol["emptyDir"] or {}
                path.mkdir(exist_ok=True)
                if ed.get("medium") == "Memory":
                    size = ed.get("sizeLimit")
                    opts = "mode=1777" + (f",size={int(parse_quantity(size))}" if size else "")
                    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)
                    self.mounted_tmpfs.append(path)
                path.chmod(0o1777 if ed.get("medium") == "Memory" else 0o777)
            elif "configMap" in vol or "secret" in vol or "downwardAPI" in vol:
                self._write_projection(path, [vol], fs_group)
            elif "projected" in vol:
                self._write_projection(
                    path, vol["projected"].get("sources") or [], fs_group, vol["projected"].get("defaultMode")
                )
            else:
                kinds = [k for k in vol if k != "name"]
                raise PodSetupPending(
                    "CreateContainerConfigError",
                    f"volume {name}: {kinds} volumes are not supported by the process kubelet",
                )
            if fs_group is not None:
                with contextlib.suppress(OSError):
                    os.chown(path, -1, int(fs_group))
            self._ready_volumes.add(name)
            out[name] = {"path": path}
        return out

    def _write_projection(
        self, path: Path, sources: list[dict[str, Any]], fs_group: Any, default_mode: int | None = None
    ) -> None:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for src in sources:
            if "configMap" in src or "secret" in src:
                is_secret = "secret" in src
                ref = src["secret"] if is_secret else src["configMap"]
                obj_name = ref.get("secretName") if is_secret and "secretName" in ref else ref.get("name")
                kind = "secrets" if is_secret else "configmaps"
                mode = ref.get("defaultMode", default_mode if default_mode is not None else 0o644)
                try:
                    obj = self.kube.get(f"/api/v1/namespaces/{self.ns}/{kind}/{obj_name}")
                except ApiError as e:
                    if e.status == 404:
                        if ref.get("optional"):
                            continue
                        raise PodSetupPending(
                            "ContainerCreating", f'MountVolume.SetUp failed: {kind[:-1]} "{obj_name}" not found'
                        ) from e
                    raise
                data: dict[str, bytes] = {}
                for k, v in (obj.get("data") or {}).items():
                    data[k] = base64.b64decode(v) if is_secret else v.encode()
                for k, v in (obj.get("binaryData") or {}).items():
                    data[k] = base64.b64decode(v)
                items = ref.get("items")
                if items:
                    for it in items:
                        if it["key"] not in data:
                            if ref.get("optional"):
                                continue
                            raise PodSetupPending("ContainerCreating", f"{kind[:-1]} {obj_name} has no key {it['key']}")
                        self._write_file(tmp / it["path"], data[it["key"]], it.get("mode", mode))
                else:
                    for k, v in data.items():
                        self._write_file(tmp / k, v, mode)
            elif "downwardAPI" in src:
                dapi = src["downwardAPI"]
                mode = dapi.get("defaultMode", default_mode if default_mode is not None else 0o644)
                for it in dapi.get("items") or []:
                    if "fieldRef" in it:
                        value = self._field_ref(it["fieldRef"]["fieldPath"], as_file=True)
                    else:
                        value = self._resource_ref(it["resourceFieldRef"], None)
                    self._write_file(tmp / it["path"], value.encode(), it.get("mode", mode))
            elif "serviceAccountToken" in src:
                sat = src["serviceAccountToken"]
                sa = self.spec.get("serviceAccountName") or "default"
                body: dict[str, Any] = {
                    "apiVersion": "authentication.k8s.io/v1",
                    "kind": "TokenRequest",
                    "spec": {
                        "expirationSeconds": int(sat.get("expirationSeconds", 3600)),
                        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": self.name, "uid": self.uid},
                    },
                }
                if sat.get("audience"):
                    body["spec"]["audiences"] = [sat["audience"]]
                tr = self.kube.create(f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token", body)
                mode = default_mode if default_mode is not None else 0o644
                self._write_file(tmp / sat["path"], tr["status"]["token"].encode(), mode)
        if fs_group is not None:
            for p in [tmp, *tmp.rglob("*")]:
                with contextlib.suppress(OSError):
                    os.chown(p, -1, int(fs_group))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)

    @staticmethod
    def _write_file(p: Path, data: bytes, mode: int) -> None:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(mode)

    # ---------------------------------------------------------------- env
    def _field_ref(self, path: str, as_file: bool = False) -> str:
        md = self.pod["metadata"]
        if path in ("metadata.labels", "metadata.annotations") and as_file:
            d = md.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(d.items()))
        simple = {
            "metadata.name": md["name"],
            "metadata.namespace": md["namespace"],
            "metadata.uid": md["uid"],
            "spec.nodeName": self.node,
            "spec.serviceAccountName": self.spec.get("serviceAccountName", ""),
            "status.hostIP": self.k.host_ip,
            "status.podIP": self.pod_ip,
            "status.podIPs": self.pod_ip,
        }
        if path in simple:
            return str(simple[path] or "")
        for prefix, key in (("metadata.labels[", "labels"), ("metadata.annotations[", "annotations")):
            if path.startswith(prefix):
                k = path[len(prefix) :].rstrip("]").strip("'\"")
                return str((md.get(key) or {}).get(k, ""))
        raise PodSetupPending("CreateContainerConfigError", f"unsupported fieldRef {path}")

    def _resource_ref(self, ref: dict[str, Any], container: dict[str, Any] | None) -> str:
        cname = ref.get("containerName")
        if cname:
            container = next((c for c in self.spec.get("containers", []) if c["name"] == cname), container)
        res = ref["resource"]
        kind, _, rname = res.partition(".")
        value = ((container or {}).get("resources") or {}).get(kind, {}).get(rname)
        if value is None:
            # Without a limit, the downward API reports the node's allocatable.
            value = self.k.node_configs[self.node].capacity().get(rname, "0")
        divisor = parse_quantity(ref.get("divisor", "1") or "1")
        return quantity_ceil_div(parse_quantity(value), divisor)

    def _lookup_key(self, kind: str, name: str, key: str, optional: bool) -> str | None:
        try:
            obj = self.kube.get(f"/api/v1/namespaces/{self.ns}/{kind}/{name}")
        except ApiError as e:
            if e.status == 404:
                if optional:
                    return None
                raise PodSetupPending("CreateContainerConfigError", f'{kind[:-1]} "{name}" not found') from e
            raise
        data = obj.get("data") or {}
        if key not in data:
            if optional:
                return None
            raise PodSetupPending(
                "CreateContainerConfigError", f"couldn't find key {key} in {kind[:-1]} {self.ns}/{name}"
            )
        return base64.b64decode(data[key]).decode() if kind == "secrets" else data[key]

    def _env(self, c: dict[str, Any], uid: int, base: dict[str, str] | None = None) -> dict[str, str]:
        """The container's environment on top of ``base`` (an image's ENV), else on the host-process defaults."""
        if base is not None:
            env = dict(base)
            env.update(self._service_env())
        else:
            env = {
                "PATH": f"{self.k.venv_bin}:{DEFAULT_PATH}",
                "HOSTNAME": self.hostname,
                "HOME": "/root" if uid == 0 else "/",
                "LANG": "C.UTF-8",
            }
            if self.k.venv:
                env["VIRTUAL_ENV"] = self.k.venv
            if not self.k.private_tmp:
                env["TMPDIR"] = str(self.dir / "tmp")
            if uid == 0 and not self.k.private_root:
                env["HOME"] = str(self.dir / "home")
            env.update(self._service_env())
        for ef in c.get("envFrom") or []:
            prefix = ef.get("prefix", "")
            ref = ef.get("configMapRef") or ef.get("secretRef")
            if not ref:
                continue
            kind = "secrets" if "secretRef" in ef else "configmaps"
            try:
                obj = self.kube.get(f"/api/v1/namespaces/{self.ns}/{kind}/{ref['name']}")
            except ApiError as e:
                if e.status == 404 and ref.get("optional"):
                    continue
                if e.status == 404:
                    raise PodSetupPending("CreateContainerConfigError", f'{kind[:-1]} "{ref["name"]}" not found') from e
                raise
            for k, v in (obj.get("data") or {}).items():
                env[prefix + k] = base64.b64decode(v).decode() if kind == "secrets" else v
        for e in c.get("env") or []:
            name = e["name"]
            if "valueFrom" not in e:
                env[name] = expand(e.get("value", ""), env)
                continue
            vf = e["valueFrom"]
            value: str | None
            if "fieldRef" in vf:
                value = self._field_ref(vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                value = self._resource_ref(vf["resourceFieldRef"], c)
            elif "configMapKeyRef" in vf:
                r = vf["configMapKeyRef"]
                value = self._lookup_key("configmaps", r["name"], r["key"], bool(r.get("optional")))
            elif "secretKeyRef" in vf:
                r = vf["secretKeyRef"]
                value = self._lookup_key("secrets", r["name"], r["key"], bool(r.get("optional")))
            else:
                raise PodSetupPending("CreateContainerConfigError", f"env {name}: unsupported valueFrom {vf}")
            if value is not None:
                env[name] = value
        return env

    def _service_env(self) -> dict[str, str]:
        """The ``kubernetes`` Service's variables a kubelet gives every container (in-cluster config reads
        KUBERNETES_SERVICE_HOST/PORT); only where the pod has a network that reaches the Service address."""
        vip = self.k.kubernetes_service
        if self.net is None or vip is None:
            return {}
        ip, port = vip
        url = f"tcp://{ip}:{port}"
        return {
            "KUBERNETES_SERVICE_HOST": ip,
            "KUBERNETES_SERVICE_PORT": str(port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(port),
            "KUBERNETES_PORT": url,
            f"KUBERNETES_PORT_{port}_TCP": url,
            f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
            f"KUBERNETES_PORT_{port}_TCP_PORT": str(port),
            f"KUBERNETES_PORT_{port}_TCP_ADDR": ip,
        }

    def _service_account_files(self) -> Path | None:
        """token, ca.crt and namespace of the pod's ServiceAccount in a folder (what a kubelet projects into
        ``kube-api-access-*``), or None when the pod or its ServiceAccount opts out of automounting."""
        sa = self.spec.get("serviceAccountName") or self.spec.get("serviceAccount") or "default"
        automount = self.spec.get("automountServiceAccountToken")
        try:
            account = self.kube.get(f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}")
        except ApiError as e:
            if e.status == 404:
                # Without the ServiceAccount admission plugin the apiserver accepts such a pod; a kubelet could
                # not mint its token either, so the pod waits (the account may still be created).
                raise PodSetupPending("CreateContainerConfigError", f'serviceaccount "{sa}" not found') from e
            raise
        if automount is None:
            automount = account.get("automountServiceAccountToken")
        if automount is False:
            return None
        spec: dict[str, Any] = {"expirationSeconds": SERVICE_ACCOUNT_TOKEN_SECONDS}
        if self.spec.get("serviceAccountName") or self.spec.get("serviceAccount"):
            # Bound to the pod like a kubelet's token. The apiserver binds only to a pod that names the account,
            # and without the ServiceAccount admission plugin nothing fills in "default": such a pod gets an
            # unbound token of the same account.
            spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": self.name, "uid": self.uid}
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        tr = self.kube.create(f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token", body)
        out = self.dir / "serviceaccount"
        out.mkdir(exist_ok=True)
        out.chmod(0o755)
        self._write_file(out / "token", tr["status"]["token"].encode(), 0o644)
        self._write_file(out / "ca.crt", Path(self.kube.ca_file).read_bytes(), 0o644)
        self._write_file(out / "namespace", self.ns.encode(), 0o644)
        return out

    # ---------------------------------------------------------------- start one container
    def _start(self, c: Container) -> None:
        shim_spec = self._host_process_spec(c) if is_host_process(c.spec.get("image", "")) else self._image_spec(c)
        self._launch(c, shim_spec)

    def _host_process_spec(self, c: Container) -> dict[str, Any]:
        spec = c.spec
        psc = self.spec.get("securityContext") or {}
        csc = spec.get("securityContext") or {}
        uid = csc.get("runAsUser", psc.get("runAsUser"))
        gid = csc.get("runAsGroup", psc.get("runAsGroup"))
        if self.k.ignore_run_as_user:
            uid = gid = None
        eff_uid = int(uid) if uid is not None else 0
        vols = self._volumes()
        env = self._env(spec, eff_uid)
        command = list(spec.get("command") or [])
        args = list(spec.get("args") or [])
        if not command:
            command = self.k.entrypoint_for(spec.get("image", ""))
            if not command:
                raise PodSetupPending(
                    "CreateContainerConfigError",
                    f"image {spec.get('image')!r} has no known entrypoint on the process kubelet: set `command`, "
                    "or map the image with DREAMBOOTH_KUBELET_IMAGE_COMMANDS",
                )
        argv = [expand(a, env) for a in command + args]

        mounts: list[dict[str, Any]] = []
        if self.k.private_tmp:
            mounts.append({"type": "bind", "source": str(self.dir / "tmp"), "target": "/tmp"})
        if eff_uid == 0 and self.k.private_root:
            mounts.append({"type": "bind", "source": str(self.dir / "home"), "target": "/root"})
        if self.net is not None:
            mounts.append({"type": "bind", "source": str(self.dir / "hosts"), "target": "/etc/hosts", "file": True})
            dns_policy = self.spec.get("dnsPolicy", "ClusterFirst")
            if dns_policy in ("ClusterFirst", "ClusterFirstWithHostNet"):
                mounts.append(
                    {
                        "type": "bind",
                        "source": str(self.dir / "resolv.conf"),
                        "target": "/etc/resolv.conf",
                        "file": True,
                    }
                )
        for vm in spec.get("volumeMounts") or []:
            src = _mount_source(vm, vols, env)
            if vm["mountPath"].rstrip("/") == "/tmp" and not self.k.private_tmp:
                # /tmp holds this Python (and the pod folders): a volume there would hide them. The volume is
                # the container's temp dir through TMPDIR instead, which is all /tmp is for.
                env["TMPDIR"] = str(src)
                continue
            mounts.append(
                {
                    "type": "bind",
                    "source": str(src),
                    "target": vm["mountPath"],
                    "file": src.is_file(),
                    "readOnly": bool(vm.get("readOnly")),
                }
            )
        for m in mounts:
            hidden = [p for p in self.k.protected_paths if _under(p, Path(m["target"]))]
            if hidden and m["target"] not in ("/tmp", "/root"):
                raise PodSetupPending(
                    "CreateContainerConfigError",
                    f"mountPath {m['target']} would hide {hidden[0]}, which the process kubelet runs pods from "
                    "(its virtualenv / sys.path); use another mountPath in tests",
                )
        term_target = spec.get("terminationMessagePath") or "/dev/termination-log"
        c.term_path.write_bytes(b"")
        c.term_path.chmod(0o666)
        mounts.append({"type": "bind", "source": str(c.term_path), "target": term_target, "file": True})

        cwd = spec.get("workingDir") or ""
        if cwd and not Path(cwd).is_dir():
            wd = self.dir / "workdir" / c.name
            wd.mkdir(parents=True, exist_ok=True)
            wd.chmod(0o777)
            mounts.append({"type": "bind", "source": str(wd), "target": cwd})
        if not cwd:
            # A container without workingDir starts in "/" of its own filesystem; here "/" is the host's, so
            # start in the pod's private /tmp instead: a stray relative write stays inside the pod.
            cwd = "/tmp" if self.k.private_tmp else str(self.dir / "tmp")

        groups = [int(g) for g in psc.get("supplementalGroups") or []]
        if psc.get("fsGroup") is not None:
            groups.append(int(psc["fsGroup"]))
        shim_spec = {
            "cgroup": str(c.cgroup) if c.cgroup else None,
            "netns": self.net.netns_path if self.net else None,
            "hostname": self.hostname if self.net else socket.gethostname(),
            "mounts": mounts,
            "argv": argv,
            "env": env,
            "cwd": cwd,
            "uid": uid,
            "gid": gid if gid is not None else (uid if uid is not None else None),
            "groups": groups,
            "pidfile": str(c.pid_path),
            "errfile": str(c.err_path),
        }
        return shim_spec

    def _image_spec(self, c: Container) -> dict[str, Any]:
        """Pull the image, merge its config with the container spec as a kubelet does, write a runc bundle."""
        spec = c.spec
        if self.k.runtime is None:
            raise PodSetupPending(
                "CreateContainerError",
                "no OCI runtime on this node: apt-get install runc (or use a host.invalid/ image)",
            )
        image = self._pull(c)
        cfg = image.run_config
        psc = self.spec.get("securityContext") or {}
        csc = spec.get("securityContext") or {}
        image_user = str(cfg.get("User") or "")
        img_uid, img_gid, user_err = resolve_user(image.rootfs, image_user)
        run_as_user = csc.get("runAsUser", psc.get("runAsUser"))
        run_as_group = csc.get("runAsGroup", psc.get("runAsGroup"))
        if run_as_user is None and user_err:
            raise PodSetupPending("CreateContainerError", f"image {image.ref}: {user_err}")
        uid = int(run_as_user) if run_as_user is not None else img_uid
        if run_as_group is not None:
            gid = int(run_as_group)
        elif run_as_user is not None:
            gid = resolve_user(image.rootfs, str(uid))[1] or 0
        else:
            gid = img_gid
        assert uid is not None and gid is not None
        if csc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            user_name = image_user.partition(":")[0]
            if run_as_user is None and user_name and not user_name.isdigit():
                raise PodSetupPending(
                    "CreateContainerConfigError",
                    f"container has runAsNonRoot and image has non-numeric user ({user_name}), cannot verify user is "
                    f"non-root (pod: {self.name}, container: {c.name})",
                )
            if uid == 0:
                raise PodSetupPending(
                    "CreateContainerConfigError",
                    f"container has runAsNonRoot and image will run as root (pod: {self.name}, container: {c.name})",
                )
        vols = self._volumes()
        base_env = image_env(cfg)
        base_env["HOSTNAME"] = self.hostname
        env = self._env(spec, uid, base_env)
        if "HOME" not in env:
            env["HOME"] = _home_of(image.rootfs, uid)
        command = [expand(a, env) for a in spec.get("command") or []]
        args = [expand(a, env) for a in spec.get("args") or []]
        argv = container_argv(cfg, command, args)
        if not argv:
            raise PodSetupPending(
                "CreateContainerError",
                f"no command specified: image {image.ref} has neither ENTRYPOINT nor CMD and the container sets no command",
            )

        mounts: list[dict[str, Any]] = []
        if self.net is not None:
            mounts.append(oci.bind(str(self.dir / "hosts"), "/etc/hosts"))
            mounts.append(oci.bind(str(self.dir / "hostname"), "/etc/hostname"))
            if self.spec.get("dnsPolicy", "ClusterFirst") in ("ClusterFirst", "ClusterFirstWithHostNet"):
                mounts.append(oci.bind(str(self.dir / "resolv.conf"), "/etc/resolv.conf"))
        for vm in spec.get("volumeMounts") or []:
            src = _mount_source(vm, vols, env)
            mounts.append(oci.bind(str(src), vm["mountPath"], bool(vm.get("readOnly"))))
        if not any(vm["mountPath"].rstrip("/") == SERVICE_ACCOUNT_DIR for vm in spec.get("volumeMounts") or []):
            sa_dir = self._service_account_files()
            if sa_dir is not None:
                mounts.append(oci.bind(str(sa_dir), SERVICE_ACCOUNT_DIR, True))
        c.term_path.write_bytes(b"")
        c.term_path.chmod(0o666)
        mounts.append(oci.bind(str(c.term_path), spec.get("terminationMessagePath") or "/dev/termination-log"))

        groups = [int(g) for g in psc.get("supplementalGroups") or []]
        if psc.get("fsGroup") is not None:
            groups.append(int(psc["fsGroup"]))
        limit = ((spec.get("resources") or {}).get("limits") or {}).get("memory")
        self._drop_bundle(c)
        bundle = self.dir / "bundles" / f"{c.name}-{c.restart_count}"
        shutil.rmtree(bundle, ignore_errors=True)
        rootfs = oci.mount_overlay(image.rootfs, bundle)
        c.bundle = bundle
        c.image_id = image.image_id
        oci.write_config(
            bundle,
            rootfs=rootfs,
            argv=argv,
            env=env,
            cwd=spec.get("workingDir") or cfg.get("WorkingDir") or "/",
            uid=uid,
            gid=gid,
            groups=groups,
            hostname=self.hostname,
            netns=self.net.netns_path if self.net else None,
            mounts=mounts,
            read_only_root=bool(csc.get("readOnlyRootFilesystem")),
            no_new_privileges=csc.get("allowPrivilegeEscalation") is False,
            cgroups_path=f"dbk{self.k.cid}/{self.uid}/{c.name}",
            memory_limit=int(parse_quantity(limit)) if limit else None,
        )
        return {
            # Not joined by the shim: runc nests the relative cgroupsPath under its caller's groups, so from the
            # kubelet's own groups it lands exactly on c.cgroup (v2: cgroup.kill, pod_info) and under the
            # kubelet's v1 memory group (the limit).
            "cgroup": None,
            "runtime": {
                "binary": self.k.runtime,
                "root": str(self.k.runtime_root),
                "bundle": str(bundle),
                "id": f"{self.k.cid}-{self.uid[:13]}-{c.name}-{c.restart_count}",
                "pidfile": str(bundle / "pid"),
            },
            "pidfile": str(c.pid_path),
            "errfile": str(c.err_path),
            "oomfile": str(c.oom_path),
        }

    def _drop_bundle(self, c: Container) -> None:
        if c.bundle is not None:
            oci.unmount(c.bundle / "rootfs")
            shutil.rmtree(c.bundle, ignore_errors=True)
            c.bundle = None

    def _pull(self, c: Container) -> Image:
        """The image for ``c`` per its imagePullPolicy; ErrImagePull / ErrImageNeverPull as a node reports them."""
        ref = c.spec.get("image", "")
        policy = c.spec.get("imagePullPolicy") or (
            "Always" if ref.endswith(":latest") or ":" not in ref.rsplit("/", 1)[-1] else "IfNotPresent"
        )
        present = self.k.node_images.setdefault(self.node, {}).get(ref)
        if present is not None and policy != "Always":
            self.k.event(self.pod, "Pulled", f'Container image "{ref}" already present on machine')
            return present
        if policy == "Never":
            raise ImagePullFailed(
                "ErrImageNeverPull",
                f'Container image "{ref}" is not present with pull policy of Never',
            )
        self.k.event(self.pod, "Pulling", f'Pulling image "{ref}"')
        t0 = time.monotonic()
        try:
            image = self.k.images.pull(ref)
        except PullError as e:
            raise ImagePullFailed("ErrImagePull", f'Failed to pull image "{ref}": {e}') from e
        took = time.monotonic() - t0
        self.k.node_images[self.node][ref] = image
        self.k.event(
            self.pod,
            "Pulled",
            f'Successfully pulled image "{ref}" in {took:.3f}s' + ("" if image.pulled else " (layers cached)"),
        )
        return image

    def _launch(self, c: Container, shim_spec: dict[str, Any]) -> None:
        c.pid_path.unlink(missing_ok=True)
        c.oom_path.unlink(missing_ok=True)
        c.err_path.unlink(missing_ok=True)
        spec_file = self.dir / f"{c.name}.shim.json"
        spec_file.write_text(json.dumps(shim_spec))
        spec_file.chmod(0o600)
        if c.log_path.exists() and c.restart_count > 0:
            c.log_path.replace(self.dir / f"{c.name}.previous.log")
        with open(c.log_path, "ab") as logf:
            c.proc = subprocess.Popen(
                [self.k.python, "-I", "-S", str(SHIM), str(spec_file)],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                close_fds=True,
                start_new_session=True,
            )
        # "Running" once the command really started (the shim forked PID 1 and installed its signal forwarding),
        # so a SIGTERM right after the Running status reaches PID 1 instead of killing a half-started shim.
        deadline = time.monotonic() + 10
        while c.pid1() is None and c.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        c.state = "running"
        c.started_at = now_rfc3339()
        c.term_sent = False
        c.exit_code = None
        c.signal = None
        c.reason = c.message = ""
        c.ready = not c.spec.get("readinessProbe")
        c.probe_ok = c.probe_fail = 0
        c.next_probe = time.monotonic() + float((c.spec.get("readinessProbe") or {}).get("initialDelaySeconds", 0))
        self.k.event(self.pod, "Started", f"Started container {c.name}")

    def _pull_backoff(self, c: Container) -> None:
        """After ErrImagePull has been seen, the container waits in ImagePullBackOff until the next try."""
        now = time.monotonic()
        if (
            c.state == "waiting"
            and c.waiting_reason in ("ErrImagePull", "ErrImageNeverPull")
            and now - c.pull_failed_at >= 1.0
            and now < c.restart_at
        ):
            ref = c.spec.get("image", "")
            c.waiting_reason = "ImagePullBackOff"
            c.waiting_message = f'Back-off pulling image "{ref}": {c.waiting_message}'
            self.k.event(self.pod, "BackOff", f'Back-off pulling image "{ref}"')

    def _try_start(self, c: Container) -> bool:
        try:
            self._start(c)
            c.pull_backoff = PULL_BACKOFF_START
            return True
        except Exception as e:  # noqa: BLE001 - a start problem leaves the container waiting, as on a node
            if isinstance(e, PodSetupPending):
                reason, message = e.reason, e.message
            else:
                log.exception("starting %s/%s[%s]", self.ns, self.name, c.name)
                reason, message = "CreateContainerError", repr(e)
            if (c.waiting_reason, c.waiting_message) != (reason, message):
                self.k.event(self.pod, "Failed" if "Err" in reason else "FailedMount", message, "Warning")
            c.state = "waiting"
            c.waiting_reason, c.waiting_message = reason, message
            c.restart_at = time.monotonic() + 1.0  # retry (a missing ConfigMap may appear), not in a hot loop
            if isinstance(e, ImagePullFailed):
                c.pull_failed_at = time.monotonic()
                c.restart_at = c.pull_failed_at + c.pull_backoff
                c.pull_backoff = min(c.pull_backoff * 2, PULL_BACKOFF_MAX)
            return False

    # ---------------------------------------------------------------- exit handling
    def _collect(self, c: Container) -> bool:
        """If the container's shim has exited, record its terminated state and clean its cgroup."""
        if c.proc is None or c.state != "running":
            return False
        rc = c.proc.poll()
        if rc is None:
            return False
        # PID 1 is gone, so the kernel has killed the rest of its PID namespace; cgroup.kill catches anything else.
        self.k.kill_cgroup(c.cgroup)
        c.state = "terminated"
        c.finished_at = now_rfc3339()
        if rc < 0:
            c.exit_code, c.signal = 128 - rc, -rc
        else:
            c.exit_code = rc
        err = ""
        with contextlib.suppress(OSError):
            err = c.err_path.read_text().strip()
        oom = c.oom_path.exists()
        self._drop_bundle(c)
        if err:
            c.reason, c.message = "StartError", err
            c.exit_code = 128
        else:
            # As containerd: any OOM kill in the container's memory cgroup during this run makes it OOMKilled.
            c.reason = "OOMKilled" if oom else "Completed" if c.exit_code == 0 else "Error"
            msg = b""
            with contextlib.suppress(OSError):
                msg = c.term_path.read_bytes()[:TERMINATION_MESSAGE_LIMIT]
            if not msg and c.exit_code != 0 and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                with contextlib.suppress(OSError):
                    tail = c.log_path.read_bytes()[-2048:]
                    msg = b"\n".join(tail.splitlines()[-80:])
            c.message = msg.decode("utf-8", "replace")
        c.ready = False
        return True

    def _restart_policy_allows(self, c: Container) -> bool:
        policy = self.spec.get("restartPolicy", "Always")
        if policy == "Always":
            return True
        return policy == "OnFailure" and c.exit_code != 0

    def _schedule_restart(self, c: Container) -> None:
        c.last_state = {"terminated": c.terminated()}
        c.restart_count += 1
        c.state = "waiting"
        c.waiting_reason = "CrashLoopBackOff"
        c.waiting_message = f"back-off {c.backoff:.0f}s restarting failed container={c.name} pod={self.name}"
        c.restart_at = time.monotonic() + c.backoff
        c.backoff = min(c.backoff * 2, 10.0)

    # ---------------------------------------------------------------- killing
    def _signal_main(self, c: Container, sig: int) -> None:
        if c.proc is not None and c.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(c.proc.pid, sig)  # the shim forwards it to PID 1 only

    def _hard_kill(self, c: Container) -> None:
        if c.proc is None or c.proc.poll() is not None:
            self.k.kill_cgroup(c.cgroup)
            return
        if not self.k.kill_cgroup(c.cgroup):
            # No cgroup: killing PID 1 makes the kernel kill its whole PID namespace.
            pid1 = c.pid1()
            for pid in (pid1, c.proc.pid):
                if pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            c.proc.wait(5)

    def _kill_all(self) -> None:
        for c in self.all_containers():
            self._hard_kill(c)
            self._collect(c)

    def _begin_kill(self, grace: float, why: str) -> None:
        deadline = time.monotonic() + grace
        if self.kill_deadline is None:
            self.k.event(self.pod, "Killing", f"Stopping containers ({why}), grace period {grace:.0f}s")
            for c in self.all_containers():
                if c.state == "running" and not c.term_sent:
                    self._signal_main(c, signal.SIGTERM)
                    c.term_sent = True
            self.kill_deadline = deadline
        elif deadline < self.kill_deadline:
            self.kill_deadline = deadline  # a shorter grace period (e.g. a force delete) wins

    # ---------------------------------------------------------------- readiness
    def _probe(self, c: Container) -> None:
        probe = c.spec.get("readinessProbe")
        if not probe or c.state != "running" or time.monotonic() < c.next_probe:
            return
        c.next_probe = time.monotonic() + float(probe.get("periodSeconds", 10))
        timeout = float(probe.get("timeoutSeconds", 1))
        ok = False
        try:
            if "httpGet" in probe:
                hg = probe["httpGet"]
                port = self._port(c, hg["port"])
                host = hg.get("host") or self.pod_ip
                url = f"{hg.get('scheme', 'HTTP').lower()}://{host}:{port}{hg.get('path', '/')}"
                with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - pod-network address
                    ok = 200 <= r.status < 400
            elif "tcpSocket" in probe:
                port = self._port(c, probe["tcpSocket"]["port"])
                with socket.create_connection((self.pod_ip, port), timeout=timeout):
                    ok = True
            elif "exec" in probe:
                pid1 = c.pid1()
                if pid1:
                    r = subprocess.run(
                        ["nsenter", "-t", str(pid1), "-m", "-u", "-i", "-n", "-p", "--", *probe["exec"]["command"]],
                        capture_output=True,
                        timeout=timeout + 1,
                    )
                    ok = r.returncode == 0
        except Exception:  # noqa: BLE001 - any probe error is a failed probe
            ok = False
        if ok:
            c.probe_ok += 1
            c.probe_fail = 0
            if c.probe_ok >= int(probe.get("successThreshold", 1)):
                c.ready = True
        else:
            c.probe_fail += 1
            c.probe_ok = 0
            if c.probe_fail >= int(probe.get("failureThreshold", 3)):
                c.ready = False

    @staticmethod
    def _port(c: Container, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"no port named {port}")

    # ---------------------------------------------------------------- the loop
    def _loop(self) -> None:
        policy = self.spec.get("restartPolicy", "Always")
        ads = self.spec.get("activeDeadlineSeconds")
        start_mono = time.monotonic()
        init_idx = 0
        while True:
            if self.lost:
                # The node is gone: its processes die with it and nobody tells the API anything. Cut the wire
                # first: a dead machine sends no FIN/RST, so peers see silence (timeouts), not "connection closed".
                if self.net is not None:
                    self.k.network.cut(self.net)
                self._kill_all()
                while self.lost and not self.gone:
                    self._wait(0.5)
                if self.gone or self.deleting:
                    return
                self.phase = "Failed"
                self.pod_reason, self.pod_message = "NodeLost", "the node was lost while the pod ran"
                self.terminal = True
                self._patch_status()
                return
            now = time.monotonic()
            if self.shutdown_grace is not None and self.kill_deadline is None:
                self._begin_kill(min(self.shutdown_grace, self._grace_spec()), "node shutdown")
                self.pod_reason = "Terminated"
                self.pod_message = "Pod was terminated in response to imminent node shutdown."
                self._add_condition(
                    "DisruptionTarget",
                    "TerminationByKubelet",
                    "Pod was terminated in response to imminent node shutdown.",
                )
            if self.deleting:
                self._begin_kill(self._grace(), "pod deleted")
            if ads is not None and self.kill_deadline is None and now - start_mono > float(ads):
                self._begin_kill(self._grace_spec(), "active deadline exceeded")
                self.pod_reason = "DeadlineExceeded"
                self.pod_message = f"Pod was active on the node longer than the specified deadline ({ads}s)"
            killing = self.kill_deadline is not None
            if killing and now >= (self.kill_deadline or 0):
                self._kill_all()

            # init containers, one after the other
            if not self.initialized:
                if init_idx >= len(self.init_containers):
                    self.initialized = True
                else:
                    c = self.init_containers[init_idx]
                    self._pull_backoff(c)
                    if c.state == "waiting" and not killing and now >= c.restart_at:
                        self._try_start(c)
                    elif self._collect(c):
                        if c.exit_code == 0:
                            init_idx += 1
                        elif policy != "Never" and not killing:
                            self._schedule_restart(c)
                        else:
                            self.phase = "Failed"
                    if self.phase == "Failed" or (killing and c.state != "running"):
                        self._finish()
                        return
            if self.initialized:
                for c in self.containers:
                    self._pull_backoff(c)
                    if c.state == "waiting" and not killing and now >= c.restart_at:
                        self._try_start(c)
                    elif self._collect(c) and not killing and self._restart_policy_allows(c):
                        self._schedule_restart(c)
                    self._probe(c)
                running = any(c.state == "running" for c in self.containers)
                restarting = any(c.state == "waiting" and c.restart_count > 0 for c in self.containers)
                if running or restarting:
                    self.phase = "Running"
                if all(c.state == "terminated" for c in self.containers):
                    self._finish()
                    return
                if killing and not running:
                    # Killed while a container was waiting (backoff, missing ConfigMap): nothing left to stop.
                    self._finish()
                    return
            self._patch_status()
            self._wait(0.1)

    def _grace_spec(self) -> float:
        return float(self.spec.get("terminationGracePeriodSeconds", 30))

    def _finish(self) -> None:
        """Every container has terminated: the pod reaches its terminal phase and never leaves it."""
        self._kill_all()
        failed = (
            any(c.exit_code != 0 for c in self.containers if c.state == "terminated")
            or any(c.state != "terminated" for c in self.containers)
            or self.phase == "Failed"
        )
        if self.pod_reason in ("Terminated", "DeadlineExceeded"):
            failed = True
        self.phase = "Failed" if failed else "Succeeded"
        for c in self.all_containers():
            if c.state == "waiting":
                # Never started (killed during back-off or setup): report it as terminated, as the kubelet does.
                c.state = "terminated"
                c.exit_code = c.exit_code if c.exit_code is not None else 137
                c.reason = c.reason or "ContainerStatusUnknown"
            c.ready = False
        self.terminal = True
        self._teardown_network()
        self._patch_status()

    def _await_deletion(self) -> None:
        while not self.gone:
            if self.deleting:
                self._delete_pod()
                return
            self._wait(1.0)

    def _delete_pod(self) -> None:
        while self.lost and not self.gone:
            self._wait(0.5)
        if self.gone:
            return
        try:
            self.kube.delete(f"/api/v1/namespaces/{self.ns}/pods/{self.name}", grace_period_seconds=0, uid=self.uid)
        except ApiError as e:
            if e.status not in (404, 409):
                log.warning("deleting pod %s/%s: %s", self.ns, self.name, e)
        self.gone = True

    # ---------------------------------------------------------------- status
    def _add_condition(self, ctype: str, reason: str, message: str) -> None:
        self.extra_conditions = [c for c in self.extra_conditions if c["type"] != ctype]
        self.extra_conditions.append(
            {"type": ctype, "status": "True", "reason": reason, "message": message, "lastTransitionTime": now_rfc3339()}
        )

    def _cond(self, ctype: str, ok: bool, reason: str = "") -> dict[str, Any]:
        status = "True" if ok else "False"
        prev = self.cond_times.get(ctype)
        if prev is None or prev[0] != status:
            prev = (status, now_rfc3339())
            self.cond_times[ctype] = prev
        c: dict[str, Any] = {"type": ctype, "status": status, "lastProbeTime": None, "lastTransitionTime": prev[1]}
        if reason:
            c["reason"] = reason
        return c

    def _status(self) -> dict[str, Any]:
        all_ready = bool(self.containers) and all(c.ready for c in self.containers)
        not_ready_reason = "PodCompleted" if self.terminal else ("" if all_ready else "ContainersNotReady")
        conds = [
            self._cond(
                "Initialized",
                self.initialized or not self.init_containers,
                "" if self.initialized or not self.init_containers else "ContainersNotInitialized",
            ),
            self._cond("Ready", all_ready, not_ready_reason),
            self._cond("ContainersReady", all_ready, not_ready_reason),
            *self.extra_conditions,
        ]
        st: dict[str, Any] = {
            "phase": self.phase,
            "conditions": conds,
            "hostIP": self.k.host_ip,
            "startTime": self.start_time,
            "containerStatuses": [c.status() for c in self.containers],
        }
        if self.init_containers:
            st["initContainerStatuses"] = [c.status() for c in self.init_containers]
        if self.pod_ip:
            st["podIP"] = self.pod_ip
            st["podIPs"] = [{"ip": self.pod_ip}]
        if self.pod_reason:
            st["reason"] = self.pod_reason
            st["message"] = self.pod_message
        return st

    def _patch_status(self) -> None:
        if self.lost or self.gone:
            return
        st = self._status()
        if st == self.last_status:
            return
        try:
            self.kube.patch(f"/api/v1/namespaces/{self.ns}/pods/{self.name}/status", {"status": st})
            self.last_status = st
        except ApiError as e:
            if e.status == 404:
                self.gone = True
            else:
                log.warning("status of %s/%s: %s", self.ns, self.name, e)

    # ---------------------------------------------------------------- teardown
    def _teardown_network(self) -> None:
        if self.net is not None:
            self.k.network.remove_pod(self.net)
            self.net = None

    def _teardown(self) -> None:
        for c in self.all_containers():
            if c.proc is not None and c.proc.poll() is None:
                self._hard_kill(c)
            self._drop_bundle(c)
        self._teardown_network()
        for p in self.mounted_tmpfs:
            subprocess.run(["umount", "-l", str(p)], capture_output=True)
        self.mounted_tmpfs.clear()
        self.k.remove_cgroup(self.uid)
        if not self.k.keep_pod_dirs:
            shutil.rmtree(self.dir, ignore_errors=True)


# ====================================================================== the kubelet
class ProcessKubelet:
    def __init__(
        self,
        kube: Kube,
        state_dir: Path,
        cluster_id: str,
        nodes: list[NodeConfig],
        *,
        network: bool = True,
        image_commands: dict[str, list[str]] | None = None,
        keep_pod_dirs: bool = True,
        heartbeat_seconds: float = 5.0,
        api_tls: tuple[Path, Path, Path] | None = None,
    ):
        self.kube = kube
        self.state_dir = state_dir
        self.cid = cluster_id
        self.node_configs = {n.name: n for n in nodes}
        self.node_state: dict[str, str] = {n.name: "up" for n in nodes}  # up | shutdown | lost
        self.workers: dict[str, PodWorker] = {}
        self.done_uids: set[str] = set()
        self._transitions: dict[tuple[str, str], tuple[str, str]] = {}
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.network = PodNetwork(cluster_id)
        self.use_network = network
        self.host_ip = "127.0.0.1"
        self.dns: ClusterDNS | None = None
        self.records = DnsRecords()
        self.image_commands = dict(image_commands or {})
        self.images = ImageStore()
        self.node_images: dict[str, dict[str, Image]] = {}  # node → reference → image: what each node "has"
        self.runtime = oci.find_runtime()
        self.runtime_root = state_dir / "runc"
        env_map = os.environ.get("DREAMBOOTH_KUBELET_IMAGE_COMMANDS")
        if env_map:
            self.image_commands.update(json.loads(env_map))
        self.ignore_run_as_user = ignore_run_as_user(
            os.environ.get("DREAMBOOTH_KUBELET_IGNORE_RUN_AS_USER"), [sys.executable, sys.prefix, sys.base_prefix]
        )
        if self.ignore_run_as_user:
            log.warning("runAsUser/runAsGroup are ignored: pods run as root (DREAMBOOTH_KUBELET_IGNORE_RUN_AS_USER=%s)",
                        os.environ.get("DREAMBOOTH_KUBELET_IGNORE_RUN_AS_USER", "auto: this Python is not readable by other users"))  # fmt: skip
        self.keep_pod_dirs = keep_pod_dirs
        self.heartbeat_seconds = heartbeat_seconds
        self.python = sys.executable
        self.venv = sys.prefix if sys.prefix != sys.base_prefix else ""
        self.venv_bin = str(Path(sys.executable).parent)
        # Never hide the code the pods run: a private /tmp or /root only when neither holds the venv or sys.path.
        keep = [Path(p).resolve() for p in [sys.prefix, sys.base_prefix, self.venv_bin, *sys.path] if p]
        self.protected_paths = sorted(set(keep))
        self.private_tmp = not any(_under(p, Path("/tmp")) for p in keep)
        self.private_root = not any(_under(p, Path("/root")) for p in keep)
        self.cgroup_root: Path | None = None
        self.reflectors: list[Reflector] = []
        self.events: list[tuple[dict[str, Any], str, str, str]] = []
        self.events_cv = threading.Condition()
        self.control: ThreadingHTTPServer | None = None
        self.forwards: dict[int, socket.socket] = {}
        self.kubernetes_service: tuple[str, int] | None = None  # (ClusterIP, port) pods reach the apiserver at
        # The kubelet API the apiserver proxies pods/log to (kubelet_api.py): (serving cert, key, client CA).
        self.api_tls = api_tls
        self.api_server: ThreadingHTTPServer | None = None
        self.api_port = 10250

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> dict[str, Any]:
        (self.state_dir / "pods").mkdir(parents=True, exist_ok=True)
        root = _find_cgroup_root()
        if root is not None:
            cg = root / f"dbk{self.cid}"
            try:
                cg.mkdir(exist_ok=True)
                self.cgroup_root = cg
            except OSError as e:
                log.warning("no cgroup for pods (%s): falling back to PID-namespace kills", e)
        if self.use_network:
            self.network.setup()
            self.host_ip = self.network.gateway
            self.dns = ClusterDNS(self.host_ip, self.records.lookup)
            self.dns.start()
        if self.api_tls is not None:
            from . import kubelet_api

            self.api_server = kubelet_api.start(self, self.host_ip, *self.api_tls)
            self.api_port = self.api_server.server_address[1]
        for name in self.node_configs:
            self._register_node(name)
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        threading.Thread(target=self._event_loop, name="events", daemon=True).start()
        if self.use_network:
            self.reflectors.append(Reflector(self.kube, "/api/v1/services", self._on_service, "services"))
            self.reflectors.append(Reflector(self.kube, "/api/v1/endpoints", self._on_endpoints, "endpoints"))
        self.reflectors.append(
            Reflector(self.kube, "/api/v1/pods", self._on_pod, "pods", fieldSelector="spec.nodeName!=")
        )
        for r in self.reflectors:
            r.start()
        for r in self.reflectors:
            r.synced.wait(30)
        if self.use_network:
            self._route_kubernetes_service()
        self.control = ThreadingHTTPServer(("127.0.0.1", 0), _control_handler(self))
        threading.Thread(target=self.control.serve_forever, name="control", daemon=True).start()
        info = {
            "pid": os.getpid(),
            "controlPort": self.control.server_address[1],
            "hostIP": self.host_ip,
            "subnet": str(self.network.subnet) if self.use_network else None,
            "bridge": self.network.bridge,
            "cgroup": str(self.cgroup_root) if self.cgroup_root else None,
            "nodes": list(self.node_configs),
        }
        tmp = self.state_dir / "kubelet.json.tmp"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.state_dir / "kubelet.json")
        log.info("process kubelet ready: %s", info)
        return info

    def stop(self) -> None:
        """Kill every pod at once (the cluster is going away) and remove what we made on the host."""
        self.stopping.set()
        for r in self.reflectors:
            r.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.lost = True  # no more API writes
            w._kill_all()
            w._teardown()
        for srv in self.forwards.values():
            with contextlib.suppress(OSError):
                srv.close()
        if self.dns:
            self.dns.stop()
        if self.use_network:
            self.network.teardown()
        if self.cgroup_root is not None:
            remove_cgroup_tree(self.cgroup_root)
        for d in v1_cgroup_dirs(f"dbk{self.cid}"):
            remove_cgroup_tree(d)
        if self.control:
            self.control.shutdown()

    # ---------------------------------------------------------------- cgroups
    def make_cgroup(self, uid: str, container: str | None = None) -> Path | None:
        if self.cgroup_root is None:
            return None
        p = self.cgroup_root / uid if container is None else self.cgroup_root / uid / container
        try:
            p.mkdir(exist_ok=True)
        except OSError as e:
            log.warning("cgroup %s: %s", p, e)
            return None
        return p

    @staticmethod
    def cgroup_pids(cg: Path | None) -> list[int]:
        if cg is None:
            return []
        try:
            return [int(x) for x in (cg / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def kill_cgroup(self, cg: Path | None) -> bool:
        """SIGKILL every process in a cgroup and wait until it is empty; False when there is no cgroup."""
        if cg is None or not cg.exists():
            return False
        kill_file = cg / "cgroup.kill"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = self.cgroup_pids(cg)
            if not pids:
                return True
            if kill_file.exists():
                with contextlib.suppress(OSError):
                    kill_file.write_text("1")
            else:
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        log.warning("cgroup %s still has processes %s", cg, self.cgroup_pids(cg))
        return True

    def remove_cgroup(self, uid: str) -> None:
        if self.cgroup_root is not None:
            remove_cgroup_tree(self.cgroup_root / uid)
        # runc made the image containers' cgroup v1 groups (memory limit) and removes only the leaves.
        for d in v1_cgroup_dirs(f"dbk{self.cid}/{uid}"):
            remove_cgroup_tree(d)

    # ---------------------------------------------------------------- images
    def entrypoint_for(self, image: str) -> list[str]:
        best = ""
        for prefix in self.image_commands:
            if image.startswith(prefix) and len(prefix) > len(best):
                best = prefix
        return list(self.image_commands.get(best, [])) if best else []

    # ---------------------------------------------------------------- nodes
    def _node_object(self, name: str) -> dict[str, Any]:
        cfg = self.node_configs[name]
        labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "beta.kubernetes.io/os": "linux",
            "beta.kubernetes.io/arch": "amd64",
            "dreambooth.dev/process-kubelet": "true",
            **cfg.labels,
        }
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": labels},
            "spec": {"taints": cfg.taints} if cfg.taints else {},
            "status": self._node_status(name),
        }

    def _node_status(
        self,
        name: str,
        ready: str = "True",
        reason: str = "KubeletReady",
        message: str = "kubelet is posting ready status",
    ) -> dict[str, Any]:
        cfg = self.node_configs[name]
        t = now_rfc3339()
        cond = [
            {
                "type": "MemoryPressure",
                "status": "False",
                "reason": "KubeletHasSufficientMemory",
                "message": "kubelet has sufficient memory available",
            },
            {
                "type": "DiskPressure",
                "status": "False",
                "reason": "KubeletHasNoDiskPressure",
                "message": "kubelet has no disk pressure",
            },
            {
                "type": "PIDPressure",
                "status": "False",
                "reason": "KubeletHasSufficientPID",
                "message": "kubelet has sufficient PID available",
            },
            {"type": "Ready", "status": ready, "reason": reason, "message": message},
        ]
        for c in cond:
            c["lastHeartbeatTime"] = t
            c["lastTransitionTime"] = self._transition(name, c["type"], c["status"], t)
        return {
            "capacity": cfg.capacity(),
            "allocatable": cfg.capacity(),
            "conditions": cond,
            "addresses": [{"type": "InternalIP", "address": self.host_ip}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.api_port}},
            "nodeInfo": {
                "machineID": name,
                "systemUUID": name,
                "bootID": self.cid,
                "kernelVersion": os.uname().release,
                "osImage": "process-kubelet",
                "containerRuntimeVersion": "process://1",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": KUBELET_VERSION,
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def _transition(self, node: str, ctype: str, status: str, t: str) -> str:
        prev = self._transitions.get((node, ctype))
        if prev is None or prev[0] != status:
            prev = (status, t)
            self._transitions[(node, ctype)] = prev
        return prev[1]

    def _register_node(self, name: str) -> None:
        body = self._node_object(name)
        try:
            self.kube.create("/api/v1/nodes", body)
        except ApiError as e:
            if e.status != 409:
                raise
            self.kube.patch(
                f"/api/v1/nodes/{name}", {"metadata": {"labels": body["metadata"]["labels"]}, "spec": body["spec"]}
            )
        self.kube.patch(f"/api/v1/nodes/{name}/status", {"status": body["status"]})

    def _post_node_status(self, name: str, **kw: str) -> None:
        try:
            self.kube.patch(f"/api/v1/nodes/{name}/status", {"status": self._node_status(name, **kw)})
        except ApiError as e:
            if e.status == 404:
                self._register_node(name)
            else:
                raise

    def _renew_lease(self, name: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        spec = {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now_micro()}
        try:
            self.kube.patch(path, {"spec": spec}, "merge")
        except ApiError as e:
            if e.status != 404:
                raise
            self.kube.create(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": name, "namespace": "kube-node-lease"},
                    "spec": spec,
                },
            )

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(self.heartbeat_seconds):
            for name, state in list(self.node_state.items()):
                if state != "up":
                    continue
                try:
                    self._post_node_status(name)
                    self._renew_lease(name)
                except Exception as e:  # noqa: BLE001 - keep beating for the other nodes
                    log.warning("heartbeat %s: %r", name, e)

    # ---------------------------------------------------------------- test hooks on nodes
    def node_shutdown(self, name: str, grace: float) -> None:
        """Graceful node shutdown: pods get SIGTERM, then end Failed with reason Terminated; the node goes away."""
        self.node_state[name] = "shutdown"
        self._post_node_status(name, ready="False", reason="KubeletNotReady", message="node is shutting down")
        with self.lock:
            workers = [w for w in self.workers.values() if w.node == name]
        for w in workers:
            w.request_shutdown(grace)

    def node_lost(self, name: str, mark_unknown: bool) -> None:
        """The node dies: its processes are killed, heartbeats stop, nothing more is written for its pods."""
        self.node_state[name] = "lost"
        with self.lock:
            workers = [w for w in self.workers.values() if w.node == name]
        for w in workers:
            w.set_lost(True)
        if mark_unknown:
            # What the node lifecycle controller writes after --node-monitor-grace-period, without the wait.
            cond = [
                {
                    "type": t,
                    "status": "Unknown",
                    "reason": "NodeStatusUnknown",
                    "message": "Kubelet stopped posting node status.",
                    "lastTransitionTime": now_rfc3339(),
                }
                for t in ("Ready", "MemoryPressure", "DiskPressure", "PIDPressure")
            ]
            self.kube.patch(f"/api/v1/nodes/{name}/status", {"status": {"conditions": cond}})

    def node_recover(self, name: str) -> None:
        self.node_state[name] = "up"
        self._post_node_status(name)
        with self.lock:
            workers = [w for w in self.workers.values() if w.node == name]
        for w in workers:
            w.set_lost(False)

    def set_capacity(self, name: str, resources: dict[str, str]) -> None:
        cfg = self.node_configs[name]
        for k, v in resources.items():
            if k == "cpu":
                cfg.cpu = v
            elif k == "memory":
                cfg.memory = v
            elif k == "ephemeral-storage":
                cfg.ephemeral_storage = v
            elif k == "nvidia.com/gpu":
                cfg.gpus = int(v)
                cfg.gpu_resource = True
            elif k == "pods":
                cfg.pods = int(v)
        self._post_node_status(name)

    # ---------------------------------------------------------------- watches
    def _on_pod(self, t: str, pod: dict[str, Any]) -> None:
        node = pod["spec"].get("nodeName")
        if node not in self.node_configs or self.stopping.is_set():
            return
        uid = pod["metadata"]["uid"]
        with self.lock:
            w = self.workers.get(uid)
            if t == "DELETED":
                self.done_uids.discard(uid)
                if w:
                    w.mark_gone(pod)
                return
            if w is None:
                if uid in self.done_uids:
                    # Its worker has finished: never run a pod twice, only complete a pending deletion.
                    if pod["metadata"].get("deletionTimestamp"):
                        with contextlib.suppress(ApiError):
                            self.kube.delete(
                                f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods/{pod['metadata']['name']}",
                                grace_period_seconds=0,
                                uid=uid,
                            )
                    return
                w = PodWorker(self, pod)
                if self.node_state.get(node) == "lost":
                    w.lost = True
                self.workers[uid] = w
                w.start()
            else:
                w.update(pod)

    def forget(self, uid: str) -> None:
        with self.lock:
            w = self.workers.pop(uid, None)
            if w is not None and not w.gone:
                self.done_uids.add(uid)

    def _on_service(self, t: str, obj: dict[str, Any]) -> None:
        self.records.set_service(obj, deleted=(t == "DELETED"))

    def _on_endpoints(self, t: str, obj: dict[str, Any]) -> None:
        self.records.set_endpoints(obj, deleted=(t == "DELETED"))

    # ---------------------------------------------------------------- events
    def event(self, pod: dict[str, Any], reason: str, message: str, etype: str = "Normal") -> None:
        with self.events_cv:
            self.events.append((pod, reason, message, etype))
            self.events_cv.notify()

    def _event_loop(self) -> None:
        while not self.stopping.is_set():
            with self.events_cv:
                while not self.events:
                    self.events_cv.wait(1)
                    if self.stopping.is_set():
                        return
                pod, reason, message, etype = self.events.pop(0)
            md = pod["metadata"]
            t = now_rfc3339()
            body = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{md['name']}.", "namespace": md["namespace"]},
                "involvedObject": {
                    "kind": "Pod",
                    "namespace": md["namespace"],
                    "name": md["name"],
                    "uid": md["uid"],
                    "apiVersion": "v1",
                },
                "reason": reason,
                "message": message,
                "type": etype,
                "source": {"component": "kubelet", "host": pod["spec"].get("nodeName", "")},
                "firstTimestamp": t,
                "lastTimestamp": t,
                "count": 1,
            }
            with contextlib.suppress(Exception):
                self.kube.create(f"/api/v1/namespaces/{md['namespace']}/events", body)

    # ---------------------------------------------------------------- host port forwarding
    def expose_host_port(self, port: int, target_port: int | None = None) -> None:
        """Forward <gateway>:port (reachable from every pod) to 127.0.0.1:target_port on this machine, so a
        server a test runs on loopback (S3, an operator webhook...) is reachable from pods."""
        target = target_port or port
        with self.lock:
            if port in self.forwards:
                return
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((self.host_ip, port))
            srv.listen(64)
            self.forwards[port] = srv
        threading.Thread(target=self._forward_accept, args=(srv, target), name=f"forward-{port}", daemon=True).start()

    def _forward_accept(self, srv: socket.socket, target: int) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", target), timeout=10)
                up.settimeout(None)
            except OSError:
                conn.close()
                continue
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def _route_kubernetes_service(self) -> None:
        """Stand in for kube-proxy for the one Service pods need: the ``kubernetes`` Service's ClusterIP:443
        (10.0.0.1, the first address of --service-cluster-ip-range, already in the apiserver's certificate) is
        DNATed on this cluster's bridge to <gateway>:<apiserver port>, which the kubelet forwards to the
        apiserver on loopback. Pods then use in-cluster config exactly as on a real cluster."""
        try:
            svc = self.kube.get("/api/v1/namespaces/default/services/kubernetes")
            ip = svc["spec"]["clusterIP"]
            port = int(svc["spec"]["ports"][0]["port"])
        except (ApiError, KeyError, IndexError, ValueError) as e:
            log.warning("no kubernetes Service to route (%s): pods get no in-cluster API address", e)
            return
        api_port = urllib.parse.urlsplit(self.kube.server).port or 443
        self.expose_host_port(api_port)
        err = add_service_dnat(self.cid, ip, port, f"{self.host_ip}:{api_port}")
        if err:
            log.warning("pods cannot reach the apiserver at %s:%s: %s", ip, port, err)
            return
        self.kubernetes_service = (ip, port)

    def pods_info(self) -> list[dict[str, Any]]:
        with self.lock:
            return [w.info() for w in self.workers.values()]


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            src.shutdown(socket.SHUT_RD)


def _under(p: Path, root: Path) -> bool:
    try:
        p.relative_to(root)
        return True
    except ValueError:
        return False


def v1_cgroup_dirs(rel: str) -> list[Path]:
    """``rel`` under this process's own group in every cgroup v1 hierarchy: where runc puts a relative
    cgroupsPath (under the memory group the kubelet itself runs in, so pods count against it)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    paths = {}
    for line in own:
        _, controllers, path = line.split(":", 2)
        for ctrl in controllers.split(","):
            if ctrl:
                paths[ctrl] = path
    out = []
    for line in mounts:
        parts = line.split()
        if len(parts) < 4 or parts[2] != "cgroup":
            continue
        ctrls = [o for o in parts[3].split(",") if o in paths]
        if ctrls:
            d = Path(parts[1] + paths[ctrls[0]].rstrip("/")) / rel
            if d.exists():
                out.append(d)
    return out


def remove_cgroup_tree(root: Path) -> None:
    """Kill and remove a cgroup and its children, deepest first (rmdir only works on empty cgroups)."""
    if not root.exists():
        return
    for p in sorted((d for d in root.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)) + [root]:
        kill = p / "cgroup.kill"
        if kill.exists():
            with contextlib.suppress(OSError):
                kill.write_text("1")
        for _ in range(100):
            try:
                p.rmdir()
                break
            except OSError:
                time.sleep(0.02)


def _control_handler(k: ProcessKubelet) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("control: " + fmt, *args)

        def _send(self, code: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            if self.path == "/healthz":
                self._send(200, {"ok": True})
            elif self.path == "/pods":
                self._send(200, k.pods_info())
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802 - http.server naming
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n) or b"{}")
            parts = self.path.strip("/").split("/")
            try:
                if len(parts) == 3 and parts[0] == "nodes" and parts[1] in k.node_configs:
                    node, action = parts[1], parts[2]
                    if action == "shutdown":
                        k.node_shutdown(node, float(body.get("graceSeconds", 30)))
                    elif action == "lost":
                        k.node_lost(node, bool(body.get("markUnknown", True)))
                    elif action == "recover":
                        k.node_recover(node)
                    elif action == "capacity":
                        k.set_capacity(node, body.get("resources") or {})
                    else:
                        self._send(404, {"error": f"unknown action {action}"})
                        return
                    self._send(200, {"ok": True})
                elif parts == ["expose"]:
                    k.expose_host_port(int(body["port"]), body.get("targetPort"))
                    self._send(200, {"ok": True, "address": f"{k.host_ip}:{body['port']}"})
                else:
                    self._send(404, {"error": "not found"})
            except Exception as e:  # noqa: BLE001 - report to the test instead of dropping the connection
                self._send(500, {"error": repr(e)})

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="process kubelet")
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument("--cluster-id", required=True)
    p.add_argument("--nodes", required=True, help="JSON list of NodeConfig dicts")
    p.add_argument("--no-network", action="store_true")
    p.add_argument("--image-commands", default="{}", help="JSON {image prefix: [entrypoint...]}")
    p.add_argument("--api-tls", nargs=3, type=Path, metavar=("CERT", "KEY", "CLIENT_CA"),
                   help="serve the kubelet API (containerLogs) with this serving pair, for clients the CA signed")  # fmt: skip
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    kube = Kube.from_kubeconfig(a.kubeconfig)
    nodes = [NodeConfig.from_dict(d) for d in json.loads(a.nodes)]
    kubelet = ProcessKubelet(
        kube,
        a.state_dir,
        a.cluster_id,
        nodes,
        network=not a.no_network,
        image_commands=json.loads(a.image_commands),
        api_tls=tuple(a.api_tls) if a.api_tls else None,
    )
    done = threading.Event()

    def on_signal(sig: int, _frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        kubelet.start()
        done.wait()
    finally:
        kubelet.stop()
        log.info("process kubelet stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())  # prefer `python -m k8s_harness.run_kubelet` (no double import of this module)
