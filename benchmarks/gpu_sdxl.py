"""GPU benchmark: SDXL DreamBooth LoRA (`train-lora-sdxl`) on an SDXL-shaped random model, one CUDA device.

    python benchmarks/gpu_sdxl.py [--model DIR] [--resolution 1024] [--steps 20] [--modes sdxl-lora,sdxl-lora-gc]

No hub access, so unless ``--model`` names a real SDXL pipeline folder, one with SDXL base 1.0's component shapes
and random weights is written first (UNet 2.6B parameters with its 1/2/10 transformer layers, CLIP ViT-L/14 and
OpenCLIP ViT-bigG/14 text encoders, SDXL's VAE; the tokenizers are the tiny model's, which changes only the
embedding tables' row count). Speed and memory depend on shapes, not values.

Figures, one line per mode from benchmarks/trainer_throughput.py: ``trainer mode=M steps_per_s=X peak_rss_mb=Y
peak_gpu_mb=Z`` at the given resolution, batch and mixed precision (default bf16, batch 1, 1024 px: issue #22's
configuration): ``sdxl-lora`` (UNet LoRA rank 4), ``sdxl-lora-gc`` (the same with --gradient_checkpointing),
``sdxl-lora-cached`` (--cache_latents, opt-in). ``--small`` writes a scaled-down model, so this file is checked
on CPU (tests/unit/test_benchmarks_gpu_sdxl.py).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_sdxl_shaped(out: Path, *, small: bool = False) -> Path:
    """Write a random pipeline with SDXL base 1.0's shapes (``small``: a scaled-down one to test this script)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth_trainer.tiny import MAX_LENGTH, make_tokenizer

    tokenizer, tokenizer_2 = make_tokenizer(), make_tokenizer()

    def clip(hidden: int, inter: int, layers: int, heads: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=MAX_LENGTH, projection_dim=hidden, hidden_act=act,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip

    # SDXL base 1.0's configs (unet/, text_encoder/, text_encoder_2/, vae/ config.json), or toy sizes.
    te1_cfg = clip(768, 3072, 12, 12, "quick_gelu") if not small else clip(32, 37, 2, 4, "quick_gelu")
    te2_cfg = clip(1280, 5120, 32, 20, "gelu") if not small else clip(64, 37, 2, 4, "gelu")
    time_dim = 256 if not small else 8
    unet_kw = dict(
        sample_size=128, block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, layers_per_block=2,
    ) if not small else dict(
        sample_size=16, block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 1, 1), cross_attention_dim=96, layers_per_block=1,
    )  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    # Initialise on the GPU: billions of CPU-side random inits take minutes of the lease.
    with torch.device(device):
        unet = UNet2DConditionModel(
            in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + te2_cfg.projection_dim, norm_num_groups=32,
            **unet_kw,
        )  # fmt: skip
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512) if not small else (32, 32, 32, 32), layers_per_block=2,
            latent_channels=4, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
        )  # fmt: skip
        text_encoder = CLIPTextModel(te1_cfg)
        text_encoder_2 = CLIPTextModelWithProjection(te2_cfg)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )  # fmt: skip
    pipe.to("cpu").save_pretrained(out, safe_serialization=True)
    counts = {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in
              (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2), ("vae", vae))}  # fmt: skip
    print(
        "# wrote an SDXL-shaped random pipeline: " + ", ".join(f"{n} {c:.0f}M" for n, c in counts.items()), flush=True
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an SDXL pipeline folder (default: write an SDXL-shaped one)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="bf16")
    parser.add_argument("--modes", default="sdxl-lora,sdxl-lora-gc")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--small", action="store_true", help=argparse.SUPPRESS)  # scaled-down shapes: tests this file
    args = parser.parse_args(argv)

    import torch

    if torch.cuda.is_available():
        print(f"# device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dreambooth-gpu-sdxl-") as tmp:
        t0 = time.monotonic()
        model = args.model or str(make_sdxl_shaped(Path(tmp) / "sdxl-shaped", small=args.small))
        print(f"# model ready in {time.monotonic() - t0:.1f} s", flush=True)
        return subprocess.call([
            sys.executable, str(REPO / "benchmarks" / "trainer_throughput.py"), "--modes", args.modes,
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--model", model,
            "--resolution", str(args.resolution), "--batch", str(args.batch),
            "--mixed-precision", args.mixed_precision,
        ])  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
