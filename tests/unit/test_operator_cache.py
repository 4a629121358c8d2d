"""The watch cache: when a plan made from it may be carried out, and how it stays no older than it must be."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from test_operator_reconcile import Env

from dreambooth_operator import status as S
from dreambooth_operator.cache import GONE_PODS_PER_JOB, Informer
from dreambooth_operator.plan import Action, Plan
from dreambooth_operator.reconciler import Reconciler, live_reads_needed
from dreambooth_operator.resources import LABEL_JOB_UID

pytestmark = pytest.mark.unit

RUNNING = {"attempt": 1, "restarts": 0, "preemptions": 0, "gangCreated": 1, "phase": "Created"}
POD = {"kind": "Pod", "metadata": {"name": "dog-a2-0"}}


def _plan(status: dict[str, Any], actions: list[Action] | None = None, act_first: bool = False) -> Plan:
    return Plan(S.JobStatus.model_validate(status), actions or [], [], None, act_first)


@pytest.mark.parametrize(
    ("old", "new", "actions", "act_first", "needed"),
    [
        # Nothing to do, or only phase/conditions/progress to write: the cache is enough (the write's
        # resourceVersion precondition catches a stale job).
        (RUNNING, RUNNING, [], False, set()),
        (RUNNING, {**RUNNING, "phase": "Running", "step": 7, "loss": 0.1}, [], False, set()),
        # The first attempt: the live status must say no attempt exists; no pods can exist to list.
        ({}, {"attempt": 1, "gangCreated": 1}, [Action("create", POD)], True, {"job"}),
        # Any later attempt: the old attempt's pods must be seen gone, live.
        ({**RUNNING, "endedAttempt": 1}, {**RUNNING, "attempt": 2, "gangCreated": 2, "endedAttempt": 1},
         [Action("create", POD)], True, {"job", "pods"}),
        # Deleting pods (an ended gang, a suspend) or the job, or re-creating a missing pod.
        (RUNNING, RUNNING, [Action("delete", name="dog-a1-0")], False, {"job", "pods"}),
        (RUNNING, RUNNING, [Action("force-delete", name="dog-a1-0")], False, {"job", "pods"}),
        (RUNNING, RUNNING, [Action("delete-job")], False, {"job", "pods"}),
        (RUNNING, RUNNING, [Action("create", POD)], False, {"job", "pods"}),
        # Counting: a preemption, a restart, an ended attempt, a finished job, memory savers.
        (RUNNING, {**RUNNING, "preemptions": 1}, [], False, {"job", "pods"}),
        (RUNNING, {**RUNNING, "restarts": 1}, [], False, {"job", "pods"}),
        (RUNNING, {**RUNNING, "endedAttempt": 1, "endedReason": "Suspended"}, [], False, {"job", "pods"}),
        (RUNNING, {**RUNNING, "completionTime": "2026-01-01T00:00:00Z"}, [], False, {"job", "pods"}),
        (RUNNING, {**RUNNING, "memorySavers": True}, [], False, {"job", "pods"}),
        ({**RUNNING, "gangCreated": None}, RUNNING, [], False, {"job", "pods"}),
        # Defaults the apiserver has not stored yet are no change.
        ({"attempt": 1, "gangCreated": 1}, {**RUNNING, "memorySavers": False}, [], False, set()),
    ],
)  # fmt: skip
def test_live_reads_needed(old: dict[str, Any], new: dict[str, Any], actions: list[Action], act_first: bool,
                           needed: set[str]) -> None:  # fmt: skip
    assert live_reads_needed(old, _plan(new, actions, act_first)) == needed


class Tick:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _job(rv: str, **status: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": "dog", "uid": "u", "resourceVersion": rv}, "status": status}


def _pod(name: str, phase: str = "Pending") -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "labels": {LABEL_JOB_UID: "u"}}, "status": {"phase": phase}}


def test_job_is_served_only_after_a_live_read_and_until_the_refresh_is_due() -> None:
    tick = Tick()
    c = Informer(clock=tick, refresh_seconds=60)
    c.job_seen(_job("1"))
    assert c.job("ns", "dog") is None  # never read live in this process
    c.job_read(_job("1"))
    c.job_seen(_job("2", phase="Running"))
    assert (c.job("ns", "dog") or {})["status"] == {"phase": "Running"}
    tick.t += 61
    assert c.job("ns", "dog") is None
    c.job_seen(_job("3"), deleted=True)
    assert c.job("ns", "dog") is None


def test_own_write_is_not_replaced_by_an_older_watch_event() -> None:
    c = Informer(clock=Tick())
    c.job_read(_job("5"))
    c.job_read(_job("7", attempt=1), written=True)  # our status write
    c.job_seen(_job("6"))  # in flight before it: older, must not win
    assert c.job("ns", "dog") is None  # untrusted: the next reconcile reads live
    c.job_read(_job("7", attempt=1))
    c.job_read(_job("9", attempt=2), written=True)
    c.job_seen(_job("9", attempt=2))  # the echo
    c.job_seen(_job("10", attempt=2, step=3))  # then newer changes are taken again
    assert (c.job("ns", "dog") or {})["status"] == {"attempt": 2, "step": 3}


def test_own_write_whose_echo_came_first_does_not_wait_for_it() -> None:
    c = Informer(clock=Tick())
    c.job_read(_job("5"))
    c.job_seen(_job("7", attempt=1))  # the watch was faster than the patch response
    c.job_read(_job("7", attempt=1), written=True)
    c.job_seen(_job("8", attempt=1, step=1))
    assert (c.job("ns", "dog") or {})["status"] == {"attempt": 1, "step": 1}


def test_answers_that_arrive_after_newer_watch_events_do_not_replace_them() -> None:
    c = Informer(clock=Tick())
    c.job_read(_job("5"))
    c.job_seen(_job("7", attempt=1))  # our write's echo ...
    c.job_seen(_job("8", attempt=1, suspend=True))  # ... and a user's edit, both before the patch response
    c.job_read(_job("7", attempt=1), written=True)
    assert (c.job("ns", "dog") or {})["status"] == {"attempt": 1, "suspend": True}
    # A pod's watch events (here: the scheduler's verdict) before its create response came back.
    c.mark_complete("u")
    c.pod_seen(_pod("dog-a1-0", "Unschedulable"))
    c.pod_created(_pod("dog-a1-0"))
    c.pod_seen(_pod("dog-a1-1"), deleted=True)
    c.pod_created(_pod("dog-a1-1"))  # already deleted: not brought back
    assert [(p["metadata"]["name"], p["status"]["phase"]) for p in c.pods("u") or []] == [("dog-a1-0", "Unschedulable")]


def test_pods_need_one_live_list_and_a_list_never_undoes_a_newer_watch_event() -> None:
    tick = Tick()
    c = Informer(clock=tick, refresh_seconds=60)
    c.pod_seen(_pod("dog-a1-0"))
    assert c.pods("u") is None  # not known complete
    token = c.list_token()
    c.pod_seen(_pod("dog-a1-0", "Running"))  # while the LIST was in flight
    c.pod_seen(_pod("dog-a1-1"), deleted=True)
    c.pods_listed("u", [_pod("dog-a1-0"), _pod("dog-a1-1"), _pod("dog-a1-2")], token)
    pods = c.pods("u") or []
    assert [(p["metadata"]["name"], p["status"]["phase"]) for p in pods] == [("dog-a1-0", "Running"),
                                                                              ("dog-a1-2", "Pending")]  # fmt: skip
    c.pod_seen(_pod("dog-a1-2"), deleted=True)
    assert [p["metadata"]["name"] for p in c.pods("u") or []] == ["dog-a1-0"]
    tick.t += 61
    assert c.pods("u") is None
    c.forget_job("ns", "dog", "u")
    c.mark_complete("u")
    assert c.pods("u") == []


def _stopped(name: str, step: int | None) -> dict[str, Any]:
    pod = _pod(name, "Failed")
    pod["spec"] = {
        "containers": [{"name": "trainer", "env": [{"name": f"V{i}", "value": "x" * 100} for i in range(50)]}]
    }
    message = (
        ""
        if step is None
        else f'{{"reason": "preempted", "step": {step}, "checkpointUri": "s3://r/checkpoint-{step}"}}'
    )
    pod["status"]["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {"exitCode": 75,
                                                                                       "message": message}}}]  # fmt: skip
    return pod


def test_deleted_pods_keep_their_termination_message_and_nothing_else() -> None:
    c = Informer(clock=Tick(), refresh_seconds=60)
    c.pod_seen(_stopped("dog-a1-0", 7), deleted=True)
    c.pod_seen(_stopped("dog-a1-1", None), deleted=True)  # no message: nothing to remember
    c.pod_seen(_pod("dog-a1-2", "Running"), deleted=True)
    c.mark_complete("u")
    assert c.pods("u") == []  # gone is gone for the plan's pod set
    (kept,) = c.gone_pods("u")
    assert kept["metadata"]["name"] == "dog-a1-0" and "spec" not in kept  # only what the plan reads
    assert '"step": 7' in kept["status"]["containerStatuses"][0]["state"]["terminated"]["message"]
    for i in range(GONE_PODS_PER_JOB + 5):
        c.pod_seen(_stopped(f"dog-a{i + 2}-0", i), deleted=True)
    gone = [p["metadata"]["name"] for p in c.gone_pods("u")]
    assert len(gone) == GONE_PODS_PER_JOB and gone[-1] == f"dog-a{GONE_PODS_PER_JOB + 6}-0"  # the newest kept
    c.forget_job("ns", "dog", "u")
    assert c.gone_pods("u") == []


# ----- the reconciler on the cache -----


class CachedEnv(Env):
    """The reconcile scenarios' apiserver, with a watch that delivers what it is told to."""

    def new_reconciler(self) -> Reconciler:
        self.cache = Informer(clock=lambda: self.clock.mono)
        reconciler = super().new_reconciler()
        reconciler.cache = self.cache
        return reconciler

    def watch(self) -> None:
        """Deliver the current state of the job and every pod, as watch events would."""
        for job in self.kube.jobs.values():
            self.cache.job_seen(copy.deepcopy(job))
        for pod in self.kube.pods.values():
            self.cache.pod_seen(copy.deepcopy(pod))


