"""Storage failures, by what the user does about them (exit codes: dreambooth_api.contract)."""

from __future__ import annotations

from dreambooth_api.contract import BadInputError, ExplainedError


class StorageError(ExplainedError):
    """A storage operation failed; the message names the URI and what to fix. Retried by the operator (exit 70):
    a later attempt may reach the server."""


class NotFoundError(StorageError, BadInputError):
    """A path the user named holds nothing: exit 64."""


class AccessDeniedError(StorageError, BadInputError):
    """Wrong or missing credentials, a bad signature, or a policy that does not allow the operation: exit 64."""


class BucketMissingError(StorageError, BadInputError):
    """The bucket does not exist: exit 64."""
