"""Container images for every test tier: the Dockerfile built with Debian's buildah (no daemon), run with runc.

Shared by tests/packaging (builds and runs the images), tests/cluster (runs pods from them), scripts/release.sh's
test and benchmarks/artifacts.py. ``tests/conftest.py`` puts this folder on ``sys.path``: ``import images``.

No container registry with official images is reachable here, so the base image is made locally: a Debian
bookworm root from debootstrap (Debian's Python 3.11, python3-venv) committed once as :data:`BASE_IMAGE` and
passed as ``--build-arg PYTHON_IMAGE``, pinned by its digest (:meth:`Buildah.base_reference`) as a release pins
the official image. Python packages come from a wheelhouse (:func:`wheelhouse`: ``pip download`` of the locks
through this machine's pip and its cache, plus the CPU torch wheel pip finds here) handed to the build as the
``wheels`` build context with ``PIP_NO_INDEX=1``: the build reaches no index at all.

Storage (base image, layers, wheelhouse) lives in ``$DREAMBOOTH_BUILDAH_CACHE`` (default
``~/.cache/dreambooth-operator/buildah``), never in the system's /var/lib/containers. Disk: base ~0.3 GB,
operator image ~0.25 GB, CPU trainer ~1.5 GB, wheelhouse ~0.3 GB; the CUDA trainer (opt-in tier ``cuda_image``,
:func:`cuda_buildah`) adds 5.4 GB, ~15 GB at the peak of its build.

    b = images.buildah_or_skip()          # root + buildah + debootstrap, base image made (once)
    ref = images.build(b, "trainer-cpu")  # "localhost/dreambooth-trainer:test-cpu"
    rel = images.release(b, registry.host, helm_path)   # scripts/release.sh; rel.pinned("trainer-cpu")
    proc = images.run_container(b, ref, ["dreambooth", "--help"], user="1000:1000", read_only=True,
                                tmpfs=["/tmp", "/home/trainer/.cache"])

Containers run with runc (:data:`RUNTIME`), not crun: this machine mounts cgroup v1 with a cgroup2 hierarchy
beside it holding a controller (hybrid mode), and crun 1.8 refuses to start anything there ("cgroups in hybrid
mode not supported, drop all controllers from cgroupv2"), even with ``--cgroup-manager=disabled``.

Needs root and ``apt-get install buildah debootstrap runc``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Named after the official image it stands in for; a new name whenever make_base_image changes what it makes,
# so a machine's cached base is never silently stale.
BASE_IMAGE = "localhost/dreambooth-test/python:3.11-slim-bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# python-is-python3: the Dockerfile says `python`, as the official image does.
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
LOCKS = {
    "operator": REPO / "docker" / "requirements-operator.txt",
    "trainer": REPO / "docker" / "requirements-trainer.txt",
}
# The base stage's build tools (Dockerfile: `pip install pip==... setuptools==... wheel==...`).
BUILD_TOOLS = ("pip==25.3", "setuptools==80.9.0", "wheel==0.45.1")
TORCH_CPU = "torch==2.13.0+cpu"
RUNTIME = os.environ.get("DREAMBOOTH_OCI_RUNTIME", "runc")


def cache_dir() -> Path:
    base = os.environ.get("DREAMBOOTH_BUILDAH_CACHE") or str(Path.home() / ".cache" / "dreambooth-operator" / "buildah")
    return Path(base)


class Buildah:
    """buildah on storage of our own (overlay under ``root``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Our own storage (overlay on this machine's ext4), never the system's /var/lib/containers.
        self.base = [
            "buildah",
            "--root",
            str(root / "storage"),
            "--runroot",
            str(root / "run"),
            "--storage-driver",
            "overlay",
        ]

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"buildah {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    def has_image(self, name: str) -> bool:
        # (buildah 1.28 has no `image exists`.)
        return self("inspect", "--type", "image", name, check=False).returncode == 0

    def inspect(self, image: str) -> dict:
        return json.loads(self("inspect", "--type", "image", image).stdout)

    def config(self, image: str) -> dict:
        """The OCI image config's ``config`` (User, Env, Entrypoint, Cmd, WorkingDir, ...)."""
        return self.inspect(image)["OCIv1"]["config"]

    def digest(self, image: str) -> str:
        """The manifest digest of a local image (what ``name@sha256:...`` refers to)."""
        return self.inspect(image)["FromImageDigest"]

    def size(self, image: str) -> int:
        """Uncompressed size in bytes (what the image takes on a node's disk): its layers' tar sizes."""
        manifest = json.loads(self.inspect(image)["Manifest"])
        return sum(int(layer["size"]) for layer in manifest["layers"])

    def base_reference(self) -> str:
        """:data:`BASE_IMAGE` pinned by digest, as the release pins the official image."""
        return f"{BASE_IMAGE}@{self.digest(BASE_IMAGE)}"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Two test runs on one machine must not debootstrap or commit into the same storage at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def make_base_image(b: Buildah) -> None:
    with tempfile.TemporaryDirectory(dir=b.root) as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(rootfs), DEBIAN_MIRROR],
            check=True, capture_output=True, timeout=900,
        )  # fmt: skip
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(rootfs / junk, ignore_errors=True)
        _slim(rootfs)
        # This machine reaches PyPI through a TLS-inspecting proxy whose CA only the host's bundle holds: the stand-in
        # base trusts what the host trusts, so pip inside a build without the wheelhouse can verify PyPI. (An
        # official image on a normal network needs neither.)
        if HOST_CA_BUNDLE.exists():
            shutil.copyfile(HOST_CA_BUNDLE, rootfs / "etc" / "ssl" / "certs" / "ca-certificates.crt")
        ctr = b("from", "scratch").stdout.strip()
        try:
            b("copy", ctr, f"{rootfs}/", "/")
            b("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "--env", "LANG=C.UTF-8", "--env", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt", ctr)  # fmt: skip
            b("commit", "--quiet", ctr, BASE_IMAGE)
        finally:
            b("rm", ctr, check=False)


