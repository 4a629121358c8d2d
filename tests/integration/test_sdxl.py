"""SDXL DreamBooth LoRA (`dreambooth train-lora-sdxl`, train_dreambooth_lora_sdxl.py's flags) on the tiny SDXL.

Lean on purpose (each run is a few seconds): one run covers the outputs users load (LoRA of the UNet and both text
encoders through StableDiffusionXLPipeline, kohya file, class images from the SDXL pipeline, validation), one the
learning, one each resume exactness at world size 1 and 2, one S3 end to end, and the bad-input cases.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from trainer_utils import (
    REPO,
    assert_identical,
    family_args,
    make_tiny_model,
    run_dreambooth,
    torchrun_worker,
)

pytestmark = pytest.mark.integration
torch.set_num_threads(1)

DOG = REPO / "examples" / "data" / "dog"
PROMPT = "a photo of sks dog"
FREED = "the frozen text encoders freed"


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-sdxl") / "model", "sdxl", "Stable Diffusion XL")


def sdxl_args(model: Path | str, output: Path | str, *, steps: int = 6, ckpt: int = 3, extra: list[str] | None = None):
    return family_args(model, output, steps=steps, ckpt=ckpt, extra=extra)


def generate(model: Path, lora: Path | None = None, seed: int = 0) -> np.ndarray:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    out = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.images[0]).astype(np.int16)


def test_tiny_sdxl_loads_offline_in_the_sdxl_pipeline_and_generates(tiny_sdxl):
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tiny_sdxl / part).is_dir(), part
    image = generate(tiny_sdxl)
    assert image.shape == (32, 32, 3)
    # Same seed, same image: the test models are deterministic.
    assert np.array_equal(image, generate(tiny_sdxl))


def test_lora_with_text_encoders_and_prior_loads_in_the_sdxl_pipeline_and_changes_its_output(tiny_sdxl, tmp_path):
    out, class_dir = tmp_path / "out", tmp_path / "class"
    extra = [
        "--train_text_encoder", "--with_prior_preservation", "--class_data_dir", str(class_dir),
        "--class_prompt", "a photo of dog", "--num_class_images", "2", "--learning_rate", "1e-2",
        "--validation_prompt", PROMPT, "--num_validation_images", "1", "--random_flip", "--repeats", "2",
        "--output_kohya_format", "--train_batch_size", "1",
    ]  # fmt: skip
    run_dreambooth(["train-lora-sdxl", *sdxl_args(tiny_sdxl, out, steps=4, ckpt=2, extra=extra)])
    # Class images made by the SDXL pipeline (prior preservation), the LoRA of all three parts, kohya's file.
    assert len(list(class_dir.glob("*.jpg"))) == 2
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in lora} == {"unet", "text_encoder", "text_encoder_2"}
    assert (out / "pytorch_lora_weights_kohya.safetensors").is_file()
    assert list((out / "validation").rglob("*.png"))
    card = (out / "README.md").read_text()
    assert "# SDXL LoRA DreamBooth" in card and "stable-diffusion-xl" in card and "openrail++" in card
    before, after = generate(tiny_sdxl), generate(tiny_sdxl, out)
    assert np.abs(before - after).max() > 0, "the LoRA did not change the pipeline's output at a fixed seed"


def _fixed_loss(model: Path, lora: Path | None) -> float:
    """The denoising loss of the UNet (LoRA loaded) on fixed noisy latents of the instance images."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    from dreambooth_trainer.data import list_images, load_image, transform_image

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    if lora is not None:
        pipe.load_lora_weights(lora)
    sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    gen = torch.Generator().manual_seed(0)
    pixels = torch.stack([transform_image(load_image(p), 32, center_crop=True) for p in list_images(DOG)])
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        states, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
        n = latents.shape[0]
        losses = []
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=gen)
            t = torch.randint(0, 1000, (n,), generator=gen)
            time_ids = torch.tensor([[64, 64, 0, 0, 32, 32]] * n, dtype=torch.float32)  # 64 px images, center crop
            pred = pipe.unet(
                sched.add_noise(latents, noise, t), t, states.repeat(n, 1, 1),
                added_cond_kwargs={"text_embeds": pooled.repeat(n, 1), "time_ids": time_ids},
            ).sample  # fmt: skip
            losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    return float(np.mean(losses))


