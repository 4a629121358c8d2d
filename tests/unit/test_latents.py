"""The VAE latents -> training space transform of each family's script (latents.py)."""

from __future__ import annotations

import pytest
import torch

from dreambooth_trainer.latents import latent_transform

LATENTS = torch.linspace(-2, 2, 2 * 4 * 3 * 3).reshape(2, 4, 3, 3)
MEAN, STD = [0.1, -0.2, 0.3, 0.0], [0.9, 1.1, 0.8, 1.2]


def script_sdxl(latents, config):
    """train_dreambooth_lora_sdxl.py's two branches, as written there."""
    if config.get("latents_mean") is None and config.get("latents_std") is None:
        return latents * config["scaling_factor"]
    mean = torch.tensor(config["latents_mean"]).view(1, 4, 1, 1)
    std = torch.tensor(config["latents_std"]).view(1, 4, 1, 1)
    return (latents - mean) * config["scaling_factor"] / std


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"scaling_factor": 0.18215}, lambda x: script_sdxl(x, {"scaling_factor": 0.18215})),
        ({"scaling_factor": 0.13025, "latents_mean": None, "latents_std": None},
         lambda x: script_sdxl(x, {"scaling_factor": 0.13025})),
        ({"scaling_factor": 0.5, "latents_mean": MEAN, "latents_std": STD},
         lambda x: script_sdxl(x, {"scaling_factor": 0.5, "latents_mean": MEAN, "latents_std": STD})),
        # train_dreambooth_lora_flux.py: (latents - shift_factor) * scaling_factor
        ({"scaling_factor": 0.3611, "shift_factor": 0.1159}, lambda x: (x - 0.1159) * 0.3611),
    ],
)  # fmt: skip
def test_matches_the_scripts(config, expected):
    assert torch.allclose(latent_transform(config)(LATENTS), expected(LATENTS))
