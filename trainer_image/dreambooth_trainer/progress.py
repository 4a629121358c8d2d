"""Live training figures: one object the loop updates, read by the console line and rank 0's HTTP server.

`serve_progress(progress)` starts the server docs/design.md promises on ``$PROGRESS_PORT`` (default 8080; ``0`` picks a
free port and logs it; ``off`` serves nothing), bound to ``$POD_IP`` when set, else 127.0.0.1:

- ``GET /progress`` -> ``Progress.snapshot()`` as JSON;
- ``GET /metrics``  -> Prometheus text (prometheus-client), computed from the same object at scrape time.

The server runs on daemon threads and reads the object under its lock for microseconds, so a slow or stuck
client never blocks a training step.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import __version__
from .logsetup import json_logging, set_step

logger = logging.getLogger(__name__)


class Progress:
    """Step, loss, speed and ETA of this run (rank 0). Thread-safe: the HTTP server reads it concurrently."""

    def __init__(self, max_steps: int, enabled: bool = True, console: bool | None = None) -> None:
        self.max_steps = max_steps
        self.enabled = enabled
        self._lock = threading.Lock()
        self.phase = "Starting"
        self.step = 0
        self.loss: float | None = None
        self.lr: float | None = None
        self.last_checkpoint: dict[str, Any] | None = None
        self.validation_images: list[str] = []
        self.stalls: list[float] = []
        self.publish_seconds: list[float] = []
        self.checkpoint_interval_steps: int | None = None
        self.preemptions = 0
        self.startup: Any = None  # startup.StartupClock: where start-up went (sync, load, data, first step)
        self._t0: float | None = None
        self.started_at: float | None = None  # wall clock of this process's first step (Unix time)
        self._step0 = 0
        self._last_print = 0.0
        self._json = json_logging()
        # JSON logs get the progress line whether or not stderr is a terminal: the pipeline is the console.
        self.console = enabled and (self._json or (sys.stderr.isatty() if console is None else console))

    @property
    def steps_per_second(self) -> float | None:
        if self._t0 is None or self.step <= self._step0:
            return None
        elapsed = time.monotonic() - self._t0
        return (self.step - self._step0) / elapsed if elapsed > 0 else None

    @property
    def eta_seconds(self) -> float | None:
        rate = self.steps_per_second
        return (self.max_steps - self.step) / rate if rate else None

    def update(self, **fields: Any) -> None:
        with self._lock:
            for key, value in fields.items():
                setattr(self, key, value)
            if "step" in fields and self._t0 is None:
                # Speed counts from the first step this process ran, not from a resumed step count.
                self._t0, self._step0 = time.monotonic(), self.step
                self.started_at = time.time()
        if "step" in fields:
            set_step(self.step)
        if self.enabled and "step" in fields:
            self._print()

    def record_stall(self, seconds: float) -> None:
        with self._lock:
            self.stalls.append(seconds)

    def record_publish(self, info: dict[str, Any], seconds: float | None) -> None:
        """A checkpoint became durable: it is the new lastCheckpoint; `seconds` is its write + upload time."""
        with self._lock:
            self.last_checkpoint = info
            if seconds is not None:
                self.publish_seconds.append(seconds)

    def snapshot(self) -> dict[str, Any]:
        """The /progress document (docs/design.md, launcher contract)."""
        with self._lock:
            rate = self.steps_per_second
            return {
                "phase": self.phase,
                "step": self.step,
                "maxSteps": self.max_steps,
                "loss": self.loss,
                "stepsPerSecond": rate,
                "etaSeconds": self.eta_seconds,
                "lastCheckpoint": self.last_checkpoint,
                "validationImages": list(self.validation_images),
                "startupSeconds": self.startup.as_dict() if self.startup is not None else None,
            }

    def line(self) -> str:
        s = self.snapshot()
        loss = f"{s['loss']:.4f}" if s["loss"] is not None else "-"
        rate = f"{s['stepsPerSecond']:.2f}" if s["stepsPerSecond"] else "-"
        eta = f"{s['etaSeconds']:.0f}s" if s["etaSeconds"] is not None else "-"
        ck = s["lastCheckpoint"]["step"] if s["lastCheckpoint"] else "-"
        return f"step {s['step']}/{s['maxSteps']} loss {loss} {rate} it/s ETA {eta} last checkpoint {ck}"

    def _print(self) -> None:
        now = time.monotonic()
        if now - self._last_print < 1.0 and self.step < self.max_steps:
            return
        self._last_print = now
        self._emit()

    def _emit(self) -> None:
        if self._json:
            # A JSON pipeline gets the figures as fields, not only inside the sentence.
            s = self.snapshot()
            logger.info(self.line(), extra={"loss": s["loss"], "steps_per_second": s["stepsPerSecond"],
                                            "eta_seconds": s["etaSeconds"], "max_steps": s["maxSteps"]})  # fmt: skip
        else:
            print(f"[dreambooth] {self.line()}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self._emit()


def _unix_time(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _metric_families(progress: Progress) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

    snap = progress.snapshot()
    with progress._lock:
        stalls, publishes = list(progress.stalls), list(progress.publish_seconds)
        interval, preemptions = progress.checkpoint_interval_steps, progress.preemptions
        started_at = progress.started_at

    def gauge(name: str, doc: str, value: float | None) -> Any:
        g = GaugeMetricFamily(name, doc)
        if value is not None:
            g.add_metric([], float(value))
        return g

    phase = GaugeMetricFamily("dreambooth_phase", "The run's phase, as a label; value 1.", labels=["phase"])
    phase.add_metric([snap["phase"]], 1.0)
    yield phase
    yield gauge("dreambooth_step", "Optimizer steps done.", snap["step"])
    yield gauge("dreambooth_max_steps", "Optimizer steps this run trains for.", snap["maxSteps"])
    yield gauge("dreambooth_loss", "Loss of the last optimizer step.", snap["loss"])
    yield gauge(
        "dreambooth_steps_per_second", "Optimizer steps per second since this process started.", snap["stepsPerSecond"]
    )
    yield gauge("dreambooth_eta_seconds", "Estimated seconds to the last step.", snap["etaSeconds"])
    last = snap["lastCheckpoint"]
    yield gauge(
        "dreambooth_last_checkpoint_step", "Step of the newest durable checkpoint.", last["step"] if last else None
    )
    yield gauge(
        "dreambooth_last_checkpoint_timestamp_seconds",
        "When the newest durable checkpoint was published (Unix time; its manifest's time).",
        _unix_time(last.get("time")) if last else None,
    )
    yield gauge(
        "dreambooth_training_started_timestamp_seconds",
        "When this process started training (Unix time): the checkpoint-age reference before a first checkpoint.",
        started_at,
    )
    yield gauge(
        "dreambooth_checkpoint_interval_steps",
        "Current checkpoint interval (checkpointingSteps, or the auto value).",
        interval,
    )
    yield SummaryMetricFamily(
        "dreambooth_checkpoint_stall_seconds",
        "Time the training loop stood still per checkpoint (snapshot copy + wait for the previous upload).",
        count_value=len(stalls),
        sum_value=sum(stalls),
    )
    yield SummaryMetricFamily(
        "dreambooth_checkpoint_publish_seconds",
        "Time from snapshot to durable (files written/uploaded, manifest, LATEST) per checkpoint.",
        count_value=len(publishes),
        sum_value=sum(publishes),
    )
    yield gauge(
        "dreambooth_checkpoint_last_publish_seconds",
        "Publish time of the newest checkpoint.",
        publishes[-1] if publishes else None,
    )
    yield CounterMetricFamily(
        "dreambooth_preemptions", "SIGTERM stops (emergency checkpoints) in this process.", value=preemptions
    )
    info = GaugeMetricFamily(
        "dreambooth_build_info", "Version of the running component; value 1.", labels=["component", "version", "python"]
    )
    info.add_metric(["trainer", __version__, platform.python_version()], 1.0)
    yield info
    attempt = os.environ.get("DREAMBOOTH_ATTEMPT", "")
    yield gauge(
        "dreambooth_attempt", "The operator's attempt number of this run.", int(attempt) if attempt.isdigit() else None
    )


class _Collector:
    """Reads the Progress object at scrape time, so /metrics and /progress never disagree."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def collect(self) -> Iterator[Any]:
        yield from _metric_families(self.progress)


