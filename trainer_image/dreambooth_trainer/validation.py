"""Validation images during and after training (the trackers that receive them: `trackers`).

Follows diffusers' DreamBooth scripts: ``num_validation_images`` images of ``validation_prompt`` every
``validation_steps`` optimizer steps (``train_dreambooth.py``) or at the end of every ``validation_epochs``-th
epoch (``train_dreambooth_lora.py``), generated with the model being trained, 25 inference steps, the
``validation_scheduler`` (DPM-Solver++ for LoRA, which has no such flag). On top of what the scripts do, every
validation is saved: ``<output>/validation/step-N/image-I.png`` plus ``grid.png``, the URIs go to /progress, and
``<output>/validation/index.html`` (gallery.py) shows every validation so far.

Validation must not change training: it draws only from its own generator (seeded from the run's seed, as the
scripts seed theirs), never from the global RNG, and restores each module's train/eval mode afterwards.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dreambooth_api.config import CommonConfig, FullConfig, LoraConfig

from . import gallery
from .families import ModelFamily, family_for
from .trackers import Trackers

logger = logging.getLogger(__name__)

VALIDATION_STEPS = 25  # num_inference_steps of the scripts' log_validation


def make_grid(images: Sequence[Image.Image]) -> Image.Image:
    """All images in one near-square grid (empty cells black), as diffusers' make_image_grid lays them out."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, box=(i % cols * w, i // cols * h))
    return grid


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class ValidationRun:
    step: int
    images: list[Image.Image]
    files: list[str]  # keys under the output, images first, then the grid
    uris: list[str] = field(default_factory=list)


