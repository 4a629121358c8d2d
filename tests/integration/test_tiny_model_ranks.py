"""A tiny model made on a non-zero rank (the second pod of a gang) is complete and the same bytes as rank 0's."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
from tests.trainer_utils import REPO, trainer_env

pytestmark = pytest.mark.integration

SCRIPT = """
import sys
from pathlib import Path
import torch.distributed as dist
dist.init_process_group("gloo")
from dreambooth_trainer.tiny import make_tiny_model
make_tiny_model(Path(sys.argv[1]) / f"rank-{dist.get_rank()}")
dist.barrier()
"""


def test_rank_1_writes_every_weight_file(tmp_path: Path) -> None:
    script = tmp_path / "make.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=trainer_env(), cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = tmp_path / "rank-0", tmp_path / "rank-1"
    files = sorted(p.relative_to(rank0) for p in rank0.rglob("*") if p.is_file())
    assert Path("text_encoder/model.safetensors") in files
    assert sorted(p.relative_to(rank1) for p in rank1.rglob("*") if p.is_file()) == files
    assert all(filecmp.cmp(rank0 / f, rank1 / f, shallow=False) for f in files)
