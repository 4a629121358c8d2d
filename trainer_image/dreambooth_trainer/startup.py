"""Where a run's start-up time goes: sync, load, data, first step (docs/design.md, `/progress` `startupSeconds`).

A spot user pays for every second between the pod's start and the first optimizer step; these figures say which
phase to attack (more S3 bandwidth, a smaller model, fewer images to cache) and feed `benchmarks/startup.py`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator

logger = logging.getLogger(__name__)

# The phases of `/progress` `startupSeconds`, in order; `total` runs from the process's start to the first step's end.
PHASES = ("sync", "load", "data", "firstStep")


def process_age_seconds() -> float | None:
    """Seconds since this process started (Linux: /proc), so `total` includes interpreter start and imports."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        # Field 22 of stat (starttime, clock ticks after boot); the split above starts at field 3.
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class StartupClock:
    """Seconds per start-up phase. A phase timed twice adds up (a class-image top-up syncs again)."""

    def __init__(self) -> None:
        age = process_age_seconds()
        self._t0 = time.monotonic() - (age or 0.0)
        self.seconds: dict[str, float] = {}
        self.total: float | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.add(name, time.monotonic() - start)

    def add(self, name: str, seconds: float) -> None:
        if name not in PHASES:
            raise ValueError(f"unknown start-up phase {name!r}; one of {PHASES}")
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def first_step_done(self, seconds: float) -> None:
        """The first optimizer step of this process ended (its loss read back: the device work is done)."""
        self.add("firstStep", seconds)
        self.total = time.monotonic() - self._t0

    def as_dict(self) -> dict[str, float | None]:
        """`/progress` `startupSeconds`: every phase (None until timed) plus `total` and `other` (accelerator and
        process-group start, output claim, resume choice: what the four phases do not cover)."""
        out: dict[str, float | None] = {p: _round(self.seconds.get(p)) for p in PHASES}
        out["total"] = _round(self.total)
        out["other"] = _round(self.total - sum(self.seconds.values())) if self.total is not None else None
        return out

    def line(self) -> str:
        d = self.as_dict()

        def fmt(v: float | None) -> str:
            return f"{v:.1f}s" if v is not None else "-"

        return (
            f"startup: sync {fmt(d['sync'])}, load {fmt(d['load'])}, data {fmt(d['data'])}, "
            f"first step {fmt(d['firstStep'])}, other {fmt(d['other'])}; total {fmt(d['total'])} since the process started"
        )


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None
