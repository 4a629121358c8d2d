"""Pure formatting for the user commands: the `get` table, `watch`'s progress and event lines, ages.

Nothing here talks to a cluster or S3, so it is unit-tested on plain dicts (DreamBoothJob objects as the
apiserver returns them).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from dreambooth_api.runtime import effective_of

COLUMNS = ("NAME", "PHASE", "ATTEMPT", "RESTARTS", "PREEMPTIONS", "QUEUE", "STEP", "MAX", "LOSS", "ETA",
           "LAST-CHECKPOINT", "AGE")  # fmt: skip
FINISHED = ("Succeeded", "Failed")


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def age(created: str | None, now: datetime | None = None) -> str:
    """kubectl's short age: 45s, 3m12s (under 10 min), 42m, 5h3m (under 10 h), 7h, 3d."""
    start = _parse_time(created)
    if start is None:
        return "<unknown>"
    secs = max(0, int(((now or datetime.now(UTC)) - start).total_seconds()))
    if secs < 120:
        return f"{secs}s"
    mins = secs // 60
    if mins < 10:
        return f"{mins}m{secs % 60}s" if secs % 60 else f"{mins}m"
    if mins < 180:
        return f"{mins}m"
    hours = mins // 60
    if hours < 10:
        return f"{hours}h{mins % 60}m" if mins % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    return f"{hours // 24}d"


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "<none>"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def job_row(job: dict[str, Any], now: datetime | None = None) -> list[str]:
    meta = job.get("metadata") or {}
    spec = effective_of(job)  # the queue may be its runtime's
    st = job.get("status") or {}
    last = (st.get("lastCheckpoint") or {}).get("step")
    queue = (spec.get("runPolicy") or {}).get("queueName") or None
    return [
        _cell(meta.get("name")),
        _cell(st.get("phase") or "Pending"),
        _cell(st.get("attempt")),
        _cell(st.get("restarts", 0)),
        _cell(st.get("preemptions", 0)),
        _cell(queue),
        _cell(st.get("step")),
        _cell(st.get("maxSteps")),
        _cell(st.get("loss")),
        _cell(st.get("eta")),
        _cell(last),
        age(meta.get("creationTimestamp"), now),
    ]


def table(rows: Sequence[Sequence[str]], header: Sequence[str] = COLUMNS, with_namespace: bool = False,
          namespaces: Sequence[str] = ()) -> str:  # fmt: skip
    """Columns padded like kubectl's (three spaces between, left aligned)."""
    head = list(header)
    body = [list(r) for r in rows]
    if with_namespace:
        head = ["NAMESPACE", *head]
        body = [[ns, *r] for ns, r in zip(namespaces, body, strict=True)]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]
    lines = ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *body]]
    return "\n".join(lines)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def progress_line(status: dict[str, Any], width: int = 24) -> str:
    """One line: phase, a bar of step/max, loss, it/s, ETA and the newest checkpoint."""
    phase = status.get("phase") or "Pending"
    step, total = status.get("step"), status.get("maxSteps")
    parts = [f"{phase:<10}"]
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        done = min(width, int(width * step / total))
        parts.append("[" + "#" * done + "." * (width - done) + f"] {step}/{total}")
    elif step is not None:
        parts.append(f"step {step}")
    if status.get("loss") is not None:
        parts.append(f"loss {float(status['loss']):.4g}")
    if status.get("stepsPerSecond") is not None:
        parts.append(f"{float(status['stepsPerSecond']):.2f} it/s")
    if status.get("etaSeconds") is not None or status.get("eta"):
        parts.append("ETA " + (status.get("eta") or _duration(status.get("etaSeconds"))))
    ckpt = (status.get("lastCheckpoint") or {}).get("step")
    if ckpt is not None:
        parts.append(f"checkpoint {ckpt}")
    if status.get("attempt"):
        parts.append(f"attempt {status['attempt']}")
    return "  ".join(parts)


def startup_line(status: dict[str, Any]) -> str | None:
    """Where the attempt's start-up went (status.startupSeconds), once its first step is done; else None."""
    s = status.get("startupSeconds") or {}
    if s.get("total") is None:
        return None

    def fmt(v: float) -> str:
        return f"{float(v):.1f}s" if float(v) < 60 else _duration(v)

    names = {"sync": "sync", "load": "load", "data": "data", "firstStep": "first step", "other": "other"}
    parts = [f"{label} {fmt(s[key])}" for key, label in names.items() if s.get(key) is not None]
    return f"started in {fmt(s['total'])}: " + ", ".join(parts)


def phase_line(old: str | None, status: dict[str, Any]) -> str:
    new = status.get("phase") or "Pending"
    msg = status.get("message") or ""
    head = f"phase {old} -> {new}" if old else f"phase {new}"
    return f"{head}: {msg}" if msg else head


def event_key(event: dict[str, Any]) -> tuple[str, int]:
    """An Event is new when its uid is, or when its count went up (the apiserver aggregates repeats)."""
    return (str((event.get("metadata") or {}).get("uid")), int(event.get("count") or 1))


def event_line(event: dict[str, Any]) -> str:
    kind = event.get("type") or "Normal"
    return f"event {kind} {event.get('reason', '')}: {event.get('message', '')}".rstrip()


def events_sorted(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    def when(e: dict[str, Any]) -> str:
        return e.get("lastTimestamp") or e.get("eventTime") or (e.get("metadata") or {}).get("creationTimestamp") or ""

    return sorted(events, key=when)
