"""Stable Diffusion XL: `train_dreambooth_lora_sdxl.py` (LoRA only).

Two CLIP text encoders (the second with a projection) whose penultimate hidden states are concatenated, the
second's pooled projection and the six `add_time_ids` (original size, crop top-left, target size) as the UNet's
added conditions; DDPM noise with epsilon/v targets and the script's Min-SNR weights, or EDM-style training on
Euler sigmas (`--do_edm_style_training`) or on a model's own EDM scheduler (Playground v2.5's EDMEulerScheduler,
whose VAE standardises latents by a per-channel mean/std: latents.py); LoRA (or DoRA) on the UNet's attention and, with
`--train_text_encoder`, on both text encoders' attention.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dreambooth_api.config import CommonConfig, ConfigError, SdxlLoraConfig

from ..objective import sample_noise, sample_timesteps, scheduler_sigmas, snr
from .base import ModelFamily, Parts, text_encoder_lr_groups
from .flux import flux_folder_message
from .prompts import RowEncoder

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PIPELINE_PARTS = (
    "model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
)  # fmt: skip
TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")
logger = logging.getLogger(__name__)


class TokenizerPair:
    """SDXL's two tokenizers behind one: a prompt's ids are a (2, L) pair per row, so the shared dataset and
    collate carry both without knowing there are two (the family's `encode_batch` splits them again)."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second
        self.model_max_length = first.model_max_length

    def __call__(self, prompt: str, **kwargs: Any) -> Any:
        from transformers import BatchEncoding

        a, b = self.first(prompt, **kwargs), self.second(prompt, **kwargs)
        return BatchEncoding(
            {
                "input_ids": torch.stack([a.input_ids, b.input_ids], dim=1),
                "attention_mask": torch.stack([a.attention_mask, b.attention_mask], dim=1),
            }
        )


def add_time_ids(
    original_sizes: list[tuple[int, int]], crop_top_lefts: list[tuple[int, int]], resolution: int
) -> torch.Tensor:
    """The script's compute_time_ids per row: original (h, w) + crop (top, left) + target (resolution, resolution)."""
    rows = [
        list(tuple(o) + tuple(c) + (resolution, resolution))
        for o, c in zip(original_sizes, crop_top_lefts, strict=True)
    ]
    return torch.tensor(rows)


def edm_precondition_inputs(noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """c_in of EDM on a variance-exploding Euler schedule: the input scaled to unit variance."""
    return noisy / ((sigmas**2 + 1) ** 0.5)


def edm_precondition_outputs(
    model_pred: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The prediction turned into a denoised-latent estimate, as the script does for a non-EDM scheduler."""
    if prediction_type == "epsilon":
        return model_pred * (-sigmas) + noisy
    if prediction_type == "v_prediction":
        return model_pred * (-sigmas / (sigmas**2 + 1) ** 0.5) + (noisy / (sigmas**2 + 1))
    raise ValueError(f"Unknown prediction type {prediction_type!r}")


def script_min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """train_dreambooth_lora_sdxl.py's Min-SNR weights: min(SNR, gamma)/SNR, plus 1 for v-prediction (the SD LoRA
    script divides by SNR+1 instead; each family keeps its own script's formula)."""
    base = torch.stack([snr_values, gamma * torch.ones_like(snr_values)], dim=1).min(dim=1)[0] / snr_values
    return base + 1 if prediction_type == "v_prediction" else base


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    # The script keeps SDXL's stock VAE in fp32 ("to avoid NaN losses"); a VAE given apart follows mixed precision.
    upcast_vae = True
    methods: Mapping[str, type[CommonConfig]] = {"lora-sdxl": SdxlLoraConfig}

    # -------------------------------------------------------------------- parts
    def check_model_dir(self, path: Path) -> None:
        if not path.is_dir():
            raise ConfigError(
                "pretrained_model_name_or_path", f"{path} does not exist; point it at a diffusers SDXL pipeline folder."
            )
        if flux := flux_folder_message(path, "lora-sdxl"):
            raise ConfigError("pretrained_model_name_or_path", flux.replace("Stable Diffusion. ", "SDXL. "))
        missing = [p for p in PIPELINE_PARTS if not (path / p).exists()]
        if missing:
            holds = (
                "a Stable Diffusion 1.x/2.x pipeline (one text encoder): train it with spec.method lora or full "
                "(`dreambooth train-lora`)"
                if {"text_encoder_2", "tokenizer_2"} >= set(missing)
                else f"no SDXL pipeline (missing {', '.join(missing)})"
            )
            raise ConfigError(
                "pretrained_model_name_or_path",
                f"{path} holds {holds}; train-lora-sdxl needs a StableDiffusionXLPipeline folder "
                "(`dreambooth tiny-model DIR --family sdxl` makes a test one).",
            )

    def load(self, cfg: CommonConfig, model_dir: Path, extra_dirs: Mapping[str, Path] | None = None) -> Parts:
        from diffusers import (
            AutoencoderKL,
            DDPMScheduler,
            EDMEulerScheduler,
            EulerDiscreteScheduler,
            UNet2DConditionModel,
        )
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        assert isinstance(cfg, SdxlLoraConfig)
        kw = {"revision": cfg.revision}
        tokenizer = TokenizerPair(
            AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer", use_fast=False, **kw),
            AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2", use_fast=False, **kw),
        )
        edm_model = self._edm_scheduler(model_dir)
        if edm_model and cfg.snr_gamma is not None:
            # The script would crash in compute_snr (an EDM scheduler has no alphas_cumprod): say it up front.
            raise ConfigError(
                "snr_gamma",
                f"{model_dir} has an EDM scheduler (EDMEulerScheduler), so it trains EDM-style, and Min-SNR "
                "weighting is not supported with EDM-style training; remove snr_gamma.",
            )
        # A model shipped with an EDM scheduler (Playground v2.5) trains EDM-style whatever the flag, as the script.
        scheduler_class = (
            EDMEulerScheduler if edm_model else EulerDiscreteScheduler if cfg.do_edm_style_training else DDPMScheduler
        )
        noise_scheduler = scheduler_class.from_pretrained(model_dir, subfolder="scheduler")
        if edm_model or cfg.do_edm_style_training:
            logger.info("EDM-style training on the %s", scheduler_class.__name__)
        te1 = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", variant=cfg.variant, **kw)
        te2 = CLIPTextModelWithProjection.from_pretrained(
            model_dir, subfolder="text_encoder_2", variant=cfg.variant, **kw
        )
        vae_dir = (extra_dirs or {}).get("vae")
        vae = (
            AutoencoderKL.from_pretrained(vae_dir, **kw)
            if vae_dir is not None
            else AutoencoderKL.from_pretrained(model_dir, subfolder="vae", variant=cfg.variant, **kw)
        )
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", variant=cfg.variant, **kw)
        if unet.config.get("addition_embed_type") != "text_time":
            raise ConfigError(
                "pretrained_model_name_or_path",
                f"{model_dir}'s UNet is not SDXL's (addition_embed_type {unet.config.get('addition_embed_type')!r}, "
                "not 'text_time').",
            )
        return Parts(
            tokenizer,
            te1,
            vae,
            unet,
            noise_scheduler,
            extra={"text_encoder_2": te2, "edm": cfg.do_edm_style_training or edm_model, "edm_scheduler": edm_model},
        )

    @staticmethod
    def _edm_scheduler(model_dir: Path) -> bool:
        config = model_dir / "scheduler" / "scheduler_config.json"
        return config.is_file() and "EDM" in json.loads(config.read_text()).get("_class_name", "")

    def add_lora(self, parts: Parts, cfg: CommonConfig) -> None:
        from peft import LoraConfig as PeftLoraConfig

        assert isinstance(cfg, SdxlLoraConfig)

        def adapter(targets: list[str]) -> PeftLoraConfig:
            extra = {"use_dora": True} if cfg.use_dora else {}
            return PeftLoraConfig(
                r=cfg.rank, lora_alpha=cfg.rank, lora_dropout=cfg.lora_dropout, init_lora_weights="gaussian",
                target_modules=targets, **extra,
            )  # fmt: skip

        parts.denoiser.add_adapter(adapter(UNET_LORA_TARGETS))
        if cfg.train_text_encoder:
            for encoder in self.text_encoders(parts).values():
                encoder.add_adapter(adapter(TEXT_LORA_TARGETS))

    def set_trainable(self, parts: Parts, cfg: CommonConfig) -> list[torch.nn.Module]:
        assert parts.vae is not None
        parts.vae.requires_grad_(False)
        encoders = list(self.text_encoders(parts).values())
        for module in (parts.denoiser, *encoders):
            for name, p in module.named_parameters():
                p.requires_grad_("lora_" in name)
        return [parts.denoiser] + (encoders if cfg.train_text_encoder else [])

    def trained_names(self, count: int) -> list[str]:
        return ["unet", *TEXT_ENCODER_NAMES][:count]

    def enable_memory_savers(self, parts: Parts, cfg: CommonConfig, gradient_checkpointing: bool) -> None:
        if gradient_checkpointing:
            parts.denoiser.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                for encoder in self.text_encoders(parts).values():
                    encoder.gradient_checkpointing_enable()
        if cfg.enable_xformers_memory_efficient_attention:
            parts.denoiser.enable_xformers_memory_efficient_attention()

    def dataset_options(self, cfg: CommonConfig) -> dict[str, Any]:
        assert isinstance(cfg, SdxlLoraConfig)
        return {"random_flip": cfg.random_flip, "repeats": cfg.repeats, "with_geometry": True}

    def optimizer_params(self, cfg: CommonConfig, trained: list[torch.nn.Module], lr: float) -> list[Any]:
        assert isinstance(cfg, SdxlLoraConfig)
        return text_encoder_lr_groups(cfg, trained, lr)

    # -------------------------------------------------------------------- one step
    def encode_prompt(
        self, text_encoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        return text_encoder(input_ids, output_hidden_states=True, return_dict=False)[-1][-2]

    def encode_pair(
        self, text_encoders: list[torch.nn.Module], input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The script's encode_prompt: both encoders' penultimate hidden states side by side, and the pooled
        projection of the second."""
        states, pooled = [], None
        for i, encoder in enumerate(text_encoders):
            out = encoder(input_ids[:, i], output_hidden_states=True, return_dict=False)
            pooled = out[0]
            hidden = out[-1][-2]
            states.append(hidden.view(hidden.shape[0], hidden.shape[1], -1))
        assert pooled is not None
        return torch.concat(states, dim=-1), pooled.view(pooled.shape[0], -1)

    def encode_batch(
        self,
        cfg: CommonConfig,
        parts: Parts,
        text_encoders: list[torch.nn.Module],
        batch: Mapping[str, Any],
        device: torch.device,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        time_ids = add_time_ids(batch["original_sizes"], batch["crop_top_lefts"], cfg.resolution).to(device)
        if cfg.train_text_encoder:
            states, pooled = self.encode_pair(text_encoders, batch["input_ids"].to(device))
            return states, {"text_embeds": pooled, "time_ids": time_ids}
        # Frozen encoders give one answer per prompt: encoded once each, and freed once a run's fixed prompts are in.
        states, pooled = self.frozen_prompt_outputs(parts, text_encoders, batch["input_ids"], device)
        return states, {"text_embeds": pooled, "time_ids": time_ids}

    def row_encoder(
        self, parts: Parts, text_encoders: list[torch.nn.Module], device: torch.device
    ) -> RowEncoder | None:
        if len(text_encoders) < 2:
            return None
        encoders = list(text_encoders)
        return lambda ids: self.encode_pair(encoders, ids.to(device))

    def extra_conditioning(self, batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        return {}  # SDXL's added conditions come with the prompt (encode_batch): pooled text and time ids

    def sample_noise(self, latents: torch.Tensor, gen: torch.Generator, cfg: CommonConfig) -> torch.Tensor:
        return sample_noise(latents, gen, False)

    def sample_timesteps(self, parts: Parts, batch: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        scheduler = parts.noise_scheduler
        if parts.extra.get("edm"):
            # EDM conditions on noise levels: sample indices into the scheduler's timesteps (continuous values).
            indices = torch.randint(
                0, scheduler.config.num_train_timesteps, (batch,), generator=gen, device=gen.device
            ).cpu()
            return scheduler.timesteps[indices].to(device=device)
        return sample_timesteps(batch, scheduler.config.num_train_timesteps, gen, device)

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
        rows = noisy.shape[0]
        time_ids = extra["time_ids"].to(noisy.device, dtype=noisy.dtype)
        text_embeds = extra["text_embeds"]
        if text_embeds.shape[0] != rows:  # one prompt for the batch (the script's repeat)
            text_embeds = text_embeds.repeat(rows // text_embeds.shape[0], 1)
            states = states.repeat(rows // states.shape[0], 1, 1)
        inputs = noisy
        sigmas = None
        edm_scheduler = parts.extra.get("edm_scheduler")
        if parts.extra.get("edm"):
            sigmas = scheduler_sigmas(parts.noise_scheduler, timesteps, noisy.ndim, noisy.dtype)
            inputs = (
                parts.noise_scheduler.precondition_inputs(noisy, sigmas)
                if edm_scheduler
                else edm_precondition_inputs(noisy, sigmas)
            )
        pred = denoiser(
            inputs, timesteps, states, added_cond_kwargs={"time_ids": time_ids, "text_embeds": text_embeds},
            return_dict=False,
        )[0]  # fmt: skip
        if sigmas is not None and edm_scheduler:
            pred = parts.noise_scheduler.precondition_outputs(noisy, pred, sigmas)
        elif sigmas is not None:
            pred = edm_precondition_outputs(pred, noisy, sigmas, parts.noise_scheduler.config.prediction_type)
        return pred

    def loss(
        self,
        parts: Parts,
        cfg: CommonConfig,
        model_pred: torch.Tensor,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        scheduler = parts.noise_scheduler
        kind = scheduler.config.prediction_type
        edm = bool(parts.extra.get("edm"))
        weighting = None
        if edm and not parts.extra.get("edm_scheduler"):
            # The script weights by sigma^-2 only on Euler's schedule: on an EDM scheduler it "tends to result in
            # numerical problems" (diffusers PR 7126).
            weighting = (scheduler_sigmas(scheduler, timesteps, model_pred.ndim, model_pred.dtype) ** -2.0).float()
        if kind == "epsilon":
            target = latents if edm else noise
        elif kind == "v_prediction":
            target = latents if edm else scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise ValueError(f"Unknown prediction type {kind!r}")

        def mse(pred: torch.Tensor, tgt: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
            if w is None:
                return F.mse_loss(pred.float(), tgt.float(), reduction="mean")
            return torch.mean((w * (pred.float() - tgt.float()) ** 2).reshape(tgt.shape[0], -1), 1).mean()

        prior_loss = None
        if cfg.with_prior_preservation:
            model_pred, pred_prior = torch.chunk(model_pred, 2, dim=0)
            target, target_prior = torch.chunk(target, 2, dim=0)
            w_prior = None
            if weighting is not None:
                weighting, w_prior = torch.chunk(weighting, 2, dim=0)
            timesteps = timesteps[: model_pred.shape[0]]
            prior_loss = mse(pred_prior, target_prior, w_prior)
        if cfg.snr_gamma is None:
            loss = mse(model_pred, target, weighting)
        else:
            weights = script_min_snr_weights(snr(scheduler, timesteps), cfg.snr_gamma, kind)
            per = F.mse_loss(model_pred.float(), target.float(), reduction="none")
            loss = (per.mean(dim=list(range(1, per.ndim))) * weights).mean()
        return loss if prior_loss is None else loss + cfg.prior_loss_weight * prior_loss

    # -------------------------------------------------------------------- outputs
    def lora_layers(self, parts: Parts, train_text_encoder: bool) -> dict[str, torch.Tensor]:
        from diffusers import StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        out = StableDiffusionXLPipeline.pack_weights(
            convert_state_dict_to_diffusers(get_peft_model_state_dict(parts.denoiser)), "unet"
        )
        if train_text_encoder:
            for name, encoder in self.text_encoders(parts).items():
                out.update(
                    StableDiffusionXLPipeline.pack_weights(
                        convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder)), name
                    )
                )
        return out

    def save_lora(self, folder: Path, layers: dict[str, torch.Tensor], cfg: CommonConfig | None = None) -> list[str]:
        from diffusers import StableDiffusionXLPipeline

        def part(prefix: str) -> dict[str, torch.Tensor] | None:
            found = {k[len(prefix) + 1 :]: v for k, v in layers.items() if k.startswith(prefix + ".")}
            return found or None

        StableDiffusionXLPipeline.save_lora_weights(
            folder, unet_lora_layers=part("unet"), text_encoder_lora_layers=part("text_encoder"),
            text_encoder_2_lora_layers=part("text_encoder_2"),
        )  # fmt: skip
        written = ["pytorch_lora_weights.safetensors"]
        if isinstance(cfg, SdxlLoraConfig) and cfg.output_kohya_format:
            from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
            from safetensors.torch import load_file, save_file

            # As the script: the diffusers file, read back, through peft's names into kohya's.
            saved = load_file(folder / "pytorch_lora_weights.safetensors")
            save_file(
                convert_state_dict_to_kohya(convert_all_state_dict_to_peft(saved)),
                folder / "pytorch_lora_weights_kohya.safetensors",
            )
            written.append("pytorch_lora_weights_kohya.safetensors")
        return written

    def full_pipeline(self, model_dir: Path, cfg: CommonConfig, trained: dict[str, torch.nn.Module]) -> Any:
        raise ConfigError("method", "SDXL trains with LoRA only here (spec.method: lora-sdxl).")

    def validation_pipeline(self, model_dir: Path, cfg: CommonConfig, modules: dict[str, Any]) -> Any:
        from diffusers import StableDiffusionXLPipeline

        given = {k: v for k, v in modules.items() if k != "tokenizer" and v is not None}
        return StableDiffusionXLPipeline.from_pretrained(model_dir, **given, revision=cfg.revision, variant=cfg.variant)

    def write_tiny_model(self, out_dir: Path) -> Path:
        from ..tiny import make_tiny_sdxl_model

        return make_tiny_sdxl_model(out_dir)
