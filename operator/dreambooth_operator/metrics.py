"""Prometheus metrics and the /healthz + /metrics HTTP endpoint of the operator."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .status import PHASES


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
        self.reconcile_errors = Counter(
            "dreambooth_operator_reconcile_errors_total", "Reconciles that raised (retried).", registry=r
        )
        self.preemptions = Counter("dreambooth_operator_preemptions_total", "Attempts ended by preemption.", registry=r)
        self.restarts = Counter("dreambooth_operator_restarts_total", "Attempts ended by counted failures.", registry=r)
        self.api_requests = Counter(
            "dreambooth_operator_api_requests_total", "Apiserver requests made by the reconciler.", ["verb"], registry=r
        )
        self.api_seconds = Histogram(
            "dreambooth_operator_api_request_seconds", "Latency of the reconciler's apiserver requests.", ["verb"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r,
        )  # fmt: skip
        self.status_writes = Counter("dreambooth_operator_status_writes_total", "Status patches written.", registry=r)
        self.progress_polls = Counter(
            "dreambooth_operator_progress_polls_total", "GET /progress calls to rank 0.", ["result"], registry=r
        )

    def api_request(self, verb: str, seconds: float) -> None:
        self.api_requests.labels(verb).inc()
        self.api_seconds.labels(verb).observe(seconds)

    def set_phases(self, counts: dict[str, int]) -> None:
        for phase in PHASES:
            self.jobs.labels(phase).set(counts.get(phase, 0))

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
