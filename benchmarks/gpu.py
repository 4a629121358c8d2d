"""GPU benchmark: the trainer on a Stable-Diffusion-1.5-shaped model, one CUDA device.

    python benchmarks/gpu.py [--model DIR] [--resolution 512] [--steps 40] [--modes full,lora,...] [--no-preempt]

No hub access here, so unless ``--model`` names a real pipeline folder, one with SD 1.5's shapes and random
weights is written first (UNet 860M parameters, CLIP ViT-L/14 text encoder, SD's VAE; the tokenizer is the tiny
model's, which changes only the embedding table's row count). Speed and memory depend on shapes, not values.

Figures, one line each:
- ``trainer mode=M steps_per_s=X peak_rss_mb=Y peak_gpu_mb=Z`` from benchmarks/trainer_throughput.py at the
  given resolution and mixed precision (full, lora, te, full-cached, lora-cached);
- the full fine-tune's state (fp32 UNet + AdamW moments) preempted: SIGTERM -> durable checkpoint on the local
  disk, and its size, through the real launcher (benchmarks/preemption.py's trial).
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


def make_sd15_shaped(out: Path, *, small: bool = False) -> Path:
    """Write a random pipeline with SD 1.5's component shapes (``small``: a scaled-down one to test this script)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth_trainer.tiny import MAX_LENGTH, make_tokenizer

    tokenizer = make_tokenizer()
    width = 768 if not small else 32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    # Initialise on the GPU: a billion CPU-side random inits take minutes of the lease.
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=width,
            attention_head_dim=8,
            **({} if not small else {"block_out_channels": (32, 64, 64, 64), "norm_num_groups": 32}),
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512) if not small else (32, 32, 32, 32),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=width,
                intermediate_size=3072 if not small else 37,
                num_hidden_layers=12 if not small else 2,
                num_attention_heads=12 if not small else 4,
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
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.to("cpu").save_pretrained(out, safe_serialization=True)
    params = sum(p.numel() for p in unet.parameters())
    print(f"# wrote an SD-1.5-shaped random pipeline to {out}: UNet {params / 1e6:.0f}M parameters", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a Stable Diffusion pipeline folder (default: write an SD-1.5-shaped one)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="fp16")
    parser.add_argument("--modes", default="full,lora,te,full-cached,lora-cached")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-preempt", action="store_true", help="skip the preemption timing")
    parser.add_argument("--small", action="store_true", help=argparse.SUPPRESS)  # scaled-down shapes: tests this file
    args = parser.parse_args(argv)

    import torch

    if torch.cuda.is_available():
        print(f"# device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dreambooth-gpu-") as tmp:
        t0 = time.monotonic()
        model = args.model or str(make_sd15_shaped(Path(tmp) / "sd15-shaped", small=args.small))
        print(f"# model ready in {time.monotonic() - t0:.1f} s", flush=True)
        rc = subprocess.call([
            sys.executable, str(REPO / "benchmarks" / "trainer_throughput.py"), "--modes", args.modes,
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
            "--model", model, "--resolution", str(args.resolution), "--batch", str(args.batch),
            "--mixed-precision", args.mixed_precision,
        ])  # fmt: skip
        if rc != 0 or args.no_preempt:
            return rc
        from benchmarks.preemption import trial

        out = Path(tmp) / "preempt-out"
        r = trial(
            Path(tmp) / "preempt", out.as_uri(), warm_steps=3, ckpt=100_000,
            pretrainedModelNameOrPath=model, resolution=args.resolution, mixedPrecision=args.mixed_precision,
        )  # fmt: skip
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**30
        print(
            f"preempt full state={size:.2f} GiB sigterm_to_durable_s={r['durable']:.2f} "
            f"sigterm_to_exit_s={r['exit']:.2f} steps_lost={int(r['lost'])}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
