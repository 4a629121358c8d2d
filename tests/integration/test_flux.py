"""Flux DreamBooth LoRA (`dreambooth train-lora-flux`, train_dreambooth_lora_flux.py's flags) on the tiny Flux.

Lean on purpose (each run is a few seconds at resolution 32 and a 16-token T5 prompt): one run covers the outputs
users load (LoRA of the transformer and CLIP through FluxPipeline, prior preservation, validation, model card),
one the learning, one SIGTERM mid-epoch -> exit 75 -> bit-exact resume at world size 1 through the launcher (world
size 2 resume: extended tier), one S3 end to end, and the bad-input cases.
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
CLASS_DOG = REPO / "examples" / "data" / "class-dog"
PROMPT = "a photo of sks dog"
LORA = "pytorch_lora_weights.safetensors"
T5_TOKENS = "16"  # the tiny T5 takes 512; a short prompt keeps each step cheap


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-flux") / "model", "flux", "Flux")


def flux_args(model: Path | str, output: Path | str, *, steps: int = 6, ckpt: int = 3, extra: list[str] | None = None):
    more = ["--max_sequence_length", T5_TOKENS, "--lr_warmup_steps", "0", *(extra or [])]
    return family_args(model, output, steps=steps, ckpt=ckpt, extra=more)


def pipeline(model: Path, lora: Path | None = None):  # noqa: ANN201 - FluxPipeline
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    return pipe


def generate(model: Path, lora: Path | None = None, seed: int = 0) -> np.ndarray:
    pipe = pipeline(model, lora)
    out = pipe(PROMPT, height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(seed),
               max_sequence_length=int(T5_TOKENS))  # fmt: skip
    return np.asarray(out.images[0]).astype(np.int16)


def test_tiny_flux_loads_offline_with_a_t5_tokenizer_json_and_generates(tiny_flux):
    from transformers import T5TokenizerFast

    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (tiny_flux / part).is_dir(), part
    # The T5 tokenizer is the project's tokenizer.json (the `tokenizers` package), no sentencepiece model.
    assert (tiny_flux / "tokenizer_2" / "tokenizer.json").is_file()
    assert not list((tiny_flux / "tokenizer_2").glob("*.model"))
    t5 = T5TokenizerFast.from_pretrained(tiny_flux / "tokenizer_2")
    ids = t5(PROMPT).input_ids
    assert ids[-1] == t5.eos_token_id and t5.unk_token_id not in ids  # the prompt's words are whole pieces
    pipe = pipeline(tiny_flux)
    assert pipe.transformer.config.guidance_embeds and pipe.vae.config.latent_channels == 16
    image = generate(tiny_flux)
    assert image.shape == (32, 32, 3)
    # Same seed, same image: the test models are deterministic.
    assert np.array_equal(image, generate(tiny_flux))


def test_lora_with_text_encoder_and_prior_loads_in_the_flux_pipeline_and_changes_its_output(tiny_flux, tmp_path):
    out, class_dir = tmp_path / "out", tmp_path / "class"
    shutil.copytree(CLASS_DOG, class_dir)  # present class images: nothing to generate
    extra = [
        "--train_text_encoder", "--with_prior_preservation", "--class_data_dir", str(class_dir),
        "--class_prompt", "a photo of dog", "--num_class_images", "2", "--learning_rate", "1e-2",
        "--validation_prompt", PROMPT, "--num_validation_images", "1", "--random_flip", "--repeats", "2",
        "--train_batch_size", "1", "--rank", "8", "--lora_alpha", "16", "--weighting_scheme", "cosmap",
    ]  # fmt: skip
    run_dreambooth(["train-lora-flux", *flux_args(tiny_flux, out, steps=4, ckpt=2, extra=extra)])
    lora = load_file(out / LORA)
    assert {k.split(".")[0] for k in lora} == {"transformer", "text_encoder"}
    # The script's default --lora_layers: both streams' attention and feed-forwards, rank 8.
    assert any(".ff_context.net.2." in k for k in lora) and any(".attn.add_q_proj." in k for k in lora)
    assert all(min(v.shape) == 8 for v in lora.values())
    assert list((out / "validation").rglob("*.png"))
    card = (out / "README.md").read_text()
    assert "# Flux DreamBooth LoRA" in card and "flux" in card and "license: other" in card
    pipe = pipeline(tiny_flux, out)
    # lora_alpha travels with the weights: the pipeline scales the adapters by alpha / rank as trained.
    assert pipe.transformer.peft_config["default_0"].lora_alpha == 16
    before, after = generate(tiny_flux), generate(tiny_flux, out)
    assert np.abs(before - after).max() > 0, "the LoRA did not change the pipeline's output at a fixed seed"


def test_frozen_text_encoders_are_freed_after_the_prompts_and_validation_loads_them_again(tiny_flux, tmp_path):
    """As the script without captions or --train_text_encoder: the instance and class prompts encoded once, CLIP
    and T5 freed (FLUX.1's T5-XXL alone is 9.5 GB in bf16); validation draws with both loaded again."""
    out, class_dir = tmp_path / "out", tmp_path / "class"
    shutil.copytree(CLASS_DOG, class_dir)
    extra = [
        "--with_prior_preservation", "--class_data_dir", str(class_dir), "--class_prompt", "a photo of dog",
        "--num_class_images", "2", "--validation_prompt", PROMPT, "--num_validation_images", "1",
    ]  # fmt: skip
    proc = run_dreambooth(["train-lora-flux", *flux_args(tiny_flux, out, steps=2, ckpt=2, extra=extra)])
    assert "2 prompt(s) encoded once, the frozen text encoders freed" in proc.stderr, proc.stderr[-3000:]
    assert list(out.glob("validation/step-*/image-0.png")), "validation drew with the encoders loaded again"
    assert {k.split(".")[0] for k in load_file(out / LORA)} == {"transformer"}


def test_kept_prompt_outputs_are_what_the_encoders_give_the_whole_batch(tiny_flux, tmp_path):
    """Each prompt encoded alone and kept gives the batch the states CLIP and T5 give it in one call."""
    from dreambooth_api.config import FluxLoraConfig
    from dreambooth_trainer.cli_args import parse_cli
    from dreambooth_trainer.data import tokenize_prompt
    from dreambooth_trainer.families.flux import Flux

    cfg = parse_cli(FluxLoraConfig, flux_args(tiny_flux, tmp_path / "out"), "t")
    family = Flux()
    parts = family.load(cfg, tiny_flux)
    encoders = list(family.text_encoders(parts).values())
    instance, klass = (tokenize_prompt(parts.tokenizer, p).input_ids for p in (PROMPT, "a photo of dog"))
    batch = torch.cat([instance, instance, klass, klass])
    with torch.no_grad():
        want_states, want_pooled, want_ids = family.encode_ids(encoders[0], encoders[1], batch)
    freed = family.encode_fixed_prompts(parts, [instance, klass], torch.device("cpu"))
    assert freed == sum(p.numel() for e in encoders for p in e.parameters()) and not family.text_encoders(parts)
    states, extra = family.encode_batch(cfg, parts, [], {"input_ids": batch}, torch.device("cpu"))
    torch.testing.assert_close(states, want_states)
    torch.testing.assert_close(extra["pooled"], want_pooled)
    assert torch.equal(extra["txt_ids"], want_ids)


def _fixed_loss(model: Path, lora: Path | None) -> float:
    """The flow-matching loss of the transformer (LoRA loaded) on fixed noisy latents of the instance images."""
    from diffusers import FluxPipeline

    from dreambooth_trainer.data import list_images, load_image, transform_image

    pipe = pipeline(model, lora)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.stack([transform_image(load_image(p), 32, center_crop=True) for p in list_images(DOG)])
    vae = pipe.vae
    with torch.no_grad():
        latents = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        states, pooled, text_ids = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=int(T5_TOKENS))
        n, c, h, w = latents.shape
        img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, latents.device, latents.dtype)
        losses = []
        for _ in range(8):
            noise = torch.randn(latents.shape, generator=gen)
            sigma = torch.rand(n, generator=gen).reshape(n, 1, 1, 1)
            noisy = (1 - sigma) * latents + sigma * noise
            pred = pipe.transformer(
                hidden_states=FluxPipeline._pack_latents(noisy, n, c, h, w), timestep=sigma.flatten(),
                guidance=torch.full((n,), 3.5), pooled_projections=pooled.repeat(n, 1),
                encoder_hidden_states=states.repeat(n, 1, 1), txt_ids=text_ids, img_ids=img_ids, return_dict=False,
            )[0]  # fmt: skip
            pred = FluxPipeline._unpack_latents(pred, h * 2, w * 2, 2)
            losses.append(torch.nn.functional.mse_loss(pred, noise - latents).item())
    return float(np.mean(losses))


