"""The README's first command: `dreambooth run examples/quickstart.yaml` works offline on a fresh checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.trainer_utils import REPO, trainer_env

pytestmark = pytest.mark.integration


def test_quickstart_manifest_runs_and_says_where_things_are(tmp_path: Path) -> None:
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "dreambooth_trainer", "run", "examples/quickstart.yaml"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=trainer_env(),
    )  # fmt: skip
    wall = time.monotonic() - t0
    print(f"quickstart wall time {wall:.1f}s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "runs" / "quickstart"
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert (out / "LATEST").read_text().strip() == "checkpoint-40"
    assert f"done: LoRA weights (pytorch_lora_weights.safetensors) in {out.as_uri()}" in proc.stdout
    assert "the same command resumes from it" in proc.stdout
    assert "step 40/40" in proc.stderr  # the progress line

    # The same command again finds the finished run's checkpoint and does no training twice.
    again = subprocess.run(
        [sys.executable, "-m", "dreambooth_trainer", "run", "examples/quickstart.yaml"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=trainer_env(),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from" in again.stderr and "checkpoint-40" in again.stderr


def test_print_config_shows_the_equivalent_flags() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dreambooth_trainer", "run", "examples/quickstart.yaml", "--print-config"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=trainer_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("dreambooth train-lora --pretrained_model_name_or_path tiny://")
    assert "--instance_prompt 'a photo of sks dog'" in proc.stdout


def test_print_config_masks_the_hub_token(tmp_path: Path) -> None:
    token = "hf_notARealTokenButSecret0123456789"
    manifest = tmp_path / "with-token.yaml"
    text = (REPO / "examples" / "quickstart.yaml").read_text()
    manifest.write_text(text.replace("    instancePrompt:", f"    hubToken: {token}\n    instancePrompt:", 1))
    proc = subprocess.run(
        [sys.executable, "-m", "dreambooth_trainer", "run", str(manifest), "--print-config"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=trainer_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "--hub_token '***'" in proc.stdout or "--hub_token ***" in proc.stdout, proc.stdout
    assert token not in proc.stdout + proc.stderr


def test_bad_manifest_exits_64_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = (REPO / "examples" / "quickstart.yaml").read_text().replace("resolution: 32", "resolution: 30")
    bad.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "dreambooth_trainer", "run", str(bad)],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=trainer_env(),
    )  # fmt: skip
    assert proc.returncode == 64
    assert "--resolution (spec.training.resolution)" in proc.stderr and "use 24 or 32" in proc.stderr
