"""A full-size random Stable Diffusion 1.5 pipeline (`dreambooth tiny-model DIR --preset sd15-full`).

Real shapes, random weights: UNet 860M parameters, CLIP ViT-L/14 text encoder (vocabulary 49408), SD's VAE, fp32
safetensors, ~4.3 GB. Start-up, step speed and memory depend on shapes, not values, so this stands in for the
real model where the Hub cannot be reached (benchmarks/startup.py, benchmarks/gpu.py). The tokenizer is the tiny
model's (its ids fit the full vocabulary).

The modules are built on the meta device and their storage is then filled by one normal draw per tensor: the
modules' own initialisers take minutes for a billion parameters on a small CPU, and the values do not matter.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

PRESETS = ("sd15-full",)
CLIP_VOCAB = 49408


def _materialise(module: Any, gen: Any, device: str) -> Any:
    import torch

    module.to_empty(device=device)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for sub in module.modules():
            # Unit-scale norms keep the activations of a forward pass finite, as in a trained model.
            if isinstance(sub, torch.nn.GroupNorm | torch.nn.LayerNorm) and sub.weight is not None:
                sub.weight.fill_(1.0)
        for name, b in module.named_buffers():
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1], device=b.device).expand_as(b))
            else:
                b.zero_()
    return module.to("cpu")


def sd15_components(*, seed: int = 0, small: bool = False) -> dict[str, Any]:
    """The pipeline's parts with SD 1.5's shapes (``small``: scaled down, to test the code that uses this)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tiny import MAX_LENGTH, make_tokenizer

    tokenizer = make_tokenizer()
    width = 32 if small else 768
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(seed)
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=width,
            attention_head_dim=8,
            **({"block_out_channels": (32, 64, 64, 64), "norm_num_groups": 32} if small else {}),
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(32, 32, 32, 32) if small else (128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer) if small else CLIP_VOCAB,
                hidden_size=width,
                intermediate_size=37 if small else 3072,
                num_hidden_layers=2 if small else 12,
                num_attention_heads=4 if small else 12,
                max_position_embeddings=MAX_LENGTH,
                projection_dim=width,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1,
    )  # fmt: skip
    return {
        "unet": _materialise(unet, gen, device),
        "vae": _materialise(vae, gen, device),
        "text_encoder": _materialise(text_encoder, gen, device),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def make_sd15_full(out_dir: Path, *, seed: int = 0, small: bool = False) -> Path:
    """Write the pipeline to `out_dir` (diffusers' layout, safetensors); returns it."""
    from diffusers import StableDiffusionPipeline

    start = time.monotonic()
    parts = sd15_components(seed=seed, small=small)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    params = sum(p.numel() for p in parts["unet"].parameters())
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    print(
        f"wrote an SD-1.5-shaped random pipeline to {out_dir}: UNet {params / 1e6:.0f}M parameters, "
        f"{size / 2**30:.2f} GiB, {time.monotonic() - start:.1f} s",
        flush=True,
    )
    return out_dir


def tiny_model_main(argv: list[str]) -> int:
    """`dreambooth tiny-model`: the tiny pipelines (tiny.py), or with `--preset sd15-full` this one."""
    import argparse

    from . import tiny

    parser = argparse.ArgumentParser(prog="dreambooth tiny-model", description=tiny.__doc__.splitlines()[0])
    tiny.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.preset == "sd15-full":
        if args.family != "sd" or args.prediction_type != "epsilon":
            parser.error("--preset sd15-full writes an SD 1.5 (epsilon) pipeline: drop --family/--prediction-type")
        make_sd15_full(args.dir, seed=args.seed)
        return 0
    return tiny.run(args)
