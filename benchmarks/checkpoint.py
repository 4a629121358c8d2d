"""Checkpoint cost against S3 (SeaweedFS on 127.0.0.1): how long the training loop is blocked per checkpoint
with the background upload vs a synchronous one, for the tiny model's state and for that state padded to ~1 GB;
then upload/download MiB/s of the Store vs boto3's defaults vs the AWS CLI on the same bytes (s3_transfer.py).

    .venv/bin/python benchmarks/checkpoint.py [--pad-mb 1024] [--checkpoints 3] [--transfer-mb 1024]

The real Trainer (full fine-tune of the tiny model, resolution 32, batch 1, one process, one intra-op thread)
runs its real loop in this process, checkpointing to s3://; a subclass only times what the loop already does:

- stall: wall time from the loop's call to save_checkpoint to its return (snapshot to RAM, plus waiting for
  the previous upload if it were still running, plus starting the upload; for sync, the whole publish);
- publish: the background thread's write + upload + manifest + LATEST time for the same checkpoint;
- step time while an upload is in flight vs not: what the upload costs the loop beyond the stall (GIL, CPU).

The async interval is chosen from the synchronous run (1.5x the publish time, in steps), as the auto interval
does, so no checkpoint waits for the one before. One line per figure. The S3 server shares this machine's
CPUs with the trainer: read the numbers as a comparison, not as what a cluster's object store delivers.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "trainer_image"))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Before torch is imported: default threading on a small shared machine makes step times meaningless.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PROGRESS_PORT"] = "off"

MiB = 1024 * 1024
DOG = ROOT / "examples" / "data" / "dog"


def _measured_trainer_class() -> type:
    from dreambooth_trainer.train import Trainer

    class Measured(Trainer):
        """The Trainer, with timers around what its loop does at each step and checkpoint."""

        synchronous = False

        def setup(self) -> None:
            super().setup()
            self.checkpoints: list[dict[str, Any]] = []
            self.steps: list[tuple[float, bool]] = []  # (step wall time minus any stall, upload in flight)
            self._last_mark: float | None = None
            self._stall_since_mark = 0.0

        def _uploading(self) -> bool:
            thread = self.publisher._thread
            return thread is not None and thread.is_alive()

        def _checkpoint_due(self, step: int) -> bool:
            now = time.perf_counter()
            if self._last_mark is not None:
                self.steps.append((now - self._last_mark - self._stall_since_mark, self._uploading()))
            self._last_mark, self._stall_since_mark = now, 0.0
            return super()._checkpoint_due(step)

        def snapshot(self) -> Any:
            t0 = time.perf_counter()
            snap = super().snapshot()
            self._snapshot_s = time.perf_counter() - t0
            return snap

        def save_checkpoint(self, *, background: bool) -> None:
            in_flight = self._uploading()
            t0 = time.perf_counter()
            super().save_checkpoint(background=background and not self.synchronous)
            stall = time.perf_counter() - t0
            self._stall_since_mark += stall
            self.checkpoints.append(
                {"step": self.state.global_step, "stall": stall, "snapshot": self._snapshot_s, "waited": in_flight}
            )
            if self.synchronous:  # published inside the call, before this record existed for _on_published
                self.checkpoints[-1]["publish"] = self.publisher.last_cost_seconds

        def _on_published(self, info: dict[str, Any]) -> None:
            super()._on_published(info)
            for c in self.checkpoints:
                if c["step"] == info["step"]:
                    c["publish"] = self.publisher.last_cost_seconds

    return Measured


def _run(bucket: str, label: str, *, synchronous: bool, every: int, n: int, pad_mb: int) -> Any:
    from dreambooth_api.config import FullConfig
    from dreambooth_trainer.cli_args import parse_cli
    from dreambooth_trainer.train import RunEnv

    os.environ["DREAMBOOTH_TEST_PAD_STATE_MB"] = str(pad_mb)
    out = f"s3://{bucket}/{label}-{'sync' if synchronous else 'async'}-{uuid.uuid4().hex[:6]}"
    argv = [
        "--pretrained_model_name_or_path", "tiny://", "--instance_data_dir", str(DOG),
        "--instance_prompt", "a photo of sks dog", "--output_dir", out, "--resolution", "32",
        "--train_batch_size", "1", "--seed", "7", "--report_to", "none",
        # n checkpoints, and one step more so the end of training is not a checkpoint of its own.
        "--max_train_steps", str(n * every + 1), "--checkpointing_steps", str(every),
    ]  # fmt: skip
    trainer = _measured_trainer_class()(parse_cli(FullConfig, argv, "bench"), RunEnv())
    trainer.synchronous = synchronous
    trainer.setup()
    trainer.fit()
    return trainer


def _state_mb(trainer: Any) -> float:
    import json

    step = trainer.checkpoints[-1]["step"]
    manifest = json.loads(trainer.out.read_bytes(f"checkpoint-{step}/manifest.json"))
    return sum(f["size"] for f in manifest["files"].values()) / MiB


def _report(label: str, sync: Any, asyn: Any) -> None:
    size = _state_mb(sync)
    for mode, t in (("sync", sync), ("async", asyn)):
        for c in t.checkpoints:
            print(
                f"checkpoint state={label} size_mb={size:.1f} mode={mode} step={c['step']} "
                f"stall_ms={c['stall'] * 1e3:.1f} snapshot_ms={c['snapshot'] * 1e3:.1f} "
                f"publish_s={c.get('publish', float('nan')):.2f} waited_for_previous={'yes' if c['waited'] else 'no'}",
                flush=True,
            )
    sync_stall = statistics.median(c["stall"] for c in sync.checkpoints)
    async_stall = statistics.median(c["stall"] for c in asyn.checkpoints)
    idle = [s for s, up in asyn.steps if not up]
    busy = [s for s, up in asyn.steps if up]
    print(
        f"summary state={label} size_mb={size:.1f} sync_stall_s={sync_stall:.3f} async_stall_s={async_stall:.4f} "
        f"async/sync={100 * async_stall / sync_stall:.2f}% (aim < 5%) "
        f"step_ms_no_upload={1e3 * statistics.median(idle):.1f} (n={len(idle)}) "
        + (f"step_ms_upload_in_flight={1e3 * statistics.median(busy):.1f} (n={len(busy)})" if busy else ""),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pad-mb", type=int, default=1024, help="padding of the big state in MiB (default 1024)")
    ap.add_argument("--checkpoints", type=int, default=3, help="checkpoints per run (default 3)")
    ap.add_argument("--transfer-mb", type=int, default=1024, help="s3_transfer.py payload in MiB; 0 skips it")
    ap.add_argument("--transfer-repeat", type=int, default=1, help="s3_transfer.py timed rounds (default 1)")
    args = ap.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from s3server import SeaweedS3

    work = Path(tempfile.mkdtemp(prefix="ckptbench-"))
    try:
        _bench(args, work, SeaweedS3)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _bench(args: argparse.Namespace, work: Path, server_class: type) -> None:
    with server_class(work / "weed") as server:
        os.environ.update(server.env())
        os.environ["DREAMBOOTH_CACHE"] = str(work / "cache")
        os.environ["DREAMBOOTH_SCRATCH"] = str(work / "scratch")
        bucket = server.make_bucket(f"ckpt-{uuid.uuid4().hex[:8]}")
        print(
            f"# SeaweedFS at {server.endpoint}; full fine-tune of the tiny model, {args.checkpoints} checkpoints a run"
        )
        for label, pad in (("tiny", 0), (f"tiny+{args.pad_mb}MiB", args.pad_mb)):
            sync = _run(bucket, label.replace("+", "-"), synchronous=True, every=10, n=args.checkpoints, pad_mb=pad)
            publish = statistics.median(c["stall"] for c in sync.checkpoints)
            step_s = statistics.median(s for s, _ in sync.steps)
            every = max(10, math.ceil(1.5 * publish / step_s))
            asyn = _run(bucket, label.replace("+", "-"), synchronous=False, every=every, n=args.checkpoints, pad_mb=pad)
            _report(label, sync, asyn)
        if args.transfer_mb:
            import s3_transfer

            s3_transfer.main(
                [
                    "--endpoint",
                    server.endpoint,
                    "--size-mb",
                    str(args.transfer_mb),
                    "--repeat",
                    str(args.transfer_repeat),
                ]
            )


if __name__ == "__main__":
    raise SystemExit(main())