def _slim(rootfs: Path) -> None:
    """What Debian's -slim images leave out (and the official Python image with them): manuals, translations,
    documentation but the copyright files. Without this the stand-in base is ~50 MB larger than the release's."""
    for folder in ("usr/share/man", "usr/share/locale", "usr/share/info", "usr/share/groff", "usr/share/lintian"):
        shutil.rmtree(rootfs / folder, ignore_errors=True)
    for path in sorted((rootfs / "usr/share/doc").rglob("*"), reverse=True):
        if path.is_file() or path.is_symlink():
            if path.name != "copyright":
                path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    # As in debian:bookworm-slim: later apt-get installs leave them out too.
    (rootfs / "etc/dpkg/dpkg.cfg.d/docker").write_text(
        "path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\npath-exclude /usr/share/man/*\n"
        "path-exclude /usr/share/groff/*\npath-exclude /usr/share/info/*\npath-exclude /usr/share/lintian/*\n"
        "path-exclude /usr/share/locale/*\n"
    )


def missing_tools(tools: Sequence[str] = ("buildah", "debootstrap", RUNTIME)) -> list[str]:
    return [tool for tool in tools if not shutil.which(tool)]


def buildah_or_skip() -> Buildah:
    """The cached Buildah with :data:`BASE_IMAGE` made; skips without root, fails without the tools."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("buildah's chroot isolation and overlay storage need root here")
    missing = missing_tools()
    if missing:
        pytest.fail(f"{' and '.join(missing)} not installed: apt-get install -y buildah debootstrap runc")
    return ensure_base()


def ensure_base(root: Path | None = None) -> Buildah:
    b = Buildah(root or cache_dir())
    b.root.mkdir(parents=True, exist_ok=True)
    with locked(b.root / ".lock"):
        if not b.has_image(BASE_IMAGE):
            make_base_image(b)
    return b


def cuda_buildah() -> Buildah:
    """Storage of its own for the CUDA trainer (opt-in tier): its ~10 min, ~10 GB build must not hold the shared
    cache's lock, which every other image test waits on. The base image is copied over once, by digest."""
    shared = ensure_base()
    b = Buildah(shared.root / "cuda")
    b.root.mkdir(parents=True, exist_ok=True)
    with locked(b.root / ".lock"):
        if not b.has_image(BASE_IMAGE):
            store = f"containers-storage:[overlay@{b.root / 'storage'}+{b.root / 'run'}]{BASE_IMAGE}"
            with locked(shared.root / ".lock"):
                shared("push", "--quiet", BASE_IMAGE, store)
    return b


# ------------------------------------------------------------------------------------------------ wheelhouse
def wheelhouse(root: Path | None = None) -> Path:
    """Every wheel the Dockerfile installs (both locks, the build tools, the CPU torch), from this machine's pip.

    ``pip download`` goes through the host's pip configuration and cache, so a warm machine copies files and a
    cold one downloads each wheel once. Re-run when a lock changes (pip skips files already there).
    """
    root = root or cache_dir()
    out = root / "wheelhouse"
    stamp = out / ".complete"
    inputs = "".join(p.read_text() for p in LOCKS.values()) + " ".join(BUILD_TOOLS) + TORCH_CPU
    with locked(root / ".wheelhouse.lock"):
        if stamp.exists() and stamp.read_text() == inputs:
            return out
        out.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(out)]
        # The locks are complete (test_dockerfile checks it): --no-deps keeps pip from resolving anew.
        for lock in LOCKS.values():
            _run([*pip, "--no-deps", "-r", str(lock)], timeout=1800)
        _run([*pip, "--no-deps", *BUILD_TOOLS], timeout=600)
        _run([*pip, "--no-deps", TORCH_CPU], timeout=1800)
        stamp.write_text(inputs)
    return out


