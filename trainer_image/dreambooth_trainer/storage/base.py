"""The Store interface every reader and writer of the trainer uses, and its object record."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import StorageError
from .localfs import _atomic_write_local, _file_lock, _load_sync_record, _sync_state_path, file_sha256
from .uri import _check_rel, normalize_prefix

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object. `etag` is the server's ETag (S3; multipart ETags are not MD5) or, for local files,
    a size+mtime fingerprint: good for "did it change", not a content hash."""

    key: str
    size: int
    etag: str


# ---------------------------------------------------------------------------------------------------------------
# The interface


class Store(ABC):
    uri: str

    @abstractmethod
    def child(self, rel: str) -> Store: ...

    def url(self, key: str) -> str:
        key = key.strip("/")
        return f"{self.uri}/{key}" if key else self.uri

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    def read_text(self, key: str, encoding: str = "utf-8") -> str:
        return self.read_bytes(key).decode(encoding)

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create `key` only if it does not exist (atomically where the store can); True if this call made it."""
        raise NotImplementedError

    def write_text(self, key: str, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(key, text.encode(encoding))

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...

    @abstractmethod
    def upload_file(self, local: Path, key: str) -> ObjectInfo: ...

    @abstractmethod
    def download_file(self, key: str, local: Path) -> None: ...

    def upload_verified(self, items: list[tuple[Path, str]]) -> None:
        """Upload (local path, key) pairs, then check that each landed with its size and sha256.

        Raises StorageError naming the first file that is missing or differs: a caller says "saved" only after
        this returns."""
        hashes = {key: file_sha256(Path(path)) for path, key in items}
        self._upload_with_sha256(items, hashes)
        for path, key in items:
            size, sha = self._stored_size_and_sha256(key)
            if size is None:
                raise StorageError(f"{self.url(key)} is missing after its upload")
            if size != Path(path).stat().st_size or sha != hashes[key]:
                raise StorageError(
                    f"{self.url(key)} does not match what was uploaded (size {size} vs {Path(path).stat().st_size}, "
                    f"sha256 {sha} vs {hashes[key]})"
                )

    def _upload_with_sha256(self, items: list[tuple[Path, str]], hashes: dict[str, str]) -> None:
        for path, key in items:
            self.upload_file(path, key)

    @abstractmethod
    def _stored_size_and_sha256(self, key: str) -> tuple[int | None, str | None]:
        """The stored object's size and the sha256 it carries (None, None when it does not exist)."""

    @abstractmethod
    def upload_dir(self, local_dir: Path, prefix: str) -> list[ObjectInfo]: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None: ...

    @abstractmethod
    def local_root(self) -> Path | None: ...

    @abstractmethod
    def check_writable(self) -> None: ...

    @abstractmethod
    def _download_many(self, items: list[tuple[str, Path]]) -> None:
        """Download (key, dest) pairs, in parallel where the backend can; each dest replaced atomically."""

    def sync_down(self, prefix: str, local_dir: Path) -> Path:
        """Mirror `prefix` into `local_dir`. Files whose size and ETag match the record of the previous sync are
        not downloaded again; files this sync put there earlier and that are gone from the store are removed.
        Files in local_dir that no sync wrote are left alone. Returns local_dir."""
        base = normalize_prefix(prefix, self.uri)
        local_dir = Path(os.path.abspath(Path(local_dir).expanduser()))
        local_dir.mkdir(parents=True, exist_ok=True)
        state = _sync_state_path(local_dir)
        try:
            state.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot write sync state under {state.parent} for {self.url(base)}: set DREAMBOOTH_CACHE to a "
                f"writable folder ({exc})"
            ) from exc
        with _file_lock(state.with_suffix(".lock")):
            old = _load_sync_record(state)
            record: dict[str, dict[str, Any]] = {}
            todo: list[tuple[str, Path]] = []
            todo_info: dict[str, dict[str, Any]] = {}
            for obj in self.list(base):
                rel = obj.key[len(base) + 1 :] if base else obj.key
                _check_rel(rel, self.url(base))  # a key like "../x" must not write outside local_dir
                dest = local_dir / rel
                entry = {"size": obj.size, "etag": obj.etag, "source": self.url(obj.key)}
                prev = old.get(rel)
                if (
                    prev
                    and prev.get("size") == obj.size
                    and prev.get("etag") == obj.etag
                    and prev.get("source") == entry["source"]
                    and dest.is_file()
                    and dest.stat().st_size == obj.size
                ):
                    record[rel] = entry
                    continue
                todo.append((obj.key, dest))
                todo_info[rel] = entry
            if todo:
                log.info(
                    "sync %s -> %s: %d to download, %d up to date", self.url(base), local_dir, len(todo), len(record)
                )
                self._download_many(todo)
            record.update(todo_info)
            for rel in old.keys() - record.keys():
                with contextlib.suppress(OSError):
                    (local_dir / rel).unlink()
            _atomic_write_local(
                state, lambda fh: fh.write(json.dumps({"dir": str(local_dir), "files": record}).encode())
            )
        return local_dir

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
