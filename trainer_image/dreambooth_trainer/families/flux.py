"""Flux.1: `train_dreambooth_lora_flux.py` (LoRA only).

A transformer (`FluxTransformer2DModel`) instead of a UNet, trained by flow matching: noisy latents are
`(1 - σ) x + σ ε` with σ from `FlowMatchEulerDiscreteScheduler` at timesteps drawn by the weighting scheme's
density, the target is `ε - x`, the loss weighted by the scheme. Latents are shifted and scaled by the VAE's
factors and packed into 2x2 patches with their image ids; the prompt is CLIP's pooled output plus T5's sequence;
a guidance-distilled transformer (FLUX.1-dev) is conditioned on `--guidance_scale`. LoRA on the transformer's
attention and feed-forward layers (`--lora_layers`), and with `--train_text_encoder` on CLIP's attention (T5
stays frozen, as in the script).

The timestep density and loss weights are diffusers' own (`compute_density_for_timestep_sampling`,
`compute_loss_weighting_for_sd3`), drawn from the step's generator; packing and ids are FluxPipeline's helpers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dreambooth_api.config import CommonConfig, ConfigError, FluxLoraConfig

from ..objective import sample_noise, scheduler_sigmas
from .base import ModelFamily, Parts, text_encoder_lr_groups
from .prompts import RowEncoder

logger = logging.getLogger(__name__)

# The script's default --lora_layers: the attention of both streams and both feed-forwards.
TRANSFORMER_LORA_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
PIPELINE_PARTS = (
    "model_index.json", "transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
)  # fmt: skip
# The script tokenizes CLIP prompts to 77 tokens whatever the tokenizer says.
CLIP_LENGTH = 77
_PLAN = "Flux trains with LoRA only, as spec.method: lora-flux (`dreambooth train-lora-flux`, a FluxPipeline folder)."


def flux_folder_message(path: Path, method: str) -> str | None:
    """What to say when another family's command is given a Flux pipeline folder (its transformer/)."""
    if (path / "transformer").is_dir() and not (path / "unet").exists():
        return f"{path} holds a Flux pipeline (transformer/, text_encoder_2/), and spec.method {method} trains " + (
            "Stable Diffusion. " + _PLAN
        )
    return None


class FluxTokenizers:
    """CLIP's and T5's tokenizers behind one: a prompt's ids are CLIP's 77 then T5's `max_sequence_length`, side by
    side in one row, so the shared dataset and collate carry both; `encode_batch` splits them again."""

    def __init__(self, clip: Any, t5: Any, max_sequence_length: int) -> None:
        self.clip, self.t5 = clip, t5
        self.max_sequence_length = max_sequence_length
        self.model_max_length = CLIP_LENGTH + max_sequence_length

    def __call__(self, prompt: str, **kwargs: Any) -> Any:
        from transformers import BatchEncoding

        def ids(tokenizer: Any, length: int) -> Any:
            return tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt")

        a, b = ids(self.clip, CLIP_LENGTH), ids(self.t5, self.max_sequence_length)
        return BatchEncoding(
            {
                "input_ids": torch.cat([a.input_ids, b.input_ids], dim=1),
                "attention_mask": torch.cat([a.attention_mask, b.attention_mask], dim=1),
            }
        )


def flow_timesteps(
    scheduler: Any, cfg: FluxLoraConfig, batch: int, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Timesteps as the script draws them: u from the scheme's density (diffusers' own function, on the step's
    generator instead of the global RNG), as indices into the scheduler's timesteps."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme=cfg.weighting_scheme, batch_size=batch, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
        mode_scale=cfg.mode_scale, device=gen.device, generator=gen,
    )  # fmt: skip
    indices = (u * scheduler.config.num_train_timesteps).long().cpu()
    return scheduler.timesteps[indices].to(device=device)


def flux_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    weighting: torch.Tensor,
    with_prior_preservation: bool,
    prior_loss_weight: float,
) -> torch.Tensor:
    """The script's weighted MSE per row, averaged; with prior preservation the class half's loss is added."""

    def mse(pred: torch.Tensor, tgt: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.mean((w.float() * (pred.float() - tgt.float()) ** 2).reshape(tgt.shape[0], -1), 1).mean()

    if not with_prior_preservation:
        return mse(model_pred, target, weighting)
    pred, pred_prior = torch.chunk(model_pred, 2, dim=0)
    tgt, tgt_prior = torch.chunk(target, 2, dim=0)
    w, w_prior = torch.chunk(weighting, 2, dim=0)
    return mse(pred, tgt, w) + prior_loss_weight * mse(pred_prior, tgt_prior, w_prior)


def _adapter(cfg: FluxLoraConfig, targets: list[str]) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, init_lora_weights="gaussian",
        target_modules=targets,
    )  # fmt: skip


