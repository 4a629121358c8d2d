"""One storage interface over local folders (`file://`, plain paths) and S3 (`s3://bucket/prefix`).

Everything the trainer reads or writes (model, data, class images, checkpoints, logs, outputs) goes through a
`Store`, so the same code path runs on a laptop and on a cluster where nothing local survives a preemption.

S3 settings come only from the standard AWS chain (environment, shared config, web identity / IRSA) plus a few
environment variables the operator sets from `spec.storage`:

- `AWS_ENDPOINT_URL` (read by boto3 itself), `AWS_REGION` / `AWS_DEFAULT_REGION` (default us-east-1),
- `DREAMBOOTH_S3_ADDRESSING_STYLE` = path | virtual | auto (default auto),
- `DREAMBOOTH_S3_RETRY_DEADLINE_S`: how long an operation keeps retrying transient failures (default 120 s),
- `DREAMBOOTH_CACHE`: where `local_cache_for` puts downloads (default ~/.cache/dreambooth-operator/s3).

Keys are relative to the store root and use "/" separators. Prefix arguments (`list`, `delete_prefix`,
`sync_down`, `upload_dir`) name a folder: `list("checkpoint-1")` does not match `checkpoint-100/...`.

The modules: `uri` (URIs and key rules, pure), `errors`, `localfs` (download cache, locks, atomic writes),
`base` (the `Store` interface), `local` and `s3` (the two stores), `s3errors` (what to retry, what to report).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import ObjectInfo, Store
from .errors import AccessDeniedError, BucketMissingError, NotFoundError, StorageError
from .local import LocalStore
from .localfs import local_cache_for
from .s3 import S3Store
from .uri import parse_uri


def open_store(uri: str, **s3_options: Any) -> Store:
    """Open a local path, `file://...` or `s3://bucket/prefix`. `s3_options` go to `S3Store` (transfer tuning,
    retry deadline) and are ignored for local stores."""
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        return LocalStore(Path(parsed.path))
    return S3Store(parsed.uri, **s3_options)


__all__ = [
    "AccessDeniedError",
    "BucketMissingError",
    "LocalStore",
    "NotFoundError",
    "ObjectInfo",
    "S3Store",
    "Store",
    "StorageError",
    "local_cache_for",
    "open_store",
    "parse_uri",
]
