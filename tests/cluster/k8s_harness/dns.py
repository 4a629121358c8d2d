"""A minimal cluster DNS (what CoreDNS's kubernetes plugin answers), served on the pod network's gateway.

Pods get ``nameserver <gateway>`` and the usual ``search <ns>.svc.cluster.local svc.cluster.local cluster.local``
with ``ndots:5``. Answers come from the Services and Endpoints the controller-manager maintains, so DNS
behaves like a real cluster's, including its failure modes:

* ``<svc>.<ns>.svc.cluster.local``: a headless Service → the ready endpoint addresses (all of them when the
  Service has ``publishNotReadyAddresses: true``, since the endpoints controller then lists them as ready);
  a ClusterIP Service → its clusterIP (there is no kube-proxy: nothing answers on it).
* ``<hostname>.<svc>.<ns>.svc.cluster.local``: only for endpoint addresses whose ``hostname`` is set, which the
  endpoints controller does only when the pod sets ``hostname`` and ``subdomain`` = the Service name.
* Anything else: NXDOMAIN, at once (there is no upstream: the test machine is offline).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

DOMAIN = "cluster.local"
TYPE_A = 1
CLASS_IN = 1


def _parse_qname(data: bytes, off: int) -> tuple[str, int]:
    labels = []
    while True:
        n = data[off]
        off += 1
        if n == 0:
            break
        if n & 0xC0:
            raise ValueError("compressed name in question")
        labels.append(data[off : off + n].decode("ascii", "replace"))
        off += n
    return ".".join(labels), off


def build_response(query: bytes, lookup: Callable[[str], list[str] | None]) -> bytes | None:
    if len(query) < 12:
        return None
    qid, flags, qdcount = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or qdcount != 1:
        return None
    try:
        name, off = _parse_qname(query, 12)
        qtype, qclass = struct.unpack("!HH", query[off : off + 4])
    except (ValueError, IndexError, struct.error):
        return None
    question = query[12 : off + 4]
    ips = lookup(name.lower().rstrip("."))
    rd = flags & 0x0100
    answers = b""
    if ips is None:
        rcode, ancount = 3, 0  # NXDOMAIN
    else:
        rcode = 0
        ancount = 0
        if qtype == TYPE_A and qclass == CLASS_IN:
            for ip in ips:
                answers += struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 5, 4) + socket.inet_aton(ip)
                ancount += 1
    # QR, AA, RA set; RD echoed.
    out_flags = 0x8000 | 0x0400 | 0x0080 | rd | rcode
    return struct.pack("!HHHHHH", qid, out_flags, 1, ancount, 0, 0) + question + answers


class ClusterDNS:
    """UDP DNS server thread. ``lookup(name)`` returns A records, [] for a name without A data, None if unknown."""

    def __init__(self, address: str, lookup: Callable[[str], list[str] | None], port: int = 53):
        self.address = address
        self.port = port
        self.lookup = lookup
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="cluster-dns", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                resp = build_response(data, self.lookup)
            except Exception:  # noqa: BLE001 - a bad packet must not kill DNS for every pod
                resp = None
            if resp:
                with contextlib.suppress(OSError):
                    self.sock.sendto(resp, peer)

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()


class DnsRecords:
    """Service/Endpoints state → answers. Fed by the kubelet's watches (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._services: dict[tuple[str, str], dict] = {}
        self._endpoints: dict[tuple[str, str], dict] = {}

    def set_service(self, obj: dict, deleted: bool = False) -> None:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        with self._lock:
            if deleted:
                self._services.pop(key, None)
            else:
                self._services[key] = obj

    def set_endpoints(self, obj: dict, deleted: bool = False) -> None:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        with self._lock:
            if deleted:
                self._endpoints.pop(key, None)
            else:
                self._endpoints[key] = obj

    def lookup(self, name: str) -> list[str] | None:
        suffix = f".svc.{DOMAIN}"
        if not name.endswith(suffix):
            return None
        parts = name[: -len(suffix)].split(".")
        with self._lock:
            if len(parts) == 2:
                svc_name, ns = parts
                svc = self._services.get((ns, svc_name))
                if svc is None:
                    return None
                cluster_ip = (svc.get("spec") or {}).get("clusterIP")
                if cluster_ip and cluster_ip != "None":
                    return [cluster_ip]
                return self._addresses(ns, svc_name, None)
            if len(parts) == 3:
                host, svc_name, ns = parts
                if (ns, svc_name) not in self._services:
                    return None
                ips = self._addresses(ns, svc_name, host)
                return ips or None
        return None

    def _addresses(self, ns: str, svc: str, hostname: str | None) -> list[str]:
        ep = self._endpoints.get((ns, svc)) or {}
        ips: list[str] = []
        for subset in ep.get("subsets") or []:
            for addr in subset.get("addresses") or []:
                if (hostname is None or addr.get("hostname") == hostname) and addr["ip"] not in ips:
                    ips.append(addr["ip"])
        return ips
