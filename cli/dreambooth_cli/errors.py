"""The one error type of the user commands: printed as one line (`dreambooth: ...`), exit 1, never a traceback."""

from __future__ import annotations


class UserError(Exception):
    """What went wrong and how to fix it, in one sentence."""
