"""`dreambooth train-lora-sdxl` against diffusers' `train_dreambooth_lora_sdxl.py` itself, on the tiny SDXL.

    git -C <diffusers checkout> show HEAD:examples/dreambooth/train_dreambooth_lora_sdxl.py \\
        > benchmarks/.upstream/train_dreambooth_lora_sdxl.py      # git-ignored; any copy of the script
    python benchmarks/sdxl_script.py [--short 10] [--long 160] [--repeats 3]

Both get the same flags (resolution 32, batch 1, no checkpoints within the run, TensorBoard) and one intra-op
thread, each run in its own process. The measure is the same for both: the wall time of a long run minus that
of a short one, so start-up, model loading and the final save cancel out; runs are interleaved (ours short,
script short, ours long, script long, per repeat) and the median rate is printed, with the peak RSS of the long
runs; the same rate from CPU seconds (user + system) is printed beside it, since on a shared machine wall
time moves with the neighbours' load. The script runs with this venv's libraries and torchvision stand-ins (benchmarks/script_shim: PyPI's
torchvision wheel does not load its ops beside the CPU torch). Prints one line per implementation and the
ratio: ``sdxl impl=ours steps_per_s=X peak_rss_mb=Y``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOG = REPO / "examples" / "data" / "dog"
DEFAULT_SCRIPT = REPO / "benchmarks" / ".upstream" / "train_dreambooth_lora_sdxl.py"
RUNNER = REPO / "benchmarks" / "script_shim" / "run_script.py"
# Runs a command and reports its wall time and peak RSS (this intermediate process has only that child).
MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.monotonic(); rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
    "dt = time.monotonic() - t\n"
    "if rc.returncode: sys.stderr.write(rc.stderr.decode()[-3000:]); sys.exit(rc.returncode)\n"
    "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(json.dumps({'seconds': dt, 'cpu': u.ru_utime + u.ru_stime, 'rss_kb': u.ru_maxrss}))\n"
)


def flags(model: Path, out: Path, steps: int, resolution: int) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(DOG),
        "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--resolution", str(resolution),
        "--train_batch_size", "1", "--max_train_steps", str(steps), "--checkpointing_steps", "1000000",
        "--seed", "0", "--report_to", "tensorboard",
    ]  # fmt: skip


def measure(impl: str, script: Path, model: Path, steps: int, resolution: int, tmp: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"{impl}-{steps}-", dir=tmp))
    if impl == "ours":
        cmd = [sys.executable, "-m", "dreambooth_trainer", "train-lora-sdxl"]
    else:
        cmd = [sys.executable, str(RUNNER), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PROGRESS_PORT": "off", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, *cmd, *flags(model, out, steps, resolution)],
        capture_output=True, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"{impl} ({steps} steps) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(name: str, run: Callable[[str, int], dict], short: int, long: int, repeats: int, setting: str) -> None:
    """Interleaved short and long runs of ours and the script; the rate is (long - short) steps over the time
    difference, so start-up and saving cancel out. Prints the medians and the ratios (flux_script.py too)."""
    rates: dict[str, list[float]] = {"ours": [], "script": []}
    cpu_rates: dict[str, list[float]] = {"ours": [], "script": []}
    rss: dict[str, int] = {"ours": 0, "script": 0}
    for repeat in range(repeats):
        times: dict[tuple[str, int], float] = {}
        cpu: dict[tuple[str, int], float] = {}
        for steps in (short, long):
            for impl in ("ours", "script"):
                m = run(impl, steps)
                times[(impl, steps)], cpu[(impl, steps)] = m["seconds"], m["cpu"]
                if steps == long:
                    rss[impl] = max(rss[impl], m["rss_kb"])
        for impl in rates:
            rates[impl].append((long - short) / (times[(impl, long)] - times[(impl, short)]))
            cpu_rates[impl].append((long - short) / (cpu[(impl, long)] - cpu[(impl, short)]))
            print(
                f"#repeat {repeat} impl={impl} steps_per_s={rates[impl][-1]:.2f} "
                f"steps_per_cpu_s={cpu_rates[impl][-1]:.2f}",
                file=sys.stderr, flush=True,
            )  # fmt: skip
    med = {impl: statistics.median(r) for impl, r in rates.items()}
    med_cpu = {impl: statistics.median(r) for impl, r in cpu_rates.items()}
    for impl in ("ours", "script"):
        print(
            f"{name} impl={impl} steps_per_s={med[impl]:.2f} steps_per_cpu_s={med_cpu[impl]:.2f} "
            f"peak_rss_mb={rss[impl] / 1024:.0f}"
        )
    print(
        f"{name} ours/script speed={med['ours'] / med['script']:.2f}x "
        f"cpu_speed={med_cpu['ours'] / med_cpu['script']:.2f}x rss={rss['ours'] / rss['script']:.2f}x "
        f"({setting}, {long}-{short} steps, {repeats} repeats)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--script", type=Path, default=DEFAULT_SCRIPT)
    parser.add_argument("--model", type=Path, default=None, help="an SDXL pipeline folder (default: the tiny SDXL)")
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args(argv)
    if not args.script.is_file():
        raise SystemExit(f"{args.script} is missing: fetch train_dreambooth_lora_sdxl.py there (see the docstring)")
    if args.model is None:
        from dreambooth_trainer.tiny import ensure_tiny_model

        args.model = ensure_tiny_model(family="sdxl")
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-") as tmp:
        compare(
            "sdxl", lambda impl, steps: measure(impl, args.script, args.model, steps, args.resolution, Path(tmp)),
            args.short, args.long, args.repeats, f"resolution {args.resolution}, batch 1",
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
