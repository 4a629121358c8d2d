"""The real trainer on the tiny model: outputs load through diffusers, it learns, and resume is bit-exact."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.trainer_utils import (
    DOG,
    REPO,
    assert_identical,
    run_dreambooth,
    tiny_args,
    torchrun_worker,
    trainer_env,
    weights,
)

pytestmark = pytest.mark.integration
CMD = {"full": "train", "lora": "train-lora"}


def _copy_checkpoint(src: Path, dst: Path, step: int) -> None:
    """An output dir as a run that died right after publishing checkpoint-`step` would leave it."""
    dst.mkdir(parents=True)
    shutil.copytree(src / f"checkpoint-{step}", dst / f"checkpoint-{step}")
    (dst / "LATEST").write_text(f"checkpoint-{step}\n")


@pytest.fixture(scope="module")
def tiny_model_dir() -> Path:
    from dreambooth_trainer.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_output_loads_in_diffusers_and_generates(method: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "out"
    run_dreambooth([CMD[method], *tiny_args(out, steps=4, ckpt=100)])
    if method == "full":
        pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
        base = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
        changed = any(
            not torch.equal(a, b)
            for a, b in zip(pipe.unet.state_dict().values(), base.unet.state_dict().values(), strict=True)
        )
        assert changed, "training left the UNet unchanged"
    else:
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
        pipe.load_lora_weights(out)
        assert any("lora" in n for n, _ in pipe.unet.named_parameters())
    image = pipe("a photo of sks dog", num_inference_steps=2, height=32, width=32, output_type="pil").images[0]
    assert image.size == (32, 32)


def _fixed_loss(unet, tiny_model_dir: Path) -> float:
    """Denoising loss on fixed images, noise and timesteps: comparable across models."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import AutoTokenizer, CLIPTextModel

    from dreambooth_trainer.data import list_images, load_image, transform_image

    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    te = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer", use_fast=False)
    sched = DDPMScheduler.from_pretrained(tiny_model_dir, subfolder="scheduler")
    images = torch.stack([transform_image(load_image(p), 32, center_crop=True) for p in list_images(DOG)])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        ids = tok(
            ["a photo of sks dog"] * len(images), padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        states = te(ids)[0]
        total = 0.0
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, 1000, (len(images),), generator=gen)
            pred = unet(sched.add_noise(latents, noise, t), t, states).sample
            total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / 8


def test_loss_falls_on_a_fixed_set(tmp_path: Path, tiny_model_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    out = tmp_path / "out"
    run_dreambooth(["train", *tiny_args(out, steps=40, ckpt=1000, extra=["--learning_rate", "1e-3", "--center_crop"])])
    before = _fixed_loss(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet"), tiny_model_dir)
    after = _fixed_loss(UNet2DConditionModel.from_pretrained(out, subfolder="unet"), tiny_model_dir)
    assert after < 0.8 * before, f"loss did not fall: {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize(
    ("method", "resume_step", "extra"),
    [
        ("lora", 4, []),  # 5 images, batch 2: 3 batches an epoch, so step 4 is mid-epoch
        ("lora", 4, ["--lora_dropout", "0.2"]),  # dropout draws from the RNG that checkpoints restore
        ("full", 3, []),  # an epoch boundary
        ("full", 3, ["--gradient_accumulation_steps", "2", "--train_batch_size", "1"]),  # mid-epoch, accumulation
        ("full", 4, ["--train_text_encoder"]),  # the text encoder's state is checkpointed too (mid-epoch)
        ("lora", 4, ["--cache_latents", "--center_crop", "--pre_compute_text_embeddings"]),  # VAE/encoder freed
    ],
)
def test_resume_from_a_checkpoint_is_bit_exact(method: str, resume_step: int, extra: list[str], tmp_path: Path) -> None:
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    run_dreambooth([CMD[method], *tiny_args(ref, steps=8, ckpt=resume_step, extra=extra)])
    _copy_checkpoint(ref, resumed, resume_step)
    proc = run_dreambooth([CMD[method], *tiny_args(resumed, steps=8, ckpt=resume_step, extra=extra)])
    assert f"resumed from {resumed.as_uri()}/checkpoint-{resume_step}" in proc.stderr
    assert_identical(weights(ref, method), weights(resumed, method))
    if "--train_text_encoder" in extra:
        te = "text_encoder/model.safetensors"
        assert_identical(load_file(ref / te), load_file(resumed / te))


def test_kill_9_mid_run_then_same_command_resumes_exactly(tmp_path: Path) -> None:
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    args = tiny_args(killed, steps=30, ckpt=4, batch=1)
    run_dreambooth(["train-lora", *tiny_args(ref, steps=30, ckpt=4, batch=1)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "dreambooth_trainer", "train-lora", *args],
        env=trainer_env(DREAMBOOTH_TEST_STEP_DELAY_SECONDS="0.05"), cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint-8" / "manifest.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before its second checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "pytorch_lora_weights.safetensors").exists(), "the run finished before the kill"
    resumed = run_dreambooth(["train-lora", *args])
    assert "resumed from" in resumed.stderr
    assert_identical(weights(ref, "lora"), weights(killed, "lora"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_world_size_2_resume_is_bit_exact(method: str, tmp_path: Path) -> None:
    from dreambooth_api.config import MODELS
    from dreambooth_trainer.cli_args import parse_cli

    def training(out: Path) -> dict:
        return parse_cli(MODELS[method], tiny_args(out, steps=6, ckpt=2, batch=1), "t").to_training_spec()

    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    torchrun_worker(method, training(ref), 2, tmp_path)
    _copy_checkpoint(ref, resumed, 4)  # 5 images on 2 ranks, batch 1: 3 batches an epoch, step 4 mid-epoch
    proc = torchrun_worker(method, training(resumed), 2, tmp_path)
    assert "training on 2 process(es)" in proc.stderr
    assert "resumed from" in proc.stderr
    assert_identical(weights(ref, method), weights(resumed, method))


def test_output_of_another_config_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_dreambooth(["train-lora", *tiny_args(out, steps=2, ckpt=2)])
    proc = run_dreambooth(["train-lora", *tiny_args(out, steps=2, ckpt=2, extra=["--rank", "8"])], check=False)
    assert proc.returncode == 64
    assert "--output_dir (spec.training.outputDir)" in proc.stderr and "different training config" in proc.stderr


def test_runs_under_accelerate_launch(tmp_path: Path) -> None:
    """An existing `accelerate launch train_dreambooth.py ...` command works with the script swapped."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dreambooth_trainer", "train-lora",
         *tiny_args(out, steps=3, ckpt=2, batch=1)],
        capture_output=True, text=True, timeout=300, env=trainer_env(), cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert (out / "checkpoint-2" / "manifest.json").exists()
