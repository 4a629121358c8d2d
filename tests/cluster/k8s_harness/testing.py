"""Manifest builders and watch helpers for tests that run pods on the process kubelet."""

from __future__ import annotations

import textwrap
import threading
from typing import Any

from .rest import Kube


def python_pod(
    name: str,
    code: str,
    *,
    namespace: str | None = None,
    restart_policy: str = "Never",
    grace: int | None = None,
    env: list[dict[str, Any]] | None = None,
    volumes: list[dict[str, Any]] | None = None,
    mounts: list[dict[str, Any]] | None = None,
    resources: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    hostname: str | None = None,
    subdomain: str | None = None,
    node: str | None = None,
    extra_spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A pod whose single container runs ``python -c <code>`` (the venv's python, by PATH)."""
    container: dict[str, Any] = {
        "name": "main",
        "image": "host.invalid/python:local",
        "command": ["python", "-u", "-c", textwrap.dedent(code)],
    }
    if env:
        container["env"] = env
    if mounts:
        container["volumeMounts"] = mounts
    if resources:
        container["resources"] = resources
    spec: dict[str, Any] = {"restartPolicy": restart_policy, "containers": [container]}
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    if volumes:
        spec["volumes"] = volumes
    if hostname:
        spec["hostname"] = hostname
    if subdomain:
        spec["subdomain"] = subdomain
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    spec.update(extra_spec or {})
    md: dict[str, Any] = {"name": name}
    if namespace:
        md["namespace"] = namespace
    if labels:
        md["labels"] = labels
    return {"apiVersion": "v1", "kind": "Pod", "metadata": md, "spec": spec}


def condition(pod: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in pod.get("status", {}).get("conditions") or [] if c["type"] == ctype), None)


def terminated(pod: dict[str, Any], container: str = "main") -> dict[str, Any] | None:
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        if cs["name"] == container:
            return (cs.get("state") or {}).get("terminated")
    return None


class PodRecorder:
    """Records every version of one pod seen on a watch (to check what watchers saw before a deletion)."""

    def __init__(self, kube: Kube, namespace: str, name: str):
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.deleted = threading.Event()
        self._kube = kube
        self._ns = namespace
        self._name = name
        lst = kube.get(f"/api/v1/namespaces/{namespace}/pods", fieldSelector=f"metadata.name={name}")
        self._rv = lst["metadata"]["resourceVersion"]
        for item in lst["items"]:
            self.events.append(("EXISTING", item))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rv = self._rv
        while not self.deleted.is_set():
            for ev in self._kube.watch(
                f"/api/v1/namespaces/{self._ns}/pods",
                rv,
                timeout_seconds=120,
                fieldSelector=f"metadata.name={self._name}",
            ):
                if ev["type"] == "BOOKMARK":
                    continue
                rv = ev["object"]["metadata"]["resourceVersion"]
                self.events.append((ev["type"], ev["object"]))
                if ev["type"] == "DELETED":
                    self.deleted.set()
                    return

    def wait_deleted(self, timeout: float) -> bool:
        return self.deleted.wait(timeout)