def transformer_targets(cfg: FluxLoraConfig) -> list[str]:
    if cfg.lora_layers is not None:
        return [layer.strip() for layer in cfg.lora_layers.split(",") if layer.strip()]
    return list(TRANSFORMER_LORA_TARGETS)


class Flux(ModelFamily):
    name = "flux"
    methods: Mapping[str, type[CommonConfig]] = {"lora-flux": FluxLoraConfig}

    # -------------------------------------------------------------------- parts
    def check_model_dir(self, path: Path) -> None:
        if not path.is_dir():
            raise ConfigError(
                "pretrained_model_name_or_path", f"{path} does not exist; point it at a diffusers FluxPipeline folder."
            )
        if (path / "unet").exists():
            kind = "Stable Diffusion XL" if (path / "text_encoder_2").exists() else "Stable Diffusion"
            method = (
                "lora-sdxl (`dreambooth train-lora-sdxl`)" if "XL" in kind else "lora or full (`dreambooth train-lora`)"
            )
            raise ConfigError(
                "pretrained_model_name_or_path",
                f"{path} holds a {kind} pipeline (unet/), and spec.method lora-flux trains Flux (a transformer/); "
                f"train it with spec.method {method}, or give a FluxPipeline folder.",
            )
        missing = [p for p in PIPELINE_PARTS if not (path / p).exists()]
        if missing:
            raise ConfigError(
                "pretrained_model_name_or_path",
                f"{path} is not a diffusers Flux pipeline (missing {', '.join(missing)}); save one with "
                "FluxPipeline.save_pretrained(DIR) or make a test model with `dreambooth tiny-model DIR --family flux`.",
            )

    def load(self, cfg: CommonConfig, model_dir: Path, extra_dirs: Mapping[str, Path] | None = None) -> Parts:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        assert isinstance(cfg, FluxLoraConfig)
        kw = {"revision": cfg.revision}
        clip_tok = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer", **kw)
        t5_tok = T5TokenizerFast.from_pretrained(model_dir, subfolder="tokenizer_2", **kw)
        limit = t5_tok.model_max_length
        if cfg.max_sequence_length > limit:
            raise ConfigError(
                "max_sequence_length",
                f"{cfg.max_sequence_length} is more than the model's T5 takes ({limit}, its tokenizer_2's "
                f"model_max_length); use {limit} or less.",
            )
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
        te1 = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", variant=cfg.variant, **kw)
        te2 = T5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder_2", variant=cfg.variant, **kw)
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", variant=cfg.variant, **kw)
        transformer = FluxTransformer2DModel.from_pretrained(
            model_dir, subfolder="transformer", variant=cfg.variant, **kw
        )
        guided = bool(transformer.config.guidance_embeds)
        default_guidance = FluxLoraConfig.model_fields["guidance_scale"].default
        if not guided and cfg.guidance_scale != default_guidance and int(os.environ.get("RANK", "0")) == 0:
            # As the script, the flag is ignored without a guidance embedding (schnell); said only when it was set.
            logger.warning(
                "--guidance_scale (spec.training.guidanceScale) %s is ignored: %s's transformer has no guidance "
                "embedding (FLUX.1-schnell's shape; FLUX.1-dev has one)",
                cfg.guidance_scale, model_dir,
            )  # fmt: skip
        extra = {
            "text_encoder_2": te2,
            "tokenizer_2": t5_tok,
            "guidance": cfg.guidance_scale if guided else None,
            "vae_scale_factor": 2 ** (len(vae.config.block_out_channels) - 1),
            "cfg": cfg,
        }
        tokenizer = FluxTokenizers(clip_tok, t5_tok, cfg.max_sequence_length)
        return Parts(tokenizer, te1, vae, transformer, noise_scheduler, extra=extra)

    def add_lora(self, parts: Parts, cfg: CommonConfig) -> None:
        assert isinstance(cfg, FluxLoraConfig)
        parts.denoiser.add_adapter(_adapter(cfg, transformer_targets(cfg)))
        if cfg.train_text_encoder and parts.text_encoder is not None:
            parts.text_encoder.add_adapter(_adapter(cfg, list(TEXT_LORA_TARGETS)))

    def set_trainable(self, parts: Parts, cfg: CommonConfig) -> list[torch.nn.Module]:
        assert parts.vae is not None
        parts.vae.requires_grad_(False)
        for module in (parts.denoiser, *self.text_encoders(parts).values()):
            for name, p in module.named_parameters():
                p.requires_grad_("lora_" in name)
        # Only CLIP trains with --train_text_encoder; T5 stays frozen (the script's text_encoder_one).
        return [parts.denoiser] + ([parts.text_encoder] if cfg.train_text_encoder and parts.text_encoder else [])

    def trained_names(self, count: int) -> list[str]:
        return ["transformer", "text_encoder"][:count]

    def enable_memory_savers(self, parts: Parts, cfg: CommonConfig, gradient_checkpointing: bool) -> None:
        if gradient_checkpointing:
            parts.denoiser.enable_gradient_checkpointing()
            if cfg.train_text_encoder and parts.text_encoder is not None:
                parts.text_encoder.gradient_checkpointing_enable()

    def dataset_options(self, cfg: CommonConfig) -> dict[str, Any]:
        assert isinstance(cfg, FluxLoraConfig)
        return {"random_flip": cfg.random_flip, "repeats": cfg.repeats}

    def optimizer_params(self, cfg: CommonConfig, trained: list[torch.nn.Module], lr: float) -> list[Any]:
        assert isinstance(cfg, FluxLoraConfig)
        return text_encoder_lr_groups(cfg, trained, lr)

    # -------------------------------------------------------------------- one step
    def encode_prompt(
        self, text_encoder: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        return text_encoder(input_ids, output_hidden_states=False).pooler_output

    def encode_ids(
        self, clip: torch.nn.Module, t5: torch.nn.Module, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The script's encode_prompt: T5's sequence (prompt_embeds), CLIP's pooled output and the text ids."""
        clip_module = getattr(clip, "module", clip)
        pooled = clip(ids[:, :CLIP_LENGTH], output_hidden_states=False).pooler_output.to(dtype=clip_module.dtype)
        with torch.no_grad():  # T5 is frozen: no activations kept for it
            states = t5(ids[:, CLIP_LENGTH:])[0].to(dtype=t5.dtype)
        text_ids = torch.zeros(states.shape[1], 3, device=states.device, dtype=clip_module.dtype)
        return states, pooled, text_ids

    def encode_batch(
        self,
        cfg: CommonConfig,
        parts: Parts,
        text_encoders: list[torch.nn.Module],
        batch: Mapping[str, Any],
        device: torch.device,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if cfg.train_text_encoder:
            ids = batch["input_ids"].to(device)
            states, pooled, text_ids = self.encode_ids(text_encoders[0], parts.extra["text_encoder_2"], ids)
            return states, {"pooled": pooled, "txt_ids": text_ids}
        # Frozen encoders give one answer per prompt: encoded once each, and freed once a run's fixed prompts are in.
        states, pooled = self.frozen_prompt_outputs(parts, text_encoders, batch["input_ids"], device)
        text_ids = torch.zeros(states.shape[1], 3, device=states.device, dtype=pooled.dtype)
        return states, {"pooled": pooled, "txt_ids": text_ids}

    def row_encoder(
        self, parts: Parts, text_encoders: list[torch.nn.Module], device: torch.device
    ) -> RowEncoder | None:
        t5 = parts.extra.get("text_encoder_2")
        if not text_encoders or t5 is None:
            return None
        clip = text_encoders[0]
        return lambda ids: self.encode_ids(clip, t5, ids.to(device))[:2]

    def extra_conditioning(self, batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        return {}  # Flux's conditioning comes with the prompt (encode_batch) and the latents' shape (denoise)

    def sample_noise(self, latents: torch.Tensor, gen: torch.Generator, cfg: CommonConfig) -> torch.Tensor:
        return sample_noise(latents, gen, False)

    def sample_timesteps(self, parts: Parts, batch: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        return flow_timesteps(parts.noise_scheduler, parts.extra["cfg"], batch, gen, device)

    def add_noise(
        self, parts: Parts, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        sigmas = scheduler_sigmas(parts.noise_scheduler, timesteps, latents.ndim, latents.dtype)
        return (1.0 - sigmas) * latents + sigmas * noise

    def denoise(
        self,
        parts: Parts,
        denoiser: torch.nn.Module,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        states: torch.Tensor,
        extra: dict[str, Any],
    ) -> torch.Tensor:
        from diffusers import FluxPipeline

        rows, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, rows, channels, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(rows, height // 2, width // 2, noisy.device, noisy.dtype)
        scale = parts.extra["guidance"]
        guidance = None if scale is None else torch.tensor([scale], device=noisy.device).expand(rows)
        pred = denoiser(
            hidden_states=packed,
            # The transformer multiplies by 1000 again (the script's "divide it by 1000 for now").
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=extra["pooled"],
            encoder_hidden_states=states,
            txt_ids=extra["txt_ids"],
            img_ids=img_ids,
            return_dict=False,
        )[0]
        factor = parts.extra["vae_scale_factor"]
        return FluxPipeline._unpack_latents(pred, height=height * factor, width=width * factor, vae_scale_factor=factor)

    def loss(
        self,
        parts: Parts,
        cfg: CommonConfig,
        model_pred: torch.Tensor,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        assert isinstance(cfg, FluxLoraConfig)
        sigmas = scheduler_sigmas(parts.noise_scheduler, timesteps, latents.ndim, latents.dtype)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=cfg.weighting_scheme, sigmas=sigmas)
        # Flow matching: the velocity from data to noise.
        target = noise - latents
        return flux_loss(model_pred, target, weighting, cfg.with_prior_preservation, cfg.prior_loss_weight)

    # -------------------------------------------------------------------- outputs
    def lora_layers(self, parts: Parts, train_text_encoder: bool) -> dict[str, torch.Tensor]:
        """In the script's names: peft's state dicts as they are (Flux's LoRA loader reads them), by part."""
        from diffusers import FluxPipeline
        from peft.utils import get_peft_model_state_dict

        out = FluxPipeline.pack_weights(get_peft_model_state_dict(parts.denoiser), "transformer")
        if train_text_encoder and parts.text_encoder is not None:
            out.update(FluxPipeline.pack_weights(get_peft_model_state_dict(parts.text_encoder), "text_encoder"))
        return out

    def save_lora(self, folder: Path, layers: dict[str, torch.Tensor], cfg: CommonConfig | None = None) -> list[str]:
        from diffusers import FluxPipeline

        def part(prefix: str) -> dict[str, torch.Tensor] | None:
            found = {k[len(prefix) + 1 :]: v for k, v in layers.items() if k.startswith(prefix + ".")}
            return found or None

        transformer, text = part("transformer"), part("text_encoder")
        metadata: dict[str, Any] = {}
        if isinstance(cfg, FluxLoraConfig):
            # The adapters' config rides along (the script's _collate_lora_metadata): load_lora_weights then scales
            # by lora_alpha / rank as trained, not by a guess from the shapes.
            metadata["transformer_lora_adapter_metadata"] = _adapter(cfg, transformer_targets(cfg)).to_dict()
            if text is not None:
                metadata["text_encoder_lora_adapter_metadata"] = _adapter(cfg, list(TEXT_LORA_TARGETS)).to_dict()
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision or "no")
            if transformer is not None and dtype is not None and not cfg.upcast_before_saving:
                # As the script: the transformer's LoRA saved in the training precision unless upcast_before_saving.
                transformer = {k: v.to(dtype) for k, v in transformer.items()}
        FluxPipeline.save_lora_weights(
            folder, transformer_lora_layers=transformer, text_encoder_lora_layers=text, **metadata
        )
        return ["pytorch_lora_weights.safetensors"]

    def full_pipeline(self, model_dir: Path, cfg: CommonConfig, trained: dict[str, torch.nn.Module]) -> Any:
        raise ConfigError("method", _PLAN)

    def validation_pipeline(self, model_dir: Path, cfg: CommonConfig, modules: dict[str, Any]) -> Any:
        """FluxPipeline around the trained transformer (and CLIP); its own FlowMatchEuler scheduler (the loop's
        stays untouched, as the script's noise_scheduler_copy)."""
        from diffusers import FluxPipeline

        given = {
            "transformer": modules.get("unet"),
            "text_encoder": modules.get("text_encoder"),
            "text_encoder_2": modules.get("text_encoder_2"),
            "vae": modules.get("vae"),
        }
        pipe = FluxPipeline.from_pretrained(
            model_dir, **{k: v for k, v in given.items() if v is not None}, revision=cfg.revision, variant=cfg.variant
        )
        # FluxPipeline's default size is 128 latent pixels (1024 px for FLUX.1's VAE, whose sample_size is 1024);
        # from the VAE's sample_size it is the same for FLUX.1 and the tiny model's own for it.
        sample = getattr(pipe.vae.config, "sample_size", None)
        if isinstance(sample, int) and sample > 0:
            pipe.default_sample_size = max(1, sample // pipe.vae_scale_factor)
        return pipe

    def write_tiny_model(self, out_dir: Path) -> Path:
        from ..tiny import make_tiny_flux_model

        return make_tiny_flux_model(out_dir)
