"""GPU benchmark (issue 27): our step against diffusers' train_dreambooth.py on an SD-1.5-shaped model, one device.

    python benchmarks/gpu.py [--model DIR] [--script benchmarks/.upstream/train_dreambooth.py] [--batches 1,4]
                             [--compile-batches 4] [--steps 30] [--warmup 10] [--no-preempt] [--dry-run]

The script is diffusers' own ``examples/dreambooth/train_dreambooth.py`` (git-ignored copy: ``git -C <diffusers>
show HEAD:examples/dreambooth/train_dreambooth.py > benchmarks/.upstream/train_dreambooth.py``; the device
machine has no network, so carry it). Unless ``--model`` names a pipeline folder, one with SD 1.5's shapes and
random weights is written first (``dreambooth tiny-model --preset sd15-full``, initialised on the GPU). Speed
depends on shapes, not values.

Each case is its own process, full fine-tune, 512 px, fp16, ``--allow_tf32``, the dog images, no checkpoints,
timed by benchmarks/gpu_timer.py (the same clock for both: steps between backward call ``warmup+1`` and the
last, device synchronised at those two marks only). Per batch size (``--batches``):

- ``ours``: ``dreambooth train`` as a new run takes it (eager, fused AdamW on CUDA);
- ``script``: train_dreambooth.py with the same flags (eager, foreach AdamW, a ``.item()`` per step);
- ``ours-compile``: with ``--compile`` (batch sizes in ``--compile-batches``: a compile costs a minute or more);

one line each: ``gpu case=C batch=B steps_per_s=X images_per_s=Y mfu=Z peak_gpu_mb=M``, then the ratio ours /
script per batch (target ≥ 1.0 strict). Model-FLOPs utilisation = the FLOPs of one step counted by
``torch.utils.flop_counter`` (UNet forward + backward, VAE encoder and text encoder forward, at that batch) ×
steps/s ÷ the device's dense fp16 peak (``--peak-tflops``; H100/H200 SXM 989, A100 312 by name).
Last, unless ``--no-preempt``: the full fine-tune's state (fp32 UNet + AdamW moments, ~9.6 GiB) preempted
through the real launcher, SIGTERM → durable on the local disk (target ≤ 10 s; benchmarks/preemption.py's trial).

Budget: with the defaults about 6–7 minutes on an H200 (model write ~30 s, five training processes of ~30–40 s,
one compiled ~2 min, the preemption ~1 min). ``--dry-run`` (any machine, CPU included) checks the arguments
and the script, prints every command, and counts the FLOPs of a scaled-down model; it trains nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DOG = REPO / "examples" / "data" / "dog"
DEFAULT_SCRIPT = REPO / "benchmarks" / ".upstream" / "train_dreambooth.py"
TIMER = REPO / "benchmarks" / "gpu_timer.py"
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
PROMPT = "a photo of sks dog"


def step_flops(components: dict[str, Any], batch: int, resolution: int, device: str) -> float:
    """FLOPs of one full fine-tune step at `batch`: UNet forward + backward, VAE encoder and text encoder forward."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae, te = components["unet"], components["vae"], components["text_encoder"]
    dtype = torch.float16 if device == "cuda" else torch.float32
    for m in (unet, vae, te):
        m.to(device)
    latent = resolution // 8
    with FlopCounterMode(display=False) as counter:
        ids = torch.zeros(batch, te.config.max_position_embeddings, dtype=torch.long, device=device)
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"), torch.no_grad():
            states = te(ids)[0]
            vae.encode(torch.zeros(batch, 3, resolution, resolution, device=device))
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            x = torch.zeros(batch, unet.config.in_channels, latent, latent, device=device)
            t = torch.zeros(batch, dtype=torch.long, device=device)
            unet(x, t, states.to(x.dtype)).sample.float().mean().backward()
    unet.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def common_flags(model: str, batch: int, steps: int, resolution: int, out: Path) -> list[str]:
    return [
        "--pretrained_model_name_or_path", model, "--instance_data_dir", str(DOG), "--instance_prompt", PROMPT,
        "--output_dir", str(out), "--resolution", str(resolution), "--train_batch_size", str(batch),
        "--max_train_steps", str(steps), "--checkpointing_steps", "100000", "--mixed_precision", "fp16",
        "--allow_tf32", "--seed", "0", "--report_to", "tensorboard", "--learning_rate", "1e-6",
    ]  # fmt: skip


def cases(args: argparse.Namespace, model: str, work: Path) -> list[tuple[str, int, list[str]]]:
    total = args.warmup + args.steps
    out: list[tuple[str, int, list[str]]] = []
    for batch in args.batches:

        def flags(name: str, batch: int = batch) -> list[str]:
            return common_flags(model, batch, total, args.resolution, work / f"out-{name}-{batch}")

        out.append(("ours", batch, [sys.executable, str(TIMER), "-m", "dreambooth_trainer", "train", *flags("ours")]))
        out.append(("script", batch, [sys.executable, str(TIMER), str(args.script), *flags("script")]))
        if batch in args.compile_batches:
            out.append(("ours-compile", batch, [sys.executable, str(TIMER), "-m", "dreambooth_trainer", "train",
                                                *flags("compile"), "--compile"]))  # fmt: skip
    return out


