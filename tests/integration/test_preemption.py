"""Preemption, end to end: real SIGTERM/SIGKILL to the real launcher's process tree (launcher -> torchrun ->
workers), on the tiny model, local folders and SeaweedFS.

Each interrupted run must exit 75 with a termination message; when the state can be made durable in time the
emergency checkpoint is the stop step and the same command then ends bit-identical to an uninterrupted run;
when it cannot (deadline, SIGKILL, a crash in the save) nothing partial is published and the previous
checkpoint is what a resume starts from.

Test-only knobs (documented in checkpoint.py and train.py): DREAMBOOTH_TEST_STEP_DELAY_SECONDS (so a signal
lands at a chosen step), DREAMBOOTH_TEST_SAVE_DELAY_SECONDS / _KIND (a slow upload),
DREAMBOOTH_TEST_CRASH_IN_EMERGENCY_SAVE (the process dies mid-save).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.preemption_utils import LaunchedRun, alive, training
from tests.trainer_utils import assert_identical, weights

pytestmark = pytest.mark.integration

STEPS = 8  # world size 1: 5 steps an epoch; world size 2: 3 steps an epoch (5 images, batch 1)
STEP_DELAY = "0.3"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int], Path]:
    """Final output of an uninterrupted launcher run per (method, world size), made once per module."""
    made: dict[tuple[str, int], Path] = {}

    def get(method: str, nproc: int) -> Path:
        if (method, nproc) not in made:
            work = tmp_path_factory.mktemp(f"baseline-{method}-{nproc}")
            run = LaunchedRun(work, method, training(str(work / "out"), method, steps=STEPS, ckpt=100), nproc=nproc)
            assert run.run() == 0, run.log()
            assert run.termination()["reason"] == "Completed"
            made[(method, nproc)] = work / "out"
        return made[(method, nproc)]

    return get


def _store(uri: str):  # noqa: ANN202
    from dreambooth_trainer.storage import open_store

    return open_store(uri)


def _final_weights(uri: str, method: str, scratch: Path) -> dict:
    store = _store(uri)
    if store.local_root() is not None:
        return weights(store.local_root(), method)
    rel = "pytorch_lora_weights.safetensors" if method == "lora" else "unet/diffusion_pytorch_model.safetensors"
    store.download_file(rel, scratch / rel)
    return weights(scratch, method)


def _assert_emergency_checkpoint(run: LaunchedRun, uri: str, nproc: int) -> int:
    """Exit 75, and the termination message names a complete checkpoint at the stop step; returns the step."""
    term = run.termination()
    assert term["reason"] == "Preempted", term
    stop = term["step"]
    store = _store(uri)
    assert term["checkpointUri"] == store.url(f"checkpoint-{stop}"), term
    assert "no emergency checkpoint" not in term["message"], term
    assert store.exists(f"checkpoint-{stop}/manifest.json")
    assert store.read_text("LATEST").strip() == f"checkpoint-{stop}"
    state = json.loads(store.read_bytes(f"checkpoint-{stop}/trainer_state.json"))
    assert state["global_step"] == stop and state["world_size"] == nproc
    return stop


def _resume_and_compare(tmp_path: Path, method: str, train: dict, nproc: int, ref: Path, stop: int) -> None:
    again = LaunchedRun(tmp_path, method, train, nproc=nproc, name="resume")
    assert again.run() == 0, again.log()
    assert f"/checkpoint-{stop} at step {stop}" in again.log(20000), again.log()
    assert_identical(weights(ref, method), _final_weights(train["outputDir"], method, tmp_path / "dl"))


def _assert_nothing_partial(uri: str, stop: int, previous: int) -> None:
    """The stop step's checkpoint does not exist (no manifest); LATEST and resume pick the previous one."""
    from dreambooth_trainer import checkpoint as ckpt

    store = _store(uri)
    assert not store.exists(f"checkpoint-{stop}/manifest.json")
    assert store.read_text("LATEST").strip() == f"checkpoint-{previous}"
    assert ckpt.checkpoint_steps(store)[0] == previous


