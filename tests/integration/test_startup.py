"""Start-up (issue 27): where the time goes, in the log and in /progress, for a run whose model and images come
from S3; the loss still reaches the trackers for every step though it is read back only at log boundaries; and a
resumed run keeps the numerics (fused AdamW) its checkpoints were trained with."""

from __future__ import annotations

import importlib.util
import json
import logging
import urllib.request
from pathlib import Path

import pytest
import torch
from tests.trainer_utils import DOG, run_dreambooth, tiny_args

from dreambooth_api.contract import PROGRESS_KEYS, STARTUP_PHASES
from dreambooth_trainer.storage import open_store

pytestmark = pytest.mark.integration
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture
def s3_inputs(s3, bucket: str) -> str:  # noqa: ANN001 - the session's SeaweedS3
    from dreambooth_trainer.tiny import ensure_tiny_model

    root = open_store(f"s3://{bucket}")
    root.child("model").upload_dir(ensure_tiny_model(), "")
    root.child("data/dog").upload_dir(DOG, "")
    return bucket


def test_startup_phases_in_the_log_and_in_progress_and_every_loss_logged(
    s3_inputs: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from dreambooth_api.config import FullConfig
    from dreambooth_trainer.cli_args import parse_cli
    from dreambooth_trainer.train import RunEnv, Trainer

    cache = tmp_path / "cache"  # a new pod's empty cache: the model is really downloaded
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(cache))
    monkeypatch.setenv("PROGRESS_PORT", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    steps = 5
    args = tiny_args(tmp_path / "out", steps=steps, ckpt=1000, batch=1, extra=[
        "--report_to", "tensorboard" if HAS_TENSORBOARD else "none"])  # fmt: skip
    args[args.index("tiny://")] = f"s3://{s3_inputs}/model/"
    args[args.index(str(DOG))] = f"s3://{s3_inputs}/data/dog/"
    try:
        with caplog.at_level(logging.INFO, logger="dreambooth_trainer"):
            trainer = Trainer(parse_cli(FullConfig, args, "train"), RunEnv())
            trainer.setup()
            trainer.fit()
            assert trainer.progress_server is not None
            with urllib.request.urlopen(f"{trainer.progress_server.url}/progress", timeout=5) as resp:
                doc = json.loads(resp.read())
            trainer.progress_server.close()
    finally:
        torch.set_num_threads(threads)

    # The model was loaded from where the sync put it: no second copy.
    assert trainer.model_dir.is_relative_to(cache)
    assert set(doc) == set(PROGRESS_KEYS)
    startup = doc["startupSeconds"]
    assert set(startup) == set(STARTUP_PHASES)
    assert all(isinstance(v, float) and v >= 0 for v in startup.values()), startup
    parts = sum(startup[p] for p in ("sync", "load", "data", "firstStep"))
    assert startup["total"] >= parts and startup["other"] == pytest.approx(startup["total"] - parts, abs=0.01)
    assert startup["sync"] > 0 and startup["load"] > 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("startup: sync ")]
    assert len(lines) == 1 and "first step" in lines[0] and "since the process started" in lines[0], lines
    assert doc["step"] == steps and doc["loss"] is not None

    if HAS_TENSORBOARD:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        # The run's own event file (the hparams one sits in a sub-folder).
        events = EventAccumulator(str(tmp_path / "out" / "logs" / "dreambooth"))
        events.Reload()
        losses = events.Scalars("loss")
        assert [e.step for e in losses] == list(range(1, steps + 1))
        assert all(e.value == e.value and abs(e.value) < 1e3 for e in losses)  # finite values, one per step


def test_a_resume_keeps_the_adamw_kernel_its_checkpoints_were_trained_with(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run_dreambooth(["train", *tiny_args(out, steps=2, ckpt=1, batch=1, extra=["--adam_fused", "false"])])
    assert "resumed from" not in first.stderr
    (out / "LATEST").write_text("checkpoint-1\n")
    _drop_checkpoint(out / "checkpoint-2")
    # Unset now: the run adopts "false" from the checkpoint's hash instead of refusing another config.
    proc = run_dreambooth(["train", *tiny_args(out, steps=2, ckpt=1, batch=1)])
    assert "resumed from" in proc.stderr and "'adam_fused': False" in proc.stderr, proc.stderr[-3000:]
    assert (out / "checkpoint-2" / "manifest.json").exists()
    # Set to the other kernel: refused, naming the setting (a new output dir is the way out).
    proc = run_dreambooth(["train", *tiny_args(out, steps=2, ckpt=1, batch=1, extra=["--adam_fused"])], check=False)
    assert proc.returncode == 64, proc.stderr[-3000:]
    assert "--adam_fused" in proc.stderr and "different training config" in proc.stderr, proc.stderr[-3000:]


def _drop_checkpoint(folder: Path) -> None:
    """As if the run had been stopped before this checkpoint: no manifest, no files."""
    import shutil

    shutil.rmtree(folder)
