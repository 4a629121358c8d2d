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
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sdxl_script import DOG, MEASURE, REPO, RUNNER, compare  # noqa: E402 - the sibling benchmark's measuring helper

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
    with tempfile.TemporaryDirectory(prefix="flux-bench-") as tmp:
        compare(
            "flux", lambda impl, steps: measure(impl, args.script, args.model, steps, args, Path(tmp)),
            args.short, args.long, args.repeats,
            f"resolution {args.resolution}, batch 1, T5 {args.max_sequence_length} tokens",
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
