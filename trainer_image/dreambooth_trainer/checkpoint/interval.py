"""`checkpointing_steps: auto`: the checkpoint interval from measured costs and the preemption rate."""

from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)


class CheckpointInterval:
    """`checkpointing_steps: auto`: Young/Daly's optimal interval, re-derived as checkpoint costs are measured.

    Daly (2006): with checkpoint cost C and mean time between failures M, the work between checkpoints should be
    T = sqrt(2CM) * (1 + sqrt(C/2M)/3 + C/18M) - C  (T = M once C >= 2M); for C << M this is Young's sqrt(2CM).
    C is a checkpoint's full price: the loop's stall (snapshot copy, waiting for the previous upload) plus the
    background write/upload, because an upload competes for host memory, network and storage even while the
    loop runs on, and a checkpoint protects nothing until it is durable. T is never shorter than an upload
    (checkpoints would queue) and is turned into steps at the measured speed.
    """

    PRIOR_COST_SECONDS = 5.0  # until the first checkpoint is measured
    SMOOTHING = 0.5  # weight of the newest measurement: costs drift (page cache, network), one outlier should not

    def __init__(self, mtbf_seconds: float, start_step: int = 0, log: bool = True) -> None:
        self.mtbf = mtbf_seconds
        self.log = log
        self.last_step = start_step
        self.stall: float | None = None
        self.publish: float | None = None
        self.current: int | None = None

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.SMOOTHING) * old + self.SMOOTHING * new

    def observe_stall(self, seconds: float) -> None:
        self.stall = self._ema(self.stall, seconds)

    def observe_publish(self, seconds: float | None) -> None:
        if seconds is not None:
            self.publish = self._ema(self.publish, seconds)

    @property
    def cost_seconds(self) -> float:
        if self.stall is None and self.publish is None:
            return self.PRIOR_COST_SECONDS
        return (self.stall or 0.0) + (self.publish or 0.0)

    def seconds(self) -> float:
        c, m = self.cost_seconds, self.mtbf
        if c >= 2 * m:
            return m
        x = c / (2 * m)
        t = math.sqrt(2 * c * m) * (1 + math.sqrt(x) / 3 + x / 9) - c
        return max(t, self.publish or 0.0)

    def steps(self, steps_per_second: float | None) -> int | None:
        """The interval in steps, or None while the speed is unknown (the first step of a process)."""
        if not steps_per_second:
            return None
        seconds = self.seconds()
        exact = seconds * steps_per_second
        # Speed jitters every step: the interval moves (and is logged) only when it is off by more than 25%.
        if self.current is not None and abs(exact - self.current) <= 0.25 * self.current:
            return self.current
        steps = max(1, round(exact))
        if self.log:
            logger.info(
                "checkpoint interval (auto): every %d steps (~%.0f s at %.3g steps/s; checkpoint cost %.2f s%s, "
                "expected preemption every %.0f s)",
                steps, seconds, steps_per_second, self.cost_seconds,
                "" if self.stall is not None or self.publish is not None else " assumed until measured", self.mtbf,
            )  # fmt: skip
        self.current = steps
        return steps

    def due(self, step: int, steps_per_second: float | None) -> bool:
        every = self.steps(steps_per_second)
        return every is not None and step - self.last_step >= every

    def saved(self, step: int) -> None:
        self.last_step = step
