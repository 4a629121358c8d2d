"""Local checkpoint files: LocalSink's O_DIRECT writes with one or two bounce buffers, against `dd conv=fsync`.

    python benchmarks/local_sink.py [--mb 1024] [--repeats 3] [--dir DIR]

The same random bytes, from memory, into a new file in DIR (default: a temporary folder beside the repository,
i.e. the disk checkpoints go to), made durable (fsync) before the clock stops; interleaved, best of `--repeats`:

- `sink depth=1` / `depth=2`: LocalSink with one bounce buffer (fill, write, fill, ...) or two (one filled while
  the other is written), as a checkpoint writer drives it, 16 MiB at a time;
- the same through the manifest's sha256 (`+sha256`), as stream_snapshot writes every checkpoint file: the hash
  runs on a second thread, so on a machine with few cores the hash and the copy compete for them;
- `dd bs=16M conv=fsync` of the same bytes from tmpfs (the floor benchmarks/preemption.py compares with).

One line per figure and the ratios to dd. Measures the write alone; benchmarks/preemption.py measures a whole
emergency checkpoint (SIGTERM to durable).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "trainer_image"))
sys.path.insert(0, str(REPO / "api"))

from dreambooth_trainer.checkpoint import layout  # noqa: E402

CHUNK = 16 << 20


def sink_writer(depth: int, hashing: bool) -> Callable[[Path, memoryview], None]:
    def write(path: Path, data: memoryview) -> None:
        layout._DEPTH = depth
        sink = layout.LocalSink(path, direct=True)
        out = layout._HashingSink(sink) if hashing else sink
        for pos in range(0, data.nbytes, CHUNK):
            out.write(data[pos : pos + CHUNK])
        sink.finish()

    return write


def dd_writer(source: Path) -> Callable[[Path, memoryview], None]:
    def write(path: Path, _data: memoryview) -> None:
        subprocess.run(["dd", f"if={source}", f"of={path}", "bs=16M", "conv=fsync", "status=none"], check=True)

    return write


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    data = memoryview(bytearray(os.urandom(args.mb << 20)))
    print(f"machine: {os.cpu_count()} CPUs; {args.mb} MiB from memory; best of {args.repeats}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.dir or REPO.parent, prefix="bench-sink-") as tmp, \
            tempfile.NamedTemporaryFile(dir="/dev/shm", prefix="bench-sink-") as source:  # fmt: skip
        source.write(data)
        source.flush()
        writers = {
            "sink depth=1": sink_writer(1, False),
            "sink depth=2": sink_writer(2, False),
            "sink depth=1 +sha256": sink_writer(1, True),
            "sink depth=2 +sha256": sink_writer(2, True),
            "dd bs=16M conv=fsync": dd_writer(Path(source.name)),
        }
        best = dict.fromkeys(writers, float("inf"))
        for _ in range(args.repeats):
            for name, write in writers.items():
                path = Path(tmp) / "f.bin"
                t0 = time.monotonic()
                write(path, data)
                best[name] = min(best[name], time.monotonic() - t0)
                path.unlink()
    floor = best["dd bs=16M conv=fsync"]
    for name, seconds in best.items():
        print(f"{name}: {seconds:.2f} s ({args.mb / seconds:.0f} MiB/s), {seconds / floor:.2f}x dd", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
