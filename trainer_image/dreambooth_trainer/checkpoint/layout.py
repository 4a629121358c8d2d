"""Checkpoint format 3 (docs/design.md): the layout, the manifest, the state, and the writer of a snapshot's files.

Format 2 differs from 1 only for full fine-tunes: `<part>/` holds the part's weights in diffusers' layout (what
`from_pretrained` loads) instead of `training/<part>.safetensors`. Format 3 differs from 2 only for LoRA: the
adapters are held once, in `pytorch_lora_weights.safetensors`, no longer also in `training/<part>.safetensors`.
The reader takes every format (train.Trainer._restore).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import mmap
import os
import re
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import torch
from safetensors.torch import save as st_save

from ..storage import NotFoundError, Store

MANIFEST = "manifest.json"
LATEST = "LATEST"
OWNER = ".owner"
FORMAT = 3
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(Exception):
    """A checkpoint is missing a file, has a wrong size or hash, or does not fit this run."""


@dataclass
class TrainState:
    """Where training is: enough, with the tensors, to continue bit-identically."""

    global_step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of `epoch` already consumed (per rank)
    samples_in_epoch: int = 0  # samples of `epoch` consumed by all ranks together (for a world-size change)
    run_seed: int = 0
    world_size: int = 1
    config_hash: str = ""
    method: str = ""
    job_uid: str = ""


@dataclass
class Snapshot:
    """CPU copies of the state at a step boundary: training may go on while this is written."""

    state: TrainState
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # file -> safetensors dict
    objects: dict[str, Any] = field(default_factory=dict)  # file -> torch.save-able object
    texts: dict[str, str] = field(default_factory=dict)  # file -> text (configs, model cards)

    @property
    def name(self) -> str:
        return f"checkpoint-{self.state.global_step}"


def cpu_clone(obj: Any, reuse: dict[str, torch.Tensor] | None = None, key: str = "") -> Any:
    """Deep-copy tensors to CPU so the optimizer can keep stepping while the copy is written.

    With `reuse` (Publisher.staging) each tensor goes into the buffer the previous snapshot used under the same
    key: a fresh allocation pays a page fault per page on first touch (1 GiB here: ~2.7 s fresh, ~0.75 s into an
    existing buffer), and on GPU pinned host memory costs far more to allocate than to fill. The caller must
    have waited for the previous publish (Publisher.wait): its files are written from those buffers.
    """
    if isinstance(obj, torch.Tensor):
        src = obj.detach()
        if reuse is None:
            return src.to("cpu", copy=True)
        buf = reuse.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = reuse[key] = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
        return buf.copy_(src)
    if isinstance(obj, dict):
        return {k: cpu_clone(v, reuse, f"{key}/{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(cpu_clone(v, reuse, f"{key}/{i}") for i, v in enumerate(obj))
    return obj


_PARALLEL_HASH_BYTES = 8 << 20
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def write_safetensors(tensors: dict[str, torch.Tensor], f: io.RawIOBase) -> None:
    """The safetensors format, streamed from the tensors' own memory.

    safetensors' `save` first builds the whole file as one bytes object: a copy of the state, and a pass over
    it, that an emergency checkpoint cannot afford. Same layout rules (8-byte little-endian header length, JSON
    header padded with spaces to 8 bytes, then the raw data at the header's offsets); safetensors loads it.
    """
    if any(t.dtype not in _SAFETENSORS_DTYPES or t.device.type != "cpu" for t in tensors.values()):
        f.write(st_save(tensors, metadata={"format": "pt"}))
        return
    items = sorted(tensors.items())
    header: dict[str, Any] = {}
    offset = 0
    for name, t in items:
        end = offset + t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    # transformers' from_pretrained refuses a safetensors file without this (a checkpoint's text_encoder/ loads).
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)) + raw)
    for _, t in items:
        if t.numel():
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)


class Sink(Protocol):
    """Where one checkpoint file's bytes go: a local file, or an S3 multipart upload (storage.s3.S3Stream).

    `finish` = every byte is with the destination but the file need not be visible yet; `commit` makes it
    visible (S3: CompleteMultipartUpload; local: nothing, the file is in place and fsync'd); `abort` drops it."""

    def write(self, data: Any) -> int: ...
    def finish(self) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


DIRECT_IO_ENV = "DREAMBOOTH_CHECKPOINT_DIRECT_IO"
_BLOCK = 4096  # O_DIRECT's alignment for buffer, offset and length on every common block device
_BOUNCE = 16 << 20
_DEPTH = 2  # bounce buffers per file: one filled while the other is written


def direct_io_enabled() -> bool:
    """DREAMBOOTH_CHECKPOINT_DIRECT_IO: `1` (the default) writes local checkpoint files with O_DIRECT (LocalSink);
    `0` through the page cache, for a file system that takes O_DIRECT and misbehaves with it."""
    return os.environ.get(DIRECT_IO_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


class LocalSink:
    """A file written in place and fsync'd once, when it is finished.

    With `direct` the bytes go through aligned bounce buffers to the file opened O_DIRECT, straight to the
    device: a buffered write copies every byte into page-cache pages (fresh ones for a new file, and a fresh page's
    first touch is what costs on a VM) and fsync then writes them back. On this project's 2-CPU VM a 1 GiB emergency
    checkpoint went from 3.57 s to 1.30 s with this alone (benchmarks/preemption.py --no-s3, docs/design.md
    "Publishing"). Two buffers take turns: one is filled while the other is on its way to the device (a 1 GiB
    O_DIRECT write from memory: 0.62 s with one, 0.48 s with two). The first full buffer is written alone, to learn
    whether the file system takes O_DIRECT; the unaligned tail goes through the page cache; a file system that
    refuses O_DIRECT (EINVAL: some FUSE and network mounts, tmpfs before Linux 6.6) gets everything buffered."""

    def __init__(self, path: Path, *, direct: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._direct = direct and hasattr(os, "O_DIRECT")
        self._f: io.BufferedWriter | None = None
        self._fd = -1
        if self._direct:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        else:
            self._f = open(path, "wb")  # noqa: SIM115 - closed in finish/abort
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        self._pending: list[Future[None] | None] = [None] * _DEPTH
        self._io: ThreadPoolExecutor | None = None
        self._k = 0  # the buffer being filled
        self._fill = 0
        self._offset = 0  # where that buffer's bytes go in the file
        self._o_direct = False  # O_DIRECT is set on the descriptor now (so a direct write went through)

    def write(self, data: Any) -> int:
        if self._f is not None:
            return self._f.write(data)
        mv = memoryview(data).cast("B")
        done = 0
        while done < mv.nbytes:
            view = self._buffer(self._k)
            n = min(_BOUNCE - self._fill, mv.nbytes - done)
            view[self._fill : self._fill + n] = mv[done : done + n]
            self._fill += n
            done += n
            if self._fill == _BOUNCE:
                self._send_full()
        return done

    def _buffer(self, k: int) -> memoryview:
        while len(self._views) <= k:
            self._maps.append(mmap.mmap(-1, _BOUNCE))  # page-aligned; pages never touched cost nothing
            self._views.append(memoryview(self._maps[-1]))
        return self._views[k]

    def _send_full(self) -> None:
        view = self._views[self._k]
        if not self._o_direct:
            # The first full buffer (it learns whether the file system takes O_DIRECT), or buffered from then on.
            self._write_out(view, 0, _BOUNCE, self._offset, direct=True)
        else:
            if self._io is None:
                self._io = ThreadPoolExecutor(max_workers=_DEPTH, thread_name_prefix="checkpoint-io")
            self._pending[self._k] = self._io.submit(self._write_direct, view, self._offset)
            self._k = (self._k + 1) % _DEPTH
            self._wait(self._k)  # that buffer's earlier write must land before it is filled again
        self._offset += _BOUNCE
        self._fill = 0

    def _write_direct(self, view: memoryview, offset: int) -> None:
        # O_DIRECT is known to work here: no flag changes from these threads, whose writes may overlap in time.
        pos = 0
        while pos < _BOUNCE:
            pos += os.pwrite(self._fd, view[pos:], offset + pos)

    def _wait(self, k: int) -> None:
        fut, self._pending[k] = self._pending[k], None
        if fut is not None:
            fut.result()

    def _drain(self) -> None:
        for k in range(_DEPTH):
            self._wait(k)

    def _set_direct(self, on: bool) -> None:
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, (flags | os.O_DIRECT) if on else (flags & ~os.O_DIRECT))
        self._o_direct = on

    def _write_out(self, view: memoryview, start: int, end: int, offset: int, *, direct: bool) -> None:
        """view[start:end] to the file at `offset`, on this thread, with O_DIRECT when `direct` and it works."""
        if direct and self._direct and not self._o_direct:
            try:
                self._set_direct(True)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct = False
        elif not direct and self._o_direct:
            self._set_direct(False)
        pos = start
        while pos < end:
            try:
                pos += os.pwrite(self._fd, view[pos:end], offset + pos - start)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._o_direct:
                    raise
                self._set_direct(False)  # took the flag, refused the write: buffered from here on
                self._direct = False

    def finish(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            return
        self._drain()
        if self._fill:
            view = self._views[self._k]
            aligned = self._fill - self._fill % _BLOCK
            self._write_out(view, 0, aligned, self._offset, direct=True)
            self._write_out(view, aligned, self._fill, self._offset + aligned, direct=False)
            self._fill = 0
        os.fsync(self._fd)
        self._close()

    def _close(self) -> None:
        # The buffers are unmapped only once no write reads them any more.
        for k in range(_DEPTH):
            with contextlib.suppress(Exception):
                self._wait(k)
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        for view in self._views:
            view.release()
        for m in self._maps:
            m.close()
        self._views, self._maps = [], []
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        # A partial file stays: without a manifest it is not a checkpoint, and the next publish overwrites it.
        if self._f is not None:
            self._f.close()
        self._close()


class NullSink:
    """Bytes hashed and dropped: a file another rank writes (checkpoint shares)."""

    def write(self, data: Any) -> int:
        return memoryview(data).nbytes

    def finish(self) -> None:
        pass

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _HashingSink(io.RawIOBase):
    """Hashes what passes through on its way to a sink: the manifest's sha256 costs no second read."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        mv = memoryview(b).cast("B")
        if mv.nbytes >= _PARALLEL_HASH_BYTES:
            # sha256 releases the GIL: hashing beside the write (or the part copy) makes it free.
            hasher = threading.Thread(target=self.sha.update, args=(mv,), name="checkpoint-sha256")
            hasher.start()
            try:
                self.sink.write(mv)
            finally:
                hasher.join()
        else:
            self.sha.update(mv)
            self.sink.write(mv)
        self.size += mv.nbytes
        return mv.nbytes


DEFAULT_WRITERS = 4


def stream_snapshot(
    snap: Snapshot,
    open_sink: Callable[[str], Sink],
    *,
    writers: int = DEFAULT_WRITERS,
    before_commit: Callable[[dict[str, dict[str, Any]]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Serialise a snapshot's files in parallel, each straight into its sink; return the manifest's file table.
    `before_commit` gets that table once every file is finished and before any is committed.

    The files are opened `training/` first and committed `training/` first: whatever part of an interrupted
    publish is visible is then recognisable as ours (foreign.py). Any failure aborts every sink not yet
    committed (S3: no multipart upload is left behind by a failure this process survives)."""
    jobs: list[tuple[str, Callable[[io.RawIOBase], Any]]] = []
    jobs += [(name, lambda f, t=tensors: write_safetensors(t, f)) for name, tensors in snap.tensors.items()]
    jobs += [(name, lambda f, o=obj: torch.save(o, f)) for name, obj in snap.objects.items()]
    jobs += [(name, lambda f, s=text: f.write(s.encode())) for name, text in snap.texts.items()]
    state = json.dumps(asdict(snap.state), indent=1).encode()
    jobs.append(("trainer_state.json", lambda f: f.write(state)))
    jobs.sort(key=lambda job: not job[0].startswith("training/"))
    sinks: dict[str, _HashingSink] = {}
    committed: set[str] = set()
    try:
        for name, _ in jobs:
            sinks[name] = _HashingSink(open_sink(name))

        def produce(name: str, write: Callable[[io.RawIOBase], Any]) -> None:
            write(sinks[name])
            sinks[name].sink.finish()

        # Largest first, so the longest file starts at once and the small ones fill in beside it.
        order = sorted(jobs, key=lambda job: -approx_size(snap, job[0]))
        with ThreadPoolExecutor(max_workers=max(1, writers), thread_name_prefix="checkpoint-writer") as pool:
            futures = [pool.submit(produce, name, write) for name, write in order]
            errors = [fut.exception() for fut in futures]
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            raise failed
        table = {name: {"size": hs.size, "sha256": hs.sha.hexdigest()} for name, hs in sinks.items()}
        if before_commit is not None:
            before_commit(table)
        for name, _ in jobs:
            sinks[name].sink.commit()
            committed.add(name)
    except BaseException:
        for name, hs in sinks.items():
            if name not in committed:
                with contextlib.suppress(Exception):
                    hs.sink.abort()
        raise
    return table


def approx_size(snap: Snapshot, name: str) -> int:
    if name in snap.tensors:
        return sum(t.numel() * t.element_size() for t in snap.tensors[name].values())
    if name in snap.objects:
        return sum(t.numel() * t.element_size() for t in _tensors_in(snap.objects[name]))
    return 0


def _tensors_in(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors_in(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _tensors_in(v)]
    return []


def write_snapshot(
    snap: Snapshot,
    folder: Path,
    *,
    writers: int = DEFAULT_WRITERS,
    before_commit: Callable[[dict[str, dict[str, Any]]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Serialise a snapshot into a local `folder` (parallel writers, one fsync per file); the file table."""
    folder.mkdir(parents=True, exist_ok=True)
    direct = direct_io_enabled()
    return stream_snapshot(
        snap, lambda rel: LocalSink(folder / rel, direct=direct), writers=writers, before_commit=before_commit
    )


def checkpoint_steps(store: Store) -> list[int]:
    """Steps of complete checkpoints (those with a manifest), newest first."""
    steps = set()
    for info in store.list(""):
        head, _, rest = info.key.partition("/")
        m = _CKPT.match(head)
        if m and rest == MANIFEST:
            steps.add(int(m.group(1)))
    return sorted(steps, reverse=True)


def read_latest(store: Store) -> int | None:
    """The step LATEST names, or None when it is missing or garbage: LATEST is advisory (resume lists manifests)."""
    try:
        m = _CKPT.match(store.read_bytes(LATEST).decode("utf-8", "replace").strip())
    except NotFoundError:
        return None
    return int(m.group(1)) if m else None


def check_manifest(manifest: Any, name: str) -> dict[str, Any]:
    """A parsed manifest whose file table can be trusted to drive verification, else CheckpointError (a damaged
    manifest is a corrupt checkpoint: the run falls back past it instead of crashing on every retry)."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or "trainer_state.json" not in files:
        raise CheckpointError(f"{name}: {MANIFEST} has no file table listing trainer_state.json")
    for rel, meta in files.items():
        parts = PurePosixPath(rel).parts
        if not rel or rel.startswith("/") or "\\" in rel or ".." in parts:
            raise CheckpointError(f"{name}: {MANIFEST} lists a path outside the checkpoint: {rel[:200]!r}")
        size = meta.get("size") if isinstance(meta, dict) else None
        sha = meta.get("sha256") if isinstance(meta, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(sha, str):
            raise CheckpointError(f"{name}: {MANIFEST} entry {rel[:200]!r} lacks a size and sha256")
    return manifest


def parse_state(raw: str, name: str) -> TrainState:
    """trainer_state.json, checked key by key and type by type, else CheckpointError."""
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        state = TrainState(**doc)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{name}: unreadable trainer_state.json ({str(exc)[:200]})") from exc
    for f in fields(TrainState):
        value = getattr(state, f.name)
        want = type(f.default)
        if type(value) is not want or (want is int and value < 0):
            raise CheckpointError(
                f"{name}: trainer_state.json has {f.name}={str(value)[:50]!r}, not a valid {want.__name__}"
            )
    return state
