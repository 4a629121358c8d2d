"""PID 1 of a trainer pod: torchrun as a child, SIGTERM turned into an emergency checkpoint, exit codes mapped.

    python -m dreambooth_trainer.launch --config FILE [--nproc-per-node N]

FILE is ``{"method": "full"|"lora", "training": {...camelCase spec.training...}}``. N defaults to
``$PET_NPROC_PER_NODE`` or 1. torchrun reads the other ``PET_*`` variables the operator sets (PET_NNODES,
PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT, PET_RDZV_BACKEND, PET_MAX_RESTARTS) itself; with no
PET_MASTER_ADDR and one node the rendezvous is standalone on a free local port.

What the launcher adds to torchrun (DESIGN.md, launcher contract):

- Signals. On SIGTERM (or Ctrl-C) it sends SIGTERM to each worker's main process at once. Each worker finishes
  its current optimizer step, the ranks agree on the stop step, rank 0 publishes an emergency checkpoint, and
  the workers exit 75. Only the worker's main process is signalled, not its process group: DataLoader workers
  killed mid-step would turn a clean stop into a crash. Further SIGTERMs are ignored (the save goes on); a
  second Ctrl-C kills at once, which is safe because a checkpoint without its manifest does not exist.
- The stop deadline: ``$DREAMBOOTH_STOP_DEADLINE_SECONDS``, else ``$DREAMBOOTH_GRACE_SECONDS`` (the pod's
  terminationGracePeriodSeconds, default 120) minus a margin of 10% (at least 2 s, at most 10 s) for the
  launcher's own exit. When it passes, the launcher SIGKILLs every worker's process group (torchrun starts
  workers in their own sessions, so killing torchrun alone would orphan them) and torchrun's. torchrun's own
  shutdown timeout (30 s by default, after which it SIGKILLs the workers) is raised past the deadline so that
  only the launcher decides (where torchrun has --shutdown-timeout: torch 2.11's has not, and keeps its 30 s).
  If the launcher itself dies, torchrun gets SIGTERM (PR_SET_PDEATHSIG) and stops the workers the same
  graceful way.
- Exit codes: 0 done, 64 bad input, 70 crash, 71 GPU out of memory, 75 preempted (emergency checkpoint
  published, or none possible in time). torchrun exits 1 for any worker failure, so each worker leaves its own
  exit code in a per-rank result file and the launcher picks the root cause (bad input > GPU OOM > preempted >
  crash: a peer of an OOMed rank dies of a broken collective, which is not the cause).
- The termination message ``{"reason", "step", "checkpointUri", "message"}`` (at most 4 KiB of JSON) goes to
  ``$TERMINATION_MESSAGE_PATH``, default /dev/termination-log (written only if it exists when not named). After
  a SIGTERM, ``checkpointUri`` is the checkpoint the next attempt resumes from and the message says whether it
  is the emergency checkpoint or an older one that stands because the emergency one could not be made durable.

`dreambooth run` calls ``main(["--config", path, "--nproc-per-node", str(n)])`` in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import importlib.util
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreambooth_api.contract import EXIT_BAD_INPUT, EXIT_CRASH, EXIT_GPU_OOM, EXIT_OK, EXIT_PREEMPTED, REASONS

logger = logging.getLogger("dreambooth_trainer.launch")

DEFAULT_GRACE_SECONDS = 120.0
TERMINATION_LOG = "/dev/termination-log"
MESSAGE_LIMIT = 4096  # the kubelet truncates a termination message beyond 4096 bytes
POLL_SECONDS = 0.1
# torchrun SIGKILLs workers this long after our deadline at the earliest: the launcher's deadline comes first.
TORCHRUN_SHUTDOWN_SLACK_SECONDS = 5
# Of the failures a gang can show, the one that caused the others (see the module docstring).
ROOT_CAUSE_ORDER = (EXIT_BAD_INPUT, EXIT_GPU_OOM, EXIT_PREEMPTED, EXIT_CRASH)

RANK_RESULT_DIR_ENV = "DREAMBOOTH_RANK_RESULT_DIR"


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

    @property
    def reason(self) -> str:
        return REASONS.get(self.code, "Crashed")

    def termination_message(self) -> str:
        """The pod's termination message: JSON, at most MESSAGE_LIMIT bytes (the message is cut, never the JSON)."""
        doc = {"reason": self.reason, "step": self.step, "checkpointUri": self.checkpoint_uri, "message": self.message}
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
        return Outcome(
            EXIT_OK, detail.get("step"), detail.get("checkpointUri"), detail.get("message", "training finished")
        )

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
    return Outcome(code, detail.get("step"), detail.get("checkpointUri"), message)


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
            env[RANK_RESULT_DIR_ENV] = str(results)
            env["DREAMBOOTH_RESULT_FILE"] = str(results / "detail.json")
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
            from .storage import open_store

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


