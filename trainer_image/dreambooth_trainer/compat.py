"""Warnings diffusers' DreamBooth scripts print for flags that have no effect, so a switched-over command says
the same things."""

from __future__ import annotations

import logging

from dreambooth_api.config import CommonConfig, flag_and_field

logger = logging.getLogger(__name__)


def script_warnings(cfg: CommonConfig) -> list[str]:
    out = []
    if not cfg.with_prior_preservation:
        for name in ("class_data_dir", "class_prompt"):
            if getattr(cfg, name):
                out.append(f"You need not use {flag_and_field(name)} without --with_prior_preservation: it is ignored.")
    return out


def warn_like_the_scripts(cfg: CommonConfig) -> None:
    for message in script_warnings(cfg):
        logger.warning(message)
