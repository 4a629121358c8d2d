"""The prepared GPU scripts run end to end on CPU with scaled-down shapes (a GPU lease is too short to find a typo
in them). Extended tier: minutes of CPU for no behaviour the default run lacks."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from trainer_utils import REPO, trainer_env

pytestmark = [pytest.mark.integration, pytest.mark.extended]


def test_gpu_sdxl_prints_a_rate_for_each_mode() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_sdxl.py", "--small", "--resolution", "64", "--mixed-precision", "no",
         "--steps", "3", "--warmup", "1"],
        capture_output=True, text=True, env=trainer_env(), cwd=REPO, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rates = dict(re.findall(r"trainer mode=(\S+) steps_per_s=([\d.]+)", proc.stdout))
    assert set(rates) == {"sdxl-lora", "sdxl-lora-gc"} and all(float(r) > 0 for r in rates.values()), proc.stdout
