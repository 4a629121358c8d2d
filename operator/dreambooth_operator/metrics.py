"""Prometheus metrics and the /healthz + /metrics HTTP endpoint of the operator."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import __version__
from .policy import NO_PROGRESS_PREEMPTIONS
from .resources import names_for
from .status import FAILED, PHASES, SUCCEEDED, WAITING, parse_time

if TYPE_CHECKING:
    from .status import JobStatus


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("dreambooth_operator_jobs", "DreamBoothJobs by phase.", ["phase"], registry=r)
        for phase in PHASES:
            self.jobs.labels(phase).set(0)
        self.reconcile_seconds = Histogram(
            "dreambooth_operator_reconcile_seconds", "Time of one reconcile of one job.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r,
        )  # fmt: skip
        # Counters carry the job's namespace (and the policy's reason constant) so a platform can alert per team
        # and chart causes; per-job series are gauges below, removed when the job goes away.
        self.reconcile_errors = Counter(
            "dreambooth_operator_reconcile_errors_total", "Reconciles that raised (retried).", ["namespace"], registry=r
        )
        self.preemptions = Counter(
            "dreambooth_operator_preemptions_total", "Attempts ended by preemption, by cause.",
            ["namespace", "reason"], registry=r,
        )  # fmt: skip
        self.restarts = Counter(
            "dreambooth_operator_restarts_total", "Attempts ended by counted failures, by cause.",
            ["namespace", "reason"], registry=r,
        )  # fmt: skip
        self.jobs_ended = Counter(
            "dreambooth_operator_jobs_ended_total", "Jobs that reached Succeeded or Failed, by phase and reason.",
            ["namespace", "phase", "reason"], registry=r,
        )  # fmt: skip
        self.job_attempt = Gauge(
            "dreambooth_operator_job_attempt",
            "Current attempt number of a job.",
            ["namespace", "dreambooth_job"],
            registry=r,
        )
        self.job_preemptions = Gauge(
            "dreambooth_operator_job_preemptions", "Attempts of a job ended by preemption.", ["namespace", "dreambooth_job"],
            registry=r,
        )  # fmt: skip
        self.job_no_progress = Gauge(
            "dreambooth_operator_job_preemptions_without_progress",
            "Consecutive preemptions of a job with no new step between them (the job fails at "
            f"{NO_PROGRESS_PREEMPTIONS}).", ["namespace", "dreambooth_job"], registry=r,
        )  # fmt: skip
        self.job_waiting_since = Gauge(
            "dreambooth_operator_job_waiting_since_timestamp_seconds",
            "When a job entered WaitingForResources (present only while it waits).", ["namespace", "dreambooth_job"], registry=r,
        )  # fmt: skip
        self.build_info = Gauge(
            "dreambooth_build_info", "Version of the running component; value 1.",
            ["component", "version", "python"], registry=r,
        )  # fmt: skip
        self.build_info.labels("operator", __version__, platform.python_version()).set(1)
        self._job_series: set[tuple[str, str]] = set()
        self._waiting: set[tuple[str, str]] = set()
        self.api_requests = Counter(
            "dreambooth_operator_api_requests_total", "Apiserver requests made by the reconciler.", ["verb"], registry=r
        )
        self.api_seconds = Histogram(
            "dreambooth_operator_api_request_seconds", "Latency of the reconciler's apiserver requests.", ["verb"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r,
        )  # fmt: skip
        self.api_errors = Counter(
            "dreambooth_operator_api_errors_total",
            "Apiserver requests that failed, by HTTP status (404/409 are routine) or exception type.",
            ["verb", "code"], registry=r,
        )  # fmt: skip
        self.status_writes = Counter("dreambooth_operator_status_writes_total", "Status patches written.", registry=r)
        self.progress_polls = Counter(
            "dreambooth_operator_progress_polls_total", "GET /progress calls to rank 0.", ["result"], registry=r
        )

    def api_request(self, verb: str, seconds: float, error: str | None = None) -> None:
        self.api_requests.labels(verb).inc()
        self.api_seconds.labels(verb).observe(seconds)
        if error is not None:
            self.api_errors.labels(verb, error).inc()

    def set_phases(self, counts: dict[str, int]) -> None:
        for phase in PHASES:
            self.jobs.labels(phase).set(counts.get(phase, 0))

    def job_status(self, namespace: str, name: str, old: dict[str, Any], new: JobStatus) -> None:
        """A status write: count what changed (preemptions, restarts, the end) with the reason that caused it."""
        reason = new.ended_reason or "Unknown"
        grown = new.preemptions - int(old.get("preemptions") or 0)
        if grown > 0:
            self.preemptions.labels(namespace, reason).inc(grown)
        grown = new.restarts - int(old.get("restarts") or 0)
        if grown > 0:
            self.restarts.labels(namespace, reason).inc(grown)
        if new.phase in (SUCCEEDED, FAILED) and old.get("phase") != new.phase:
            cond = next((c for c in new.conditions if c.type == new.phase and c.status == "True"), None)
            self.jobs_ended.labels(namespace, new.phase, (cond.reason if cond else "") or "Unknown").inc()

    def job_seen(self, namespace: str, job: str, st: JobStatus) -> None:
        """Per-job gauges from the status a reconcile planned (set every reconcile: an operator restart refills them).

        The series label is ``dreambooth_job`` (``job`` is Prometheus's own target label) with the value of the
        pods' job-name label, so these gauges join the trainer's series of the same job.
        """
        name = names_for(job).base
        key = (namespace, name)
        self._job_series.add(key)
        self.job_attempt.labels(namespace, name).set(st.attempt or 0)
        self.job_preemptions.labels(namespace, name).set(st.preemptions)
        self.job_no_progress.labels(namespace, name).set(st.preemptions_without_progress)
        cond = next((c for c in st.conditions if c.type == WAITING and c.status == "True"), None)
        since = parse_time(cond.last_transition_time) if cond is not None and st.phase == WAITING else None
        if since is not None:
            self.job_waiting_since.labels(namespace, name).set(since.timestamp())
            self._waiting.add(key)
        elif key in self._waiting:
            self._waiting.discard(key)
            self.job_waiting_since.remove(namespace, name)

    def job_gone(self, namespace: str, job: str) -> None:
        name = names_for(job).base
        key = (namespace, name)
        if key in self._job_series:
            self._job_series.discard(key)
            self.job_attempt.remove(namespace, name)
            self.job_preemptions.remove(namespace, name)
            self.job_no_progress.remove(namespace, name)
        if key in self._waiting:
            self._waiting.discard(key)
            self.job_waiting_since.remove(namespace, name)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def make_app(metrics: Metrics, healthy: Callable[[], tuple[bool, str]]) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        ok, detail = healthy()
        return web.Response(status=200 if ok else 503, text=detail + "\n")

    async def render(_: web.Request) -> web.Response:
        resp = web.Response(body=metrics.render())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", render)
    return app


async def serve(app: web.Application, port: int, host: str = "0.0.0.0") -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


class Heartbeat:
    """Liveness from the operator's own loop: the resync loop beats; silence means the operator is stuck."""

    def __init__(self, max_silence: float) -> None:
        self.max_silence = max_silence
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def check(self) -> tuple[bool, str]:
        silence = time.monotonic() - self.last
        ok = silence <= self.max_silence
        return ok, f"{'ok' if ok else 'stuck'}: last resync {silence:.1f} s ago"