class ProgressServer:
    """`/progress` and `/metrics` for one Progress object, on daemon threads."""

    def __init__(self, progress: Progress, host: str = "127.0.0.1", port: int = 8080) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        # A registry of our own: the process-global one would refuse a second trainer in the same process.
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(progress))  # type: ignore[arg-type]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path = self.path.split("?", 1)[0].rstrip("/")
                if path == "/progress":
                    body, ctype = json.dumps(progress.snapshot()).encode(), "application/json"
                elif path == "/metrics":
                    body, ctype = generate_latest(registry), CONTENT_TYPE_LATEST
                elif path in ("", "/healthz"):
                    body, ctype = b"ok\n", "text/plain"
                else:
                    self.send_error(404, "try /progress or /metrics")
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - a scrape per few seconds is not news
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="progress-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> ProgressServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_progress(progress: Progress, environ: dict[str, str] | None = None) -> ProgressServer | None:
    """Start rank 0's server as the environment says; a port in use costs a warning, never the run."""
    env = os.environ if environ is None else environ
    raw = env.get("PROGRESS_PORT", "8080").strip().lower()
    if raw in ("off", "none", "-1"):
        return None
    host = env.get("POD_IP", "").strip() or "127.0.0.1"
    try:
        port = int(raw or "8080")
        server = ProgressServer(progress, host, port).start()
    except (OSError, ValueError) as exc:
        logger.warning("progress server not started on %s port %s: %s (training goes on without it)", host, raw, exc)
        return None
    logger.info("progress on %s/progress, metrics on %s/metrics", server.url, server.url)
    return server
