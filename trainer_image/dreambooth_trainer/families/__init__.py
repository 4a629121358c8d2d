"""Model families behind one seam (docs/design.md, "Model families"). A family's code lives in its own module
here (`sd` for Stable Diffusion 1.x/2.x, `sdxl` for Stable Diffusion XL, `flux` for
Flux.1); the training loop, checkpoints, storage and the launcher know only
`ModelFamily`.
"""

from __future__ import annotations

from dreambooth_api.config import CommonConfig

from .base import ModelFamily, Parts
from .flux import Flux
from .sd import StableDiffusion
from .sdxl import StableDiffusionXL

FAMILIES: dict[str, ModelFamily] = {"sd": StableDiffusion(), "sdxl": StableDiffusionXL(), "flux": Flux()}
# The manifest's spec.method -> the family that trains it.
BY_METHOD: dict[str, ModelFamily] = {method: fam for fam in FAMILIES.values() for method in fam.methods}


def family_for(cfg: CommonConfig) -> ModelFamily:
    return BY_METHOD[cfg.method]


__all__ = ["BY_METHOD", "FAMILIES", "ModelFamily", "Parts", "family_for"]
