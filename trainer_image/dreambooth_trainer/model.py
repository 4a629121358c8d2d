"""What training needs of the models whatever the family: optional libraries, the trainable state by name, the
optimizer class. (Loading and LoRA are the family's: `families`.)"""

from __future__ import annotations

import importlib.util
import logging

import torch

from dreambooth_api.config import CommonConfig, ConfigError, ScriptLoraConfig

logger = logging.getLogger(__name__)


def check_optional_libraries(cfg: CommonConfig) -> None:
    """Fail on a missing optional library before any model loads, naming the flag and the install command."""
    if cfg.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise ConfigError(
            "enable_xformers_memory_efficient_attention",
            "needs xformers: `pip install xformers` (matching your torch build), or drop the flag (SDPA is the default).",
        )
    if _prodigy(cfg) and importlib.util.find_spec("prodigyopt") is None:
        raise ConfigError("optimizer", "prodigy needs prodigyopt: `pip install prodigyopt`, or use AdamW.")
    if cfg.use_8bit_adam and not _prodigy(cfg) and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("use_8bit_adam", "needs bitsandbytes: `pip install bitsandbytes`, or drop the flag.")


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ValueError(f"checkpoint does not match the model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _prodigy(cfg: CommonConfig) -> bool:
    return isinstance(cfg, ScriptLoraConfig) and cfg.uses_prodigy


def optimizer_options(cfg: CommonConfig) -> dict[str, object]:
    """Keyword arguments of the optimizer beyond AdamW's (the SDXL and Flux scripts' --prodigy_* flags)."""
    if not (isinstance(cfg, ScriptLoraConfig) and cfg.uses_prodigy):
        return {}
    return {
        "beta3": cfg.prodigy_beta3, "decouple": cfg.prodigy_decouple,
        "use_bias_correction": cfg.prodigy_use_bias_correction, "safeguard_warmup": cfg.prodigy_safeguard_warmup,
    }  # fmt: skip


def optimizer_class(cfg: CommonConfig):
    if _prodigy(cfg):
        import prodigyopt

        return prodigyopt.Prodigy
    if cfg.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit
    return torch.optim.AdamW


def weights_file(module: torch.nn.Module) -> str:
    """The weights file `from_pretrained` looks for in a part's folder (diffusers' or transformers' name)."""
    from diffusers.models.modeling_utils import ModelMixin

    return "diffusion_pytorch_model.safetensors" if isinstance(module, ModelMixin) else "model.safetensors"


def config_json(module: torch.nn.Module) -> str:
    """The part's config.json as its own save_pretrained writes it (class name and library version included)."""
    config = module.config
    return config.to_json_string() if hasattr(config, "to_json_string") else module.to_json_string()  # type: ignore[operator]
