"""Writes and publishes checkpoints in the background: files (streamed from the RAM snapshot), then the manifest (the
commit point), then LATEST."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..storage import Store
from ..storage.s3 import DEFAULT_MAX_CONCURRENCY, DEFAULT_MULTIPART_CHUNKSIZE, PartPool, S3Store, S3Stream
from ..testhooks import hooks
from .foreign import Kind, classify, foreign_refusal, remove_ours
from .layout import (
    DEFAULT_WRITERS,
    FORMAT,
    LATEST,
    MANIFEST,
    LocalSink,
    Snapshot,
    checkpoint_steps,
    read_latest,
    stream_snapshot,
    write_snapshot,
)

logger = logging.getLogger(__name__)


class Publisher:
    """Writes and publishes checkpoints on one background thread; at most one in flight."""

    def __init__(self, store: Store, scratch: Path, total_limit: int | None) -> None:
        self.store = store
        self.scratch = scratch
        self.total_limit = total_limit
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_published: dict[str, Any] | None = None
        self.on_published: Callable[[dict[str, Any]], None] | None = None
        self.last_cost_seconds: float | None = None
        # CPU buffers of the last snapshot, refilled by the next one (cpu_clone): one state's worth of host memory
        # stays allocated between checkpoints, which the peak needed anyway.
        self.staging: dict[str, torch.Tensor] = {}
        # Streaming: `writers` files serialised at once; for S3 up to `part_concurrency` parts of `part_size` on the
        # wire over all files. Host RAM beyond the snapshot is at most (part_concurrency + 2 * writers) * part_size
        # (each writer's part being filled and the one it is handing over), plus files under one part until commit.
        self.writers = DEFAULT_WRITERS
        self.part_size = DEFAULT_MULTIPART_CHUNKSIZE
        self.part_concurrency = DEFAULT_MAX_CONCURRENCY
        self.hooks = hooks()
        self.hooks.state_padding()  # made now, so no checkpoint's timing pays for it

    def wait(self) -> None:
        """Block until the checkpoint in flight is published; re-raise its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def finish_in_flight(self, timeout: float) -> str | None:
        """After a crash: let the checkpoint in flight become durable (up to `timeout` s) instead of dying with the
        process. Returns what happened, for the log, or None when nothing was in flight. Never raises."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return None
        name = thread.name.removeprefix("publish-")
        t0 = time.monotonic()
        thread.join(timeout)
        took = time.monotonic() - t0
        if thread.is_alive():
            return f"{name} was still being written after {took:.0f}s: left incomplete (the previous one stands)"
        self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            return f"{name} failed: {err}"
        return f"{name} published ({took:.1f}s after the failure)"

    def submit(self, snap: Snapshot, *, background: bool = True) -> None:
        self.wait()
        if background:
            self._thread = threading.Thread(target=self._run, args=(snap,), name=f"publish-{snap.name}", daemon=True)
            self._thread.start()
        else:
            self._publish(snap, emergency=True)

    def _run(self, snap: Snapshot) -> None:
        try:
            self._publish(snap)
        except BaseException as exc:  # surfaced on the training thread by wait()
            logger.error("publishing %s failed: %s", snap.name, exc)
            self._error = exc

    def _publish(self, snap: Snapshot, emergency: bool = False) -> None:
        t0 = time.monotonic()
        name = snap.name
        # An older, incomplete or superseded copy of this step must stop counting before new files land; a
        # folder of this name we did not write is never touched (foreign.py).
        if classify(self.store, name) is Kind.FOREIGN:
            raise foreign_refusal(self.store, snap.state.global_step, "this run must write a checkpoint of that name")
        remove_ours(self.store, name)
        files = self._write_files(snap, name, emergency)
        self.hooks.before_manifest(emergency)
        manifest = {
            "format": FORMAT,
            "step": snap.state.global_step,
            "worldSize": snap.state.world_size,
            "configHash": snap.state.config_hash,
            "jobUid": snap.state.job_uid,
            "method": snap.state.method,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
        }
        self.store.write_bytes(f"{name}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        latest = read_latest(self.store)
        # LATEST is advisory: one naming no complete checkpoint (garbage, or one deleted by hand) is repaired here.
        if (
            latest is None
            or latest <= snap.state.global_step
            or not self.store.exists(f"checkpoint-{latest}/{MANIFEST}")
        ):
            self.store.write_bytes(LATEST, f"{name}\n".encode())
        self.last_cost_seconds = time.monotonic() - t0
        self.last_published = {"step": snap.state.global_step, "uri": self.store.url(name), "time": manifest["time"]}
        logger.info("checkpoint %s published to %s in %.2fs", name, self.store.url(name), self.last_cost_seconds)
        self._apply_total_limit(snap.state.global_step)
        if self.on_published:
            self.on_published(self.last_published)

    def _write_files(self, snap: Snapshot, name: str, emergency: bool) -> dict[str, dict[str, Any]]:
        """Every file of the snapshot, straight from its RAM copy to the destination (no local round trip for
        S3): parallel writers, each file's parts in parallel; the manifest's file table."""
        root = self.store.local_root()
        kill_at = self.hooks.kill_in_save if emergency else ""
        if root is not None:
            before = self.hooks.kill_now if kill_at == "before-complete" else None
            return stream_snapshot(snap, lambda rel: LocalSink(root / name / rel), writers=self.writers,
                                   before_commit=before)  # fmt: skip
        if isinstance(self.store, S3Store):
            pool = PartPool(self.part_size, self.part_concurrency)
            if kill_at == "mid-parts":
                pool.on_part = lambda n: self.hooks.kill_now() if n >= 2 else None
            store = self.store
            try:
                return stream_snapshot(
                    snap,
                    lambda rel: S3Stream(store, f"{name}/{rel}", pool),
                    writers=self.writers,
                    before_commit=self.hooks.kill_now if kill_at == "before-complete" else None,
                )
            finally:
                pool.close()
        # Any other store: write to the run's scratch, then upload.
        staging = self.scratch / name
        if staging.exists():
            shutil.rmtree(staging)
        files = write_snapshot(snap, staging, writers=self.writers)
        try:
            for rel in files:
                self.store.upload_file(staging / rel, f"{name}/{rel}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return files

    def _apply_total_limit(self, newest: int) -> None:
        if self.total_limit is None:  # 0 keeps only the newest, as in the scripts
            return
        # Only checkpoints carrying our manifest count; diffusers' own checkpoint-N folders are never removed.
        complete = [s for s in checkpoint_steps(self.store) if classify(self.store, f"checkpoint-{s}") is Kind.OURS]
        # Only checkpoints older than the one just made complete are candidates, so a crash never leaves fewer.
        older = [s for s in complete if s < newest]
        for step in older[max(0, self.total_limit - 1) :]:
            logger.info("removing checkpoint-%d (checkpoints_total_limit=%d)", step, self.total_limit)
            remove_ours(self.store, f"checkpoint-{step}")
