"""SDXL LoRA (`dreambooth train-lora-sdxl`): our CLI against train_dreambooth_lora_sdxl.py's flag table, extracted
from the script's AST (scripts/script_flags.py -> tests/unit/data/), and the family's math against the script's
formulas and diffusers' own schedulers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dreambooth_api.config import ConfigError, SdxlLoraConfig, parse_training
from dreambooth_trainer.cli_args import build_parser, parse_cli
from dreambooth_trainer.families import family_for
from dreambooth_trainer.families.sdxl import (
    add_time_ids,
    edm_precondition_inputs,
    edm_precondition_outputs,
    script_min_snr_weights,
)

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parent / "data" / "train_dreambooth_lora_sdxl.flags.json"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "flags.md"
TABLE = {f["name"]: f for f in json.loads(DATA.read_text())["flags"]}
# torchvision's InterpolationMode names, lower-cased: the script computes its choices from torchvision.
INTERPOLATION = ["bicubic", "bilinear", "box", "hamming", "lanczos", "nearest", "nearest_exact"]
# Settings of ours (each defaulting to the script's behaviour) or of the SD scripts (refused for SDXL when set).
EXTENSIONS = {
    "cache_latents", "expected_preemption_interval_seconds", "skip_bad_images", "allow_large_resolution",
    "unsafe_shared_output", "tokenizer_name", "pre_compute_text_embeddings", "tokenizer_max_length",
    "text_encoder_use_attention_mask", "validation_images", "class_labels_conditioning", "adam_fused", "compile",
}  # fmt: skip
BASE = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p"]


def test_the_table_is_the_scripts_72_flags() -> None:
    assert len(TABLE) == 72
    assert {"pretrained_vae_model_name_or_path", "do_edm_style_training", "use_dora", "repeats"} <= set(TABLE)


def test_every_script_flag_exists_with_the_scripts_default_and_nothing_else() -> None:
    ours = SdxlLoraConfig.model_fields
    assert not sorted(set(TABLE) - set(ours)), "flags of the script missing from SdxlLoraConfig"
    assert sorted(set(ours) - set(TABLE)) == sorted(EXTENSIONS)
    for name, flag in TABLE.items():
        info = ours[name]
        assert info.is_required() == flag["required"], name
        if not flag["required"]:
            assert info.get_default() == flag["default"], (name, info.get_default(), flag["default"])


def test_cli_takes_the_scripts_spellings_and_choices() -> None:
    parser = build_parser(SdxlLoraConfig, "dreambooth train-lora-sdxl")
    actions = {a.dest: a for a in parser._actions}
    for name, flag in TABLE.items():
        assert f"--{name}" in actions[name].option_strings
        if isinstance(flag["choices"], list):
            assert sorted(actions[name].choices) == sorted(flag["choices"]), name
    assert sorted(actions["image_interpolation_mode"].choices) == INTERPOLATION
    # The script's free-text --optimizer is free text here too: other values warn and fall back to AdamW.
    assert actions["optimizer"].choices is None


def test_switches_that_default_on_take_a_value_that_means_what_it_says() -> None:
    cfg = parse_cli(SdxlLoraConfig, [*BASE, "--prodigy_decouple", "false", "--train_text_encoder"], "x")
    assert cfg.prodigy_decouple is False and cfg.prodigy_use_bias_correction is True and cfg.train_text_encoder
    assert cfg.resolution == 1024 and cfg.learning_rate == 1e-4 and cfg.method == "lora-sdxl"
    # The flags a config gives back (torchrun command lines, --print-config) reproduce it.
    assert parse_cli(SdxlLoraConfig, cfg.cli_args(), "x") == cfg


def test_manifest_method_lora_sdxl_and_its_rules() -> None:
    training = {"pretrainedModelNameOrPath": "m", "instanceDataDir": "d", "instancePrompt": "p"}
    cfg = parse_training("lora-sdxl", {**training, "doEdmStyleTraining": True, "textEncoderLr": 1e-5})
    assert isinstance(cfg, SdxlLoraConfig) and family_for(cfg).name == "sdxl"
    with pytest.raises(ConfigError, match=r"--snr_gamma .*not supported with --do_edm_style_training"):
        parse_training("lora-sdxl", {**training, "doEdmStyleTraining": True, "snrGamma": 5.0})
    with pytest.raises(ConfigError, match=r"--pre_compute_text_embeddings .*not of train_dreambooth_lora_sdxl"):
        parse_training("lora-sdxl", {**training, "preComputeTextEmbeddings": True})
    with pytest.raises(ConfigError, match=r"--dataset_name .*--instance_data_dir"):
        parse_training("lora-sdxl", {**training, "datasetName": "user/dogs"})
    with pytest.raises(ConfigError, match=r"--cache_latents .*--random_flip"):
        parse_training("lora-sdxl", {**training, "cacheLatents": True, "centerCrop": True, "randomFlip": True})
    with pytest.raises(ConfigError, match=r"--resolution .*not a multiple of 8"):
        parse_training("lora-sdxl", {**training, "resolution": 1020})
    with pytest.raises(ConfigError, match=r"spec.method must be 'full', 'lora', 'lora-sdxl' or 'lora-flux'"):
        parse_training("sdxl", training)
    with pytest.raises(ConfigError, match=r"--use_dora .*applies only to method 'lora-sdxl'"):
        parse_training("lora", {**training, "useDora": True})


def test_add_time_ids_is_the_scripts_compute_time_ids() -> None:
    def compute_time_ids(original_size, crops_coords_top_left, resolution):  # the script's, verbatim in shape
        target_size = (resolution, resolution)
        return torch.tensor([list(original_size + crops_coords_top_left + target_size)])

    sizes, crops = [(768, 1024), (64, 48)], [(0, 128), (8, 0)]
    expected = torch.cat([compute_time_ids(s, c, 512) for s, c in zip(sizes, crops, strict=True)])
    assert torch.equal(add_time_ids(sizes, crops, 512), expected)
    assert add_time_ids(sizes, crops, 512).tolist()[0] == [768, 1024, 0, 128, 512, 512]


def test_edm_preconditioning_matches_diffusers_euler_scheduler() -> None:
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    eps = torch.randn(1, 4, 8, 8, generator=gen)
    t = sched.timesteps[3]
    sigma = sched.sigmas[3].reshape(1, 1, 1, 1)
    # c_in: what Euler scales a model input by.
    assert torch.allclose(edm_precondition_inputs(sample, sigma), sched.scale_model_input(sample, t))
    # The denoised estimate from an epsilon prediction: Euler's pred_original_sample.
    sched._step_index = None
    step = sched.step(eps, t, sample)
    assert torch.allclose(edm_precondition_outputs(eps, sample, sigma, "epsilon"), step.pred_original_sample, atol=1e-6)


def test_min_snr_weights_are_the_sdxl_scripts() -> None:
    snr = torch.tensor([0.5, 5.0, 50.0])
    eps = script_min_snr_weights(snr, 5.0, "epsilon")
    assert torch.allclose(eps, torch.tensor([1.0, 1.0, 0.1]))
    # The SDXL script adds 1 for v-prediction (train_dreambooth_lora.py divides by SNR+1 instead).
    assert torch.allclose(script_min_snr_weights(snr, 5.0, "v_prediction"), eps + 1)


def test_docs_flags_table_lists_every_sdxl_setting() -> None:
    section = DOCS.read_text().split("## `dreambooth train-lora-sdxl`", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `--(\w+)` \|.*$", section, flags=re.M)}
    assert set(rows) == set(SdxlLoraConfig.model_fields), sorted(set(rows) ^ set(SdxlLoraConfig.model_fields))
    for name, info in SdxlLoraConfig.model_fields.items():
        assert f"`spec.training.{info.alias}`" in rows[name], name


def test_image_folder_captions_repeats_and_crop_geometry(tmp_path) -> None:
    """--dataset_name's imagefolder captions per image, --repeats in the script's order, and each item's original
    size and crop (what add_time_ids is made of)."""
    import json as _json

    from PIL import Image

    from dreambooth_trainer.data import DataError, DreamBoothDataset, collate_fn, read_captions
    from dreambooth_trainer.tiny import make_tokenizer

    for name, size in (("a.png", (48, 40)), ("b.png", (40, 40))):
        Image.new("RGB", size, (200, 100, 50)).save(tmp_path / name)
    lines = [{"file_name": "a.png", "text": "a photo of sks dog"}, {"file_name": "b.png", "text": ""}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(_json.dumps(line) for line in lines) + "\n")
    captions = read_captions(tmp_path, "image", "text")
    assert captions == {"a.png": "a photo of sks dog", "b.png": ""}
    with pytest.raises(DataError, match="--caption_column 'caption' is not a column"):
        read_captions(tmp_path, "image", "caption")
    with pytest.raises(DataError, match="--image_column"):
        read_captions(tmp_path, "picture", "text")

    tok = make_tokenizer()
    ds = DreamBoothDataset(
        tmp_path, "a photo of dog", tok, size=32, center_crop=True, repeats=2, with_geometry=True, captions=captions
    )
    assert len(ds) == 4  # each image twice in a row
    ids = [ds[i]["instance_prompt_ids"] for i in range(4)]
    assert torch.equal(ids[0], ids[1]) and not torch.equal(ids[1], ids[2])
    # An empty caption falls back to the instance prompt, as in the script.
    assert torch.equal(
        ids[2], tok("a photo of dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    )
    batch = collate_fn([ds[0], ds[2]])
    # a.png is 48 wide, 40 high: resized to 38x32 (torchvision's rule), centre crop left (38-32)/2 = 3.
    assert batch["original_sizes"] == [(40, 48), (40, 40)]
    assert batch["crop_top_lefts"] == [(0, 3), (0, 0)]


def test_a_missing_optimizer_library_is_named_with_its_flag() -> None:
    import importlib.util

    from dreambooth_trainer.model import check_optional_libraries

    if importlib.util.find_spec("prodigyopt") is not None:
        pytest.skip("prodigyopt is installed here")
    cfg = parse_cli(SdxlLoraConfig, [*BASE, "--optimizer", "prodigy", "--learning_rate", "1.0"], "x")
    with pytest.raises(ConfigError, match=r"--optimizer .*pip install prodigyopt"):
        check_optional_libraries(cfg)
    # Any other name falls back to AdamW with the script's warning, no library needed.
    from dreambooth_trainer.compat import script_warnings

    other = parse_cli(SdxlLoraConfig, [*BASE, "--optimizer", "lion"], "x")
    check_optional_libraries(other)
    assert any("Defaulting to adamW" in w for w in script_warnings(other))
