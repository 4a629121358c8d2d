"""Store URIs and keys: parsing and the rules keys follow (pure)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import StorageError

# ---------------------------------------------------------------------------------------------------------------
# Pure helpers (URI parsing, key rules, cache paths)


_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")


@dataclass(frozen=True)
class ParsedURI:
    scheme: str  # "file" or "s3"
    bucket: str  # "" for file
    path: str  # file: absolute path; s3: prefix without leading/trailing "/"

    @property
    def uri(self) -> str:
        if self.scheme == "file":
            return "file://" + self.path
        return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"


def parse_uri(uri: str) -> ParsedURI:
    """Normalise a local path, `file://` URI or `s3://bucket/prefix` (no trailing slash, absolute local path)."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"empty storage URI {uri!r}: give a local path, file:///path or s3://bucket/prefix")
    uri = uri.strip()
    if uri.startswith("s3://"):
        rest = uri[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not _BUCKET_RE.match(bucket):
            raise StorageError(
                f"invalid bucket name {bucket!r} in {uri!r}: S3 bucket names are 3-63 characters of letters, "
                "digits, '.', '-' (write s3://bucket/prefix)"
            )
        prefix = prefix.strip("/")
        if prefix:
            _check_rel(prefix, uri)
        return ParsedURI("s3", bucket, prefix)
    if uri.startswith("file://"):
        rest = uri[len("file://") :]
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise StorageError(f"file URI {uri!r} names host {host!r}: only local files are supported (file:///path)")
        uri = slash + path
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri):
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"unsupported storage scheme {scheme!r} in {uri!r}: use a local path, file:// or s3://")
    path = os.path.abspath(os.path.expanduser(uri))
    return ParsedURI("file", "", path)


def _check_rel(rel: str, context: str) -> None:
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(
            f"invalid key {rel!r} under {context}: keys are relative, '/'-separated, without '.', '..' or empty parts"
        )


def normalize_key(key: str, context: str = "the store") -> str:
    """A key names one object: non-empty, relative, no `.`/`..`/empty segments (so it cannot escape the root)."""
    if not key:
        raise StorageError(f"empty key under {context}")
    _check_rel(key, context)
    return key


def normalize_prefix(prefix: str, context: str = "the store") -> str:
    """A prefix names a folder; "" is the root. Trailing slashes are dropped."""
    prefix = prefix.strip("/") if prefix else ""
    if prefix:
        _check_rel(prefix, context)
    return prefix


def join_key(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix and rel else (prefix or rel)
