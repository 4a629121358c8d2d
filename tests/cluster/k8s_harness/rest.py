"""A tiny, dict-based Kubernetes REST client (requests + client certs or bearer token).

The harness and the process kubelet use this instead of the generated ``kubernetes`` client: plain dicts,
explicit patch types (strategic merge for pod status, so conditions written by others survive), and
watch streams we fully control (reconnects, 410 Gone). Tests may use either this or the official client.
"""

from __future__ import annotations

import base64
import json
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import urllib3
import yaml

PATCH_TYPES = {
    "strategic": "application/strategic-merge-patch+json",
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
}


class ApiError(Exception):
    """A non-2xx answer from the apiserver; ``status`` is the HTTP code, ``body`` the Status object."""

    def __init__(self, status: int, body: dict[str, Any] | str, method: str, path: str):
        self.status = status
        self.body = body
        self.method = method
        self.path = path
        msg = body.get("message", "") if isinstance(body, dict) else str(body)[:500]
        self.reason = body.get("reason", "") if isinstance(body, dict) else ""
        self.message = msg
        super().__init__(f"{method} {path}: {status} {self.reason}: {msg}")


class Kube:
    """Minimal client bound to one identity. Thread-safe enough: one ``requests.Session`` per thread."""

    def __init__(
        self,
        server: str,
        ca_file: str | Path,
        *,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        token: str | None = None,
        timeout: float = 30.0,
    ):
        self.server = server.rstrip("/")
        self.ca_file = str(ca_file)
        self.cert = (str(cert_file), str(key_file)) if cert_file and key_file else None
        self.token = token
        self.timeout = timeout
        self._local = threading.local()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_kubeconfig(cls, path: str | Path) -> Kube:
        """Load the current context of a kubeconfig (inline ``*-data`` fields are written to a temp folder)."""
        cfg = yaml.safe_load(Path(path).read_text())
        ctx_name = cfg["current-context"]
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
        tmp = Path(tempfile.mkdtemp(prefix="kubecfg-"))

        def materialise(obj: dict[str, Any], key: str, name: str) -> str | None:
            if obj.get(f"{key}-data"):
                p = tmp / name
                p.write_bytes(base64.b64decode(obj[f"{key}-data"]))
                p.chmod(0o600)
                return str(p)
            return obj.get(key)

        ca = materialise(cluster, "certificate-authority", "ca.crt")
        if ca is None:
            raise ValueError(f"{path}: cluster has no certificate-authority")
        return cls(
            cluster["server"],
            ca,
            cert_file=materialise(user, "client-certificate", "client.crt"),
            key_file=materialise(user, "client-key", "client.key"),
            token=user.get("token"),
        )

    # ------------------------------------------------------------------ plumbing
    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            # Never take CA bundles or proxies from the environment (REQUESTS_CA_BUNDLE would even override
            # `verify`): this client only ever talks to the local test apiserver.
            s.trust_env = False
            s.verify = self.ca_file
            if self.cert:
                s.cert = self.cert
            if self.token:
                s.headers["Authorization"] = f"Bearer {self.token}"
            s.headers["Accept"] = "application/json"
            s.headers["User-Agent"] = "dreambooth-k8s-harness"
            self._local.session = s
        return s

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> Any:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        r = self._session().request(
            method, self.server + path, data=data, params=params, headers=headers, timeout=timeout or self.timeout
        )
        if r.status_code >= 300:
            try:
                err: dict[str, Any] | str = r.json()
            except ValueError:
                err = r.text
            raise ApiError(r.status_code, err, method, path)
        if not r.content:
            return None
        return r.json()

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def create(self, path: str, body: dict[str, Any], **params: Any) -> Any:
        return self.request("POST", path, body=body, params=params or None)

    def replace(self, path: str, body: dict[str, Any]) -> Any:
        return self.request("PUT", path, body=body)

    def patch(self, path: str, body: Any, patch_type: str = "strategic") -> Any:
        return self.request("PATCH", path, body=body, content_type=PATCH_TYPES[patch_type])

    def delete(
        self,
        path: str,
        *,
        grace_period_seconds: int | None = None,
        body: dict[str, Any] | None = None,
        propagation: str | None = None,
        uid: str | None = None,
    ) -> Any:
        opts: dict[str, Any] = dict(body or {})
        opts.setdefault("kind", "DeleteOptions")
        opts.setdefault("apiVersion", "v1")
        if grace_period_seconds is not None:
            opts["gracePeriodSeconds"] = grace_period_seconds
        if propagation:
            opts["propagationPolicy"] = propagation
        if uid:
            opts["preconditions"] = {"uid": uid}
        return self.request("DELETE", path, body=opts)

    def exists(self, path: str) -> bool:
        try:
            self.get(path)
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    def watch(
        self, path: str, resource_version: str, *, timeout_seconds: int = 60, **params: Any
    ) -> Iterator[dict[str, Any]]:
        """Yield watch events ({type, object}) until the server closes the stream.

        Raises ApiError(410) when the resourceVersion is too old (the caller re-lists), and passes on ERROR
        events' Status as an ApiError too.
        """
        q = dict(params)
        q.update(
            watch="1", resourceVersion=resource_version, timeoutSeconds=str(timeout_seconds), allowWatchBookmarks="true"
        )
        with self._session().get(self.server + path, params=q, stream=True, timeout=(10, timeout_seconds + 15)) as r:
            if r.status_code >= 300:
                raise ApiError(r.status_code, r.text, "WATCH", path)
            try:
                for line in r.iter_lines(chunk_size=None):
                    if not line:
                        continue
                    ev = json.loads(line)
                    if ev.get("type") == "ERROR":
                        st = ev.get("object") or {}
                        raise ApiError(int(st.get("code") or 500), st, "WATCH", path)
                    yield ev
            except (
                requests.exceptions.ChunkedEncodingError,
                urllib3.exceptions.ProtocolError,
                requests.exceptions.ConnectionError,
            ):
                # The server (or a restart of it) cut the stream: the caller resumes from its last RV.
                return


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()
