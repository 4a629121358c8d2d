"""Shared fixtures for every test tier.

`s3` (session): a real SeaweedFS S3 server on 127.0.0.1 with signature checking, and the AWS environment of this
test process pointed at it for the rest of the session. `s3.env()` gives the same variables for subprocesses;
`s3.stop()` / `s3.start()` simulate an outage (data and ports kept); `s3.make_bucket(name)`.

`bucket` (function): a fresh, empty bucket name on that server, removed afterwards.

    @pytest.mark.integration
    def test_upload(s3, bucket, tmp_path):
        store = open_store(f"s3://{bucket}/run")
        subprocess.run([...], env={**os.environ, **s3.env()})
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from registry import Registry, find_registry  # noqa: E402
from s3server import SeaweedS3, find_weed  # noqa: E402


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    try:
        find_weed()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    server = SeaweedS3()
    # Sync-state records and download caches of this session stay out of the developer's ~/.cache.
    cache = tmp_path_factory.mktemp("dreambooth-cache")
    server.start()
    mp = pytest.MonkeyPatch()
    try:
        for name in SeaweedS3.UNSET_ENV:
            mp.delenv(name, raising=False)
        for name, value in server.env().items():
            mp.setenv(name, value)
        mp.setenv("DREAMBOOTH_CACHE", str(cache))
        yield server
    finally:
        mp.undo()
        server.close()


@pytest.fixture
def bucket(s3: SeaweedS3) -> Iterator[str]:
    # A test that stopped the server and failed before restarting it must not take the next tests down with it.
    if not s3.running:
        s3.start()
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.make_bucket(name)
    yield name
    if s3.running:
        s3.delete_bucket(name)


@pytest.fixture
def aws_env(s3: SeaweedS3) -> dict[str, str]:
    """os.environ plus the S3 settings, for subprocess.run(env=...)."""
    return {**os.environ, **s3.env()}


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A real OCI registry (docker-registry) on 127.0.0.1 for the whole session."""
    try:
        find_registry()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    reg = Registry(tmp_path_factory.mktemp("registry"))
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()
