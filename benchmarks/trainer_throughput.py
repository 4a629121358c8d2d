"""Trainer throughput on the tiny model: one line per mode, ``trainer mode=M steps_per_s=X peak_rss_mb=Y``.

    python benchmarks/trainer_throughput.py [--steps 60] [--warmup 10] [--repeats 3] [--modes full,lora,...]

Each mode runs in its own process (so peak RSS is that mode's), with one intra-op thread, resolution 32,
batch 1, one process, no checkpoints and no trackers; only the training loop is timed: the rate is taken
between the end of optimizer step ``warmup`` and the last step, so model loading, the first-step allocations
and saving the output are not in it. With ``--repeats`` > 1 the median rate is printed (and the max RSS).

Modes: full (train_dreambooth.py), lora (train_dreambooth_lora.py, rank 4), prior (full with prior
preservation on the shipped class images), te (full with --train_text_encoder), and the opt-in caches:
full-cached / lora-cached (--pre_compute_text_embeddings --cache_latents --center_crop).

Memory: stderr also gives each mode's RSS after the imports, after setup (models, data, optimizer) and after
the first step (``#rss``, of the repeat with the highest peak). The opt-in mode ``bare`` is the floor a trainer
built on these libraries starts from: diffusers' ``train_dreambooth.py`` imports (pipelines, Hub, accelerate,
transformers), the same tiny model, default AdamW and the bare DreamBooth step on the instance images, none of
our machinery (config, storage, checkpoints, progress), batch 1 in fp32; its rate is not comparable (no data
loader, the unfused AdamW the script uses). ``bare-lora`` is the same for train_dreambooth_lora.py (frozen UNet,
the script's rank-4 peft adapter): the example-style LoRA rate on this machine, to set beside ``lora``.

``--model/--resolution/--batch/--mixed-precision`` run the same modes on another pipeline (benchmarks/gpu.py
uses them for a Stable-Diffusion-1.5-shaped model at 512 px); on a CUDA machine each line also gives the
loop's peak GPU memory, ``peak_gpu_mb``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOG = REPO / "examples" / "data" / "dog"
CLASS_DOG = REPO / "examples" / "data" / "class-dog"
CACHED = ["--pre_compute_text_embeddings", "--cache_latents", "--center_crop"]
PRIOR = [
    "--with_prior_preservation", "--class_data_dir", str(CLASS_DOG), "--class_prompt", "a photo of dog",
    "--num_class_images", "4",
]  # fmt: skip
MODES: dict[str, tuple[str, list[str]]] = {
    "full": ("full", []),
    "lora": ("lora", []),
    "prior": ("full", PRIOR),
    "te": ("full", ["--train_text_encoder"]),
    "full-cached": ("full", CACHED),
    "lora-cached": ("lora", CACHED),
    # SDXL (train_dreambooth_lora_sdxl.py) on an SDXL pipeline given by --model (benchmarks/gpu_sdxl.py).
    "sdxl-lora": ("lora-sdxl", []),
    "sdxl-lora-gc": ("lora-sdxl", ["--gradient_checkpointing"]),
    "sdxl-lora-cached": ("lora-sdxl", ["--cache_latents"]),
}
BARE = ("bare", "bare-lora")


def _rss_mb() -> float:
    """This process's resident memory now (ru_maxrss only gives the peak)."""
    with open("/proc/self/status") as status:
        return next(int(ln.split()[1]) / 1024 for ln in status if ln.startswith("VmRSS:"))


