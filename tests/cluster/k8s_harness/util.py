"""Small helpers shared by the control plane and the process kubelet."""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import re
import socket
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    """MicroTime, as Lease.spec.renewTime wants it."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(s: str) -> float:
    return dt.datetime.strptime(s.replace(".000000", "")[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC).timestamp()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller starts its server at once; races are unlikely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WaitAbort(Exception):
    """Raised inside a ``wait_until`` predicate to stop waiting at once (e.g. the awaited process died)."""


def wait_until(fn: Callable[[], T], timeout: float, interval: float = 0.1, what: str = "condition") -> T:
    """Call ``fn`` until it returns something truthy; return that, or raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            v = fn()
            if v:
                return v
        except WaitAbort:
            raise
        except Exception as e:  # noqa: BLE001 - retried until the deadline, then reported
            last_exc = e
        if time.monotonic() > deadline:
            extra = f" (last error: {last_exc!r})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


_SUFFIX = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}
_QTY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|)$")


def parse_quantity(q: str | int | float) -> Decimal:
    """Kubernetes resource quantity ("500m", "2Gi", "1e3") → Decimal."""
    if isinstance(q, int | float):
        return Decimal(str(q))
    m = _QTY.match(q.strip())
    if not m:
        raise ValueError(f"bad quantity {q!r}")
    num, suf = m.groups()
    if suf and suf[0] in "eE":
        return Decimal(num) * (Decimal(10) ** int(suf[1:]))
    return Decimal(num) * Decimal(_SUFFIX[suf])


def quantity_ceil_div(value: Decimal, divisor: Decimal) -> str:
    return str(math.ceil(value / divisor))


def expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known names are replaced, unknown ones kept, ``$$`` escapes."""
    out = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "$" and i + 1 < len(s):
            nxt = s[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                j = s.find(")", i + 2)
                if j != -1:
                    name = s[i + 2 : j]
                    out.append(env[name] if name in env else s[i : j + 1])
                    i = j + 1
                    continue
        out.append(c)
        i += 1
    return "".join(out)


def proc_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a PID, so a recycled PID is never mistaken for ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def pid_is(pid: int, start_time: int | None) -> bool:
    """True while ``pid`` is that same process and not yet dead (a zombie waiting to be reaped counts as dead)."""
    st = proc_start_time(pid)
    return st is not None and (start_time is None or st == start_time) and not _is_zombie(pid)


def kill_pid(pid: int, start_time: int | None, timeout: float = 10.0) -> None:
    """SIGTERM a process we started (if it is still the same process), SIGKILL after ``timeout``."""
    import signal

    if not pid_is(pid, start_time):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_is(pid, start_time) or _is_zombie(pid):
            _reap(pid)
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _reap(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
