"""Issue 17's defects found by the adversarial review, each as the run a user would make (trainer on the tiny model)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tests.preemption_utils import LaunchedRun, training
from tests.trainer_utils import run_dreambooth, tiny_args

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------------- item 4: a diverged run is never a success
@pytest.mark.parametrize(("command", "steps"), [("train", 6), ("train-lora", 1)])
def test_infinite_learning_rate_exits_64_and_publishes_nothing_non_finite(
    command: str, steps: int, tmp_path: Path
) -> None:
    """lr=inf: the weights are inf/NaN after step 1, the loss of step 2 is NaN. The full run stops on the loss; the
    one-step LoRA run has a finite loss throughout and is caught by the weight check before the final save."""
    out = tmp_path / "out"
    proc = run_dreambooth(
        [command, *tiny_args(out, steps=steps, ckpt=1, extra=["--learning_rate", "inf"])], check=False
    )
    assert proc.returncode == 64, proc.stderr[-3000:]
    assert "diverged" in proc.stderr and "--learning_rate" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (out / "model_index.json").exists() and not (out / "pytorch_lora_weights.safetensors").exists()
    # Every checkpoint that exists holds finite weights only.
    for manifest in out.glob("checkpoint-*/manifest.json"):
        for f in manifest.parent.glob("training/*.safetensors"):
            for name, t in load_file(f).items():
                assert bool(t.isfinite().all()), f"{f}:{name} is not finite"


def test_diverged_run_reports_non_finite_loss_to_the_operator(tmp_path: Path) -> None:
    """Through the launcher: exit 64, termination reason NonFiniteLoss naming the step and the setting."""
    run = LaunchedRun(tmp_path, "full", training(str(tmp_path / "out"), steps=6, ckpt=100, learningRate=math.inf))
    assert run.run() == 64, run.log()
    term = run.termination()
    assert term["reason"] == "NonFiniteLoss", term
    assert "learningRate" in term["message"] and f"step {term['step']}" in term["message"], term
