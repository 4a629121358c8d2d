"""Load the pipeline's parts, add LoRA adapters, and switch on memory savers."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth_api.config import CommonConfig, ConfigError

logger = logging.getLogger(__name__)

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class Models:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object


def check_pipeline_dir(path: Path) -> None:
    """A model folder must be a diffusers pipeline; say so before anything loads."""
    if not path.is_dir():
        raise ConfigError(
            "pretrained_model_name_or_path", f"{path} does not exist; point it at a diffusers pipeline folder."
        )
    missing = [
        p
        for p in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
        if not (path / p).exists()
    ]
    if missing:
        raise ConfigError(
            "pretrained_model_name_or_path",
            f"{path} is not a diffusers Stable Diffusion pipeline (missing {', '.join(missing)}); save one with "
            "pipe.save_pretrained(DIR) or make a test model with `dreambooth tiny-model DIR`.",
        )


def check_optional_libraries(cfg: CommonConfig) -> None:
    """Fail on a missing optional library before any model loads, naming the flag and the install command."""
    if cfg.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise ConfigError(
            "enable_xformers_memory_efficient_attention",
            "needs xformers: `pip install xformers` (matching your torch build), or drop the flag (SDPA is the default).",
        )
    if cfg.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("use_8bit_adam", "needs bitsandbytes: `pip install bitsandbytes`, or drop the flag.")


def load_models(cfg: CommonConfig, model_dir: Path) -> Models:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    kw = {"revision": cfg.revision}
    tokenizer = AutoTokenizer.from_pretrained(
        cfg.tokenizer_name or model_dir, subfolder=None if cfg.tokenizer_name else "tokenizer", use_fast=False, **kw
    )
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", variant=cfg.variant, **kw)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", variant=cfg.variant, **kw)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", variant=cfg.variant, **kw)
    return Models(tokenizer, text_encoder, vae, unet, noise_scheduler)


def add_lora(models: Models, cfg: CommonConfig) -> None:
    """LoRA on the UNet's attention (and the text encoder's when it trains), as train_dreambooth_lora.py does."""
    from peft import LoraConfig

    rank: int = cfg.rank  # type: ignore[attr-defined]
    # The script gives both adapters the same dropout; at 0.0 peft uses an identity (no RNG draw).
    dropout: float = cfg.lora_dropout  # type: ignore[attr-defined]

    def adapter(targets: list[str]) -> LoraConfig:
        return LoraConfig(
            r=rank, lora_alpha=rank, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets
        )

    models.unet.add_adapter(adapter(UNET_LORA_TARGETS))
    if cfg.train_text_encoder:
        models.text_encoder.add_adapter(adapter(TEXT_LORA_TARGETS))


def set_trainable(models: Models, cfg: CommonConfig) -> list[torch.nn.Module]:
    """Freeze what does not train; return the modules whose parameters the optimizer gets."""
    models.vae.requires_grad_(False)
    if cfg.method == "lora":
        # add_adapter put LoRA layers in; only they train (a text encoder without adapters is frozen whole).
        for module in (models.unet, models.text_encoder):
            for name, p in module.named_parameters():
                p.requires_grad_("lora_" in name)
    else:
        models.unet.requires_grad_(True)
        models.text_encoder.requires_grad_(bool(cfg.train_text_encoder))
    trained = [models.unet] + ([models.text_encoder] if cfg.train_text_encoder else [])
    return trained


def enable_memory_savers(models: Models, cfg: CommonConfig, gradient_checkpointing: bool) -> None:
    if gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            models.text_encoder.gradient_checkpointing_enable()
    if cfg.enable_xformers_memory_efficient_attention:
        models.unet.enable_xformers_memory_efficient_attention()


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the parameters that train, by name: what a checkpoint must hold to resume bit-identically."""
    return {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ValueError(f"checkpoint does not match the model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def optimizer_class(cfg: CommonConfig):
    if cfg.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit
    return torch.optim.AdamW
