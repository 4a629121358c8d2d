"""Each data-parallel rank uploads its share of an S3 checkpoint (issue 27, item 1; checkpoint/shares.py).

World size 2 (torchrun, gloo, CPU) through the real launcher into SeaweedFS, with a 64 MiB padded state so the
large files span several 16 MiB parts. What a user cares about: rank 1 really uploads about half the bytes, the
checkpoint is the same format 3 a single rank writes (verified file by file), a SIGTERM's emergency checkpoint is
shared too and resumes bit-exact, the state round-trips tensor for tensor across world sizes 2 -> 1 and 1 -> 2,
a rank whose share fails costs nothing but time (rank 0 uploads alone), and no multipart upload and no `.shares/`
object is ever left behind.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.preemption_utils import LaunchedRun, training
from tests.trainer_utils import assert_identical, weights

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 8  # world size 2: 3 steps an epoch
# Both ranks run on this one host, which by default (one uploader per node) shares nothing: `rank` makes each
# rank an uploader, as on a node with a NIC per GPU.
PAD = {"DREAMBOOTH_TEST_PAD_STATE_MB": "64", "DREAMBOOTH_CHECKPOINT_SHARES": "rank"}
SHARE_LINE = re.compile(
    r"(checkpoint-\d+) shares: rank 0 (\d+) parts ([\d.]+) MiB \(\d+%\), rank 1 (\d+) parts ([\d.]+) MiB"
)


def _store(uri: str):  # noqa: ANN202
    from dreambooth_trainer.storage import open_store

    return open_store(uri)


def _nothing_left(uri: str) -> None:
    """No multipart upload open and no coordination object of the shares under the output."""
    from dreambooth_trainer.storage.s3 import incomplete_uploads

    store = _store(uri)
    assert incomplete_uploads(store, "") == []
    assert store.list(".shares") == []


def _shares_in(log: str) -> dict[str, tuple[int, float, int, float]]:
    return {m[0]: (int(m[1]), float(m[2]), int(m[3]), float(m[4])) for m in SHARE_LINE.findall(log)}


def _assert_restored_equals(dump: Path, folder: Path, ranks: int) -> None:
    """What each rank restored equals the checkpoint's files, tensor for tensor (torch.equal)."""
    from safetensors.torch import load_file

    saved_weights = load_file(folder / "unet/diffusion_pytorch_model.safetensors")
    saved_optim = torch.load(folder / "training/optimizer.pt", weights_only=False)
    for rank in range(ranks):
        got = torch.load(dump / f"rank-{rank}.pt", weights_only=False)
        assert got["weights"], "nothing trained was restored"
        for name, tensor in got["weights"].items():
            assert torch.equal(tensor, saved_weights[name]), name
        assert got["optimizer"]["param_groups"] == saved_optim["param_groups"]
        assert got["optimizer"]["state"].keys() == saved_optim["state"].keys() and saved_optim["state"]
        for pid, state in saved_optim["state"].items():
            for key, value in state.items():
                mine = got["optimizer"]["state"][pid][key]
                assert torch.equal(mine, value) if isinstance(value, torch.Tensor) else mine == value, (pid, key)


def _fetch(uri: str, step: int, dest: Path):  # noqa: ANN202
    from dreambooth_trainer import checkpoint as ckpt

    return ckpt.verify_and_fetch(_store(uri), step, dest)  # every file's size and sha256 checked


def _copy_checkpoint(src_uri: str, step: int, dst_uri: str) -> None:
    """checkpoint-N (and LATEST) of one output into another, byte for byte."""
    src, dst = _store(src_uri), _store(dst_uri)
    for info in src.list(f"checkpoint-{step}"):
        dst.write_bytes(info.key, src.read_bytes(info.key))
    dst.write_bytes("LATEST", f"checkpoint-{step}\n".encode())


@pytest.fixture(scope="module")
def baseline_ws2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("shares-baseline")
    run = LaunchedRun(work, "full", training(str(work / "out"), "full", steps=STEPS, ckpt=100), nproc=2)
    assert run.run() == 0, run.log()
    return work / "out"


