"""Validation images during and after training, and the experiment trackers (TensorBoard) that receive them.

Follows diffusers' DreamBooth scripts: ``num_validation_images`` images of ``validation_prompt`` every
``validation_steps`` optimizer steps (``train_dreambooth.py``) or at the end of every ``validation_epochs``-th
epoch (``train_dreambooth_lora.py``), generated with the model being trained, 25 inference steps, the
``validation_scheduler`` (DPM-Solver++ for LoRA, which has no such flag). On top of what the scripts do, every
validation is saved: ``<output>/validation/step-N/image-I.png`` plus ``grid.png``, and the URIs go to /progress.

Validation must not change training: it draws only from its own generator (seeded from the run's seed, as the
scripts seed theirs), never from the global RNG, and restores each module's train/eval mode afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dreambooth_api.config import CommonConfig, ConfigError

logger = logging.getLogger(__name__)

# accelerate's tracker names and the module each needs (accelerate's own `is_*_available` checks).
TRACKER_MODULES: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "comet_ml": ("comet_ml",),
    "mlflow": ("mlflow",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "aim": ("aim",),
    "swanlab": ("swanlab",),
    "trackio": ("trackio",),
}
VALIDATION_STEPS = 25  # num_inference_steps of the scripts' log_validation


def _installed(name: str) -> bool:
    return any(importlib.util.find_spec(mod) is not None for mod in TRACKER_MODULES[name])


def resolve_trackers(
    report_to: str, *, explicit: bool, installed: Callable[[str], bool] = _installed
) -> tuple[list[str], str | None]:
    """Trackers to start for ``--report_to``, and a warning to log (or None).

    ``explicit`` says whether the user set the flag. diffusers' default ``tensorboard`` crashes a run where
    TensorBoard is not installed; here the default quietly degrades (warning, no tracker), while a tracker the
    user asked for by name must be installed. ``all`` means every installed tracker, as in accelerate.
    """
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if not names or names == ["none"]:
        return [], None
    if names == ["all"]:
        return [n for n in TRACKER_MODULES if installed(n)], None
    unknown = [n for n in names if n not in TRACKER_MODULES]
    if unknown:
        raise ConfigError(
            "report_to",
            f"unknown tracker {', '.join(unknown)}; use one or more of {', '.join(TRACKER_MODULES)} "
            "(comma-separated), all, or none.",
        )
    chosen: list[str] = []
    warning = None
    for name in names:
        if installed(name):
            chosen.append(name)
        elif name == "tensorboard" and not explicit:
            warning = (
                "TensorBoard is not installed, so the default --report_to tensorboard logs nothing; "
                "`pip install tensorboard` to get the logs, or pass --report_to none to silence this."
            )
        else:
            raise ConfigError(
                "report_to",
                f"{name} is not installed: `pip install {TRACKER_MODULES[name][0]}`, or pass --report_to none.",
            )
    return chosen, warning


def trackers_for(cfg: CommonConfig) -> list[str]:
    """The trackers this config asks for, checked before any work starts (raises ConfigError)."""
    names, warning = resolve_trackers(cfg.report_to, explicit="report_to" in cfg.model_fields_set)
    if warning:
        logger.warning(warning)
    return names


def _hparam(value: Any) -> bool | int | float | str:
    return value if isinstance(value, bool | int | float | str) else str(value)


class Trackers:
    """accelerate's tracker classes on rank 0, writing under ``<logging_dir>/<run_name>`` like the scripts.

    The logging folder is local; for an s3:// output the caller uploads it (``local_dir``) when it publishes.
    """

    def __init__(
        self, names: Sequence[str], *, run_name: str, local_dir: Path, config: dict[str, Any], enabled: bool
    ) -> None:
        self.local_dir = local_dir
        self.trackers: list[Any] = []
        if not enabled or not names:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        local_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            tracker = cls(run_name, local_dir) if getattr(cls, "requires_logging_directory", False) else cls(run_name)
            tracker.start()
            # TensorBoard's hparams accept only scalars and strings; the token is a secret.
            tracker.store_init_configuration(
                {k: _hparam(v) for k, v in config.items() if k != "hub_token" and v is not None}
            )
            self.trackers.append(tracker)

    @property
    def active(self) -> bool:
        return bool(self.trackers)

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def log_images(self, tag: str, images: Sequence[Image.Image], step: int) -> None:
        if not images:
            return
        import numpy as np

        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images(tag, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
                tracker.writer.flush()
            elif tracker.name == "wandb":
                import wandb

                tracker.log({tag: [wandb.Image(im, caption=f"{i}") for i, im in enumerate(images)]}, step=step)

    def flush(self) -> None:
        for tracker in self.trackers:
            writer = getattr(tracker, "writer", None)
            if writer is not None:
                writer.flush()

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


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
    ) -> None:
        self.cfg = cfg
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
        return bool(self.cfg.validation_prompt)

    @property
    def last(self) -> ValidationRun | None:
        return self.runs[-1] if self.runs else None

    def due_after_step(self, step: int) -> bool:
        """train_dreambooth.py: every validation_steps optimizer steps."""
        every = getattr(self.cfg, "validation_steps", None)
        return self.enabled and every is not None and step % every == 0

    def due_after_epoch(self, epoch: int) -> bool:
        """train_dreambooth_lora.py: at the end of epochs 0, N, 2N, ... (N = validation_epochs)."""
        every = getattr(self.cfg, "validation_epochs", None)
        return self.enabled and every is not None and epoch % every == 0

    def due_at_end(self, step: int) -> bool:
        """A last validation of the final weights, unless one just ran at this very step."""
        return self.enabled and not (self.last and self.last.step == step)

    def _scheduler(self, noise_scheduler: Any) -> Any:
        import diffusers

        name = getattr(self.cfg, "validation_scheduler", "DPMSolverMultistepScheduler")
        config = dict(noise_scheduler.config)
        # Training used the simplified objective: a scheduler that learned variances must ignore them.
        if config.get("variance_type") in ("learned", "learned_range"):
            config["variance_type"] = "fixed_small"
        return getattr(diffusers, name).from_config(config)

    def run(self, step: int, *, unet: torch.nn.Module, text_encoder: torch.nn.Module | None, vae: torch.nn.Module,
            tokenizer: Any, noise_scheduler: Any, tag: str = "validation") -> ValidationRun:  # fmt: skip
        """Generate, save and log one validation; every module's train/eval mode is restored afterwards."""
        from diffusers import DiffusionPipeline

        cfg = self.cfg
        logger.info("validation at step %d: %d image(s) of %r", step, cfg.num_validation_images, cfg.validation_prompt)
        modules = [m for m in (unet, text_encoder, vae) if m is not None]
        modes = [m.training for m in modules]
        pipeline = DiffusionPipeline.from_pretrained(
            self.model_dir,
            unet=unet,
            text_encoder=text_encoder,
            vae=vae,
            tokenizer=tokenizer,
            scheduler=self._scheduler(noise_scheduler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            revision=cfg.revision,
            variant=cfg.variant,
        )
        pipeline.set_progress_bar_config(disable=True)
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
        return ValidationRun(step, images, files, [self.out.url(k) for k in files])


__all__ = [
    "TRACKER_MODULES",
    "Trackers",
    "ValidationRun",
    "Validator",
    "make_grid",
    "resolve_trackers",
    "trackers_for",
]
