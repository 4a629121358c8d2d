"""Pure parts of the storage layer: URI parsing, key rules, cache paths, error classification, client config."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, SSLError

from dreambooth_trainer.storage import (
    AccessDeniedError,
    LocalStore,
    S3Store,
    StorageError,
    local_cache_for,
    open_store,
    parse_uri,
)
from dreambooth_trainer.storage.s3 import _Progress, _s3_client_config
from dreambooth_trainer.storage.s3errors import _is_transient
from dreambooth_trainer.storage.uri import normalize_key, normalize_prefix

pytestmark = pytest.mark.unit


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


@pytest.mark.parametrize(
    ("uri", "scheme", "bucket", "path", "normal"),
    [
        ("s3://bucket/a/b/", "s3", "bucket", "a/b", "s3://bucket/a/b"),
        ("s3://bucket", "s3", "bucket", "", "s3://bucket"),
        ("s3://bucket/", "s3", "bucket", "", "s3://bucket"),
        ("s3://my.bucket-1/x", "s3", "my.bucket-1", "x", "s3://my.bucket-1/x"),
        ("file:///data/run/", "file", "", "/data/run", "file:///data/run"),
        ("file://localhost/data", "file", "", "/data", "file:///data"),
        ("/data/run", "file", "", "/data/run", "file:///data/run"),
    ],
)
def test_parse_uri(uri: str, scheme: str, bucket: str, path: str, normal: str) -> None:
    parsed = parse_uri(uri)
    assert (parsed.scheme, parsed.bucket, parsed.path, parsed.uri) == (scheme, bucket, path, normal)


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_uri("out/run").uri == f"file://{tmp_path}/out/run"
    store = open_store("out/run")
    assert isinstance(store, LocalStore) and store.local_root() == tmp_path / "out" / "run"


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("s3://ab/x", "invalid bucket name"),
        ("s3:///x", "invalid bucket name"),
        ("s3://bucket/a/../b", "invalid key"),
        ("gs://bucket/x", "unsupported storage scheme 'gs'"),
        ("file://otherhost/x", "only local files"),
        ("", "empty storage URI"),
    ],
)
def test_parse_uri_rejects_with_a_reason(uri: str, words: str) -> None:
    with pytest.raises(StorageError, match=words):
        parse_uri(uri)


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", "./a"])
def test_bad_keys(key: str) -> None:
    with pytest.raises(StorageError):
        normalize_key(key)


def test_prefixes() -> None:
    assert normalize_prefix("") == ""
    assert normalize_prefix("checkpoint-100/") == "checkpoint-100"
    assert normalize_prefix("/a/b/") == "a/b"
    with pytest.raises(StorageError):
        normalize_prefix("a/../../etc")


def test_local_store_refuses_escaping_keys(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    for key in ("../outside", "a/../../outside", "/etc/passwd"):
        with pytest.raises(StorageError):
            store.write_bytes(key, b"x")
    assert not (tmp_path / "outside").exists()


def test_local_cache_for_is_deterministic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path))
    a = local_cache_for("s3://models/sd-2-1/")
    assert a == local_cache_for("s3://models/sd-2-1")
    assert a.parent == tmp_path and a.name.startswith("models_sd-2-1-")
    assert a != local_cache_for("s3://models/sd-2-1-base")
    assert a != local_cache_for("s3://other/sd-2-1")
    monkeypatch.delenv("DREAMBOOTH_CACHE")
    assert local_cache_for("s3://models/x").parent == Path.home() / ".cache" / "dreambooth-operator" / "s3"


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (_client_error("SlowDown", 503), True),
        (_client_error("InternalError", 500), True),
        (_client_error("NoSuchUpload", 404), True),  # the server lost an in-flight multipart upload
        (_client_error("AccessDenied", 403), False),
        (_client_error("SignatureDoesNotMatch", 403), False),
        (_client_error("NoSuchBucket", 404), False),
        (_client_error("NoSuchKey", 404), False),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (SSLError(endpoint_url="https://x", error="bad cert"), False),
        (NoCredentialsError(), False),
        (ValueError("bug"), False),
    ],
)
def test_transient_classification(exc: BaseException, transient: bool) -> None:
    assert _is_transient(exc) is transient


def test_transient_looks_through_wrappers() -> None:
    # boto3 wraps a part upload's ClientError in S3UploadFailedError; the cause decides.
    try:
        try:
            raise _client_error("ServiceUnavailable", 503)
        except ClientError as inner:
            raise S3UploadFailedError("upload failed") from inner
    except S3UploadFailedError as outer:
        assert _is_transient(outer)


def test_client_config_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMBOOTH_S3_ADDRESSING_STYLE", "path")
    cfg = _s3_client_config(max_attempts=7, max_pool_connections=20)
    assert cfg.s3 == {"addressing_style": "path"}
    assert cfg.request_checksum_calculation == "when_required"
    assert cfg.response_checksum_validation == "when_required"
    assert cfg.retries == {"mode": "standard", "max_attempts": 7}
    monkeypatch.delenv("DREAMBOOTH_S3_ADDRESSING_STYLE")
    assert _s3_client_config(5, 10).s3 == {"addressing_style": "auto"}
    monkeypatch.setenv("DREAMBOOTH_S3_ADDRESSING_STYLE", "sideways")
    with pytest.raises(StorageError, match="path, virtual, auto"):
        _s3_client_config(5, 10)


def _store(monkeypatch: pytest.MonkeyPatch, deadline: float) -> S3Store:
    # Building a client contacts nothing; these tests only drive the retry loop.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return S3Store("s3://bucket/prefix", retry_deadline_s=deadline)


def test_retry_rides_out_transient_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(monkeypatch, deadline=30)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
        return "done"

    assert store._retry(flaky, "s3://bucket/prefix/k") == "done" and len(calls) == 3


def test_retry_gives_up_at_the_deadline_and_names_the_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(monkeypatch, deadline=1.5)

    def down() -> None:
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

    started = time.monotonic()
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL") as err:
        store._retry(down, "s3://bucket/prefix/k")
    assert 0.5 < time.monotonic() - started < 5
    assert "s3://bucket/prefix/k" in str(err.value) and "http://127.0.0.1:9" in str(err.value)


def test_retry_does_not_retry_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(monkeypatch, deadline=30)
    calls = []

    def denied() -> None:
        calls.append(1)
        raise _client_error("SignatureDoesNotMatch", 403)

    with pytest.raises(AccessDeniedError, match="credentialsSecret"):
        store._retry(denied, "s3://bucket/prefix/k")
    assert len(calls) == 1


def test_retry_deadline_counts_from_last_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long transfer that keeps moving bytes between failures is not cut off by the deadline."""
    store = _store(monkeypatch, deadline=1.0)
    progress = _Progress()
    calls = []

    def slow_but_moving() -> str:
        calls.append(1)
        time.sleep(0.6)
        progress.last = time.monotonic()  # what the transfer subscriber records as bytes go out
        if len(calls) < 4:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
        return "done"

    assert store._retry(slow_but_moving, "s3://bucket/prefix/k", progress=progress) == "done"
