"""The DreamBooth objective: noise, timesteps, targets, Min-SNR weighting and the prior-preservation loss.

Randomness comes only from the generator passed in, never from global RNG, so a resumed run draws exactly
the noise and timesteps an uninterrupted run would have drawn at the same step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def step_generator(
    seed: int, epoch: int, micro_step: int, rank: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator that is a pure function of where training is, so resume needs no RNG state to be exact."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{micro_step}:{rank}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def seed_global_rng(seed: int, epoch: int, micro_step: int, rank: int) -> None:
    """Seed torch's global RNG (CPU and every GPU) from where training is.

    For what must draw from the global RNG (LoRA dropout inside peft's layers): a resumed run then draws what an
    uninterrupted one drew at the same step without checkpointing RNG state. Its own stream, so the step
    generator's draws are unchanged.
    """
    digest = hashlib.sha256(f"global:{seed}:{epoch}:{micro_step}:{rank}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def sample_noise(latents: torch.Tensor, gen: torch.Generator, offset_noise: bool) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=gen, device=latents.device, dtype=latents.dtype)
    if offset_noise:
        # Offset noise (crosslabs): a per-channel constant shift lets the model learn very dark/bright images.
        shift = torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=gen, device=latents.device, dtype=latents.dtype
        )
        noise = noise + 0.1 * shift
    return noise


def sample_timesteps(batch: int, num_train_timesteps: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch,), generator=gen, device=device).long()


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unknown prediction type {kind!r}: the scheduler must predict epsilon or v_prediction.")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma)/SNR for epsilon, /(SNR+1) for v."""
    clipped = torch.clamp(snr_values, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_values
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    raise ValueError(f"Min-SNR weighting is defined for epsilon and v_prediction, not {prediction_type!r}.")


@dataclass
class LossParts:
    loss: torch.Tensor
    instance_loss: torch.Tensor
    prior_loss: torch.Tensor | None


def dreambooth_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    *,
    with_prior_preservation: bool,
    prior_loss_weight: float,
    snr_gamma: float | None,
) -> LossParts:
    """Instance loss (optionally Min-SNR weighted) plus the prior loss on the class half of the batch."""
    prior_loss = None
    if with_prior_preservation:
        # The collate puts instance examples first and class examples second.
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        timesteps = timesteps[: model_pred.shape[0]]
        prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
    if snr_gamma is None:
        instance = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    else:
        weights = min_snr_weights(snr(scheduler, timesteps), snr_gamma, scheduler.config.prediction_type)
        per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(
            dim=list(range(1, model_pred.ndim))
        )
        instance = (per_sample * weights).mean()
    total = instance if prior_loss is None else instance + prior_loss_weight * prior_loss
    return LossParts(total, instance.detach(), None if prior_loss is None else prior_loss.detach())


def scheduler_sigmas(scheduler: Any, timesteps: torch.Tensor, n_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The scripts' get_sigmas (SDXL's EDM training, Flux's flow matching): each timestep's sigma in the
    scheduler's table, shaped to broadcast over latents of `n_dim` dimensions."""
    sigmas = scheduler.sigmas.to(device=timesteps.device, dtype=dtype)
    schedule = scheduler.timesteps.to(timesteps.device)
    indices = [(schedule == t).nonzero().item() for t in timesteps]
    sigma = sigmas[indices].flatten()
    while sigma.ndim < n_dim:
        sigma = sigma.unsqueeze(-1)
    return sigma
