"""The launcher's contract from real failures: each exit code, signals, orphans. The real launcher starts torchrun
and the workers. (The pure decisions are tested in tests/unit/test_launcher_decision.py.)
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from tests.preemption_utils import LaunchedRun, alive, descendants, training

from dreambooth_trainer.launcher import decision as launch

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------------------------- real failures
def test_bad_config_exits_64_before_any_worker_starts(tmp_path: Path) -> None:
    run = LaunchedRun(tmp_path, "full", training(str(tmp_path / "out"), resolution="big"))
    t0 = time.monotonic()
    assert run.run() == 64, run.log()
    assert time.monotonic() - t0 < 30 and launch.TORCHRUN_MODULE not in run.log()
    term = run.termination()
    assert term["reason"] == "BadInput" and "resolution" in term["message"]


def test_missing_instance_data_exits_64_from_the_worker(tmp_path: Path) -> None:
    run = LaunchedRun(tmp_path, "lora", training(str(tmp_path / "out"), "lora", instanceDataDir=str(tmp_path / "nope")))
    assert run.run() == 64, run.log()
    term = run.termination()
    assert term["reason"] == "BadInput" and "nope" in term["message"], term
    # The log ends with the cause in one line each from the worker and the launcher, not torchrun's banner.
    log = run.log()
    assert "ChildFailedError" not in log and "Traceback" not in log, log
    assert "torchrun: worker(s) failed: local rank 0 exit 64" in log, log


@pytest.mark.slow
def test_gpu_oom_on_one_rank_exits_71(tmp_path: Path) -> None:
    """A simulated torch.OutOfMemoryError on rank 1 of 2: the gang falls apart, the pod reports the OOM."""
    run = LaunchedRun(
        tmp_path, "lora", training(str(tmp_path / "out"), "lora", steps=6, ckpt=100), nproc=2,
        DREAMBOOTH_TEST_RAISE_OOM_AT_STEP="2", DREAMBOOTH_TEST_RAISE_OOM_ON_RANK="1",
    )  # fmt: skip
    assert run.run() == 71, run.log()
    term = run.termination()
    assert term["reason"] == "GPUOutOfMemory" and "local rank 1 exited 71" in term["message"], term


def test_crash_lets_the_checkpoint_in_flight_land_first(tmp_path: Path) -> None:
    """A crash while a periodic checkpoint is still being written: it is finished before the exit, so the retry
    resumes from it instead of from the one before (or from step 0)."""
    out = tmp_path / "out"
    run = LaunchedRun(
        tmp_path, "lora", training(str(out), "lora", steps=6, ckpt=2),
        DREAMBOOTH_TEST_RAISE_OOM_AT_STEP="3", DREAMBOOTH_TEST_SAVE_DELAY_SECONDS="3",
        DREAMBOOTH_TEST_SAVE_DELAY_KIND="periodic",
    )  # fmt: skip
    assert run.run() == 71, run.log()
    assert run.termination()["reason"] == "GPUOutOfMemory"
    assert (out / "checkpoint-2" / "manifest.json").is_file(), run.log()
    assert (out / "LATEST").read_text().strip() == "checkpoint-2"
    assert "the checkpoint in flight first: checkpoint-2 published" in run.log()


@pytest.mark.parametrize("victim", ["worker", "torchrun"])
def test_process_killed_mid_training_exits_70_and_leaves_no_orphans(victim: str, tmp_path: Path) -> None:
    """SIGKILL (the host's OOM killer) to the worker, or to torchrun, whose workers then live on in their own
    sessions unless the launcher kills their process groups."""
    train = training(str(tmp_path / "out"), "full", steps=30, ckpt=100)
    run = LaunchedRun(tmp_path, "full", train, DREAMBOOTH_TEST_STEP_DELAY_SECONDS="0.2").start()
    run.wait_until("step 2", lambda s: s["step"] >= 2)
    tree = run.tree()
    workers = _workers(run)
    assert len(workers) == 1, workers
    os.kill(workers[0] if victim == "worker" else tree[1], signal.SIGKILL)
    assert run.wait() == 70, run.log()
    term = run.termination()
    assert term["reason"] == "Crashed" and "local rank 0 died without a result" in term["message"], term
    if victim == "torchrun":
        assert "torchrun died of signal 9" in term["message"], term
    time.sleep(0.2)  # a SIGKILLed process is gone once the kernel has reaped it
    assert not [p for p in tree if alive(p)]


def test_sigterm_while_workers_start_exits_75_with_nothing_to_save(tmp_path: Path) -> None:
    run = LaunchedRun(tmp_path, "full", training(str(tmp_path / "out"), "full", steps=4, ckpt=100)).start()
    # SIGTERM while torchrun's workers import torch and load the model: nothing is trained, nothing saved.
    deadline = time.monotonic() + 60
    while not _workers(run):
        assert time.monotonic() < deadline and run.proc and run.proc.poll() is None, run.log()
        time.sleep(0.05)
    time.sleep(1.0)  # the worker is importing torch and diffusers now
    run.signal()
    assert run.wait() == 75, run.log()
    term = run.termination()
    assert term["reason"] == "Preempted" and term["checkpointUri"] is None, term
    assert "deadline" not in term["message"], term  # the worker stopped by itself, it was not killed
    assert "before the first step" in term["message"] and "starts from step 0" in term["message"], term
    assert not (tmp_path / "out" / "LATEST").exists()


def test_sigterm_before_any_worker_exits_75(tmp_path: Path) -> None:
    run = LaunchedRun(tmp_path, "full", training(str(tmp_path / "out"), "full", steps=4, ckpt=100)).start()
    time.sleep(0.5)  # torchrun is still importing torch
    tree = run.tree()
    run.signal()
    assert run.wait() == 75, run.log()
    term = run.termination()
    assert term["reason"] == "Preempted" and term["checkpointUri"] is None, term
    time.sleep(0.2)
    assert not [p for p in tree if alive(p)] and not (tmp_path / "out" / "LATEST").exists()


def _workers(run: LaunchedRun) -> list[int]:
    """The trainer processes: torchrun's children (torchrun's own command line names the worker module too)."""
    out = []
    for pid in descendants(run.tree()[0]):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"--worker" in cmd and launch.TORCHRUN_MODULE.encode() not in cmd:
            out.append(pid)
    return out


def test_launcher_module_help_runs_without_torch() -> None:
    import subprocess

    code = "import sys, dreambooth_trainer.launch; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