# Extended tier (one SIGTERM mid-run, during an upload and at world size 2 stay in the default run).
@pytest.mark.extended
def test_sigterm_mid_epoch_with_a_second_sigterm_resumes_bit_exact(tmp_path: Path, baseline) -> None:
    """full, world size 1, local: SIGTERM early in a 5-step epoch, and again in the middle of the save."""
    out = tmp_path / "out"
    train = training(str(out), "full", steps=STEPS, ckpt=4)
    run = LaunchedRun(
        tmp_path, "full", train,
        DREAMBOOTH_TEST_STEP_DELAY_SECONDS=STEP_DELAY,
        DREAMBOOTH_TEST_SAVE_DELAY_SECONDS="1.5", DREAMBOOTH_TEST_SAVE_DELAY_KIND="emergency",
    ).start()  # fmt: skip
    seen = run.wait_until("step 1", lambda s: s["step"] >= 1)["step"]
    metrics = run.metrics()
    assert "dreambooth_step " in metrics and "dreambooth_checkpoint_stall_seconds_count" in metrics
    run.signal()
    run.wait_until("the emergency save", lambda s: s["phase"] == "Stopping")
    run.signal()  # a second SIGTERM in the middle of the save changes nothing
    assert run.wait() == 75, run.log()
    stop = _assert_emergency_checkpoint(run, out.as_uri(), 1)
    assert seen <= stop < 5, (seen, stop)  # the step running when SIGTERM came is finished, not abandoned
    # From its first report the resumed run names the checkpoint it started from (the operator's lastCheckpoint).
    again = LaunchedRun(tmp_path, "full", train, name="resume-progress", DREAMBOOTH_TEST_STEP_DELAY_SECONDS=STEP_DELAY)
    first = again.start().wait_until("the resumed run's progress", lambda s: s["step"] >= stop)
    assert (first["lastCheckpoint"] or {}).get("step", -1) >= stop, first
    assert again.wait() == 0, again.log()
    assert f"/checkpoint-{stop} at step {stop}" in again.log(20000), again.log()
    assert_identical(weights(baseline("full", 1), "full"), weights(out, "full"))


@pytest.mark.slow
def test_sigterm_during_an_upload_to_s3_resumes_bit_exact(tmp_path: Path, baseline, bucket: str) -> None:
    """full, world size 1, SeaweedFS: SIGTERM while checkpoint-3 is still uploading; it lands, then the stop step."""
    uri = f"s3://{bucket}/run"
    train = training(uri, "full", steps=STEPS, ckpt=3)
    run = LaunchedRun(
        tmp_path, "full", train,
        DREAMBOOTH_TEST_STEP_DELAY_SECONDS=STEP_DELAY,
        DREAMBOOTH_TEST_SAVE_DELAY_SECONDS="4", DREAMBOOTH_TEST_SAVE_DELAY_KIND="periodic",
    ).start()  # fmt: skip
    run.wait_until("step 4 with checkpoint-3 in flight", lambda s: s["step"] >= 4)
    assert run.progress()["lastCheckpoint"] is None, "checkpoint-3 was durable before the signal"
    run.signal()
    assert run.wait() == 75, run.log()
    stop = _assert_emergency_checkpoint(run, uri, 1)
    assert stop > 3
    assert _store(uri).exists("checkpoint-3/manifest.json"), "the upload in flight at SIGTERM was abandoned"
    _resume_and_compare(tmp_path, "full", train, 1, baseline("full", 1), stop)


# Extended tier (world size 2 SIGTERM: the mid-epoch S3 one stays in the default run).
@pytest.mark.extended
@pytest.mark.slow
def test_sigterm_right_after_a_periodic_checkpoint_world_size_2(tmp_path: Path, baseline) -> None:
    """LoRA, world size 2 (torchrun, gloo), local: SIGTERM as soon as checkpoint-2 is durable."""
    out = tmp_path / "out"
    train = training(str(out), "lora", steps=STEPS, ckpt=2)
    run = LaunchedRun(tmp_path, "lora", train, nproc=2, DREAMBOOTH_TEST_STEP_DELAY_SECONDS=STEP_DELAY).start()
    run.wait_until("checkpoint-2", lambda s: (s["lastCheckpoint"] or {}).get("step") == 2)
    run.signal()
    assert run.wait() == 75, run.log()
    stop = _assert_emergency_checkpoint(run, out.as_uri(), 2)
    assert 2 < stop < STEPS
    _resume_and_compare(tmp_path, "lora", train, 2, baseline("lora", 2), stop)


