"""The job's status: its typed shape (the CRD's status schema derives from it), conditions, reasons, phase.

Control decisions never read the phase: it is derived from the conditions, for people and printer columns.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# ----- condition types -----
CREATED = "Created"
WAITING = "WaitingForResources"
RUNNING = "Running"
PREEMPTED = "Preempted"
SUSPENDED = "Suspended"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
# Not a phase: an edit of spec.training the operator refused.
SPEC_CHANGE_REFUSED = "SpecChangeRefused"
# Not a phase: a durable checkpoint exists; its lastTransitionTime is that checkpoint's time (what Kueue's
# issue #477 asks a workload to publish, so a scheduler can prefer victims with fresh checkpoints).
CHECKPOINTED = "Checkpointed"

# "Pending" covers the moments with no gang at all: just accepted, or waiting out the backoff after a failure.
PENDING = "Pending"
Phase = Literal["Pending", "Created", "WaitingForResources", "Running", "Preempted", "Suspended", "Succeeded", "Failed"]
PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]

# ----- reasons (CamelCase, as Kubernetes conventions ask) -----
R_GANG_CREATED = "GangCreated"
R_UNSCHEDULABLE = "Unschedulable"
R_SCHEDULED = "Scheduled"
R_ALL_PODS_RUNNING = "AllPodsRunning"
R_ATTEMPT_ENDED = "AttemptEnded"
R_RESUMED = "Resumed"
R_PREEMPTED = "Preempted"
R_SUSPEND_REQUESTED = "SuspendRequested"
R_SUSPENDED = "Suspended"
R_COMPLETED = "Completed"
R_INVALID_SPEC = "InvalidSpec"
R_BAD_INPUT = "BadInput"
R_NON_FINITE_LOSS = "NonFiniteLoss"
R_BACKOFF_LIMIT = "BackoffLimitExceeded"
R_TOO_MANY_PREEMPTIONS = "TooManyPreemptions"
R_NO_PROGRESS = "PreemptedWithoutProgress"
R_GPU_OOM = "GPUOutOfMemory"
R_DEADLINE = "DeadlineExceeded"
R_TRAINING_EDITED = "TrainingEdited"
R_TRAINING_RESTORED = "TrainingRestored"
R_CHECKPOINT_PUBLISHED = "CheckpointPublished"
R_RUNTIME_NOT_FOUND = "RuntimeNotFound"
R_RUNTIME_FOUND = "RuntimeFound"

# Causes that end one attempt (policy.Verdict.reason); they appear in conditions and Events too.
R_CRASH = "TrainerCrashed"
R_HOST_OOM = "OOMKilled"
R_EVICTED = "Evicted"
R_HUNG = "ProgressDeadlineExceeded"
R_SCHEDULING_TIMEOUT = "SchedulingTimeout"
R_IMAGE = "ContainerCannotStart"
R_IMAGE_PULL = "ImagePullFailed"
R_POD_DELETED = "PodDeleted"
R_DISRUPTION = "DisruptionTarget"
R_NODE_SHUTDOWN = "NodeShutdown"
R_NODE_LOST = "NodeLost"
R_LAUNCHER_PREEMPTED = "LauncherPreempted"


class _Status(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(_Status):
    type: str = Field(
        description="Created, WaitingForResources, Running, Preempted, Suspended, Succeeded, Failed, SpecChangeRefused "
        "or Checkpointed (lastTransitionTime: the newest durable checkpoint's time)."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", description="Machine-readable CamelCase reason.")
    message: str = Field("", description="What happened and what to do, in words.")
    last_transition_time: str = Field("", description="When the condition last changed status.")


class Checkpoint(_Status):
    step: int | None = Field(None, description="Optimizer step of the newest durable checkpoint.")
    uri: str | None = Field(None, description="Where that checkpoint lives.")
    time: str | None = Field(None, description="When it was published.")


class JobStatus(_Status):
    """What the operator observed; recomputed on every reconcile and patched only when it changed."""

    phase: Phase | None = Field(None, description="Derived from the conditions: " + ", ".join(PHASES) + ".")
    message: str | None = Field(None, description="The most important thing to know right now, in words.")
    observed_generation: int | None = Field(None, description="metadata.generation this status describes.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Standard conditions with reasons and messages."
    )
    attempt: int | None = Field(None, description="Current attempt (gang) number, from 1.")
    restarts: int = Field(0, description="Attempts ended by failures counted against runPolicy.backoffLimit.")
    preemptions: int = Field(0, description="Attempts ended by preemption (never counted against backoffLimit).")
    preemptions_without_progress: int = Field(
        0, description="Consecutive preemptions with no step progress between them."
    )
    step: int | None = Field(None, description="Last optimizer step reported by rank 0.")
    max_steps: int | None = Field(None, description="Total optimizer steps of the run.")
    loss: float | None = Field(None, description="Last training loss reported by rank 0.")
    steps_per_second: float | None = Field(None, description="Training speed reported by rank 0.")
    eta_seconds: int | None = Field(None, description="Estimated seconds to completion.")
    eta: str | None = Field(None, description="Estimated time to completion, human readable.")
    trainer_phase: str | None = Field(None, description="The trainer's own phase (loading, training, saving, ...).")
    startup_seconds: dict[str, float] | None = Field(
        None,
        description="Where the current attempt's start-up went, in seconds, as rank 0 reports it once its first "
        "step is done: sync (model and data from S3), load, data, firstStep, other, total (from the process start).",
    )
    last_checkpoint: Checkpoint | None = Field(None, description="The newest durable checkpoint.")
    validation_images: list[str] = Field(default_factory=list, description="URIs of the latest validation images.")
    output_uri: str | None = Field(None, description="Where the model is written (spec.training.outputDir).")
    logs_uri: str | None = Field(None, description="Per-rank logs of the current attempt.")
    start_time: str | None = Field(None, description="When the job started running (reset on resume from suspend).")
    completion_time: str | None = Field(None, description="When the job succeeded or failed.")
    last_progress_time: str | None = Field(None, description="When the trainer last reported a new step or phase.")
    memory_savers: bool = Field(False, description="True after a GPU out-of-memory retry switched memory savers on.")
    training_hash: str | None = Field(None, description="Hash of the accepted spec.training; edits are refused.")
    runtime: str | None = Field(
        None, description="The DreamBoothRuntime the job was accepted with (empty: none, built-in defaults only)."
    )
    effective_spec: dict[str, Any] | None = Field(
        None,
        description="The spec the job runs with, taken when it was accepted: job ⊕ runtime ⊕ built-in defaults "
        "(training aside). Later runtime edits and operator upgrades never change it; the job's own later "
        "edits (e.g. runPolicy.suspend) still apply over it.",
    )
    effective_spec_hash: str | None = Field(None, description="Hash of effectiveSpec.")
    ended_attempt: int | None = Field(
        None, description="Last attempt the operator judged ended; its pods are being removed."
    )
    ended_reason: str | None = Field(None, description="Why that attempt ended (a reason constant).")
    ended_time: str | None = Field(None, description="When that attempt was judged ended (backoff counts from here).")
    gang_created: int | None = Field(None, description="Last attempt whose pods were all created.")


# ----- helpers -----


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def timestamp(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def get_condition(status: JobStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def is_true(status: JobStatus, type_: str) -> bool:
    cond = get_condition(status, type_)
    return cond is not None and cond.status == "True"


def set_condition(status: JobStatus, type_: str, value: bool, reason: str, message: str, now: datetime) -> bool:
    """Set one condition; True when its status flipped (a transition, which deserves an Event).

    The transition time moves only when the status flips, as Kubernetes conventions say; reason and message
    may be refreshed in between without being a transition.
    """
    text = "True" if value else "False"
    cond = get_condition(status, type_)
    if cond is None:
        if not value:
            return False  # an absent condition already reads as False: no noise
        status.conditions.append(
            Condition(type=type_, status=text, reason=reason, message=message, last_transition_time=timestamp(now))
        )
        return True
    flipped = cond.status != text
    cond.status = text
    cond.reason = reason
    cond.message = message
    if flipped:
        cond.last_transition_time = timestamp(now)
    return flipped


def derive_phase(status: JobStatus) -> str:
    """The phase people read: the most decisive true condition wins."""
    # Waiting outranks Preempted: after a preemption, "no capacity yet" is the news that matters.
    for type_ in (FAILED, SUCCEEDED, SUSPENDED, WAITING, PREEMPTED, RUNNING, CREATED):
        if is_true(status, type_):
            return type_
    return PENDING


def is_finished(status: JobStatus) -> bool:
    return is_true(status, SUCCEEDED) or is_true(status, FAILED)


def format_duration(seconds: float | None) -> str | None:
    if seconds is None or seconds < 0:
        return None
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def dump(status: JobStatus) -> dict[str, Any]:
    return status.model_dump(by_alias=True, mode="json", exclude_none=True)


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch from old to new status: only changed keys, removed keys set to null. Empty = no write."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        if old.get(key) != value:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch
