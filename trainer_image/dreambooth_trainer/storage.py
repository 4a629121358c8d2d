"""One storage interface over local folders (`file://`, plain paths) and S3 (`s3://bucket/prefix`).

Everything the trainer reads or writes (model, data, class images, checkpoints, logs, outputs) goes through a
`Store`, so the same code path runs on a laptop and on a cluster where nothing local survives a preemption.

S3 settings come only from the standard AWS chain (environment, shared config, web identity / IRSA) plus a few
environment variables the operator sets from `spec.storage`:

- `AWS_ENDPOINT_URL` (read by boto3 itself), `AWS_REGION` / `AWS_DEFAULT_REGION` (default us-east-1),
- `DREAMBOOTH_S3_ADDRESSING_STYLE` = path | virtual | auto (default auto),
- `DREAMBOOTH_S3_RETRY_DEADLINE_S`: how long an operation keeps retrying transient failures (default 120 s),
- `DREAMBOOTH_CACHE`: where `local_cache_for` puts downloads (default ~/.cache/dreambooth-operator/s3).

Keys are relative to the store root and use "/" separators. Prefix arguments (`list`, `delete_prefix`,
`sync_down`, `upload_dir`) name a folder: `list("checkpoint-1")` does not match `checkpoint-100/...`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from botocore.client import BaseClient
    from s3transfer.manager import TransferManager

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
DEFAULT_RETRY_DEADLINE_S = 120.0
DEFAULT_MULTIPART_THRESHOLD = 16 * MiB
DEFAULT_MULTIPART_CHUNKSIZE = 16 * MiB
DEFAULT_MAX_CONCURRENCY = 10
DEFAULT_MAX_ATTEMPTS = 5
_MAX_OP_ATTEMPTS = 100
# Temp files live next to their final name (same filesystem, so os.replace is atomic) and are hidden from list().
_TMP_PREFIX = ".dbtmp-"
_CREDENTIALS_FIX = (
    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the credentials Secret in spec.storage.credentialsSecret, "
    "or the IAM role's policy (IRSA / workload identity)"
)
_ENDPOINT_FIX = "check AWS_ENDPOINT_URL / spec.storage.endpoint and that the S3 server is up"


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object. `etag` is the server's ETag (S3; multipart ETags are not MD5) or, for local files,
    a size+mtime fingerprint: good for "did it change", not a content hash."""

    key: str
    size: int
    etag: str


class StorageError(Exception):
    """A storage operation failed; the message names the URI and what to fix."""


class NotFoundError(StorageError):
    pass


class AccessDeniedError(StorageError):
    """Wrong or missing credentials, a bad signature, or a policy that does not allow the operation."""


