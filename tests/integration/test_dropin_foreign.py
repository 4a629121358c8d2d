"""Issue #18, item 2: nothing this trainer did not write is ever deleted or overwritten.

diffusers' scripts write `checkpoint-N/` folders (accelerate's save_state) into the same output folders; the
total limit, the publish path and every cleanup must leave them byte for byte as they were.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from tests.trainer_utils import run_dreambooth, tiny_args

from dreambooth_api.config import ConfigError
from dreambooth_trainer.checkpoint import Publisher, Snapshot, TrainState
from dreambooth_trainer.checkpoint.foreign import Kind, classify
from dreambooth_trainer.storage import open_store

pytestmark = pytest.mark.integration


def _foreign_checkpoint(folder: Path, *, full: bool = False) -> None:
    """A checkpoint as train_dreambooth(_lora).py's save_state leaves it (contents need not load here)."""
    folder.mkdir(parents=True)
    if full:
        (folder / "unet").mkdir()
        (folder / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
        (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(512))
    else:
        (folder / "pytorch_lora_weights.safetensors").write_bytes(os.urandom(512))
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        (folder / name).write_bytes(os.urandom(256))


def _checksums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_total_limit_counts_and_removes_only_our_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _foreign_checkpoint(out / "checkpoint-50")
    _foreign_checkpoint(out / "checkpoint-100", full=True)
    (out / "notes.txt").write_text("the user's own file\n")
    before = _checksums(out)
    run_dreambooth(["train-lora", *tiny_args(out, steps=6, ckpt=2, batch=1, extra=["--checkpoints_total_limit", "1"])])
    after = _checksums(out)
    assert {k: after.get(k) for k in before} == before, "a file we did not write changed or vanished"
    # The limit applied to ours alone: the script would have removed both foreign folders and kept none of ours.
    ours = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-") and (p / "manifest.json").exists())
    assert ours == ["checkpoint-6"]


def test_a_foreign_folder_of_a_name_we_may_write_is_refused_before_training(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _foreign_checkpoint(out / "checkpoint-4")
    before = _checksums(out)
    proc = run_dreambooth(["train-lora", *tiny_args(out, steps=6, ckpt=2, batch=1)], check=False)
    assert proc.returncode == 64, proc.stderr[-3000:]
    assert "checkpoint-4" in proc.stderr and "was not written by this trainer" in proc.stderr
    assert "--resume_from_checkpoint checkpoint-4" in proc.stderr and "new output_dir" in proc.stderr
    after = _checksums(out)
    assert {k: after.get(k) for k in before} == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-4"]


def test_the_publisher_never_overwrites_a_foreign_folder(tmp_path: Path) -> None:
    """The safety net behind the check at setup (an emergency checkpoint can land on any step)."""
    out = tmp_path / "out"
    _foreign_checkpoint(out / "checkpoint-3")
    before = _checksums(out)
    pub = Publisher(open_store(str(out)), tmp_path / "scratch", total_limit=1)
    snap = Snapshot(state=TrainState(global_step=3), tensors={"training/unet.safetensors": {"w": torch.ones(2)}})
    with pytest.raises(ConfigError, match=r"checkpoint-3 was not written by this trainer"):
        pub.submit(snap, background=False)
    assert _checksums(out) == before


def test_an_interrupted_publish_of_ours_is_ours_a_diffusers_folder_is_not(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    (tmp_path / "checkpoint-2" / "training").mkdir(parents=True)
    (tmp_path / "checkpoint-2" / "training" / "unet.safetensors").write_bytes(b"x")
    _foreign_checkpoint(tmp_path / "checkpoint-4")
    _foreign_checkpoint(tmp_path / "checkpoint-6", full=True)
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / "checkpoint-8" / "pytorch_lora_weights.safetensors").write_bytes(b"x")  # no training/: not ours
    assert classify(store, "checkpoint-2") is Kind.PARTIAL
    assert classify(store, "checkpoint-4") is Kind.FOREIGN
    assert classify(store, "checkpoint-6") is Kind.FOREIGN
    assert classify(store, "checkpoint-8") is Kind.FOREIGN
    assert classify(store, "checkpoint-10") is Kind.ABSENT


def test_resume_from_a_missing_checkpoint_is_exit_64_latest_with_none_starts_fresh(tmp_path: Path) -> None:
    out = tmp_path / "out"
    missing = ["--resume_from_checkpoint", "checkpoint-3"]
    proc = run_dreambooth(["train-lora", *tiny_args(out, steps=2, ckpt=2, batch=1, extra=missing)], check=False)
    assert proc.returncode == 64, proc.stderr[-3000:]
    assert "--resume_from_checkpoint" in proc.stderr and "checkpoint-3" in proc.stderr
    assert "does not exist" in proc.stderr
    latest = ["--resume_from_checkpoint", "latest"]
    run_dreambooth(["train-lora", *tiny_args(tmp_path / "fresh", steps=2, ckpt=2, batch=1, extra=latest)])
    assert (tmp_path / "fresh" / "pytorch_lora_weights.safetensors").exists()
