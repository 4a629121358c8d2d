"""Run the real launcher (PID-1 style) as a subprocess, watch it through /progress, signal its process tree.

Used by tests/integration/test_preemption*.py, test_launch*.py and benchmarks/preemption.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOG = REPO / "examples" / "data" / "dog"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training(output: str, method: str = "full", *, steps: int = 8, ckpt: int | str = 4, **extra: Any) -> dict[str, Any]:
    """spec.training for the tiny model: resolution 32, batch 1 (5 images: 5 steps an epoch at world size 1)."""
    doc: dict[str, Any] = {
        "pretrainedModelNameOrPath": "tiny://",
        "instanceDataDir": str(DOG),
        "instancePrompt": "a photo of sks dog",
        "outputDir": output,
        "resolution": 32,
        "trainBatchSize": 1,
        "maxTrainSteps": steps,
        "checkpointingSteps": ckpt,
        "seed": 7,
    }
    doc.update(extra)
    return doc


def descendants(pid: int) -> list[int]:
    """`pid`'s process tree below it, from /proc (workers run in their own sessions, so groups do not find them)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            parent[int(entry)] = int(stat[stat.rfind(b")") + 2 :].split()[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


class LaunchedRun:
    """`python -m dreambooth_trainer.launch --config FILE` with its own progress port and termination-message file."""

    def __init__(
        self, workdir: Path, method: str, train: dict[str, Any], *, nproc: int = 1, name: str = "run", **env: str
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / f"{name}.json"
        self.config.write_text(json.dumps({"method": method, "training": train}))
        self.log_path = workdir / f"{name}.log"
        self.termination_path = workdir / f"{name}.termination"
        self.port = free_port()
        self.env = dict(os.environ)
        self.env.update({
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PROGRESS_PORT": str(self.port), "TERMINATION_MESSAGE_PATH": str(self.termination_path),
        })  # fmt: skip
        self.env.update(env)
        self.argv = [
            sys.executable,
            "-m",
            "dreambooth_trainer.launch",
            "--config",
            str(self.config),
            "--nproc-per-node",
            str(nproc),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> LaunchedRun:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        return self

    def run(self, timeout: float = 300) -> int:
        return self.start().wait(timeout)

    def wait(self, timeout: float = 300) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            raise AssertionError(f"launcher still running after {timeout}s\n{self.log()}") from None

    def log(self, tail: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def progress(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/progress", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
            return r.read().decode()

    def wait_until(self, what: str, check, timeout: float = 120) -> dict[str, Any]:  # noqa: ANN001
        """Poll /progress until check(snapshot) holds; fail if the launcher exits first."""
        assert self.proc is not None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            snap = self.progress()
            if snap is not None and check(snap):
                return snap
            if self.proc.poll() is not None:
                raise AssertionError(f"launcher exited {self.proc.returncode} before {what}\n{self.log()}")
            time.sleep(0.03)
        self.kill_tree()
        raise AssertionError(f"timed out waiting for {what}\n{self.log()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def tree(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid, *descendants(self.proc.pid)]

    def kill_tree(self) -> None:
        """What the kubelet does after the grace period: SIGKILL every process of the container."""
        for pid in self.tree():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def termination(self) -> dict[str, Any]:
        text = self.termination_path.read_text()
        assert len(text.encode()) <= 4096
        return json.loads(text)