class Validator:
    """Generates and publishes validation images (rank 0 only)."""

    def __init__(
        self,
        cfg: CommonConfig,
        *,
        device: torch.device,
        weight_dtype: torch.dtype,
        model_dir: Path,
        out: Any,
        local_out: Path,
        trackers: Trackers,
        seed: int,
        prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
        family: ModelFamily | None = None,
    ) -> None:
        self.cfg = cfg
        self.family = family or family_for(cfg)
        self.device = device
        self.weight_dtype = weight_dtype
        self.model_dir = model_dir
        self.out = out
        self.local_out = local_out
        self.trackers = trackers
        self.seed = seed
        self.prompt_embeds = prompt_embeds
        self.runs: list[ValidationRun] = []

    @property
    def enabled(self) -> bool:
        # --num_validation_images 0: the LoRA script's way to skip the final inference; no validation at all here.
        return bool(self.cfg.validation_prompt) and self.cfg.num_validation_images > 0

    @property
    def last(self) -> ValidationRun | None:
        return self.runs[-1] if self.runs else None

    def due_after_step(self, step: int) -> bool:
        """train_dreambooth.py: every validation_steps optimizer steps."""
        every = self.cfg.validation_steps if isinstance(self.cfg, FullConfig) else None
        return self.enabled and every is not None and step % every == 0

    def due_after_epoch(self, epoch: int) -> bool:
        """train_dreambooth_lora.py: at the end of epochs 0, N, 2N, ... (N = validation_epochs)."""
        every = self.cfg.validation_epochs if isinstance(self.cfg, LoraConfig) else None
        return self.enabled and every is not None and epoch % every == 0

    def due_at_end(self, step: int) -> bool:
        """A last validation of the final weights, unless one just ran at this very step."""
        return self.enabled and not (self.last and self.last.step == step)

    def _scheduler(self, noise_scheduler: Any) -> Any:
        import diffusers

        config = dict(noise_scheduler.config)
        if getattr(self.cfg, "do_edm_style_training", False) or "EDM" in type(noise_scheduler).__name__:
            # train_dreambooth_lora_sdxl.py samples EDM-trained weights with the model's own (Euler/EDM) scheduler.
            return type(noise_scheduler).from_config(config)
        name = self.cfg.validation_scheduler if isinstance(self.cfg, FullConfig) else "DPMSolverMultistepScheduler"
        # Training used the simplified objective: a scheduler that learned variances must ignore them.
        if config.get("variance_type") in ("learned", "learned_range"):
            config["variance_type"] = "fixed_small"
        return getattr(diffusers, name).from_config(config)

    def run(self, step: int, *, unet: torch.nn.Module, text_encoder: torch.nn.Module | None, vae: torch.nn.Module,
            tokenizer: Any, noise_scheduler: Any, tag: str = "validation",
            more: dict[str, Any] | None = None) -> ValidationRun:  # fmt: skip
        """Generate, save and log one validation; every module's train/eval mode is restored afterwards."""
        cfg = self.cfg
        logger.info("validation at step %d: %d image(s) of %r", step, cfg.num_validation_images, cfg.validation_prompt)
        # `more`: a family's further parts (SDXL's text_encoder_2), by pipeline name.
        modules = [m for m in (unet, text_encoder, vae, *(more or {}).values()) if m is not None]
        modes = [m.training for m in modules]
        pipeline = self.family.validation_pipeline(
            self.model_dir,
            cfg,
            {"unet": unet, "text_encoder": text_encoder, "vae": vae, "tokenizer": tokenizer,
             "scheduler": self._scheduler(noise_scheduler), **(more or {})},
        )  # fmt: skip
        pipeline.set_progress_bar_config(disable=True)
        self._place_reloaded_encoders(pipeline, modules)
        if self.prompt_embeds is not None:
            args: dict[str, Any] = {
                "prompt_embeds": self.prompt_embeds[0].to(self.device, self.weight_dtype),
                "negative_prompt_embeds": self.prompt_embeds[1].to(self.device, self.weight_dtype),
            }
        else:
            args = {"prompt": cfg.validation_prompt}
        # Its own generator: validation must not advance any RNG that training reads.
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        # Mixed precision leaves frozen parts in half precision and trained ones in fp32: autocast reconciles them
        # (the scripts autocast on CUDA only, so bf16 validation on CPU failed there).
        autocast = (
            torch.autocast(self.device.type, dtype=self.weight_dtype)
            if self.weight_dtype != torch.float32
            else contextlib.nullcontext()
        )
        images: list[Image.Image] = []
        try:
            for m in modules:
                m.eval()
            with torch.no_grad(), autocast:
                for _ in range(cfg.num_validation_images):
                    images.append(pipeline(**args, num_inference_steps=VALIDATION_STEPS, generator=generator).images[0])
        finally:
            for m, was_training in zip(modules, modes, strict=True):
                m.train(was_training)
            del pipeline
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        run = self._publish(step, images)
        self.trackers.log_images(tag, images, step)
        for earlier in self.runs:
            earlier.images = []  # only the latest validation's pixels are needed (model card); keep memory flat
        self.runs.append(run)
        return run

    def _place_reloaded_encoders(self, pipeline: Any, given: list[torch.nn.Module]) -> None:
        """Text encoders the trainer freed after encoding its prompts (SDXL, Flux) come back from the model folder
        with the pipeline, in fp32 on the CPU: on the device in the weights' dtype, as the scripts load them for
        validation. They go with the pipeline afterwards."""
        kept = {id(m) for m in given}
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipeline, name, None)
            if isinstance(encoder, torch.nn.Module) and id(encoder) not in kept:
                encoder.requires_grad_(False)
                encoder.to(self.device, dtype=self.weight_dtype)

    def _publish(self, step: int, images: list[Image.Image]) -> ValidationRun:
        """Write the images and their grid under the output (and its local mirror, for the model card and Hub)."""
        folder = f"validation/step-{step}"
        blobs = {f"{folder}/image-{i}.png": _png(im) for i, im in enumerate(images)}
        blobs[f"{folder}/grid.png"] = _png(make_grid(images))
        local_root = self.out.local_root()
        for key, data in blobs.items():
            local = self.local_out / key
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(data)
            if local_root is None or Path(local_root) != self.local_out:
                self.out.write_bytes(key, data)
        files = list(blobs)
        self._write_gallery()
        return ValidationRun(step, images, files, [self.out.url(k) for k in files])

    def _write_gallery(self) -> None:
        """``validation/index.html``: every validation of the output so far, newest first, one self-contained page.
        Earlier attempts' images are read from the output (this attempt's scratch mirror does not hold them)."""
        try:
            keys = gallery.group([o.key for o in self.out.list("validation/")])
            steps = {}
            for step, step_keys in keys.items():
                steps[step] = []
                for key in step_keys:
                    local = self.local_out / key
                    data = local.read_bytes() if local.is_file() else self.out.read_bytes(key)
                    steps[step].append((key.rsplit("/", 1)[-1], data))
            name = os.environ.get("DREAMBOOTH_JOB_NAME") or Path(self.out.url("")).name or "run"
            page = gallery.render(name, steps, self.cfg.validation_prompt, source=self.out.url("validation/"))
            self.out.write_text("validation/index.html", page)
        except Exception as e:  # noqa: BLE001 - a page for people must never fail the training it shows
            logger.warning("could not write validation/index.html: %s", e)
