"""Image pulls for the process kubelet: the OCI distribution API over plain HTTP, a content-addressed cache.

A reference ``host[:port]/repo[:tag][@sha256:...]`` is resolved to a manifest (an index is narrowed to
linux/amd64), its config and layer blobs are fetched once into ``<cache>/blobs/sha256/`` (digests verified), and
the layers are unpacked once per image (keyed by the config digest, i.e. the image ID) into
``<cache>/rootfs/<id>/`` in order, whiteouts honoured: ``.wh.<name>`` removes ``name`` of the layers below,
``.wh..wh..opq`` empties its folder first. Containers never write there: the kubelet mounts an overlay per
container on top (``overlay_mount``).

Standard library only (the kubelet runs in the test venv, the image cache is shared by every cluster on the
machine under a file lock). Registries are reached with plain HTTP (the tests' registry on 127.0.0.1); the
Docker Hub default (``docker.io``) is tried like any other host and fails with ErrImagePull here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json")
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def default_cache() -> Path:
    base = os.environ.get("DREAMBOOTH_KUBELET_IMAGE_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "dreambooth-operator" / "kubelet-images"


class PullError(Exception):
    """The image could not be pulled (ErrImagePull): the message names the reference and the cause."""


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, ref: str) -> Reference:
        name, digest = (ref.split("@", 1) + [None])[:2] if "@" in ref else (ref, None)
        assert name is not None
        first, _, rest = name.partition("/")
        if rest and ("." in first or ":" in first or first == "localhost"):
            registry, path = first, rest
        else:
            registry, path = "docker.io", name if "/" in name else f"library/{name}"
        tag = None
        if ":" in path.rsplit("/", 1)[-1]:
            path, tag = path.rsplit(":", 1)
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, path, tag, digest)

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest when given (it wins over the tag, as in containerd)."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


@dataclass
class Image:
    ref: str
    digest: str  # of the manifest: status.imageID is "<repo>@<digest>" as on a real node
    id: str  # of the config
    config: dict[str, Any]
    rootfs: Path
    size: int = 0
    pulled: bool = field(default=False)

    @property
    def image_id(self) -> str:
        r = Reference.parse(self.ref)
        return f"{r.registry}/{r.repository}@{self.digest}"

    @property
    def run_config(self) -> dict[str, Any]:
        return self.config.get("config") or {}


class ImageStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_cache()
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "rootfs").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ registry API
    def _get(self, url: str, accept: str | None = None) -> tuple[bytes, dict[str, str]]:
        req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - the tests' registry
                return resp.read(), {k.lower(): v for k, v in resp.headers.items()}
        except urllib.error.HTTPError as e:
            body = e.read()[:300].decode("utf-8", "replace")
            if e.code == 404:
                raise PullError(
                    f"not found in the registry (check the name and tag, and that it was pushed): {body.strip() or url}"
                ) from e
            if e.code in (401, 403):
                raise PullError(f"pull access denied ({e.code}): {body.strip()}") from e
            raise PullError(f"registry answered {e.code} for {url}: {body.strip()}") from e
        except (urllib.error.URLError, OSError) as e:
            host = urllib.parse.urlsplit(url).netloc
            raise PullError(f"cannot reach the registry at {host}: {getattr(e, 'reason', e)}") from e

    def resolve(self, ref: str) -> tuple[str, dict[str, Any]]:
        """The manifest digest and manifest of ``ref`` (an index narrowed to linux/amd64)."""
        r = Reference.parse(ref)
        base = f"http://{r.registry}/v2/{r.repository}"
        data, headers = self._get(f"{base}/manifests/{r.reference}", MANIFEST_TYPES)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if r.digest and digest != r.digest:
            raise PullError(f"manifest digest mismatch: asked for {r.digest}, got {digest}")
        manifest = json.loads(data)
        mtype = manifest.get("mediaType") or headers.get("content-type", "")
        if mtype in INDEX_TYPES or "manifests" in manifest:
            plat = [
                m
                for m in manifest.get("manifests") or []
                if (m.get("platform") or {}).get("os", "linux") == "linux"
                and (m.get("platform") or {}).get("architecture", "amd64") == "amd64"
            ]
            if not plat:
                raise PullError("no linux/amd64 image in the index")
            data, _ = self._get(f"{base}/manifests/{plat[0]['digest']}", MANIFEST_TYPES)
            manifest = json.loads(data)
        return digest, manifest

    def _blob(self, r: Reference, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64:
            raise PullError(f"unsupported digest {digest}")
        path = self.root / "blobs" / "sha256" / hexd
        if path.exists():
            return path
        url = f"http://{r.registry}/v2/{r.repository}/blobs/{digest}"
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    with urllib.request.urlopen(url, timeout=120) as resp:  # noqa: S310 - the tests' registry
                        while chunk := resp.read(1 << 20):
                            h.update(chunk)
                            out.write(chunk)
                except urllib.error.HTTPError as e:
                    raise PullError(f"blob {digest}: registry answered {e.code}") from e
                except (urllib.error.URLError, OSError) as e:
                    raise PullError(f"blob {digest}: {getattr(e, 'reason', e)}") from e
            if h.hexdigest() != hexd:
                raise PullError(f"blob {digest}: content does not match its digest")
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return path

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        lock = self.root / "locks" / name
        lock.parent.mkdir(exist_ok=True)
        with open(lock, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def pull(self, ref: str) -> Image:
        """Resolve ``ref`` at the registry now, fetch what the cache lacks, unpack once; PullError on failure."""
        r = Reference.parse(ref)
        digest, manifest = self.resolve(ref)
        config_desc = manifest.get("config") or {}
        if "digest" not in config_desc:
            raise PullError(f"manifest {digest} has no config (schema 1 manifests are not supported)")
        image_id = config_desc["digest"]
        config = json.loads(self._blob(r, image_id).read_bytes())
        layers = manifest.get("layers") or []
        rootfs = self.root / "rootfs" / image_id.split(":", 1)[1]
        pulled = False
        if not (rootfs / ".complete").exists():
            with self._locked(image_id.split(":", 1)[1]):
                if not (rootfs / ".complete").exists():
                    blobs = [self._blob(r, layer["digest"]) for layer in layers]
                    self._unpack(blobs, rootfs)
                    pulled = True
        size = sum(int(layer.get("size", 0)) for layer in layers)
        return Image(ref, digest, image_id, config, rootfs / "fs", size, pulled)

    def cached(self, image_id: str) -> bool:
        return (self.root / "rootfs" / image_id.split(":", 1)[1] / ".complete").exists()

    # ------------------------------------------------------------------ unpacking
    def _unpack(self, blobs: list[Path], dest: Path) -> None:
        shutil.rmtree(dest, ignore_errors=True)
        work = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(work, ignore_errors=True)
        fs = work / "fs"
        fs.mkdir(parents=True)
        for blob in blobs:
            apply_layer(blob, fs)
        (work / ".complete").write_text("\n".join(b.name for b in blobs) + "\n")
        work.rename(dest)


def _inside(root: Path, rel: str) -> Path:
    """``root/rel`` after checking no existing symlink on the way leads outside ``root`` (a layer is data)."""
    rel = rel.lstrip("./").lstrip("/")
    p = root / rel
    parent = os.path.realpath(p.parent)
    if parent != str(root) and not parent.startswith(str(root) + os.sep):
        raise PullError(f"layer entry {rel!r} would be written outside the image through a symlink")
    return p


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file() or (p.exists() and not p.is_dir()):
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p)


def apply_layer(blob: Path, fs: Path) -> None:
    """Apply one layer tarball (gzip, zstd or plain) on ``fs``: whiteouts first, then the layer's files."""
    fs = Path(os.path.realpath(fs))
    names = layer_names(blob)
    for name in names:
        base = os.path.basename(name.rstrip("/"))
        if not base.startswith(WHITEOUT):
            continue
        folder = _inside(fs, os.path.dirname(name.rstrip("/")) or ".")
        if base == OPAQUE:
            if folder.is_dir() and not folder.is_symlink():
                for child in folder.iterdir():
                    _remove(child)
        else:
            target = folder / base[len(WHITEOUT) :]
            if target.exists() or target.is_symlink():
                _remove(target)
    for name in names:
        if not os.path.basename(name.rstrip("/")).startswith(WHITEOUT):
            _inside(fs, name)
    # GNU tar: fast, keeps owners (numeric), modes, hard links, device files, xattrs-free.
    proc = subprocess.run(
        ["tar", "-x", "-f", str(blob), "-C", str(fs), "--numeric-owner", "-p", "--same-owner",
         "--wildcards", "--exclude=.wh.*", "--exclude=*/.wh.*"],
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        raise PullError(f"unpacking layer {blob.name}: {proc.stderr.strip()[-500:]}")


def layer_names(blob: Path) -> list[str]:
    """Entry names of a layer (GNU tar detects gzip/zstd/plain; ~2x faster than tarfile)."""
    out = subprocess.run(["tar", "-t", "-f", str(blob), "--quoting-style=literal"], capture_output=True, text=True)
    if out.returncode != 0:
        raise PullError(f"reading layer {blob.name}: {out.stderr.strip()[-500:]}")
    return out.stdout.splitlines()


# ---------------------------------------------------------------------- image config → container
def resolve_user(rootfs: Path, user: str) -> tuple[int | None, int | None, str]:
    """USER of an image ("", "name", "uid", "uid:gid", "name:group") → (uid, gid, error) read from its files."""
    if not user:
        return 0, 0, ""
    name, _, group = user.partition(":")

    def lookup(path: str, key: str) -> list[str] | None:
        with contextlib.suppress(OSError):
            for line in (rootfs / path).read_text().splitlines():
                parts = line.split(":")
                if len(parts) >= 4 and parts[0] == key:
                    return parts
        return None

    uid: int | None
    gid: int | None = None
    if name.isdigit():
        uid = int(name)
        entry = None
        with contextlib.suppress(OSError):
            for line in (rootfs / "etc/passwd").read_text().splitlines():
                parts = line.split(":")
                if len(parts) >= 4 and parts[2] == name:
                    entry = parts
                    break
        gid = int(entry[3]) if entry else uid if not group else None
    else:
        entry = lookup("etc/passwd", name)
        if entry is None:
            return None, None, f"unable to find user {name}: no matching entries in passwd file"
        uid, gid = int(entry[2]), int(entry[3])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            g = lookup("etc/group", group)
            if g is None:
                return None, None, f"unable to find group {group}: no matching entries in group file"
            gid = int(g[2])
    return uid, gid if gid is not None else uid, ""


def container_argv(image_config: dict[str, Any], command: list[str], args: list[str]) -> list[str]:
    """Kubernetes' rule: command replaces ENTRYPOINT (and drops CMD), args replace CMD."""
    entrypoint = list(image_config.get("Entrypoint") or [])
    cmd = list(image_config.get("Cmd") or [])
    if command:
        return [*command, *args]
    return [*entrypoint, *(args if args else cmd)]


def image_env(image_config: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in image_config.get("Env") or []:
        k, _, v = item.partition("=")
        env[k] = v
    return env
