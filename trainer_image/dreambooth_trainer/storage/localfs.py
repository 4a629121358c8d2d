"""Local files: the download cache, file locks, atomic writes, hashing."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import StorageError
from .uri import parse_uri

MiB = 1024 * 1024
# Temp files live next to their final name (same filesystem, so os.replace is atomic) and are hidden from list().
_TMP_PREFIX = ".dbtmp-"


def cache_base() -> Path:
    env = os.environ.get("DREAMBOOTH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dreambooth-operator" / "s3"


def local_cache_for(uri: str) -> Path:
    """Deterministic local cache folder for a store URI: readable tail plus a hash of the normalised URI, so
    `s3://b/x` and `s3://b/x/` share a cache and different URIs never collide."""
    norm = parse_uri(uri).uri
    digest = hashlib.sha256(norm.encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", norm.split("://", 1)[1]).strip("._")[-60:].strip("._") or "root"
    return cache_base() / f"{slug}-{digest}"


def _sync_state_path(local_dir: Path) -> Path:
    # The record lives outside local_dir so that dataset loaders listing the folder never see it.
    digest = hashlib.sha256(str(local_dir.resolve()).encode()).hexdigest()[:24]
    return cache_base() / ".sync-state" / f"{digest}.json"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # flock is per open file description, so it serialises both threads and processes (8 ranks of one pod
    # syncing the same model into the same cache).
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write_local(dest: Path, write: Callable[[Any], None]) -> None:
    """Write through a temp file in dest's folder, fsync it, then os.replace: readers see old or new, never half."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f"{_TMP_PREFIX}{dest.name}.{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(dest.parent)


def _local_files(root: Path) -> list[tuple[str, Path]]:
    """(relative key, path) of every regular file under root, temp files skipped, sorted by key."""
    out: list[tuple[str, Path]] = []
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        base = Path(dirpath)
        for name in filenames:
            if name.startswith(_TMP_PREFIX):
                continue
            path = base / name
            if path.is_file():
                out.append((path.relative_to(root).as_posix(), path))
    out.sort()
    return out


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise StorageError(f"{name}={raw!r} is not a number of seconds") from exc


def _load_sync_record(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
        files = data.get("files", {})
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError):
        return {}


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 * MiB), b""):
            sha.update(chunk)
    return sha.hexdigest()


SHA256_METADATA = "sha256"  # x-amz-meta-sha256 on verified uploads: a multipart ETag is not a content hash
