"""DreamBoothRuntime: the merge rules (one table, as docs/runtime.md states them), the runtime's own checks,
and what a job does with its runtime: merged pods, the snapshot taken at acceptance, waiting for a missing one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from test_operator_reconcile import Env

from dreambooth_api.manifest import DEFAULT_IMAGE
from dreambooth_api.runtime import effective_of, merge_spec, pick_default
from dreambooth_cli import main
from dreambooth_operator import status as S
from dreambooth_operator.spec import SpecError, validate, validate_runtime
from dreambooth_operator.webhook import Limits, review

pytestmark = pytest.mark.unit
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

TOL_GPU = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
TOL_SPOT = {"key": "spot", "operator": "Exists", "effect": "NoSchedule"}

# (rule, runtime spec, job spec, effective spec): docs/runtime.md's table, row by row.
MERGE_TABLE: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = [
    ("job leaves a section out: the runtime's",
     {"storage": {"endpoint": "http://s3", "credentialsSecret": "s3"}}, {},
     {"storage": {"endpoint": "http://s3", "credentialsSecret": "s3"}}),
    ("scalars: the job wins, field by field",
     {"storage": {"endpoint": "http://s3", "region": "eu"}}, {"storage": {"endpoint": "http://mine"}},
     {"storage": {"endpoint": "http://mine", "region": "eu"}}),
    ("image: the job's",
     {"resources": {"image": "platform/trainer:1"}}, {"resources": {"image": "me/trainer:2", "nodes": 2}},
     {"resources": {"image": "me/trainer:2", "nodes": 2}}),
    ("a false/empty value the job writes is the job's",
     {"storage": {"pathStyle": True}, "podTemplate": {"schedulerName": "volcano"}},
     {"storage": {"pathStyle": False}, "podTemplate": {"schedulerName": ""}},
     {"storage": {"pathStyle": False}, "podTemplate": {"schedulerName": ""}}),
    ("labels, annotations, nodeSelector: maps merged per key, the job's value wins",
     {"podTemplate": {"labels": {"team": "ml", "cost": "a"}, "nodeSelector": {"pool": "gpu"}}},
     {"podTemplate": {"labels": {"cost": "b"}}},
     {"podTemplate": {"labels": {"team": "ml", "cost": "b"}, "nodeSelector": {"pool": "gpu"}}}),
    ("requests/limits: per resource",
     {"resources": {"requests": {"cpu": "8", "memory": "64Gi"}}}, {"resources": {"requests": {"cpu": "4"}}},
     {"resources": {"requests": {"cpu": "4", "memory": "64Gi"}}}),
    ("tolerations: merged by key and effect, the job's replaces in place, new ones appended",
     {"podTemplate": {"tolerations": [TOL_GPU, TOL_SPOT]}},
     {"podTemplate": {"tolerations": [{**TOL_GPU, "operator": "Equal", "value": "a100"},
                                      {"key": "x", "operator": "Exists", "effect": "NoExecute"}]}},
     {"podTemplate": {"tolerations": [{**TOL_GPU, "operator": "Equal", "value": "a100"}, TOL_SPOT,
                                      {"key": "x", "operator": "Exists", "effect": "NoExecute"}]}}),
    ("tolerations with the same key and another effect are two",
     {"podTemplate": {"tolerations": [TOL_GPU]}}, {"podTemplate": {"tolerations": [{**TOL_GPU, "effect": "NoExecute"}]}},
     {"podTemplate": {"tolerations": [TOL_GPU, {**TOL_GPU, "effect": "NoExecute"}]}}),
    ("env: by name",
     {"podTemplate": {"env": [{"name": "NCCL_DEBUG", "value": "WARN"}, {"name": "A", "value": "1"}]}},
     {"podTemplate": {"env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "B", "value": "2"}]}},
     {"podTemplate": {"env": [{"name": "NCCL_DEBUG", "value": "INFO"}, {"name": "A", "value": "1"},
                              {"name": "B", "value": "2"}]}}),
    ("volumes by name, volumeMounts by mountPath, imagePullSecrets by name",
     {"podTemplate": {"volumes": [{"name": "d", "emptyDir": {}}], "volumeMounts": [{"name": "d", "mountPath": "/d"}],
                      "imagePullSecrets": [{"name": "reg"}]}},
     {"podTemplate": {"volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "x"}}],
                      "imagePullSecrets": [{"name": "mine"}]}},
     {"podTemplate": {"volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "x"}}],
                      "volumeMounts": [{"name": "d", "mountPath": "/d"}],
                      "imagePullSecrets": [{"name": "reg"}, {"name": "mine"}]}}),
    ("command, args: whole lists, the job's",
     {"podTemplate": {"command": ["a", "b"]}}, {"podTemplate": {"command": ["c"]}},
     {"podTemplate": {"command": ["c"]}}),
    ("affinity: per kind (nodeAffinity, podAntiAffinity, ...), the job's kind whole",
     {"podTemplate": {"affinity": {"nodeAffinity": {"r": 1}, "podAntiAffinity": {"p": 1}}}},
     {"podTemplate": {"affinity": {"nodeAffinity": {"r": 2}}}},
     {"podTemplate": {"affinity": {"nodeAffinity": {"r": 2}, "podAntiAffinity": {"p": 1}}}}),
    ("runPolicy: field by field (queue from the platform, backoff from the job)",
     {"runPolicy": {"queueName": "team-a", "backoffLimit": 5}}, {"runPolicy": {"backoffLimit": 1}},
     {"runPolicy": {"queueName": "team-a", "backoffLimit": 1}}),
    ("hub.tokenSecretRef: whole",
     {"hub": {"tokenSecretRef": {"name": "hf", "key": "t"}}}, {"hub": {"tokenSecretRef": {"name": "mine"}}},
     {"hub": {"tokenSecretRef": {"name": "mine"}}}),
    ("training, method, runtimeRef: the job's alone",
     {}, {"method": "lora", "training": {"seed": 1}, "runtimeRef": {"name": "gpu"}},
     {"method": "lora", "training": {"seed": 1}, "runtimeRef": {"name": "gpu"}}),
    ("an ill-typed job value stays the job's, for validation to name",
     {"podTemplate": {"tolerations": [TOL_GPU]}}, {"podTemplate": {"tolerations": "gpu"}},
     {"podTemplate": {"tolerations": "gpu"}}),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "runtime", "job", "effective"), MERGE_TABLE, ids=[r[0] for r in MERGE_TABLE])
def test_merge_rules(rule: str, runtime: dict[str, Any], job: dict[str, Any], effective: dict[str, Any]) -> None:
    before = (yaml.safe_dump(runtime), yaml.safe_dump(job))
    assert merge_spec(runtime, job) == effective
    assert (yaml.safe_dump(runtime), yaml.safe_dump(job)) == before  # pure: neither input is changed


def test_the_default_runtime_is_the_annotated_one() -> None:
    def rt(name: str, default: str | None) -> dict[str, Any]:
        ann = {"dreambooth.dev/default-runtime": default} if default is not None else {}
        return {"metadata": {"name": name, "annotations": ann}}

    assert pick_default([rt("a", None), rt("b", "false")]) is None
    assert pick_default([rt("z", "true"), rt("a", None), rt("m", "true")])["metadata"]["name"] == "m"  # type: ignore[index]


def runtime_obj(spec: dict[str, Any], name: str = "gpu") -> dict[str, Any]:
    return {"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamBoothRuntime", "metadata": {"name": name},
            "spec": spec}  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [({"podTemplate": {"tolerationz": []}}, "spec.podTemplate.tolerationz", "did you mean spec.podTemplate.tolerations"),
     ({"resources": {"nodes": 4}}, "spec.resources.nodes", "the fields are image, gpusPerNode"),
     ({"podTemplate": {"env": [{"name": "AWS_ACCESS_KEY_ID", "value": "x"}]}}, "spec.podTemplate.env[0].name",
      "set by the operator"),
     ({"podTemplate": {"labels": {"dreambooth.dev/job-uid": "x"}}}, 'spec.podTemplate.labels["dreambooth.dev/job-uid"]',
      "remove it"),
     ({"podTemplate": {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}}, "spec.podTemplate.volumes[0].hostPath",
      "operator.podPowers.allow")],
)  # fmt: skip
def test_a_bad_runtime_is_refused_naming_the_field(spec: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        validate_runtime(runtime_obj(spec))
    assert err.value.field == field and words in err.value.message
    # The webhook refuses it at kubectl apply with the same words.
    request = {"operation": "CREATE", "kind": {"kind": "DreamBoothRuntime"}, "object": runtime_obj(spec)}
    assert (review(request, Limits()) or "").startswith(f"{field}: ")


def test_a_valid_runtime_is_admitted_and_an_unchanged_update_is_not_judged() -> None:
    ok = runtime_obj({"podTemplate": {"tolerations": [TOL_GPU]}, "runPolicy": {"queueName": "q"}})
    assert review({"operation": "CREATE", "kind": {"kind": "DreamBoothRuntime"}, "object": ok}, Limits()) is None
    bad = runtime_obj({"podTemplate": {"tolerationz": []}})
    relabel = {"operation": "UPDATE", "kind": {"kind": "DreamBoothRuntime"}, "object": bad, "oldObject": bad}
    assert review(relabel, Limits()) is None


def test_validate_lays_the_job_over_its_base_and_the_builtin_defaults_last() -> None:
    env = Env()
    body = env.kube.jobs[("ns", "dog")]
    del body["spec"]["resources"]["image"]
    job = validate(body, base={"podTemplate": {"tolerations": [TOL_GPU]}, "runPolicy": {"queueName": "q"}})
    assert job.spec.resources.image == DEFAULT_IMAGE
    assert job.spec.pod_template.tolerations == [TOL_GPU] and job.spec.run_policy.queue_name == "q"
    assert job.snapshot["resources"]["image"] == DEFAULT_IMAGE and "training" not in job.snapshot


# ----- a job and its runtime through the reconciler -----

PLATFORM = {
    "resources": {"image": "platform/trainer:1", "requests": {"cpu": "2"}},
    "storage": {"endpoint": "http://s3.platform", "credentialsSecret": "platform-s3"},
    "podTemplate": {"tolerations": [TOL_GPU], "nodeSelector": {"pool": "gpu"}, "labels": {"team": "ml"},
                    "schedulerName": "volcano", "env": [{"name": "NCCL_DEBUG", "value": "WARN"}]},
    "runPolicy": {"queueName": "team-a"},
}  # fmt: skip


def runtime_env(runtime: dict[str, Any] | None, **job: Any) -> Env:
    env = Env(**job)
    spec = env.kube.jobs[("ns", "dog")]["spec"]
    del spec["resources"]["image"]
    spec["runtimeRef"] = {"name": "gpu"}
    if runtime is not None:
        env.kube.runtimes["gpu"] = runtime_obj(runtime)
    return env


def pod0(env: Env) -> dict[str, Any]:
    return next(p for (_, name), p in sorted(env.kube.pods.items()) if name.endswith("-0"))


def test_the_runtime_fills_what_the_job_leaves_out_on_its_pods() -> None:
    env = runtime_env(
        PLATFORM, podTemplate={"labels": {"team": "vision"}, "env": [{"name": "NCCL_DEBUG", "value": "INFO"}]}
    )
    st = env.reconcile()
    assert st["runtime"] == "gpu" and st["attempt"] == 1
    pod = pod0(env)
    spec, c = pod["spec"], pod["spec"]["containers"][0]
    assert c["image"] == "platform/trainer:1" and c["resources"]["requests"]["cpu"] == "2"
    assert TOL_GPU in spec["tolerations"] and spec["nodeSelector"] == {"pool": "gpu"}
    assert spec["schedulerName"] == "volcano"
    assert pod["metadata"]["labels"]["team"] == "vision"  # the job wins
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    env_vars = {e["name"]: e for e in c["env"]}
    assert env_vars["NCCL_DEBUG"]["value"] == "INFO" and env_vars["AWS_ENDPOINT_URL"]["value"] == "http://s3.platform"
    assert env_vars["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "platform-s3"
    assert st["effectiveSpec"]["resources"]["image"] == "platform/trainer:1" and len(st["effectiveSpecHash"]) == 16


def test_a_runtime_edit_never_reaches_an_accepted_job() -> None:
    env = runtime_env(PLATFORM)
    st = env.reconcile()
    snapshot, digest = st["effectiveSpec"], st["effectiveSpecHash"]
    env.kube.runtimes["gpu"] = runtime_obj({**PLATFORM, "resources": {"image": "platform/trainer:2"},
                                            "storage": {"endpoint": "http://elsewhere"}})  # fmt: skip
    # The next attempt (after a preemption) too: the snapshot, not the runtime.
    env.kube.pods.pop(("ns", pod0(env)["metadata"]["name"]))
    for _ in range(3):
        env.clock.advance(15)
        st = env.reconcile()
    assert st["attempt"] == 2 and st["effectiveSpec"] == snapshot and st["effectiveSpecHash"] == digest
    assert {p["spec"]["containers"][0]["image"] for p in env.kube.pods.values()} == {"platform/trainer:1"}
    assert env.kube.calls.count("get_runtime") == 1  # read once, at acceptance


def test_the_jobs_own_later_edits_still_apply_over_the_snapshot() -> None:
    env = runtime_env(PLATFORM)
    env.reconcile()
    job = env.kube.jobs[("ns", "dog")]
    job["spec"]["runPolicy"] = {**job["spec"]["runPolicy"], "suspend": True}
    env.kube.bump(job)
    env.clock.advance(1)
    st = env.reconcile()
    assert env.cond(S.SUSPENDED)["status"] == "True", st


def test_a_missing_runtime_waits_naming_it_then_the_job_starts() -> None:
    env = runtime_env(None)
    st = env.reconcile()
    cond = env.cond(S.WAITING)
    assert cond["status"] == "True" and cond["reason"] == "RuntimeNotFound" and "'gpu'" in cond["message"]
    assert st["phase"] == "WaitingForResources" and "effectiveSpec" not in st and not env.kube.pods
    assert any(e["reason"] == "RuntimeNotFound" for e in env.kube.events)
    env.kube.runtimes["gpu"] = runtime_obj(PLATFORM)
    env.clock.advance(5)
    st = env.reconcile()
    assert st["attempt"] == 1 and st["runtime"] == "gpu" and env.cond(S.WAITING)["status"] == "False"
    assert pod0(env)["spec"]["containers"][0]["image"] == "platform/trainer:1"


def test_the_default_runtime_applies_to_jobs_without_a_ref_and_old_jobs_keep_theirs() -> None:
    env = Env()
    spec = env.kube.jobs[("ns", "dog")]["spec"]
    del spec["resources"]["image"]
    env.kube.runtimes["platform"] = {**runtime_obj(PLATFORM, "platform"),
                                     "metadata": {"name": "platform",
                                                  "annotations": {"dreambooth.dev/default-runtime": "true"}}}  # fmt: skip
    st = env.reconcile()
    assert st["runtime"] == "platform" and pod0(env)["spec"]["containers"][0]["image"] == "platform/trainer:1"

    # A job an operator before runtimes accepted (trainingHash, no snapshot) never picks a runtime up mid-run.
    old = Env()
    old.reconcile()
    job = old.kube.jobs[("ns", "dog")]
    for key in ("effectiveSpec", "effectiveSpecHash", "runtime"):
        job["status"].pop(key, None)
    old.kube.runtimes["platform"] = env.kube.runtimes["platform"]
    old.clock.advance(1)
    st = old.reconcile()
    assert "runtime" not in st and st["effectiveSpec"]["resources"]["image"] == "trainer:test"


# ----- dreambooth validate --runtime / --print-config -----


def test_validate_over_a_runtime_prints_the_effective_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rt = tmp_path / "runtime.yaml"
    rt.write_text(yaml.safe_dump(runtime_obj(PLATFORM)))
    job = yaml.safe_load((EXAMPLES / "dog-lora.yaml").read_text())
    job["spec"].get("resources", {}).pop("image", None)
    job["spec"]["runtimeRef"] = {"name": "gpu"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["validate", "--runtime", str(rt), "--print-config", str(path)]) == 0
    out = capsys.readouterr()
    effective = yaml.safe_load(out.out)["spec"]
    assert effective["resources"]["image"] == "platform/trainer:1"
    assert effective["runPolicy"]["queueName"] == "team-a" and TOL_GPU in effective["podTemplate"]["tolerations"]
    assert "job.yaml: valid" in out.err
    # The runtime file itself is checked, and a job naming another runtime is told which file to pass.
    assert main(["validate", str(rt)]) == 0
    job["spec"]["runtimeRef"] = {"name": "cpu"}
    path.write_text(yaml.safe_dump(job))
    assert main(["validate", "--runtime", str(rt), str(path)]) == 64
    assert "spec.runtimeRef.name: names DreamBoothRuntime 'cpu'" in capsys.readouterr().err
    rt.write_text(yaml.safe_dump(runtime_obj({"podTemplate": {"tolerationz": []}})))
    assert main(["validate", "--runtime", str(rt), str(path)]) == 64
    assert "spec.podTemplate.tolerationz" in capsys.readouterr().err


def test_readers_of_a_stored_job_see_its_runtimes_values() -> None:
    """`dreambooth get` shows the queue a job got from its runtime (status.effectiveSpec), not an empty cell."""
    from dreambooth_cli.render import job_row

    job = {"metadata": {"name": "dog"}, "spec": {"training": {}, "runPolicy": {"backoffLimit": 1}},
           "status": {"phase": "Running", "effectiveSpec": {"runPolicy": {"queueName": "team-a", "backoffLimit": 3}}}}  # fmt: skip
    assert effective_of(job)["runPolicy"] == {"queueName": "team-a", "backoffLimit": 1}
    assert "team-a" in job_row(job)
    assert effective_of({"spec": {"runPolicy": {"queueName": "q"}}}) == {"runPolicy": {"queueName": "q"}}
