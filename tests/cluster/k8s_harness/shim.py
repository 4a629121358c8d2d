"""Container shim of the process kubelet: turns one container spec into a "container" made of namespaces.

Run as ``python -I -S shim.py SPEC.json`` (standard library only, no site import: fast start). It

1. joins the container's cgroup (so every descendant, even one that starts its own session, can be killed
   with ``cgroup.kill``),
2. enters the pod's network namespace (``/var/run/netns/<name>``, made by ``ip netns add``),
3. unshares mount, UTS, IPC and PID namespaces, makes ``/`` private (nothing propagates to the host), sets the
   hostname and bind-mounts the volumes, ``/etc/hosts``, ``/etc/resolv.conf``, the termination-message file,
   a private ``/tmp`` and ``$HOME`` at their paths,
4. forks: the child is PID 1 of the new PID namespace (as in a real container: it ignores signals it has no
   handler for, orphans reparent to it, and when it exits the kernel SIGKILLs every other process in the
   namespace), mounts a fresh ``/proc``, drops to ``runAsUser``, and execs the command;
5. the parent forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to PID 1 only, waits, and exits with
   PID 1's code (128+N for signal N, as container runtimes report).

Mount sources are opened (O_PATH) before anything is mounted, so mounting a private ``/tmp`` cannot hide a
source that lives under ``/tmp``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
O_PATH = getattr(os, "O_PATH", 0o10000000)

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {source} -> {target} ({fstype})",
    )


def make_target(target: str, is_file: bool) -> None:
    if is_file:
        os.makedirs(os.path.dirname(target) or "/", exist_ok=True)
        if not os.path.exists(target):
            with open(target, "a"):
                pass
    else:
        os.makedirs(target, exist_ok=True)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    # Files the kubelet reads back live under the state dir, which a private /tmp may hide: open them first.
    err_fd = os.open(spec["errfile"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    pid_fd = os.open(spec["pidfile"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def fail(msg: str) -> None:
        os.write(err_fd, msg.encode()[:4000])
        os._exit(128)

    try:
        if spec.get("cgroup"):
            with open(os.path.join(spec["cgroup"], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        if spec.get("netns"):
            fd = os.open(spec["netns"], os.O_RDONLY)
            _check(libc.setns(fd, CLONE_NEWNET), "setns net")
            os.close(fd)
        _check(libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID), "unshare")
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        hostname = spec["hostname"].encode()
        _check(libc.sethostname(hostname, len(hostname)), "sethostname")

        mounts = spec.get("mounts", [])
        fds: list[int | None] = []
        for m in mounts:
            fds.append(os.open(m["source"], O_PATH | os.O_CLOEXEC) if m["type"] == "bind" else None)
        # Parents before children, so a volume at /tmp/x is mounted on top of the private /tmp, not under it.
        for m, fd in sorted(zip(mounts, fds, strict=True), key=lambda mf: mf[0]["target"].rstrip("/").count("/")):
            target = m["target"]
            if m["type"] == "tmpfs":
                make_target(target, False)
                mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, m.get("options") or "mode=1777")
            else:
                assert fd is not None
                make_target(target, m.get("file", False))
                mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
                if m.get("readOnly"):
                    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)
        for fd in fds:
            if fd is not None:
                os.close(fd)
    except OSError as e:
        fail(f"container setup failed: {e}")

    # Forward signals from before the fork too: a pod deleted while its shim starts must not lose its SIGTERM.
    pending: list[int] = []
    child = -1

    def forward(sig: int, _frame: object) -> None:
        if child <= 0:
            pending.append(sig)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, sig)

    forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
    for s in forwarded:
        signal.signal(s, forward)

    child = os.fork()
    if child == 0:
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            os.setsid()
            # A /proc of the new PID namespace, so `ps` and /proc/self agree with the container's view.
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            gid, uid = spec.get("gid"), spec.get("uid")
            if uid is not None or gid is not None:
                os.setgroups([int(g) for g in spec.get("groups", [])])
                if gid is not None:
                    os.setgid(int(gid))
                if uid is not None:
                    os.setuid(int(uid))
                # A credential change clears the parent-death signal: set it again.
                libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            os.chdir(spec["cwd"])
            os.umask(0o022)
            argv = spec["argv"]
            os.close(pid_fd)
            os.set_inheritable(err_fd, False)
            # Python ignores SIGPIPE/SIGXFSZ and we installed forwarders: the command starts with defaults.
            for s in (*forwarded, signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(s, signal.SIG_DFL)
            os.execvpe(argv[0], argv, spec["env"])
        except OSError as e:
            os.write(err_fd, f"failed to start container process {spec['argv'][:1]}: {e}".encode())
            os._exit(128)
        except BaseException as e:  # noqa: BLE001 - nothing may escape a forked child
            os.write(err_fd, f"container start failed: {e!r}".encode())
            os._exit(128)

    os.write(pid_fd, str(child).encode())
    os.close(pid_fd)
    os.close(err_fd)

    for sig in pending:
        forward(sig, None)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except ChildProcessError:
            os._exit(255)
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
