"""The launcher's processes: torchrun as a child, SIGTERM forwarded to the workers, the deadline kill, reaping as
PID 1. Decisions are `decision`'s."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreambooth_api.contract import (
    ENV_RANK_RESULT_DIR,
    ENV_RESULT_FILE,
    EXIT_CRASH,
    EXIT_PREEMPTED,
)

from .decision import (
    POLL_SECONDS,
    Outcome,
    StopInfo,
    decide,
    torchrun_argv,
    torchrun_has_shutdown_timeout,
    write_termination_message,
)

logger = logging.getLogger("dreambooth_trainer.launch")


# ------------------------------------------------------------------------------------------------- processes
def _children_of(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (no /proc/PID/task/*/children on every kernel)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Field 4 is the parent pid; the command name (field 2) may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the launcher dies (SIGKILL included), torchrun gets SIGTERM
    # and stops the workers gracefully instead of training on, orphaned, into the same output folder.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class StopRequest:
    """SIGTERM/SIGINT, recorded from the launcher's first moment (the handler only records; the loop acts)."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.signum: int | None = None
        self.abort = False  # a second Ctrl-C

    def __call__(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self.at is None:
            self.at, self.signum = time.monotonic(), signum
        elif signum == signal.SIGINT and self.signum == signal.SIGINT:
            self.abort = True

    def install(self) -> Callable[[], None]:
        """Handle SIGTERM and SIGINT; returns what puts the previous handlers back."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not on the main thread: SIGTERM is not forwarded (run the launcher as the main program)")
            return lambda: None
        old = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}

        def restore() -> None:
            for s, h in old.items():
                signal.signal(s, h)

        return restore


@dataclass
class Launcher:
    config: Path
    nproc: int
    deadline: float
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    output_dir: str | None = None
    request: StopRequest = field(default_factory=StopRequest)

    def __post_init__(self) -> None:
        self.workers: dict[int, bool] = {}  # worker pid (= its process group) -> SIGTERM sent
        self.signalled_torchrun = False
        self.proc: subprocess.Popen[bytes] | None = None

    def run(self) -> Outcome:
        """Run torchrun to its end (handlers: the caller's `request.install()`, or installed here)."""
        restore = self.request.install() if signal.getsignal(signal.SIGTERM) is not self.request else lambda: None
        try:
            if self.request.at is not None:
                # The stop came while the launcher read its config: no worker to stop, nothing to save.
                stop = StopInfo(signal.Signals(self.request.signum or signal.SIGTERM).name, self.deadline)
                return decide(
                    nproc=self.nproc, rank_codes={}, detail=None, torchrun_rc=None, stop=stop, latest=self._latest
                )
            return self._run()
        finally:
            restore()

    def _run(self) -> Outcome:
        with tempfile.TemporaryDirectory(prefix="dreambooth-launch-") as tmp:
            results = Path(tmp)
            env = dict(self.environ)
            env[ENV_RANK_RESULT_DIR] = str(results)
            env[ENV_RESULT_FILE] = str(results / "detail.json")
            argv = torchrun_argv(
                self.config, self.nproc, self.deadline, env, shutdown_timeout_flag=torchrun_has_shutdown_timeout()
            )
            logger.info("launching %d worker(s): %s", self.nproc, " ".join(argv[1:]))
            rc, stop = self._supervise(argv, env)
            rank_codes = {r: _read_rank_code(results / f"rank-{r}.json") for r in range(self.nproc)}
            detail = _read_json(results / "detail.json")
        return decide(
            nproc=self.nproc, rank_codes=rank_codes, detail=detail, torchrun_rc=rc, stop=stop,
            node_rank=int(self.environ.get("PET_NODE_RANK", "0") or 0), workers_seen=len(self.workers),
            latest=self._latest,
        )  # fmt: skip

    def _supervise(self, argv: list[str], env: dict[str, str]) -> tuple[int | None, StopInfo | None]:
        # Its own session: a terminal's Ctrl-C reaches the launcher only, which stops the workers gracefully.
        self.proc = proc = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        pid1 = os.getpid() == 1
        stop: StopInfo | None = None
        rc: int | None = None
        next_scan = 0.0
        while rc is None:
            now = time.monotonic()
            if now >= next_scan or self.request.at is not None:
                for child in _children_of(proc.pid):
                    self.workers.setdefault(child, False)
                next_scan = now + 1.0
            if self.request.at is not None:
                if stop is None:
                    stop = StopInfo(signal.Signals(self.request.signum or signal.SIGTERM).name, self.deadline)
                    logger.warning(
                        "%s: each worker finishes its step, then an emergency checkpoint; stop deadline %.0fs",
                        stop.signal_name, self.deadline,
                    )  # fmt: skip
                    # Provisional: if the kubelet SIGKILLs us before the final word, the pod still says why.
                    provisional = (
                        f"{stop.signal_name}: emergency checkpoint under way (deadline {self.deadline:.0f}s); the "
                        "launcher was killed before it finished, so the newest complete checkpoint (LATEST) stands"
                    )
                    write_termination_message(Outcome(EXIT_PREEMPTED, message=provisional), self.environ)
                self._forward_stop(proc)
                late = now - self.request.at >= self.deadline
                if (late or self.request.abort) and not (stop.killed_at_deadline or stop.aborted):
                    stop.killed_at_deadline, stop.aborted = late, self.request.abort and not late
                    logger.error(
                        "%s: killing the workers; a checkpoint cut short has no manifest, so it does not exist",
                        "stop deadline passed" if late else "second interrupt",
                    )
                    self._kill_all(proc)
            rc = self._reap(proc, pid1)
            if rc is None:
                time.sleep(POLL_SECONDS)
        if stop is not None and self.request.at is not None:
            stop.seconds = time.monotonic() - self.request.at
        if (rc is not None and rc < 0) or self.signalled_torchrun:
            # torchrun died of a signal (ours at the deadline, or the OOM killer), or was stopped mid-launch: it
            # may not have stopped every worker. Otherwise it waited for them, and a long-gone pid is not worth
            # a kill (pids get reused).
            self._kill_orphans()
        return rc, stop

    def _forward_stop(self, proc: subprocess.Popen[bytes]) -> None:
        if not self.workers:
            # Still in rendezvous: no worker to checkpoint; torchrun stops itself on SIGTERM. Once only: its
            # handler raises, and a second signal would cut its own shutdown short.
            if not self.signalled_torchrun:
                self.signalled_torchrun = True
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            return
        for pid, sent in self.workers.items():
            if not sent:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                self.workers[pid] = True

    def _kill_all(self, proc: subprocess.Popen[bytes]) -> None:
        for pgid in list(self.workers):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def _kill_orphans(self) -> None:
        for pgid in list(self.workers):
            if _group_alive(pgid):
                logger.warning("worker process group %d outlived torchrun: killing it", pgid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)

    def _reap(self, proc: subprocess.Popen[bytes], pid1: bool) -> int | None:
        """torchrun's exit code once it exited; as PID 1 also reap every orphan the kernel hands us."""
        target = -1 if pid1 else proc.pid
        while True:
            try:
                pid, status = os.waitpid(target, os.WNOHANG)
            except ChildProcessError:
                return proc.returncode if proc.returncode is not None else EXIT_CRASH
            if pid == 0:
                return None
            if pid == proc.pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode
            if not pid1:
                return None

    def _latest(self) -> tuple[int | None, str | None]:
        """The newest complete checkpoint in the output folder, looked up within a few seconds or not at all."""
        if not self.output_dir:
            return None, None
        found: list[tuple[int | None, str | None]] = []

        def look() -> None:
            from ..storage import open_store

            store = open_store(self.output_dir or "")
            name = store.read_text("LATEST").strip()
            if store.exists(f"{name}/manifest.json"):
                found.append((int(name.rsplit("-", 1)[1]), store.url(name)))

        t = threading.Thread(target=look, name="latest-checkpoint", daemon=True)
        t.start()
        t.join(timeout=5.0)
        return found[0] if found else (None, None)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _read_rank_code(path: Path) -> int | None:
    doc = _read_json(path)
    return int(doc["exitCode"]) if doc and isinstance(doc.get("exitCode"), int) else None
