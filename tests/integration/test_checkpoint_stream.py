"""Checkpoints streamed from the RAM snapshot straight to their destination (issue 27, item 1).

S3 (SeaweedFS): every file goes up as a multipart upload from memory, parts in parallel, nothing on local disk;
local folders: parallel writers, one fsync per file. What a user cares about: the checkpoint reads back
bit-exact, a failure or an outage mid-stream leaves the previous checkpoint LATEST and no multipart upload
behind, and a killed publish's uploads are aborted at the next start — only ours.

The kill -9 variants at each point of a streamed upload run the real launcher (tests below the in-process ones).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from tests.preemption_utils import LaunchedRun, training
from tests.trainer_utils import assert_identical, weights

pytestmark = pytest.mark.integration

MiB = 1 << 20


def _store(uri: str, **kw):  # noqa: ANN202
    from dreambooth_trainer.storage import open_store
    from dreambooth_trainer.storage.s3 import S3Store

    return S3Store(uri, **kw) if uri.startswith("s3://") and kw else open_store(uri)


def _snapshot(step: int, mb: int = 24, seed: int = 0):  # noqa: ANN202
    from dreambooth_trainer import checkpoint as ckpt

    gen = torch.Generator().manual_seed(seed + step)
    weights_ = {"a.weight": torch.randn(mb * MiB // 8, generator=gen), "b.bias": torch.randn(7, generator=gen)}
    weights_["half"] = torch.randn(333, generator=gen).to(torch.bfloat16)
    optim = {"state": {0: {"exp_avg": torch.randn(mb * MiB // 8, generator=gen), "step": torch.tensor(3.0)}},
             "param_groups": [{"lr": 1e-4, "params": [0]}]}  # fmt: skip
    snap = ckpt.Snapshot(state=ckpt.TrainState(global_step=step, config_hash="h", method="full"))
    snap.tensors["unet/diffusion_pytorch_model.safetensors"] = weights_
    snap.tensors["empty/diffusion_pytorch_model.safetensors"] = {}
    snap.objects["training/optimizer.pt"] = optim
    snap.texts["unet/config.json"] = '{"x": 1}'
    return snap


def _publisher(store, tmp_path: Path):  # noqa: ANN202
    from dreambooth_trainer import checkpoint as ckpt

    pub = ckpt.Publisher(store, tmp_path / "scratch", None)
    pub.part_size = 5 * MiB  # several parts per file, in parallel
    pub.part_concurrency = 4
    return pub


def _assert_reads_back(store, step: int, tmp_path: Path, mb: int = 24) -> None:
    from safetensors.torch import load_file

    from dreambooth_trainer import checkpoint as ckpt

    snap = _snapshot(step, mb)
    loaded = ckpt.verify_and_fetch(store, step, tmp_path / "fetch")  # sizes and sha256 of every file
    assert loaded.state.global_step == step
    assert_identical(load_file(loaded.folder / "unet/diffusion_pytorch_model.safetensors"),
                     snap.tensors["unet/diffusion_pytorch_model.safetensors"])  # fmt: skip
    optim = torch.load(loaded.folder / "training/optimizer.pt", weights_only=True)
    assert torch.equal(optim["state"][0]["exp_avg"], snap.objects["training/optimizer.pt"]["state"][0]["exp_avg"])
    assert (loaded.folder / "unet/config.json").read_text() == '{"x": 1}'


def _uploads(store) -> list[str]:  # noqa: ANN001
    from dreambooth_trainer.storage.s3 import incomplete_uploads

    return [key for key, _ in incomplete_uploads(store, "")]


def test_streamed_checkpoint_reads_back_bit_exact_on_s3_and_local(tmp_path: Path, bucket: str) -> None:
    from dreambooth_trainer import checkpoint as ckpt

    for uri in (f"s3://{bucket}/run", str(tmp_path / "out")):
        store = _store(uri)
        pub = _publisher(store, tmp_path)
        pub.submit(_snapshot(2), background=False)
        pub.submit(_snapshot(4))
        pub.wait()
        assert ckpt.read_latest(store) == 4
        for step in (2, 4):
            _assert_reads_back(store, step, tmp_path / uri.replace("/", "_"))
        if uri.startswith("s3://"):
            assert _uploads(store) == []
            # Nothing on the run's local disk: the scratch folder the old path staged into is never made.
            assert not (tmp_path / "scratch").exists()


def test_s3_outage_mid_stream_is_retried_and_a_long_one_leaves_the_previous_checkpoint(
    tmp_path: Path, s3, bucket: str
) -> None:
    from dreambooth_trainer import checkpoint as ckpt
    from dreambooth_trainer.storage import StorageError

    def outage_during_upload(store, seconds: float) -> threading.Thread:  # noqa: ANN001
        def run() -> None:
            while not _uploads(store):  # the stream has begun: a multipart upload is open
                time.sleep(0.01)
            s3.stop()
            time.sleep(seconds)
            s3.start()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    store = _store(f"s3://{bucket}/run", retry_deadline_s=60)
    pub = _publisher(store, tmp_path)
    pub.part_concurrency = 1  # slow enough that the outage lands mid-stream
    pub.submit(_snapshot(2, mb=4), background=False)
    # A short outage: the parts are retried and the checkpoint lands.
    t = outage_during_upload(store, 1.0)
    pub.submit(_snapshot(4, mb=48), background=False)
    t.join()
    assert ckpt.read_latest(store) == 4
    _assert_reads_back(store, 4, tmp_path / "a", 48)
    assert _uploads(store) == []

    # An outage longer than the retry deadline: the publish fails, LATEST stays, and the next start's sweep
    # aborts what the failed abort could not.
    short = _store(f"s3://{bucket}/run", retry_deadline_s=3)
    pub = _publisher(short, tmp_path)
    pub.part_concurrency = 1
    t = outage_during_upload(short, 8.0)
    with pytest.raises(StorageError, match="cannot reach S3"):
        pub.submit(_snapshot(6, mb=48), background=False)
    t.join()
    assert ckpt.read_latest(store) == 4 and ckpt.checkpoint_steps(store)[0] == 4
    claim = ckpt.claim_output(store, "job-1")
    claim.release()
    assert _uploads(store) == []
    _assert_reads_back(store, 4, tmp_path / "b", 48)


def test_the_start_aborts_only_our_stale_multipart_uploads(bucket: str) -> None:
    from dreambooth_trainer import checkpoint as ckpt

    store = _store(f"s3://{bucket}/run")
    client = store.client
    ours = ["run/checkpoint-7/training/optimizer.pt", "run/checkpoint-7/unet/diffusion_pytorch_model.safetensors"]
    not_ours = ["run/checkpoint-7/notes.bin", "run/other/training/x.pt", "elsewhere/checkpoint-7/training/x.pt"]
    for key in ours + not_ours:
        client.create_multipart_upload(Bucket=bucket, Key=key)
    ckpt.claim_output(store, "job-1").release()
    left = {u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    assert left == set(not_ours)


# ----------------------------------------------------------------------------------- kill -9 mid-stream (launcher)
STEPS = 12
KILL_POINTS = ["mid-parts", "before-complete", "before-manifest"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("stream-baseline")
    run = LaunchedRun(work, "full", training(str(work / "out"), "full", steps=STEPS, ckpt=100))
    assert run.run() == 0, run.log()
    return work / "out"


@pytest.mark.slow
@pytest.mark.parametrize(
    "point", [pytest.param(p, marks=[] if p == "mid-parts" else [pytest.mark.extended]) for p in KILL_POINTS]
)
def test_kill_9_mid_stream_resumes_from_the_previous_checkpoint_with_no_upload_left(
    tmp_path: Path, bucket: str, baseline: Path, point: str
) -> None:
    """SIGTERM, then rank 0 dies (SIGKILL) at `point` of the streamed emergency checkpoint: exit 75, checkpoint-3
    (or the last periodic one) stays LATEST, the next run aborts the dead stream's uploads, resumes from it and ends bit-exact."""
    from dreambooth_trainer import checkpoint as ckpt

    uri = f"s3://{bucket}/run"
    train = training(uri, "full", steps=STEPS, ckpt=3)
    # 40 MiB of padding: the stream spans several 16 MiB parts, so "mid-parts" is really mid-file.
    env = {"DREAMBOOTH_TEST_STEP_DELAY_SECONDS": "0.5", "DREAMBOOTH_TEST_PAD_STATE_MB": "40"}
    run = LaunchedRun(tmp_path, "full", train, DREAMBOOTH_TEST_KILL_IN_EMERGENCY_SAVE=point, **env).start()
    run.wait_until("checkpoint-3", lambda s: (s["lastCheckpoint"] or {}).get("step") == 3)
    run.signal()
    assert run.wait() == 75, run.log()
    term = run.termination()
    previous = term["step"]  # a periodic checkpoint, since the emergency one died
    assert previous % 3 == 0 and term["checkpointUri"].endswith(f"/checkpoint-{previous}"), term
    assert "no emergency checkpoint was made durable" in term["message"], term
    assert "test hook: the process dies" in run.log(20000)
    store = _store(uri)
    assert ckpt.read_latest(store) == previous and ckpt.checkpoint_steps(store)[0] == previous
    if point != "before-manifest":
        assert _uploads(store), "the kill left no open multipart upload: it did not happen mid-stream"
    again = LaunchedRun(tmp_path, "full", train, name="resume", **env)
    assert again.run() == 0, again.log()
    assert f"/checkpoint-{previous} at step {previous}" in again.log(20000), again.log()
    assert _uploads(store) == []
    rel = "unet/diffusion_pytorch_model.safetensors"
    store.download_file(rel, tmp_path / "dl" / rel)
    assert_identical(weights(baseline, "full"), weights(tmp_path / "dl", "full"))
    manifest = json.loads(store.read_bytes(f"checkpoint-{STEPS}/manifest.json"))
    assert manifest["files"]["training/test-padding.safetensors"]["size"] > 40 * MiB
