"""The model-family seam (docs/design.md, "Model families"): what differs between the diffusers DreamBooth
scripts of one model family and another — the parts a pipeline folder holds, how a prompt is encoded, the extra
conditioning, the noise/target/loss, where LoRA adapters go, the final save and the validation pipeline.

Everything else is shared and no family touches it: data order and per-step RNG, the checkpoint protocol, S3,
the launcher, exact resume, the operator. A family is a stateless object; the parts it loads travel in `Parts`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dreambooth_api.config import CommonConfig

from .prompts import PromptRows, RowEncoder


@dataclass
class Parts:
    """The loaded pipeline parts the loop needs. `extra` holds a family's own (a second text encoder, ...)."""

    tokenizer: Any
    text_encoder: torch.nn.Module | None
    vae: torch.nn.Module | None
    denoiser: torch.nn.Module  # the UNet (SD, SDXL) or the transformer (Flux)
    noise_scheduler: Any
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def unet(self) -> torch.nn.Module:
        return self.denoiser


class ModelFamily(ABC):
    """One diffusers model family, as its DreamBooth scripts train it."""

    name: str
    # manifest `spec.method` -> the config model of that method's script (its flags and defaults)
    methods: Mapping[str, type[CommonConfig]]
    # Keep the VAE in fp32 under mixed precision unless a VAE was given apart (SDXL's stock VAE overflows in fp16).
    upcast_vae: bool = False

    # -------------------------------------------------------------------- parts
    @abstractmethod
    def check_model_dir(self, path: Path) -> None:
        """Raise ConfigError naming --pretrained_model_name_or_path when `path` is not this family's pipeline."""

    @abstractmethod
    def load(self, cfg: CommonConfig, model_dir: Path, extra_dirs: Mapping[str, Path] | None = None) -> Parts:
        """The parts from the model folder; `extra_dirs` holds staged folders of parts given apart (SDXL's VAE)."""

    @abstractmethod
    def add_lora(self, parts: Parts, cfg: CommonConfig) -> None:
        """Attach the LoRA adapters the family's LoRA script attaches."""

    @abstractmethod
    def set_trainable(self, parts: Parts, cfg: CommonConfig) -> list[torch.nn.Module]:
        """Freeze what does not train; return the trained modules, denoiser first (checkpoint file order)."""

    @abstractmethod
    def trained_names(self, count: int) -> list[str]:
        """Checkpoint names of the first `count` trained modules (training/<name>.safetensors)."""

    @abstractmethod
    def enable_memory_savers(self, parts: Parts, cfg: CommonConfig, gradient_checkpointing: bool) -> None: ...

    def text_encoders(self, parts: Parts) -> dict[str, torch.nn.Module]:
        """The text encoders by pipeline name, in the order they train (after the denoiser in `set_trainable`): the
        first, and a second one a family keeps in ``extra`` (SDXL's OpenCLIP, Flux's T5)."""
        found = {"text_encoder": parts.text_encoder, "text_encoder_2": parts.extra.get("text_encoder_2")}
        return {name: module for name, module in found.items() if module is not None}

    def dataset_options(self, cfg: CommonConfig) -> dict[str, Any]:
        """Keyword arguments for DreamBoothDataset beyond the shared ones (SDXL: crop geometry, flips, repeats)."""
        return {}

    def optimizer_params(self, cfg: CommonConfig, trained: list[torch.nn.Module], lr: float) -> list[Any]:
        """What the optimizer is built on: the trained parameters, or parameter groups with their own settings."""
        return [p for mod in trained for p in mod.parameters() if p.requires_grad]

    # -------------------------------------------------------------------- one step
    def encode_batch(
        self,
        cfg: CommonConfig,
        parts: Parts,
        text_encoders: list[torch.nn.Module],
        batch: Mapping[str, Any],
        device: torch.device,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The prompt states of a batch for the denoiser, and extra denoiser arguments that come from the text."""
        if getattr(cfg, "pre_compute_text_embeddings", False):
            return batch["input_ids"].to(device), {}
        mask = batch.get("attention_mask") if getattr(cfg, "text_encoder_use_attention_mask", False) else None
        states = self.encode_prompt(
            text_encoders[0], batch["input_ids"].to(device), None if mask is None else mask.to(device)
        )
        return states, {}

    @abstractmethod
    def encode_prompt(
        self, text_encoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor: ...

    def row_encoder(
        self, parts: Parts, text_encoders: list[torch.nn.Module], device: torch.device
    ) -> RowEncoder | None:
        """How frozen text encoders on `device` encode host prompt ids for `PromptRows`, in a family that keeps its
        prompts' outputs (SDXL, Flux); None where the family has no such cache (SD: --pre_compute_text_embeddings)
        or the encoders are gone."""
        return None

    def frozen_prompt_outputs(
        self, parts: Parts, text_encoders: list[torch.nn.Module], ids: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, ...]:
        """A batch's outputs of the frozen text encoders (`ids` on the host), each prompt encoded once per run."""
        return _prompt_rows(parts).get(ids, self.row_encoder(parts, text_encoders, device))

    def encode_fixed_prompts(self, parts: Parts, prompt_ids: list[torch.Tensor], device: torch.device) -> int:
        """Encode the run's only prompts (host ids), then drop the frozen text encoders from `parts`, as the SDXL
        and Flux scripts do when no image has its own caption; the parameters freed (0: nothing freed, the family
        has no prompt cache). The caller knows the prompts are fixed and that no text encoder trains."""
        encoders = list(self.text_encoders(parts).values())
        encode = self.row_encoder(parts, encoders, device) if encoders else None
        if encode is None:
            return 0
        rows = _prompt_rows(parts)
        for ids in prompt_ids:
            rows.get(ids, encode)
        rows.seal()
        freed = sum(p.numel() for encoder in encoders for p in encoder.parameters())
        parts.text_encoder = None
        parts.extra.pop("text_encoder_2", None)
        return freed

    @abstractmethod
    def extra_conditioning(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        """Keyword arguments the denoiser takes beyond (noisy latents, timesteps, prompt states)."""

    @abstractmethod
    def sample_noise(self, latents: torch.Tensor, gen: torch.Generator, cfg: CommonConfig) -> torch.Tensor: ...

    @abstractmethod
    def sample_timesteps(
        self, parts: Parts, batch: int, gen: torch.Generator, device: torch.device
    ) -> torch.Tensor: ...

    @abstractmethod
    def add_noise(
        self, parts: Parts, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor: ...

    @abstractmethod
    def denoise(
        self,
        parts: Parts,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        states: torch.Tensor,
        extra: dict[str, Any],
    ) -> torch.Tensor: ...

    @abstractmethod
    def loss(
        self,
        parts: Parts,
        cfg: CommonConfig,
        model_pred: torch.Tensor,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """The training loss (target, weighting, prior preservation) for one micro-batch."""

    # -------------------------------------------------------------------- outputs
    @abstractmethod
    def lora_layers(self, parts: Parts, train_text_encoder: bool) -> dict[str, torch.Tensor]:
        """The LoRA weights in diffusers' saved layout (keys prefixed unet./text_encoder./...)."""

    @abstractmethod
    def save_lora(self, folder: Path, layers: dict[str, torch.Tensor], cfg: CommonConfig | None = None) -> list[str]:
        """Write `pytorch_lora_weights.safetensors` (as the family's pipeline loads it); return the files."""

    @abstractmethod
    def full_pipeline(self, model_dir: Path, cfg: CommonConfig, trained: dict[str, torch.nn.Module]) -> Any:
        """The pipeline to save after a full fine-tune, with the trained modules in place."""

    @abstractmethod
    def validation_pipeline(self, model_dir: Path, cfg: CommonConfig, modules: dict[str, Any]) -> Any:
        """The pipeline validation generates with, built around the modules being trained."""

    @abstractmethod
    def write_tiny_model(self, out_dir: Path) -> Path:
        """A tiny random pipeline of this family for tests (offline)."""


def _prompt_rows(parts: Parts) -> PromptRows:
    rows = parts.extra.get("prompt_rows")
    if rows is None:
        rows = parts.extra["prompt_rows"] = PromptRows()
    return rows


def text_encoder_lr_groups(cfg: Any, trained: list[torch.nn.Module], lr: float) -> list[Any]:
    """The SDXL and Flux LoRA scripts' parameter groups: the denoiser's LoRA at the learning rate, each trained
    text encoder's at text_encoder_lr with adam_weight_decay_text_encoder (prodigy: one learning rate for all, as
    the scripts force)."""
    groups: list[Any] = [{"params": [p for p in trained[0].parameters() if p.requires_grad], "lr": lr}]
    te_lr = cfg.learning_rate if cfg.uses_prodigy else cfg.text_encoder_lr
    for module in trained[1:]:
        groups.append(
            {
                "params": [p for p in module.parameters() if p.requires_grad],
                "weight_decay": cfg.adam_weight_decay_text_encoder,
                "lr": te_lr,
            }
        )
    return groups
