"""Writes and publishes checkpoints in the background: files (streamed from the RAM snapshot), then the manifest (the
commit point), then LATEST."""

from __future__ import annotations

import contextlib
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
from ..storage.s3 import (
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_MULTIPART_CHUNKSIZE,
    PartPool,
    S3Store,
    S3Stream,
    SharedS3Stream,
    abort_upload,
    create_upload,
)
from ..testhooks import hooks
from . import shares
from .foreign import Kind, classify, foreign_refusal, remove_ours
from .layout import (
    DEFAULT_WRITERS,
    FORMAT,
    LATEST,
    MANIFEST,
    NullSink,
    Sink,
    Snapshot,
    approx_size,
    checkpoint_steps,
    read_latest,
    stream_snapshot,
    write_snapshot,
)

logger = logging.getLogger(__name__)


class Publisher:
    """Writes and publishes checkpoints on one background thread; at most one in flight."""

    def __init__(
        self, store: Store, scratch: Path, total_limit: int | None, *, rank: int = 0, world: int = 1, share_id: str = ""
    ) -> None:
        """`rank`/`world`: this process's share index and how many share the upload (shares.participant), not
        necessarily the data-parallel rank and world size."""
        self.store = store
        # Checkpoint shares (shares.py): with more nodes (or ranks) and an s3:// output each uploads its parts;
        # the others' publishers upload their share and report to share 0's (global rank 0), which publishes.
        self.rank, self.world, self.share_id = rank, world, share_id
        self.shared = isinstance(store, S3Store) and world > 1
        self.share_timeout = shares.timeout_seconds()
        self._started, self._stop_at = 0.0, None
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

    def submit(self, snap: Snapshot, *, background: bool = True, deadline: float | None = None) -> None:
        """Publish `snap` (on rank > 0 with shares: upload this rank's share). `deadline` (time.monotonic()):
        the emergency's stop deadline, past which no rank waits for another's share."""
        self.wait()
        if background:
            self._thread = threading.Thread(target=self._run, args=(snap,), name=f"publish-{snap.name}", daemon=True)
            self._thread.start()
        else:
            self._publish(snap, emergency=True, deadline=deadline)

    def _run(self, snap: Snapshot) -> None:
        try:
            self._publish(snap)
        except BaseException as exc:  # surfaced on the training thread by wait()
            logger.error("publishing %s failed: %s", snap.name, exc)
            self._error = exc

    def _publish(self, snap: Snapshot, emergency: bool = False, deadline: float | None = None) -> None:
        t0 = time.monotonic()
        name = snap.name
        # Shares wait for each other until the emergency's stop deadline, or a generous timeout.
        self._started, self._stop_at = t0, deadline  # type: ignore[assignment]
        if self.rank != 0:
            if self.shared:
                self._upload_share(snap)
            return
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
            before = (lambda _: self.hooks.kill_now()) if kill_at == "before-complete" else None
            return write_snapshot(snap, root / name, writers=self.writers, before_commit=before)
        if isinstance(self.store, S3Store) and self.shared and self._shared_files(snap):
            try:
                return self._write_shared(snap, name, kill_at)
            except shares.ShareError as exc:
                logger.error(
                    "checkpoint %s: the ranks' shares failed (%s); rank 0 uploads the whole checkpoint itself",
                    name,
                    exc,
                )
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
                    before_commit=(lambda _: self.hooks.kill_now()) if kill_at == "before-complete" else None,
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

    def _pool(self, kill_at: str) -> PartPool:
        pool = PartPool(self.part_size, self.part_concurrency)
        if kill_at == "mid-parts":
            pool.on_part = lambda n: self.hooks.kill_now() if n >= 2 else None
        return pool

    def _shared_files(self, snap: Snapshot) -> list[str]:
        sizes = {rel: approx_size(snap, rel) for rel in [*snap.tensors, *snap.objects]}
        return shares.shared_files(sizes, self.part_size)

    def _write_shared(self, snap: Snapshot, name: str, kill_at: str) -> dict[str, dict[str, Any]]:
        """Rank 0 of a shared checkpoint: start one multipart upload per large file, upload rank 0's parts and
        the small files, wait for every other rank's report, check that its bytes are rank 0's, complete.
        ShareError (the uploads aborted) when the shares cannot make the checkpoint."""
        store = self.store
        assert isinstance(store, S3Store)
        shared = self._shared_files(snap)
        uploads: dict[str, str] = {}
        streams: dict[str, SharedS3Stream] = {}
        started = False
        docs = shares.folder(name)
        pool = self._pool(kill_at)

        def open_sink(rel: str) -> Sink:
            if rel in uploads:
                streams[rel] = SharedS3Stream(store, f"{name}/{rel}", pool, uploads[rel], 0, self.world)
                return streams[rel]
            return S3Stream(store, f"{name}/{rel}", pool)

        def before_commit(table: dict[str, dict[str, Any]]) -> None:
            mine = {rel: {**table[rel], "parts": streams[rel].etags} for rel in shared}
            # The others started with rank 0: give them at least as long again as rank 0 took (slow is not dead).
            now = time.monotonic()
            wait_until = self._stop_at or max(self._started + self.share_timeout, 2 * now - self._started)
            reports = shares.wait_for_reports(store, name, self.share_id, self.world, wait_until)
            merged = shares.merge_reports(mine, reports, self.world, self.part_size)
            for rel, etags in merged.items():
                streams[rel].add_parts(etags)
            alone = sum(meta["size"] for rel, meta in table.items() if rel not in uploads)
            per = shares.per_rank({rel: table[rel]["size"] for rel in shared}, self.part_size, self.world, alone)
            logger.info("%s", shares.summary(name, per))
            if kill_at == "before-complete":
                self.hooks.kill_now()

        try:
            for rel in shared:
                uploads[rel] = create_upload(store, f"{name}/{rel}")
            shares.write_doc(store, f"{docs}/{shares.UPLOADS}",
                             {"id": self.share_id, "partSize": self.part_size, "uploads": uploads})  # fmt: skip
            started = True
            files = stream_snapshot(snap, open_sink, writers=self.writers, before_commit=before_commit)
        except BaseException as exc:
            # Never leave a multipart upload open: the committed ones are gone already (NoSuchUpload is fine).
            # After a share's failure S3 works, so the aborts are retried; after S3's own, one try each (the
            # next start's sweep and the lifecycle rule catch the rest) rather than a retry deadline per file.
            for rel, upload_id in uploads.items():
                with contextlib.suppress(Exception):
                    if isinstance(exc, shares.ShareError):
                        abort_upload(store, f"{name}/{rel}", upload_id)
                    else:
                        store.client.abort_multipart_upload(
                            Bucket=store.bucket, Key=store._full(f"{name}/{rel}"), UploadId=upload_id
                        )
            if not started:  # the other ranks stop waiting for uploads that will not come
                with contextlib.suppress(Exception):
                    shares.write_doc(store, f"{docs}/{shares.UPLOADS}", {"id": self.share_id, "abandoned": True})
            raise  # a ShareError falls back to rank 0 alone; a storage error of rank 0's own fails as it always did
        finally:
            pool.close()
        # A late report may land after this: the run's end and the next start sweep .shares/ too.
        with contextlib.suppress(Exception):
            store.delete_prefix(docs)
        return files

    def _upload_share(self, snap: Snapshot) -> None:
        """Rank > 0 of a shared checkpoint: serialise and hash every large file as rank 0 does, upload this rank's
        parts into rank 0's uploads, report. Never raises: a failed share is reported (or not) and rank 0 falls
        back to uploading everything, so a storage error here never stops training."""
        store = self.store
        assert isinstance(store, S3Store)
        name = snap.name
        shared = self._shared_files(snap)
        if not shared:
            return
        report_key = f"{shares.folder(name)}/rank-{self.rank}.json"
        streams: dict[str, SharedS3Stream] = {}
        pool = PartPool(self.part_size, self.part_concurrency)
        t0 = time.monotonic()
        try:
            doc = shares.wait_for_uploads(store, name, self.share_id, self._stop_at or t0 + self.share_timeout)
            if doc is None:
                logger.warning("checkpoint %s: rank 0 uploads it alone; rank %d's share is not needed", name, self.rank)
                return
            if doc.get("partSize") != self.part_size or sorted(doc.get("uploads", {})) != shared:
                raise shares.ShareError(f"rank 0 shares {sorted(doc.get('uploads', {}))}, this rank {shared}")
            ours = Snapshot(state=snap.state, tensors={k: v for k, v in snap.tensors.items() if k in shared},
                            objects={k: v for k, v in snap.objects.items() if k in shared})  # fmt: skip

            def open_sink(rel: str) -> Sink:
                if rel not in shared:
                    return NullSink()
                streams[rel] = SharedS3Stream(store, f"{name}/{rel}", pool, doc["uploads"][rel], self.rank, self.world)
                return streams[rel]

            table = stream_snapshot(ours, open_sink, writers=self.writers)
            report = {
                "id": self.share_id,
                "rank": self.rank,
                "files": {rel: {**table[rel], "parts": {str(n): e for n, e in streams[rel].etags.items()}} for rel in shared},
            }  # fmt: skip
            sent = sum(s.bytes_sent for s in streams.values())
            report = self.hooks.share_report(report)
            if report is not None:
                shares.write_doc(store, report_key, report)
            logger.info(
                "checkpoint %s: rank %d uploaded its share, %d parts (%.1f MiB) in %.1fs",
                name, self.rank, sum(len(s.etags) for s in streams.values()), sent / 2**20, time.monotonic() - t0,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - reported to rank 0, which falls back
            logger.error("checkpoint %s: rank %d's share failed (%s); rank 0 uploads it alone", name, self.rank, exc)
            with contextlib.suppress(Exception):
                shares.write_doc(store, report_key, {"id": self.share_id, "rank": self.rank, "error": str(exc)[:500]})
        finally:
            pool.close()

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