@pytest.fixture(scope="module")
def preempted_ws2(tmp_path_factory: pytest.TempPathFactory, s3) -> dict[str, Any]:  # noqa: ANN001
    """A world-size-2 run to S3: checkpoint-3 shared, then SIGTERM and a shared emergency checkpoint."""
    s3.make_bucket(bucket := f"shares-{uuid.uuid4().hex[:8]}")
    work = tmp_path_factory.mktemp("shares-preempted")
    uri = f"s3://{bucket}/run"
    train = training(uri, "full", steps=STEPS, ckpt=3)
    run = LaunchedRun(work, "full", train, nproc=2, DREAMBOOTH_TEST_STEP_DELAY_SECONDS="0.5", **PAD).start()
    run.wait_until("checkpoint-3", lambda s: (s["lastCheckpoint"] or {}).get("step") == 3, timeout=240)
    run.signal()
    assert run.wait() == 75, run.log()
    term = run.termination()
    assert term["reason"] == "Preempted" and "no emergency checkpoint" not in term["message"], term
    return {"uri": uri, "train": train, "stop": term["step"], "log": run.log(400_000), "work": work}


def test_both_ranks_upload_their_share_of_periodic_and_emergency_checkpoints_and_resume_bit_exact(
    preempted_ws2: dict[str, Any], baseline_ws2: Path, tmp_path: Path
) -> None:
    from dreambooth_trainer import checkpoint as ckpt

    uri, stop, log = preempted_ws2["uri"], preempted_ws2["stop"], preempted_ws2["log"]
    assert 3 < stop < STEPS
    shared = _shares_in(log)
    for name in ("checkpoint-3", f"checkpoint-{stop}"):  # the periodic one and the emergency one
        parts0, mib0, parts1, mib1 = shared[name]
        assert parts1 >= 2 and mib1 >= 32, shared[name]  # half of the padding's four parts, and more
        # About half each: the padding's parts alternate; rank 0 alone writes the small files (~11 MiB here).
        assert 0.4 < mib1 / (mib0 + mib1) <= 0.5, shared[name]
    assert "rank 0 uploads the whole checkpoint itself" not in log
    store = _store(uri)
    assert ckpt.read_latest(store) == stop
    for step in (3, stop):
        loaded = _fetch(uri, step, tmp_path / f"fetch-{step}")
        manifest = loaded.manifest
        assert manifest["format"] == 3 and manifest["worldSize"] == 2
        assert manifest["files"]["training/test-padding.safetensors"]["size"] > 64 << 20
    _nothing_left(uri)  # .shares/ removed at the emergency's end, every upload completed

    # The same command resumes at world size 2 (its checkpoints shared again) and ends bit-identical.
    again = LaunchedRun(tmp_path, "full", preempted_ws2["train"], nproc=2, name="resume",
                        DREAMBOOTH_TEST_DUMP_RESTORED=str(tmp_path / "dump"), **PAD)  # fmt: skip
    assert again.run() == 0, again.log()
    assert f"/checkpoint-{stop} at step {stop}" in again.log(40_000), again.log()
    _assert_restored_equals(tmp_path / "dump", loaded.folder, 2)
    if stop < 6:
        assert "checkpoint-6" in _shares_in(again.log(400_000))
    rel = "unet/diffusion_pytorch_model.safetensors"
    store.download_file(rel, tmp_path / "dl" / rel)
    assert_identical(weights(baseline_ws2, "full"), weights(tmp_path / "dl", "full"))
    _nothing_left(uri)


@pytest.mark.extended
def test_state_round_trips_across_world_sizes_2_to_1_and_1_to_2(
    preempted_ws2: dict[str, Any], tmp_path: Path, bucket: str
) -> None:
    """A shared world-size-2 checkpoint loads at world size 1, and one written at world size 1 loads at world size
    2, each restoring exactly the saved optimizer state and trained weights (the data order is re-sharded)."""
    uri, stop = preempted_ws2["uri"], preempted_ws2["stop"]
    ws1 = f"s3://{bucket}/ws1"
    _copy_checkpoint(uri, stop, ws1)
    # A checkpoint every step (an operational setting, outside the config hash): the step after `stop` is always
    # one this world-size-1 run wrote itself, wherever the SIGTERM landed (stop is 4 to 7).
    train1 = training(ws1, "full", steps=STEPS, ckpt=1)
    run = LaunchedRun(tmp_path, "full", train1, name="ws1", DREAMBOOTH_TEST_DUMP_RESTORED=str(tmp_path / "d1"))
    assert run.run() == 0, run.log()
    assert "world size 2 at world size 1" in run.log(40_000)
    _assert_restored_equals(tmp_path / "d1", _fetch(uri, stop, tmp_path / "f2").folder, 1)

    # The first checkpoint that world-size-1 run wrote, resumed at world size 2.
    written = stop + 1
    ws2 = f"s3://{bucket}/ws2"
    _copy_checkpoint(ws1, written, ws2)
    train2 = training(ws2, "full", steps=STEPS, ckpt=3)
    again = LaunchedRun(tmp_path, "full", train2, nproc=2, name="ws2",
                        DREAMBOOTH_TEST_DUMP_RESTORED=str(tmp_path / "d2"))  # fmt: skip
    assert again.run() == 0, again.log()
    assert "world size 1 at world size 2" in again.log(40_000)
    _assert_restored_equals(tmp_path / "d2", _fetch(ws1, written, tmp_path / "f1").folder, 2)
    _nothing_left(ws1)
    _nothing_left(ws2)


