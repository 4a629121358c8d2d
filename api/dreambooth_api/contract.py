"""The launcher contract (docs/design.md): what a trainer pod tells the operator, and how.

Exit codes and their reasons, the termination message's keys, the /progress document's keys, the environment
the operator sets, and the error types a failure is classified by. Both sides import this module; it imports
nothing but the standard library.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------------------ exit codes
EXIT_OK = 0
EXIT_BAD_INPUT = 64  # config, data, model path, credentials: retrying cannot help
EXIT_CRASH = 70  # anything else: the operator retries (backoffLimit)
EXIT_GPU_OOM = 71  # the operator retries once with memory savers
EXIT_PREEMPTED = 75  # SIGTERM: emergency checkpoint published, or none possible in time

REASONS = {
    EXIT_OK: "Completed",
    EXIT_BAD_INPUT: "BadInput",
    EXIT_CRASH: "Crashed",
    EXIT_GPU_OOM: "GPUOutOfMemory",
    EXIT_PREEMPTED: "Preempted",
}
# A reason that refines an exit code: the worker's error says it (`reason`), the launcher passes it on, and the
# operator acts on the exit code (64: Failed at once, never retried).
REASON_NON_FINITE_LOSS = "NonFiniteLoss"  # the loss or weights diverged (NaN/inf): a setting to fix, not a crash
REFINED_REASONS = {REASON_NON_FINITE_LOSS: EXIT_BAD_INPUT}

# -------------------------------------------------------------------------------------- termination message
# The launcher writes {"reason", "step", "checkpointUri", "message"} as JSON, at most MESSAGE_LIMIT bytes, plus
# "validationImages" after a completed run: the final validation runs moments before the exit, after the
# operator's last /progress poll as often as not, so the outcome carries them.
TERMINATION_KEYS = ("reason", "step", "checkpointUri", "message", "validationImages")
MESSAGE_LIMIT = 4096  # the kubelet truncates a termination message beyond 4096 bytes
TERMINATION_LOG = "/dev/termination-log"

# ---------------------------------------------------------------------------------------------- /progress
PROGRESS_KEYS = (
    "phase", "step", "maxSteps", "loss", "stepsPerSecond", "etaSeconds", "lastCheckpoint", "validationImages",
    "startupSeconds",
)  # fmt: skip
# /progress "startupSeconds": seconds per start-up phase of this process (null until timed), "total" from the
# process's start to the end of its first optimizer step, "other" = total minus the phases.
STARTUP_PHASES = ("sync", "load", "data", "firstStep", "other", "total")
DEFAULT_PROGRESS_PORT = 8080

# ------------------------------------------------------------------------------- environment of a trainer pod
ENV_JOB_NAME = "DREAMBOOTH_JOB_NAME"
ENV_JOB_UID = "DREAMBOOTH_JOB_UID"
ENV_ATTEMPT = "DREAMBOOTH_ATTEMPT"
ENV_GRACE_SECONDS = "DREAMBOOTH_GRACE_SECONDS"
ENV_MEMORY_SAVERS = "DREAMBOOTH_MEMORY_SAVERS"
ENV_TERMINATION_MESSAGE_PATH = "TERMINATION_MESSAGE_PATH"
ENV_PROGRESS_PORT = "PROGRESS_PORT"
ENV_SCRATCH = "DREAMBOOTH_SCRATCH"
ENV_CACHE = "DREAMBOOTH_CACHE"
# Between the launcher and its workers: each rank's exit code, and local rank 0's outcome detail.
ENV_RANK_RESULT_DIR = "DREAMBOOTH_RANK_RESULT_DIR"
ENV_RESULT_FILE = "DREAMBOOTH_RESULT_FILE"


# ---------------------------------------------------------------------------------------------- error types
class BadInputError(Exception):
    """A failure the user fixes in the input (config, data, model path, credentials): exit 64, never retried."""


class NonFiniteLossError(BadInputError):
    """The loss or the trained weights became NaN/inf: retrying the same settings diverges again (exit 64)."""

    reason = REASON_NON_FINITE_LOSS

    def __init__(self, step: int, checkpoint_uri: str | None, message: str) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint_uri = checkpoint_uri


class ExplainedError(Exception):
    """A failure whose message already says what went wrong and what to do: one line, no traceback."""


class PreemptedError(Exception):
    """The run stopped on SIGTERM; `checkpoint_uri` is the checkpoint the next attempt resumes from."""

    def __init__(self, step: int, checkpoint_uri: str | None, message: str) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint_uri = checkpoint_uri
