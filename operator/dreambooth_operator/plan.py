"""One reconcile step as a pure function: the observed world in, the new status and the actions out.

The world is what the apiserver says now (the job, its pods, node readiness) plus rank 0's latest progress.
Nothing here remembers anything between calls: every fact that must survive an operator restart lives in the
job's status, and the status is patched *before* the actions run, so a crash between the two never counts an
attempt twice or loses one (deterministic names make repeated creates harmless).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from dreambooth_api.config import parse_training
from dreambooth_api.contract import STARTUP_PHASES
from dreambooth_api.runtime import merge_spec

from . import policy, status
from .policy import Counters, Kind, PodView, Timing
from .resources import (
    ANNOTATION_CHECKPOINT_TIME,
    ANNOTATION_GANG_SIZE,
    LABEL_ATTEMPT,
    LABEL_INDEX,
    BuildOptions,
    build_configmap,
    build_pod,
    build_service,
    logs_uri,
    names_for,
)
from .spec import DEFAULT_MAX_NODES, SpecError, ValidJob, training_hash, validate

# A pod still there this long after its deletion deadline, on a node that is not Ready, has no kubelet left
# to confirm its end: it is force-deleted so the next attempt can start.
FORCE_DELETE_AFTER_SECONDS = 30
# Failures that count against backoffLimit (and so wait out a backoff before the next attempt).
COUNTED_REASONS = frozenset(
    {status.R_CRASH, status.R_HOST_OOM, status.R_EVICTED, status.R_HUNG, status.R_SCHEDULING_TIMEOUT}
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class World:
    job: dict[str, Any]
    pods: list[dict[str, Any]]
    now: datetime
    # Rank 0's /progress document, when it was fetched for this reconcile.
    progress: dict[str, Any] | None = None
    # Nodes that are not Ready (or gone: EPOCH), by name, for the pods the driver asked about.
    node_not_ready_since: dict[str, datetime] = field(default_factory=dict)
    # The accepted {"method", "training"} (the job's ConfigMap), read only when spec.training was edited.
    accepted_config: dict[str, Any] | None = None
    # Pods deleted since the operator started, as last seen, that left a termination message: a stopped
    # gang's emergency checkpoint is named there, and the pods are often gone before any reconcile sees them.
    gone_pods: list[dict[str, Any]] = field(default_factory=list)
    # The runtime of a job not yet accepted (read only then): None when the job has no snapshot to take.
    runtime: RuntimeView | None = None


@dataclass(frozen=True)
class RuntimeView:
    """The DreamBoothRuntime a job not yet accepted uses: its name ("" = none: no runtimeRef and no default)
    and its spec as written, or None when the named runtime does not exist."""

    name: str = ""
    spec: dict[str, Any] | None = None
    # Where the name came from, for the waiting message: "spec.runtimeRef.name" or "the default runtime".
    source: str = "spec.runtimeRef.name"


class RuntimeMissing(Exception):
    def __init__(self, name: str, source: str) -> None:
        self.name, self.source = name, source
        super().__init__(name)


@dataclass(frozen=True)
class Action:
    verb: Literal["create", "delete", "force-delete", "delete-job", "annotate"]
    obj: dict[str, Any] | None = None
    name: str = ""


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Plan:
    status: status.JobStatus
    actions: list[Action]
    events: list[Event]
    requeue_after: float | None = None
    # Actions before the status write. Only for starting a new attempt: its pods carry the attempt number in
    # their labels, so a crash between the creates and the write loses nothing (the next reconcile reads the
    # attempt back from the pods), and the status can then say "attempt N, gang created" in one write.
    act_first: bool = False


@dataclass(frozen=True)
class PlanOptions:
    build: BuildOptions = field(default_factory=BuildOptions)
    backoff_base_seconds: int = 10
    max_nodes: int = DEFAULT_MAX_NODES
    image_pull_timeout_seconds: int = policy.DEFAULT_IMAGE_PULL_TIMEOUT_SECONDS
    # Host/privilege powers a job's podTemplate may use (chart value operator.podPowers.allow, powers.py).
    allowed_powers: frozenset[str] = frozenset()
    # The built-in default trainer image under every runtime and job (chart operator.defaultTrainerImage);
    # "" = the release's (manifest.DEFAULT_IMAGE).
    default_image: str = ""
    # How often a job waiting for its runtime looks again.
    runtime_retry_seconds: float = 5.0


def pod_attempt(pod: dict[str, Any]) -> int:
    try:
        return int(((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_ATTEMPT, "0"))
    except ValueError:
        return 0


def plan(world: World, opts: PlanOptions | None = None) -> Plan:
    return _Planner(world, opts or PlanOptions()).run()


def refuse(world: World, opts: PlanOptions | None, message: str) -> Plan:
    """The apiserver refused an object built from the spec (no retry can help): the job fails, saying so."""
    planner = _Planner(world, opts or PlanOptions())
    planner._fail(status.R_INVALID_SPEC, message)
    return planner.result()


class _Planner:
    def __init__(self, world: World, opts: PlanOptions) -> None:
        self.world = world
        self.opts = opts
        self.now = world.now
        self.meta: dict[str, Any] = world.job.get("metadata") or {}
        self.spec_raw: dict[str, Any] = world.job.get("spec") or {}
        self.job_status = status.JobStatus.model_validate(world.job.get("status") or {})
        self.actions: list[Action] = []
        self.events: list[Event] = []
        self.requeue: float | None = None
        self.summary: str | None = None
        self.act_first = False
        self.views: list[tuple[int, PodView, dict[str, Any]]] = []
        for pod in world.pods:
            view = policy.observe_pod(pod, LABEL_INDEX)
            if view.node_name in world.node_not_ready_since:
                view = _with_node(view, world.node_not_ready_since[view.node_name])
            self.views.append((pod_attempt(pod), view, pod))

    # ----- entry -----

    def run(self) -> Plan:
        if status.is_finished(self.job_status):
            self._finished()
        else:
            self._active()
            if status.is_finished(self.job_status):
                # The reconcile that finishes the job must start its TTL clock: no later event may come.
                self._ttl()
        return self.result()

    def result(self) -> Plan:
        job_status = self.job_status
        job_status.observed_generation = self.meta.get("generation")
        job_status.phase = status.derive_phase(job_status)  # type: ignore[assignment]
        job_status.message = self.summary or self._condition_message(job_status.phase)
        return Plan(job_status, self.actions, self.events, self.requeue, self.act_first)

    # ----- small helpers -----

    def _event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, message))

    def _cond(self, type_: str, value: bool, reason: str, message: str,
              event: tuple[Literal["Normal", "Warning"], str] | None = None) -> None:  # fmt: skip
        """Set a condition; on a transition to True (or to False with ``event``) record an Event."""
        if status.set_condition(self.job_status, type_, value, reason, message, self.now) and event is not None:
            self._event(event[0], event[1] or reason, message)

    def _condition_message(self, phase: str | None) -> str | None:
        cond = status.get_condition(self.job_status, phase or "")
        return cond.message if cond else None

    def _after(self, seconds: float) -> None:
        seconds = max(1.0, seconds)
        self.requeue = seconds if self.requeue is None else min(self.requeue, seconds)

    def _stop(self, views: list[PodView], remove_finished: bool) -> None:
        """Delete pods (SIGTERM, grace period); force-delete those a dead node will never confirm."""
        for v in views:
            if v.deleting:
                if self._stuck(v):
                    self.actions.append(Action("force-delete", name=v.name))
            elif v.active or remove_finished:
                self.actions.append(Action("delete", name=v.name))

    def _stuck(self, v: PodView) -> bool:
        if v.deletion_deadline is None or v.node_not_ready_since is None:
            return False
        return (self.now - v.deletion_deadline).total_seconds() > FORCE_DELETE_AFTER_SECONDS

    def _counters(self) -> Counters:
        job_status = self.job_status
        return Counters(
            job_status.restarts,
            job_status.preemptions,
            job_status.preemptions_without_progress,
            job_status.memory_savers,
        )

    def _set_counters(self, counters: Counters) -> None:
        job_status = self.job_status
        job_status.restarts, job_status.preemptions = counters.restarts, counters.preemptions
        job_status.preemptions_without_progress = counters.preemptions_without_progress
        job_status.memory_savers = counters.memory_savers

    def _end_attempt(self, attempt: int, reason: str) -> None:
        """The attempt is over: its pods are removed, and the next attempt waits for that (and any backoff)."""
        job_status = self.job_status
        job_status.ended_attempt, job_status.ended_reason = attempt, reason
        job_status.ended_time = status.timestamp(self.now)

    # ----- finished jobs: stragglers and TTL -----

    def _finished(self) -> None:
        self._stop([v for _, v, _ in self.views if v.active], remove_finished=False)
        self._ttl()

    def _ttl(self) -> None:
        effective = merge_spec(self.job_status.effective_spec or {}, self.spec_raw)
        ttl = (effective.get("runPolicy") or {}).get("ttlSecondsAfterFinished")
        done = status.parse_time(self.job_status.completion_time)
        if isinstance(ttl, int) and done is not None:
            left = ttl - (self.now - done).total_seconds()
            if left <= 0:
                self.actions.append(Action("delete-job"))
            else:
                self._after(left)

    def _fail(self, reason: str, message: str) -> None:
        job_status = self.job_status
        self._cond(status.RUNNING, False, reason, message)
        self._cond(status.WAITING, False, reason, message)
        self._cond(status.FAILED, True, reason, message, event=("Warning", reason))
        job_status.completion_time = status.timestamp(self.now)
        job_status.eta = None
        job_status.eta_seconds = None
        if job_status.attempt:
            self._end_attempt(job_status.attempt, reason)
        self._stop([v for _, v, _ in self.views if v.active], remove_finished=False)

    # ----- validation and refused edits -----

    def _validated(self) -> ValidJob:
        job_status = self.job_status
        current = training_hash(self.spec_raw)
        body = self.world.job
        if job_status.training_hash and job_status.training_hash != current:
            accepted = self.world.accepted_config
            cm = names_for(str(self.meta.get("name", ""))).configmap
            if not accepted:
                raise SpecError("spec.training", f"was edited while the job runs, and the accepted settings (ConfigMap "
                                f"{cm}) are gone; create a new job for the new settings.")  # fmt: skip
            message = (f"spec.training cannot change while the job runs ({self._edited_fields(accepted)}); it keeps "
                       "running with the accepted settings. Revert the edit, or create a new job.")  # fmt: skip
            self._cond(status.SPEC_CHANGE_REFUSED, True, status.R_TRAINING_EDITED, message, event=("Warning", ""))
            body = {**body, "spec": {**self.spec_raw, "method": accepted["method"], "training": accepted["training"]}}
        else:
            self._cond(status.SPEC_CHANGE_REFUSED, False, status.R_TRAINING_RESTORED, "spec.training matches the accepted settings.",
                       event=("Normal", ""))  # fmt: skip
        base, runtime = self._base()
        job = validate(body, self.opts.max_nodes, self.opts.allowed_powers, base)
        if job_status.training_hash is None:
            job_status.training_hash = current
        if job_status.effective_spec is None:
            # Accepted now: from here on the job runs on this snapshot, whatever happens to its runtime.
            job_status.effective_spec, job_status.effective_spec_hash = job.snapshot, job.spec_hash
            job_status.runtime = runtime or None
            waiting = status.get_condition(job_status, status.WAITING)
            if waiting is not None and waiting.reason == status.R_RUNTIME_NOT_FOUND:
                self._cond(status.WAITING, False, status.R_RUNTIME_FOUND,
                           f"DreamBoothRuntime {runtime!r} found." if runtime else "no runtime.")  # fmt: skip
        return job

    def _base(self) -> tuple[dict[str, Any], str]:
        """What the job's own spec is laid over, and the runtime's name: the snapshot once accepted; before
        that the runtime over the built-in defaults. Raises RuntimeMissing for a named runtime that is not there."""
        job_status = self.job_status
        if job_status.effective_spec is not None:
            return job_status.effective_spec, job_status.runtime or ""
        builtin: dict[str, Any] = {"resources": {"image": self.opts.default_image}} if self.opts.default_image else {}
        view = self.world.runtime
        if job_status.training_hash is not None or view is None or not view.name:
            # Accepted by an operator before runtimes (its spec holds the old schema defaults), or no runtime.
            return builtin, ""
        if view.spec is None:
            raise RuntimeMissing(view.name, view.source)
        return merge_spec(builtin, view.spec), view.name

    def _edited_fields(self, accepted: dict[str, Any]) -> str:
        method = self.spec_raw.get("method", "full")
        if method != accepted.get("method"):
            return f"spec.method {accepted.get('method')} -> {method}"
        try:
            edited = parse_training(method, self.spec_raw.get("training") or {}).to_training_spec()
        except ValueError as exc:
            return f"the edit is also invalid: {exc}"
        old = accepted.get("training") or {}
        keys = sorted(k for k in set(old) | set(edited) if old.get(k) != edited.get(k))
        return "changed: " + ", ".join(f"spec.training.{k}" for k in keys) if keys else "changed formatting only"

    # ----- active jobs -----

    def _active(self) -> None:
        job_status = self.job_status
        try:
            job = self._validated()
        except SpecError as exc:
            self._fail(status.R_INVALID_SPEC, f"{exc.field}: {exc.message}")
            return
        except RuntimeMissing as exc:
            self._cond(status.WAITING, True, status.R_RUNTIME_NOT_FOUND,
                       f"DreamBoothRuntime {exc.name!r} ({exc.source}) does not exist; the job starts once it is "
                       f"created (kubectl get dbr), or set spec.runtimeRef to an existing one.",
                       event=("Warning", ""))  # fmt: skip
            self._after(self.opts.runtime_retry_seconds)
            return
        job_status.output_uri = job.config.output_dir
        self._merge_termination_checkpoints()
        run_policy = job.spec.run_policy
        start = status.parse_time(job_status.start_time)
        if run_policy.active_deadline_seconds and start is not None and not run_policy.suspend:
            left = run_policy.active_deadline_seconds - (self.now - start).total_seconds()
            if left <= 0:
                self._fail(status.R_DEADLINE, f"the job ran longer than runPolicy.activeDeadlineSeconds "
                           f"({run_policy.active_deadline_seconds} s).")  # fmt: skip
                return
            self._after(left)
        attempt = max([job_status.attempt or 0, *(a for a, _, _ in self.views)])
        job_status.attempt = attempt or None
        current = [v for a, v, _ in self.views if a == attempt]
        older = [v for a, v, _ in self.views if a < attempt]
        self._stop(older, remove_finished=True)
        ended = attempt > 0 and job_status.ended_attempt == attempt
        if ended:
            self._stop(current, remove_finished=True)
        if attempt == 0 or ended:
            self._start_next(job, attempt, blocked=any(v.active for v in older + current))
        else:
            self._live(job, attempt, current)

    def _start_next(self, job: ValidJob, attempt: int, blocked: bool) -> None:
        job_status = self.job_status
        run_policy = job.spec.run_policy
        if blocked:
            # No two attempts ever write at once: the next gang waits until every old pod has stopped.
            return
        if run_policy.suspend:
            kept = job_status.last_checkpoint.step if job_status.last_checkpoint else None
            self._cond(status.RUNNING, False, status.R_SUSPENDED, "suspended")
            self._cond(status.WAITING, False, status.R_SUSPENDED, "suspended")
            self._cond(status.SUSPENDED, True, status.R_SUSPENDED,
                       f"no pods run; the last checkpoint (step {kept if kept is not None else 'none yet'}) is kept. Set "
                       "spec.runPolicy.suspend to false to resume from it.", event=("Normal", ""))  # fmt: skip
            return
        if attempt > 0 and job_status.ended_reason in COUNTED_REASONS:
            delay = policy.backoff_seconds(job_status.restarts, self.opts.backoff_base_seconds)
            ended_at = status.parse_time(job_status.ended_time) or self.now
            left = delay - (self.now - ended_at).total_seconds()
            if left > 0:
                self.summary = (
                    f"attempt {attempt} failed ({job_status.ended_reason}); the next attempt starts in {int(left)} s."
                )
                self._after(left)
                return
        resumed = status.is_true(job_status, status.SUSPENDED)
        new = attempt + 1
        job_status.attempt = new
        job_status.logs_uri = logs_uri(job, new)
        if job_status.start_time is None or resumed:
            job_status.start_time = status.timestamp(self.now)
        if resumed:
            self._cond(
                status.SUSPENDED, False, status.R_RESUMED, "resumed from the last checkpoint.", event=("Normal", "")
            )
        n, nproc = job.spec.resources.nodes, max(1, job.spec.resources.gpus_per_node)
        why = "resume" if resumed else ("first attempt" if attempt == 0 else f"after {job_status.ended_reason}")
        self._cond(status.CREATED, True, status.R_GANG_CREATED, f"attempt {new}: {n} pod(s) x {nproc} process(es).")
        self._cond(status.RUNNING, False, status.R_GANG_CREATED, f"attempt {new} is starting.")
        self._event("Normal", "AttemptStarted", f"attempt {new} ({why}): creating {n} pod(s) x {nproc} process(es).")
        self._create_gang(job, new, range(n))
        job_status.gang_created = new
        self.act_first = True

    def _create_gang(self, job: ValidJob, attempt: int, indexes: range | list[int]) -> None:
        self.actions.append(Action("create", build_configmap(job)))
        self.actions.append(Action("create", build_service(job)))
        # Only the pods to create: a reconcile that finds one pod missing must not build the whole gang again.
        savers, build = self.job_status.memory_savers, self.opts.build
        self.actions += [Action("create", build_pod(job, attempt, i, savers, build)) for i in indexes]

    def _live(self, job: ValidJob, attempt: int, views: list[PodView]) -> None:
        job_status = self.job_status
        run_policy = job.spec.run_policy
        expected = self._gang_size(attempt, job.spec.resources.nodes)
        present = {v.index for v in views}
        missing = [i for i in range(expected) if i not in present]
        if job_status.gang_created != attempt:
            if missing:
                self._create_gang(job, attempt, missing)
                return
            job_status.gang_created = attempt
        if run_policy.suspend:
            self._end_attempt(attempt, status.R_SUSPEND_REQUESTED)
            self._cond(status.RUNNING, False, status.R_SUSPEND_REQUESTED, f"attempt {attempt} is being suspended.")
            self._cond(status.WAITING, False, status.R_SUSPEND_REQUESTED, "suspending")
            self._cond(status.SUSPENDED, True, status.R_SUSPEND_REQUESTED,
                       "stopping the pods: each gets SIGTERM and writes an emergency checkpoint before it exits.",
                       event=("Normal", ""))  # fmt: skip
            self._stop(views, remove_finished=True)
            return
        if self.world.progress is not None:
            self._merge_progress(self.world.progress)
        timing = Timing(
            run_policy.scheduling_timeout_seconds,
            run_policy.progress_deadline_seconds,
            status.parse_time(job_status.last_progress_time),
            self.opts.image_pull_timeout_seconds,
        )
        verdict = policy.classify(views, expected, True, self.now, timing)
        decision = policy.apply_run_policy(verdict, self._counters(), run_policy, self.opts.backoff_base_seconds)
        if decision.action == "wait":
            self._waiting(attempt, verdict)
            self._annotate_checkpoint_time(attempt)
        elif decision.action == "succeed":
            self._succeeded(views)
        else:
            self._set_counters(decision.counters)
            if decision.action == "fail":
                self._fail(decision.reason, decision.message)
            else:
                self._retry(attempt, verdict, decision, views)

    def _annotate_checkpoint_time(self, attempt: int) -> None:
        """The newest checkpoint's time onto each live pod of the attempt that does not carry it yet."""
        ck = self.job_status.last_checkpoint
        if ck is None or not ck.time:
            return
        for a, v, pod in self.views:
            annotations = (pod.get("metadata") or {}).get("annotations") or {}
            if a == attempt and v.active and not v.deleting and annotations.get(ANNOTATION_CHECKPOINT_TIME) != ck.time:
                patch = {"metadata": {"annotations": {ANNOTATION_CHECKPOINT_TIME: ck.time}}}
                self.actions.append(Action("annotate", obj=patch, name=v.name))

    def _gang_size(self, attempt: int, default: int) -> int:
        for a, _, pod in self.views:
            size = ((pod.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_GANG_SIZE)
            if a == attempt and size and size.isdigit():
                return int(size)
        return default

    def _waiting(self, attempt: int, verdict: policy.Verdict) -> None:
        if verdict.kind == Kind.WAITING:
            self._cond(status.RUNNING, False, status.R_UNSCHEDULABLE, f"attempt {attempt} is waiting for capacity.")
            self._cond(status.WAITING, True, status.R_UNSCHEDULABLE, verdict.message, event=("Warning", ""))
        elif verdict.kind == Kind.STARTING:
            self._cond(status.WAITING, False, status.R_SCHEDULED, verdict.message)
            self._cond(status.RUNNING, False, status.R_SCHEDULED, f"attempt {attempt}: {verdict.message}")
        else:
            self._cond(status.WAITING, False, status.R_SCHEDULED, "all pods scheduled.")
            self._cond(status.RUNNING, True, status.R_ALL_PODS_RUNNING, f"attempt {attempt}: {verdict.message}",
                       event=("Normal", ""))  # fmt: skip
            if status.is_true(self.job_status, status.PREEMPTED):
                self._cond(
                    status.PREEMPTED, False, status.R_RESUMED, f"attempt {attempt} resumed after the preemption."
                )

    def _succeeded(self, views: list[PodView]) -> None:
        job_status = self.job_status
        for v in views:
            if v.termination and isinstance(v.termination.get("step"), int):
                job_status.step = max(job_status.step or 0, v.termination["step"])
        step = job_status.step if job_status.step is not None else "?"
        message = f"training finished at step {step}; model in {job_status.output_uri}."
        self._cond(status.RUNNING, False, status.R_COMPLETED, "finished.")
        self._cond(status.WAITING, False, status.R_COMPLETED, "finished.")
        if status.is_true(job_status, status.PREEMPTED):
            self._cond(status.PREEMPTED, False, status.R_COMPLETED, "finished.")
        self._cond(status.SUCCEEDED, True, status.R_COMPLETED, message, event=("Normal", ""))
        job_status.completion_time = status.timestamp(self.now)
        job_status.eta_seconds, job_status.eta = 0, "0s"

    def _retry(self, attempt: int, verdict: policy.Verdict, decision: policy.Decision, views: list[PodView]) -> None:
        self._end_attempt(attempt, verdict.reason)
        self._cond(
            status.CREATED,
            False,
            status.R_ATTEMPT_ENDED,
            f"attempt {attempt} ended ({verdict.reason}); its pods are being removed.",
        )
        self._cond(status.RUNNING, False, verdict.reason, f"attempt {attempt} ended: {decision.message}")
        self._cond(status.WAITING, False, verdict.reason, f"attempt {attempt} ended.")
        if verdict.kind == Kind.PREEMPTED:
            self._cond(status.PREEMPTED, True, verdict.reason, decision.message)
            self._event("Warning", status.R_PREEMPTED, f"attempt {attempt}: {decision.message}")
        else:
            self._event("Warning", verdict.reason, f"attempt {attempt}: {decision.message}")
        # One pod down means the whole gang is: stop the rest now rather than leave NCCL peers hanging.
        self._stop(views, remove_finished=True)

    # ----- progress -----

    def _merge_progress(self, doc: dict[str, Any]) -> None:
        job_status = self.job_status
        step = _int(doc.get("step"))
        phase = doc.get("phase") if isinstance(doc.get("phase"), str) else None
        if (phase, step) != (job_status.trainer_phase, job_status.step) or job_status.last_progress_time is None:
            job_status.last_progress_time = status.timestamp(self.now)
        job_status.trainer_phase = phase
        job_status.step = step
        job_status.max_steps = _int(doc.get("maxSteps"))
        job_status.loss = _float(doc.get("loss"))
        job_status.steps_per_second = _float(doc.get("stepsPerSecond"))
        eta = _float(doc.get("etaSeconds"))
        job_status.eta_seconds = int(round(eta)) if eta is not None else None
        job_status.eta = status.format_duration(eta)
        startup = doc.get("startupSeconds")
        if isinstance(startup, dict):
            phases = {k: _float(startup.get(k)) for k in STARTUP_PHASES}
            job_status.startup_seconds = {k: v for k, v in phases.items() if v is not None} or None
        reported = doc.get("lastCheckpoint")
        if isinstance(reported, dict) and _int(reported.get("step")) is not None:
            checkpoint_step = _int(reported.get("step")) or 0
            self._checkpoint(checkpoint_step, str(reported.get("uri") or ""), None, reported.get("time"))
        images = doc.get("validationImages")
        if isinstance(images, list) and images:
            # The latest images stand until newer ones exist: a new attempt reports [] until it validates.
            job_status.validation_images = [str(u) for u in images]

    def _merge_termination_checkpoints(self) -> None:
        """Checkpoints named by pods on their way out, from any attempt, whether the pod is still listed or gone."""
        gone = [policy.observe_pod(pod, LABEL_INDEX) for pod in self.world.gone_pods]
        for v in [v for _, v, _ in self.views] + gone:
            term = v.termination or {}
            # After a stop, checkpointUri is what the next attempt resumes from; after completion it is the
            # final model, which is no checkpoint.
            done = str(term.get("reason", "")).lower() == "completed" or v.exit_code == 0
            if term.get("checkpointUri") and isinstance(term.get("step"), int) and not done:
                self._checkpoint(term["step"], str(term["checkpointUri"]), v.finished_at)
            images = term.get("validationImages")
            if done and isinstance(images, list) and images:
                # The final validation runs after the last /progress poll as often as not: the outcome says it.
                self.job_status.validation_images = [str(u) for u in images]

    def _checkpoint(self, step: int, uri: str, when: datetime | None, when_text: Any = None) -> None:
        job_status = self.job_status
        known = (
            job_status.last_checkpoint.step
            if job_status.last_checkpoint and job_status.last_checkpoint.step is not None
            else -1
        )
        if step <= known:
            return
        stamp = when_text if isinstance(when_text, str) else status.timestamp(when or self.now)
        job_status.last_checkpoint = status.Checkpoint(step=step, uri=uri or None, time=stamp)
        _mark_checkpointed(job_status, step, uri, stamp)
        # A new durable checkpoint is progress: preemptions before it no longer count as a loop.
        job_status.preemptions_without_progress = 0


def _mark_checkpointed(job_status: status.JobStatus, step: int, uri: str, stamp: str) -> None:
    """The Checkpointed condition: True from the first durable checkpoint on; unlike other conditions its
    lastTransitionTime follows every newer checkpoint (its time, not the operator's), which is what a scheduler
    comparing checkpoint freshness reads."""
    message = f"checkpoint-{step} at {uri}" if uri else f"checkpoint-{step}"
    cond = status.get_condition(job_status, status.CHECKPOINTED)
    if cond is None:
        job_status.conditions.append(
            status.Condition(
                type=status.CHECKPOINTED,
                status="True",
                reason=status.R_CHECKPOINT_PUBLISHED,
                message=message,
                last_transition_time=stamp,
            )  # fmt: skip
        )
        return
    cond.status, cond.reason, cond.message, cond.last_transition_time = (
        "True",
        status.R_CHECKPOINT_PUBLISHED,
        message,
        stamp,
    )


def _with_node(view: PodView, since: datetime) -> PodView:
    return replace(view, node_not_ready_since=since)


def _int(value: Any) -> int | None:
    return (
        int(value) if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) else None
    )


def _float(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None
