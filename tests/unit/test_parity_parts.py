"""Pure parts of the parity features: tracker choice, class-image sharding, grids, model card, Hub naming."""

from __future__ import annotations

import pytest
import torch
import yaml
from PIL import Image

from dreambooth_api.config import ConfigError, FullConfig, LoraConfig
from dreambooth_trainer.classimages import file_name, generation_dtype, image_seed, shard
from dreambooth_trainer.hub import UPLOAD_IGNORE, repo_id_for
from dreambooth_trainer.modelcard import is_hub_id, model_card
from dreambooth_trainer.trackers import resolve_trackers
from dreambooth_trainer.validation import make_grid

pytestmark = pytest.mark.unit

BASE = {"pretrained_model_name_or_path": "m", "instance_data_dir": "d", "instance_prompt": "a photo of sks dog"}


def _installed(*names):
    return lambda name: name in names


@pytest.mark.parametrize(
    ("report_to", "explicit", "installed", "trackers", "warns"),
    [
        ("tensorboard", False, ("tensorboard",), ["tensorboard"], False),
        # diffusers' default would crash without TensorBoard; ours degrades to a warning.
        ("tensorboard", False, (), [], True),
        ("none", True, ("tensorboard",), [], False),
        ("all", True, ("tensorboard", "wandb"), ["tensorboard", "wandb"], False),
        ("all", True, (), [], False),
        ("tensorboard,wandb", True, ("tensorboard", "wandb"), ["tensorboard", "wandb"], False),
    ],
)
def test_tracker_choice(report_to, explicit, installed, trackers, warns) -> None:
    chosen, warning = resolve_trackers(report_to, explicit=explicit, installed=_installed(*installed))
    assert chosen == trackers
    assert (warning is not None) == warns
    if warns:
        assert "pip install tensorboard" in warning and "--report_to none" in warning


@pytest.mark.parametrize(
    ("report_to", "message"),
    [
        ("tensorboard", r"tensorboard is not installed: `pip install tensorboard`, or pass --report_to none"),
        ("wandb", r"wandb is not installed: `pip install wandb`"),
        ("tensorbored", r"unknown tracker tensorbored"),
    ],
)
def test_a_tracker_asked_for_by_name_must_exist(report_to, message) -> None:
    with pytest.raises(ConfigError, match=r"--report_to \(spec.training.reportTo\): " + message):
        resolve_trackers(report_to, explicit=True, installed=_installed())


@pytest.mark.parametrize(("missing", "world"), [(5, 1), (5, 2), (3, 4), (100, 8), (1, 3)])
def test_class_image_shards_cover_each_missing_image_exactly_once(missing, world) -> None:
    shards = [shard(missing, r, world) for r in range(world)]
    flat = sorted(i for s in shards for i in s)
    assert flat == list(range(missing)), "no padding, no gaps: exactly num_class_images in total"
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_class_image_seed_depends_on_seed_and_index_only() -> None:
    seeds = {image_seed(7, i) for i in range(1000)}
    assert len(seeds) == 1000 and image_seed(7, 3) == image_seed(7, 3) != image_seed(8, 3)
    assert all(0 <= s < 2**63 for s in seeds)
    assert file_name(12, b"pixels").startswith("00012-") and file_name(12, b"pixels").endswith(".jpg")


def test_class_generation_precision_follows_the_scripts() -> None:
    cfg = FullConfig(**BASE)
    assert generation_dtype(cfg, torch.device("cpu")) == torch.float32
    assert generation_dtype(cfg, torch.device("cuda")) == torch.float16
    assert (
        generation_dtype(FullConfig(**BASE, prior_generation_precision="bf16"), torch.device("cpu")) == torch.bfloat16
    )
    with pytest.raises(ConfigError, match=r"--prior_generation_precision .*fp16 needs a GPU"):
        generation_dtype(FullConfig(**BASE, prior_generation_precision="fp16"), torch.device("cpu"))


@pytest.mark.parametrize(("n", "size"), [(1, (8, 8)), (2, (16, 8)), (3, (16, 16)), (4, (16, 16)), (5, (24, 16))])
def test_grid_is_near_square(n, size) -> None:
    images = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(n)]
    grid = make_grid(images)
    assert grid.size == size
    assert grid.getpixel((8 * (n - 1) % size[0], 0 if n < 3 else 8 * ((n - 1) // (size[0] // 8)))) == (
        40 * (n - 1),
        0,
        0,
    )


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_front_matter_and_contents() -> None:
    base = {**BASE, "pretrained_model_name_or_path": "stabilityai/stable-diffusion-2-1-base"}
    cfg = LoraConfig(**{**base, "instance_prompt": "a photo of sks dog: #1"}, train_text_encoder=True, rank=8,
                     hub_token="hf_secret", validation_prompt="sks dog on the moon", max_train_steps=400)  # fmt: skip
    files = ["validation/step-400/image-0.png", "validation/step-400/grid.png"]
    text = model_card(cfg, steps=400, repo_id="me/sks-dog", validation_images=files, validation_step=400)
    meta = _front_matter(text)
    assert meta["base_model"] == "stabilityai/stable-diffusion-2-1-base"
    assert meta["instance_prompt"] == "a photo of sks dog: #1"  # quoted, not broken, by the YAML writer
    assert meta["license"] == "creativeml-openrail-m" and meta["inference"] is True
    assert {"dreambooth", "diffusers-training", "stable-diffusion", "text-to-image", "lora"} <= set(meta["tags"])
    assert "# LoRA DreamBooth - me/sks-dog" in text and "rank 8" in text and "Training steps: 400" in text
    assert "LoRA for the text encoder was enabled: True" in text
    assert (
        "![validation 0](validation/step-400/image-0.png)" in text and "![grid](validation/step-400/grid.png)" in text
    )
    assert "`--rank (spec.training.rank)` | 8" in text
    assert "hf_secret" not in text and "hubToken" not in text


def test_model_card_for_a_full_model_from_a_path() -> None:
    text = model_card(FullConfig(**{**BASE, "pretrained_model_name_or_path": "s3://models/sd15/"}), steps=3)
    meta = _front_matter(text)
    # The Hub rejects a base_model that is not a model id.
    assert "base_model" not in meta and "lora" not in meta["tags"]
    assert "# DreamBooth - dreambooth-model" in text and "s3://models/sd15/" in text
    assert "Validation images" not in text


@pytest.mark.parametrize(
    ("name", "hub"),
    [("runwayml/stable-diffusion-v1-5", True), ("sd-base", True), ("s3://b/m", False), ("/models/sd", False),
     ("./sd", False), ("tiny://", False), ("a/b/c", False)],
)  # fmt: skip
def test_hub_ids(name, hub) -> None:
    assert is_hub_id(name) is hub


def test_hub_repo_name_and_what_is_never_uploaded() -> None:
    assert repo_id_for(FullConfig(**BASE, output_dir="s3://runs/sks-dog/")) == "sks-dog"
    assert repo_id_for(FullConfig(**BASE, hub_model_id="me/dog")) == "me/dog"
    assert {"checkpoint-*", "checkpoint-*/**", "LATEST", ".owner"} <= set(UPLOAD_IGNORE)
