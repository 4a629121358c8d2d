"""A local checkpoint file holds exactly the bytes written, in any chunking, with or without O_DIRECT."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from dreambooth_trainer.checkpoint.layout import LocalSink

MiB = 1 << 20
SIZES = [0, 1, 4095, 4096, 4097, 16 * MiB - 1, 16 * MiB, 16 * MiB + 4097, 40 * MiB + 3, 80 * MiB + 5]


def _chunks(total: int, rng: random.Random) -> list[bytes]:
    """Writes as the writers make them: a small header, tensors of any size, and empty ones."""
    out, left = [], total
    while left:
        n = min(left, rng.choice([0, 8, 100, 4096, 5000, MiB + 7, 20 * MiB]))
        out.append(rng.randbytes(n))
        left -= n
    return out


def _folders(tmp_path: Path) -> list[Path]:
    # /dev/shm is tmpfs: a second file system, which took O_DIRECT only from Linux 6.6 on.
    shm = Path("/dev/shm")
    return [tmp_path] + ([shm] if shm.is_dir() and os.access(shm, os.W_OK) else [])


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("size", SIZES)
def test_the_file_holds_every_byte_written(tmp_path: Path, size: int, direct: bool) -> None:
    rng = random.Random(size)
    chunks = _chunks(size, rng)
    for folder in _folders(tmp_path):
        path = folder / f"sink-test-{os.getpid()}-{size}-{direct}" / "f.safetensors"
        try:
            sink = LocalSink(path, direct=direct)
            for chunk in chunks:
                assert sink.write(memoryview(chunk)) == len(chunk)
            sink.finish()
            assert path.read_bytes() == b"".join(chunks), f"{folder}: {size} bytes, direct={direct}"
        finally:
            path.unlink(missing_ok=True)
            path.parent.rmdir()


def test_abort_closes_the_file_and_leaves_no_descriptor(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    sink = LocalSink(tmp_path / "f", direct=True)
    sink.write(b"x" * (16 * MiB + 1))
    sink.abort()
    assert len(os.listdir("/proc/self/fd")) == before
    # Whatever landed is not a checkpoint file without a manifest; its size is never more than written.
    assert (tmp_path / "f").stat().st_size <= 16 * MiB + 1
