"""A keyed work queue and its workers: events and timers say *which* job to look at, never what to do.

Each job key is processed by one worker at a time (a key added while it is processed is processed again
after), reconciles run in threads (the apiserver client is synchronous), and every job is re-examined on a
timer even without events — so a lost watch event or an operator restart only delays convergence.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dreambooth_api.manifest import KIND

from .cache import Informer
from .metrics import Heartbeat, Metrics
from .reconciler import Reconciler
from .status import FAILED, SUCCEEDED

log = logging.getLogger(__name__)
Key = tuple[str, str]  # namespace, name
# Finished jobs only wait for their TTL (scheduled precisely through requeue_after): look rarely.
FINISHED_RESYNC_SECONDS = 300.0
MAX_ERROR_BACKOFF_SECONDS = 60.0
POD_EVENT_COALESCE_SECONDS = 0.5


class WorkQueue:
    """client-go's workqueue semantics on asyncio: dedupe, one worker per key, delayed re-adds — plus an
    urgent lane, so a job nobody has looked at yet is not stuck behind the routine re-checks of running ones."""

    def __init__(self) -> None:
        self._items = asyncio.Semaphore(0)
        self._urgent: deque[Hashable] = deque()
        self._normal: deque[Hashable] = deque()
        self._queued: set[Hashable] = set()
        self._processing: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._timers: dict[Hashable, tuple[float, asyncio.TimerHandle]] = {}

    def add(self, key: Hashable, urgent: bool = False) -> None:
        if key in self._processing:
            self._dirty.add(key)
        elif key in self._queued:
            if urgent and key in self._normal:
                self._normal.remove(key)
                self._urgent.append(key)
        else:
            self._queued.add(key)
            (self._urgent if urgent else self._normal).append(key)
            self._items.release()

    def schedule(self, key: Hashable, delay: float) -> None:
        """(Re)place the key's timer: one pending timer per key, the latest request wins."""
        self.forget(key)
        loop = asyncio.get_running_loop()
        self._timers[key] = (loop.time() + delay, loop.call_later(max(0.0, delay), self._fire, key))

    def add_soon(self, key: Hashable, delay: float) -> None:
        """Add after ``delay`` unless it is due sooner anyway: a burst of events becomes one reconcile."""
        if key in self._queued or key in self._processing:
            self.add(key)
            return
        due = asyncio.get_running_loop().time() + delay
        if key in self._timers and self._timers[key][0] <= due:
            return
        self.schedule(key, delay)

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def forget(self, key: Hashable) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer[1].cancel()

    def scheduled(self, key: Hashable) -> bool:
        return key in self._timers or key in self._queued or key in self._processing

    async def get(self) -> Hashable:
        await self._items.acquire()
        key = self._urgent.popleft() if self._urgent else self._normal.popleft()
        self._queued.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: Hashable) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def __len__(self) -> int:
        return len(self._queued)


class Controller:
    def __init__(
        self,
        reconciler: Reconciler,
        metrics: Metrics,
        *,
        workers: int = 8,
        resync_seconds: float = 10.0,
        cache: Informer | None = None,
    ) -> None:
        self.reconciler = reconciler
        # Fed by the watch events below; the reconciler reads it (the same object, or none).
        self.cache = cache
        self.metrics = metrics
        self.workers = workers
        self.resync_seconds = resync_seconds
        self.heartbeat = Heartbeat(max_silence=max(60.0, 6 * resync_seconds))
        self.queue: WorkQueue | None = None
        self.jobs: dict[Key, str] = {}  # key -> uid
        self.phases: dict[Key, str] = {}
        self._own_writes: dict[Key, str] = {}  # key -> resourceVersion our last reconcile left the job at
        self._failures: Counter[Key] = Counter()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reconcile")
        self._tasks: list[asyncio.Task[Any]] = []

    # ----- inputs (called from kopf's event handlers on the same loop) -----

    def job_event(self, namespace: str, name: str, uid: str, deleted: bool, resource_version: str | None = None,
                  body: dict[str, Any] | None = None) -> None:  # fmt: skip
        key = (namespace, name)
        if self.cache is not None and body is not None:
            self.cache.job_seen(body, deleted)
        if deleted:
            if self.cache is not None:
                self.cache.forget_job(namespace, name, uid)
            self.jobs.pop(key, None)
            self.phases.pop(key, None)
            self._own_writes.pop(key, None)
            self.reconciler.forget(uid)
            if self.queue is not None:
                self.queue.forget(key)
            self._publish_phases()
            return
        self.jobs[key] = uid
        if resource_version is not None and self._own_writes.get(key) == resource_version:
            return  # the echo of our own status write: that reconcile already saw this version
        if self.queue is not None:
            # A job never reconciled (new, or new to this operator process) goes ahead of routine re-checks.
            self.queue.add(key, urgent=key not in self.phases)

    def pod_event(self, namespace: str, owners: list[dict[str, Any]] | None, body: dict[str, Any] | None = None,
                  deleted: bool = False) -> None:  # fmt: skip
        if self.cache is not None and body is not None:
            self.cache.pod_seen(body, deleted)
        for ref in owners or []:
            if ref.get("kind") == KIND and ref.get("controller") and self.queue is not None:
                # A pod changes several times in a row (scheduled, started, ...): one look after the burst.
                self.queue.add_soon((namespace, str(ref.get("name"))), POD_EVENT_COALESCE_SECONDS)

    # ----- the loop -----

    async def start(self) -> None:
        self.queue = WorkQueue()
        for key in self.jobs:
            self.queue.add(key, urgent=True)
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]
        self._tasks.append(asyncio.create_task(self._safety_net()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _safety_net(self) -> None:
        """Every known job has a timer or a queue slot; beat the liveness heartbeat while at it."""
        assert self.queue is not None
        while True:
            await asyncio.sleep(min(self.resync_seconds, 5.0))
            self.heartbeat.beat()
            for key in list(self.jobs):
                if not self.queue.scheduled(key):
                    self.queue.add(key)

    async def _worker(self, index: int) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            key = await self.queue.get()
            started = time.perf_counter()
            try:
                result = await loop.run_in_executor(self._executor, self.reconciler.reconcile, *key)
            except Exception:
                self._failures[key] += 1
                delay = min(MAX_ERROR_BACKOFF_SECONDS, 2.0 ** self._failures[key])
                log.exception("reconcile of %s/%s failed; retrying in %.0f s", key[0], key[1], delay)
                self.metrics.reconcile_errors.labels(key[0]).inc()
                self.queue.schedule(key, delay)
            else:
                self._failures.pop(key, None)
                if result is None:
                    self.phases.pop(key, None)
                    self.metrics.job_gone(*key)
                    self.queue.forget(key)
                else:
                    if result.resource_version:
                        self._own_writes[key] = result.resource_version
                    if result.phase:
                        self.phases[key] = result.phase
                    interval = FINISHED_RESYNC_SECONDS if result.phase in (SUCCEEDED, FAILED) else self.resync_seconds
                    self.queue.schedule(key, min(interval, result.requeue_after or interval))
                self._publish_phases()
            finally:
                self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
                self.queue.done(key)

    def _publish_phases(self) -> None:
        self.metrics.set_phases(dict(Counter(self.phases.values())))
