"""The Store against real backends: a temp folder and a real SeaweedFS S3 server (signatures checked).

The same tests run over file:// and s3:// so both stores keep one behaviour.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dreambooth_trainer.storage import (
    AccessDeniedError,
    BucketMissingError,
    LocalStore,
    NotFoundError,
    ObjectInfo,
    S3Store,
    StorageError,
    Store,
    open_store,
)
from s3server import SeaweedS3, pick_base_port

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    if request.param == "file":
        monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
        yield open_store("file://" + str(tmp_path / "store"))
    else:
        request.getfixturevalue("s3")
        bucket = request.getfixturevalue("bucket")
        monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
        yield open_store(f"s3://{bucket}/runs/job-1/")


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _inodes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_ino for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip(store: Store) -> None:
    assert not store.uri.endswith("/")
    payload = bytes(range(256)) * 100
    store.write_bytes("dir/blob.bin", payload)
    store.write_text("LATEST", "checkpoint-400\n")
    assert store.read_bytes("dir/blob.bin") == payload
    assert store.read_text("LATEST") == "checkpoint-400\n"
    assert store.exists("LATEST") and store.exists("dir/blob.bin")
    assert not store.exists("missing") and not store.exists("dir")  # a folder is not an object
    store.write_text("LATEST", "checkpoint-500\n")  # overwrite
    assert store.read_text("LATEST") == "checkpoint-500\n"
    assert store.url("dir/blob.bin") == store.uri + "/dir/blob.bin"

    with pytest.raises(NotFoundError) as err:
        store.read_bytes("nope/manifest.json")
    assert store.url("nope/manifest.json") in str(err.value)

    child = store.child("dir/")
    assert child.uri == store.uri + "/dir"
    assert child.read_bytes("blob.bin") == payload
    assert [o.key for o in child.list()] == ["blob.bin"]

    store.delete("LATEST")
    store.delete("LATEST")  # deleting what is gone is fine (retries may repeat a delete)
    assert not store.exists("LATEST")
    with pytest.raises(StorageError):
        store.read_bytes("../escape")


def test_list_is_recursive_sorted_and_prefix_is_a_folder(store: Store) -> None:
    for key, data in {"b": b"1", "a/2/x": b"22", "ab/3": b"333", "a/1": b"4444"}.items():
        store.write_bytes(key, data)
    infos = store.list()
    assert [o.key for o in infos] == ["a/1", "a/2/x", "ab/3", "b"]
    assert [o.size for o in infos] == [4, 2, 3, 1]
    assert all(o.etag for o in infos)
    # "a" names the folder a/, so ab/3 is not in it (delete_prefix("checkpoint-1") must spare checkpoint-100).
    assert [o.key for o in store.list("a")] == ["a/1", "a/2/x"]
    assert [o.key for o in store.list("a/")] == ["a/1", "a/2/x"]
    assert store.list("nothing-here") == []
    assert [o.key for o in store.child("a").list()] == ["1", "2/x"]

    store.delete_prefix("a")
    assert [o.key for o in store.list()] == ["ab/3", "b"]
    with pytest.raises(StorageError, match="refusing"):
        store.delete_prefix("")


def test_files_and_dirs(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "weights.bin").write_bytes(os.urandom(300_000))
    (src / "model_index.json").write_text("{}")
    (src / "empty.txt").write_bytes(b"")

    info = store.upload_file(src / "model_index.json", "single/model_index.json")
    assert (info.key, info.size) == ("single/model_index.json", 2) and info.etag

    infos = store.upload_dir(src, "model")
    assert [(o.key, o.size) for o in infos] == [
        ("model/empty.txt", 0),
        ("model/model_index.json", 2),
        ("model/unet/weights.bin", 300_000),
    ]
    assert infos == [o for o in store.list("model")]

    dest = tmp_path / "dl" / "nested" / "weights.bin"
    store.download_file("model/unet/weights.bin", dest)
    assert dest.read_bytes() == (src / "unet" / "weights.bin").read_bytes()
    with pytest.raises(NotFoundError):
        store.download_file("model/unet/missing.bin", tmp_path / "dl" / "missing.bin")
    assert not (tmp_path / "dl" / "missing.bin").exists()
    with pytest.raises(NotFoundError):
        store.upload_file(tmp_path / "no-such-file", "x")

    out = store.sync_down("model", tmp_path / "mirror")
    assert _tree(out) == _tree(src)


def test_write_bytes_is_atomic_for_readers(store: Store) -> None:
    """A reader never sees a half-written object: each read is all old or all new bytes."""
    a, b = b"A" * (2 * MiB), b"B" * (2 * MiB)
    store.write_bytes("state", a)
    stop = threading.Event()
    seen: list[bytes] = []

    def reader() -> None:
        while not stop.is_set():
            data = store.read_bytes("state")
            seen.append(data[:1] * len(data) if data in (a, b) else b"torn")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(15):
            store.write_bytes("state", b if i % 2 == 0 else a)
    finally:
        stop.set()
        t.join()
    assert seen and b"torn" not in seen
    assert [o.key for o in store.list()] == ["state"]  # no temp files visible


def test_failed_local_write_keeps_old_content(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write_bytes("manifest.json", b"old")
    with pytest.raises(TypeError):
        store.write_bytes("manifest.json", "not bytes")  # type: ignore[arg-type]  # fails mid-write
    assert store.read_bytes("manifest.json") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_sync_down_downloads_only_what_changed(store: Store, tmp_path: Path) -> None:
    store.write_bytes("data/1.jpg", b"one")
    store.write_bytes("data/sub/2.jpg", b"two")
    store.write_bytes("data/3.jpg", b"three")
    local = tmp_path / "cache" / "data"

    assert store.sync_down("data/", local) == local
    assert _tree(local) == {"1.jpg": b"one", "3.jpg": b"three", "sub/2.jpg": b"two"}
    (local / "mine.txt").write_text("not from the store")
    first = _inodes(local)

    # Nothing changed: every file is kept as is (a download would replace it, giving a new inode).
    store.sync_down("data", local)
    assert _inodes(local) == first

    store.write_bytes("data/3.jpg", b"THREE")  # same size, new content: the ETag tells
    store.delete("data/1.jpg")
    store.sync_down("data", local)
    assert _tree(local) == {"3.jpg": b"THREE", "mine.txt": b"not from the store", "sub/2.jpg": b"two"}
    after = _inodes(local)
    assert after["sub/2.jpg"] == first["sub/2.jpg"] and after["mine.txt"] == first["mine.txt"]
    assert after["3.jpg"] != first["3.jpg"]

    # A local file that went missing or was truncated is fetched again.
    (local / "sub" / "2.jpg").unlink()
    (local / "3.jpg").write_bytes(b"T")
    store.sync_down("data", local)
    assert _tree(local)["sub/2.jpg"] == b"two" and _tree(local)["3.jpg"] == b"THREE"


def test_concurrent_writers_share_one_store(store: Store, tmp_path: Path) -> None:
    """The trainer uploads from a background thread while the main thread reads and writes small objects."""
    files = []
    for i in range(4):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(os.urandom(100_000 + i))
        files.append(p)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(5):
                store.write_text(f"t{i}/small-{j}", f"{i}-{j}")
            store.upload_file(files[i], f"t{i}/big.bin")
        except BaseException as exc:  # surfaced below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(store.list()) == 4 * 6
    for i in range(4):
        assert store.read_bytes(f"t{i}/big.bin") == files[i].read_bytes()


# -- S3 only ---------------------------------------------------------------------------------------------------


def _count_gets(store: S3Store) -> list[str]:
    """Keys fetched through this store's client, recorded by a botocore event hook (the real client, no mock)."""
    calls: list[str] = []
    store.client.meta.events.register(
        "before-parameter-build.s3.GetObject", lambda params, **_: calls.append(params["Key"])
    )
    return calls


