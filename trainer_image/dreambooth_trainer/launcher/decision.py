"""The launcher's decisions, pure: the stop deadline, torchrun's command line, and the exit code and
termination message from what the workers left behind (docs/design.md, launcher contract)."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreambooth_api.contract import (
    EXIT_BAD_INPUT,
    EXIT_CRASH,
    EXIT_GPU_OOM,
    EXIT_OK,
    EXIT_PREEMPTED,
    MESSAGE_LIMIT,
    REASONS,
    REFINED_REASONS,
    TERMINATION_LOG,
)

logger = logging.getLogger("dreambooth_trainer.launch")

DEFAULT_GRACE_SECONDS = 120.0
POLL_SECONDS = 0.1
# torchrun SIGKILLs workers this long after our deadline at the earliest: the launcher's deadline comes first.
TORCHRUN_SHUTDOWN_SLACK_SECONDS = 5
# Of the failures a gang can show, the one that caused the others (see the module docstring).
ROOT_CAUSE_ORDER = (EXIT_BAD_INPUT, EXIT_GPU_OOM, EXIT_PREEMPTED, EXIT_CRASH)


# ------------------------------------------------------------------------------------------------- settings
def stop_deadline(environ: dict[str, str] | os._Environ[str] | None = None) -> float:
    """Seconds from SIGTERM to the launcher's SIGKILL of the workers."""
    env = os.environ if environ is None else environ
    explicit = env.get("DREAMBOOTH_STOP_DEADLINE_SECONDS", "").strip()
    if explicit:
        return max(0.0, float(explicit))
    grace = float(env.get("DREAMBOOTH_GRACE_SECONDS", "").strip() or DEFAULT_GRACE_SECONDS)
    # The launcher needs a moment after the deadline to kill, look up the last checkpoint and write its message.
    margin = min(10.0, max(2.0, 0.1 * grace))
    return max(1.0, grace - margin)


# torchrun itself (torch.distributed.run), quiet about failures the launcher reports.
TORCHRUN_MODULE = "dreambooth_trainer.torchrun"


@functools.cache
def torchrun_has_shutdown_timeout() -> bool:
    """Whether this torch's torchrun takes --shutdown-timeout (newer releases; 2.11 refuses it and exits 2).

    Read from torchrun's source rather than by importing torch: the launcher stays light and starts fast.
    """
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return False
    try:
        return "--shutdown-timeout" in (Path(spec.origin).parent / "distributed" / "run.py").read_text()
    except OSError:
        return False


def torchrun_argv(
    config: Path,
    nproc: int,
    deadline: float,
    environ: dict[str, str] | os._Environ[str],
    *,
    shutdown_timeout_flag: bool = True,
) -> list[str]:
    argv = [sys.executable, "-m", TORCHRUN_MODULE, f"--nproc-per-node={nproc}"]
    if shutdown_timeout_flag:
        argv.append(f"--shutdown-timeout={math.ceil(deadline) + TORCHRUN_SHUTDOWN_SLACK_SECONDS}")
    # Without the flag an older torchrun SIGKILLs its workers 30 s after torchrun itself is signalled. The
    # launcher signals the workers, not torchrun, once they run, so only a stop during rendezvous (no state
    # yet) or the launcher's own death (PDEATHSIG) meets that 30 s limit.
    nnodes = environ.get("PET_NNODES", "1").strip() or "1"
    if not environ.get("PET_MASTER_ADDR") and nnodes in ("1", "1:1"):
        argv.append("--standalone")
    rdzv_timeout = environ.get("DREAMBOOTH_RDZV_TIMEOUT_SECONDS", "").strip()
    if rdzv_timeout and not environ.get("PET_RDZV_CONF"):
        # The static backend reads `timeout`, c10d reads `join_timeout`: peers of a gang start as capacity appears.
        argv.append(f"--rdzv-conf=timeout={int(float(rdzv_timeout))},join_timeout={int(float(rdzv_timeout))}")
    argv += ["-m", "dreambooth_trainer.launch", "--worker", "--config", str(config)]
    return argv


# ------------------------------------------------------------------------------------------------- outcome
@dataclass
class Outcome:
    code: int
    step: int | None = None
    checkpoint_uri: str | None = None
    message: str = ""
    refined_reason: str | None = None  # e.g. NonFiniteLoss: said by the worker, valid only with its exit code
    validation_images: list[str] = field(default_factory=list)  # a completed run's final validation images

    @property
    def reason(self) -> str:
        if self.refined_reason and REFINED_REASONS.get(self.refined_reason) == self.code:
            return self.refined_reason
        return REASONS.get(self.code, "Crashed")

    def termination_message(self) -> str:
        """The pod's termination message: JSON, at most MESSAGE_LIMIT bytes (the message is cut, never the JSON)."""
        doc: dict[str, Any] = {
            "reason": self.reason, "step": self.step, "checkpointUri": self.checkpoint_uri, "message": self.message
        }  # fmt: skip
        images = list(self.validation_images)
        if images:
            doc["validationImages"] = images
        text = json.dumps(doc)
        # Images go first (the last ones, then the list), the message after: the reason and step always stay.
        while len(text.encode()) > MESSAGE_LIMIT and images:
            images.pop()
            doc["validationImages"] = images
            if not images:
                del doc["validationImages"]
            text = json.dumps(doc)
        message = self.message
        while len(text.encode()) > MESSAGE_LIMIT and message:
            message = message[: max(0, len(message) - (len(text.encode()) - MESSAGE_LIMIT) - 8)]
            doc["message"] = message + "..."
            text = json.dumps(doc)
        return text