def _run(cmd: list[str], timeout: float) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------------- builds
@dataclass(frozen=True)
class Variant:
    """One image the Dockerfile makes: its target and build args."""

    target: str
    tag: str
    build_args: dict[str, str] = field(default_factory=dict)


VARIANTS = {
    "operator": Variant("operator", "localhost/dreambooth-operator:test"),
    "trainer-cpu": Variant("trainer", "localhost/dreambooth-trainer:test-cpu", {"TORCH_VARIANT": "cpu"}),
    # PyPI's CUDA torch and its ~3 GB of NVIDIA libraries, xformers and bitsandbytes: opt-in (cuda_image marker).
    "trainer-cuda": Variant("trainer", "localhost/dreambooth-trainer:test-cuda", {"TORCH_VARIANT": "cuda"}),
}


def build_command(
    variant: Variant,
    tag: str,
    base: str,
    wheels: Path | None,
    extra_args: dict[str, str] | None = None,
    context: Path | None = None,
) -> list[str]:
    """``buildah bud`` arguments (after the storage flags) for one variant; release.sh builds the same way.
    ``context``: another build context (a copy of the repository's) instead of the repository itself."""
    args = {"PYTHON_IMAGE": base, **variant.build_args, **(extra_args or {})}
    cmd = ["bud", "--pull=never", "--isolation", "chroot", "--network", "host", "--layers", "--target", variant.target]
    for key, value in args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    if wheels is not None:
        # Only what the wheelhouse holds is installed: no index is reached inside the build.
        cmd += ["--build-context", f"wheels={wheels}", "--build-arg", "PIP_NO_INDEX=1"]
    where = context or Path(".")
    return [*cmd, "-t", tag, "-f", str(where / "Dockerfile"), str(where)]


def build(b: Buildah, name: str, tag: str | None = None, *, offline: bool = True, timeout: float = 3600) -> str:
    """Build a :data:`VARIANTS` entry from the pinned base (layers cached); returns the tag."""
    variant = VARIANTS[name]
    tag = tag or variant.tag
    wheels = wheelhouse(b.root) if offline else None
    with locked(b.root / ".lock"):
        b(*build_command(variant, tag, b.base_reference(), wheels), timeout=timeout)
        # Layers of earlier builds that no tag points at any more: keep the cache from growing run after run.
        b("rmi", "--prune", check=False)
    return tag