def test_loss_falls(tiny_flux, tmp_path):
    out = tmp_path / "out"
    extra = ["--learning_rate", "1e-2", "--center_crop", "--rank", "16", "--lora_alpha", "16"]
    run_dreambooth(["train-lora-flux", *flux_args(tiny_flux, out, steps=30, ckpt=1000, extra=extra)])
    before, after = _fixed_loss(tiny_flux, None), _fixed_loss(tiny_flux, out)
    assert after < 0.95 * before, f"loss did not fall: {before:.4f} -> {after:.4f}"


def _copy_checkpoint(src: Path, dst: Path, step: int) -> None:
    dst.mkdir(parents=True)
    shutil.copytree(src / f"checkpoint-{step}", dst / f"checkpoint-{step}")
    (dst / "LATEST").write_text(f"checkpoint-{step}\n")


# Extended tier (world size 2 exactness of the shared loop: test_trainer's stays in the default run).
@pytest.mark.extended
@pytest.mark.slow
def test_world_size_2_resume_is_bit_exact(tiny_flux, tmp_path):
    from dreambooth_api.config import FluxLoraConfig
    from dreambooth_trainer.cli_args import parse_cli

    def training(out: Path) -> dict:
        extra = ["--train_batch_size", "1", "--random_flip", "--weighting_scheme", "mode"]
        return parse_cli(
            FluxLoraConfig, flux_args(tiny_flux, out, steps=6, ckpt=2, extra=extra), "t"
        ).to_training_spec()

    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    torchrun_worker("lora-flux", training(ref), 2, tmp_path)
    _copy_checkpoint(ref, resumed, 4)  # 5 images on 2 ranks, batch 1: 3 batches an epoch, step 4 mid-epoch
    proc = torchrun_worker("lora-flux", training(resumed), 2, tmp_path)
    assert "training on 2 process(es)" in proc.stderr and "resumed from" in proc.stderr
    assert_identical(load_file(ref / LORA), load_file(resumed / LORA))