@pytest.mark.slow
def test_sigterm_mid_epoch_world_size_2_on_s3_with_auto_interval(tmp_path: Path, baseline, bucket: str) -> None:
    """LoRA, world size 2, SeaweedFS, checkpointingSteps auto: SIGTERM at step 4 (3 steps an epoch)."""
    uri = f"s3://{bucket}/run"
    # A preemption expected every 2 s makes Young/Daly checkpoint every step or two: periodic uploads are in
    # flight around the signal, and checkpointing settings stay outside the config hash (same baseline).
    train = training(uri, "lora", steps=STEPS, ckpt="auto", expectedPreemptionIntervalSeconds=2)
    run = LaunchedRun(tmp_path, "lora", train, nproc=2, DREAMBOOTH_TEST_STEP_DELAY_SECONDS=STEP_DELAY).start()
    seen = run.wait_until("step 4", lambda s: s["step"] >= 4)["step"]
    assert "dreambooth_checkpoint_interval_steps " in run.metrics()
    run.signal()
    assert run.wait() == 75, run.log()
    stop = _assert_emergency_checkpoint(run, uri, 2)
    assert seen <= stop < STEPS, (seen, stop)
    assert "checkpoint interval (auto): every" in run.log(100_000)
    _resume_and_compare(tmp_path, "lora", train, 2, baseline("lora", 2), stop)


def test_deadline_too_short_publishes_nothing_and_resume_uses_the_previous_checkpoint(tmp_path: Path, baseline) -> None:
    """The emergency save needs 60 s, the deadline is 2 s: workers killed, no manifest, checkpoint-3 stands."""
    out = tmp_path / "out"
    train = training(str(out), "full", steps=STEPS, ckpt=3)
    run = LaunchedRun(
        tmp_path, "full", train,
        DREAMBOOTH_TEST_STEP_DELAY_SECONDS=STEP_DELAY, DREAMBOOTH_STOP_DEADLINE_SECONDS="2",
        DREAMBOOTH_TEST_SAVE_DELAY_SECONDS="60", DREAMBOOTH_TEST_SAVE_DELAY_KIND="emergency",
    ).start()  # fmt: skip
    run.wait_until("checkpoint-3", lambda s: (s["lastCheckpoint"] or {}).get("step") == 3)
    run.signal()
    stop = run.wait_until("the emergency save", lambda s: s["phase"] == "Stopping")["step"]
    tree = run.tree()
    t0 = time.monotonic()
    assert run.wait(60) == 75, run.log()
    assert time.monotonic() - t0 < 20, "the launcher did not enforce its deadline"
    assert not [p for p in tree if alive(p)], "processes outlived the launcher"
    term = run.termination()
    assert term["reason"] == "Preempted" and term["step"] == 3, term
    assert term["checkpointUri"] == f"{out.as_uri()}/checkpoint-3"
    assert "no emergency checkpoint was made durable" in term["message"] and "deadline" in term["message"], term
    assert (out / f"checkpoint-{stop}").is_dir(), "the save was not under way when the deadline passed"
    _assert_nothing_partial(out.as_uri(), stop, 3)
    _resume_and_compare(tmp_path, "full", train, 1, baseline("full", 1), 3)


def test_sigkill_after_the_grace_period_leaves_no_partial_checkpoint(tmp_path: Path) -> None:
    """As the kubelet does when the grace period ends: SIGKILL to every process while the save is under way."""
    out = tmp_path / "out"
    run = LaunchedRun(
        tmp_path, "full", training(str(out), "full", steps=STEPS, ckpt=3),
        DREAMBOOTH_TEST_STEP_DELAY_SECONDS=STEP_DELAY,
        DREAMBOOTH_TEST_SAVE_DELAY_SECONDS="60", DREAMBOOTH_TEST_SAVE_DELAY_KIND="emergency",
    ).start()  # fmt: skip
    run.wait_until("checkpoint-3", lambda s: (s["lastCheckpoint"] or {}).get("step") == 3)
    run.signal()
    stop = run.wait_until("the emergency save", lambda s: s["phase"] == "Stopping")["step"]
    time.sleep(0.5)
    run.kill_tree()
    # The launcher never got to its final word; its provisional message still tells the operator why.
    term = run.termination()
    assert term["reason"] == "Preempted" and "under way" in term["message"], term
    assert (out / f"checkpoint-{stop}").is_dir()
    _assert_nothing_partial(out.as_uri(), stop, 3)


