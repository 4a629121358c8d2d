"""The VAE's latent distribution mapped to the space the denoiser trains in, as each family's script does it.

SD and SDXL scale by ``scaling_factor``; a VAE that publishes per-channel ``latents_mean``/``latents_std``
(Playground v2.5's SDXL VAE) is standardised first (train_dreambooth_lora_sdxl.py); a ``shift_factor`` (Flux's
16-channel VAE) is subtracted before scaling (train_dreambooth_lora_flux.py). Kept apart from the VAE so a run
with cached latents can free it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


def latent_transform(vae_config: Mapping[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    scale = float(vae_config["scaling_factor"])
    shift = vae_config.get("shift_factor")
    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

        def standardised(latents: torch.Tensor) -> torch.Tensor:
            m = mean_t.to(latents.device, latents.dtype)
            s = std_t.to(latents.device, latents.dtype)
            return (latents - m) * scale / s

        return standardised
    if shift is not None:
        return lambda latents: (latents - float(shift)) * scale
    return lambda latents: latents * scale