def test_new_job_creates_its_pods_without_a_list_and_running_costs_only_the_write() -> None:
    env = CachedEnv(resources={"nodes": 1})
    env.watch()
    st = env.reconcile()
    assert st["attempt"] == 1
    # The job is read live before its first attempt; its pods are not listed (none can exist yet). The one
    # other read: the runtimes, for a default one (once, before the job is accepted).
    calls = env.kube.calls
    assert calls[:2] == ["get_job", "list_runtimes"] and calls[5:] == ["patch_status", "create_event"]
    assert sorted(calls[2:5]) == ["create_ConfigMap", "create_Pod", "create_Service"]  # in parallel
    env.kube.calls.clear()
    env.watch()
    env.reconcile()
    assert env.kube.calls == []  # a pod event that changes nothing costs no request
    env.kube.run_all()
    env.watch()
    st = env.reconcile()
    assert st["phase"] == "Running" and env.kube.calls == ["patch_status", "create_event"]


def test_a_preemption_seen_in_a_stale_cache_is_confirmed_live_before_it_is_counted() -> None:
    env = CachedEnv(resources={"nodes": 1})
    env.watch()
    env.reconcile()
    env.kube.run_all()
    env.watch()
    env.reconcile()
    # The cache misses the pod (its ADDED event lost, say): the plan would count a preemption and start attempt 2.
    env.cache.pod_seen(env.kube.job_pods()[0], deleted=True)
    env.kube.calls.clear()
    st = env.reconcile()
    assert env.kube.calls == ["get_job", "list_pods"]  # re-read, and nothing else: the pod is there
    assert st["preemptions"] == 0 and st["attempt"] == 1 and env.kube.created_pods == ["dog-a1-0"]
    # Really gone: counted once, and the next attempt waits for nothing else.
    env.cache.pod_seen(env.kube.pods.pop(("ns", "dog-a1-0")), deleted=True)
    env.kube.calls.clear()
    st = env.reconcile()
    assert env.kube.calls[:2] == ["get_job", "list_pods"]
    assert st["preemptions"] == 1
    st = env.reconcile()
    assert st["preemptions"] == 1 and st["attempt"] == 2