# ------------------------------------------------------------------------------------------------------- run
def run_container(
    b: Buildah,
    image: str,
    args: Sequence[str] | None = None,
    *,
    entrypoint: Sequence[str] | None = None,
    user: str | None = None,
    read_only: bool = True,
    tmpfs: Sequence[str] = (),
    binds: Sequence[tuple[str, str, bool]] = (),
    env: dict[str, str] | None = None,
    workdir: str | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run ``image`` with runc the way a kubelet would: the image's ENTRYPOINT/CMD/ENV/WORKDIR/USER unless given.

    ``args`` replaces CMD, ``entrypoint`` replaces ENTRYPOINT (a pod's ``args``/``command``). ``read_only`` mounts
    the image's root filesystem read-only (``readOnlyRootFilesystem``); ``tmpfs`` paths get an empty tmpfs owned
    by the container's user (an ``emptyDir`` with ``medium: Memory``); ``binds`` are ``(host, container, ro)``.
    The container shares the host network (a test has no CNI) but has its own PID, mount, IPC and UTS namespaces.
    """
    config = b.config(image)
    entry = list(entrypoint) if entrypoint is not None else list(config.get("Entrypoint") or [])
    cmd = list(args) if args is not None else ([] if entrypoint is not None else list(config.get("Cmd") or []))
    process_args = entry + cmd
    if not process_args:
        raise ValueError(f"{image}: no ENTRYPOINT/CMD and no command given")
    uid, gid = _user(user or config.get("User") or "0")
    environ = dict(e.split("=", 1) for e in config.get("Env") or [])
    environ.update(env or {})
    name = f"dbt-{uuid.uuid4().hex[:12]}"
    ctr = b("from", "--pull=never", "--name", name, image).stdout.strip()
    try:
        rootfs = b("mount", ctr).stdout.strip()
        with tempfile.TemporaryDirectory(prefix="oci-bundle-") as bundle:
            spec = _oci_spec(
                rootfs=rootfs,
                args=process_args,
                uid=uid,
                gid=gid,
                env=environ,
                cwd=workdir or config.get("WorkingDir") or "/",
                read_only=read_only,
                tmpfs=tmpfs,
                binds=binds,
                hostname=name,
            )
            (Path(bundle) / "config.json").write_text(json.dumps(spec))
            return subprocess.run(
                [RUNTIME, "run", "--bundle", bundle, name], capture_output=True, text=True, timeout=timeout
            )
    finally:
        subprocess.run([RUNTIME, "delete", "--force", name], capture_output=True)
        b("umount", ctr, check=False)
        b("rm", ctr, check=False)


def _user(user: str) -> tuple[int, int]:
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise ValueError(f"user {user!r}: give numeric uid[:gid] (a kubelet cannot read the image's /etc/passwd)")
    return int(uid), int(gid or uid)


def _oci_spec(
    *,
    rootfs: str,
    args: list[str],
    uid: int,
    gid: int,
    env: dict[str, str],
    cwd: str,
    read_only: bool,
    tmpfs: Sequence[str],
    binds: Sequence[tuple[str, str, bool]],
    hostname: str,
) -> dict:
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    caps = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_NET_BIND_SERVICE",
    ]
    mounts: list[dict] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "size=1g"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        # Name resolution as on the host (kubelets write these files into every container).
        {"destination": "/etc/resolv.conf", "type": "bind", "source": "/etc/resolv.conf", "options": ["rbind", "ro"]},
        {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts", "options": ["rbind", "ro"]},
    ]  # fmt: skip
    for path in tmpfs:
        # runc gives a tmpfs the mode of the folder it covers (a `mode=` option is overridden), so the container's
        # user owns it, as fsGroup makes a pod's emptyDir writable by its user.
        options = ["nosuid", "nodev", f"uid={uid}", f"gid={gid}"]
        mounts.append({"destination": path, "type": "tmpfs", "source": "tmpfs", "options": options})
    for host, target, ro in binds:
        mounts.append(
            {"destination": target, "type": "bind", "source": host, "options": ["rbind", "ro" if ro else "rw"]}
        )
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": cwd,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            # The caller's own limits: a container may not raise them (no CAP_SYS_RESOURCE in a test sandbox).
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile[1], "soft": nofile[1]}],
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": read_only},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }


# --------------------------------------------------------------------------------------------------- release
RELEASE_LINE = re.compile(r"^\s+(\S+)\s+(\S+)@(sha256:[0-9a-f]{64})$")


@dataclass(frozen=True)
class Released:
    """What scripts/release.sh printed: name (operator, trainer-cpu, trainer, chart) -> reference and digest."""

    refs: dict[str, tuple[str, str]]
    output: str

    def pinned(self, name: str) -> str:
        """``reference@digest`` (for the chart: ``oci://host/charts/dreambooth-operator@digest``)."""
        ref, digest = self.refs[name]
        return f"{ref.rsplit(':', 1)[0] if name == 'chart' else ref}@{digest}"


def release(
    b: Buildah, registry_host: str, helm: Path, version: str | None = None, *, skip_cuda: bool = True
) -> Released:
    """Run scripts/release.sh against a plain-HTTP registry from the tests' cache (base, wheelhouse, layers).

    Builds with the same arguments as :func:`build`, so a warm cache makes it a push. ``version`` defaults to the
    tree's (release.sh refuses any other)."""
    version = version or _tree_version()
    env = {
        **os.environ,
        "BUILDAH": " ".join(b.base),
        "BASE_IMAGE": b.base_reference(),
        "RELEASE_WHEELS": str(wheelhouse(b.root)),
        "RELEASE_PIP_NO_INDEX": "1",
        "RELEASE_SKIP_CUDA": "1" if skip_cuda else "0",
        "RELEASE_PLAIN_HTTP": "1",
        "HELM": str(helm),
    }
    with locked(b.root / ".lock"):
        proc = subprocess.run(
            ["bash", str(REPO / "scripts" / "release.sh"), version, registry_host],
            capture_output=True, text=True, timeout=7200, env=env, cwd=REPO,
        )  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(
            f"release.sh {version} {registry_host} failed:\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}"
        )
    refs = {m.group(1): (m.group(2), m.group(3)) for m in map(RELEASE_LINE.match, proc.stdout.splitlines()) if m}
    return Released(refs, proc.stderr + proc.stdout)


def _tree_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
