"""Per-rank logs in the output store, so they outlive the pod: ``<outputDir>/logs/attempt-N/rank-R.log``.

A FileHandler on the root logger writes everything this process logs to a local file (in the run's scratch
folder); once the output prefix is known to be this job's, a daemon thread uploads that file every
``$DREAMBOOTH_LOG_UPLOAD_SECONDS`` (default 30) when it has grown, and once more when the run ends, a failure
included (its traceback goes into the file first).

The uploads must never cost training anything: they run off the training thread, through a store that gives up
after a few seconds (``$DREAMBOOTH_LOG_UPLOAD_DEADLINE_SECONDS``, default 10) instead of the checkpoints'
two minutes, and the final one is waited for at most that long. An S3 outage costs one warning per outage and
a log that catches up on the next upload.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import traceback
from pathlib import Path

from .logsetup import setup_logging
from .storage import Store, open_store

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_SECONDS = 30.0
DEFAULT_DEADLINE_SECONDS = 10.0


def log_key(attempt: int, rank: int) -> str:
    return f"logs/attempt-{attempt}/rank-{rank}.log"


def _env_seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, "") or default)
    except ValueError:
        return default
    return value if value > 0 else default


def _root_handler() -> logging.Handler | None:
    # The same lines as the console (setup_logging), so a downloaded log reads like the pod's output: its
    # formatter, and its filters (LOG_FORMAT=json adds the job/rank/step fields by a filter).
    return next((h for h in logging.getLogger().handlers if h.formatter is not None), None)


class RankLog:
    """One process's log file, mirrored to ``store/key`` from a background thread once `start_upload` is called."""

    def __init__(self, local: Path) -> None:
        self.local = local
        local.parent.mkdir(parents=True, exist_ok=True)
        # Appending: a restarted attempt on the same machine keeps what the earlier process logged.
        self.handler = logging.FileHandler(local, mode="a", encoding="utf-8")
        root = _root_handler()
        self.handler.setFormatter(
            root.formatter if root is not None and root.formatter is not None
            else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )  # fmt: skip
        for flt in root.filters if root is not None else []:
            self.handler.addFilter(flt)
        logging.getLogger().addHandler(self.handler)
        self.url: str | None = None
        self._store: Store | None = None
        self._key = ""
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._uploaded_size = -1
        self._failing = False
        self._closed = False
        self.deadline = _env_seconds("DREAMBOOTH_LOG_UPLOAD_DEADLINE_SECONDS", DEFAULT_DEADLINE_SECONDS)
        self.interval = _env_seconds("DREAMBOOTH_LOG_UPLOAD_SECONDS", DEFAULT_INTERVAL_SECONDS)

    def start_upload(self, output_uri: str, key: str) -> None:
        """Mirror the file to ``output_uri/key`` from now on (call only once the prefix is this job's)."""
        if self._thread is not None:
            return
        try:
            # A store of its own: short deadline, one botocore attempt per try, so a dead S3 never holds a log
            # upload (or the exit that waits for the last one) for the checkpoints' two minutes.
            self._store = open_store(output_uri, retry_deadline_s=self.deadline, max_attempts=1)
        except Exception as exc:  # noqa: BLE001 - logs are best effort; training goes on
            logger.warning("per-rank log upload disabled: %s", exc)
            return
        self._key = key
        self.url = self._store.url(key)
        self._thread = threading.Thread(target=self._loop, name="rank-log-upload", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            stopping = self._stop.wait(self.interval)
            self._upload()
            if stopping:
                return

    def _upload(self) -> None:
        assert self._store is not None
        try:
            self.handler.flush()
            size = self.local.stat().st_size
            if size == self._uploaded_size:
                return
            # A copy, so the object is a consistent prefix of the log while the handler keeps appending.
            copy = self.local.with_name(self.local.name + ".upload")
            shutil.copyfile(self.local, copy)
            self._store.upload_file(copy, self._key)
            self._uploaded_size = size
            if self._failing:
                logger.info("per-rank log upload to %s works again", self.url)
            self._failing = False
        except Exception as exc:  # noqa: BLE001 - never let a log upload fail the run
            if not self._failing:
                logger.warning(
                    "per-rank log upload to %s failed (%s); retrying every %.0f s", self.url, exc, self.interval
                )
            self._failing = True

    def close(self, exc: BaseException | None = None) -> None:
        """Write the failure (if any) into the file, upload it a last time (bounded wait), detach the handler."""
        if self._closed:
            return
        self._closed = True
        if exc is not None:
            from dreambooth_api.contract import EXIT_BAD_INPUT, EXIT_PREEMPTED

            from .errors import classify

            code = classify(exc)
            # A bad input or a preemption is fully said by its message; a crash needs its traceback.
            if code in (EXIT_BAD_INPUT, EXIT_PREEMPTED):
                text = str(exc)
            else:
                text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
            level = logging.WARNING if code == EXIT_PREEMPTED else logging.ERROR
            record = logging.LogRecord(__name__, level, __file__, 0, "run ended (exit %d): %s", (code, text), None)
            # Into the file only: the console already gets the traceback from the CLI.
            self.handler.handle(record)
        self._stop.set()
        if self._thread is not None:
            # Join waits for an upload in progress plus the final one, each bounded by the store's deadline.
            self._thread.join(2 * self.deadline + 1)
            if self._thread.is_alive():
                logger.warning("per-rank log not uploaded to %s in time; it stays in %s", self.url, self.local)
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()


__all__ = ["RankLog", "log_key", "setup_logging"]