def test_loss_falls(tiny_sdxl, tmp_path):
    out = tmp_path / "out"
    # A random tiny UNet: the LoRA takes the loss from ~1.11 to ~1.01 in 40 steps at this rate (not further).
    extra = ["--learning_rate", "3e-2", "--center_crop", "--rank", "16"]
    run_dreambooth(["train-lora-sdxl", *sdxl_args(tiny_sdxl, out, steps=40, ckpt=1000, extra=extra)])
    before, after = _fixed_loss(tiny_sdxl, None), _fixed_loss(tiny_sdxl, out)
    assert after < 0.95 * before, f"loss did not fall: {before:.4f} -> {after:.4f}"


def _copy_checkpoint(src: Path, dst: Path, step: int) -> None:
    dst.mkdir(parents=True)
    shutil.copytree(src / f"checkpoint-{step}", dst / f"checkpoint-{step}")
    (dst / "LATEST").write_text(f"checkpoint-{step}\n")


def test_resume_mid_epoch_is_bit_exact(tiny_sdxl, tmp_path):
    # 5 images x repeats 2, batch 2: 5 batches an epoch, so step 3 is mid-epoch; flips and text encoders included.
    extra = ["--train_text_encoder", "--random_flip", "--repeats", "2", "--snr_gamma", "5.0"]
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    run_dreambooth(["train-lora-sdxl", *sdxl_args(tiny_sdxl, ref, steps=6, ckpt=3, extra=extra)])
    _copy_checkpoint(ref, resumed, 3)
    proc = run_dreambooth(["train-lora-sdxl", *sdxl_args(tiny_sdxl, resumed, steps=6, ckpt=3, extra=extra)])
    assert f"resumed from {resumed.as_uri()}/checkpoint-3" in proc.stderr
    name = "pytorch_lora_weights.safetensors"
    assert_identical(load_file(ref / name), load_file(resumed / name))


# Extended tier (world size 2 exactness of the shared loop: test_trainer's stays in the default run).
@pytest.mark.extended
@pytest.mark.slow
def test_world_size_2_resume_is_bit_exact(tiny_sdxl, tmp_path):
    from dreambooth_api.config import SdxlLoraConfig
    from dreambooth_trainer.cli_args import parse_cli

    def training(out: Path) -> dict:
        args = sdxl_args(tiny_sdxl, out, steps=6, ckpt=2, extra=["--train_batch_size", "1", "--random_flip"])
        return parse_cli(SdxlLoraConfig, args, "t").to_training_spec()

    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    torchrun_worker("lora-sdxl", training(ref), 2, tmp_path)
    _copy_checkpoint(ref, resumed, 4)  # 5 images on 2 ranks, batch 1: 3 batches an epoch, step 4 mid-epoch
    proc = torchrun_worker("lora-sdxl", training(resumed), 2, tmp_path)
    assert "training on 2 process(es)" in proc.stderr and "resumed from" in proc.stderr
    name = "pytorch_lora_weights.safetensors"
    assert_identical(load_file(ref / name), load_file(resumed / name))


def test_edm_style_training_with_cached_latents_runs_and_saves(tiny_sdxl, tmp_path):
    out = tmp_path / "out"
    extra = ["--do_edm_style_training", "--cache_latents", "--center_crop"]
    run_dreambooth(["train-lora-sdxl", *sdxl_args(tiny_sdxl, out, steps=2, ckpt=2, extra=extra)])
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(torch.isfinite(v).all() for v in weights.values())