def test_worker_crash_during_the_emergency_save_leaves_no_partial_checkpoint(tmp_path: Path) -> None:
    """Rank 0 dies (SIGKILL) after writing the files, before the manifest: exit 75, checkpoint-3 stands."""
    out = tmp_path / "out"
    run = LaunchedRun(
        tmp_path, "full", training(str(out), "full", steps=STEPS, ckpt=3),
        DREAMBOOTH_TEST_STEP_DELAY_SECONDS=STEP_DELAY, DREAMBOOTH_TEST_CRASH_IN_EMERGENCY_SAVE="1",
    ).start()  # fmt: skip
    run.wait_until("checkpoint-3", lambda s: (s["lastCheckpoint"] or {}).get("step") == 3)
    stop = run.progress()["step"]
    run.signal()
    assert run.wait() == 75, run.log()
    term = run.termination()
    assert term["checkpointUri"] == f"{out.as_uri()}/checkpoint-3" and term["step"] == 3, term
    assert "no emergency checkpoint was made durable" in term["message"], term
    assert "local rank 0 died without a result" in term["message"], term
    crashed = [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if int(p.name.split("-")[1]) > 3]
    assert crashed and crashed[0] >= stop, "the crash did not happen inside a save"
    _assert_nothing_partial(out.as_uri(), crashed[0], 3)


# ---------------------------------------------------------------------------------------------- auto interval
def test_auto_interval_is_young_daly_in_steps() -> None:
    from dreambooth_trainer.checkpoint import CheckpointInterval

    iv = CheckpointInterval(mtbf_seconds=3600)
    assert iv.steps(None) is None  # speed unknown: no checkpoint decision yet
    assert iv.cost_seconds == CheckpointInterval.PRIOR_COST_SECONDS
    iv.observe_stall(2.0)
    iv.observe_publish(8.0)
    # Daly with C = 10 s, M = 1 h: sqrt(2CM)(1 + sqrt(C/2M)/3 + C/18M) - C = 261.7 s; Young alone says 268 s.
    assert iv.seconds() == pytest.approx(261.7, abs=0.1)
    assert iv.steps(2.0) == 523
    iv.observe_publish(28.0)  # costs are smoothed: (8 + 28) / 2 = 18 s upload now
    assert iv.cost_seconds == pytest.approx(20.0)
    assert iv.due(0, 2.0) is False and iv.due(iv.steps(2.0), 2.0) is True
    iv.saved(700)
    assert iv.due(701, 2.0) is False  # counted from the last checkpoint, not step % interval


def test_auto_interval_limits() -> None:
    from dreambooth_trainer.checkpoint import CheckpointInterval

    expensive = CheckpointInterval(mtbf_seconds=60)
    expensive.observe_publish(500.0)
    assert expensive.seconds() == 60  # cost above 2 x MTBF: checkpoint once per expected preemption
    slow_upload = CheckpointInterval(mtbf_seconds=20)
    slow_upload.observe_publish(30.0)  # Daly alone says 17.5 s
    assert slow_upload.seconds() == 30.0  # never more often than an upload takes: they would queue
    assert CheckpointInterval(1).steps(0.001) == 1  # at least every step


def test_streamed_safetensors_load_back_and_hash_what_was_written(tmp_path: Path) -> None:
    """checkpoint.write_safetensors (the emergency save's zero-copy writer) against safetensors' own loader."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    from dreambooth_trainer.checkpoint import layout as ckpt

    tensors = {
        "w": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "scalar": torch.tensor(3),
        "empty": torch.zeros(0),
        "mask": torch.tensor([True, False]),
        "strided": torch.arange(10, dtype=torch.int64)[::2],
        "big": torch.randint(0, 256, (9 << 20,), dtype=torch.uint8),  # above the parallel-hash threshold
    }
    path = tmp_path / "t.safetensors"
    f = ckpt._HashingSink(ckpt.LocalSink(path))
    ckpt.write_safetensors(tensors, f)
    f.sink.finish()
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert f.sha.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest() and f.size == path.stat().st_size
