"""Issue #18, item 6: a re-run into an output folder of other settings stays refused, and says which differs."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.trainer_utils import run_dreambooth, tiny_args

pytestmark = pytest.mark.integration


def test_the_refusal_shows_the_setting_that_differs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_dreambooth(["train-lora", *tiny_args(out, steps=2, ckpt=2, batch=1)])
    proc = run_dreambooth(["train-lora", *tiny_args(out, steps=2, ckpt=2, batch=1, extra=["--rank", "8"])], check=False)
    assert proc.returncode == 64, proc.stderr[-3000:]
    assert "--rank (spec.training.rank) is 4 there, 8 here" in proc.stderr
    assert "pick a new output_dir" in proc.stderr
