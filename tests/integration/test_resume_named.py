"""A job whose manifest names a checkpoint (`resumeFromCheckpoint: checkpoint-N`) starts there once: its later
attempts (after a preemption) continue from the checkpoints the job itself wrote, never from N again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preemption_utils import LaunchedRun, training
from trainer_utils import assert_identical, run_dreambooth, tiny_args, weights

pytestmark = pytest.mark.integration
STEPS = 8
DELAY = "1.0"  # slow steps, so each SIGTERM lands mid-run (never changes the math)


def _preempt(run: LaunchedRun, after: int) -> int:
    """SIGTERM once the run is past step `after`; the emergency checkpoint's step."""
    run.start().wait_until(f"step {after + 1}", lambda s: s["step"] > after)
    run.signal()
    assert run.wait() == 75, run.log()
    return run.termination()["step"]


# Extended tier (four real runs, ~100 s here): the default run keeps the decision's table below.
@pytest.mark.extended
def test_a_later_attempt_continues_from_the_jobs_own_checkpoint_not_the_named_one(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    run_dreambooth(["train-lora", *tiny_args(ref, steps=STEPS, ckpt=100, batch=1)])

    out = tmp_path / "out"
    train = training(str(out), "lora", steps=STEPS, ckpt=100)
    # A run outside the operator (no job UID) stopped early: its checkpoint is the one the job's manifest names.
    named = _preempt(LaunchedRun(tmp_path, "lora", train, name="other", DREAMBOOTH_TEST_STEP_DELAY_SECONDS=DELAY), 0)
    job_train = {**train, "resumeFromCheckpoint": f"checkpoint-{named}"}
    job = {"DREAMBOOTH_JOB_UID": "job-1", "DREAMBOOTH_TEST_STEP_DELAY_SECONDS": DELAY}

    # Attempt 1 starts from the named checkpoint and is preempted further on.
    attempt1 = LaunchedRun(tmp_path, "lora", job_train, name="attempt-1", DREAMBOOTH_ATTEMPT="1", **job)
    stop = _preempt(attempt1, named)
    assert f"/checkpoint-{named} at step {named}" in attempt1.log(20000), attempt1.log()
    assert stop > named and json.loads((out / f"checkpoint-{stop}" / "manifest.json").read_text())["jobUid"] == "job-1"

    # Attempt 2, same manifest: from the job's own emergency checkpoint, not the named one (lost work).
    attempt2 = LaunchedRun(tmp_path, "lora", job_train, name="attempt-2", DREAMBOOTH_ATTEMPT="2",
                           DREAMBOOTH_JOB_UID="job-1")  # fmt: skip
    assert attempt2.run() == 0, attempt2.log()
    log = attempt2.log(40000)
    assert f"this job wrote checkpoint-{stop} since" in log and f"/checkpoint-{stop} at step {stop}" in log, log
    assert_identical(weights(out, "lora"), weights(ref, "lora"))  # exact: the uninterrupted run's model


def test_checkpoints_of_other_runs_and_damaged_ones_are_never_taken(tmp_path: Path) -> None:
    from dreambooth_trainer.checkpoint import continue_named
    from dreambooth_trainer.storage import open_store

    store = open_store(tmp_path.as_uri())
    for step, uid in ((2, ""), (4, "job-1"), (6, "job-2"), (8, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        manifest = "{not json" if uid is None else json.dumps({"format": 3, "step": step, "jobUid": uid, "files": {}})
        (tmp_path / f"checkpoint-{step}" / "manifest.json").write_text(manifest)
    cases = {
        ("checkpoint-2", "job-1"): "checkpoint-4",  # the job's own, past the other job's 6 and the damaged 8
        ("checkpoint-2", "job-2"): "checkpoint-6",
        ("checkpoint-2", "job-3"): "checkpoint-2",  # nothing of this job yet: its first attempt
        ("checkpoint-4", "job-1"): "checkpoint-4",
        ("checkpoint-6", "job-1"): "checkpoint-6",  # older ones of the job never override a newer named one
        ("checkpoint-2", ""): "checkpoint-2",  # `dreambooth train` (no job): the scripts' meaning, always N
        ("latest", "job-1"): "latest",
        (None, "job-1"): None,
    }
    assert {k: continue_named(store, *k) for k in cases} == cases
