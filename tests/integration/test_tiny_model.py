"""The tiny model (dreambooth_trainer.tiny) and the shipped sample images, through real diffusers/transformers."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dreambooth_trainer import tiny
from dreambooth_trainer.data import DreamBoothDataset, EpochSampler, collate_fn, list_images

pytestmark = pytest.mark.integration
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DOG = REPO / "examples" / "data" / "dog"
EXAMPLE_CLASS_DOG = REPO / "examples" / "data" / "class-dog"


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    start = time.perf_counter()
    # Imported first so the report tells import time (paid once per process) from making time.
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    imported = time.perf_counter()
    tiny.make_tiny_model(out, seed=0)
    made = time.perf_counter()
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"\ntiny model: {size / 1e6:.2f} MB, made in {made - imported:.2f} s (+ {imported - start:.2f} s imports)")
    return out


@pytest.fixture
def offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import time, so patch its constant as well as the env.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_same_seed_same_bytes_across_processes_and_small(tiny_model, tmp_path):
    # The CLI in a fresh process, offline: same bytes as the in-process make, every file (weights included).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cli = subprocess.run(
        [sys.executable, "-m", "dreambooth_trainer.tiny", str(tmp_path / "cli"), "--seed", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert "wrote tiny Stable Diffusion pipeline" in cli.stdout
    ours, theirs = file_hashes(tiny_model), file_hashes(tmp_path / "cli")
    assert ours == theirs
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= set(ours)
    assert "text_encoder/model.safetensors" in ours and "tokenizer/vocab.json" in ours

    size = sum(p.stat().st_size for p in tiny_model.rglob("*") if p.is_file())
    assert size < 10 * 1024 * 1024

    other = tiny.make_tiny_model(tmp_path / "seed1", seed=1)
    other_hashes = file_hashes(other)
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert other_hashes[name] != ours[name]
    # Tokenizer and configs do not depend on the seed.
    assert other_hashes["tokenizer/vocab.json"] == ours["tokenizer/vocab.json"]


def test_make_does_not_disturb_the_callers_rng(tmp_path):
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    tiny.make_tiny_model(tmp_path / "m", seed=3)
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_written_by_the_project(tiny_model, offline, tmp_path):
    from transformers import CLIPTokenizer

    vocab = json.loads((tiny_model / "tokenizer" / "vocab.json").read_text())
    merges = (tiny_model / "tokenizer" / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version")
    assert len(vocab) == 256 * 2 + len(merges) - 1 + 2
    assert vocab["<|endoftext|>"] == len(vocab) - 1

    tok = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    enc = tok("a photo of sks dog", padding="max_length", max_length=tok.model_max_length, truncation=True)
    assert tok.model_max_length == 77 and len(enc.input_ids) == 77
    assert tok.convert_ids_to_tokens(enc.input_ids[:7]) == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "sks</w>",
        "dog</w>",
        "<|endoftext|>",
    ]
    assert enc.input_ids[7:] == [tok.pad_token_id] * 70 and sum(enc.attention_mask) == 7
    # Unknown words fall back to byte tokens; nothing maps to unk, and long prompts truncate to 77.
    odd = tok("Zebra, 42 émoji 🙂!").input_ids
    assert tok.unk_token_id not in odd[1:-1]
    long = tok("dog " * 200, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[-1] == tok.eos_token_id

    # The two files the project writes are a complete tokenizer on their own (no tokenizer.json needed).
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (bare / name).write_bytes((tiny_model / "tokenizer" / name).read_bytes())
    from_files = CLIPTokenizer.from_pretrained(bare, model_max_length=77)
    for text in ("a photo of sks dog", "Zebra, 42 émoji 🙂!", "dog " * 200):
        kwargs = {"padding": "max_length", "max_length": 77, "truncation": True}
        assert from_files(text, **kwargs).input_ids == tok(text, **kwargs).input_ids

    from transformers import CLIPTextConfig

    config = CLIPTextConfig.from_pretrained(tiny_model / "text_encoder")
    assert config.vocab_size == len(tok) and config.eos_token_id == tok.eos_token_id


@pytest.mark.parametrize("size", [32, 64])
def test_loads_offline_and_generates(tiny_model, offline, size):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    start = time.perf_counter()
    out = pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        height=size,
        width=size,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    print(f"\ngenerate {size}x{size}, 2 steps: {time.perf_counter() - start:.2f} s")
    image = out.images[0]
    assert image.shape == (size, size, 3) and np.isfinite(image).all()
    assert image.min() >= 0 and image.max() <= 1


def test_default_resolution_is_32(tiny_model, offline):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_v_prediction_model(tmp_path, offline):
    from diffusers import DDPMScheduler

    out = tiny.make_tiny_model(tmp_path / "v", prediction_type="v_prediction")
    assert DDPMScheduler.from_pretrained(out, subfolder="scheduler").config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="prediction_type"):
        tiny.make_tiny_model(tmp_path / "bad", prediction_type="sample")


def test_ensure_tiny_model_makes_once_and_survives_a_race(tmp_path, monkeypatch):
    calls: list[Path] = []
    real_make = tiny.make_tiny_model

    def counting_make(out_dir, *args, **kwargs):
        calls.append(Path(out_dir))
        return real_make(out_dir, *args, **kwargs)

    monkeypatch.setattr(tiny, "make_tiny_model", counting_make)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(tiny.ensure_tiny_model(tmp_path / "cache"))
        except BaseException as exc:  # surfaced below: a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    expected = tmp_path / "cache" / f"tiny-model-{tiny.TINY_MODEL_VERSION}"
    assert results == [expected] * 3
    assert len(calls) == 1, "the lock lets one racer make the model; the others reuse it"
    assert (expected / "model_index.json").is_file()
    # Only the model and its lock file remain: no half-written temporary folders.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f".{expected.name}.lock", expected.name]
    # Cached: a second call does not make it again.
    assert tiny.ensure_tiny_model(tmp_path / "cache") == expected and len(calls) == 1

    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    assert tiny.ensure_tiny_model() == expected


def test_ensure_tiny_model_moves_an_incomplete_folder_aside(tmp_path):
    stale = tmp_path / f"tiny-model-{tiny.TINY_MODEL_VERSION}-v_prediction"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("x")
    out = tiny.ensure_tiny_model(tmp_path, prediction_type="v_prediction")
    assert out == stale and (out / "model_index.json").is_file()
    assert any(p.name.startswith(f"{stale.name}.incomplete-") for p in tmp_path.iterdir())


# ---------------------------------------------------------------------------------------- sample images


def test_shipped_sample_images_are_what_the_generator_writes(tmp_path):
    shipped = list_images(EXAMPLE_DOG)
    shipped_class = list_images(EXAMPLE_CLASS_DOG)
    assert len(shipped) == 5 and len(shipped_class) == 4
    total = sum(p.stat().st_size for p in shipped + shipped_class)
    assert total < 100 * 1024

    written = tiny.write_sample_images(tmp_path / "dog", n=5)
    written_class = tiny.write_sample_images(tmp_path / "class-dog", n=4, kind="class")
    assert [p.read_bytes() for p in written] == [p.read_bytes() for p in shipped]
    assert [p.read_bytes() for p in written_class] == [p.read_bytes() for p in shipped_class]

    from PIL import Image

    pixels = [np.asarray(Image.open(p)) for p in shipped + shipped_class]
    assert all(a.shape == (64, 64, 3) for a in pixels)
    # Visually distinct: no two images are near-copies.
    for i in range(len(pixels)):
        for j in range(i + 1, len(pixels)):
            assert np.abs(pixels[i].astype(int) - pixels[j].astype(int)).mean() > 10


def test_dataset_on_shipped_images_with_real_tokenizer_and_workers(tiny_model):
    """Items made in DataLoader worker processes equal items made in the main process, every epoch."""
    from torch.utils.data import DataLoader
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")

    def batches(num_workers: int, epoch: int) -> list[dict[str, torch.Tensor]]:
        ds = DreamBoothDataset(
            EXAMPLE_DOG,
            "a photo of sks dog",
            tokenizer,
            class_data_root=EXAMPLE_CLASS_DOG,
            class_prompt="a photo of dog",
            size=32,
            seed=11,
        )
        sampler = EpochSampler(len(ds), seed=11, batch_size=2)
        ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        loader = DataLoader(
            ds,
            batch_size=2,
            sampler=sampler,
            num_workers=num_workers,
            collate_fn=functools.partial(collate_fn, with_prior_preservation=True),
        )
        return list(loader)

    for epoch in (0, 1):
        main = batches(0, epoch)
        workers = batches(2, epoch)
        assert len(main) == 3  # 5 instance images, batch 2
        assert main[0]["pixel_values"].shape == (4, 3, 32, 32)
        assert main[0]["input_ids"].shape == (4, 77) and main[0]["attention_mask"].shape == (4, 77)
        for a, b in zip(main, workers, strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a)
