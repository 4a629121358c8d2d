"""Issue #18, item 5: --variant everywhere the scripts use it, and their accepted values and warnings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from diffusers import UNet2DConditionModel
from tests.trainer_utils import run_dreambooth, tiny_args

from dreambooth_trainer.tiny import ensure_tiny_model

pytestmark = pytest.mark.integration


def _variant_only_model(dest: Path) -> Path:
    """The tiny model with every weight file renamed to its fp16 variant name (as an fp16-branch download)."""
    shutil.copytree(ensure_tiny_model(), dest)
    for f in list(dest.rglob("*.safetensors")):
        f.rename(f.with_name(f.name.replace(".safetensors", ".fp16.safetensors")))
    return dest


def test_a_variant_only_model_trains_and_saves_the_full_pipeline(tmp_path: Path) -> None:
    model = _variant_only_model(tmp_path / "model")
    out = tmp_path / "out"
    args = tiny_args(out, steps=2, ckpt=1, batch=1)
    args[args.index("tiny://")] = str(model)
    extra = ["--variant", "fp16", "--checkpoints_total_limit", "0", "--class_prompt", "a dog", "--report_to", "none"]
    proc = run_dreambooth(["train", *args, *extra])
    UNet2DConditionModel.from_pretrained(out, subfolder="unet")  # the final save happened and loads
    assert "--class_prompt (spec.training.classPrompt) without --with_prior_preservation" in proc.stderr
    # --checkpoints_total_limit 0 as the scripts: each new checkpoint replaces the older ones.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]


def test_num_validation_images_0_skips_validation_in_the_lora_script(tmp_path: Path) -> None:
    out = tmp_path / "out"
    extra = ["--validation_prompt", "a photo of sks dog", "--num_validation_images", "0", "--report_to", "none"]
    run_dreambooth(["train-lora", *tiny_args(out, steps=2, ckpt=2, batch=1, extra=extra)])
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert not (out / "validation").exists()
