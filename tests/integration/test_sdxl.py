"""SDXL DreamBooth LoRA (`dreambooth train-lora-sdxl`, train_dreambooth_lora_sdxl.py's flags) on the tiny SDXL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer_utils import REPO, trainer_env

pytestmark = pytest.mark.integration
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-sdxl") / "model"
    proc = subprocess.run(
        [sys.executable, "-m", "dreambooth_trainer", "tiny-model", str(out), "--family", "sdxl"],
        capture_output=True, text=True, env=trainer_env(), cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Stable Diffusion XL" in proc.stdout
    return out


def generate(model: Path, lora: Path | None = None, seed: int = 0) -> np.ndarray:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    out = pipe("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.images[0])


def test_tiny_sdxl_loads_offline_in_the_sdxl_pipeline_and_generates(tiny_sdxl):
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tiny_sdxl / part).is_dir(), part
    image = generate(tiny_sdxl)
    assert image.shape == (32, 32, 3)
    # Same seed, same image: the test models are deterministic.
    assert np.array_equal(image, generate(tiny_sdxl))
