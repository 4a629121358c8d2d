"""Live training figures: one object the loop updates, read by the console bar and the /progress endpoint."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any


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
        self._t0: float | None = None
        self._step0 = 0
        self._last_print = 0.0
        self.console = enabled and (sys.stderr.isatty() if console is None else console)

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
        if self.enabled and "step" in fields:
            self._print()

    def record_stall(self, seconds: float) -> None:
        with self._lock:
            self.stalls.append(seconds)

    def snapshot(self) -> dict[str, Any]:
        """The /progress document (DESIGN.md launcher contract)."""
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
        print(f"[dreambooth] {self.line()}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(f"[dreambooth] {self.line()}", file=sys.stderr, flush=True)
