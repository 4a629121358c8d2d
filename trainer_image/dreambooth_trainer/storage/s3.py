"""S3 (and S3-compatible servers) as a Store: boto3 transfers with retries up to a deadline."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from botocore.client import BaseClient
    from s3transfer.manager import TransferManager

from .base import ObjectInfo, Store, T
from .errors import AccessDeniedError, BucketMissingError, NotFoundError, StorageError
from .localfs import SHA256_METADATA, MiB, _env_float, _local_files
from .s3errors import _ACCESS_CODES, _NOT_FOUND_CODES, _client_error, _error_code, _is_transient
from .uri import join_key, normalize_key, normalize_prefix, parse_uri

log = logging.getLogger(__name__)

DEFAULT_RETRY_DEADLINE_S = 120.0
DEFAULT_MULTIPART_THRESHOLD = 16 * MiB
DEFAULT_MULTIPART_CHUNKSIZE = 16 * MiB
DEFAULT_MAX_CONCURRENCY = 10
DEFAULT_MAX_ATTEMPTS = 5
_MAX_OP_ATTEMPTS = 100
_CREDENTIALS_FIX = (
    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the credentials Secret in spec.storage.credentialsSecret, "
    "or the IAM role's policy (IRSA / workload identity)"
)
_ENDPOINT_FIX = "check AWS_ENDPOINT_URL / spec.storage.endpoint and that the S3 server is up"


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

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """PUT with If-None-Match: * (AWS S3, MinIO, SeaweedFS): True if this call created the object, False if
        it existed. A retried PUT whose first try landed also reads False: callers put a nonce in `data`."""
        full = self._full(key)
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()

        def put() -> bool:
            for attempt in range(8):
                try:
                    self.client.put_object(Bucket=self.bucket, Key=full, Body=data, ContentMD5=md5, IfNoneMatch="*")
                    return True
                except Exception as exc:
                    err = _client_error(exc)
                    code, status = _error_code(err) if err is not None else ("", 0)
                    if status == 412 or code == "PreconditionFailed":
                        return False
                    if (status == 409 or code == "ConditionalRequestConflict") and attempt < 7:
                        time.sleep(0.05 * (attempt + 1))  # AWS: a concurrent conditional write in flight
                        continue
                    raise
            return False

        return self._retry(put, self.url(key))

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


# -- streaming uploads (checkpoints straight from the RAM snapshot) ---------------------------------------------


class PartPool:
    """Threads that upload parts, and the cap on parts held in memory, shared by every stream of one publish.

    Host RAM held by streaming is at most `(max_inflight + streams) * part_size`: each stream fills one part
    buffer while up to `max_inflight` filled ones are on the wire; a stream whose next part would exceed that
    waits (backpressure), so a slow server slows the producer instead of growing memory."""

    def __init__(self, part_size: int = DEFAULT_MULTIPART_CHUNKSIZE, concurrency: int = DEFAULT_MAX_CONCURRENCY):
        from concurrent.futures import ThreadPoolExecutor

        if part_size < 5 * MiB:
            raise StorageError(f"S3 multipart parts must be at least 5 MiB, not {part_size} bytes")
        self.part_size = part_size
        self.concurrency = concurrency
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3-part")
        self.slots = threading.BoundedSemaphore(concurrency)
        self.parts_done = 0  # test hooks count them
        self.on_part: Callable[[int], None] | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def _part_finished(self) -> None:
        with self._lock:
            self.parts_done += 1
            n = self.parts_done
        if self.on_part is not None:
            self.on_part(n)


class S3Stream:
    """One object written as a stream: parts go up in parallel while the producer fills the next one; nothing
    is visible under `key` until `commit` (CompleteMultipartUpload, or one PUT for an object under one part).

    `abort` (or a failure in `finish`/`commit`) aborts the multipart upload so no parts are left billed; a
    process killed mid-stream leaves it to `abort_stale_uploads` at the next start and the bucket's
    AbortIncompleteMultipartUpload lifecycle rule (docs/storage.md)."""

    def __init__(self, store: S3Store, key: str, pool: PartPool) -> None:
        self.store = store
        self.key = key
        self.full = store._full(key)
        self.pool = pool
        self.upload_id: str | None = None
        self._buf = bytearray()
        self._parts: dict[int, str] = {}
        self._futures: list[Any] = []
        self._small: bytes | None = None

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        size = self.pool.part_size
        pos = 0
        while pos < mv.nbytes:
            if not self._buf and mv.nbytes - pos >= size:
                self._send(bytes(mv[pos : pos + size]))  # a whole part from the caller's memory: one copy
                pos += size
                continue
            take = min(size - len(self._buf), mv.nbytes - pos)
            self._buf += mv[pos : pos + take]
            pos += take
            if len(self._buf) == size:
                self._send(bytes(self._buf))
                self._buf = bytearray()
        return mv.nbytes

    def _send(self, body: bytes) -> None:
        if self.upload_id is None:
            resp = self.store._retry(
                lambda: self.store.client.create_multipart_upload(Bucket=self.store.bucket, Key=self.full),
                self.store.url(self.key),
            )
            self.upload_id = resp["UploadId"]
        number = len(self._futures) + 1
        self._raise_failed()
        self.pool.slots.acquire()  # backpressure: at most `concurrency` parts in memory on the wire
        try:
            self._futures.append(self.pool.executor.submit(self._upload_part, number, body))
        except BaseException:
            self.pool.slots.release()
            raise

    def _upload_part(self, number: int, body: bytes) -> None:
        try:
            resp = self.store._retry(
                lambda: self.store.client.upload_part(
                    Bucket=self.store.bucket, Key=self.full, UploadId=self.upload_id, PartNumber=number, Body=body
                ),
                f"{self.store.url(self.key)} (part {number})",
            )
            self._parts[number] = resp["ETag"]
        finally:
            self.pool.slots.release()
        self.pool._part_finished()

    def _raise_failed(self) -> None:
        for fut in self._futures:
            if fut.done() and fut.exception() is not None:
                raise fut.exception()  # type: ignore[misc]

    def finish(self) -> None:
        """Every byte written is on the server (parts uploaded, or held for one PUT); not yet visible."""
        if self.upload_id is None:
            self._small, self._buf = bytes(self._buf), bytearray()
            return
        if self._buf:
            self._send(bytes(self._buf))
            self._buf = bytearray()
        for fut in self._futures:
            fut.result()

    def commit(self) -> None:
        if self._small is not None:
            self.store.write_bytes(self.key, self._small)
            return
        parts = [{"PartNumber": n, "ETag": self._parts[n]} for n in sorted(self._parts)]
        self.store._retry(
            lambda: self.store.client.complete_multipart_upload(
                Bucket=self.store.bucket, Key=self.full, UploadId=self.upload_id, MultipartUpload={"Parts": parts}
            ),
            self.store.url(self.key),
        )
        self.upload_id = None

    def abort(self) -> None:
        for fut in self._futures:
            fut.cancel()
        if self.upload_id is None:
            return
        upload_id, self.upload_id = self.upload_id, None
        for fut in self._futures:
            with contextlib.suppress(BaseException):
                fut.result()
        try:
            self.store.client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.full, UploadId=upload_id)
        except Exception as exc:  # noqa: BLE001 - the next start's sweep and the lifecycle rule catch it
            log.warning("could not abort the multipart upload of %s: %s", self.store.url(self.key), exc)


class SharedS3Stream(S3Stream):
    """This rank's share of one object that every data-parallel rank serialises alike (checkpoint shares).

    Part k (0-based, PartNumber k + 1) belongs to rank k % world: the bytes of the other ranks' parts pass through
    unbuffered (the caller hashes them), ours go up as in S3Stream. Rank 0 created the multipart upload; it alone
    completes it (with every rank's ETags, `add_parts`) or aborts it, so `commit` and `abort` of another rank only
    stop its own parts."""

    def __init__(self, store: S3Store, key: str, pool: PartPool, upload_id: str, rank: int, world: int) -> None:
        super().__init__(store, key, pool)
        self.upload_id = upload_id
        self.rank, self.world = rank, world
        self.pos = 0
        self.bytes_sent = 0
        self._buf_part = -1

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        size = self.pool.part_size
        i = 0
        while i < mv.nbytes:
            k = self.pos // size
            take = min(mv.nbytes - i, (k + 1) * size - self.pos)
            if k % self.world == self.rank:
                if not self._buf and take == size:
                    self._send_part(k + 1, bytes(mv[i : i + take]))  # a whole part from the caller's memory
                else:
                    self._buf += mv[i : i + take]
                    self._buf_part = k
                    if len(self._buf) == size:
                        self._send_part(k + 1, bytes(self._buf))
                        self._buf = bytearray()
            i += take
            self.pos += take
        return mv.nbytes

    def _send_part(self, number: int, body: bytes) -> None:
        self._raise_failed()
        self.bytes_sent += len(body)
        self.pool.slots.acquire()
        try:
            self._futures.append(self.pool.executor.submit(self._upload_part, number, body))
        except BaseException:
            self.pool.slots.release()
            raise

    def finish(self) -> None:
        if self._buf:
            self._send_part(self._buf_part + 1, bytes(self._buf))
            self._buf = bytearray()
        for fut in self._futures:
            fut.result()

    @property
    def etags(self) -> dict[int, str]:
        """PartNumber -> ETag of the parts this rank uploaded."""
        return dict(self._parts)

    def add_parts(self, etags: dict[int, str]) -> None:
        """The other ranks' parts, so that `commit` completes the object with every part."""
        self._parts.update(etags)

    def commit(self) -> None:
        if self.rank == 0:
            super().commit()

    def abort(self) -> None:
        if self.rank == 0:
            super().abort()
            return
        for fut in self._futures:
            fut.cancel()
        for fut in self._futures:
            with contextlib.suppress(BaseException):
                fut.result()


def create_upload(store: S3Store, key: str) -> str:
    """A new multipart upload of `key`; its upload id."""
    full = store._full(key)
    resp = store._retry(lambda: store.client.create_multipart_upload(Bucket=store.bucket, Key=full), store.url(key))
    return resp["UploadId"]


def incomplete_uploads(store: S3Store, prefix: str) -> list[tuple[str, str]]:
    """(key relative to the store, upload id) of every multipart upload in progress under `prefix`."""
    full_prefix = store._full_prefix(prefix) if prefix else (store.prefix + "/" if store.prefix else "")
    root = store.prefix + "/" if store.prefix else ""

    def run() -> list[tuple[str, str]]:
        out = []
        paginator = store.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=store.bucket, Prefix=full_prefix):
            for up in page.get("Uploads", []) or []:
                out.append((up["Key"][len(root) :], up["UploadId"]))
        return out

    return store._retry(run, store.url(prefix))


def abort_upload(store: S3Store, key: str, upload_id: str) -> None:
    full = store._full(key)

    def run() -> None:
        try:
            store.client.abort_multipart_upload(Bucket=store.bucket, Key=full, UploadId=upload_id)
        except Exception as exc:
            err = _client_error(exc)
            if err is not None and _error_code(err)[0] == "NoSuchUpload":
                return  # gone already (completed or aborted by someone else)
            raise

    store._retry(run, store.url(key))