def edm_model(tiny_sdxl: Path, out: Path) -> Path:
    """The tiny SDXL as Playground v2.5 ships: an EDMEulerScheduler and a VAE with per-channel latents mean/std."""
    import json

    from diffusers import EDMEulerScheduler

    shutil.copytree(tiny_sdxl, out)
    shutil.rmtree(out / "scheduler")
    EDMEulerScheduler().save_pretrained(out / "scheduler")
    index = json.loads((out / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EDMEulerScheduler"]
    (out / "model_index.json").write_text(json.dumps(index))
    vae = json.loads((out / "vae" / "config.json").read_text())
    vae |= {"latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [0.9, 1.1, 0.8, 1.2]}
    (out / "vae" / "config.json").write_text(json.dumps(vae))
    return out


def test_a_model_with_an_edm_scheduler_trains_edm_style_validates_and_loads(tiny_sdxl, tmp_path):
    model, out = edm_model(tiny_sdxl, tmp_path / "edm"), tmp_path / "out"
    extra = ["--validation_prompt", PROMPT, "--num_validation_images", "1", "--validation_epochs", "1"]
    proc = run_dreambooth(["train-lora-sdxl", *sdxl_args(model, out, steps=2, ckpt=2, extra=extra)])
    assert "EDM" in proc.stderr  # said in the log, as the script logs "Performing EDM-style training!"
    # No captions, no text encoder training: the prompt encoded once and both encoders freed, as the script does;
    # the validation below drew with them loaded again from the model folder.
    assert "1 prompt(s) encoded once, " + FREED in proc.stderr
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    assert list(out.glob("validation/step-*/image-0.png")), "validation drew with the model's EDM scheduler"
    assert not np.array_equal(generate(model, out), generate(model))

    # Min-SNR needs alphas_cumprod, which an EDM scheduler has not: refused before training, naming the flag.
    bad = run_dreambooth(
        ["train-lora-sdxl", *sdxl_args(model, tmp_path / "b", extra=["--snr_gamma", "5"])], check=False
    )
    assert bad.returncode == 64 and "snr_gamma" in bad.stderr and "EDM" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "b" / "checkpoint-3").exists()


def test_model_and_data_and_output_on_s3(tiny_sdxl, bucket, tmp_path):
    from dreambooth_trainer.storage import open_store

    root = open_store(f"s3://{bucket}")
    root.child("sdxl").upload_dir(tiny_sdxl, "")
    root.child("dog").upload_dir(DOG, "")
    args = sdxl_args(f"s3://{bucket}/sdxl", f"s3://{bucket}/out", steps=2, ckpt=2)
    args[args.index("--instance_data_dir") + 1] = f"s3://{bucket}/dog"
    run_dreambooth(["train-lora-sdxl", *args])
    local = tmp_path / "out"
    root.child("out").sync_down("", local)
    assert (local / "pytorch_lora_weights.safetensors").is_file() and (local / "checkpoint-2").is_dir()


def test_dataset_name_image_folder_with_captions(tiny_sdxl, tmp_path):
    import json

    data = tmp_path / "data"
    shutil.copytree(DOG, data)
    rows = [{"file_name": p.name, "text": f"a photo of sks dog, view {i}"} for i, p in enumerate(sorted(DOG.iterdir()))]
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = sdxl_args(tiny_sdxl, tmp_path / "out", steps=2, ckpt=2, extra=["--caption_column", "text"])
    args[args.index("--instance_data_dir") : args.index("--instance_data_dir") + 2] = ["--dataset_name", str(data)]
    proc = run_dreambooth(["train-lora-sdxl", *args])
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert FREED not in proc.stderr  # per-image captions: the encoders stay, as the script keeps them
    # A Hub dataset name: exit 64 before any model loads, naming the flag and the fix.
    args[args.index("--dataset_name") + 1] = "someone/dogs"
    args[args.index("--output_dir") + 1] = str(tmp_path / "hub")
    proc = run_dreambooth(["train-lora-sdxl", *args], check=False)
    assert proc.returncode == 64 and "--dataset_name" in proc.stderr and "Hub datasets are not read" in proc.stderr


def test_wrong_family_for_the_model_folder_is_exit_64(tiny_sdxl, tmp_path):
    from dreambooth_trainer.tiny import ensure_tiny_model

    sd = run_dreambooth(["train-lora-sdxl", *sdxl_args(ensure_tiny_model(), tmp_path / "a")], check=False)
    assert sd.returncode == 64
    assert "--pretrained_model_name_or_path" in sd.stderr and "Stable Diffusion 1.x/2.x" in sd.stderr
    for cmd in ("train", "train-lora"):
        proc = run_dreambooth([cmd, *sdxl_args(tiny_sdxl, tmp_path / cmd)], check=False)
        assert proc.returncode == 64, proc.stderr[-2000:]
        assert "spec.method" in proc.stderr and "lora-sdxl" in proc.stderr
