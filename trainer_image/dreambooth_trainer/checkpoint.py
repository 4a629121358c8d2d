"""Checkpoints: snapshot the training state, write and publish it in the background, and resume from it.

Layout (see DESIGN.md): ``checkpoint-N/<files>``, then ``checkpoint-N/manifest.json`` (sizes + sha256, written
last: a checkpoint without a manifest does not exist), then ``LATEST``, which only moves forward. The same code
publishes to a local folder and to S3 through one Store; S3 has no rename, so the manifest's single PUT is the
commit point.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from dreambooth_api.config import ConfigError

from .storage import NotFoundError, Store

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LATEST = "LATEST"
OWNER = ".owner"
FORMAT = 1
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


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes what passes through, so the manifest's sha256 costs no second read."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        mv = memoryview(b).cast("B")
        if mv.nbytes >= _PARALLEL_HASH_BYTES:
            # Both release the GIL: hashing beside the write makes the emergency save's longest pass free.
            hasher = threading.Thread(target=self.sha.update, args=(mv,), name="checkpoint-sha256")
            hasher.start()
            try:
                self._f.write(mv)
            finally:
                hasher.join()
        else:
            self.sha.update(mv)
            self._f.write(mv)
        self.size += mv.nbytes
        return mv.nbytes

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        super().close()


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
        f.write(st_save(tensors))
        return
    items = sorted(tensors.items())
    header: dict[str, Any] = {}
    offset = 0
    for name, t in items:
        end = offset + t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)) + raw)
    for _, t in items:
        if t.numel():
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def write_snapshot(snap: Snapshot, folder: Path) -> dict[str, dict[str, Any]]:
    """Serialise a snapshot into `folder`; return the manifest's file table."""
    folder.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict[str, Any]] = {}

    def emit(name: str, write: Callable[[io.RawIOBase], None]) -> None:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        f = _HashingFile(folder / name)
        try:
            write(f)
        finally:
            f.close()
        table[name] = {"size": f.size, "sha256": f.sha.hexdigest()}

    for name, tensors in snap.tensors.items():
        emit(name, lambda f, t=tensors: write_safetensors(t, f))
    for name, obj in snap.objects.items():
        emit(name, lambda f, o=obj: torch.save(o, f))
    for name, text in snap.texts.items():
        emit(name, lambda f, s=text: f.write(s.encode()))
    emit("trainer_state.json", lambda f: f.write(json.dumps(asdict(snap.state), indent=1).encode()))
    return table


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
    try:
        m = _CKPT.match(store.read_bytes(LATEST).decode().strip())
    except NotFoundError:
        return None
    return int(m.group(1)) if m else None


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
        padding_for_tests()  # test-only (DREAMBOOTH_TEST_PAD_STATE_MB): made now, so no checkpoint's timing pays for it

    def _staging(self, name: str) -> Path:
        root = self.store.local_root()
        # A local output folder is its own staging area: the files land in place and only the manifest commits.
        return (root / name) if root is not None else (self.scratch / name)

    def wait(self) -> None:
        """Block until the checkpoint in flight is published; re-raise its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

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
        # An older, incomplete or superseded copy of this step must stop counting before new files land.
        self.store.delete(f"{name}/{MANIFEST}")
        staging = self._staging(name)
        if staging.exists():
            shutil.rmtree(staging)
        files = write_snapshot(snap, staging)
        if self.store.local_root() is None:
            for rel in files:
                self.store.upload_file(staging / rel, f"{name}/{rel}")
        _test_hook_before_manifest(emergency)
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
        if latest is None or latest <= snap.state.global_step:
            self.store.write_bytes(LATEST, f"{name}\n".encode())
        if self.store.local_root() is None:
            shutil.rmtree(staging, ignore_errors=True)
        self.last_cost_seconds = time.monotonic() - t0
        self.last_published = {"step": snap.state.global_step, "uri": self.store.url(name), "time": manifest["time"]}
        logger.info("checkpoint %s published to %s in %.2fs", name, self.store.url(name), self.last_cost_seconds)
        self._apply_total_limit(snap.state.global_step)
        if self.on_published:
            self.on_published(self.last_published)

    def _apply_total_limit(self, newest: int) -> None:
        if not self.total_limit:
            return
        complete = checkpoint_steps(self.store)
        # Only checkpoints older than the one just made complete are candidates, so a crash never leaves fewer.
        older = [s for s in complete if s < newest]
        for step in older[max(0, self.total_limit - 1) :]:
            logger.info("removing checkpoint-%d (checkpoints_total_limit=%d)", step, self.total_limit)
            self.store.delete(f"checkpoint-{step}/{MANIFEST}")
            self.store.delete_prefix(f"checkpoint-{step}/")


@dataclass
class Loaded:
    step: int
    folder: Path
    manifest: dict[str, Any]
    state: TrainState


def verify_and_fetch(store: Store, step: int, cache: Path) -> Loaded:
    """Download (or locate) a checkpoint and check every file against its manifest."""
    name = f"checkpoint-{step}"
    try:
        manifest = json.loads(store.read_bytes(f"{name}/{MANIFEST}"))
    except (NotFoundError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{name}: unreadable manifest ({exc})") from exc
    root = store.local_root()
    folder = (root / name) if root is not None else (cache / name)
    for rel, meta in manifest["files"].items():
        path = folder / rel
        if root is None and not _matches(path, meta):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                store.download_file(f"{name}/{rel}", path)
            except NotFoundError as exc:
                raise CheckpointError(f"{name}: file {rel} is missing") from exc
        if not path.exists():
            raise CheckpointError(f"{name}: file {rel} is missing")
        if not _matches(path, meta):
            raise CheckpointError(f"{name}: file {rel} does not match its manifest (size or sha256 differs)")
    state = TrainState(**json.loads((folder / "trainer_state.json").read_text()))
    return Loaded(step, folder, manifest, state)


def _matches(path: Path, meta: dict[str, Any]) -> bool:
    if not path.exists() or path.stat().st_size != meta["size"]:
        return False
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest() == meta["sha256"]


def choose_resume(store: Store, request: str | None, config_hash: str, cache: Path) -> Loaded | None:
    """Pick the checkpoint to resume from, falling back past corrupt ones, or None to start fresh.

    `request` is resume_from_checkpoint: None (automatic when checkpoints exist), 'latest', or 'checkpoint-N'.
    """
    steps = checkpoint_steps(store)
    if request not in (None, "latest"):
        m = _CKPT.match(Path(str(request)).name)
        if not m:
            raise ConfigError(
                "resume_from_checkpoint", f"{request!r} is not 'latest' or a folder name like 'checkpoint-400'."
            )
        wanted = int(m.group(1))
        if wanted not in steps:
            logger.warning("%s has no complete %s; looking for an older one", store.uri, request)
        steps = [s for s in steps if s <= wanted]
    if not steps:
        if request is not None:
            logger.warning("no complete checkpoint in %s: starting a new training run", store.uri)
        return None
    for step in steps:
        try:
            loaded = verify_and_fetch(store, step, cache)
        except CheckpointError as exc:
            logger.warning("cannot resume from checkpoint-%d: %s; falling back to the previous checkpoint", step, exc)
            continue
        if loaded.state.config_hash != config_hash:
            raise ConfigError(
                "output_dir",
                f"{store.uri} holds checkpoint-{step} of a different training config (hash {loaded.state.config_hash}, "
                f"this run {config_hash}); use a new output_dir, or the same training settings to resume.",
            )
        return loaded
    logger.warning("no intact checkpoint in %s: starting a new training run", store.uri)
    return None


def claim_output(store: Store, job_uid: str) -> None:
    """Refuse an output prefix owned by another job; claim an unowned one."""
    if not job_uid:
        return
    try:
        owner = store.read_bytes(OWNER).decode().strip()
    except NotFoundError:
        store.write_bytes(OWNER, f"{job_uid}\n".encode())
        return
    if owner != job_uid:
        raise ConfigError(
            "output_dir",
            f"{store.uri} belongs to another job (UID {owner}); give this job its own output_dir, or delete "
            f"{store.url(OWNER)} if that job is gone.",
        )


class CheckpointInterval:
    """`checkpointing_steps: auto`: Young/Daly's optimal interval, re-derived as checkpoint costs are measured.

    Daly (2006): with checkpoint cost C and mean time between failures M, the work between checkpoints should be
    T = sqrt(2CM) * (1 + sqrt(C/2M)/3 + C/18M) - C  (T = M once C >= 2M); for C << M this is Young's sqrt(2CM).
    C is a checkpoint's full price: the loop's stall (snapshot copy, waiting for the previous upload) plus the
    background write/upload, because an upload competes for host memory, network and storage even while the
    loop runs on, and a checkpoint protects nothing until it is durable. T is never shorter than an upload
    (checkpoints would queue) and is turned into steps at the measured speed.
    """

    PRIOR_COST_SECONDS = 5.0  # until the first checkpoint is measured
    SMOOTHING = 0.5  # weight of the newest measurement: costs drift (page cache, network), one outlier should not

    def __init__(self, mtbf_seconds: float, start_step: int = 0, log: bool = True) -> None:
        self.mtbf = mtbf_seconds
        self.log = log
        self.last_step = start_step
        self.stall: float | None = None
        self.publish: float | None = None
        self.current: int | None = None

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.SMOOTHING) * old + self.SMOOTHING * new

    def observe_stall(self, seconds: float) -> None:
        self.stall = self._ema(self.stall, seconds)

    def observe_publish(self, seconds: float | None) -> None:
        if seconds is not None:
            self.publish = self._ema(self.publish, seconds)

    @property
    def cost_seconds(self) -> float:
        if self.stall is None and self.publish is None:
            return self.PRIOR_COST_SECONDS
        return (self.stall or 0.0) + (self.publish or 0.0)

    def seconds(self) -> float:
        c, m = self.cost_seconds, self.mtbf
        if c >= 2 * m:
            return m
        x = c / (2 * m)
        t = math.sqrt(2 * c * m) * (1 + math.sqrt(x) / 3 + x / 9) - c
        return max(t, self.publish or 0.0)

    def steps(self, steps_per_second: float | None) -> int | None:
        """The interval in steps, or None while the speed is unknown (the first step of a process)."""
        if not steps_per_second:
            return None
        seconds = self.seconds()
        exact = seconds * steps_per_second
        # Speed jitters every step: the interval moves (and is logged) only when it is off by more than 25%.
        if self.current is not None and abs(exact - self.current) <= 0.25 * self.current:
            return self.current
        steps = max(1, round(exact))
        if self.log:
            logger.info(
                "checkpoint interval (auto): every %d steps (~%.0f s at %.3g steps/s; checkpoint cost %.2f s%s, "
                "expected preemption every %.0f s)",
                steps, seconds, steps_per_second, self.cost_seconds,
                "" if self.stall is not None or self.publish is not None else " assumed until measured", self.mtbf,
            )  # fmt: skip
        self.current = steps
        return steps

    def due(self, step: int, steps_per_second: float | None) -> bool:
        every = self.steps(steps_per_second)
        return every is not None and step - self.last_step >= every

    def saved(self, step: int) -> None:
        self.last_step = step


# ---------------------------------------------------------------------------------------------------------------
# Test-only hooks. They read DREAMBOOTH_TEST_* variables, which nothing in production sets; they let tests and
# benchmarks/preemption.py put real checkpoints into the states a preemption can meet:
#   DREAMBOOTH_TEST_SAVE_DELAY_SECONDS=S   every publish sleeps S s between its files and its manifest (a slow upload)
#   DREAMBOOTH_TEST_SAVE_DELAY_KIND=K      ... only publishes of kind K: "emergency" (on SIGTERM) or "periodic"
#   DREAMBOOTH_TEST_CRASH_IN_EMERGENCY_SAVE=1  the emergency save SIGKILLs its own process before the manifest
#   DREAMBOOTH_TEST_PAD_STATE_MB=N         every snapshot carries N MiB more (random bytes): a bigger model's state
# ---------------------------------------------------------------------------------------------------------------


def _test_hook_before_manifest(emergency: bool) -> None:
    kind = "emergency" if emergency else "periodic"
    delay = float(os.environ.get("DREAMBOOTH_TEST_SAVE_DELAY_SECONDS", "0") or 0)
    if delay > 0 and os.environ.get("DREAMBOOTH_TEST_SAVE_DELAY_KIND", kind) == kind:
        logger.warning("test hook: %s checkpoint waits %.1fs before its manifest", kind, delay)
        time.sleep(delay)
    if emergency and os.environ.get("DREAMBOOTH_TEST_CRASH_IN_EMERGENCY_SAVE") == "1":
        logger.warning("test hook: the process dies in the middle of the emergency checkpoint")
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


_padding: dict[str, torch.Tensor] | None = None


def padding_for_tests() -> dict[str, torch.Tensor] | None:
    """DREAMBOOTH_TEST_PAD_STATE_MB of random bytes, made once per process, for Trainer.snapshot to add."""
    global _padding
    mb = float(os.environ.get("DREAMBOOTH_TEST_PAD_STATE_MB", "0") or 0)
    if mb <= 0:
        return None
    if _padding is None:
        # Random, not zeros: no layer of the storage stack may get a cheaper job than a real state gives it.
        gen = torch.Generator().manual_seed(0)
        _padding = {"padding": torch.randint(0, 256, (int(mb * 2**20),), dtype=torch.uint8, generator=gen)}
    return _padding
