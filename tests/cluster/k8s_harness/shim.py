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


def memory_cgroup_of(pid: int) -> str | None:
    """Folder of a process's cgroup v1 memory group (the hierarchy's mount plus the process's path in it)."""
    mountpoint = None
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[2] == "cgroup" and "memory" in parts[3].split(","):
                mountpoint = parts[1]
    if mountpoint is None:
        return None
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return mountpoint + path.rstrip("/")
    return None


def oom_kills(memory_cgroup: str | None) -> int:
    if not memory_cgroup:
        return 0
    with contextlib.suppress(OSError), open(os.path.join(memory_cgroup, "memory.oom_control")) as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    return 0


class SignalForwarder:
    """Signals to the shim go to the container's PID 1; those that arrive before it exists wait for it (a pod
    deleted while its shim starts must not lose its SIGTERM)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.child = -1
        for sig in self.SIGNALS:
            signal.signal(sig, self)

    def __call__(self, sig: int, _frame: object = None) -> None:
        if self.child <= 0:
            self.pending.append(sig)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.child, sig)

    def replay(self) -> None:
        for sig in self.pending:
            self(sig)


def run_oci(spec: dict, err_fd: int, pid_fd: int) -> None:
    """Image mode: the container is made by an OCI runtime (runc) from the bundle the kubelet wrote.

    `runc create` makes the namespaces, mounts and cgroups (the memory limit) and leaves the container's process
    waiting; as child subreaper this shim becomes its parent, so it can wait for it, forward signals to it and
    read the OOM-kill count of its memory cgroup before `runc delete` removes the cgroup.
    """
    rt = spec["runtime"]
    base = [rt["binary"], "--root", rt["root"]]
    cid = rt["id"]
    PR_SET_CHILD_SUBREAPER = 36
    _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl subreaper")
    forwarder = SignalForwarder()

    runc_log = os.path.join(rt["bundle"], "runc.log")

    def runc(*args: str) -> tuple[int, str]:
        """Run runc with this shim's stdout/stderr (the container log: `create` hands them to the container) and
        return its exit code and the errors it logged (its --log file, not a pipe the container would inherit)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(runc_log)
        pid = os.fork()
        if pid == 0:
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            for s in SignalForwarder.SIGNALS:
                signal.signal(s, signal.SIG_DFL)
            os.execv(base[0], [base[0], "--log", runc_log, "--log-format", "json", *base[1:], *args])
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        errors = []
        with contextlib.suppress(OSError), open(runc_log) as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("level") in ("error", "fatal"):
                        errors.append(entry.get("msg", ""))
        return os.waitstatus_to_exitcode(status), "; ".join(errors)

    pidfile = rt["pidfile"]
    rc, err = runc("create", "--bundle", rt["bundle"], "--pid-file", pidfile, cid)
    if rc != 0:
        runc("delete", "--force", cid)
        os.write(err_fd, f"runc create failed: {err}".encode()[:4000])
        os._exit(128)
    with open(pidfile) as f:
        child = int(f.read().strip())
    forwarder.child = child
    memory_cgroup = None
    with contextlib.suppress(OSError):
        memory_cgroup = memory_cgroup_of(child)
    rc, err = runc("start", cid)
    if rc != 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        runc("delete", "--force", cid)
        os.write(err_fd, f"runc start failed: {err}".encode()[:4000])
        os._exit(128)
    os.write(pid_fd, str(child).encode())
    os.close(pid_fd)
    forwarder.replay()
    status = 0
    while True:
        try:
            pid, st = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            break
        if pid == child:
            status = st
            break
    kills = oom_kills(memory_cgroup)
    if kills:
        with open(spec["oomfile"], "w") as f:
            f.write(str(kills))
    runc("delete", "--force", cid)
    os.close(err_fd)
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


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
        if spec.get("runtime"):
            run_oci(spec, err_fd, pid_fd)
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

    forwarder = SignalForwarder()

    child = os.fork()
    forwarder.child = child
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
            for s in (*SignalForwarder.SIGNALS, signal.SIGPIPE, signal.SIGXFSZ):
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

    forwarder.replay()
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
