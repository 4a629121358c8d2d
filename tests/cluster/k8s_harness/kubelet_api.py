"""The part of the kubelet's own HTTPS API that the apiserver proxies to: ``GET /containerLogs/{ns}/{pod}/{container}``
(what ``kubectl logs`` and a client's ``pods/log`` read).

As on a kubeadm node: TLS with the node's serving certificate (the apiserver does not verify it without
``--kubelet-certificate-authority``), and only clients whose certificate the cluster CA signed (the apiserver's
``--kubelet-client-certificate``). Not done: the kubelet's SubjectAccessReview authorization of that client,
``exec``/``attach``/``portForward``, ``sinceSeconds``/``sinceTime``/``timestamps``.
The port is a free one, published in the Node's ``status.daemonEndpoints.kubeletEndpoint.Port``, which the
apiserver dials (with ``--kubelet-preferred-address-types=InternalIP``: the node's ``hostIP``).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
import urllib.parse
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .kubelet import ProcessKubelet

log = logging.getLogger("kubelet-api")
FOLLOW_POLL_SECONDS = 0.2


def _find(k: ProcessKubelet, ns: str, pod: str, container: str) -> tuple[Any, Any] | None:
    with k.lock:
        workers = [w for w in k.workers.values() if w.ns == ns and w.name == pod]
    for w in workers:
        for c in w.all_containers():
            if c.name == container:
                return w, c
    return None


def _tail(path: Path, lines: int) -> bytes:
    with open(path, "rb") as f:
        return b"".join(deque(f, maxlen=lines))


def _handler(k: ProcessKubelet) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("kubelet api: " + fmt, *args)

        def _error(self, code: int, text: str) -> None:
            data = text.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            url = urllib.parse.urlsplit(self.path)
            q = {key: v[-1] for key, v in urllib.parse.parse_qs(url.query).items()}
            parts = url.path.strip("/").split("/")
            if len(parts) != 4 or parts[0] != "containerLogs":
                self._error(404, f"not served by the process kubelet: {url.path}")
                return
            found = _find(k, parts[1], parts[2], parts[3])
            if found is None:
                self._error(404, f"container {parts[3]} of pod {parts[1]}/{parts[2]} is not on this kubelet")
                return
            worker, c = found
            path = worker.dir / f"{c.name}.previous.log" if q.get("previous") == "true" else c.log_path
            if not path.exists():
                self._error(400, f'container "{c.name}" in pod "{parts[2]}" is waiting to start')
                return
            follow = q.get("follow") == "true"
            limit = int(q["limitBytes"]) if q.get("limitBytes") else None
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Connection", "close")
            self.end_headers()
            sent = 0

            def send(data: bytes) -> bool:
                nonlocal sent
                if limit is not None:
                    data = data[: max(0, limit - sent)]
                if data:
                    self.wfile.write(data)
                    self.wfile.flush()
                    sent += len(data)
                return limit is None or sent < limit

            try:
                if q.get("tailLines"):
                    head = _tail(path, int(q["tailLines"]))
                    offset = path.stat().st_size
                    if not send(head):
                        return
                else:
                    offset = 0
                while True:
                    with open(path, "rb") as f:
                        f.seek(offset)
                        data = f.read()
                    offset += len(data)
                    if data and not send(data):
                        return
                    # Follow until the container ends (then what it wrote last is already out) or the pod goes.
                    if not follow or c.state == "terminated" or k.stopping.is_set() or worker.uid not in k.workers:
                        if data:
                            continue
                        return
                    time.sleep(FOLLOW_POLL_SECONDS)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                return  # the client went away

    return Handler


def start(k: ProcessKubelet, host: str, cert: Path, key: Path, client_ca: Path) -> ThreadingHTTPServer:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(str(client_ca))
    server = ThreadingHTTPServer((host, 0), _handler(k))
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="kubelet-api", daemon=True).start()
    log.info("kubelet API (containerLogs) on https://%s:%d", host, server.server_address[1])
    return server
