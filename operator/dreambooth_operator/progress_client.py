"""The operator's client of rank 0's ``/progress`` (launcher contract; the trainer serves it): a short GET, None
on any failure.

A job whose trainer is busy or unreachable must not slow the operator down: one attempt, a 2 s timeout, and the
caller polls each job at most every 10 s.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

POLL_INTERVAL_SECONDS = 10.0
TIMEOUT_SECONDS = 2.0
MAX_BYTES = 1 << 20


def progress_url(pod_ip: str, port: int) -> str:
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"http://{host}:{port}/progress"


# Pod IPs are reached directly: an HTTP(S)_PROXY in the operator's environment must not capture them.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch_progress(pod_ip: str, port: int, timeout: float = TIMEOUT_SECONDS) -> dict[str, Any] | None:
    try:
        with _OPENER.open(progress_url(pod_ip, port), timeout=timeout) as resp:
            if resp.status != 200:
                return None
            data = json.loads(resp.read(MAX_BYTES))
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return data if isinstance(data, dict) else None