@dataclass
class StopInfo:
    """What happened after the launcher was asked to stop."""

    signal_name: str
    deadline: float
    killed_at_deadline: bool = False
    aborted: bool = False  # a second Ctrl-C
    seconds: float | None = None  # from the signal to the workers' exit


def _rank_failures(rank_codes: dict[int, int | None], stopping: bool = False) -> tuple[int, str]:
    """The root-cause exit code of the failed local ranks, and the ranks in words."""
    failed = {r: c for r, c in rank_codes.items() if c != EXIT_OK}
    known = [c for c in failed.values() if c is not None]
    normal = [c for c in known if c in ROOT_CAUSE_ORDER]
    code = next((c for c in ROOT_CAUSE_ORDER if c in normal), EXIT_CRASH)
    words = []
    for r, c in sorted(failed.items()):
        if c is None:
            cause = "a signal" if stopping else "a signal: host out of memory?"
            words.append(f"local rank {r} died without a result (killed by {cause})")
        else:
            words.append(f"local rank {r} exited {c} ({REASONS.get(c, 'Crashed')})")
    return code, "; ".join(words)


def decide(
    *,
    nproc: int,
    rank_codes: dict[int, int | None],
    detail: dict[str, Any] | None,
    torchrun_rc: int | None,
    stop: StopInfo | None,
    node_rank: int = 0,
    workers_seen: int = 0,
    latest: Callable[[], tuple[int | None, str | None]] = lambda: (None, None),
) -> Outcome:
    """Map what the workers left behind to the launcher's exit code and termination message (pure)."""
    detail = detail or {}
    codes = {r: rank_codes.get(r) for r in range(nproc)}
    if all(c == EXIT_OK for c in codes.values()) and torchrun_rc == 0:
        # Training finished before a SIGTERM could stop it: done is done.
        images = detail.get("validationImages")
        return Outcome(
            EXIT_OK, detail.get("step"), detail.get("checkpointUri"), detail.get("message", "training finished"),
            validation_images=[str(u) for u in images] if isinstance(images, list) else [],
        )  # fmt: skip

    if stop is not None:
        took = f" {stop.seconds:.1f}s after {stop.signal_name}" if stop.seconds is not None else ""
        if detail.get("exitCode") == EXIT_PREEMPTED and detail.get("checkpointUri"):
            return Outcome(
                EXIT_PREEMPTED,
                detail.get("step"),
                detail["checkpointUri"],
                f"preempted{took}: {detail.get('message', '')}",
            )
        if detail.get("exitCode") == EXIT_PREEMPTED and node_rank != 0:
            return Outcome(
                EXIT_PREEMPTED, detail.get("step"), None,
                f"preempted{took}: {detail.get('message', '')} (global rank 0, on node 0, publishes the checkpoint)",
            )  # fmt: skip
        step, uri = latest()
        stands = (
            f"the last complete checkpoint {uri} stands; the next attempt resumes from step {step}"
            if uri
            else "no complete checkpoint exists yet; the next attempt starts from step 0"
        )
        if not (stop.killed_at_deadline or stop.aborted) and all(c == EXIT_PREEMPTED for c in codes.values()):
            # Every worker stopped cleanly before it trained a step: there was nothing new to save.
            what = detail.get("message") or "the workers stopped before training"
            return Outcome(EXIT_PREEMPTED, step, uri, f"preempted{took}: {what}; {stands}")
        if not workers_seen:
            return Outcome(
                EXIT_PREEMPTED, step, uri, f"preempted{took} before any worker started: nothing to save; {stands}"
            )
        if stop.killed_at_deadline:
            why = f"the workers were killed at the {stop.deadline:.0f}s stop deadline"
        elif stop.aborted:
            why = "the stop was aborted by a second interrupt"
        else:
            _, failures = _rank_failures(codes, stopping=True)
            why = f"the workers ended without one: {failures or f'torchrun exited {torchrun_rc}'}"
        msg = (
            f"preempted{took}: no emergency checkpoint was made durable ({why}); nothing partial is published; {stands}"
        )
        return Outcome(EXIT_PREEMPTED, step, uri, msg)

    if all(c is None for c in codes.values()) and not workers_seen:
        return Outcome(
            EXIT_CRASH,
            None,
            None,
            f"torchrun exited {torchrun_rc} before any worker reported (rendezvous or launch failure)",
        )
    code, failures = _rank_failures(codes)
    if torchrun_rc is not None and torchrun_rc < 0:
        failures = f"torchrun died of signal {-torchrun_rc}; its workers were killed; {failures}"
    if detail.get("exitCode") == code and detail.get("message"):
        message = f"{detail['message']} [{failures}]"
    else:
        message = f"{failures}; see that rank's log"
    return Outcome(code, detail.get("step"), detail.get("checkpointUri"), message,
                   detail.get("reason") if detail.get("exitCode") == code else None)  # fmt: skip


def write_termination_message(outcome: Outcome, environ: dict[str, str] | os._Environ[str] | None = None) -> None:
    env = os.environ if environ is None else environ
    named = env.get("TERMINATION_MESSAGE_PATH", "").strip()
    path = Path(named or TERMINATION_LOG)
    if not named and not path.exists():
        return  # not in a pod: do not create a file under /dev
    try:
        path.write_text(outcome.termination_message())
    except OSError as exc:
        if named:
            logger.warning("cannot write the termination message to %s: %s", path, exc)