@pytest.mark.parametrize(
    "fault", ["bad-sha", pytest.param("no-report", marks=pytest.mark.extended)]
)  # fmt: skip
def test_a_failed_share_falls_back_to_rank_0_alone_with_nothing_left_open(
    tmp_path: Path, bucket: str, fault: str
) -> None:
    """Rank 1 reports another sha256 (the replicas differ), or never reports: rank 0 aborts the shared uploads and
    uploads the whole checkpoint itself; the checkpoint is complete and correct."""
    uri = f"s3://{bucket}/run"
    train = training(uri, "full", steps=3, ckpt=3)
    env = {"DREAMBOOTH_TEST_SHARE_FAULT": fault, "DREAMBOOTH_CHECKPOINT_SHARE_TIMEOUT_SECONDS": "3", **PAD}
    run = LaunchedRun(tmp_path, "full", train, nproc=2, **env)
    assert run.run() == 0, run.log()
    log = run.log(400_000)
    why = "the replicas differ" if fault == "bad-sha" else "rank 1 sent no report in time"
    assert why in log and "rank 0 uploads the whole checkpoint itself" in log, log[-6000:]
    assert "checkpoint-3 shares:" not in log
    assert _fetch(uri, 3, tmp_path / "fetch").manifest["worldSize"] == 2
    _nothing_left(uri)


@pytest.mark.extended
def test_rank_0_killed_mid_shared_upload_leaves_the_previous_checkpoint_and_nothing_open(
    tmp_path: Path, bucket: str, baseline_ws2: Path
) -> None:
    """SIGTERM, then rank 0 dies (SIGKILL) after two parts of the shared emergency checkpoint, while rank 1 uploads
    its share: the periodic checkpoint stays LATEST, the next run aborts every upload and removes `.shares/` of
    the dead one, resumes from it and ends bit-exact."""
    from dreambooth_trainer import checkpoint as ckpt
    from dreambooth_trainer.storage.s3 import incomplete_uploads

    uri = f"s3://{bucket}/run"
    train = training(uri, "full", steps=STEPS, ckpt=3)
    env = {"DREAMBOOTH_TEST_STEP_DELAY_SECONDS": "0.5", **PAD}
    run = LaunchedRun(tmp_path, "full", train, nproc=2, DREAMBOOTH_TEST_KILL_IN_EMERGENCY_SAVE="mid-parts", **env)
    run.start().wait_until("checkpoint-3", lambda s: (s["lastCheckpoint"] or {}).get("step") == 3, timeout=240)
    run.signal()
    assert run.wait() != 0, run.log()
    assert "test hook: the process dies" in run.log(400_000)
    store = _store(uri)
    assert ckpt.read_latest(store) == 3 and ckpt.checkpoint_steps(store)[0] == 3
    assert incomplete_uploads(store, ""), "the kill left no open multipart upload: it did not happen mid-share"
    again = LaunchedRun(tmp_path, "full", train, nproc=2, name="resume", **env)
    assert again.run() == 0, again.log()
    assert "/checkpoint-3 at step 3" in again.log(400_000), again.log()
    _nothing_left(uri)
    rel = "unet/diffusion_pytorch_model.safetensors"
    store.download_file(rel, tmp_path / "final" / rel)
    assert_identical(weights(baseline_ws2, "full"), weights(tmp_path / "final", "full"))
