"""How a failure that ended a worker maps to the launcher's exit code (docs/design.md, launcher contract).

The exception types carry their class: input errors derive from `BadInputError`, failures whose message is
already the whole story from `ExplainedError`, a stop on SIGTERM from `PreemptedError` (all in
dreambooth_api.contract). So this module imports none of the modules whose errors it classifies.
"""

from __future__ import annotations

from dreambooth_api.contract import (
    EXIT_BAD_INPUT,
    EXIT_CRASH,
    EXIT_GPU_OOM,
    EXIT_PREEMPTED,
    BadInputError,
    ExplainedError,
    PreemptedError,
)


def classify(exc: BaseException) -> int:
    """Exit code for an exception that ended a worker."""
    if isinstance(exc, BadInputError):
        return EXIT_BAD_INPUT
    if isinstance(exc, PreemptedError):
        return EXIT_PREEMPTED
    # torch.OutOfMemoryError (CUDA), matched by name: the launcher side of this package never imports torch.
    if type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc):
        return EXIT_GPU_OOM
    return EXIT_CRASH


def explained(exc: BaseException) -> bool:
    """A failure whose message already says what went wrong and what to do (the Hub or S3 unreachable after
    retries): one line for the user, no traceback. It still ends the run as a crash, which the operator retries."""
    return isinstance(exc, ExplainedError)
