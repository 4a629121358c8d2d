"""Parity features on the tiny model: validation, trackers, model card, text-encoder training, pre-computed
embeddings, cached latents, class-image generation (1 and 2 processes, local and s3://)."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from tests.trainer_utils import CLASS_DOG, assert_identical, run_dreambooth, tiny_args, torchrun_worker, weights

pytestmark = pytest.mark.integration
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
PROMPT = "a photo of sks dog"


@pytest.fixture
def in_process(monkeypatch):
    """Run the Trainer in this process (no interpreter start per run): one thread, no progress port."""
    monkeypatch.setenv("PROGRESS_PORT", "off")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit(method: str, out: Path, extra: list[str], steps: int = 6):
    from dreambooth_api.config import FullConfig, LoraConfig
    from dreambooth_trainer.cli_args import parse_cli
    from dreambooth_trainer.train import RunEnv, Trainer

    model = LoraConfig if method == "lora" else FullConfig
    cfg = parse_cli(model, tiny_args(out, steps=steps, ckpt=1000, batch=1, extra=extra), "test")
    trainer = Trainer(cfg, RunEnv())
    trainer.setup()
    return trainer, trainer.fit()


def _front_matter(readme: Path) -> dict:
    return yaml.safe_load(readme.read_text().split("---\n")[1])


def test_validation_saves_images_and_grid_and_leaves_training_bit_identical(tmp_path: Path, in_process) -> None:
    plain, validated = tmp_path / "plain", tmp_path / "validated"
    _fit("full", plain, ["--report_to", "none"])
    trainer, result = _fit("full", validated, ["--validation_prompt", PROMPT, "--validation_steps", "3",
                                               "--num_validation_images", "3"])  # fmt: skip
    # Validation draws from its own generator and restores train mode: the weights are bit-identical.
    assert_identical(weights(plain, "full"), weights(validated, "full"))

    for step in (3, 6):
        folder = validated / "validation" / f"step-{step}"
        names = sorted(p.name for p in folder.iterdir())
        assert names == ["grid.png", "image-0.png", "image-1.png", "image-2.png"]
        assert Image.open(folder / "image-0.png").size == (32, 32)
        assert Image.open(folder / "grid.png").size == (64, 64)  # 3 images: 2 x 2 cells
    # Step 6 is the last step and was validated: no second, final validation of the same weights.
    assert sorted(p.name for p in (validated / "validation").iterdir()) == ["index.html", "step-3", "step-6"]
    # ... and the gallery page shows both, newest first, every image decodable (docs/cli.md).
    from gallery_check import check_gallery  # tests/ is on sys.path (tests/conftest.py)

    assert check_gallery((validated / "validation" / "index.html").read_text()) == [(6, 3), (3, 3)]
    last = [
        f"{validated.as_uri()}/validation/step-6/{n}" for n in ("image-0.png", "image-1.png", "image-2.png", "grid.png")
    ]
    assert trainer.progress.snapshot()["validationImages"] == last
    assert result.validation_images[-4:] == last and len(result.validation_images) == 8

    card = (validated / "README.md").read_text()
    assert "## Validation images at step 6" in card and "![validation 0](validation/step-6/image-0.png)" in card
    assert _front_matter(validated / "README.md")["instance_prompt"] == PROMPT
    assert (plain / "README.md").is_file() and "Validation images" not in (plain / "README.md").read_text()

    before = torch.random.get_rng_state()
    trainer._validate()
    assert torch.equal(before, torch.random.get_rng_state()), "validation touched the global RNG"

    if HAS_TENSORBOARD:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        logs = validated / "logs" / "dreambooth"
        events = EventAccumulator(str(logs), size_guidance={"images": 0, "scalars": 0}).Reload()
        assert {"loss", "lr"} <= set(events.Tags()["scalars"])
        assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
        assert "validation" in events.Tags()["images"]
        assert not (plain / "logs" / "dreambooth").exists()  # logs/ may hold per-rank logs, not TensorBoard
    else:
        assert not (validated / "logs" / "dreambooth").exists()


def test_lora_bf16_validates_every_n_epochs_and_at_the_end_with_text_encoder_lora(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # 5 images, batch 1: epoch 0 ends at step 5 (validation_epochs 1), training ends at step 7 (final validation).
    proc = run_dreambooth(["train-lora", *tiny_args(out, steps=7, ckpt=1000, batch=1, extra=[
        "--train_text_encoder", "--rank", "2", "--mixed_precision", "bf16", "--validation_prompt", PROMPT, "--validation_epochs", "1",
        "--num_validation_images", "2", "--report_to", "none"])])  # fmt: skip
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["index.html", "step-5", "step-7"]
    assert (out / "validation" / "step-7" / "grid.png").is_file()
    layers = load_file(out / "pytorch_lora_weights.safetensors")
    te = [k for k in layers if k.startswith("text_encoder.")]
    assert te and any(k.startswith("unet.") for k in layers)
    down = [v.shape[0] for k, v in layers.items() if "lora_A" in k or "down" in k.rsplit(".", 2)[-2]]
    assert down and set(down) == {2}  # --rank 2
    meta = _front_matter(out / "README.md")
    assert "lora" in meta["tags"] and meta["instance_prompt"] == PROMPT
    assert "LoRA for the text encoder was enabled: True" in (out / "README.md").read_text()
    assert "validation at step 5" in proc.stderr and "validation at step 7" in proc.stderr


def test_lora_dropout_and_interpolation_reach_the_adapters_and_the_data(tmp_path: Path, in_process) -> None:
    from peft.tuners.lora import LoraLayer

    def lora_layers(module: torch.nn.Module) -> list[LoraLayer]:
        return [m for m in module.modules() if isinstance(m, LoraLayer)]

    asked, _ = _fit("lora", tmp_path / "asked", ["--train_text_encoder", "--rank", "2", "--lora_dropout", "0.25",
                                                 "--image_interpolation_mode", "bicubic"], steps=1)  # fmt: skip
    for module in (asked.models.unet, asked.models.text_encoder):
        layers = lora_layers(module)
        assert layers and all(layer.lora_dropout["default"].p == 0.25 for layer in layers)
    assert asked.dataset.interpolation == "bicubic"
    # The scripts' defaults: no dropout (an identity), lanczos for LoRA and bilinear for the full script.
    lora, _ = _fit("lora", tmp_path / "lora", [], steps=1)
    assert all(isinstance(layer.lora_dropout["default"], torch.nn.Identity) for layer in lora_layers(lora.models.unet))
    assert lora.dataset.interpolation == "lanczos"
    full, _ = _fit("full", tmp_path / "full", [], steps=1)
    assert full.dataset.interpolation == "bilinear"


def test_full_text_encoder_training_changes_the_saved_text_encoder(tmp_path: Path, in_process) -> None:
    from dreambooth_trainer.tiny import ensure_tiny_model

    out = tmp_path / "out"
    _fit("full", out, ["--train_text_encoder", "--learning_rate", "1e-3", "--report_to", "none"], steps=2)
    base = load_file(ensure_tiny_model() / "text_encoder" / "model.safetensors")
    tuned = load_file(out / "text_encoder" / "model.safetensors")
    assert any(not torch.equal(base[k], tuned[k]) for k in base), "the text encoder did not train"
    assert "DreamBooth for the text encoder was enabled: True" in (out / "README.md").read_text()


def test_pre_computed_embeddings_validate_without_a_text_encoder_and_skip_saving_it(tmp_path: Path, in_process) -> None:
    out = tmp_path / "out"
    trainer, _ = _fit("full", out, ["--pre_compute_text_embeddings", "--validation_prompt", PROMPT,
                                    "--num_validation_images", "1", "--validation_steps", "2",
                                    "--skip_save_text_encoder", "--report_to", "none"], steps=2)  # fmt: skip
    assert trainer.models.text_encoder is None, "the text encoder should be freed, as in diffusers"
    assert (out / "validation" / "step-2" / "image-0.png").is_file()
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and not (out / "text_encoder").exists()


def test_caches_do_not_change_the_math(tmp_path: Path, in_process) -> None:
    """Pre-computed embeddings and cached latents give the weights of a run that computes them every step."""
    base = ["--center_crop", "--report_to", "none"]
    _fit("lora", tmp_path / "plain", base, steps=4)
    _fit("lora", tmp_path / "cached", [*base, "--pre_compute_text_embeddings", "--cache_latents"], steps=4)
    plain, cached = weights(tmp_path / "plain", "lora"), weights(tmp_path / "cached", "lora")
    assert plain.keys() == cached.keys()
    worst = max((plain[k] - cached[k]).abs().max().item() for k in plain)
    assert worst < 1e-6, f"cached run differs by {worst}"


def _class_images(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".jpg"))


def test_prior_preservation_generates_only_the_missing_class_images(tmp_path: Path, in_process, caplog) -> None:
    classes = tmp_path / "class"
    classes.mkdir()
    for p in sorted(CLASS_DOG.iterdir())[:2]:
        shutil.copy(p, classes / p.name)
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="dreambooth_trainer")
    trainer, _ = _fit("full", out, ["--with_prior_preservation", "--class_data_dir", str(classes),
                                    "--class_prompt", "a photo of dog", "--num_class_images", "5",
                                    "--sample_batch_size", "2", "--report_to", "none"], steps=2)  # fmt: skip
    names = _class_images(classes)
    assert len(names) == 5
    generated = [n for n in names if not n.startswith("class-dog")]
    assert [n[:6] for n in generated] == ["00002-", "00003-", "00004-"]  # indices after the 2 present ones
    manifest = json.loads((classes / ".dreambooth-class-images.json").read_text())
    assert [f["file"] for f in manifest["files"]] == generated
    assert manifest["classPrompt"] == "a photo of dog" and manifest["seed"] == 7
    assert "2 class image(s)" in caplog.text and "3 missing" in caplog.text
    assert trainer.dataset.num_class_images == 5
    assert "Prior preservation: on" in (out / "README.md").read_text()


@pytest.mark.slow
def test_prior_preservation_with_two_processes_generates_exactly_the_count(tmp_path: Path) -> None:
    classes, out = tmp_path / "class", tmp_path / "out"
    training = {
        "pretrainedModelNameOrPath": "tiny://", "instanceDataDir": str(CLASS_DOG.parent / "dog"),
        "instancePrompt": PROMPT, "outputDir": str(out), "resolution": 32, "trainBatchSize": 1,
        "maxTrainSteps": 2, "checkpointingSteps": 1000, "seed": 7, "withPriorPreservation": True,
        "classDataDir": str(classes), "classPrompt": "a photo of dog", "numClassImages": 5, "sampleBatchSize": 2,
        "reportTo": "none",
    }  # fmt: skip
    proc = torchrun_worker("full", training, 2, tmp_path)
    names = _class_images(classes)
    # 5 split 3 + 2 with no padding; every image has its own (seed, index) generator, so none repeats.
    assert [n[:6] for n in names] == ["00000-", "00001-", "00002-", "00003-", "00004-"]
    assert len({n[6:] for n in names}) == 5, "two ranks generated the same image"
    manifest = json.loads((classes / ".dreambooth-class-images.json").read_text())
    assert sorted(f["file"] for f in manifest["files"]) == names
    assert "this rank generates 3" in proc.stderr and "this rank generates 2" in proc.stderr
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_class_folder_and_output_on_s3(tmp_path: Path, s3, bucket) -> None:
    """Class images generated into an s3:// folder; validation images, model card and TensorBoard logs in an
    s3:// output."""
    from dreambooth_trainer.storage import open_store

    store = open_store(f"s3://{bucket}/class/")
    first = sorted(CLASS_DOG.iterdir())[0]
    store.upload_file(first, first.name)
    out = f"s3://{bucket}/run/"
    tracker = ["--report_to", "tensorboard"] if HAS_TENSORBOARD else ["--report_to", "none"]
    run_dreambooth(["train-lora", *tiny_args(out, steps=1, ckpt=1000, batch=1, extra=[
        "--with_prior_preservation", "--class_data_dir", f"s3://{bucket}/class/", "--class_prompt", "a photo of dog",
        "--num_class_images", "3", "--validation_prompt", PROMPT, "--num_validation_images", "1", *tracker])],
        env=s3_env(s3))  # fmt: skip
    keys = sorted(o.key for o in store.list(""))
    generated = [k for k in keys if k.endswith(".jpg")]
    assert [k[:6] for k in generated] == ["00001-", "00002-"] and first.name in keys
    manifest = json.loads(store.read_text(".dreambooth-class-images.json"))
    assert [f["file"] for f in manifest["files"]] == generated

    output = {o.key for o in open_store(out).list("")}
    assert {"pytorch_lora_weights.safetensors", "README.md", "validation/step-1/image-0.png",
            "validation/step-1/grid.png"} <= output  # fmt: skip
    assert "![validation 0](validation/step-1/image-0.png)" in open_store(out).read_text("README.md")
    if HAS_TENSORBOARD:
        assert any(k.startswith("logs/dreambooth-lora/events.out.tfevents") for k in output), sorted(output)


def s3_env(s3) -> dict[str, str]:
    from tests.trainer_utils import trainer_env

    return trainer_env(**s3.env())