def test_sigterm_mid_epoch_exits_75_and_the_resume_is_bit_exact(tmp_path):
    """The launcher (as in a pod) on tiny://flux: SIGTERM mid-epoch -> emergency checkpoint, exit 75 -> the same
    command resumes and ends with the uninterrupted run's weights, bit for bit. CLIP's LoRA, flips, repeats and a
    timestep density drawn from the step generator are in the state that must come back."""
    from tests.preemption_utils import LaunchedRun

    def training(out: Path) -> dict:
        return {
            "pretrainedModelNameOrPath": "tiny://flux", "instanceDataDir": str(DOG), "instancePrompt": PROMPT,
            "outputDir": str(out), "resolution": 32, "trainBatchSize": 1, "maxTrainSteps": 6,
            "checkpointingSteps": 100, "maxSequenceLength": int(T5_TOKENS), "lrWarmupSteps": 0, "seed": 7,
            "reportTo": "none", "trainTextEncoder": True, "randomFlip": True, "repeats": 2,
            "weightingScheme": "logit_normal",
        }  # fmt: skip

    ref, out = tmp_path / "ref", tmp_path / "out"
    baseline = LaunchedRun(tmp_path, "lora-flux", training(ref), name="ref")
    assert baseline.run() == 0, baseline.log()
    run = LaunchedRun(tmp_path, "lora-flux", training(out), DREAMBOOTH_TEST_STEP_DELAY_SECONDS="0.3").start()
    run.wait_until("step 1", lambda s: s["step"] >= 1)
    run.signal()
    assert run.wait() == 75, run.log()
    term = run.termination()
    stop = term["step"]
    # 5 images x repeats 2 at batch 1: 10 steps an epoch, so any stop before step 6 is mid-epoch.
    assert term["reason"] == "Preempted" and 1 <= stop < 6, term
    assert (out / f"checkpoint-{stop}" / "manifest.json").is_file()
    again = LaunchedRun(tmp_path, "lora-flux", training(out), name="resume")
    assert again.run() == 0, again.log()
    assert f"/checkpoint-{stop} at step {stop}" in again.log(20000), again.log()
    assert_identical(load_file(ref / LORA), load_file(out / LORA))