# ------------------------------------------------------------------------------------------------- worker side
# Set by SIGTERM between the worker's start and the trainer's own handler. Raising from the handler instead would
# interrupt whatever import is running, and torch half-imported crashes (seen: SystemError, then SIGSEGV).
_stop_while_starting = threading.Event()


def _note_early_sigterm(signum: int, frame: Any) -> None:  # noqa: ARG001
    _stop_while_starting.set()


def stop_requested_while_starting() -> bool:
    """True when SIGTERM reached this worker before the trainer installed its handler (train.install_sigterm)."""
    return _stop_while_starting.is_set()


def _worker_main(config: str) -> int:
    """One torchrun worker: the trainer, plus this rank's exit code left for the launcher."""
    signal.signal(signal.SIGTERM, _note_early_sigterm)
    try:
        from . import cli

        code = cli.main(["worker", "--config", config])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else EXIT_CRASH
    except BaseException:  # noqa: BLE001 - every failure must become an exit code
        traceback.print_exc()
        code = EXIT_CRASH
    result_dir = os.environ.get(RANK_RESULT_DIR_ENV)
    if result_dir:
        path = Path(result_dir) / f"rank-{os.environ.get('LOCAL_RANK', '0')}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"exitCode": code}))
        tmp.replace(path)  # the launcher never reads half a file
    return code


# ------------------------------------------------------------------------------------------------- entry point
def _setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s launcher %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreambooth_trainer.launch", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help='JSON: {"method": "full"|"lora", "training": {...}}')
    parser.add_argument(
        "--nproc-per-node", type=int, default=None, help="worker processes (default $PET_NPROC_PER_NODE or 1)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return _worker_main(args.config)
    request = StopRequest()
    restore = request.install()  # before anything slow: a SIGTERM now must not kill the launcher unreported
    try:
        _setup_logging()
        outcome = _launch(args, request)
        write_termination_message(outcome)
    finally:
        restore()
    log = logger.info if outcome.code == EXIT_OK else logger.error
    log("exit %d (%s): %s", outcome.code, outcome.reason, outcome.message)
    return outcome.code


def _launch(args: argparse.Namespace, request: StopRequest) -> Outcome:
    from dreambooth_api.config import ConfigError, parse_training

    config = Path(args.config)
    try:
        doc = json.loads(config.read_text())
        cfg = parse_training(doc.get("method", "full"), doc["training"])
        nproc = args.nproc_per_node or int(os.environ.get("PET_NPROC_PER_NODE", "1") or 1)
        deadline = stop_deadline()
    except ConfigError as exc:
        return Outcome(EXIT_BAD_INPUT, message=f"bad config {config}: {exc}")
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        return Outcome(EXIT_BAD_INPUT, message=f"cannot read the launcher config or settings ({config}): {exc!r}")
    if nproc < 1:
        return Outcome(EXIT_BAD_INPUT, message=f"--nproc-per-node must be at least 1, not {nproc}")
    try:
        return Launcher(config.resolve(), nproc, deadline, output_dir=cfg.output_dir, request=request).run()
    except Exception as exc:  # noqa: BLE001 - the launcher's own failure still needs an exit code and a message
        logger.exception("the launcher failed")
        return Outcome(EXIT_CRASH, message=f"the launcher failed: {exc!r}")


if __name__ == "__main__":
    # Through the package's module, not this `__main__` copy: train.py reads the early-SIGTERM flag from there.
    from dreambooth_trainer.launch import main as _main

    sys.exit(_main())
