"""S3 errors sorted into what to retry, what the user must fix, and what is missing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# ---------------------------------------------------------------------------------------------------------------
# S3


_ACCESS_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidSecurity",
    "AccountProblem",
    "403",
    "Forbidden",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
# NoSuchUpload: the server lost an in-flight multipart upload (e.g. restarted) — starting the upload over fixes it.
_TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "NoSuchUpload",
    "500",
    "502",
    "503",
    "504",
}


def _exc_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        # s3transfer's RetriesExceededError keeps the real error in last_exception, not __cause__.
        last = getattr(cur, "last_exception", None)
        cur = last if isinstance(last, BaseException) else (cur.__cause__ or cur.__context__)


def _client_error(exc: BaseException) -> Any | None:
    from botocore.exceptions import ClientError

    for e in _exc_chain(exc):
        if isinstance(e, ClientError):
            return e
    return None


def _error_code(err: Any) -> tuple[str, int]:
    resp = getattr(err, "response", {}) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: the network or the server is (possibly briefly) unavailable. Credentials, missing buckets,
    missing keys and TLS certificate problems are not."""
    import botocore.exceptions as bex
    from s3transfer.exceptions import RetriesExceededError

    for e in _exc_chain(exc):
        if isinstance(e, bex.ClientError):
            code, status = _error_code(e)
            return code in _TRANSIENT_CODES or status >= 500 or status == 429
        if isinstance(e, bex.SSLError):
            return False
        if isinstance(
            e,
            bex.ConnectionError
            | bex.HTTPClientError
            | bex.IncompleteReadError
            | bex.ResponseStreamingError
            | RetriesExceededError,
        ):
            return True
        if isinstance(e, ConnectionError | TimeoutError):
            return True
    return False