class BucketMissingError(StorageError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers (URI parsing, key rules, cache paths)


_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")


@dataclass(frozen=True)
class ParsedURI:
    scheme: str  # "file" or "s3"
    bucket: str  # "" for file
    path: str  # file: absolute path; s3: prefix without leading/trailing "/"

    @property
    def uri(self) -> str:
        if self.scheme == "file":
            return "file://" + self.path
        return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"


def parse_uri(uri: str) -> ParsedURI:
    """Normalise a local path, `file://` URI or `s3://bucket/prefix` (no trailing slash, absolute local path)."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"empty storage URI {uri!r}: give a local path, file:///path or s3://bucket/prefix")
    uri = uri.strip()
    if uri.startswith("s3://"):
        rest = uri[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not _BUCKET_RE.match(bucket):
            raise StorageError(
                f"invalid bucket name {bucket!r} in {uri!r}: S3 bucket names are 3-63 characters of letters, "
                "digits, '.', '-' (write s3://bucket/prefix)"
            )
        prefix = prefix.strip("/")
        if prefix:
            _check_rel(prefix, uri)
        return ParsedURI("s3", bucket, prefix)
    if uri.startswith("file://"):
        rest = uri[len("file://") :]
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise StorageError(f"file URI {uri!r} names host {host!r}: only local files are supported (file:///path)")
        uri = slash + path
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri):
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"unsupported storage scheme {scheme!r} in {uri!r}: use a local path, file:// or s3://")
    path = os.path.abspath(os.path.expanduser(uri))
    return ParsedURI("file", "", path)


def _check_rel(rel: str, context: str) -> None:
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(
            f"invalid key {rel!r} under {context}: keys are relative, '/'-separated, without '.', '..' or empty parts"
        )


def normalize_key(key: str, context: str = "the store") -> str:
    """A key names one object: non-empty, relative, no `.`/`..`/empty segments (so it cannot escape the root)."""
    if not key:
        raise StorageError(f"empty key under {context}")
    _check_rel(key, context)
    return key


def normalize_prefix(prefix: str, context: str = "the store") -> str:
    """A prefix names a folder; "" is the root. Trailing slashes are dropped."""
    prefix = prefix.strip("/") if prefix else ""
    if prefix:
        _check_rel(prefix, context)
    return prefix


def join_key(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix and rel else (prefix or rel)


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


def open_store(uri: str, **s3_options: Any) -> Store:
    """Open a local path, `file://...` or `s3://bucket/prefix`. `s3_options` go to `S3Store` (transfer tuning,
    retry deadline) and are ignored for local stores."""
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    return S3Store(parsed.uri, **s3_options)


# ---------------------------------------------------------------------------------------------------------------
# Local folders


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
        probe = f".dreambooth-write-check-{uuid.uuid4().hex[:8]}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except PermissionError as exc:
            raise AccessDeniedError(f"cannot create {self.uri}: permission denied ({exc})") from exc
        except OSError as exc:
            raise StorageError(f"cannot create {self.uri}: {exc}") from exc
        self.write_bytes(probe, b"ok")
        self.delete(probe)


# ---------------------------------------------------------------------------------------------------------------
# S3


_ACCESS_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidSecurity",
    "AccountProblem",
    "403",
    "Forbidden",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
# NoSuchUpload: the server lost an in-flight multipart upload (e.g. restarted) — starting the upload over fixes it.
_TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "NoSuchUpload",
    "500",
    "502",
    "503",
    "504",
}


def _exc_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        # s3transfer's RetriesExceededError keeps the real error in last_exception, not __cause__.
        last = getattr(cur, "last_exception", None)
        cur = last if isinstance(last, BaseException) else (cur.__cause__ or cur.__context__)


def _client_error(exc: BaseException) -> Any | None:
    from botocore.exceptions import ClientError

    for e in _exc_chain(exc):
        if isinstance(e, ClientError):
            return e
    return None


def _error_code(err: Any) -> tuple[str, int]:
    resp = getattr(err, "response", {}) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: the network or the server is (possibly briefly) unavailable. Credentials, missing buckets,
    missing keys and TLS certificate problems are not."""
    import botocore.exceptions as bex
    from s3transfer.exceptions import RetriesExceededError

    for e in _exc_chain(exc):
        if isinstance(e, bex.ClientError):
            code, status = _error_code(e)
            return code in _TRANSIENT_CODES or status >= 500 or status == 429
        if isinstance(e, bex.SSLError):
            return False
        if isinstance(
            e,
            bex.ConnectionError
            | bex.HTTPClientError
            | bex.IncompleteReadError
            | bex.ResponseStreamingError
            | RetriesExceededError,
        ):
            return True
        if isinstance(e, ConnectionError | TimeoutError):
            return True
    return False


def _s3_client_config(max_attempts: int, max_pool_connections: int) -> Any:
    from botocore.config import Config

    style = (os.environ.get("DREAMBOOTH_S3_ADDRESSING_STYLE") or "auto").strip().lower()
    if style not in ("path", "virtual", "auto"):
        raise StorageError(
            f"DREAMBOOTH_S3_ADDRESSING_STYLE={style!r} is not one of path, virtual, auto "
            "(set spec.storage.pathStyle: true for path-style)"
        )
    return Config(
        s3={"addressing_style": style},
        # boto3 >= 1.36 sends CRC checksums by default that several S3-compatible servers reject; only send and
        # validate checksums where the API requires them.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=max_pool_connections,
    )


class _Progress:
    """When a transfer last moved bytes (any of its files, any thread)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def subscriber(self) -> Any:
        from s3transfer.subscribers import BaseSubscriber

        progress = self

        class _OnProgress(BaseSubscriber):
            def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
                # Negative counts are s3transfer rewinding a part it is about to retry: not progress.
                if bytes_transferred > 0:
                    progress.last = time.monotonic()

        return _OnProgress()


class _S3Context:
    """What a store and all its children share: one thread-safe client and the transfer settings."""

    def __init__(
        self,
        bucket: str,
        *,
        multipart_threshold: int,
        multipart_chunksize: int,
        max_concurrency: int,
        retry_deadline_s: float,
        max_attempts: int,
        max_bandwidth: int | None,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.retry_deadline_s = retry_deadline_s
        # A private session: boto3's default session is not thread-safe, and the trainer uploads from a thread.
        session = boto3.session.Session()
        region = os.environ.get("AWS_REGION") or session.region_name or "us-east-1"
        self.client: BaseClient = session.client(
            "s3",
            region_name=region,
            config=_s3_client_config(max_attempts, max(max_concurrency * 2, 10)),
        )
        self.endpoint = self.client.meta.endpoint_url
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            max_bandwidth=max_bandwidth,
            # The CRT client ignores most of this config; keep behaviour the same wherever awscrt is installed.
            preferred_transfer_client="classic",
        )

    def transfer_manager(self) -> TransferManager:
        from s3transfer.manager import TransferManager

        return TransferManager(self.client, self.transfer_config)


class S3Store(Store):
    """`s3://bucket/prefix`. Thread-safe: one boto3 client shared by this store and its children.

    Tuning (defaults suit multi-GB checkpoints): files above `multipart_threshold` go up in `multipart_chunksize`
    parts, `max_concurrency` requests at a time per call; `max_bandwidth` (bytes/s) caps a transfer so that a
    background checkpoint upload cannot starve data loading on a shared NIC. `retry_deadline_s` (default
    $DREAMBOOTH_S3_RETRY_DEADLINE_S or 120 s) bounds how long transient failures are retried; `max_attempts` is
    botocore's own per-request retry budget underneath."""

    def __init__(
        self,
        uri: str,
        *,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        retry_deadline_s: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_bandwidth: int | None = None,
        _ctx: _S3Context | None = None,
    ) -> None:
        parsed = parse_uri(uri)
        if parsed.scheme != "s3":
            raise StorageError(f"S3Store needs an s3:// URI, got {uri!r}")
        self.uri = parsed.uri
        self.bucket = parsed.bucket
        self.prefix = parsed.path
        if _ctx is None:
            deadline = (
                retry_deadline_s
                if retry_deadline_s is not None
                else _env_float("DREAMBOOTH_S3_RETRY_DEADLINE_S", DEFAULT_RETRY_DEADLINE_S)
            )
            try:
                _ctx = _S3Context(
                    self.bucket,
                    multipart_threshold=multipart_threshold,
                    multipart_chunksize=multipart_chunksize,
                    max_concurrency=max_concurrency,
                    retry_deadline_s=deadline,
                    max_attempts=max_attempts,
                    max_bandwidth=max_bandwidth,
                )
            except StorageError:
                raise
            except Exception as exc:  # e.g. a malformed shared config or an unknown profile
                raise StorageError(f"cannot configure S3 for {self.uri}: {exc}") from exc
        self._ctx = _ctx

    @property
    def client(self) -> BaseClient:
        """The underlying boto3 client (thread-safe; shared with child stores)."""
        return self._ctx.client

    @property
    def endpoint(self) -> str:
        return self._ctx.endpoint

    def _full(self, key: str) -> str:
        return join_key(self.prefix, normalize_key(key, self.uri))

    def _full_prefix(self, prefix: str) -> str:
        base = normalize_prefix(prefix, self.uri)
        full = join_key(self.prefix, base)
        return full + "/" if full else ""

    def child(self, rel: str) -> S3Store:
        rel = normalize_prefix(rel, self.uri)
        return S3Store(self.url(rel), _ctx=self._ctx)

    # -- errors and retries ---------------------------------------------------------------------------------------

    def _translate(self, exc: BaseException, url: str, elapsed: float = 0.0) -> StorageError:
        import botocore.exceptions as bex

        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError):
            return AccessDeniedError(f"no usable AWS credentials for {url}: {_CREDENTIALS_FIX} ({exc})")
        err = _client_error(exc)
        if err is not None:
            code, status = _error_code(err)
            msg = str(err.response.get("Error", {}).get("Message", "")) or str(err)
            if code in _ACCESS_CODES or status == 403:
                return AccessDeniedError(
                    f"access denied to {url} at {self.endpoint} ({code}: {msg}); {_CREDENTIALS_FIX}"
                )
            if code == "NoSuchBucket":
                return self._bucket_missing(url)
            if code in _NOT_FOUND_CODES or status == 404:
                # A HEAD of a key in a missing bucket is a bare 404 too: ask the bucket to tell them apart.
                if code != "NoSuchKey" and self._bucket_state() == "missing":
                    return self._bucket_missing(url)
                return NotFoundError(f"{url} does not exist: check the URI (and that the upload finished)")
            return StorageError(f"S3 error for {url} at {self.endpoint}: {code or status}: {msg}")
        if _is_transient(exc):
            return StorageError(
                f"cannot reach S3 for {url} at {self.endpoint} (gave up after {elapsed:.0f} s): {exc}; {_ENDPOINT_FIX}"
            )
        if isinstance(exc, bex.BotoCoreError):
            return StorageError(f"S3 failure for {url} at {self.endpoint}: {exc}")
        if isinstance(exc, OSError):
            return StorageError(f"local I/O failure while transferring {url}: {exc}")
        return StorageError(f"unexpected failure for {url}: {exc!r}")

    def _bucket_missing(self, url: str) -> BucketMissingError:
        return BucketMissingError(
            f"bucket {self.bucket!r} does not exist at {self.endpoint} (needed for {url}): create it "
            f"(aws s3 mb s3://{self.bucket}) or fix the bucket name / spec.storage.endpoint / region"
        )

    def _bucket_state(self) -> str:
        """'ok', 'missing', 'denied' or 'unknown' (one HEAD, no retries beyond botocore's)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return "ok"
        except Exception as exc:
            err = _client_error(exc)
            if err is None:
                return "unknown"
            code, status = _error_code(err)
            if status == 404 or code in ("NoSuchBucket", "404", "NotFound"):
                return "missing"
            if status == 403 or code in _ACCESS_CODES:
                return "denied"
            return "unknown"

    def _retry(
        self, op: Callable[[], T], url: str, deadline_s: float | None = None, progress: _Progress | None = None
    ) -> T:
        """Run op, retrying transient failures with capped exponential backoff. botocore already retries each
        request a few times; this outer loop rides out a server that is down for tens of seconds.

        The deadline bounds the outage, not the operation: it counts from the first failure, or from the last
        byte a transfer moved (`progress`), so a 10 GB upload that hits a blip after 5 minutes still retries."""
        budget = self._ctx.retry_deadline_s if deadline_s is None else deadline_s
        streak_start = last_failure = 0.0
        delay = 0.5
        attempt = 0
        while True:
            attempt += 1
            try:
                return op()
            except Exception as exc:
                now = time.monotonic()
                if attempt == 1 or (progress is not None and progress.last > last_failure):
                    # First failure, or bytes moved since the last one: a new outage, with a fresh backoff.
                    streak_start, delay = now, 0.5
                last_failure = now
                down_for = now - streak_start
                # The attempt cap stops a server that takes every body and then fails (progress, yet never done).
                if not _is_transient(exc) or down_for + delay > budget or attempt >= _MAX_OP_ATTEMPTS:
                    raise self._translate(exc, url, down_for) from exc
                log.warning(
                    "S3 %s failed (attempt %d, %.0f s without progress), retrying: %s", url, attempt, down_for, exc
                )
                time.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 5.0)

    def _transfer_all(
        self, pending: dict[str, Any], submit: Callable[[TransferManager, str, Any, list[Any]], Any], url: str
    ) -> None:
        """Submit every pending transfer to one transfer manager (files and their parts share its pool of
        max_concurrency connections), retrying the ones that failed until the deadline; `pending` shrinks as
        transfers complete, so a retry never repeats finished files."""
        progress = _Progress()

        def run() -> None:
            errors: list[BaseException] = []
            subscribers = [progress.subscriber()]
            with self._ctx.transfer_manager() as tm:
                futures = {key: submit(tm, key, value, subscribers) for key, value in pending.items()}
                for key, fut in futures.items():
                    try:
                        fut.result()
                        del pending[key]
                    except Exception as exc:
                        errors.append(exc)
            if errors:
                # A credentials or bucket error must not hide behind a transient one from a parallel transfer.
                raise next((e for e in errors if not _is_transient(e)), errors[0])

        if pending:
            self._retry(run, url, progress=progress)

    # -- operations -----------------------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        full = self._full(key)

        def head() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=full)
                return True
            except Exception as exc:
                err = _client_error(exc)
                if err is not None and (_error_code(err)[1] == 404 or _error_code(err)[0] in _NOT_FOUND_CODES):
                    return False
                raise

        return self._retry(head, self.url(key))

    def read_bytes(self, key: str) -> bytes:
        full = self._full(key)

        def get() -> bytes:
            resp = self.client.get_object(Bucket=self.bucket, Key=full)
            return resp["Body"].read()

        return self._retry(get, self.url(key))

    def write_bytes(self, key: str, data: bytes) -> None:
        full = self._full(key)
        # Content-MD5 lets the server reject a body corrupted in flight; every S3-compatible server accepts it,
        # unlike the newer CRC headers.
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        self._retry(
            lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=data, ContentMD5=md5),
            self.url(key),
        )

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full_prefix = self._full_prefix(prefix)
        root = self.prefix + "/" if self.prefix else ""

        def run() -> list[ObjectInfo]:
            out = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for obj in page.get("Contents", []):
                    k = obj["Key"]
                    if k.endswith("/"):  # folder markers made by consoles and some tools
                        continue
                    out.append(ObjectInfo(k[len(root) :], int(obj["Size"]), str(obj.get("ETag", "")).strip('"')))
            out.sort(key=lambda o: o.key)
            return out

        return self._retry(run, self.url(normalize_prefix(prefix, self.uri)))

    def _head(self, key: str) -> ObjectInfo:
        full = self._full(key)
        resp = self._retry(lambda: self.client.head_object(Bucket=self.bucket, Key=full), self.url(key))
        return ObjectInfo(key, int(resp["ContentLength"]), str(resp.get("ETag", "")).strip('"'))

    def upload_file(self, local: Path, key: str) -> ObjectInfo:
        self.upload_files([(Path(local), key)])
        return self._head(key)

    def upload_files(self, items: list[tuple[Path, str]], sha256: dict[str, str] | None = None) -> None:
        """Upload (local path, key) pairs in parallel. Failed files are retried (whole file) until the deadline.
        With `sha256` (key -> hex digest) each object carries its hash as metadata."""
        for path, key in items:
            normalize_key(key, self.uri)
            if not Path(path).is_file():
                raise NotFoundError(f"local file {path} to upload to {self.url(key)} does not exist")
        pending: dict[str, Any] = {key: Path(path) for path, key in items}
        url = self.url(items[0][1]) if len(items) == 1 else self.uri

        def extra(key: str) -> dict[str, Any] | None:
            return {"Metadata": {SHA256_METADATA: sha256[key]}} if sha256 and key in sha256 else None

        self._transfer_all(
            pending,
            lambda tm, key, path, subs: tm.upload(
                str(path), self.bucket, self._full(key), extra_args=extra(key), subscribers=subs
            ),
            url,
        )

    def _upload_with_sha256(self, items: list[tuple[Path, str]], hashes: dict[str, str]) -> None:
        if items:
            self.upload_files(items, hashes)

    def _stored_size_and_sha256(self, key: str) -> tuple[int | None, str | None]:
        full = self._full(key)

        def head() -> tuple[int | None, str | None]:
            try:
                resp = self.client.head_object(Bucket=self.bucket, Key=full)
            except Exception as exc:
                err = _client_error(exc)
                if err is not None and (_error_code(err)[1] == 404 or _error_code(err)[0] in _NOT_FOUND_CODES):
                    return None, None
                raise
            return int(resp["ContentLength"]), (resp.get("Metadata") or {}).get(SHA256_METADATA)

        return self._retry(head, self.url(key))

    def download_file(self, key: str, local: Path) -> None:
        self._download_many([(key, Path(local))])

    def _download_many(self, items: list[tuple[str, Path]]) -> None:
        pending: dict[str, Any] = {key: Path(dest) for key, dest in items}
        for dest in pending.values():
            dest.parent.mkdir(parents=True, exist_ok=True)
        url = self.url(items[0][0]) if len(items) == 1 else self.uri
        # s3transfer writes to a temp name next to dest and renames it into place when complete.
        self._transfer_all(
            pending,
            lambda tm, key, dest, subs: tm.download(self.bucket, self._full(key), str(dest), subscribers=subs),
            url,
        )

    def upload_dir(self, local_dir: Path, prefix: str) -> list[ObjectInfo]:
        base = normalize_prefix(prefix, self.uri)
        files = [(path, join_key(base, rel)) for rel, path in _local_files(Path(local_dir))]
        self.upload_files(files)
        wanted = {key for _, key in files}
        # One LIST gets every ETag instead of one HEAD per file.
        return [o for o in self.list(base) if o.key in wanted]

    def delete(self, key: str) -> None:
        full = self._full(key)
        self._retry(lambda: self.client.delete_object(Bucket=self.bucket, Key=full), self.url(key))

    def delete_prefix(self, prefix: str) -> None:
        base = normalize_prefix(prefix, self.uri)
        if not base:
            raise StorageError(f"refusing to delete everything under {self.uri}: pass a non-empty prefix")
        keys = [self._full(o.key) for o in self.list(base)]
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]

            def run(batch: list[str] = batch) -> None:
                resp = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
                errors = resp.get("Errors") or []
                if errors:
                    e = errors[0]
                    from botocore.exceptions import ClientError

                    raise ClientError(
                        {"Error": {"Code": e.get("Code", ""), "Message": f"{e.get('Key')}: {e.get('Message', '')}"}},
                        "DeleteObjects",
                    )

            self._retry(run, self.url(base))

    def local_root(self) -> None:
        return None

    def check_writable(self) -> None:
        """Fail fast, before training starts, with a message that says what to fix: bucket exists, credentials
        work, and this identity may write and delete under the prefix."""
        url = self.uri
        deadline = min(self._ctx.retry_deadline_s, 30.0)

        def head_bucket() -> None:
            self.client.head_bucket(Bucket=self.bucket)

        try:
            self._retry(head_bucket, url, deadline)
        except NotFoundError as exc:
            raise self._bucket_missing(url) from exc
        probe = f".dreambooth-write-check-{uuid.uuid4().hex[:8]}"
        full = self._full(probe)
        self._retry(lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=b"ok"), self.url(probe), deadline)
        self._retry(lambda: self.client.delete_object(Bucket=self.bucket, Key=full), self.url(probe), deadline)


__all__ = [
    "AccessDeniedError",
    "BucketMissingError",
    "LocalStore",
    "NotFoundError",
    "ObjectInfo",
    "S3Store",
    "Store",
    "StorageError",
    "local_cache_for",
    "open_store",
    "parse_uri",
]
