"""A .lock left in S3 by a run that was killed on this host is taken over; anything else is respected."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from dreambooth_trainer.checkpoint.owner import _dead_here

pytestmark = pytest.mark.unit


def _lock(pid: int, host: str) -> str:
    return f"a run, pid {pid} on {host}, since 2026-12-03T17:29:48Z [b53eef0418f2]"


def test_a_killed_run_on_this_host_is_gone_a_live_one_or_another_host_is_not() -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    here = socket.gethostname()
    assert _dead_here(_lock(dead_pid, here))
    assert not _dead_here(_lock(os.getpid(), here))  # alive: refused
    assert not _dead_here(_lock(dead_pid, here + "-elsewhere"))  # another host: cannot tell, refused
    assert not _dead_here("job 1234, since yesterday")  # not a lock this release wrote