def test_a_status_write_from_a_stale_job_is_refused_and_made_again_from_a_live_read() -> None:
    env = CachedEnv(resources={"nodes": 1})
    env.watch()
    env.reconcile()
    env.kube.run_all()
    env.watch()
    # A spec edit the watch has not delivered yet bumps the job's resourceVersion.
    env.kube.bump(env.kube.jobs[("ns", "dog")])
    env.kube.calls.clear()
    st = env.reconcile()
    assert env.kube.calls[:3] == ["patch_status", "get_job", "patch_status"]  # 409, re-read, write again
    assert st["phase"] == "Running"


def test_suspended_job_names_the_emergency_checkpoint_of_pods_already_gone() -> None:
    env = CachedEnv()
    env.watch()
    env.reconcile()
    env.kube.run_all()
    env.watch()
    env.reconcile()
    env.edit_spec(runPolicy={"suspend": True})
    env.watch()
    assert env.reconcile()["phase"] == "Suspended"
    # SIGTERM: each pod writes the emergency checkpoint, names it in its termination message, exits 75, and is
    # removed; the watch shows the terminated pod only in its DELETED event.
    stopped = {"reason": "preempted", "step": 7, "checkpointUri": "s3://runs/dog/checkpoint-7", "message": "saved"}
    for pod in env.kube.job_pods():
        env.kube.exit(pod, 75, stopped)
        env.cache.pod_seen(env.kube.pods.pop(("ns", pod["metadata"]["name"])), deleted=True)
    st = env.reconcile()
    assert env.cond("Suspended")["reason"] == S.R_SUSPENDED
    assert st["lastCheckpoint"]["step"] == 7 and st["lastCheckpoint"]["uri"] == "s3://runs/dog/checkpoint-7"
    assert "last checkpoint (step 7)" in env.cond("Suspended")["message"]
    env.edit_spec(runPolicy={"suspend": False})
    env.watch()
    st = env.reconcile()
    assert st["attempt"] == 2 and st["lastCheckpoint"]["step"] == 7  # an older attempt's message never moves it back
