"""The few apiserver calls the reconciler makes, as plain dicts in and out, each one counted.

Reads are live (no cache): a reconcile decides from what the apiserver says now, so a lost watch event or an
operator restart can delay a decision but never base it on stale pods. Creates answer False on 409 (the
deterministic name already exists), deletes ignore 404: every call is safe to repeat.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from dreambooth_trainer.manifest import API_GROUP, API_VERSION, PLURAL

from .resources import LABEL_JOB_UID

log = logging.getLogger(__name__)
TIMEOUT = (5, 30)  # connect, read seconds


class KubeApi(Protocol):
    """What the reconciler needs from the apiserver (a fake implements it in the unit tests)."""

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None: ...
    def delete_job(self, namespace: str, name: str, uid: str) -> None: ...
    def list_pods(self, namespace: str, job_uid: str) -> list[dict[str, Any]]: ...
    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def get_node(self, name: str) -> dict[str, Any] | None: ...
    def create(self, obj: dict[str, Any]) -> bool: ...
    def delete_pod(self, namespace: str, name: str, grace_seconds: int | None = None) -> None: ...
    def create_event(self, namespace: str, event: dict[str, Any]) -> None: ...


def is_status(exc: Exception, *codes: int) -> bool:
    return getattr(exc, "status", None) in codes


class Kube:
    """KubeApi over the official client (sync; the reconciler runs in worker threads)."""

    def __init__(self, api_client: Any = None, on_request: Callable[[str], None] | None = None) -> None:
        from kubernetes import client

        self._client = client
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self._on_request = on_request

    @classmethod
    def from_environment(cls, on_request: Callable[[str], None] | None = None) -> Kube:
        from kubernetes import config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(on_request=on_request)

    def _call(self, verb: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self.requests[verb] += 1
        if self._on_request is not None:
            self._on_request(verb)
        resp = fn(*args, _preload_content=False, _request_timeout=TIMEOUT, **kwargs)
        data = resp.data
        return json.loads(data) if data else None

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("get", self.custom.get_namespaced_custom_object, API_GROUP, API_VERSION, namespace, PLURAL, name)
        except self._client.ApiException as exc:
            if is_status(exc, 404):
                return None
            raise

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return self._call(
                "patch", self.custom.patch_namespaced_custom_object_status,
                API_GROUP, API_VERSION, namespace, PLURAL, name, {"status": status},
            )  # fmt: skip
        except self._client.ApiException as exc:
            if is_status(exc, 404):
                return None
            raise

    def delete_job(self, namespace: str, name: str, uid: str) -> None:
        # Background propagation: the garbage collector removes the owned pods, Service and ConfigMap.
        body = {"propagationPolicy": "Background", "preconditions": {"uid": uid}}
        try:
            self._call("delete", self.custom.delete_namespaced_custom_object, API_GROUP, API_VERSION, namespace,
                       PLURAL, name, body=body)  # fmt: skip
        except self._client.ApiException as exc:
            if not is_status(exc, 404, 409):
                raise

    def list_pods(self, namespace: str, job_uid: str) -> list[dict[str, Any]]:
        data = self._call("list", self.core.list_namespaced_pod, namespace, label_selector=f"{LABEL_JOB_UID}={job_uid}")
        return list((data or {}).get("items") or [])

    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("get", self.core.read_namespaced_config_map, name, namespace)
        except self._client.ApiException as exc:
            if is_status(exc, 404):
                return None
            raise

    def get_node(self, name: str) -> dict[str, Any] | None:
        try:
            return self._call("get", self.core.read_node, name)
        except self._client.ApiException as exc:
            if is_status(exc, 404):
                return None
            raise

    def create(self, obj: dict[str, Any]) -> bool:
        kind = obj["kind"]
        namespace = obj["metadata"]["namespace"]
        fn = {
            "Pod": self.core.create_namespaced_pod,
            "Service": self.core.create_namespaced_service,
            "ConfigMap": self.core.create_namespaced_config_map,
        }[kind]
        try:
            self._call("create", fn, namespace, obj)
            return True
        except self._client.ApiException as exc:
            if is_status(exc, 409):
                return False
            raise

    def delete_pod(self, namespace: str, name: str, grace_seconds: int | None = None) -> None:
        body: dict[str, Any] = {}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            self._call("delete", self.core.delete_namespaced_pod, name, namespace, body=body or None)
        except self._client.ApiException as exc:
            if not is_status(exc, 404):
                raise

    def create_event(self, namespace: str, event: dict[str, Any]) -> None:
        try:
            self._call("create", self.core.create_namespaced_event, namespace, event)
        except self._client.ApiException as exc:
            # Events are best effort: a lost one must never fail a reconcile.
            log.warning("could not record event %s: %s", event.get("reason"), exc.status)


def event_object(job: dict[str, Any], type_: str, reason: str, message: str, now: datetime, component: str) -> dict[str, Any]:
    """A core/v1 Event about the job (what `kubectl describe dbj` lists)."""
    meta = job.get("metadata") or {}
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        # kubectl's naming: <object>.<unique hex>.
        "metadata": {"name": f"{meta.get('name', 'dreamboothjob')}.{uuid.uuid4().hex[:16]}", "namespace": meta.get("namespace")},
        "involvedObject": {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": job.get("kind", "DreamBoothJob"),
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
        "source": {"component": component},
    }
