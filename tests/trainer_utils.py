"""Helpers for tests that run the real trainer on the tiny model in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
DOG = REPO / "examples" / "data" / "dog"
CLASS_DOG = REPO / "examples" / "data" / "class-dog"


def trainer_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # One intra-op thread per process: default threading on a shared 2-core machine is up to 100x slower.
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def tiny_args(
    output: Path | str, *, steps: int = 8, ckpt: int = 4, batch: int = 2, extra: list[str] | None = None
) -> list[str]:
    return [
        "--pretrained_model_name_or_path", "tiny://",
        "--instance_data_dir", str(DOG),
        "--instance_prompt", "a photo of sks dog",
        "--output_dir", str(output),
        "--resolution", "32",
        "--train_batch_size", str(batch),
        "--max_train_steps", str(steps),
        "--checkpointing_steps", str(ckpt),
        "--seed", "7",
        *(extra or []),
    ]  # fmt: skip


def make_tiny_model(out: Path, family: str, says: str) -> Path:
    """`dreambooth tiny-model OUT --family FAMILY` in a subprocess (as a user runs it); its report names `says`."""
    proc = subprocess.run(
        [sys.executable, "-m", "dreambooth_trainer", "tiny-model", str(out), "--family", family],
        capture_output=True, text=True, env=trainer_env(), cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert says in proc.stdout, proc.stdout
    return out


def family_args(
    model: Path | str, output: Path | str, *, steps: int = 6, ckpt: int = 3, extra: list[str] | None = None
) -> list[str]:
    """A LoRA run of another family's tiny model on the dog images: resolution 32, batch 2, seed 7."""
    return [
        "--pretrained_model_name_or_path", str(model),
        "--instance_data_dir", str(DOG),
        "--instance_prompt", "a photo of sks dog",
        "--output_dir", str(output),
        "--resolution", "32",
        "--train_batch_size", "2",
        "--max_train_steps", str(steps),
        "--checkpointing_steps", str(ckpt),
        "--seed", "7",
        "--report_to", "none",
        *(extra or []),
    ]  # fmt: skip


def run_dreambooth(
    args: list[str], *, timeout: float = 300, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "dreambooth_trainer", *args],
        capture_output=True, text=True, timeout=timeout, env=env or trainer_env(), cwd=REPO,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"dreambooth {args[0]} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def torchrun_worker(
    method: str, training: dict, nproc: int, tmp: Path, *, timeout: float = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """World size `nproc` on CPU: torchrun with gloo (accelerate launch --cpu would silently run one process)."""
    cfg = tmp / f"config-{nproc}.json"
    cfg.write_text(json.dumps({"method": method, "training": training}))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "dreambooth_trainer", "worker", "--config", str(cfg)],
        capture_output=True, text=True, timeout=timeout, env=trainer_env(), cwd=REPO,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return proc


def weights(output: Path, method: str) -> dict:
    if method == "lora":
        return load_file(output / "pytorch_lora_weights.safetensors")
    return load_file(output / "unet" / "diffusion_pytorch_model.safetensors")


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a if not bool((a[k] == b[k]).all())}
    assert not diffs, f"{len(diffs)} tensors differ, e.g. {list(diffs.items())[:3]}"
