"""What the watches have shown of our jobs and pods, so that most reconciles read memory instead of the apiserver.

kopf already watches DreamBoothJobs and our pods; its events feed this cache (plus the objects our own requests
return). A reconcile plans from the cache, and the reconciler's ``live_reads_needed`` says when that plan is not
good enough to act on: anything that deletes, starts an attempt, or changes the attempt bookkeeping (counters,
ended attempt, a finished job) is planned again from a live GET/LIST first, so a stale cache can only delay a
decision, never make a wrong one (docs/design.md: a new attempt starts only after the old attempt's pods are
gone; no attempt is counted twice). Status writes planned from a cached job carry its resourceVersion as a precondition: if the
cache was behind, the apiserver answers 409 and the reconcile re-reads.

Freshness without comparing resourceVersions (they are opaque): pods carry a local sequence number, and a live
LIST only replaces what no watch event touched while the LIST was in flight. A job's own status write is
remembered until its watch echo arrives; an event seen in between is older than our write (watches are
ordered), so it marks the entry untrusted instead of replacing it. Everything is read live again at least
every ``LIVE_REFRESH_SECONDS`` per job, so a silently dead watch costs a delay, not a wrong state.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .resources import LABEL_JOB_UID

Key = tuple[str, str]  # namespace, name
LIVE_REFRESH_SECONDS = 60.0
# Deleted pods whose last words (a termination message) are kept per job: a few attempts' worth of gangs.
GONE_PODS_PER_JOB = 16


@dataclass
class _JobEntry:
    obj: dict[str, Any]
    trusted: bool = True
    pending_rv: str | None = None  # our own write, until its watch echo arrives
    seen_rvs: deque[str] = field(default_factory=lambda: deque(maxlen=8))
    live_at: float | None = None  # last live GET (or own write) of this job


def _rv(obj: dict[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("resourceVersion")


def _key(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace")), str(meta.get("name"))


class Informer:
    """Jobs and pods as last seen, thread-safe: written from the event loop and the reconcile threads."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, refresh_seconds: float = LIVE_REFRESH_SECONDS
    ) -> None:
        self._clock = clock
        self._refresh = refresh_seconds
        self._lock = threading.Lock()
        self._jobs: dict[Key, _JobEntry] = {}
        self._seq = 0
        # job uid -> pod key -> (sequence, pod or None for a deletion)
        self._pods: dict[str, dict[Key, tuple[int, dict[str, Any] | None]]] = {}
        self._primed: dict[str, float] = {}  # job uid -> when its pod set was last known complete
        # job uid -> pod key -> the pod as its DELETED event showed it, for pods that left a termination message
        self._gone: dict[str, dict[Key, dict[str, Any]]] = {}

    # ----- jobs -----

    def job_seen(self, obj: dict[str, Any], deleted: bool = False) -> None:
        """A watch event."""
        key, rv = _key(obj), _rv(obj)
        with self._lock:
            if deleted:
                self._jobs.pop(key, None)
                return
            entry = self._jobs.get(key)
            if entry is None:
                self._jobs[key] = entry = _JobEntry(copy.deepcopy(obj))
            elif entry.pending_rv is not None and rv != entry.pending_rv:
                entry.trusted = False  # older than our own write: keep ours, read live next time
            else:
                entry.obj, entry.trusted, entry.pending_rv = copy.deepcopy(obj), True, None
            if rv is not None:
                entry.seen_rvs.append(rv)

    def job_read(self, obj: dict[str, Any], written: bool = False) -> None:
        """A live GET, or the response to our own status write (``written``)."""
        key, rv = _key(obj), _rv(obj)
        with self._lock:
            entry = self._jobs.get(key)
            if entry is None:
                self._jobs[key] = entry = _JobEntry(copy.deepcopy(obj))
            elif entry.trusted and rv in entry.seen_rvs and entry.seen_rvs[-1] != rv:
                # The answer came back after the watch had shown this version *and a newer one*: keep the newer.
                entry.live_at = self._clock()
                return
            entry.obj, entry.trusted, entry.live_at = copy.deepcopy(obj), True, self._clock()
            # Wait for the echo of our write unless the watch has already shown it.
            entry.pending_rv = rv if written and rv not in entry.seen_rvs else None

    def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The cached job, or None when it must be read live (unknown, untrusted or due a live refresh)."""
        with self._lock:
            entry = self._jobs.get((namespace, name))
            if entry is None or not entry.trusted or entry.live_at is None:
                return None
            if self._clock() - entry.live_at > self._refresh:
                return None
            return entry.obj

    def forget_job(self, namespace: str, name: str, uid: str | None) -> None:
        with self._lock:
            self._jobs.pop((namespace, name), None)
            if uid:
                self._pods.pop(uid, None)
                self._primed.pop(uid, None)
                self._gone.pop(uid, None)

    # ----- pods -----

    def pod_seen(self, obj: dict[str, Any], deleted: bool = False) -> None:
        """A watch event."""
        uid = ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_JOB_UID)
        if not uid:
            return
        key = _key(obj)
        with self._lock:
            self._seq += 1
            self._pods.setdefault(uid, {})[key] = (self._seq, None if deleted else copy.deepcopy(obj))
            last_words = _last_words(obj) if deleted else None
            if last_words is not None:
                gone = self._gone.setdefault(uid, {})
                gone.pop(key, None)  # re-inserted last: the oldest entry is the one dropped
                gone[key] = last_words
                while len(gone) > GONE_PODS_PER_JOB:
                    gone.pop(next(iter(gone)))

    def gone_pods(self, uid: str) -> list[dict[str, Any]]:
        """The job's pods deleted since this process started, as last seen, if they left a termination message.

        A stopped gang writes its emergency checkpoint into the termination message and is deleted soon after:
        often before any reconcile lists it, so this is the only place that checkpoint is still known.
        """
        with self._lock:
            return [copy.deepcopy(pod) for pod in self._gone.get(uid, {}).values()]

    def pod_created(self, obj: dict[str, Any]) -> None:
        """The apiserver's answer to our create: the pod's first version, so only where the watch has shown
        nothing of it yet (its events may well come first: then they are newer, e.g. Unschedulable)."""
        uid = ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_JOB_UID)
        if not uid:
            return
        with self._lock:
            pods = self._pods.setdefault(uid, {})
            if _key(obj) not in pods:
                self._seq += 1
                pods[_key(obj)] = (self._seq, copy.deepcopy(obj))

    def list_token(self) -> int:
        """Take before a live LIST; hand to ``pods_listed`` with its result."""
        with self._lock:
            return self._seq

    def pods_listed(self, uid: str, items: list[dict[str, Any]], token: int) -> None:
        """A live LIST of the job's pods: the complete set, except what watch events changed during the LIST."""
        with self._lock:
            old = self._pods.get(uid, {})
            new: dict[Key, tuple[int, dict[str, Any] | None]] = {k: v for k, v in old.items() if v[0] > token}
            for item in items:
                new.setdefault(_key(item), (token, copy.deepcopy(item)))
            self._pods[uid] = new
            self._primed[uid] = self._clock()

    def mark_complete(self, uid: str) -> None:
        """We created every pod this job has (its first attempt, no 409): the cache knows its whole pod set."""
        with self._lock:
            self._pods.setdefault(uid, {})
            self._primed.setdefault(uid, self._clock())

    def pods(self, uid: str, complete: bool = True) -> list[dict[str, Any]] | None:
        """The job's pods, or None when they must be listed live (never listed here, or due a live refresh).

        ``complete=False``: whatever the watch has shown, for a job that has never started an attempt (a plan
        from it can only start the first one, which ``live_reads_needed`` lets go on without a LIST).
        """
        with self._lock:
            primed = self._primed.get(uid)
            if complete and (primed is None or self._clock() - primed > self._refresh):
                return None
            found = [pod for _, pod in self._pods.get(uid, {}).values() if pod is not None]
        return sorted(found, key=lambda p: p["metadata"]["name"])


def _last_words(pod: dict[str, Any]) -> dict[str, Any] | None:
    """What a deleted pod said on its way out (name, labels, phase, terminated containers), or None when it left
    no termination message: a few hundred bytes per pod, however long a finished job is kept."""
    status = pod.get("status") or {}
    terminated = [
        {"name": c.get("name"), "state": {"terminated": copy.deepcopy(c["state"]["terminated"])}}
        for c in status.get("containerStatuses") or []
        if ((c.get("state") or {}).get("terminated") or {}).get("message")
    ]
    if not terminated:
        return None
    meta = pod.get("metadata") or {}
    return {
        "metadata": {k: copy.deepcopy(meta[k]) for k in ("name", "namespace", "labels") if k in meta},
        "status": {"phase": status.get("phase"), "containerStatuses": terminated},
    }
