"""Test-only hooks, in one place. Each reads a DREAMBOOTH_TEST_* variable, which nothing in production sets, and
does nothing when it is unset; they let tests and benchmarks put real runs into the states a preemption can meet.

    DREAMBOOTH_TEST_STEP_DELAY_SECONDS=S       every optimizer step sleeps S s (to signal or kill at a chosen step)
    DREAMBOOTH_TEST_RAISE_OOM_AT_STEP=N        a simulated GPU OOM at step N ...
    DREAMBOOTH_TEST_RAISE_OOM_ON_RANK=R        ... on rank R only
    DREAMBOOTH_TEST_SAVE_DELAY_SECONDS=S       every publish sleeps S s between its files and its manifest
    DREAMBOOTH_TEST_SAVE_DELAY_KIND=K          ... only publishes of kind K: "emergency" (on SIGTERM) or "periodic"
    DREAMBOOTH_TEST_CRASH_IN_EMERGENCY_SAVE=1  the emergency save SIGKILLs its own process before the manifest
    DREAMBOOTH_TEST_KILL_IN_EMERGENCY_SAVE=P   ... at point P of its streamed write: "mid-parts" (S3: after the
                                               second part), "before-complete" (every byte sent, nothing
                                               committed) or "before-manifest" (= CRASH_IN_EMERGENCY_SAVE=1)
    DREAMBOOTH_TEST_PAD_STATE_MB=N             every snapshot carries N MiB more (random bytes): a bigger state
    DREAMBOOTH_TEST_FINAL_UPLOAD_DELAY_SECONDS=S  the final model's upload waits S s (so a test can stop S3 there)
    DREAMBOOTH_TEST_DUMP_RESTORED=DIR          a resumed run's ranks save what they restored (optimizer state, trained
                                               weights) to DIR/rank-R.pt, to compare with the checkpoint's files
    DREAMBOOTH_TEST_SHARE_FAULT=F              ranks > 0 of a shared S3 checkpoint upload their parts, then
                                               "no-report": never report to rank 0; "bad-sha": report another sha256

The trainer and the checkpoint publisher take `hooks()` when a run or a publish starts and call its methods.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def _float(name: str) -> float:
    return float(os.environ.get(name, "0") or 0)


@dataclass(frozen=True)
class TestHooks:
    step_delay: float = 0.0
    oom_step: int = 0
    oom_rank: str = ""
    save_delay: float = 0.0
    save_delay_kind: str = ""
    crash_in_emergency_save: bool = False
    kill_in_save: str = ""
    pad_state_mb: float = 0.0
    final_upload_delay: float = 0.0
    share_fault: str = ""
    dump_restored: str = ""

    @classmethod
    def from_environ(cls) -> TestHooks:
        return cls(
            step_delay=_float("DREAMBOOTH_TEST_STEP_DELAY_SECONDS"),
            oom_step=int(os.environ.get("DREAMBOOTH_TEST_RAISE_OOM_AT_STEP", "0") or 0),
            oom_rank=os.environ.get("DREAMBOOTH_TEST_RAISE_OOM_ON_RANK", ""),
            save_delay=_float("DREAMBOOTH_TEST_SAVE_DELAY_SECONDS"),
            save_delay_kind=os.environ.get("DREAMBOOTH_TEST_SAVE_DELAY_KIND", ""),
            crash_in_emergency_save=os.environ.get("DREAMBOOTH_TEST_CRASH_IN_EMERGENCY_SAVE") == "1"
            or os.environ.get("DREAMBOOTH_TEST_KILL_IN_EMERGENCY_SAVE") == "before-manifest",
            kill_in_save=os.environ.get("DREAMBOOTH_TEST_KILL_IN_EMERGENCY_SAVE", ""),
            pad_state_mb=_float("DREAMBOOTH_TEST_PAD_STATE_MB"),
            final_upload_delay=_float("DREAMBOOTH_TEST_FINAL_UPLOAD_DELAY_SECONDS"),
            share_fault=os.environ.get("DREAMBOOTH_TEST_SHARE_FAULT", ""),
            dump_restored=os.environ.get("DREAMBOOTH_TEST_DUMP_RESTORED", ""),
        )

    def after_step(self) -> None:
        if self.step_delay:
            time.sleep(self.step_delay)

    def oom_at(self, rank: int) -> int:
        """The step at which this rank raises a simulated GPU OOM (0 = never)."""
        return self.oom_step if self.oom_rank in ("", str(rank)) else 0

    def before_manifest(self, emergency: bool) -> None:
        kind = "emergency" if emergency else "periodic"
        if self.save_delay > 0 and (self.save_delay_kind or kind) == kind:
            logger.warning("test hook: %s checkpoint waits %.1fs before its manifest", kind, self.save_delay)
            time.sleep(self.save_delay)
        if emergency and self.crash_in_emergency_save:
            self.kill_now()

    def kill_now(self) -> None:
        logger.warning("test hook: the process dies in the middle of the emergency checkpoint")
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)

    def before_final_upload(self) -> None:
        if self.final_upload_delay > 0:
            time.sleep(self.final_upload_delay)

    def share_report(self, report: dict[str, Any]) -> dict[str, Any] | None:
        """What a rank > 0 reports of its checkpoint share (None: nothing)."""
        if self.share_fault == "no-report":
            logger.warning("test hook: rank %s does not report its checkpoint share", report.get("rank"))
            return None
        if self.share_fault == "bad-sha":
            logger.warning("test hook: rank %s reports another sha256 of its checkpoint share", report.get("rank"))
            for meta in report["files"].values():
                meta["sha256"] = "0" * 64
        return report

    def restored(self, rank: int, state: dict[str, Any]) -> None:
        if self.dump_restored:
            import torch

            os.makedirs(self.dump_restored, exist_ok=True)
            torch.save(state, os.path.join(self.dump_restored, f"rank-{rank}.pt"))

    def state_padding(self) -> dict[str, torch.Tensor] | None:
        """DREAMBOOTH_TEST_PAD_STATE_MB of random bytes, made once per process, for the snapshot to carry."""
        return _padding(self.pad_state_mb) if self.pad_state_mb > 0 else None


@functools.cache
def _padding(mb: float) -> dict[str, torch.Tensor]:
    import torch

    # Random, not zeros: no layer of the storage stack may get a cheaper job than a real state gives it.
    gen = torch.Generator().manual_seed(0)
    return {"padding": torch.randint(0, 256, (int(mb * 2**20),), dtype=torch.uint8, generator=gen)}


def hooks() -> TestHooks:
    """Read now: in-process callers (tests, benchmarks) change the environment between runs."""
    return TestHooks.from_environ()