def run_case(cmd: list[str], warmup: int, total: int, work: Path, log: Path) -> dict[str, Any]:
    result = work / f"timer-{time.monotonic_ns()}.json"
    env = {**os.environ, "BENCH_WARMUP": str(warmup), "BENCH_TOTAL": str(total), "BENCH_OUT": str(result),
           "PROGRESS_PORT": "off", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    t0 = time.monotonic()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    doc = json.loads(result.read_text()) if result.exists() else {}
    doc.update(rc=rc, wall_s=time.monotonic() - t0)
    return doc


def peak_tflops(given: float | None) -> float | None:
    if given:
        return given
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a Stable Diffusion pipeline folder (default: write an SD-1.5-shaped one)")
    ap.add_argument("--script", type=Path, default=DEFAULT_SCRIPT, help="diffusers' train_dreambooth.py")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 4])
    ap.add_argument("--compile-batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[4],
                    help="batch sizes also run with --compile (empty: none)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=30, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (allocator, cuDNN autotune)")
    ap.add_argument("--peak-tflops", type=float, help="dense fp16 peak of the device (default: by its name)")
    ap.add_argument("--no-preempt", action="store_true", help="skip the emergency-checkpoint timing")
    ap.add_argument("--dry-run", action="store_true", help="check and print the plan; train nothing (CPU is fine)")
    args = ap.parse_args(argv)
    if args.steps < 2 or args.warmup < 1:
        ap.error("--steps must be at least 2 and --warmup at least 1")
    if not args.script.is_file():
        print(f"error: --script {args.script} does not exist: {__doc__.split('(git-ignored copy: ')[1].split(';')[0]}",
              file=sys.stderr)  # fmt: skip
        return 64

    import torch

    from dreambooth_trainer.fullsize import make_sd15_full, sd15_components

    cuda = torch.cuda.is_available()
    print(f"# torch {torch.__version__}, device {torch.cuda.get_device_name() if cuda else 'cpu'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dreambooth-gpu-") as tmp:
        work = Path(tmp)
        plan = cases(args, args.model or str(work / "sd15"), work)
        for name, batch, cmd in plan:
            print(f"# case {name} batch {batch}: {' '.join(cmd)}", flush=True)
        if args.dry_run:
            small = sd15_components(small=True)
            flops = {b: step_flops(small, b, 64, "cpu") for b in args.batches}
            print("# dry run: FLOPs per step of the scaled-down model at 64 px: "
                  + ", ".join(f"batch {b} {f / 1e9:.2f} GFLOP" for b, f in flops.items()), flush=True)  # fmt: skip
            return 0
        t0 = time.monotonic()
        model = args.model or str(make_sd15_full(work / "sd15"))
        print(f"# model ready in {time.monotonic() - t0:.1f} s", flush=True)
        full = sd15_components()  # the same shapes, for the FLOP count
        device = "cuda" if cuda else "cpu"
        flops = {b: step_flops(full, b, args.resolution, device) for b in args.batches}
        del full
        if cuda:
            torch.cuda.empty_cache()
        peak = peak_tflops(args.peak_tflops)
        for b, f in flops.items():
            print(f"# model FLOPs per step at batch {b}: {f / 1e12:.2f} TFLOP (peak {peak or '?'} TFLOPS)", flush=True)
        rates: dict[tuple[str, int], float] = {}
        for name, batch, cmd in plan:
            log = work / f"{name}-{batch}.log"
            r = run_case(cmd, args.warmup, args.warmup + args.steps, work, log)
            rate = r.get("steps_per_s")
            if r["rc"] != 0 or rate is None:
                tail = log.read_text(errors="replace")[-2500:]
                print(f"gpu case={name} batch={batch} FAILED rc={r['rc']} wall_s={r['wall_s']:.0f}\n{tail}", flush=True)
                continue
            rates[(name, batch)] = rate
            mfu = f"{flops[batch] * rate / (peak * 1e12):.3f}" if peak else "n/a"
            print(f"gpu case={name} batch={batch} steps_per_s={rate:.2f} images_per_s={rate * batch:.1f} mfu={mfu} "
                  f"peak_gpu_mb={r.get('peak_gpu_mb', 0):.0f} wall_s={r['wall_s']:.0f}", flush=True)  # fmt: skip
        for batch in args.batches:
            ours, script = rates.get(("ours", batch)), rates.get(("script", batch))
            if ours and script:
                print(f"gpu ratio batch={batch} ours/script={ours / script:.2f} (strict; target >= 1.0)", flush=True)
            if (c := rates.get(("ours-compile", batch))) and script:
                print(f"gpu ratio batch={batch} ours-compile/script={c / script:.2f} (reported, not targeted)")
        if args.no_preempt:
            return 0
        from benchmarks.preemption import trial

        out = work / "preempt-out"
        r = trial(
            work / "preempt", out.as_uri(), warm_steps=3, ckpt=100_000,
            pretrainedModelNameOrPath=model, resolution=args.resolution, mixedPrecision="fp16",
        )  # fmt: skip
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**30
        print(
            f"preempt full state={size:.2f} GiB sigterm_to_durable_s={r['durable']:.2f} "
            f"sigterm_to_exit_s={r['exit']:.2f} steps_lost={int(r['lost'])} (target durable <= 10 s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
