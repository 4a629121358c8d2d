"""The model card (README.md) written into every output, in the shape diffusers' DreamBooth scripts give it.

The scripts write it only when pushing to the Hub; every output gets one here, so a model in S3 says what it
is. YAML front matter as the scripts write it (license, base_model, instance_prompt, tags, inference), then
what was trained, how, for how long, the validation images, and every setting that differs from the
script's default (the Hub token never).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from dreambooth_api.config import CommonConfig, FluxLoraConfig, LoraConfig, SdxlLoraConfig, flag_and_field

# A Hub model id ("org/name" or "name"); the Hub rejects any other base_model in the card's metadata.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
SECRET_FIELDS = frozenset({"hub_token"})


def is_hub_id(name: str) -> bool:
    return (
        "://" not in name
        and not name.startswith((".", "/", "~"))
        and bool(_HUB_ID.match(name))
        and not Path(name).exists()
    )


def _front_matter(cfg: CommonConfig) -> str:
    sdxl = isinstance(cfg, SdxlLoraConfig)
    flux = isinstance(cfg, FluxLoraConfig)
    tags = ["text-to-image", "dreambooth", "diffusers-training"]
    # The SDXL script's tags and license (openrail++, SDXL's), DoRA named as such.
    tags += (
        ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"]
        if sdxl
        else ["flux", "flux-diffusers"]
        if flux
        else ["stable-diffusion", "stable-diffusion-diffusers"]
    )
    if isinstance(cfg, LoraConfig):
        tags.append("dora" if sdxl and cfg.use_dora else "lora")
    if sdxl or flux:
        tags.append("template:sd-lora")
    # Flux's weights come under Black Forest Labs' own licences (FLUX.1-dev: non-commercial): the script says "other".
    meta: dict[str, object] = {
        "license": "openrail++" if sdxl else "other" if flux else "creativeml-openrail-m",
        "library_name": "diffusers",
    }
    if is_hub_id(cfg.pretrained_model_name_or_path):
        meta["base_model"] = cfg.pretrained_model_name_or_path
    meta["instance_prompt"] = cfg.instance_prompt
    meta["tags"] = tags
    meta["inference"] = True
    # safe_dump quotes prompts with ':' or '#', which the scripts' f-string YAML would break on.
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _settings_table(cfg: CommonConfig) -> str:
    rows = []
    for name, value in cfg.model_dump(mode="json", exclude_defaults=True).items():
        if name in SECRET_FIELDS:
            continue
        text = str(value).replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{flag_and_field(name)}` | {text} |")
    if not rows:
        return "All settings are the script's defaults.\n"
    return "| setting | value |\n| --- | --- |\n" + "\n".join(rows) + "\n"


def model_card(
    cfg: CommonConfig,
    *,
    steps: int,
    repo_id: str | None = None,
    validation_images: Sequence[str] = (),
    validation_step: int | None = None,
) -> str:
    """README.md text. ``validation_images``: paths relative to the output folder (images, then the grid)."""
    base = cfg.pretrained_model_name_or_path
    title = repo_id or Path(cfg.output_dir.rstrip("/")).name or "model"
    if isinstance(cfg, LoraConfig):
        heading = f"# LoRA DreamBooth - {title}"
        what = (
            f"These are LoRA adaption weights (rank {cfg.rank if isinstance(cfg, LoraConfig) else '?'}) for {base}, trained on "
            f"`{cfg.instance_prompt}` with [DreamBooth](https://dreambooth.github.io/)."
        )
        te = f"LoRA for the text encoder was enabled: {cfg.train_text_encoder}."
        if isinstance(cfg, SdxlLoraConfig):
            heading = f"# SDXL LoRA DreamBooth - {title}"
            te += f"\n\nSpecial VAE used for training: {cfg.pretrained_vae_model_name_or_path}."
        if isinstance(cfg, FluxLoraConfig):
            heading = f"# Flux DreamBooth LoRA - {title}"
            te += (
                "\n\nLicense: the base model's (FLUX.1-dev: https://huggingface.co/black-forest-labs/FLUX.1-dev/"
                "blob/main/LICENSE.md)."
            )
        usage = (
            "```python\nfrom diffusers import DiffusionPipeline\n\n"
            f"pipe = DiffusionPipeline.from_pretrained({base!r})\n"
            f"pipe.load_lora_weights({title!r})\n"
            f"image = pipe({cfg.instance_prompt!r}).images[0]\n```\n"
        )
    else:
        heading = f"# DreamBooth - {title}"
        what = (
            f"This is a DreamBooth model derived from {base}. The weights were trained on "
            f"`{cfg.instance_prompt}` using [DreamBooth](https://dreambooth.github.io/)."
        )
        te = f"DreamBooth for the text encoder was enabled: {cfg.train_text_encoder}."
        usage = (
            "```python\nfrom diffusers import DiffusionPipeline\n\n"
            f"pipe = DiffusionPipeline.from_pretrained({title!r})\n"
            f"image = pipe({cfg.instance_prompt!r}).images[0]\n```\n"
        )
    prior = (
        f"Prior preservation: on, class prompt `{cfg.class_prompt}`, {cfg.num_class_images} class images, "
        f"weight {cfg.prior_loss_weight}."
        if cfg.with_prior_preservation
        else "Prior preservation: off."
    )
    parts = [
        _front_matter(cfg),
        heading,
        "",
        what,
        "",
        f"- Method: {'LoRA' if isinstance(cfg, LoraConfig) else 'full fine-tune'} ({cfg.script}'s flags and defaults)",
        f"- Base model: {base}",
        f"- Instance prompt: `{cfg.instance_prompt}`",
        f"- Training steps: {steps}",
        f"- {prior}",
        f"- {te}",
        "",
    ]
    if validation_images:
        where = f" at step {validation_step}" if validation_step is not None else ""
        parts += [f"## Validation images{where}", "", f"Prompt: `{cfg.validation_prompt}`", ""]
        parts += [
            f"![{'grid' if Path(path).stem == 'grid' else f'validation {i}'}]({path})"
            for i, path in enumerate(validation_images)
        ]
        parts.append("")
    parts += ["## Use it", "", usage, "## Training settings", "", _settings_table(cfg)]
    return "\n".join(parts)


def write_model_card(folder: Path, text: str) -> Path:
    path = folder / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


__all__ = ["is_hub_id", "model_card", "write_model_card"]
