"""Warnings diffusers' DreamBooth scripts print for flags that have no effect, so a switched-over command says
the same things."""

from __future__ import annotations

import logging

from dreambooth_api.config import CommonConfig, ScriptLoraConfig, SdxlLoraConfig, flag_and_field

logger = logging.getLogger(__name__)


def script_warnings(cfg: CommonConfig) -> list[str]:
    out = []
    if not cfg.with_prior_preservation:
        for name in ("class_data_dir", "class_prompt"):
            if getattr(cfg, name):
                out.append(f"You need not use {flag_and_field(name)} without --with_prior_preservation: it is ignored.")
    if isinstance(cfg, ScriptLoraConfig):
        if cfg.optimizer.lower() not in ("adamw", "prodigy"):
            out.append(
                f"Unsupported choice of optimizer: {cfg.optimizer}. Supported optimizers include [adamW, prodigy]. "
                f"Defaulting to adamW ({flag_and_field('optimizer')})."
            )
        if cfg.use_8bit_adam and cfg.uses_prodigy:
            out.append("use_8bit_adam is ignored when optimizer is not set to 'AdamW'; optimizer is prodigy.")
        if cfg.uses_prodigy and cfg.learning_rate <= 0.1:
            out.append(
                "Learning rate is too low. When using prodigy, it's generally better to set learning rate around 1.0"
            )
        if (
            isinstance(cfg, SdxlLoraConfig)
            and cfg.mixed_precision == "fp16"
            and cfg.pretrained_vae_model_name_or_path is None
        ):
            out.append(
                "fp16 with SDXL's stock VAE: the VAE stays in fp32 (it produces NaNs in fp16), which costs memory; "
                f"give an fp16-safe VAE with {flag_and_field('pretrained_vae_model_name_or_path')} "
                "(e.g. madebyollin/sdxl-vae-fp16-fix)."
            )
    return out


def warn_like_the_scripts(cfg: CommonConfig) -> None:
    for message in script_warnings(cfg):
        logger.warning(message)
