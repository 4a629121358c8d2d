"""The failure policy of docs/design.md as pure functions: observed pods in, a verdict and a decision out.

``observe_pod`` reduces a pod to the facts the policy uses; ``classify`` turns an attempt's pods into one
verdict (the strongest signal wins: bad input, then preemption, then GPU OOM, then host limits, then crashes);
``apply_run_policy`` applies the run policy's budgets. No I/O, no clock: ``now`` is an argument, so every row
of the table is a unit test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from dreambooth_api.contract import EXIT_BAD_INPUT, EXIT_GPU_OOM, EXIT_PREEMPTED, REASON_NON_FINITE_LOSS
from dreambooth_api.manifest import RunPolicy

from . import status

# DisruptionTarget reasons that mean someone else took the node or the pod away.
PREEMPTION_DISRUPTIONS = frozenset({"PreemptionByScheduler", "PreemptionByKubeScheduler", "DeletionByTaintManager",
                                    "EvictionByEvictionAPI", "DeletionByPodGC"})  # fmt: skip
# The kubelet evicting our own pod for node pressure: our limits are wrong, not bad luck.
KUBELET_EVICTION = "TerminationByKubelet"
# Pod status reasons of a graceful node shutdown (kubelet) and of a lost node (node controller).
NODE_SHUTDOWN_REASONS = frozenset({"Terminated", "NodeShutdown", "Shutdown"})
NODE_LOST_REASONS = frozenset({"NodeLost"})
NODE_LOST_AFTER_SECONDS = 60
# Containers that cannot start for a reason no retry fixes.
FATAL_WAITING = frozenset({"InvalidImageName", "ErrImageNeverPull"})
# A pull that fails may be a registry hiccup (the kubelet retries it): the job gives up only after the pod has
# failed to pull for Timing.image_pull_timeout since it was scheduled.
PULL_FAILING = frozenset({"ErrImagePull", "ImagePullBackOff"})
DEFAULT_IMAGE_PULL_TIMEOUT_SECONDS = 300
# A crash while peers still run may be the echo of a preemption a peer has yet to report: wait this long for it.
CRASH_SETTLE_SECONDS = 20
# Consecutive preemptions with no new durable checkpoint before the job gives up (a loop that never advances).
NO_PROGRESS_PREEMPTIONS = 5
MAX_BACKOFF_SECONDS = 360


class Kind(StrEnum):
    STARTING = "Starting"  # pods created or being created, not all running
    WAITING = "WaitingForResources"  # some pod unschedulable
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    PREEMPTED = "Preempted"
    BAD_INPUT = "BadInput"
    GPU_OOM = "GPUOutOfMemory"
    FAILED = "Failed"  # counted against backoffLimit


# Strongest first: one bad-input pod fails the job even when its peers report a preemption echo, etc.
_PRIORITY = [Kind.BAD_INPUT, Kind.PREEMPTED, Kind.GPU_OOM, Kind.FAILED]
_FAILURE_PRIORITY = [status.R_HOST_OOM, status.R_EVICTED, status.R_IMAGE, status.R_CRASH]


@dataclass(frozen=True)
class PodView:
    """The facts of one pod the policy looks at."""

    name: str
    index: int
    phase: str = "Pending"
    deleting: bool = False
    deletion_deadline: datetime | None = None
    created: datetime | None = None
    scheduled_at: datetime | None = None
    exit_code: int | None = None
    terminated_reason: str | None = None
    finished_at: datetime | None = None
    termination: dict[str, Any] | None = None
    raw_message: str = ""
    pod_reason: str | None = None
    pod_message: str = ""
    disruption_reason: str | None = None
    disruption_message: str = ""
    unschedulable: str | None = None
    waiting_reason: str | None = None
    waiting_message: str = ""
    running_since: datetime | None = None
    ready: bool = False
    node_name: str | None = None
    pod_ip: str | None = None
    # Filled in by the caller from the Node (None = Ready or not looked at).
    node_not_ready_since: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @property
    def active(self) -> bool:
        return not self.finished


@dataclass(frozen=True)
class Verdict:
    """What an attempt's pods say: its kind, a reason constant, the words for people, the pod that said it."""

    kind: Kind
    reason: str = ""
    message: str = ""
    pod: str | None = None


