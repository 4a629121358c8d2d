"""A local folder (`file://`, plain paths) as a Store."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .base import ObjectInfo, Store, T
from .errors import AccessDeniedError, NotFoundError, StorageError
from .localfs import MiB, _atomic_write_local, _local_files, file_sha256
from .uri import join_key, normalize_key, normalize_prefix

# ---------------------------------------------------------------------------------------------------------------
# Local folders

# errnos that no retry can change: the output folder is not writable for this process.
_NEVER_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


class LocalStore(Store):
    def __init__(self, root: Path | str) -> None:
        self.root = Path(os.path.abspath(os.path.expanduser(str(root))))
        self.uri = "file://" + str(self.root).rstrip("/") if str(self.root) != "/" else "file://"

    def _path(self, key: str) -> Path:
        return self.root / normalize_key(key, self.uri)

    def child(self, rel: str) -> LocalStore:
        rel = normalize_prefix(rel, self.uri)
        return LocalStore(self.root / rel) if rel else LocalStore(self.root)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(f"{self.url(key)} does not exist: check the path") from exc
        except IsADirectoryError as exc:
            raise NotFoundError(f"{self.url(key)} is a folder, not a file") from exc
        except PermissionError as exc:
            raise AccessDeniedError(f"cannot read {self.url(key)}: permission denied ({exc})") from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self._guard_write(key, lambda: _atomic_write_local(path, lambda fh: fh.write(data)))

    def create_exclusive(self, key: str, data: bytes) -> bool:
        path = self._path(key)

        def create() -> bool:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(path, "xb") as fh:  # O_CREAT | O_EXCL
                    fh.write(data)
            except FileExistsError:
                return False
            return True

        return self._guard_write(key, create)

    def _guard_write(self, key: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except PermissionError as exc:
            raise AccessDeniedError(
                f"cannot write {self.url(key)}: permission denied; make the folder writable for this user "
                f"(volume mount, fsGroup) ({exc})"
            ) from exc
        except OSError as exc:
            raise StorageError(f"cannot write {self.url(key)}: {exc}") from exc

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = normalize_prefix(prefix, self.uri)
        out = []
        for rel, path in _local_files(self.root / base if base else self.root):
            try:
                st = path.stat()
            except FileNotFoundError:  # deleted while walking
                continue
            out.append(ObjectInfo(join_key(base, rel), st.st_size, f"{st.st_size:x}-{st.st_mtime_ns:x}"))
        return out

    def _info(self, key: str) -> ObjectInfo:
        st = self._path(key).stat()
        return ObjectInfo(key, st.st_size, f"{st.st_size:x}-{st.st_mtime_ns:x}")

    def upload_file(self, local: Path, key: str) -> ObjectInfo:
        dest = self._path(key)
        src = Path(local)
        if not src.is_file():
            raise NotFoundError(f"local file {src} to upload to {self.url(key)} does not exist")

        def copy() -> None:
            with open(src, "rb") as fin:
                _atomic_write_local(dest, lambda fh: shutil.copyfileobj(fin, fh, 8 * MiB))

        self._guard_write(key, copy)
        return self._info(key)

    def download_file(self, key: str, local: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFoundError(f"{self.url(key)} does not exist: check the path")
        dest = Path(local)
        with open(src, "rb") as fin:
            _atomic_write_local(dest, lambda fh: shutil.copyfileobj(fin, fh, 8 * MiB))

    def _download_many(self, items: list[tuple[str, Path]]) -> None:
        with ThreadPoolExecutor(max_workers=4) as pool:
            for fut in [pool.submit(self.download_file, key, dest) for key, dest in items]:
                fut.result()

    def upload_dir(self, local_dir: Path, prefix: str) -> list[ObjectInfo]:
        base = normalize_prefix(prefix, self.uri)
        files = _local_files(Path(local_dir))
        with ThreadPoolExecutor(max_workers=4) as pool:
            futs = [pool.submit(self.upload_file, path, join_key(base, rel)) for rel, path in files]
            return sorted((f.result() for f in futs), key=lambda o: o.key)

    def _stored_size_and_sha256(self, key: str) -> tuple[int | None, str | None]:
        path = self._path(key)
        if not path.is_file():
            return None, None
        return path.stat().st_size, file_sha256(path)

    def delete(self, key: str) -> None:
        path = self._path(key)
        self._guard_write(key, lambda: path.unlink(missing_ok=True))

    def delete_prefix(self, prefix: str) -> None:
        base = normalize_prefix(prefix, self.uri)
        if not base:
            raise StorageError(f"refusing to delete everything under {self.uri}: pass a non-empty prefix")
        path = self.root / base
        if path.is_dir():
            self._guard_write(base, lambda: shutil.rmtree(path))

    def local_root(self) -> Path:
        return self.root

    def check_writable(self) -> None:
        """Before any work: a folder this run can never write into is bad input (64), not a crash (70).

        A read-only mount (EROFS) looks the same on every retry, like a permission; other OSErrors (a full disk,
        an I/O error) may pass, so they stay StorageError.
        """
        probe = f".dreambooth-write-check-{uuid.uuid4().hex[:8]}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / probe, "xb") as fh:
                fh.write(b"ok")
            (self.root / probe).unlink()
        except OSError as exc:
            if isinstance(exc, PermissionError) or exc.errno in _NEVER_WRITABLE:
                why = "it is on a read-only file system" if exc.errno == errno.EROFS else "permission denied"
                raise AccessDeniedError(
                    f"cannot write into {self.uri}: {why}; use a writable folder, or mount it read-write for this "
                    f"user ({exc.strerror})"
                ) from exc
            raise StorageError(f"cannot write into {self.uri}: {exc}") from exc
