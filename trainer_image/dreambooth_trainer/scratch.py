"""A run's local scratch folder: staging for an s3:// output (final model, checkpoint files, logs, class images).

One folder per run, never shared with another run: ``$DREAMBOOTH_SCRATCH`` (else ``$TMPDIR/dreambooth-scratch``)
``/<sha256(output)[:12]>/<run id>``. A folder keyed only by the output let a second run to the same output on one
machine find the first run's files there, take them for its own and upload none of its model (issue #15). The
run id is rank 0's and shared by every rank, so the ranks of one node share one folder (the resume download is
made once per node). It is removed when the last rank of the node leaves, unless ``DREAMBOOTH_KEEP_SCRATCH`` is
set (for debugging); a killed run leaves its folder behind, and no later run ever reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

KEEP_ENV = "DREAMBOOTH_KEEP_SCRATCH"
_ALIVE = ".alive-rank-"


def base_dir() -> Path:
    return Path(os.environ.get("DREAMBOOTH_SCRATCH") or os.path.join(tempfile.gettempdir(), "dreambooth-scratch"))


def new_run_id() -> str:
    """Unique per run: time first, so a folder listing sorts runs by age."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{secrets.token_hex(4)}"


class Scratch:
    """This rank's view of the run's scratch folder; `release()` when the rank ends."""

    def __init__(self, output_uri: str, run_id: str, rank: int) -> None:
        self.path = base_dir() / hashlib.sha256(output_uri.encode()).hexdigest()[:12] / run_id
        self.path.mkdir(parents=True, exist_ok=True)
        self._alive = self.path / f"{_ALIVE}{rank}"
        self._alive.touch()

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel

    def release(self) -> None:
        """Leave the folder; the last rank on this node removes it."""
        self._alive.unlink(missing_ok=True)
        if os.environ.get(KEEP_ENV):
            return
        if not self.path.is_dir() or any(p.name.startswith(_ALIVE) for p in self.path.iterdir()):
            return
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.path)
