"""`LOG_FORMAT`: plain text lines (default) or one JSON object per line, for the operator and the trainer alike.

JSON lines go through python-json-logger, with the fields a log pipeline filters on (`job`, `namespace`,
`attempt`, `rank`, `step` for the trainer) on every line; see docs/metrics.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

from .contract import BadInputError

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")
# The standard record attributes, renamed as a JSON pipeline expects them.
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
JSON_RENAME = {"asctime": "time", "levelname": "level", "name": "logger"}


def log_format(env: Mapping[str, str]) -> LogFormat:
    raw = env.get("LOG_FORMAT", "").strip().lower() or "text"
    if raw not in FORMATS:
        raise BadInputError(f"LOG_FORMAT={env.get('LOG_FORMAT')!r} is not a log format: set it to text or json")
    return raw  # type: ignore[return-value]


class ContextFilter(logging.Filter):
    """Adds the same fields to every record: fixed ones, and callables read at log time (e.g. the current step)."""

    def __init__(self, fields: Mapping[str, Any | Callable[[], Any]]) -> None:
        super().__init__()
        self.fields = dict(fields)

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self.fields.items():
            setattr(record, key, value() if callable(value) else value)
        return True


# Extras kopf's object loggers attach that are its internals, not facts about the event (its settings object
# cannot even be copied). Its `k8s_ref` (the object's kind, namespace, name, uid) stays.
KOPF_INTERNALS = ("settings", "k8s_skip")


def json_handler(fields: Mapping[str, Any | Callable[[], Any]], stream: Any = None) -> logging.Handler:
    """A stream handler writing one JSON object per record with `fields` on each."""
    from pythonjsonlogger.core import RESERVED_ATTRS
    from pythonjsonlogger.json import JsonEncoder, JsonFormatter

    class Encoder(JsonEncoder):
        def default(self, o: Any) -> Any:
            # A log line is never lost to an extra the encoder cannot take: it is written as its repr.
            try:
                return super().default(o)
            except Exception:
                return repr(o)

    handler = logging.StreamHandler(stream)
    # ISO 8601 with the offset: pipelines parse it without being told the pod's timezone.
    formatter = JsonFormatter(
        JSON_FIELDS, rename_fields=JSON_RENAME, datefmt="%Y-%m-%dT%H:%M:%S%z", json_encoder=Encoder,
        reserved_attrs=[*RESERVED_ATTRS, *KOPF_INTERNALS],
    )  # fmt: skip
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter(fields))
    return handler
