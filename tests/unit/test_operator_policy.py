"""The failure policy of docs/design.md, row by row: pod facts -> verdict -> decision."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from dreambooth_api.manifest import RunPolicy
from dreambooth_operator import policy
from dreambooth_operator import status as S
from dreambooth_operator.policy import (
    Counters,
    Kind,
    PodView,
    Timing,
    apply_run_policy,
    classify,
    observe_pod,
    pod_verdict,
)

pytestmark = pytest.mark.unit
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
T = Timing(scheduling_timeout=600, progress_deadline=900)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


def running(i: int = 0, **kw: Any) -> PodView:
    return PodView(name=f"p{i}", index=i, phase="Running", created=ago(100), running_since=ago(90), ready=True, **kw)


def exited(i: int, code: int, **kw: Any) -> PodView:
    phase = "Succeeded" if code == 0 else "Failed"
    return PodView(name=f"p{i}", index=i, phase=phase, created=ago(100), exit_code=code, finished_at=ago(1), **kw)


def msg(reason: str, text: str = "", step: int | None = None) -> dict[str, Any]:
    return {"reason": reason, "message": text, "step": step, "checkpointUri": None}


# ----- one pod -> verdict: (pod, expected kind, expected reason) -----
POD_ROWS = [
    ("exit 64 bad input", exited(0, 64, termination=msg("bad-input", "--instance_data_dir: no images")), Kind.BAD_INPUT, S.R_BAD_INPUT),
    ("exit 64 non-finite loss: Failed, not retried",
     exited(0, 64, termination=msg("NonFiniteLoss", "the loss of step 2 is nan: lower learningRate", step=1)),
     Kind.BAD_INPUT, S.R_NON_FINITE_LOSS),
    ("exit 75 launcher preempted", exited(0, 75), Kind.PREEMPTED, S.R_LAUNCHER_PREEMPTED),
    ("exit 71 GPU OOM", exited(0, 71), Kind.GPU_OOM, S.R_GPU_OOM),
    ("exit 70 crash", exited(0, 70), Kind.FAILED, S.R_CRASH),
    ("exit 1 other crash", exited(0, 1), Kind.FAILED, S.R_CRASH),
    ("exit 137 OOMKilled", exited(0, 137, terminated_reason="OOMKilled"), Kind.FAILED, S.R_HOST_OOM),
    ("deleted, not by us", running(deleting=True), Kind.PREEMPTED, S.R_POD_DELETED),
    ("DisruptionTarget PreemptionByScheduler", running(disruption_reason="PreemptionByScheduler"), Kind.PREEMPTED, S.R_DISRUPTION),
    ("DisruptionTarget DeletionByTaintManager", running(disruption_reason="DeletionByTaintManager"), Kind.PREEMPTED, S.R_DISRUPTION),
    ("DisruptionTarget EvictionByEvictionAPI", running(disruption_reason="EvictionByEvictionAPI"), Kind.PREEMPTED, S.R_DISRUPTION),
    ("DisruptionTarget TerminationByKubelet", running(disruption_reason="TerminationByKubelet",
                                                       disruption_message="The node was low on resource: memory."),
     Kind.FAILED, S.R_EVICTED),
    ("kubelet eviction (reason Evicted)", exited(0, 137, pod_reason="Evicted",
                                                 pod_message="The node was low on resource: ephemeral-storage."),
     Kind.FAILED, S.R_EVICTED),
    ("graceful node shutdown", exited(0, 143, pod_reason="Terminated", pod_message="Pod was terminated in response to imminent node shutdown."),
     Kind.PREEMPTED, S.R_NODE_SHUTDOWN),
    ("node shutdown reason", exited(0, 75, pod_reason="NodeShutdown"), Kind.PREEMPTED, S.R_NODE_SHUTDOWN),
    ("node NotReady > 60 s", running(node_name="n1", node_not_ready_since=ago(61)), Kind.PREEMPTED, S.R_NODE_LOST),
    ("invalid image", PodView(name="p0", index=0, waiting_reason="InvalidImageName", waiting_message="bad ref"),
     Kind.BAD_INPUT, S.R_IMAGE),
]  # fmt: skip


@pytest.mark.parametrize(("label", "pod", "kind", "reason"), POD_ROWS, ids=[r[0] for r in POD_ROWS])
def test_pod_verdict(label: str, pod: PodView, kind: Kind, reason: str) -> None:
    verdict = pod_verdict(pod, NOW)
    assert verdict is not None, label
    assert (verdict.kind, verdict.reason) == (kind, reason)
    assert verdict.pod == pod.name


@pytest.mark.parametrize(
    "pod",
    [running(), running(node_name="n1", node_not_ready_since=ago(30)), exited(0, 0),
     PodView(name="p0", index=0, waiting_reason="ContainerCreating")],
)  # fmt: skip
def test_pod_without_verdict(pod: PodView) -> None:
    assert pod_verdict(pod, NOW) is None


def test_advice_names_the_limit_to_raise() -> None:
    oom = pod_verdict(exited(0, 137, terminated_reason="OOMKilled"), NOW)
    assert oom is not None and "limits.memory" in oom.message and "dataloaderNumWorkers" in oom.message
    disk = pod_verdict(exited(0, 137, pod_reason="Evicted", pod_message="low on resource: ephemeral-storage"), NOW)
    assert disk is not None and "ephemeral-storage" in disk.message
    mem = pod_verdict(
        running(disruption_reason="TerminationByKubelet", disruption_message="low on resource: memory"), NOW
    )
    assert mem is not None and "requests.memory" in mem.message
    bad = pod_verdict(
        exited(0, 64, termination=msg("bad-input", "--instance_data_dir (spec.training.instanceDataDir): empty")), NOW
    )
    assert bad is not None and "spec.training.instanceDataDir" in bad.message


# ----- a gang -> one outcome -----
GANG_ROWS = [
    ("all running", [running(0), running(1)], Kind.RUNNING, S.R_ALL_PODS_RUNNING),
    ("all succeeded", [exited(0, 0), exited(1, 0)], Kind.SUCCEEDED, S.R_COMPLETED),
    ("one finished, one still running", [exited(0, 0), running(1)], Kind.RUNNING, S.R_ALL_PODS_RUNNING),
    ("bad input beats a peer's preemption echo", [exited(0, 64), exited(1, 75)], Kind.BAD_INPUT, S.R_BAD_INPUT),
    ("preemption beats the peer's crash", [exited(0, 70), running(1, deleting=True)], Kind.PREEMPTED, S.R_POD_DELETED),
    ("preemption beats GPU OOM", [exited(0, 71), exited(1, 75)], Kind.PREEMPTED, S.R_LAUNCHER_PREEMPTED),
    ("GPU OOM beats a crash", [exited(0, 70), exited(1, 71)], Kind.GPU_OOM, S.R_GPU_OOM),
    ("host OOM beats a plain crash", [exited(0, 70), exited(1, 137, terminated_reason="OOMKilled")], Kind.FAILED, S.R_HOST_OOM),
    ("one crash, peer finished too", [exited(0, 70), exited(1, 70)], Kind.FAILED, S.R_CRASH),
    ("pod missing from a created gang", [running(0)], Kind.PREEMPTED, S.R_POD_DELETED),
    ("unschedulable", [running(0), PodView(name="p1", index=1, created=ago(100), unschedulable="0/3 nodes: Insufficient nvidia.com/gpu")],
     Kind.WAITING, S.R_UNSCHEDULABLE),
    ("unschedulable past the timeout", [PodView(name="p0", index=0, created=ago(601), unschedulable="no gpu"), running(1)],
     Kind.FAILED, S.R_SCHEDULING_TIMEOUT),
    ("pending (pulling)", [running(0), PodView(name="p1", index=1, created=ago(10), waiting_reason="ContainerCreating")],
     Kind.STARTING, S.R_SCHEDULED),
    ("pending past the timeout", [PodView(name="p0", index=0, created=ago(700), waiting_reason="ContainerCreating"), running(1)],
     Kind.FAILED, S.R_SCHEDULING_TIMEOUT),
    ("image pull failing, within its timeout", [running(0), PodView(name="p1", index=1, created=ago(200), scheduled_at=ago(200),
                                                                    waiting_reason="ImagePullBackOff")],
     Kind.STARTING, S.R_SCHEDULED),
    ("image pull failing past its timeout", [running(0), PodView(name="p1", index=1, created=ago(301), scheduled_at=ago(301),
                                                                 waiting_reason="ErrImagePull")],
     Kind.BAD_INPUT, S.R_IMAGE_PULL),
    ("long unschedulable, then a pull failing briefly", [running(0), PodView(name="p1", index=1, created=ago(500),
                                                                             scheduled_at=ago(30), waiting_reason="ErrImagePull")],
     Kind.STARTING, S.R_SCHEDULED),
]  # fmt: skip


@pytest.mark.parametrize(("label", "pods", "kind", "reason"), GANG_ROWS, ids=[r[0] for r in GANG_ROWS])
def test_classify(label: str, pods: list[PodView], kind: Kind, reason: str) -> None:
    outcome = classify(pods, expected=2, gang_created=True, now=NOW, timing=T)
    assert (outcome.kind, outcome.reason) == (kind, reason), outcome.message


def test_the_pod_that_failed_first_is_the_root_cause() -> None:
    first = PodView(
        name="p1",
        index=1,
        phase="Failed",
        exit_code=70,
        created=ago(100),
        finished_at=ago(30),
        termination=msg("crash", "OSError: no model.safetensors"),
    )
    echo = PodView(name="p0", index=0, phase="Failed", exit_code=70, created=ago(100), finished_at=ago(25),
                   raw_message="gloo: Connection closed by peer")  # fmt: skip
    outcome = classify([echo, first], 2, True, NOW, T)
    assert outcome.pod == "p1" and "model.safetensors" in outcome.message


def test_gang_not_yet_created_is_starting() -> None:
    assert classify([running(0)], 2, gang_created=False, now=NOW, timing=T).kind == Kind.STARTING


def test_crash_waits_briefly_for_a_peer_preemption_reason() -> None:
    crash = PodView(name="p0", index=0, phase="Failed", exit_code=70, created=ago(100), finished_at=ago(5))
    assert classify([crash, running(1)], 2, True, NOW, T).kind == Kind.RUNNING
    late = PodView(
        name="p0",
        index=0,
        phase="Failed",
        exit_code=70,
        created=ago(100),
        finished_at=ago(policy.CRASH_SETTLE_SECONDS + 1),
    )
    assert classify([late, running(1)], 2, True, NOW, T).reason == S.R_CRASH


def test_hung_gang_after_progress_deadline() -> None:
    pods = [
        PodView(name=f"p{i}", index=i, phase="Running", created=ago(2000), running_since=ago(1900)) for i in range(2)
    ]
    assert classify(pods, 2, True, NOW, Timing(600, 900, last_progress=ago(901))).reason == S.R_HUNG
    assert classify(pods, 2, True, NOW, Timing(600, 900, last_progress=ago(100))).kind == Kind.RUNNING
    # A fresh attempt gets the full deadline from when its pods started, whatever the old progress time.
    fresh = [PodView(name=f"p{i}", index=i, phase="Running", created=ago(60), running_since=ago(50)) for i in range(2)]
    assert classify(fresh, 2, True, NOW, Timing(600, 900, last_progress=ago(5000))).kind == Kind.RUNNING


# ----- outcome + budgets -> decision -----
RP = RunPolicy(backoff_limit=2, max_preemptions=3)


def outcome(kind: Kind, reason: str = "") -> policy.Verdict:
    return policy.Verdict(kind, reason or str(kind), "msg.")


DECISION_ROWS = [
    # (label, outcome, counters before, action, counters after, counted)
    ("running waits", outcome(Kind.RUNNING), Counters(), "wait", Counters(), ""),
    ("waiting for capacity costs nothing", outcome(Kind.WAITING), Counters(restarts=2), "wait", Counters(restarts=2), ""),
    ("success", outcome(Kind.SUCCEEDED), Counters(), "succeed", Counters(), ""),
    ("bad input fails at once", outcome(Kind.BAD_INPUT, S.R_BAD_INPUT), Counters(), "fail", Counters(), ""),
    ("a diverged run fails at once", outcome(Kind.BAD_INPUT, S.R_NON_FINITE_LOSS), Counters(), "fail", Counters(), ""),
    ("preemption never costs backoff", outcome(Kind.PREEMPTED, S.R_POD_DELETED), Counters(restarts=2),
     "retry", Counters(restarts=2, preemptions=1, preemptions_without_progress=1), "preemption"),
    ("preemption at the bound is still retried", outcome(Kind.PREEMPTED), Counters(preemptions=2),
     "retry", Counters(preemptions=3, preemptions_without_progress=1), "preemption"),
    ("preemption above maxPreemptions fails", outcome(Kind.PREEMPTED), Counters(preemptions=3),
     "fail", Counters(preemptions=4, preemptions_without_progress=1), "preemption"),
    ("preemptions without progress fail", outcome(Kind.PREEMPTED),
     Counters(preemptions=1, preemptions_without_progress=policy.NO_PROGRESS_PREEMPTIONS - 1),
     "fail", Counters(preemptions=2, preemptions_without_progress=policy.NO_PROGRESS_PREEMPTIONS), "preemption"),
    ("first GPU OOM retries with memory savers", outcome(Kind.GPU_OOM, S.R_GPU_OOM), Counters(),
     "retry", Counters(memory_savers=True), ""),
    ("second GPU OOM fails", outcome(Kind.GPU_OOM, S.R_GPU_OOM), Counters(memory_savers=True),
     "fail", Counters(memory_savers=True), ""),
    ("crash retries and counts", outcome(Kind.FAILED, S.R_CRASH), Counters(), "retry", Counters(restarts=1), "restart"),
    ("crash at backoffLimit is retried", outcome(Kind.FAILED, S.R_CRASH), Counters(restarts=1),
     "retry", Counters(restarts=2), "restart"),
    ("crash above backoffLimit fails", outcome(Kind.FAILED, S.R_CRASH), Counters(restarts=2),
     "fail", Counters(restarts=3), "restart"),
    ("host OOM counts", outcome(Kind.FAILED, S.R_HOST_OOM), Counters(), "retry", Counters(restarts=1), "restart"),
    ("eviction counts", outcome(Kind.FAILED, S.R_EVICTED), Counters(), "retry", Counters(restarts=1), "restart"),
    ("hung gang counts", outcome(Kind.FAILED, S.R_HUNG), Counters(), "retry", Counters(restarts=1), "restart"),
    ("scheduling timeout counts", outcome(Kind.FAILED, S.R_SCHEDULING_TIMEOUT), Counters(),
     "retry", Counters(restarts=1), "restart"),
]  # fmt: skip


@pytest.mark.parametrize(("label", "out", "before", "action", "after", "counted"), DECISION_ROWS,
                         ids=[r[0] for r in DECISION_ROWS])  # fmt: skip
def test_decide(label: str, out: policy.Verdict, before: Counters, action: str, after: Counters, counted: str) -> None:
    d = apply_run_policy(out, before, RP, backoff_base=10)
    assert d.action == action
    assert d.counters == after
    assert d.counted == counted


def test_decision_messages() -> None:
    d = apply_run_policy(outcome(Kind.FAILED, S.R_CRASH), Counters(restarts=2), RP)
    assert d.reason == S.R_BACKOFF_LIMIT and "TrainerCrashed" in d.message and "backoffLimit (2)" in d.message
    d = apply_run_policy(outcome(Kind.GPU_OOM, S.R_GPU_OOM), Counters(), RP)
    assert "no longer bit-exact" in d.message and "gradient checkpointing" in d.message
    d = apply_run_policy(outcome(Kind.PREEMPTED), Counters(preemptions=3), RP)
    assert d.reason == S.R_TOO_MANY_PREEMPTIONS and "maxPreemptions (3)" in d.message
    d = apply_run_policy(outcome(Kind.FAILED, S.R_CRASH), Counters(restarts=1), RP, backoff_base=10)
    assert d.delay_seconds == 20


def test_backoff_doubles_and_caps() -> None:
    assert [policy.backoff_seconds(n, 10) for n in range(0, 8)] == [0, 10, 20, 40, 80, 160, 320, 360]


def test_observe_pod_from_the_api() -> None:
    pod = {
        "metadata": {"name": "j-a1-1", "labels": {"idx": "1"}, "creationTimestamp": "2026-01-01T11:58:00Z",
                     "deletionTimestamp": "2026-01-01T12:02:00Z"},
        "spec": {"nodeName": "n1"},
        "status": {
            "phase": "Failed", "reason": "Terminated", "message": "node shutdown", "podIP": "10.0.0.5",
            "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler", "message": "m"},
                           {"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                "exitCode": 75, "reason": "Error", "finishedAt": "2026-01-01T11:59:50Z",
                "message": json.dumps(msg("preempted", "emergency checkpoint published", 40))}}}],
        },
    }  # fmt: skip
    v = observe_pod(pod, "idx")
    assert (v.name, v.index, v.phase, v.exit_code, v.deleting) == ("j-a1-1", 1, "Failed", 75, True)
    assert v.disruption_reason == "PreemptionByScheduler" and v.pod_reason == "Terminated"
    assert v.termination == msg("preempted", "emergency checkpoint published", 40)
    assert v.finished_at == ago(10) and v.node_name == "n1" and v.pod_ip == "10.0.0.5"
    pending = observe_pod(
        {
            "metadata": {"name": "x"},
            "status": {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "Insufficient cpu",
                    }
                ],
            },
        },
        "idx",
    )
    assert pending.unschedulable == "Insufficient cpu" and pending.index == 0
    log_tail = observe_pod(
        {
            "metadata": {"name": "x"},
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {"state": {"terminated": {"exitCode": 1, "message": "Traceback ...\nValueError: boom"}}}
                ],
            },
        },
        "idx",
    )
    assert (
        log_tail.termination is None and "boom" in (pod_verdict(log_tail, NOW) or policy.Verdict(Kind.RUNNING)).message
    )


def test_a_missing_image_names_the_reference_and_the_fix() -> None:
    pull = PodView(name="j-a1-0", index=0, created=ago(40), scheduled_at=ago(40), waiting_reason="ImagePullBackOff",
                   waiting_message='Back-off pulling image "reg.example/trainer:nope": manifest unknown')  # fmt: skip
    quick = Timing(600, 900, image_pull_timeout=30)
    outcome = classify([pull], 1, True, NOW, quick)
    assert (outcome.kind, outcome.reason) == (Kind.BAD_INPUT, S.R_IMAGE_PULL)
    assert "reg.example/trainer:nope" in outcome.message and "spec.resources.image" in outcome.message
    assert "imagePullSecrets" in outcome.message
    # Not retried: bad input ends the job whatever the backoff limit.
    decision = apply_run_policy(outcome, Counters(), RunPolicy(backoffLimit=5), 10)
    assert decision.action == "fail", decision