@dataclass(frozen=True)
class Counters:
    restarts: int = 0
    preemptions: int = 0
    preemptions_without_progress: int = 0
    memory_savers: bool = False


@dataclass(frozen=True)
class Decision:
    action: Literal["wait", "succeed", "retry", "fail"]
    reason: str
    message: str
    counters: Counters = field(default_factory=Counters)
    delay_seconds: int = 0
    counted: Literal["", "restart", "preemption"] = ""


# ----- observing a pod -----


def _time(value: Any) -> datetime | None:
    return status.parse_time(value) if isinstance(value, str) else None


def parse_termination(text: str) -> dict[str, Any] | None:
    """The launcher's JSON termination message, or None for anything else (e.g. a log tail)."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def observe_pod(pod: dict[str, Any], index_label: str) -> PodView:
    meta = pod.get("metadata") or {}
    pod_status = pod.get("status") or {}
    conds = {c.get("type"): c for c in pod_status.get("conditions") or []}
    view: dict[str, Any] = {
        "name": meta.get("name", ""),
        "index": int((meta.get("labels") or {}).get(index_label, "0")),
        "phase": pod_status.get("phase") or "Pending",
        "deleting": bool(meta.get("deletionTimestamp")),
        "deletion_deadline": _time(meta.get("deletionTimestamp")),
        "created": _time(meta.get("creationTimestamp")),
        "pod_reason": pod_status.get("reason"),
        "pod_message": pod_status.get("message") or "",
        "node_name": (pod.get("spec") or {}).get("nodeName"),
        "pod_ip": pod_status.get("podIP"),
        "ready": (conds.get("Ready") or {}).get("status") == "True",
    }
    disruption = conds.get("DisruptionTarget")
    if disruption and disruption.get("status") == "True":
        view["disruption_reason"] = disruption.get("reason") or ""
        view["disruption_message"] = disruption.get("message") or ""
    scheduled = conds.get("PodScheduled")
    if scheduled and scheduled.get("status") == "True":
        view["scheduled_at"] = _time(scheduled.get("lastTransitionTime"))
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        view["unschedulable"] = scheduled.get("message") or "no node fits the pod"
    for cs in pod_status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if "terminated" in state:
            term = state["terminated"]
            view["exit_code"] = term.get("exitCode")
            view["terminated_reason"] = term.get("reason")
            view["finished_at"] = _time(term.get("finishedAt"))
            view["raw_message"] = term.get("message") or ""
            view["termination"] = parse_termination(view["raw_message"])
        elif "waiting" in state:
            view["waiting_reason"] = state["waiting"].get("reason")
            view["waiting_message"] = state["waiting"].get("message") or ""
        elif "running" in state:
            view["running_since"] = _time(state["running"].get("startedAt"))
    return PodView(**view)


# ----- one pod's verdict -----


def _term_text(p: PodView) -> str:
    if p.termination:
        return str(p.termination.get("message") or p.termination.get("reason") or "")
    return p.raw_message.strip()[-500:]


def _eviction_advice(message: str) -> str:
    text = message.lower()
    if "ephemeral-storage" in text or "ephemeral storage" in text:
        return ("raise spec.resources.requests.ephemeral-storage (checkpoints are staged in the pod's scratch "
                "space at about twice their size, and the model cache lives there too)")  # fmt: skip
    if "memory" in text:
        return "raise spec.resources.requests.memory (and limits.memory), or lower spec.training.dataloaderNumWorkers"
    return "raise the pod's resource requests (memory, ephemeral-storage) so the node does not evict it"


def pod_verdict(p: PodView, now: datetime) -> Verdict | None:
    """What one pod says about its attempt, or None when it says nothing final."""
    who = f"pod {p.name}"
    if p.exit_code == EXIT_BAD_INPUT and (p.termination or {}).get("reason") == REASON_NON_FINITE_LOSS:
        # A diverged run: the same settings diverge again, so it fails like bad input (never retried).
        return Verdict(Kind.BAD_INPUT, status.R_NON_FINITE_LOSS,
                       f"{who}: training diverged: {_term_text(p)}", p.name)  # fmt: skip
    if p.exit_code == EXIT_BAD_INPUT:
        return Verdict(
            Kind.BAD_INPUT, status.R_BAD_INPUT, f"{who}: bad input: {_term_text(p) or 'exit code 64'}", p.name
        )
    if p.disruption_reason in PREEMPTION_DISRUPTIONS:
        msg = (
            f"{who} was disrupted ({p.disruption_reason}){': ' + p.disruption_message if p.disruption_message else ''}"
        )
        return Verdict(Kind.PREEMPTED, status.R_DISRUPTION, msg, p.name)
    if p.disruption_reason == KUBELET_EVICTION or p.pod_reason == "Evicted":
        detail = p.disruption_message or p.pod_message
        return Verdict(Kind.FAILED, status.R_EVICTED,
                       f"{who} was evicted by its node for resource pressure ({detail or 'no detail'}): "
                       f"{_eviction_advice(detail)}.", p.name)  # fmt: skip
    if p.pod_reason in NODE_SHUTDOWN_REASONS:
        return Verdict(
            Kind.PREEMPTED,
            status.R_NODE_SHUTDOWN,
            f"{who}: its node shut down ({p.pod_message or p.pod_reason}).",
            p.name,
        )
    if p.pod_reason in NODE_LOST_REASONS:
        return Verdict(Kind.PREEMPTED, status.R_NODE_LOST, f"{who}: its node {p.node_name} was lost.", p.name)
    if p.node_not_ready_since is not None and (now - p.node_not_ready_since).total_seconds() > NODE_LOST_AFTER_SECONDS:
        return Verdict(Kind.PREEMPTED, status.R_NODE_LOST,
                       f"{who}: its node {p.node_name} has been NotReady for more than {NODE_LOST_AFTER_SECONDS} s.", p.name)  # fmt: skip
    if p.deleting:
        return Verdict(Kind.PREEMPTED, status.R_POD_DELETED, f"{who} was deleted (not by the operator).", p.name)
    if p.exit_code == EXIT_PREEMPTED:
        return Verdict(
            Kind.PREEMPTED,
            status.R_LAUNCHER_PREEMPTED,
            f"{who}: the trainer was stopped: {_term_text(p) or 'exit code 75'}",
            p.name,
        )
    if p.exit_code == EXIT_GPU_OOM:
        return Verdict(
            Kind.GPU_OOM, status.R_GPU_OOM, f"{who}: GPU out of memory: {_term_text(p) or 'exit code 71'}", p.name
        )
    if p.terminated_reason == "OOMKilled":
        return Verdict(Kind.FAILED, status.R_HOST_OOM,
                       f"{who} was OOMKilled (host memory, not GPU memory): raise spec.resources.limits.memory (and "
                       "requests.memory), or lower spec.training.dataloaderNumWorkers.", p.name)  # fmt: skip
    if p.waiting_reason in FATAL_WAITING:
        return Verdict(
            Kind.BAD_INPUT, status.R_IMAGE, f"{who} cannot start: {p.waiting_reason}: {p.waiting_message}", p.name
        )
    if p.phase == "Failed":
        if p.exit_code is not None:
            text = _term_text(p)
            return Verdict(
                Kind.FAILED,
                status.R_CRASH,
                f"{who} exited with code {p.exit_code}{': ' + text if text else ''}",
                p.name,
            )
        return Verdict(
            Kind.FAILED, status.R_CRASH, f"{who} failed: {p.pod_reason or ''} {p.pod_message}".rstrip(), p.name
        )
    return None


# ----- the attempt as a whole -----


@dataclass(frozen=True)
class Timing:
    """The clocks the attempt runs against (all seconds)."""

    scheduling_timeout: int
    progress_deadline: int
    last_progress: datetime | None = None
    image_pull_timeout: int = DEFAULT_IMAGE_PULL_TIMEOUT_SECONDS


def _strongest(verdicts: list[Verdict], finished: dict[str, datetime]) -> Verdict:
    """The root cause: the strongest kind, and among equals the pod that ended first (its peers die of it)."""
    latest = datetime.max.replace(tzinfo=UTC)

    def rank(o: Verdict) -> tuple[int, int, datetime]:
        sub = _FAILURE_PRIORITY.index(o.reason) if o.reason in _FAILURE_PRIORITY else len(_FAILURE_PRIORITY)
        return _PRIORITY.index(o.kind), sub, finished.get(o.pod or "", latest)

    return min(verdicts, key=rank)


def classify(pods: list[PodView], expected: int, gang_created: bool, now: datetime, timing: Timing) -> Verdict:
    """One verdict for an attempt that the operator has not ended itself."""
    by_index = {p.index: p for p in pods if p.index < expected}
    verdicts = [v for p in by_index.values() if (v := pod_verdict(p, now)) is not None]
    if gang_created:
        verdicts += [Verdict(Kind.PREEMPTED, status.R_POD_DELETED, f"pod {i} of the gang is gone (deleted, not by the operator).")
                     for i in range(expected) if i not in by_index]  # fmt: skip
    if verdicts:
        top = _strongest(verdicts, {p.name: p.finished_at for p in by_index.values() if p.finished_at})
        if top.kind == Kind.FAILED and top.reason == status.R_CRASH:
            crashed = next(p for p in by_index.values() if p.name == top.pod) if top.pod else None
            peers_active = any(p.active for p in by_index.values())
            since = crashed.finished_at if crashed else None
            if peers_active and since is not None and (now - since).total_seconds() < CRASH_SETTLE_SECONDS:
                return Verdict(Kind.RUNNING, status.R_ALL_PODS_RUNNING,
                               f"{top.message}; waiting up to {CRASH_SETTLE_SECONDS} s for its peers' reasons.")  # fmt: skip
        return top
    pull_failed = _image_pull_given_up(list(by_index.values()), now, timing.image_pull_timeout)
    if pull_failed is not None:
        return pull_failed
    if len(by_index) == expected and all(p.phase == "Succeeded" for p in by_index.values()):
        return Verdict(Kind.SUCCEEDED, status.R_COMPLETED, "all pods completed.")
    created = [p.created for p in by_index.values() if p.created]
    age = (now - min(created)).total_seconds() if created else 0.0
    unschedulable = [p for p in by_index.values() if p.unschedulable]
    pending = [p for p in by_index.values() if p.phase == "Pending"]
    if unschedulable or pending or len(by_index) < expected:
        if age > timing.scheduling_timeout and (unschedulable or pending):
            stuck = unschedulable or pending
            return Verdict(Kind.FAILED, status.R_SCHEDULING_TIMEOUT,
                           f"{len(stuck)} pod(s) not running after schedulingTimeoutSeconds "
                           f"({timing.scheduling_timeout} s): {_pending_detail(stuck[0])}", stuck[0].name)  # fmt: skip
        if unschedulable:
            return Verdict(Kind.WAITING, status.R_UNSCHEDULABLE,
                           f"{len(unschedulable)} of {expected} pods cannot be scheduled yet "
                           f"({unschedulable[0].unschedulable}); the cluster autoscaler may be adding nodes. "
                           f"Waiting up to {timing.scheduling_timeout} s.")  # fmt: skip
        detail = _pending_detail(pending[0]) if pending else "creating pods"
        return Verdict(Kind.STARTING, status.R_SCHEDULED, f"{len(pending)} of {expected} pods starting ({detail}).")
    running = [p.running_since for p in by_index.values() if p.phase == "Running" and p.running_since]
    baseline = max([t for t in [timing.last_progress, *running] if t is not None], default=None)
    if baseline is not None and (now - baseline).total_seconds() > timing.progress_deadline:
        return Verdict(Kind.FAILED, status.R_HUNG,
                       f"no step progress for more than progressDeadlineSeconds ({timing.progress_deadline} s): "
                       "the gang looks hung.")  # fmt: skip
    return Verdict(Kind.RUNNING, status.R_ALL_PODS_RUNNING, f"all {expected} pods running.")


def _image_pull_given_up(pods: list[PodView], now: datetime, timeout: int) -> Verdict | None:
    """A pod whose image has failed to pull for ``timeout`` seconds since it was scheduled: a reference that does
    not exist (or a registry the nodes cannot reach) is named and the job fails, instead of waiting forever."""
    for p in pods:
        since = p.scheduled_at or p.created
        if p.waiting_reason in PULL_FAILING and since is not None and (now - since).total_seconds() > timeout:
            return Verdict(
                Kind.BAD_INPUT,
                status.R_IMAGE_PULL,
                f"pod {p.name} could not pull its image for {timeout} s ({p.waiting_reason}: {p.waiting_message}). "
                "Check spec.resources.image: the repository and tag (or digest) must exist in the registry and the "
                "nodes must reach it; a private registry needs spec.podTemplate.imagePullSecrets.",
                p.name,
            )
    return None


def _pending_detail(p: PodView) -> str:
    if p.unschedulable:
        return f"{p.name}: {p.unschedulable}"
    if p.waiting_reason:
        return f"{p.name}: {p.waiting_reason}{': ' + p.waiting_message if p.waiting_message else ''}"
    return f"{p.name}: pending"


# ----- the decision -----


def backoff_seconds(restarts: int, base: int) -> int:
    """Delay before attempt n+1 after the n-th counted failure: base, 2x base, 4x ... capped at 6 minutes."""
    if restarts <= 0:
        return 0
    return int(min(base * 2 ** (restarts - 1), MAX_BACKOFF_SECONDS))


def apply_run_policy(verdict: Verdict, counters: Counters, run_policy: RunPolicy, backoff_base: int = 10) -> Decision:
    """What to do about an attempt's verdict within the run policy's budgets (backoffLimit, maxPreemptions)."""
    kind = verdict.kind
    if kind in (Kind.STARTING, Kind.WAITING, Kind.RUNNING):
        return Decision("wait", verdict.reason, verdict.message, counters)
    if kind == Kind.SUCCEEDED:
        return Decision("succeed", status.R_COMPLETED, verdict.message, counters)
    if kind == Kind.BAD_INPUT:
        return Decision("fail", verdict.reason, f"{verdict.message} (bad input is not retried).", counters)
    if kind == Kind.PREEMPTED:
        after = replace(counters, preemptions=counters.preemptions + 1,
                        preemptions_without_progress=counters.preemptions_without_progress + 1)  # fmt: skip
        if after.preemptions > run_policy.max_preemptions:
            return Decision("fail", status.R_TOO_MANY_PREEMPTIONS,
                            f"{verdict.message} That is preemption {after.preemptions}, above runPolicy.maxPreemptions "
                            f"({run_policy.max_preemptions}).", after, counted="preemption")  # fmt: skip
        if after.preemptions_without_progress >= NO_PROGRESS_PREEMPTIONS:
            return Decision("fail", status.R_NO_PROGRESS,
                            f"{verdict.message} {after.preemptions_without_progress} preemptions in a row without a new "
                            "checkpoint: the run cannot get ahead of its preemptions; lower "
                            "spec.training.checkpointingSteps (or use 'auto') or raise terminationGracePeriodSeconds.",
                            after, counted="preemption")  # fmt: skip
        return Decision("retry", verdict.reason,
                        f"{verdict.message} Resuming from the last checkpoint (preemption {after.preemptions} of at most "
                        f"{run_policy.max_preemptions}).", after, counted="preemption")  # fmt: skip
    if kind == Kind.GPU_OOM:
        if counters.memory_savers:
            return Decision("fail", status.R_GPU_OOM,
                            f"{verdict.message} Out of GPU memory even with memory savers on: use more GPUs "
                            "(spec.resources.gpusPerNode/nodes), a smaller trainBatchSize or resolution, or LoRA.",
                            counters)  # fmt: skip
        after = replace(counters, memory_savers=True)
        return Decision("retry", status.R_GPU_OOM,
                        f"{verdict.message} Retrying once from the last checkpoint with gradient checkpointing on and "
                        "the micro-batch halved (accumulation doubled): the resumed run is no longer bit-exact.", after)  # fmt: skip
    # Counted failures: crash, host OOM, eviction, hung gang, scheduling timeout.
    after = replace(counters, restarts=counters.restarts + 1)
    if after.restarts > run_policy.backoff_limit:
        return Decision("fail", status.R_BACKOFF_LIMIT,
                        f"{verdict.reason}: {verdict.message} Failed attempts: {after.restarts}, above "
                        f"runPolicy.backoffLimit ({run_policy.backoff_limit}).", after, counted="restart")  # fmt: skip
    delay = backoff_seconds(after.restarts, backoff_base)
    return Decision("retry", verdict.reason,
                    f"{verdict.message} Retrying in {delay} s from the last checkpoint (failure {after.restarts} of "
                    f"backoffLimit {run_policy.backoff_limit}).", after, delay_seconds=delay, counted="restart")  # fmt: skip
