"""`dreambooth train-lora-flux` against diffusers' `train_dreambooth_lora_flux.py` itself, on the tiny Flux.

    git -C <diffusers checkout> show HEAD:examples/dreambooth/train_dreambooth_lora_flux.py \\
        > benchmarks/.upstream/train_dreambooth_lora_flux.py      # git-ignored; any copy of the script
    python benchmarks/flux_script.py [--short 10] [--long 80] [--repeats 3] [--max-sequence-length 64]

The method of benchmarks/sdxl_script.py (whose measuring helper this reuses): the same flags for both
(resolution 32, batch 1, no checkpoints within the run, TensorBoard, a T5 prompt of --max-sequence-length tokens),
one intra-op thread, each run in its own process; the rate is (long - short) steps over the difference of their
wall times, so start-up, loading and the final save cancel out; runs interleaved, the median printed with the
peak RSS of the long runs and the rate from CPU seconds. Prints ``flux impl=ours steps_per_s=X peak_rss_mb=Y``
per implementation and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sdxl_script import DOG, MEASURE, REPO, RUNNER  # noqa: E402 - the sibling benchmark's measuring helper

DEFAULT_SCRIPT = REPO / "benchmarks" / ".upstream" / "train_dreambooth_lora_flux.py"


def flags(model: Path, out: Path, steps: int, resolution: int, tokens: int) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(DOG),
        "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--resolution", str(resolution),
        "--train_batch_size", "1", "--max_train_steps", str(steps), "--checkpointing_steps", "1000000",
        "--max_sequence_length", str(tokens), "--seed", "0", "--report_to", "tensorboard",
    ]  # fmt: skip


def measure(impl: str, script: Path, model: Path, steps: int, args: argparse.Namespace, tmp: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{impl}-{steps}-", dir=tmp))
    if impl == "ours":
        cmd = [sys.executable, "-m", "dreambooth_trainer", "train-lora-flux"]
    else:
        cmd = [sys.executable, str(RUNNER), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PROGRESS_PORT": "off", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, *cmd, *flags(model, out, steps, args.resolution, args.max_sequence_length)],
        capture_output=True, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"{impl} ({steps} steps) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", type=Path, default=DEFAULT_SCRIPT)
    parser.add_argument("--model", type=Path, default=None, help="a Flux pipeline folder (default: the tiny Flux)")
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--max-sequence-length", type=int, default=64)
    args = parser.parse_args(argv)
    if not args.script.is_file():
        raise SystemExit(f"{args.script} is missing: fetch train_dreambooth_lora_flux.py there (see the docstring)")
    if args.model is None:
        from dreambooth_trainer.tiny import ensure_tiny_model

        args.model = ensure_tiny_model(family="flux")
    rates: dict[str, list[float]] = {"ours": [], "script": []}
    cpu_rates: dict[str, list[float]] = {"ours": [], "script": []}
    rss: dict[str, int] = {"ours": 0, "script": 0}
    with tempfile.TemporaryDirectory(prefix="flux-bench-") as tmp:
        for repeat in range(args.repeats):
            times: dict[tuple[str, int], float] = {}
            cpu: dict[tuple[str, int], float] = {}
            for steps in (args.short, args.long):
                for impl in ("ours", "script"):
                    m = measure(impl, args.script, args.model, steps, args, Path(tmp))
                    times[(impl, steps)], cpu[(impl, steps)] = m["seconds"], m["cpu"]
                    if steps == args.long:
                        rss[impl] = max(rss[impl], m["rss_kb"])
            for impl in rates:
                rates[impl].append((args.long - args.short) / (times[(impl, args.long)] - times[(impl, args.short)]))
                cpu_rates[impl].append((args.long - args.short) / (cpu[(impl, args.long)] - cpu[(impl, args.short)]))
                print(
                    f"#repeat {repeat} impl={impl} steps_per_s={rates[impl][-1]:.2f} "
                    f"steps_per_cpu_s={cpu_rates[impl][-1]:.2f}",
                    file=sys.stderr, flush=True,
                )  # fmt: skip
    med = {impl: statistics.median(r) for impl, r in rates.items()}
    med_cpu = {impl: statistics.median(r) for impl, r in cpu_rates.items()}
    for impl in ("ours", "script"):
        print(
            f"flux impl={impl} steps_per_s={med[impl]:.2f} steps_per_cpu_s={med_cpu[impl]:.2f} "
            f"peak_rss_mb={rss[impl] / 1024:.0f}"
        )
    print(
        f"flux ours/script speed={med['ours'] / med['script']:.2f}x "
        f"cpu_speed={med_cpu['ours'] / med_cpu['script']:.2f}x rss={rss['ours'] / rss['script']:.2f}x "
        f"(resolution {args.resolution}, batch 1, T5 {args.max_sequence_length} tokens, {args.long}-{args.short} "
        f"steps, {args.repeats} repeats)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
