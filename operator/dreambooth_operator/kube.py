"""The few apiserver calls the reconciler makes, as plain dicts in and out, each one counted.

These are the live reads (``cache.Informer`` holds what the watches showed; ``cache.live_reads_needed`` says
when a reconcile must come here instead) and every write. Creates answer None on 409 (the deterministic name
already exists), deletes ignore 404: every call is safe to repeat. A status patch may carry the resourceVersion
it was computed from; a 409 then means "re-read", never "retry blindly".
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from dreambooth_api.manifest import API_GROUP, API_VERSION, PLURAL
from dreambooth_api.runtime import RUNTIME_PLURAL

from .resources import LABEL_JOB_UID

log = logging.getLogger(__name__)
TIMEOUT = (5, 30)  # connect, read seconds


class KubeApi(Protocol):
    """What the reconciler needs from the apiserver (a fake implements it in the unit tests)."""

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any],
                         resource_version: str | None = None) -> dict[str, Any] | None: ...  # fmt: skip
    def delete_job(self, namespace: str, name: str, uid: str) -> None: ...
    def list_pods(self, namespace: str, job_uid: str) -> list[dict[str, Any]]: ...
    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def get_node(self, name: str) -> dict[str, Any] | None: ...
    def get_runtime(self, name: str) -> dict[str, Any] | None: ...
    def list_runtimes(self) -> list[dict[str, Any]]: ...
    def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """The created object, or None when the name exists (409)."""
        ...

    def delete_pod(self, namespace: str, name: str, grace_seconds: int | None = None) -> None: ...
    def patch_pod(self, namespace: str, name: str, patch: dict[str, Any]) -> None: ...
    def create_event(self, namespace: str, event: dict[str, Any]) -> None: ...


def is_status(exc: Exception, *codes: int) -> bool:
    return getattr(exc, "status", None) in codes


class Kube:
    """KubeApi over the official client's transport (auth, TLS, token refresh), with raw JSON bodies.

    The typed API methods validate bodies against the client's own models, which refuse what the apiserver
    accepts (an int GPU count, fields newer than the client): objects go out exactly as the builders made them.
    """

    def __init__(
        self, api_client: Any = None, on_request: Callable[[str, float, str | None], None] | None = None
    ) -> None:
        from kubernetes import client

        self._client = client
        self.api = api_client or client.ApiClient()
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self._on_request = on_request

    @classmethod
    def from_environment(
        cls, on_request: Callable[[str, float, str | None], None] | None = None, connections: int = 20
    ) -> Kube:
        from kubernetes import client, config

        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
        # One connection per reconcile worker: the default (5 x CPUs) would make busy workers reconnect.
        configuration.connection_pool_maxsize = connections
        return cls(client.ApiClient(configuration), on_request=on_request)

    def _request(self, verb: str, method: str, path: str, body: Any = None, *,
                 query: dict[str, str] | None = None, content_type: str = "application/json") -> Any:  # fmt: skip
        with self._lock:
            self.requests[verb] += 1
        started = time.perf_counter()
        error: str | None = None
        try:
            return self._send(method, path, body, query, content_type)
        except Exception as exc:
            # The HTTP status (404 and 409 are routine), or the exception's type when none came back.
            error = str(getattr(exc, "status", None) or type(exc).__name__)
            raise
        finally:
            if self._on_request is not None:
                self._on_request(verb, time.perf_counter() - started, error)

    def _send(self, method: str, path: str, body: Any, query: dict[str, str] | None, content_type: str) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        req = self.api.param_serialize(
            method=method, resource_path=path, query_params=list((query or {}).items()) or None,
            header_params=headers, body=body, auth_settings=["BearerToken"],
        )  # fmt: skip
        resp = self.api.call_api(*req, _request_timeout=TIMEOUT)
        data = resp.read()
        if not 200 <= resp.status <= 299:
            raise self._client.ApiException.from_response(http_resp=resp, body=data.decode(errors="replace"), data=None)
        return json.loads(data) if data else None

    def _get_or_none(self, path: str) -> dict[str, Any] | None:
        try:
            return self._request("get", "GET", path)
        except self._client.ApiException as exc:
            if is_status(exc, 404):
                return None
            raise

    def _job_path(self, namespace: str, name: str) -> str:
        return f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/{PLURAL}/{name}"

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get_or_none(self._job_path(namespace, name))

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any],
                         resource_version: str | None = None) -> dict[str, Any] | None:  # fmt: skip
        body: dict[str, Any] = {"status": status}
        if resource_version is not None:
            # Optimistic concurrency: 409 Conflict unless the job is still at the version the patch was made from.
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            return self._request("patch", "PATCH", self._job_path(namespace, name) + "/status", body,
                                 content_type="application/merge-patch+json")  # fmt: skip
        except self._client.ApiException as exc:
            if is_status(exc, 404):
                return None
            raise

    def delete_job(self, namespace: str, name: str, uid: str) -> None:
        # Background propagation: the garbage collector removes the owned pods, Service and ConfigMap.
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background",
                "preconditions": {"uid": uid}}  # fmt: skip
        try:
            self._request("delete", "DELETE", self._job_path(namespace, name), body)
        except self._client.ApiException as exc:
            if not is_status(exc, 404, 409):
                raise

    def list_pods(self, namespace: str, job_uid: str) -> list[dict[str, Any]]:
        data = self._request("list", "GET", f"/api/v1/namespaces/{namespace}/pods",
                             query={"labelSelector": f"{LABEL_JOB_UID}={job_uid}"})  # fmt: skip
        return list((data or {}).get("items") or [])

    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get_or_none(f"/api/v1/namespaces/{namespace}/configmaps/{name}")

    def get_node(self, name: str) -> dict[str, Any] | None:
        return self._get_or_none(f"/api/v1/nodes/{name}")

    def get_runtime(self, name: str) -> dict[str, Any] | None:
        return self._get_or_none(f"/apis/{API_GROUP}/{API_VERSION}/{RUNTIME_PLURAL}/{name}")

    def list_runtimes(self) -> list[dict[str, Any]]:
        try:
            data = self._request("list", "GET", f"/apis/{API_GROUP}/{API_VERSION}/{RUNTIME_PLURAL}")
        except self._client.ApiException as exc:
            if is_status(exc, 404):
                return []  # the runtime CRD is not installed (an older chart's CRDs): no default runtime
            if is_status(exc, 403):
                # RBAC without dreamboothruntimes (rbac.create=false with an older role): jobs still run, on their
                # own spec; a job that names a runtime still fails loudly through get_runtime.
                # The apiserver's own words ("cannot list resource ...") so a log scan for RBAC denials finds it.
                log.warning("no default DreamBoothRuntime applies; grant get/list on dreamboothruntimes: %s",
                            getattr(exc, "body", None) or exc)  # fmt: skip
                return []
            raise
        return list((data or {}).get("items") or [])

    def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        plural = {"Pod": "pods", "Service": "services", "ConfigMap": "configmaps"}[obj["kind"]]
        try:
            return self._request("create", "POST", f"/api/v1/namespaces/{obj['metadata']['namespace']}/{plural}", obj)
        except self._client.ApiException as exc:
            if is_status(exc, 409):
                return None
            raise

    def delete_pod(self, namespace: str, name: str, grace_seconds: int | None = None) -> None:
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            self._request("delete", "DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", body)
        except self._client.ApiException as exc:
            if not is_status(exc, 404):
                raise

    def patch_pod(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        """A merge patch (metadata only); a pod gone meanwhile is not an error."""
        try:
            self._request("patch", "PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}", patch,
                          content_type="application/merge-patch+json")  # fmt: skip
        except self._client.ApiException as exc:
            if not is_status(exc, 404):
                raise

    def create_event(self, namespace: str, event: dict[str, Any]) -> None:
        try:
            self._request("create", "POST", f"/api/v1/namespaces/{namespace}/events", event)
        except self._client.ApiException as exc:
            # Events are best effort: a lost one must never fail a reconcile.
            log.warning("could not record event %s: %s", event.get("reason"), exc.status)


def event_object(
    job: dict[str, Any], type_: str, reason: str, message: str, now: datetime, component: str
) -> dict[str, Any]:
    """A core/v1 Event about the job (what `kubectl describe dbj` lists)."""
    meta = job.get("metadata") or {}
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        # kubectl's naming: <object>.<unique hex>.
        "metadata": {
            "name": f"{meta.get('name', 'dreamboothjob')}.{uuid.uuid4().hex[:16]}",
            "namespace": meta.get("namespace"),
        },
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