def test_model_and_data_and_output_on_s3(tiny_flux, bucket, tmp_path):
    from dreambooth_trainer.storage import open_store

    root = open_store(f"s3://{bucket}")
    root.child("flux").upload_dir(tiny_flux, "")
    root.child("dog").upload_dir(DOG, "")
    args = flux_args(f"s3://{bucket}/flux", f"s3://{bucket}/out", steps=2, ckpt=2)
    args[args.index("--instance_data_dir") + 1] = f"s3://{bucket}/dog"
    run_dreambooth(["train-lora-flux", *args])
    local = tmp_path / "out"
    root.child("out").sync_down("", local)
    assert (local / LORA).is_file() and (local / "checkpoint-2" / "manifest.json").is_file()
    assert not np.array_equal(generate(tiny_flux, local), generate(tiny_flux))


def test_bad_input_is_exit_64_naming_the_flag(tiny_flux, tmp_path):
    from dreambooth_trainer.tiny import ensure_tiny_model

    sd = ensure_tiny_model()
    bad = run_dreambooth(["train-lora-flux", *flux_args(sd, tmp_path / "a")], check=False)
    assert bad.returncode == 64 and "--pretrained_model_name_or_path" in bad.stderr, bad.stderr[-2000:]
    assert "Stable Diffusion pipeline (unet/)" in bad.stderr and "lora-flux" in bad.stderr
    # A Flux folder given to the SD command names the method that trains it.
    args = flux_args(tiny_flux, tmp_path / "b")
    args = args[: args.index("--max_sequence_length")] + args[args.index("--lr_warmup_steps") :]
    wrong = run_dreambooth(["train-lora", *args], check=False)
    assert wrong.returncode == 64 and "holds a Flux pipeline" in wrong.stderr, wrong.stderr[-2000:]
    assert "spec.method: lora-flux" in wrong.stderr
    args = flux_args(tiny_flux, tmp_path / "c")
    args[args.index("--max_sequence_length") + 1] = "1024"
    long = run_dreambooth(["train-lora-flux", *args], check=False)
    assert long.returncode == 64, long.stderr[-2000:]
    assert "--max_sequence_length (spec.training.maxSequenceLength): 1024 is more than" in long.stderr
    assert not (tmp_path / "c" / "checkpoint-3").exists()


def test_sdxl_command_names_the_flux_method_and_guidance_warns_only_when_set(tiny_flux, tmp_path, caplog):
    """In process (no training): the SDXL family's folder check, and the schnell-shaped model's warning."""
    import logging

    from dreambooth_api.config import ConfigError, FluxLoraConfig
    from dreambooth_trainer.families import FAMILIES
    from dreambooth_trainer.tiny import make_tiny_flux_model

    with pytest.raises(ConfigError, match=r"--pretrained_model_name_or_path .*holds a Flux pipeline.*lora-flux"):
        FAMILIES["sdxl"].check_model_dir(tiny_flux)
    schnell = make_tiny_flux_model(tmp_path / "schnell", guidance_embeds=False)
    base = {"pretrainedModelNameOrPath": str(schnell), "instanceDataDir": "d", "instancePrompt": PROMPT}
    with caplog.at_level(logging.WARNING):
        parts = FAMILIES["flux"].load(FluxLoraConfig.model_validate(base), schnell)
    assert parts.extra["guidance"] is None  # no guidance embedding: none passed, as the script
    assert "guidance_scale" not in caplog.text  # the default 3.5 on every schnell run: no noise
    with caplog.at_level(logging.WARNING):
        FAMILIES["flux"].load(FluxLoraConfig.model_validate({**base, "guidanceScale": 1.0}), schnell)
    assert "--guidance_scale (spec.training.guidanceScale) 1.0 is ignored" in caplog.text
