"""The user's cluster, as kubectl finds it: --kubeconfig / $KUBECONFIG / ~/.kube/config, --context, --namespace.

Objects are returned as the apiserver's JSON (camelCase dicts), never the client's typed models, so the same
dicts go to `-o json`, the table and the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreambooth_api.manifest import API_GROUP, API_VERSION

from .errors import UserError

PLURAL = "dreamboothjobs"
LABEL_JOB_NAME = f"{API_GROUP}/job-name"
LABEL_ATTEMPT = f"{API_GROUP}/attempt"
LABEL_INDEX = f"{API_GROUP}/pod-index"


def _kubernetes() -> Any:
    try:
        import kubernetes
    except ImportError:
        raise UserError("the `kubernetes` Python client is missing: pip install 'dreambooth-operator[cli]'") from None
    return kubernetes


@dataclass
class KubeTarget:
    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None


class Kube:
    """DreamBoothJobs, their pods, Events and pod logs through the official client."""

    def __init__(self, target: KubeTarget) -> None:
        k8s = _kubernetes()
        self._k8s = k8s
        path = target.kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
        # $KUBECONFIG may list several files; like kubectl, the first that exists is the one we read here.
        files = [p for p in path.split(os.pathsep) if p]
        existing = [p for p in files if Path(p).is_file()]
        ns_from_config = None
        if existing:
            try:
                self.api = k8s.config.new_client_from_config(config_file=existing[0], context=target.context)
                contexts, active = k8s.config.list_kube_config_contexts(config_file=existing[0])
            except k8s.config.ConfigException as e:
                raise UserError(f"kubeconfig {existing[0]}: {e} (check --context and the file)") from None
            chosen = next((c for c in contexts if c["name"] == target.context), active) if target.context else active
            ns_from_config = ((chosen or {}).get("context") or {}).get("namespace")
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s.config.load_incluster_config()
            self.api = k8s.client.ApiClient()
            sa_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            ns_from_config = sa_ns.read_text().strip() if sa_ns.is_file() else None
        else:
            raise UserError(
                f"no kubeconfig: {path} does not exist (pass --kubeconfig FILE or set KUBECONFIG, as for kubectl)"
            )
        self.namespace = target.namespace or ns_from_config or "default"
        self.server = self.api.configuration.host
        self.custom = k8s.client.CustomObjectsApi(self.api)
        self.core = k8s.client.CoreV1Api(self.api)

    # ------------------------------------------------------------------ errors
    def _explain(self, e: Exception, what: str) -> UserError:
        k8s = self._k8s
        if isinstance(e, k8s.client.ApiException):
            if e.status == 404:
                return UserError(f"{what} not found in namespace {self.namespace} (see `dreambooth get`)")
            reason = ""
            with contextlib.suppress(ValueError, AttributeError):
                reason = json.loads(e.body or "{}").get("message", "")
            if e.status in (401, 403):
                return UserError(f"not allowed to read {what}: {reason or e.reason} (check your kubeconfig's user)")
            return UserError(
                f"{what}: the apiserver answered {e.status} {e.reason}" + (f": {reason}" if reason else "")
            )
        return UserError(
            f"cannot reach the apiserver at {self.server}: {type(e).__name__} (check --context/kubeconfig)"
        )

    def _raw(self, fn: Any, what: str, *args: Any, **kwargs: Any) -> Any:
        import urllib3

        try:
            resp = fn(*args, _preload_content=False, **kwargs)
            return json.loads(resp.data)
        except (self._k8s.client.ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            raise self._explain(e, what) from None

    # ------------------------------------------------------------------ reads
    def job(self, name: str) -> dict[str, Any]:
        return self._raw(self.custom.get_namespaced_custom_object, f"dreamboothjob {name}", API_GROUP, API_VERSION,
                         self.namespace, PLURAL, name)  # fmt: skip

    def job_or_none(self, name: str) -> dict[str, Any] | None:
        try:
            return self.job(name)
        except UserError as e:
            if "not found" in str(e):
                return None
            raise

    def jobs(self, all_namespaces: bool = False) -> list[dict[str, Any]]:
        if all_namespaces:
            doc = self._raw(self.custom.list_cluster_custom_object, "dreamboothjobs", API_GROUP, API_VERSION, PLURAL)
        else:
            doc = self._raw(self.custom.list_namespaced_custom_object, "dreamboothjobs", API_GROUP, API_VERSION,
                            self.namespace, PLURAL)  # fmt: skip
        return sorted(doc.get("items", []), key=lambda j: (j["metadata"].get("namespace", ""), j["metadata"]["name"]))

    def events(self, name: str) -> list[dict[str, Any]]:
        doc = self._raw(self.core.list_namespaced_event, f"events of {name}", self.namespace,
                        field_selector=f"involvedObject.name={name},involvedObject.kind=DreamBoothJob")  # fmt: skip
        return doc.get("items", [])

    def pods(self, name: str, attempt: int | None = None) -> list[dict[str, Any]]:
        sel = f"{LABEL_JOB_NAME}={name}" + (f",{LABEL_ATTEMPT}={attempt}" if attempt is not None else "")
        doc = self._raw(self.core.list_namespaced_pod, f"pods of {name}", self.namespace, label_selector=sel)
        return sorted(doc.get("items", []), key=lambda p: p["metadata"]["name"])

    def pod_log(self, pod: str, follow: bool = False) -> Iterator[bytes]:
        """The pod's log through the apiserver's pods/log (which asks the node's kubelet), streamed."""
        import urllib3

        try:
            resp = self.core.read_namespaced_pod_log(pod, self.namespace, follow=follow, _preload_content=False)
        except (self._k8s.client.ApiException, urllib3.exceptions.HTTPError, OSError) as e:
            raise self._explain(e, f"log of pod {pod}") from None
        try:
            yield from resp.stream(64 * 1024)
        finally:
            resp.release_conn()
