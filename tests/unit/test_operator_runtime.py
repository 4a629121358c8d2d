"""Operator plumbing: status helpers, settings from env, the work queue, metrics/healthz, kopf wiring."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
import pytest
from aiohttp.test_utils import make_mocked_request

from dreambooth_operator import handlers, rendezvous
from dreambooth_operator import status as S
from dreambooth_operator.__main__ import Settings, parse_args
from dreambooth_operator.controller import POD_EVENT_COALESCE_SECONDS, Controller, WorkQueue
from dreambooth_operator.metrics import Heartbeat, Metrics, make_app
from dreambooth_operator.reconciler import Result

pytestmark = pytest.mark.unit
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def test_conditions_transitions_and_phase() -> None:
    st = S.JobStatus()
    assert S.derive_phase(st) == "Pending"
    assert S.set_condition(st, S.RUNNING, False, "x", "m", NOW) is False and st.conditions == []
    assert S.set_condition(st, S.CREATED, True, S.R_GANG_CREATED, "created", NOW) is True
    assert S.derive_phase(st) == "Created"
    assert S.set_condition(st, S.RUNNING, True, "r", "running", NOW) is True
    assert S.set_condition(st, S.RUNNING, True, "r", "step 5", NOW + timedelta(seconds=5)) is False
    cond = S.get_condition(st, S.RUNNING)
    assert cond is not None and cond.message == "step 5" and cond.last_transition_time == S.timestamp(NOW)
    assert S.derive_phase(st) == "Running"
    S.set_condition(st, S.PREEMPTED, True, "p", "p", NOW)
    assert S.derive_phase(st) == "Preempted"
    S.set_condition(st, S.WAITING, True, "w", "w", NOW)
    assert S.derive_phase(st) == "WaitingForResources"
    S.set_condition(st, S.SUSPENDED, True, "s", "s", NOW)
    assert S.derive_phase(st) == "Suspended"
    S.set_condition(st, S.SUCCEEDED, True, "s", "s", NOW)
    assert S.derive_phase(st) == "Succeeded" and S.is_finished(st)
    S.set_condition(st, S.FAILED, True, "f", "f", NOW)
    assert S.derive_phase(st) == "Failed"


def test_status_patch_has_only_changes() -> None:
    old = {"phase": "Running", "step": 3, "loss": 0.5, "eta": "1m"}
    new = {"phase": "Running", "step": 4, "loss": 0.5}
    assert S.status_patch(old, new) == {"step": 4, "eta": None}
    assert S.status_patch(new, dict(new)) == {}


def test_format_duration() -> None:
    assert [S.format_duration(s) for s in (None, -1, 5, 65, 3700)] == [None, None, "5s", "1m05s", "1h01m"]


def test_torchrun_env() -> None:
    env = {e["name"]: e["value"] for e in rendezvous.rendezvous_env(
        nodes=2, gpus_per_node=0, node_rank=1, hostname0="j-0", service="j", namespace="ns",
        scheduling_timeout_seconds=1800)}  # fmt: skip
    assert env["PET_NPROC_PER_NODE"] == "1" and env["PET_NODE_RANK"] == "1" and env["PET_NNODES"] == "2"
    assert env["PET_MASTER_ADDR"] == "j-0.j.ns.svc.cluster.local" and env["PET_MASTER_PORT"] == "29500"
    assert int(env["DREAMBOOTH_RDZV_TIMEOUT_SECONDS"]) >= 1800


def test_settings_from_env_and_flags() -> None:
    env = {"DREAMBOOTH_OPERATOR_NAMESPACES": "a, b,", "LOG_LEVEL": "debug", "METRICS_PORT": "9100"}
    s = Settings.from_env(env)
    assert s.namespaces == ("a", "b") and s.log_level == "DEBUG" and s.metrics_port == 9100
    assert Settings.from_env({}).namespaces == ()
    s = parse_args(["-n", "x", "--metrics-port", "9200"], env)
    assert s.namespaces == ("x",) and s.metrics_port == 9200 and s.log_level == "DEBUG"
    assert Settings.from_env({}).allowed_powers == frozenset()
    allowed = parse_args([], {"DREAMBOOTH_POD_POWERS": "hostPath,hostIPC"}).allowed_powers
    assert allowed == {"hostPath", "hostIPC"}


def test_every_setting_the_chart_passes_by_environment_reaches_the_operator() -> None:
    """Each env var of the chart's Deployment (templates/deployment.yaml) survives `dreambooth operator`'s flag
    parsing: a setting dropped there is a chart value that silently does nothing."""
    env = {
        "DREAMBOOTH_OPERATOR_NAMESPACES": "a", "LOG_LEVEL": "debug", "METRICS_PORT": "9100",
        "DREAMBOOTH_OPERATOR_WORKERS": "3", "DREAMBOOTH_OPERATOR_RESYNC_SECONDS": "4",
        "DREAMBOOTH_BACKOFF_BASE_SECONDS": "5", "DREAMBOOTH_CLUSTER_DOMAIN": "c.local", "DREAMBOOTH_MAX_NODES": "7",
        "DREAMBOOTH_IMAGE_PULL_TIMEOUT_SECONDS": "8", "DREAMBOOTH_POD_POWERS": "hostIPC", "LOG_FORMAT": "json",
        "DREAMBOOTH_WEBHOOK_CERT_DIR": "/certs", "DREAMBOOTH_WEBHOOK_PORT": "9444",
        "DREAMBOOTH_DEFAULT_TRAINER_IMAGE": "registry.example/trainer:1",
    }  # fmt: skip
    from_env = Settings.from_env(env)
    assert from_env.default_image == "registry.example/trainer:1" and from_env.webhook_port == 9444
    assert parse_args([], env) == from_env


def test_work_queue_dedupes_and_reprocesses_dirty_keys() -> None:
    async def scenario() -> list[Any]:
        q = WorkQueue()
        seen = []
        q.add("a")
        q.add("a")
        q.add("b")
        assert len(q) == 2
        key = await q.get()
        seen.append(key)
        q.add("a")  # while "a" is processed: remembered, not handed to another worker
        assert len(q) == 1
        seen.append(await q.get())
        q.done("b")
        q.done("a")
        seen.append(await q.get())
        q.schedule("c", 0.01)
        q.schedule("c", 0.02)  # replaces the first timer
        assert q.scheduled("c")
        q.done("a")
        seen.append(await asyncio.wait_for(q.get(), 1))
        q.done("c")
        await asyncio.sleep(0.05)
        assert len(q) == 0
        return seen

    assert asyncio.run(scenario()) == ["a", "b", "a", "c"]


def test_work_queue_urgent_lane_and_coalescing() -> None:
    async def scenario() -> list[Any]:
        q = WorkQueue()
        q.add("old-1")
        q.add("old-2")
        q.add("new", urgent=True)
        q.add("old-2", urgent=True)  # promoted
        order = [await q.get() for _ in range(3)]
        for key in order:
            q.done(key)
        q.add_soon("burst", 0.05)
        q.add_soon("burst", 0.5)  # a later request does not postpone the pending one
        got = await asyncio.wait_for(q.get(), 0.3)
        q.done(got)
        return [*order, got]

    assert asyncio.run(scenario()) == ["new", "old-2", "old-1", "burst"]


class StubReconciler:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.forgotten: list[str] = []

    def reconcile(self, namespace: str, name: str) -> Result | None:
        self.calls.append((namespace, name))
        return Result("Running", None)

    def forget(self, uid: str) -> None:
        self.forgotten.append(uid)


def test_controller_reconciles_on_events_and_counts_phases() -> None:
    async def scenario() -> tuple[StubReconciler, Metrics]:
        rec = StubReconciler()
        metrics = Metrics()
        c = Controller(rec, metrics, workers=2, resync_seconds=60)  # type: ignore[arg-type]
        c.job_event("ns", "a", "uid-a", deleted=False)
        await c.start()
        c.pod_event("ns", [{"kind": "DreamBoothJob", "name": "b", "controller": True}, {"kind": "Other", "name": "z"}])
        await asyncio.sleep(0.2 + POD_EVENT_COALESCE_SECONDS)
        c.job_event("ns", "a", "uid-a", deleted=True)
        await c.stop()
        return rec, metrics

    rec, metrics = asyncio.run(scenario())
    assert sorted(set(rec.calls)) == [("ns", "a"), ("ns", "b")]
    assert rec.forgotten == ["uid-a"]
    assert 'dreambooth_operator_jobs{phase="Running"} 1.0' in metrics.render().decode()


def test_healthz_and_metrics_endpoints() -> None:
    metrics = Metrics()
    beat = Heartbeat(max_silence=10)
    app = make_app(metrics, beat.check)

    async def call(path: str) -> Any:
        route = next(r for r in app.router.routes() if r.resource is not None and r.resource.canonical == path)
        return await route.handler(make_mocked_request("GET", path))

    ok = asyncio.run(call("/healthz"))
    assert ok.status == 200
    beat.last -= 60
    assert asyncio.run(call("/healthz")).status == 503
    resp = asyncio.run(call("/metrics"))
    assert b"dreambooth_operator_reconcile_seconds" in resp.body


def test_kopf_wiring_adds_no_finalizer_and_no_change_handlers() -> None:
    registry = kopf.OperatorRegistry()
    handlers.register(registry, Controller(StubReconciler(), Metrics()))  # type: ignore[arg-type]
    # No change-detecting handlers (they write kopf's progress/diff-base), no daemons/timers (finalizers).
    assert registry._changing.get_all_handlers() == []
    assert registry._spawning.get_all_handlers() == []
    assert len(registry._watching.get_all_handlers()) == 2
    settings = kopf.OperatorSettings()
    handlers.configure(settings)
    assert settings.posting.enabled is False and settings.peering.standalone is True


def test_controller_skips_the_echo_of_its_own_status_write() -> None:
    class Rec(StubReconciler):
        def reconcile(self, namespace: str, name: str) -> Result | None:
            self.calls.append((namespace, name))
            return Result("Running", None, resource_version="5")

    async def scenario() -> list[tuple[str, str]]:
        rec = Rec()
        c = Controller(rec, Metrics(), workers=1, resync_seconds=60)  # type: ignore[arg-type]
        await c.start()
        c.job_event("ns", "a", "uid-a", deleted=False, resource_version="4")
        await asyncio.sleep(0.1)
        c.job_event("ns", "a", "uid-a", deleted=False, resource_version="5")  # our own write coming back
        await asyncio.sleep(0.1)
        c.job_event("ns", "a", "uid-a", deleted=False, resource_version="6")  # someone else's change
        await asyncio.sleep(0.1)
        await c.stop()
        return rec.calls

    assert asyncio.run(scenario()) == [("ns", "a"), ("ns", "a")]


def test_kopf_handlers_route_events_to_the_controller() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.jobs: list[tuple[Any, ...]] = []
            self.pods: list[tuple[Any, ...]] = []

        def job_event(self, *args: Any, **kwargs: Any) -> None:
            self.jobs.append((*args, kwargs))

        def pod_event(self, *args: Any, **kwargs: Any) -> None:
            self.pods.append((*args, kwargs))

    rec = Recorder()
    registry = kopf.OperatorRegistry()
    handlers.register(registry, rec)  # type: ignore[arg-type]
    by_id = {h.id: h.fn for h in registry._watching.get_all_handlers()}
    job = kopf.Body({"metadata": {"name": "j", "namespace": "ns", "uid": "u", "resourceVersion": "7"}})
    pod = kopf.Body({"metadata": {"name": "j-a1-0", "namespace": "ns",
                                  "ownerReferences": [{"kind": "DreamBoothJob", "name": "j", "controller": True}]}})  # fmt: skip
    job_fn = next(fn for i, fn in by_id.items() if "job_event" in i)
    pod_fn = next(fn for i, fn in by_id.items() if "pod_event" in i)
    asyncio.run(job_fn(event={"type": "DELETED", "object": {"j": 1}}, meta=job.metadata))
    asyncio.run(job_fn(event={"type": None, "object": {"j": 2}}, meta=job.metadata))
    asyncio.run(pod_fn(event={"type": "MODIFIED", "object": {"p": 1}}, meta=pod.metadata))
    asyncio.run(pod_fn(event={"type": "DELETED", "object": {"p": 2}}, meta=pod.metadata))
    # The raw objects go along: they feed the controller's cache.
    assert rec.jobs == [("ns", "j", "u", {"deleted": True, "resource_version": "7", "body": {"j": 1}}),
                        ("ns", "j", "u", {"deleted": False, "resource_version": "7", "body": {"j": 2}})]  # fmt: skip
    owners = [{"kind": "DreamBoothJob", "name": "j", "controller": True}]
    assert rec.pods == [("ns", owners, {"body": {"p": 1}, "deleted": False}),
                        ("ns", owners, {"body": {"p": 2}, "deleted": True})]  # fmt: skip


def test_log_format_is_text_or_json_and_says_the_fix() -> None:
    from dreambooth_api.contract import BadInputError

    assert Settings.from_env({}).log_format == "text"
    assert Settings.from_env({"LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(BadInputError, match="LOG_FORMAT='xml'.*text or json"):
        Settings.from_env({"LOG_FORMAT": "xml"})
