"""Flux LoRA (`dreambooth train-lora-flux`): our CLI against train_dreambooth_lora_flux.py's flag table, extracted
from the script's AST (scripts/script_flags.py -> tests/unit/data/), and the family's math against diffusers' own
timestep density, loss weighting and FluxPipeline's latent packing (no re-typed formulas)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dreambooth_api.config import ConfigError, FluxLoraConfig, parse_training
from dreambooth_trainer.cli_args import build_parser, parse_cli
from dreambooth_trainer.families import family_for
from dreambooth_trainer.families.flux import flow_timesteps, flux_loss
from dreambooth_trainer.objective import scheduler_sigmas

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parent / "data" / "train_dreambooth_lora_flux.flags.json"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "flags.md"
TABLE = {f["name"]: f for f in json.loads(DATA.read_text())["flags"]}
# Settings of ours (each defaulting to the script's behaviour) or of other scripts (refused for Flux when set).
EXTENSIONS = {
    "expected_preemption_interval_seconds", "skip_bad_images", "allow_large_resolution", "unsafe_shared_output",
    "tokenizer_name", "pre_compute_text_embeddings", "tokenizer_max_length", "text_encoder_use_attention_mask",
    "validation_images", "class_labels_conditioning", "snr_gamma", "enable_xformers_memory_efficient_attention",
    "image_interpolation_mode", "adam_fused", "compile",
}  # fmt: skip
BASE = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p"]
TRAINING = {"pretrainedModelNameOrPath": "m", "instanceDataDir": "d", "instancePrompt": "p"}
SCHEMES = ["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"]


def test_the_table_is_the_scripts_76_flags() -> None:
    assert len(TABLE) == 76
    assert {"guidance_scale", "max_sequence_length", "weighting_scheme", "lora_layers", "lora_alpha"} <= set(TABLE)
    assert TABLE["weighting_scheme"]["choices"] == SCHEMES


def test_every_script_flag_exists_with_the_scripts_default_and_nothing_else() -> None:
    ours = FluxLoraConfig.model_fields
    assert not sorted(set(TABLE) - set(ours)), "flags of the script missing from FluxLoraConfig"
    assert sorted(set(ours) - set(TABLE)) == sorted(EXTENSIONS)
    for name, flag in TABLE.items():
        info = ours[name]
        assert info.is_required() == flag["required"], name
        if not flag["required"]:
            assert info.get_default() == flag["default"], (name, info.get_default(), flag["default"])
    # Ours: the LoRA script's resize flag, defaulting to the filter the Flux script hard-codes.
    assert ours["image_interpolation_mode"].get_default() == "bilinear"


def test_cli_takes_the_scripts_spellings_and_choices() -> None:
    parser = build_parser(FluxLoraConfig, "dreambooth train-lora-flux")
    actions = {a.dest: a for a in parser._actions}
    for name, flag in TABLE.items():
        assert f"--{name}" in actions[name].option_strings
        if isinstance(flag["choices"], list):
            assert sorted(actions[name].choices) == sorted(flag["choices"]), name
    assert actions["optimizer"].choices is None  # free text: others warn and fall back to AdamW, as the script
    cfg = parse_cli(FluxLoraConfig, [*BASE, "--weighting_scheme", "logit_normal", "--guidance_scale", "1.0"], "x")
    assert cfg.method == "lora-flux" and cfg.resolution == 512 and cfg.output_dir == "flux-dreambooth-lora"
    assert cfg.max_sequence_length == 512 and cfg.lora_alpha == 4 and cfg.weighting_scheme == "logit_normal"
    # The flags a config gives back (torchrun command lines, --print-config) reproduce it.
    assert parse_cli(FluxLoraConfig, cfg.cli_args(), "x") == cfg


def test_manifest_method_lora_flux_and_its_rules() -> None:
    cfg = parse_training("lora-flux", {**TRAINING, "guidanceScale": 1.0, "loraLayers": "attn.to_k,attn.to_q"})
    assert isinstance(cfg, FluxLoraConfig) and family_for(cfg).name == "flux"
    for field, value, message in [
        ("snrGamma", 5.0, r"--snr_gamma .*not a setting of train_dreambooth_lora_flux.py"),
        ("enableXformersMemoryEfficientAttention", True, r"--enable_xformers_memory_efficient_attention .*remove"),
        ("preComputeTextEmbeddings", True, r"--pre_compute_text_embeddings"),
        ("enableNpuFlashAttention", True, r"--enable_npu_flash_attention .*NPU"),
        ("datasetName", "user/dogs", r"--dataset_name .*--instance_data_dir"),
        ("loraLayers", " , ", r"--lora_layers .*names no module"),
        ("weightingScheme", "uniform", r"--weighting_scheme"),
        ("useDora", True, r"--use_dora .*applies only to method 'lora-sdxl'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_training("lora-flux", {**TRAINING, field: value})
    with pytest.raises(ConfigError, match=r"--max_sequence_length .*greater than or equal to 1"):
        parse_training("lora-flux", {**TRAINING, "maxSequenceLength": 0})
    with pytest.raises(ConfigError, match=r"spec.method must be 'full', 'lora', 'lora-sdxl' or 'lora-flux'"):
        parse_training("flux", TRAINING)
    with pytest.raises(ConfigError, match=r"--guidance_scale .*applies only to method 'lora-flux'"):
        parse_training("lora", {**TRAINING, "guidanceScale": 1.0})


@pytest.mark.parametrize("scheme", SCHEMES)
def test_timesteps_are_diffusers_density_on_the_step_generator(scheme: str) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    cfg = FluxLoraConfig.model_validate({**TRAINING, "weightingScheme": scheme, "logitMean": 0.3, "modeScale": 1.1})
    ours = flow_timesteps(sched, cfg, 64, torch.Generator().manual_seed(7), torch.device("cpu"))
    u = compute_density_for_timestep_sampling(
        weighting_scheme=scheme, batch_size=64, logit_mean=0.3, logit_std=1.0, mode_scale=1.1,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    assert torch.equal(ours, sched.timesteps[(u * 1000).long()])
    # Each timestep's sigma is the scheduler's own for it (the script's get_sigmas).
    sig = scheduler_sigmas(sched, ours, 4, torch.float32)
    assert sig.shape == (64, 1, 1, 1)
    assert torch.allclose(sig.flatten() * 1000, ours)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_loss_is_weighted_by_diffusers_sd3_weighting(scheme: str) -> None:
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 16, 4, 4, generator=gen), torch.randn(4, 16, 4, 4, generator=gen)
    sigmas = torch.rand(4, generator=gen).clamp(0.05, 0.95).reshape(4, 1, 1, 1)
    w = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    expected = (w * (pred - target) ** 2).reshape(4, -1).mean(1).mean()
    assert torch.allclose(flux_loss(pred, target, w, False, 1.0), expected)
    # Prior preservation: the class half's loss, weighted the same way, added at prior_loss_weight.
    half = [(w[:2], pred[:2], target[:2]), (w[2:], pred[2:], target[2:])]
    inst, prior = (((ww * (p - t) ** 2).reshape(2, -1).mean(1).mean()) for ww, p, t in half)
    assert torch.allclose(flux_loss(pred, target, w, True, 0.5), inst + 0.5 * prior)


def test_latent_packing_round_trips_and_ids_address_each_patch() -> None:
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 12)
    packed = FluxPipeline._pack_latents(latents, 2, 16, 8, 12)
    assert packed.shape == (2, 4 * 6, 64)
    # The family unpacks with the VAE's scale factor: any factor gives the latents back.
    for factor in (2, 8):
        back = FluxPipeline._unpack_latents(packed, height=8 * factor, width=12 * factor, vae_scale_factor=factor)
        assert torch.equal(back, latents)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 6, torch.device("cpu"), torch.float32)
    assert ids.shape == (24, 3) and ids[:, 1].max() == 3 and ids[:, 2].max() == 5


def test_docs_flags_table_lists_every_flux_setting() -> None:
    section = DOCS.read_text().split("## `dreambooth train-lora-flux`", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `--(\w+)` \|.*$", section, flags=re.M)}
    assert set(rows) == set(FluxLoraConfig.model_fields), sorted(set(rows) ^ set(FluxLoraConfig.model_fields))
    for name, info in FluxLoraConfig.model_fields.items():
        assert f"`spec.training.{info.alias}`" in rows[name], name
