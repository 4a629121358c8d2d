"""The pod network of one test cluster: a Linux bridge on a private /24 and one network namespace per pod.

Every name made here carries the cluster id (``dbk<id>`` bridge, ``dbk<id>-<n>`` namespaces, ``v<id><n>`` veth
ends), so two clusters on one machine never touch each other's objects, and cleanup of a crashed cluster can
find exactly what it made. The subnet is picked from 10.213.0.0/16 among /24s no route on the host uses yet.
Only the addresses created here (the bridge gateway and the pods) are ever targeted.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

NETNS_DIR = Path("/var/run/netns")
SUBNET_POOL = ipaddress.ip_network("10.213.0.0/16")
LOCK = Path("/run/lock/dreambooth-k8s-net.lock")


def _ip(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {r.stderr.strip()} {stdin or ''}")
    return r


def _used_networks() -> list[ipaddress.IPv4Network]:
    r = _ip("-j", "-4", "route", "show", "table", "all", check=False)
    nets: list[ipaddress.IPv4Network] = []
    try:
        routes = json.loads(r.stdout or "[]")
    except ValueError:
        routes = []
    for route in routes:
        dst = route.get("dst", "")
        if dst and dst != "default":
            try:
                nets.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
            except ValueError:
                continue
    return nets


@dataclass
class PodNet:
    netns: str  # name under /var/run/netns
    ip: str
    veth: str

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)


class PodNetwork:
    def __init__(self, cluster_id: str, subnet: str | None = None):
        self.cid = cluster_id
        self.bridge = f"dbk{cluster_id}"
        self._lock = threading.Lock()
        self._counter = 0
        self._next_host = 2
        self._in_use: set[str] = set()
        self.subnet = ipaddress.ip_network(subnet) if subnet else None
        self.gateway = ""

    # ------------------------------------------------------------------ bridge
    def setup(self) -> None:
        # Two clusters starting at the same moment must not both pick the first free /24: choosing and claiming
        # (the bridge's route) happen under one machine-wide lock.
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        with open(LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._setup_locked()

    def _setup_locked(self) -> None:
        if self.subnet is None:
            used = _used_networks()
            for cand in SUBNET_POOL.subnets(new_prefix=24):
                if cand.network_address.packed[2] == 0:
                    continue  # skip 10.213.0.0/24: too likely to be someone's default choice
                if not any(cand.overlaps(u) for u in used if u.prefixlen > 0):
                    self.subnet = cand
                    break
            else:
                raise RuntimeError("no free /24 left in 10.213.0.0/16 for the pod network")
        assert self.subnet is not None
        self.gateway = str(self.subnet.network_address + 1)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    # ------------------------------------------------------------------ pods
    def _allocate_ip(self) -> str:
        assert self.subnet is not None
        size = self.subnet.num_addresses
        # Round-robin over the /24, so a freed address is not handed out again at once (a terminated pod keeps
        # showing its podIP in status).
        for _ in range(size):
            host = self._next_host
            self._next_host = host + 1 if host + 1 < size - 1 else 2
            ip = str(self.subnet.network_address + host)
            if ip not in self._in_use:
                self._in_use.add(ip)
                return ip
        raise RuntimeError(f"pod network {self.subnet} is full")

    def add_pod(self) -> PodNet:
        with self._lock:
            self._counter += 1
            n = self._counter
            ip = self._allocate_ip()
        assert self.subnet is not None
        ns = f"dbk{self.cid}-{n}"
        veth = f"v{self.cid}{n:x}"
        try:
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip(
                "-n",
                ns,
                "-batch",
                "-",
                stdin=(
                    "link set lo up\n"
                    f"addr add {ip}/{self.subnet.prefixlen} dev eth0\n"
                    "link set eth0 up\n"
                    f"route add default via {self.gateway}\n"
                ),
            )
        except Exception:
            self.remove_pod(PodNet(ns, ip, veth))
            raise
        return PodNet(ns, ip, veth)

    def cut(self, pn: PodNet) -> None:
        """Pull the pod's cable: the host end of its veth goes down, so nothing it sends reaches anyone."""
        _ip("link", "set", pn.veth, "down", check=False)

    def remove_pod(self, pn: PodNet) -> None:
        # Deleting the namespace deletes eth0 and with it the host end of the veth pair.
        _ip("netns", "del", pn.netns, check=False)
        _ip("link", "del", pn.veth, check=False)
        with self._lock:
            self._in_use.discard(pn.ip)

    # ------------------------------------------------------------------ teardown
    def teardown(self) -> None:
        cleanup(self.cid)


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", "-t", "nat", *args], capture_output=True, text=True)


def add_service_dnat(cluster_id: str, vip: str, vport: int, to: str) -> str | None:
    """What kube-proxy does for one ClusterIP Service: packets from this cluster's pods to ``vip:vport`` go to
    ``to`` (ip:port). Only this cluster's bridge is matched, and the rule carries the cluster id for cleanup.
    Returns why it could not be added, or None."""
    rule = ["PREROUTING", "-i", f"dbk{cluster_id}", "-d", f"{vip}/32", "-p", "tcp", "--dport", str(vport),
            "-m", "comment", "--comment", f"dbk{cluster_id}", "-j", "DNAT", "--to-destination", to]  # fmt: skip
    try:
        r = _iptables("-A", *rule)
    except FileNotFoundError:
        return "iptables is not installed (apt-get install iptables)"
    return None if r.returncode == 0 else f"iptables: {r.stderr.strip()}"


def _remove_service_dnat(cluster_id: str) -> None:
    try:
        r = _iptables("-S", "PREROUTING")
    except FileNotFoundError:
        return
    for line in r.stdout.splitlines():
        if f"--comment dbk{cluster_id} " in line + " " and line.startswith("-A "):
            # `-S` prints rules as they were added: the same words with -D delete exactly that rule.
            _iptables("-D", *line.split()[1:])


def cleanup(cluster_id: str) -> None:
    """Remove every namespace, veth, the bridge and the Service NAT rules of one cluster id (also after a
    crash)."""
    _remove_service_dnat(cluster_id)
    prefix = f"dbk{cluster_id}-"
    if NETNS_DIR.is_dir():
        for p in NETNS_DIR.iterdir():
            if p.name.startswith(prefix):
                _ip("netns", "del", p.name, check=False)
    r = _ip("-j", "link", "show", check=False)
    try:
        links = json.loads(r.stdout or "[]")
    except ValueError:
        links = []
    for link in links:
        name = link.get("ifname", "")
        if name.startswith(f"v{cluster_id}"):
            _ip("link", "del", name, check=False)
    _ip("link", "del", f"dbk{cluster_id}", check=False)