def _child(mode: str, steps: int, warmup: int, opts: argparse.Namespace) -> None:
    """Run one mode in this process and print its line."""
    import torch

    torch.set_num_threads(1)
    on_gpu = torch.cuda.is_available()

    # What setup would import (its models' libraries) imported now, so that "imports" compares with bare's.
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from dreambooth_api.config import MODELS
    from dreambooth_trainer.cli_args import parse_cli
    from dreambooth_trainer.train import RunEnv, Trainer

    del Accelerator, AutoencoderKL, DDPMScheduler, UNet2DConditionModel, AutoTokenizer, CLIPTextModel
    rss = {"imports": _rss_mb()}

    method, extra = MODES[mode]
    with tempfile.TemporaryDirectory(prefix="dreambooth-bench-") as out:
        argv = [
            "--pretrained_model_name_or_path", opts.model, "--instance_data_dir", str(DOG),
            "--instance_prompt", "a photo of sks dog", "--output_dir", out, "--resolution", str(opts.resolution),
            "--train_batch_size", str(opts.batch), "--max_train_steps", str(steps),
            "--checkpointing_steps", str(10 * steps), "--seed", "0", "--report_to", "none", *extra,
            *(["--mixed_precision", opts.mixed_precision] if opts.mixed_precision else []),
        ]  # fmt: skip
        cfg = parse_cli(MODELS[method], argv, "bench")
        trainer = Trainer(cfg, RunEnv())
        trainer.setup()
        rss["setup"] = _rss_mb()
        stamps: dict[int, float] = {}
        cpu: dict[int, float] = {}
        update = trainer.progress.update

        def record(**fields):
            if "step" in fields:
                stamps[fields["step"]] = time.perf_counter()
                cpu[fields["step"]] = time.process_time()
                if fields["step"] == 1:
                    rss["first_step"] = _rss_mb()
            update(**fields)

        trainer.progress.update = record  # type: ignore[method-assign]
        # Stop the clock at the loop's end: saving the output is not throughput.
        trainer.finish = lambda loss: None  # type: ignore[method-assign]
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        trainer.fit()
        if trainer.progress_server is not None:
            trainer.progress_server.stop()
    _report(mode, stamps, cpu, steps, warmup, rss, torch.cuda.max_memory_allocated() if on_gpu else None)


