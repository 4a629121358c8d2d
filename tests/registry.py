"""A real OCI registry for tests: Debian's `docker-registry` (the CNCF distribution registry 2.8) on 127.0.0.1.

Plain HTTP on loopback, no auth, storage in a folder of its own; started by tests like SeaweedFS. Clients talk
to it as to any insecure registry: `buildah push --tls-verify=false`, `helm push --plain-http`.

    reg = Registry(Path("/tmp/reg")); reg.start()
    reg.host                         # "127.0.0.1:PORT": image references are f"{reg.host}/dreambooth-trainer:0.2.0"
    reg.manifest_digest("dreambooth-trainer", "0.2.0")
    reg.stop()

Needs `apt-get install docker-registry` (scripts/test.sh installs it for the tiers that use it).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REGISTRY_BINARY = "/usr/bin/docker-registry"
_MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)


def find_registry() -> str:
    found = shutil.which("docker-registry") or (REGISTRY_BINARY if Path(REGISTRY_BINARY).exists() else None)
    if not found:
        raise FileNotFoundError("docker-registry not found: apt-get install docker-registry (Debian's package)")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """One `docker-registry serve` process; its data folder outlives stop() so a restart keeps the images."""

    def __init__(self, root: Path | None = None, port: int | None = None) -> None:
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="dreambooth-registry-"))
        self.port = port or _free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log_path(self) -> Path:
        return self.root / "registry.log"

    def _config(self) -> Path:
        # JSON is YAML: no yaml dependency for the harness.
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(self.root / "data")}, "delete": {"enabled": True}},
            "http": {"addr": self.host},
        }
        path = self.root / "config.yml"
        path.write_text(json.dumps(config))
        return path

    def start(self, timeout: float = 30) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self._proc = subprocess.Popen(
                [find_registry(), "serve", str(self._config())], stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"docker-registry exited {self._proc.returncode}: {self.log_path.read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"docker-registry on {self.host} not ready in {timeout}s")

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def tags(self, repository: str) -> list[str]:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/{repository}/tags/list", timeout=10) as resp:
                return json.load(resp).get("tags") or []
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return []
            raise

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        """The digest the registry serves for `repository:reference` (None when it has no such manifest)."""
        req = urllib.request.Request(
            f"{self.url}/v2/{repository}/manifests/{reference}", method="HEAD", headers={"Accept": _MANIFEST_TYPES}
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.headers.get("Docker-Content-Digest")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
