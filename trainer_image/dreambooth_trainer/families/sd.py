"""Stable Diffusion 1.x/2.x: `train_dreambooth.py` (full) and `train_dreambooth_lora.py` (LoRA).

CLIP text encoder + UNet2DConditionModel + VAE, DDPM noise, epsilon or v-prediction targets, Min-SNR weighting,
prior preservation; LoRA on the UNet's attention (and the text encoder's when it trains).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dreambooth_api.config import CommonConfig, ConfigError, FullConfig, LoraConfig

from ..objective import dreambooth_loss, sample_noise, sample_timesteps, target_for
from .base import ModelFamily, Parts
from .flux import flux_folder_message

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PIPELINE_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


class StableDiffusion(ModelFamily):
    name = "sd"
    methods: Mapping[str, type[CommonConfig]] = {"full": FullConfig, "lora": LoraConfig}

    # -------------------------------------------------------------------- parts
    def check_model_dir(self, path: Path) -> None:
        """A model folder must be a diffusers pipeline; say so before anything loads."""
        if not path.is_dir():
            raise ConfigError(
                "pretrained_model_name_or_path", f"{path} does not exist; point it at a diffusers pipeline folder."
            )
        if flux := flux_folder_message(path, "full or lora"):
            raise ConfigError("pretrained_model_name_or_path", flux)
        if (path / "text_encoder_2").exists() or (path / "tokenizer_2").exists():
            # An SDXL folder would load here and fail at the first step on the UNet's missing added conditions.
            raise ConfigError(
                "pretrained_model_name_or_path",
                f"{path} holds a Stable Diffusion XL pipeline (text_encoder_2, tokenizer_2), and spec.method full or "
                "lora trains SD 1.x/2.x: SDXL trains with LoRA only, as spec.method: lora-sdxl "
                "(`dreambooth train-lora-sdxl`).",
            )
        missing = [p for p in PIPELINE_PARTS if not (path / p).exists()]
        if missing:
            raise ConfigError(
                "pretrained_model_name_or_path",
                f"{path} is not a diffusers Stable Diffusion pipeline (missing {', '.join(missing)}); save one with "
                "pipe.save_pretrained(DIR) or make a test model with `dreambooth tiny-model DIR`.",
            )

    def load(self, cfg: CommonConfig, model_dir: Path, extra_dirs: Mapping[str, Path] | None = None) -> Parts:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        kw = {"revision": cfg.revision}
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.tokenizer_name or model_dir, subfolder=None if cfg.tokenizer_name else "tokenizer", use_fast=False,
            **kw,
        )  # fmt: skip
        noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", variant=cfg.variant, **kw)
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", variant=cfg.variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", variant=cfg.variant, **kw)
        return Parts(tokenizer, text_encoder, vae, unet, noise_scheduler)

    def add_lora(self, parts: Parts, cfg: CommonConfig) -> None:
        """LoRA on the UNet's attention (and the text encoder's when it trains), as train_dreambooth_lora.py does."""
        from peft import LoraConfig as PeftLoraConfig

        assert isinstance(cfg, LoraConfig), "LoRA adapters need the LoRA method's config"
        rank = cfg.rank
        # The script gives both adapters the same dropout; at 0.0 peft uses an identity (no RNG draw).
        dropout = cfg.lora_dropout

        def adapter(targets: list[str]) -> PeftLoraConfig:
            return PeftLoraConfig(
                r=rank, lora_alpha=rank, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets
            )

        parts.denoiser.add_adapter(adapter(UNET_LORA_TARGETS))
        if cfg.train_text_encoder and parts.text_encoder is not None:
            parts.text_encoder.add_adapter(adapter(TEXT_LORA_TARGETS))

    def set_trainable(self, parts: Parts, cfg: CommonConfig) -> list[torch.nn.Module]:
        assert parts.vae is not None and parts.text_encoder is not None
        parts.vae.requires_grad_(False)
        if cfg.method == "lora":
            # add_adapter put LoRA layers in; only they train (a text encoder without adapters is frozen whole).
            for module in (parts.denoiser, parts.text_encoder):
                for name, p in module.named_parameters():
                    p.requires_grad_("lora_" in name)
        else:
            parts.denoiser.requires_grad_(True)
            parts.text_encoder.requires_grad_(bool(cfg.train_text_encoder))
        return [parts.denoiser] + ([parts.text_encoder] if cfg.train_text_encoder else [])

    def trained_names(self, count: int) -> list[str]:
        return ["unet", "text_encoder"][:count]

    def enable_memory_savers(self, parts: Parts, cfg: CommonConfig, gradient_checkpointing: bool) -> None:
        if gradient_checkpointing:
            parts.denoiser.enable_gradient_checkpointing()
            if cfg.train_text_encoder and parts.text_encoder is not None:
                parts.text_encoder.gradient_checkpointing_enable()
        if cfg.enable_xformers_memory_efficient_attention:
            parts.denoiser.enable_xformers_memory_efficient_attention()

    # -------------------------------------------------------------------- one step
    def encode_prompt(
        self, text_encoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        return text_encoder(input_ids, attention_mask=attention_mask)[0]

    def extra_conditioning(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
        return {}

    def sample_noise(self, latents: torch.Tensor, gen: torch.Generator, cfg: CommonConfig) -> torch.Tensor:
        return sample_noise(latents, gen, isinstance(cfg, FullConfig) and cfg.offset_noise)

    def sample_timesteps(self, parts: Parts, batch: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        return sample_timesteps(batch, parts.noise_scheduler.config.num_train_timesteps, gen, device)

    def add_noise(
        self, parts: Parts, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        return parts.noise_scheduler.add_noise(latents, noise, timesteps)

    def denoise(
        self,
        parts: Parts,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        states: torch.Tensor,
        extra: dict[str, Any],
    ) -> torch.Tensor:
        return denoiser(noisy, timesteps, states, return_dict=False, **extra)[0]

    def loss(
        self,
        parts: Parts,
        cfg: CommonConfig,
        model_pred: torch.Tensor,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        target = target_for(parts.noise_scheduler, latents, noise, timesteps)
        return dreambooth_loss(
            model_pred,
            target,
            timesteps,
            parts.noise_scheduler,
            with_prior_preservation=cfg.with_prior_preservation,
            prior_loss_weight=cfg.prior_loss_weight,
            snr_gamma=cfg.snr_gamma,
        ).loss

    # -------------------------------------------------------------------- outputs
    def lora_layers(self, parts: Parts, train_text_encoder: bool) -> dict[str, torch.Tensor]:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        out = StableDiffusionPipeline.pack_weights(
            convert_state_dict_to_diffusers(get_peft_model_state_dict(parts.denoiser)), "unet"
        )
        if train_text_encoder and parts.text_encoder is not None:
            out.update(
                StableDiffusionPipeline.pack_weights(
                    convert_state_dict_to_diffusers(get_peft_model_state_dict(parts.text_encoder)), "text_encoder"
                )
            )
        return out

    def save_lora(self, folder: Path, layers: dict[str, torch.Tensor], cfg: CommonConfig | None = None) -> list[str]:
        from diffusers import StableDiffusionPipeline

        unet_layers = {k[len("unet.") :]: v for k, v in layers.items() if k.startswith("unet.")}
        te_layers = {k[len("text_encoder.") :]: v for k, v in layers.items() if k.startswith("text_encoder.")}
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=unet_layers, text_encoder_lora_layers=te_layers or None
        )
        return ["pytorch_lora_weights.safetensors"]

    def full_pipeline(self, model_dir: Path, cfg: CommonConfig, trained: dict[str, torch.nn.Module]) -> Any:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(model_dir, revision=cfg.revision, variant=cfg.variant, **trained)
        if isinstance(cfg, FullConfig) and cfg.skip_save_text_encoder:
            pipe.text_encoder = None
        return pipe

    def validation_pipeline(self, model_dir: Path, cfg: CommonConfig, modules: dict[str, Any]) -> Any:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(
            model_dir,
            **modules,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            revision=cfg.revision,
            variant=cfg.variant,
        )

    def write_tiny_model(self, out_dir: Path) -> Path:
        from ..tiny import make_tiny_model

        return make_tiny_model(out_dir)
