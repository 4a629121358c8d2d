"""The impure half of a reconcile: read the world, ask ``plan``, write status first, then act.

Each reconcile reads the job and its pods from the watch cache when it has one (``cache.Informer``; live
otherwise), looks at Nodes only for pods that look orphaned, polls rank 0's ``/progress`` at most every 10 s
per job, and then loops plan → patch status (only the changed keys) → Events → actions until a plan asks for
nothing more. A plan made from cached objects that would delete, start an attempt or change the attempt
bookkeeping is made again from live reads before anything is carried out (``live_reads_needed``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dreambooth_api.runtime import pick_default, runtime_ref

from . import status
from .cache import Informer
from .kube import KubeApi, event_object, is_status
from .metrics import Metrics
from .plan import EPOCH, Plan, PlanOptions, RuntimeView, World, plan, pod_attempt, refuse
from .progress_client import POLL_INTERVAL_SECONDS, fetch_progress
from .resources import CONFIG_KEY, LABEL_INDEX, PROGRESS_PORT, names_for
from .spec import training_hash

log = logging.getLogger(__name__)
COMPONENT = "dreambooth-operator"
# Plenty for the longest chain (live re-read → status → create gang → confirm it, or a stale write's 409 and
# its re-read); a plan that keeps asking is a bug, not work.
MAX_ROUNDS = 6

# Status fields a stale view must never decide: they count attempts or say which one runs.
BOOKKEEPING = ("attempt", "restarts", "preemptions", "preemptionsWithoutProgress", "memorySavers", "endedAttempt",
               "endedReason", "gangCreated", "completionTime")  # fmt: skip
DESTRUCTIVE = frozenset({"delete", "force-delete", "delete-job"})


def live_reads_needed(old_status: dict[str, Any], planned: Plan) -> frozenset[str]:
    """Which live reads ("job", "pods") a plan made from cached objects needs before it may be carried out.

    ``old_status`` is the job's status as read. Empty: the plan writes at most non-bookkeeping status (phase,
    conditions, progress) and acts on nothing, so the cache is good enough (the write's precondition catches a
    stale job). The first attempt of a job needs only its live status (no attempt can have pods yet; the
    creates tolerate 409 for a crash between create and status write); every later one needs the live pods too.
    """
    if planned.act_first:
        first = not old_status.get("attempt")
        return frozenset({"job"}) if first else frozenset({"job", "pods"})
    if any(a.verb in DESTRUCTIVE or a.verb == "create" for a in planned.actions):
        return frozenset({"job", "pods"})
    # Defaults filled in on both sides: one the apiserver has not stored yet is no change.
    old = status.dump(status.JobStatus.model_validate(old_status))
    new = status.dump(planned.status)
    if any(old.get(k) != new.get(k) for k in BOOKKEEPING):
        return frozenset({"job", "pods"})
    return frozenset()


@dataclass(frozen=True)
class Result:
    phase: str | None
    requeue_after: float | None
    # The job's resourceVersion after this reconcile's own write: the watch event it causes needs no reconcile.
    resource_version: str | None = None


class Reconciler:
    def __init__(
        self,
        kube: KubeApi,
        opts: PlanOptions | None = None,
        *,
        clock: Callable[[], datetime] = status.now_utc,
        fetch: Callable[[str, int], dict[str, Any] | None] = fetch_progress,
        monotonic: Callable[[], float] = time.monotonic,
        poll_interval: float = POLL_INTERVAL_SECONDS,
        metrics: Metrics | None = None,
        background_events: bool = False,
        cache: Informer | None = None,
        io_threads: int = 8,
    ) -> None:
        self.kube = kube
        self.cache = cache
        # Events are best effort: off the reconcile's critical path when the operator runs for real.
        self._event_pool = ThreadPoolExecutor(2, thread_name_prefix="events") if background_events else None
        # The creates of one plan go out in parallel; every worker shares these threads.
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="create")
        self.opts = opts or PlanOptions()
        self.clock = clock
        self.fetch = fetch
        self.monotonic = monotonic
        self.poll_interval = poll_interval
        self.metrics = metrics
        self._polled: dict[str, float] = {}
        self._lock = threading.Lock()

    def forget(self, uid: str) -> None:
        with self._lock:
            self._polled.pop(uid, None)

    def reconcile(self, namespace: str, name: str) -> Result | None:
        """Bring one job one step closer to its spec. None when the job is gone."""
        job, live_job = self._read_job(namespace, name)
        if job is None or (job.get("metadata") or {}).get("deletionTimestamp"):
            return None
        uid = job["metadata"]["uid"]
        pods, live_pods = self._read_pods(namespace, uid, job)
        accepted = self._accepted_config(job)
        runtime = self._runtime(job)
        progress = self._poll_progress(job, pods)
        gone = self.cache.gone_pods(uid) if self.cache is not None else []
        refused: str | None = None
        result = Result(None, None, _rv(job))
        for _ in range(MAX_ROUNDS):
            now = self.clock()
            world = World(job, pods, now, progress, self._nodes(pods, now), accepted, gone, runtime)
            planned = plan(world, self.opts) if refused is None else refuse(world, self.opts, refused)
            need = live_reads_needed(job.get("status") or {}, planned)
            if ("job" in need and not live_job) or ("pods" in need and not live_pods):
                # Planned from the cache: decide again from what the apiserver says now before acting on it.
                if not live_job:
                    job, live_job = self._get_job(namespace, name), True
                    if job is None or (job.get("metadata") or {}).get("deletionTimestamp"):
                        return None
                if "pods" in need:
                    pods, live_pods = self._list_pods(namespace, uid), True
                continue
            progress = None  # merged into status by this plan
            created: dict[str, dict[str, Any]] = {}
            if planned.act_first:
                refused, created = self._execute(namespace, name, uid, planned)
                if refused is not None:
                    pods, live_pods = self._list_pods(namespace, uid), True
                    continue  # the next round fails the job with the apiserver's words
                if not (job.get("status") or {}).get("attempt") and len(created) == sum(
                    1 for a in planned.actions if a.obj is not None and a.obj["kind"] == "Pod"
                ):
                    self._mark_complete(uid)
            try:
                updated = self._write_status(namespace, name, job, planned, precondition=not live_job)
            except Exception as exc:
                if not is_status(exc, 409):
                    raise
                # The cached job was behind (a spec edit, or our own write not yet echoed): re-read and re-plan.
                job, live_job = self._get_job(namespace, name), True
                if job is None:
                    return None
                continue
            if updated is None:
                return None
            job = updated
            self._record_events(job, planned, now)
            result = Result(planned.status.phase, planned.requeue_after, _rv(job))
            if self.metrics is not None:
                self.metrics.job_seen(namespace, name, planned.status)
            if not planned.actions:
                return result
            if not planned.act_first:
                refused, created = self._execute(namespace, name, uid, planned)
            if any(a.verb == "delete-job" for a in planned.actions):
                self.forget(uid)
                return None
            if any(a.verb in ("delete", "force-delete") for a in planned.actions):
                # Nothing more to decide until those pods are gone, and their events will say when.
                return result
            if all(a.verb == "annotate" for a in planned.actions):
                # Metadata only: the decision does not depend on it.
                return result
            wanted = [
                a.obj["metadata"]["name"]
                for a in planned.actions
                if a.verb == "create" and a.obj is not None and a.obj["kind"] == "Pod"
            ]
            if refused is None and all(n in created for n in wanted):
                # Every pod we asked for came back from its create: no need to list to confirm them.
                pods = pods + list(created.values())
            else:
                pods, live_pods = self._list_pods(namespace, uid), True
        log.warning(
            "%s/%s: still acting after %d rounds; continuing on the next reconcile", namespace, name, MAX_ROUNDS
        )
        return result

    # ----- reads -----

    def _read_job(self, namespace: str, name: str) -> tuple[dict[str, Any] | None, bool]:
        """The job and whether it was read live (rather than from the cache)."""
        cached = self.cache.job(namespace, name) if self.cache is not None else None
        if cached is not None:
            return cached, False
        return self._get_job(namespace, name), True

    def _get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        job = self.kube.get_job(namespace, name)
        if self.cache is not None and job is not None:
            self.cache.job_read(job)
        return job

    def _read_pods(self, namespace: str, uid: str, job: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
        """The job's pods and whether they were listed live."""
        if self.cache is not None:
            # A job that never started an attempt has no pods to find (a crash between its first creates and
            # the status write leaves some: the creates then answer 409, and that is listed live).
            cached = self.cache.pods(uid, complete=bool((job.get("status") or {}).get("attempt")))
            if cached is not None:
                return cached, False
        return self._list_pods(namespace, uid), True

    def _list_pods(self, namespace: str, uid: str) -> list[dict[str, Any]]:
        token = self.cache.list_token() if self.cache is not None else 0
        pods = self.kube.list_pods(namespace, uid)
        if self.cache is not None:
            self.cache.pods_listed(uid, pods, token)
        return pods

    def _mark_complete(self, uid: str) -> None:
        if self.cache is not None:
            self.cache.mark_complete(uid)

    def _accepted_config(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """The config the job was accepted with, read only once spec.training was edited."""
        accepted_hash = (job.get("status") or {}).get("trainingHash")
        if not accepted_hash or accepted_hash == training_hash(job.get("spec") or {}):
            return None
        meta = job["metadata"]
        cm = self.kube.get_configmap(meta["namespace"], names_for(meta["name"]).configmap)
        try:
            return json.loads(((cm or {}).get("data") or {}).get(CONFIG_KEY, "")) or None
        except ValueError:
            return None

    def _runtime(self, job: dict[str, Any]) -> RuntimeView | None:
        """The runtime of a job not accepted yet (read live, once per acceptance: never for an accepted job,
        whose snapshot is all it runs on)."""
        job_status = job.get("status") or {}
        if job_status.get("effectiveSpec") is not None or job_status.get("trainingHash"):
            return None
        if status.is_finished(status.JobStatus.model_validate(job_status)):
            return None  # failed before acceptance (InvalidSpec): nothing will read it
        name = runtime_ref(job.get("spec") or {})
        if name is not None:
            found = self.kube.get_runtime(name)
            return RuntimeView(name, (found.get("spec") or {}) if found is not None else None)
        default = pick_default(self.kube.list_runtimes())
        if default is None:
            return RuntimeView()
        return RuntimeView(str(default["metadata"]["name"]), default.get("spec") or {}, "the default runtime")

    def _poll_progress(self, job: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, Any] | None:
        uid = job["metadata"]["uid"]
        attempt = (job.get("status") or {}).get("attempt") or max((pod_attempt(pod) for pod in pods), default=0)
        rank0 = next(
            (pod for pod in pods if pod_attempt(pod) == attempt
             and (pod["metadata"].get("labels") or {}).get(LABEL_INDEX) == "0"
             and (pod.get("status") or {}).get("phase") == "Running" and (pod.get("status") or {}).get("podIP")),
            None,
        )  # fmt: skip
        if rank0 is None:
            return None
        with self._lock:
            last = self._polled.get(uid)
            if last is not None and self.monotonic() - last < self.poll_interval:
                return None
            self._polled[uid] = self.monotonic()
        doc = self.fetch(rank0["status"]["podIP"], PROGRESS_PORT)
        if self.metrics is not None:
            self.metrics.progress_polls.labels("ok" if doc is not None else "unavailable").inc()
        return doc

    def _nodes(self, pods: list[dict[str, Any]], now: datetime) -> dict[str, datetime]:
        """Not-Ready-since per node, looked up only for pods that look orphaned (cheap in the common case)."""
        out: dict[str, datetime] = {}
        for pod in pods:
            node = (pod.get("spec") or {}).get("nodeName")
            if not node or node in out:
                continue
            meta, pod_status = pod.get("metadata") or {}, pod.get("status") or {}
            ready = next((c for c in pod_status.get("conditions") or [] if c.get("type") == "Ready"), None)
            not_ready = pod_status.get("phase") == "Running" and ready is not None and ready.get("status") != "True"
            deadline = status.parse_time(meta.get("deletionTimestamp"))
            overdue = deadline is not None and now > deadline
            if not (not_ready or overdue):
                continue
            since = _node_not_ready_since(self.kube.get_node(node))
            if since is not None:
                out[node] = since
        return out

    # ----- writes -----

    def _write_status(self, namespace: str, name: str, job: dict[str, Any], planned: Plan,
                      precondition: bool = False) -> dict[str, Any] | None:  # fmt: skip
        """Patch the changed status keys; with ``precondition``, only onto the job version they were made from."""
        old = job.get("status") or {}
        new = status.dump(planned.status)
        patch = status.status_patch(old, new)
        if not patch:
            return job
        updated = self.kube.patch_job_status(namespace, name, patch, _rv(job) if precondition else None)
        if self.cache is not None and updated is not None:
            self.cache.job_read(updated, written=True)
        if self.metrics is not None and updated is not None:
            self.metrics.status_writes.inc()
            self.metrics.job_status(namespace, name, old, planned.status)
        return updated

    def _record_events(self, job: dict[str, Any], planned: Plan, now: datetime) -> None:
        ns = job["metadata"]["namespace"]
        for ev in planned.events:
            log.info("%s/%s %s %s: %s", ns, job["metadata"]["name"], ev.type, ev.reason, ev.message)
            obj = event_object(job, ev.type, ev.reason, ev.message, now, COMPONENT)
            if self._event_pool is not None:
                self._event_pool.submit(self.kube.create_event, ns, obj)
            else:
                self.kube.create_event(ns, obj)

    def _execute(
        self, namespace: str, name: str, uid: str, planned: Plan
    ) -> tuple[str | None, dict[str, dict[str, Any]]]:
        """Run the plan's actions. Returns the apiserver's refusal of an object we built (if any) and the pods
        created (by name). Creates go out together: a pod may exist before its ConfigMap (the kubelet waits)."""
        created: dict[str, dict[str, Any]] = {}
        # Pods first: the pool is shared by every worker, and under a burst of new jobs the pods are what waits.
        creates = sorted((a.obj for a in planned.actions if a.verb == "create" and a.obj is not None),
                         key=lambda o: o["kind"] != "Pod")  # fmt: skip
        results = list(self._io.map(self._create, creates)) if len(creates) > 1 else [self._create(c) for c in creates]
        for obj, (made, refusal) in zip(creates, results, strict=True):
            if refusal is not None:
                return refusal, created
            if made is not None and obj["kind"] == "Pod":
                created[obj["metadata"]["name"]] = made
                if self.cache is not None:
                    self.cache.pod_created(made)
        for action in planned.actions:
            if action.verb == "delete":
                self.kube.delete_pod(namespace, action.name)
            elif action.verb == "force-delete":
                self.kube.delete_pod(namespace, action.name, grace_seconds=0)
            elif action.verb == "delete-job":
                self.kube.delete_job(namespace, name, uid)
            elif action.verb == "annotate" and action.obj is not None:
                self.kube.patch_pod(namespace, action.name, action.obj)
        return None, created

    def _create(self, obj: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        try:
            return self.kube.create(obj), None
        except Exception as exc:
            # 400/422: the object we built from the spec is invalid (e.g. a bad volume in podTemplate):
            # retrying cannot help, so the job fails with the apiserver's own words.
            if is_status(exc, 400, 422) or _pod_security_refusal(exc):
                return None, f"the apiserver refused {obj['kind']} {obj['metadata']['name']}: " + _reason(exc)
            raise


def _pod_security_refusal(exc: Exception) -> bool:
    """403 from Pod Security Admission: the namespace's level forbids the pod as built, on every retry alike.

    Any other 403 (e.g. RBAC not yet bound) may pass later, so it stays an error that is retried.
    """
    return is_status(exc, 403) and "violates PodSecurity" in _reason(exc)


def _rv(job: dict[str, Any]) -> str | None:
    return (job.get("metadata") or {}).get("resourceVersion")


def _reason(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    try:
        return str(json.loads(body).get("message")) if body else str(exc)
    except ValueError:
        return str(body)


def _node_not_ready_since(node: dict[str, Any] | None) -> datetime | None:
    if node is None:
        return EPOCH  # a deleted Node: its pods are as good as lost
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            if cond.get("status") == "True":
                return None
            return status.parse_time(cond.get("lastTransitionTime")) or EPOCH
    return EPOCH