def test_multipart_upload_and_cached_download(
    s3: SeaweedS3, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DREAMBOOTH_CACHE", str(tmp_path / "cache"))
    store = open_store(f"s3://{bucket}/models/sd", multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    assert isinstance(store, S3Store)
    big = tmp_path / "unet.safetensors"
    big.write_bytes(os.urandom(20 * MiB))
    store.write_text("model_index.json", "{}")

    info = store.upload_file(big, "unet/diffusion_pytorch_model.safetensors")
    assert info.size == 20 * MiB
    assert info.etag.endswith("-4"), info.etag  # a multipart ETag: md5 of part md5s, not the file's md5
    assert info.etag != hashlib.md5(big.read_bytes()).hexdigest()

    gets = _count_gets(store)
    local = store.sync_down("", tmp_path / "model")
    assert (local / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == big.read_bytes()
    assert gets, "the first sync downloads"
    gets.clear()

    store.sync_down("", tmp_path / "model")
    assert gets == [], "the second sync finds size and stored ETag unchanged and downloads nothing"

    # Another process (a second rank on the same node) shares the record: a fresh store downloads nothing too.
    other = open_store(f"s3://{bucket}/models/sd")
    assert isinstance(other, S3Store)
    other_gets = _count_gets(other)
    other.sync_down("", tmp_path / "model")
    assert other_gets == []


def test_wrong_credentials_are_access_denied(s3: SeaweedS3, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    good = open_store(f"s3://{bucket}/out")
    good.write_text("x", "1")
    for var, value in [("AWS_SECRET_ACCESS_KEY", "not-the-secret"), ("AWS_ACCESS_KEY_ID", "nobody")]:
        with monkeypatch.context() as m:
            m.setenv(var, value)
            bad = open_store(f"s3://{bucket}/out")
            started = time.monotonic()
            with pytest.raises(AccessDeniedError) as err:
                bad.check_writable()
            assert time.monotonic() - started < 10, "credential errors are not retried"
            msg = str(err.value)
            assert f"s3://{bucket}/out" in msg and "AWS_ACCESS_KEY_ID" in msg and "credentialsSecret" in msg
            with pytest.raises(AccessDeniedError):
                bad.read_bytes("x")
            with pytest.raises(AccessDeniedError):
                bad.list()


def test_no_credentials_at_all(s3: SeaweedS3, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(AccessDeniedError, match="credentialsSecret"):
        open_store(f"s3://{bucket}/out").check_writable()


def test_missing_bucket(s3: SeaweedS3, tmp_path: Path) -> None:
    store = open_store("s3://no-such-bucket-here/runs/x")
    with pytest.raises(BucketMissingError) as err:
        store.check_writable()
    assert "no-such-bucket-here" in str(err.value) and "create it" in str(err.value)
    with pytest.raises(BucketMissingError):
        store.read_bytes("LATEST")
    with pytest.raises(BucketMissingError):
        store.download_file("LATEST", tmp_path / "LATEST")  # a bare 404 HEAD, told apart by asking the bucket
    with pytest.raises(BucketMissingError):
        store.write_text("LATEST", "checkpoint-1")
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(BucketMissingError):
        store.upload_file(src, "f")


def test_missing_prefix_reads_as_not_found(s3: SeaweedS3, bucket: str, tmp_path: Path) -> None:
    store = open_store(f"s3://{bucket}/never/written")
    store.check_writable()
    assert store.list() == [] and not store.exists("LATEST")
    with pytest.raises(NotFoundError, match=f"s3://{bucket}/never/written/LATEST"):
        store.read_bytes("LATEST")
    assert store.list() == [], "check_writable leaves no probe object behind"


def test_unreachable_endpoint_gives_up_at_the_deadline(s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{pick_base_port(1)}")
    store = open_store("s3://anything/x", retry_deadline_s=2, max_attempts=1)
    started = time.monotonic()
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL") as err:
        store.write_text("k", "v")
    assert not isinstance(err.value, AccessDeniedError | BucketMissingError | NotFoundError)
    assert time.monotonic() - started < 15


# Extended tier (the same outage mid-training: test_s3_training's 20 s outage test stays in the default run).
@pytest.mark.extended
@pytest.mark.slow
def test_upload_survives_server_down_for_20s(s3: SeaweedS3, bucket: str, tmp_path: Path) -> None:
    """Stop SeaweedFS mid-upload for ~20 s: the upload and a small write retry and complete once it is back."""
    # 20 MiB at 4 MiB/s takes ~5 s, so the server goes away with the upload half done.
    store = open_store(
        f"s3://{bucket}/ckpt",
        multipart_threshold=5 * MiB,
        multipart_chunksize=5 * MiB,
        max_concurrency=2,
        max_bandwidth=4 * MiB,
        retry_deadline_s=120,
    )
    src = tmp_path / "optimizer.bin"
    src.write_bytes(os.urandom(20 * MiB))
    store.write_text("before", "written before the outage")
    results: dict[str, object] = {}

    def upload() -> None:
        try:
            results["info"] = store.upload_file(src, "checkpoint-100/optimizer.bin")
        except BaseException as exc:
            results["error"] = exc

    def small_write() -> None:
        try:
            store.write_text("checkpoint-100/manifest.json", '{"step": 100}')
            results["manifest"] = True
        except BaseException as exc:
            results["manifest_error"] = exc

    uploader = threading.Thread(target=upload, daemon=True)
    uploader.start()
    time.sleep(2)
    s3.stop()
    down_at = time.monotonic()
    writer = threading.Thread(target=small_write, daemon=True)
    writer.start()  # issued while the server is down
    time.sleep(20)
    assert uploader.is_alive() and writer.is_alive(), "still retrying, not failed"
    s3.start()  # same data dir and ports
    uploader.join(120)
    writer.join(120)
    assert "error" not in results and "manifest_error" not in results, results
    assert results["manifest"] is True
    info = results["info"]
    assert isinstance(info, ObjectInfo) and info.size == 20 * MiB
    assert time.monotonic() - down_at > 20
    dest = tmp_path / "back.bin"
    store.download_file("checkpoint-100/optimizer.bin", dest)
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    assert store.read_text("before") == "written before the outage"  # data survived the restart