def _report(
    mode: str,
    stamps: dict[int, float],
    cpu: dict[int, float],
    steps: int,
    warmup: int,
    rss: dict[str, float],
    gpu_bytes: int | None,
) -> None:
    rate = (steps - warmup) / (stamps[steps] - stamps[warmup])
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    # On a GPU the device memory is what limits the batch; torch's allocator peak during the loop.
    gpu = f" peak_gpu_mb={gpu_bytes / 2**20:.0f}" if gpu_bytes is not None else ""
    print(f"trainer mode={mode} steps_per_s={rate:.2f} peak_rss_mb={rss_mb:.0f}{gpu}", flush=True)
    stages = " ".join(f"{k}={v:.0f}" for k, v in rss.items())
    print(f"#rss {mode}: RSS MB {stages} peak={rss_mb:.0f}", file=sys.stderr)
    # On a shared machine wall time also counts other processes; this process's CPU time does not, and the
    # fastest tenth of the steps is what an idle machine gives every step.
    durations = sorted(stamps[i] - stamps[i - 1] for i in range(warmup + 1, steps + 1))
    p10 = durations[len(durations) // 10]
    print(
        f"# {mode}: {(steps - warmup) / (cpu[steps] - cpu[warmup]):.2f} steps per CPU second, "
        f"{1 / p10:.2f} steps/s at the fastest tenth of steps",
        file=sys.stderr,
    )


def _bare(mode: str, steps: int, warmup: int, opts: argparse.Namespace) -> None:
    """The floor: train_dreambooth.py's imports and its step on the same model, none of our machinery.

    ``bare-lora``: train_dreambooth_lora.py's instead: the UNet frozen, a rank-4 peft adapter on its attention
    projections (the script's LoraConfig), AdamW over the adapter only at its default learning rate.
    """
    import torch

    torch.set_num_threads(1)
    import numpy as np
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from huggingface_hub import create_repo, upload_folder
    from PIL import Image
    from transformers import AutoTokenizer, CLIPTextModel

    # Unused here, imported because the script imports them: their memory is part of its floor.
    del ProjectConfiguration, DiffusionPipeline, StableDiffusionPipeline, compute_snr, create_repo, upload_folder
    rss = {"imports": _rss_mb()}
    if opts.model.startswith("tiny://"):
        from dreambooth_trainer.tiny import ensure_tiny_model  # stdlib-only at import; the model is cached

        model_dir = ensure_tiny_model()
    else:
        model_dir = Path(opts.model)  # a local pipeline folder
    acc = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer", use_fast=False)
    noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").to(acc.device)
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").to(acc.device)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    lr = 5e-6
    if mode == "bare-lora":
        from peft import LoraConfig as PeftLoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(PeftLoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                        target_modules=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]))  # fmt: skip
        lr = 5e-4
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    unet, optimizer, lr_scheduler = acc.prepare(unet, optimizer, lr_scheduler)
    ids = tokenizer(
        "a photo of sks dog", truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.to(acc.device)  # fmt: skip
    images = sorted(p for p in DOG.iterdir() if p.suffix in (".png", ".jpg", ".jpeg"))
    rss["setup"] = _rss_mb()
    stamps: dict[int, float] = {}
    cpu: dict[int, float] = {}
    unet.train()
    for step in range(1, steps + 1):
        # Decoded each step from disk, as the script's dataset does (resize, center crop, [-1, 1]).
        image = Image.open(images[step % len(images)]).convert("RGB")
        image = image.resize((opts.resolution, opts.resolution), Image.BILINEAR)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div(127.5).sub(1).to(acc.device)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), device=acc.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        states = text_encoder(ids)[0]
        pred = unet(noisy, timesteps, states, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        acc.backward(loss)
        acc.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=False)
        stamps[step], cpu[step] = time.perf_counter(), time.process_time()
        if step == 1:
            rss["first_step"] = _rss_mb()
    _report(mode, stamps, cpu, steps, warmup, rss, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="full,lora,prior,te,full-cached,lora-cached")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="tiny://", help="pipeline folder, s3:// prefix or tiny:// (default)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps")
    if args.child in BARE:
        _bare(args.child, args.steps, args.warmup, args)
        return 0
    if args.child:
        _child(args.child, args.steps, args.warmup, args)
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PROGRESS_PORT="off", LOG_LEVEL="WARNING")  # fmt: skip
    for mode in args.modes.split(","):
        if mode not in MODES and mode not in BARE:
            parser.error(f"unknown mode {mode!r}; choose from {', '.join([*MODES, *BARE])}")
        rates, rss, gpu, notes = [], [], [], []
        stages: list[str] = []
        for _ in range(args.repeats):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--model", args.model, "--resolution", str(args.resolution), "--batch", str(args.batch),
                 *(["--mixed-precision", args.mixed_precision] if args.mixed_precision else [])],
                capture_output=True, text=True, env=env, cwd=REPO,
            )  # fmt: skip
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("trainer mode=")), None)
            if proc.returncode != 0 or line is None:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            fields = dict(part.split("=", 1) for part in line.split()[1:])
            rates.append(float(fields["steps_per_s"]))
            rss.append(float(fields["peak_rss_mb"]))
            gpu += [float(fields["peak_gpu_mb"])] if "peak_gpu_mb" in fields else []
            notes += [ln for ln in proc.stderr.splitlines() if ln.startswith("# ")]
            stages += [ln for ln in proc.stderr.splitlines() if ln.startswith("#rss ")]
        gpu_part = f" peak_gpu_mb={max(gpu):.0f}" if gpu else ""
        print(
            f"trainer mode={mode} steps_per_s={statistics.median(rates):.2f} peak_rss_mb={max(rss):.0f}{gpu_part}",
            flush=True,
        )
        print(f"{notes[len(notes) // 2]} (median); load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        if stages:
            print(max(stages, key=lambda ln: float(ln.rsplit("peak=", 1)[1])), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
