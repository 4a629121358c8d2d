"""OCI runtime bundles for image containers: what containerd's CRI plugin would hand to runc, minus seccomp.

The rootfs is an overlay (the cached, read-only image below, a per-container writable layer above) mounted by
the kubelet; this module only writes ``config.json``. The network namespace is the pod's existing one (made by
``netns.py``), so the kubelet's node helpers (node lost cuts the pod's veth, DNS, host ports) work unchanged.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

# Docker's / containerd's default capability set.
DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
]  # fmt: skip
MASKED = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
]  # fmt: skip
READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def find_runtime() -> str | None:
    """runc (Debian's; crun 1.8 refuses this machine's hybrid cgroup layout, where cgroup v2 holds hugetlb)."""
    return shutil.which("runc")


def base_mounts(shm_bytes: int = 64 << 20) -> list[dict[str, Any]]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", f"size={shm_bytes}"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    ]  # fmt: skip


def bind(source: str, destination: str, read_only: bool = False) -> dict[str, Any]:
    return {
        "destination": destination,
        "type": "bind",
        "source": source,
        "options": ["rbind", "rprivate", "ro" if read_only else "rw"],
    }


def write_config(
    bundle: Path,
    *,
    rootfs: Path,
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    uid: int,
    gid: int,
    groups: list[int],
    hostname: str,
    netns: str | None,
    mounts: list[dict[str, Any]],
    read_only_root: bool,
    no_new_privileges: bool,
    cgroups_path: str,
    memory_limit: int | None,
) -> Path:
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if memory_limit:
        # No swap on these machines; memsw would only matter with swap.
        resources["memory"] = {"limit": memory_limit}
    namespaces: list[dict[str, Any]] = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    namespaces.append({"type": "network", "path": netns} if netns else {"type": "network"})
    config = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid, "additionalGids": groups},
            "args": argv,
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": cwd,
            "capabilities": {k: list(DEFAULT_CAPS) for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": no_new_privileges,
        },
        "root": {"path": str(rootfs), "readonly": read_only_root},
        "hostname": hostname,
        "mounts": [*base_mounts(), *mounts],
        "linux": {
            "namespaces": namespaces,
            "cgroupsPath": cgroups_path,
            "resources": resources,
            "maskedPaths": MASKED,
            "readonlyPaths": READONLY,
        },
    }
    bundle.mkdir(parents=True, exist_ok=True)
    path = bundle / "config.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def mount_overlay(lower: Path, bundle: Path) -> Path:
    """A fresh writable layer over the cached image: what the container changes dies with this bundle."""
    upper, work, root = bundle / "upper", bundle / "work", bundle / "rootfs"
    for d in (upper, work, root):
        d.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", str(root)],
        check=True,
        capture_output=True,
        text=True,
    )
    return root


def unmount(root: Path) -> None:
    subprocess.run(["umount", "-l", str(root)], capture_output=True)
