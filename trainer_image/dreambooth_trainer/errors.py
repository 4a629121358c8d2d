"""The launcher's exit codes (DESIGN.md contract) and how a failure maps to one."""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 64  # config, data, model path, credentials: retrying cannot help
EXIT_CRASH = 70
EXIT_GPU_OOM = 71
EXIT_PREEMPTED = 75  # SIGTERM: emergency checkpoint published, or none possible in time

REASONS = {
    EXIT_OK: "Completed",
    EXIT_BAD_INPUT: "BadInput",
    EXIT_CRASH: "Crashed",
    EXIT_GPU_OOM: "GPUOutOfMemory",
    EXIT_PREEMPTED: "Preempted",
}


def classify(exc: BaseException) -> int:
    """Exit code for an exception that ended a worker."""
    from .config import ConfigError

    if isinstance(exc, ConfigError):
        return EXIT_BAD_INPUT
    try:
        from .data import DataError

        if isinstance(exc, DataError):
            return EXIT_BAD_INPUT
    except ImportError:  # torch-free callers
        pass
    try:
        from .storage import AccessDeniedError, BucketMissingError, NotFoundError

        if isinstance(exc, AccessDeniedError | BucketMissingError | NotFoundError):
            return EXIT_BAD_INPUT
    except ImportError:
        pass
    name = type(exc).__name__
    if name == "Preempted":
        return EXIT_PREEMPTED
    if name == "OutOfMemoryError" or "CUDA out of memory" in str(exc):
        return EXIT_GPU_OOM
    return EXIT_CRASH


def explained(exc: BaseException) -> bool:
    """A failure whose message already says what went wrong and what to do (the Hub or S3 unreachable after
    retries): one line for the user, no traceback. It still ends the run as a crash, which the operator retries."""
    try:
        from .hub import HubError
        from .storage import StorageError
    except ImportError:  # torch-free callers
        return False
    return isinstance(exc, HubError | StorageError)
