"""Trainer throughput on the tiny model: one line per mode, ``trainer mode=M steps_per_s=X peak_rss_mb=Y``.

    python benchmarks/trainer_throughput.py [--steps 60] [--warmup 10] [--repeats 3] [--modes full,lora,...]

Each mode runs in its own process (so peak RSS is that mode's), with one intra-op thread, resolution 32,
batch 1, one process, no checkpoints and no trackers; only the training loop is timed: the rate is taken
between the end of optimizer step ``warmup`` and the last step, so model loading, the first-step allocations
and saving the output are not in it. With ``--repeats`` > 1 the median rate is printed (and the max RSS).

Modes: full (train_dreambooth.py), lora (train_dreambooth_lora.py, rank 4), prior (full with prior
preservation on the shipped class images), te (full with --train_text_encoder), and the opt-in caches:
full-cached / lora-cached (--pre_compute_text_embeddings --cache_latents --center_crop).

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
}


def _child(mode: str, steps: int, warmup: int, opts: argparse.Namespace) -> None:
    """Run one mode in this process and print its line."""
    import torch

    torch.set_num_threads(1)
    on_gpu = torch.cuda.is_available()
    from dreambooth_trainer.cli_args import parse_cli
    from dreambooth_trainer.config import FullConfig, LoraConfig
    from dreambooth_trainer.train import RunEnv, Trainer

    method, extra = MODES[mode]
    with tempfile.TemporaryDirectory(prefix="dreambooth-bench-") as out:
        argv = [
            "--pretrained_model_name_or_path", opts.model, "--instance_data_dir", str(DOG),
            "--instance_prompt", "a photo of sks dog", "--output_dir", out, "--resolution", str(opts.resolution),
            "--train_batch_size", str(opts.batch), "--max_train_steps", str(steps),
            "--checkpointing_steps", str(10 * steps), "--seed", "0", "--report_to", "none", *extra,
            *(["--mixed_precision", opts.mixed_precision] if opts.mixed_precision else []),
        ]  # fmt: skip
        model = LoraConfig if method == "lora" else FullConfig
        cfg = parse_cli(model, argv, "bench")
        trainer = Trainer(cfg, RunEnv())
        trainer.setup()
        stamps: dict[int, float] = {}
        cpu: dict[int, float] = {}
        update = trainer.progress.update

        def record(**fields):
            if "step" in fields:
                stamps[fields["step"]] = time.perf_counter()
                cpu[fields["step"]] = time.process_time()
            update(**fields)

        trainer.progress.update = record  # type: ignore[method-assign]
        # Stop the clock at the loop's end: saving the output is not throughput.
        trainer.finish = lambda loss: None  # type: ignore[method-assign]
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        trainer.fit()
        if trainer.progress_server is not None:
            trainer.progress_server.stop()
    rate = (steps - warmup) / (stamps[steps] - stamps[warmup])
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    # On a GPU the device memory is what limits the batch; torch's allocator peak during the loop.
    gpu = f" peak_gpu_mb={torch.cuda.max_memory_allocated() / 2**20:.0f}" if on_gpu else ""
    print(f"trainer mode={mode} steps_per_s={rate:.2f} peak_rss_mb={rss_mb:.0f}{gpu}", flush=True)
    # On a shared machine wall time also counts other processes; this process's CPU time does not, and the
    # fastest tenth of the steps is what an idle machine gives every step.
    durations = sorted(stamps[i] - stamps[i - 1] for i in range(warmup + 1, steps + 1))
    p10 = durations[len(durations) // 10]
    print(
        f"# {mode}: {(steps - warmup) / (cpu[steps] - cpu[warmup]):.2f} steps per CPU second, "
        f"{1 / p10:.2f} steps/s at the fastest tenth of steps",
        file=sys.stderr,
    )


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
    if args.child:
        _child(args.child, args.steps, args.warmup, args)
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PROGRESS_PORT="off", LOG_LEVEL="WARNING")  # fmt: skip
    for mode in args.modes.split(","):
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        rates, rss, gpu, notes = [], [], [], []
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
        gpu_part = f" peak_gpu_mb={max(gpu):.0f}" if gpu else ""
        print(
            f"trainer mode={mode} steps_per_s={statistics.median(rates):.2f} peak_rss_mb={max(rss):.0f}{gpu_part}",
            flush=True,
        )
        print(f"{notes[len(notes) // 2]} (median); load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
