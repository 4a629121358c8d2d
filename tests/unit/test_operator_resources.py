"""Pure builders: golden YAML per case, plus the rules only a builder can check (env/volume collisions, GPUs).

Regenerate the golden files after an intended change with: UPDATE_GOLDEN=1 pytest tests/unit/test_operator_resources.py
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from dreambooth_operator import powers, rendezvous, resources
from dreambooth_operator.resources import build_configmap, build_gang, build_pod, build_service, names_for
from dreambooth_operator.spec import SpecError, ValidJob, validate

pytestmark = pytest.mark.unit
GOLDEN = Path(__file__).parent / "golden" / "operator"
UID = "0b6b3c5e-1f2a-4c1e-9a55-5f1e3d2c1b00"


def job_body(spec: dict[str, Any] | None = None, name: str = "sks-dog", namespace: str = "team") -> dict[str, Any]:
    base: dict[str, Any] = {
        "method": "lora",
        "training": {
            "pretrainedModelNameOrPath": "s3://models/tiny-sd/",
            "instanceDataDir": "s3://data/dog/",
            "instancePrompt": "a photo of sks dog",
            "outputDir": "s3://runs/sks-dog/",
            "maxTrainSteps": 8,
            "checkpointingSteps": 4,
            "resolution": 64,
            "trainBatchSize": 1,
            "seed": 0,
        },
    }
    for key, value in (spec or {}).items():
        base[key] = value
    return {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": name, "namespace": namespace, "uid": UID, "generation": 1},
        "spec": base,
    }


def valid(spec: dict[str, Any] | None = None, **kw: Any) -> ValidJob:
    return validate(job_body(spec, **kw))


CASES: dict[str, tuple[dict[str, Any], int, bool]] = {
    # name: (spec overrides, attempt, memory savers)
    "cpu-1x1": (
        {
            "storage": {"endpoint": "http://127.0.0.1:8333", "pathStyle": True},
            "resources": {"nodes": 1, "gpusPerNode": 0, "image": "trainer:test",
                          "requests": {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "1Gi"}},
            "runPolicy": {"terminationGracePeriodSeconds": 30, "schedulingTimeoutSeconds": 120},
        },
        1, False,
    ),
    "gpu-2x8-credentials": (
        {
            "method": "full",
            "training": {**job_body()["spec"]["training"], "outputDir": "s3://runs/full/", "mixedPrecision": "bf16"},
            "storage": {"region": "eu-west-1", "credentialsSecret": "s3-creds"},
            "resources": {"nodes": 2, "gpusPerNode": 8, "image": "ghcr.io/x/trainer:1",
                          "requests": {"cpu": 64, "memory": "900Gi"}, "limits": {"memory": "1000Gi"}},
        },
        2, False,
    ),
    "gpu-2x8-irsa": (
        {"resources": {"nodes": 2, "gpusPerNode": 8, "requests": {"cpu": "32"}},
         "podTemplate": {"serviceAccountName": "dreambooth-irsa"}},
        1, False,
    ),
    "pod-template-overrides": (
        {
            "resources": {"nodes": 1, "gpusPerNode": 1},
            "podTemplate": {
                "nodeSelector": {"cloud.google.com/gke-spot": "true"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}]}}},
                "priorityClassName": "spot-batch",
                "imagePullSecrets": [{"name": "regcred"}],
                "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                        {"name": "NCCL_DEBUG", "value": "INFO"}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "dog-data"}}],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                "command": ["sh", "-c"],
                "args": ["sleep 5"],
            },
        },
        1, False,
    ),
    "pod-metadata": (
        {
            "resources": {"nodes": 2, "gpusPerNode": 1},
            "runPolicy": {"queueName": "team-a"},
            "podTemplate": {
                "labels": {"kueue.x-k8s.io/priority-class": "high", "team.example.com/cost-center": "ml-42",
                           "azure.workload.identity/use": "true"},
                "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
                                "team.example.com/owner": "Ada Lovelace <ada@example.com>"},
            },
        },
        1, False,
    ),
    "pod-scheduling": (
        {
            "resources": {"nodes": 2, "gpusPerNode": 8},
            "podTemplate": {
                "schedulerName": "volcano",
                "runtimeClassName": "nvidia",
                "topologySpreadConstraints": [
                    {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule",
                     "labelSelector": {"matchLabels": {"dreambooth.dev/job-name": "sks-dog"}}}],
            },
        },
        1, False,
    ),
    "kueue-queue-memory-savers": (
        {"resources": {"nodes": 2, "gpusPerNode": 4}, "runPolicy": {"queueName": "team-a"}},
        3, True,
    ),
}  # fmt: skip


# A platform's DreamBoothRuntime under a job (docs/runtime.md): what the pods get from each.
RUNTIME = {
    "storage": {
        "endpoint": "https://s3.platform.example",
        "region": "eu-west-1",
        "pathStyle": True,
        "credentialsSecret": "platform-s3",
    },
    "resources": {
        "image": "registry.platform.example/trainer:0.2.0",
        "gpusPerNode": 8,
        "requests": {"cpu": "32", "memory": "400Gi"},
    },
    "podTemplate": {
        "labels": {"team.example.com/cost-center": "platform", "kueue.x-k8s.io/priority-class": "batch"},
        "nodeSelector": {"node.kubernetes.io/instance-type": "p4d.24xlarge"},
        "tolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "spot", "operator": "Exists", "effect": "NoSchedule"},
        ],
        "schedulerName": "volcano",
        "env": [{"name": "NCCL_DEBUG", "value": "WARN"}, {"name": "NCCL_IB_DISABLE", "value": "1"}],
    },
    "runPolicy": {"queueName": "platform-gpu", "maxPreemptions": 50},
}
RUNTIME_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (runtime spec, job spec overrides)
    "runtime-merged": (
        RUNTIME,
        {
            "resources": {"nodes": 2, "requests": {"cpu": "16"}},
            "podTemplate": {
                "labels": {"team.example.com/cost-center": "vision"},
                "tolerations": [{"key": "spot", "operator": "Equal", "value": "yes", "effect": "NoSchedule"}],
                "env": [{"name": "NCCL_DEBUG", "value": "INFO"}],
            },
        },
    ),
    "runtime-only": (RUNTIME, {"resources": {"nodes": 1}}),
}


def render(case: str) -> str:
    if case in RUNTIME_CASES:
        runtime, spec = RUNTIME_CASES[case]
        job = validate(job_body(spec), base=runtime)
        return yaml.safe_dump_all([*build_gang(job, 1, False)], sort_keys=False, width=120)
    spec, attempt, savers = CASES[case]
    job = valid(spec)
    objs = [build_configmap(job), build_service(job), *build_gang(job, attempt, savers)]
    return yaml.safe_dump_all(objs, sort_keys=False, width=120)


@pytest.mark.parametrize("case", sorted([*CASES, *RUNTIME_CASES]))
def test_golden(case: str) -> None:
    path = GOLDEN / f"{case}.yaml"
    text = render(case)
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}: run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{case}: builder output changed; review and regenerate with UPDATE_GOLDEN=1"


def _env(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod["spec"]["containers"][0]["env"]}


def test_pod_plumbing_cpu() -> None:
    job = valid(CASES["cpu-1x1"][0])
    pod = build_pod(job, 1, 0)
    spec = pod["spec"]
    c = spec["containers"][0]
    env = _env(pod)
    assert c["command"] == ["python", "-m", "dreambooth_trainer.launch"]
    assert c["args"] == ["--config", "/etc/dreambooth/config.json"]
    assert spec["hostname"] == "sks-dog-0" and spec["subdomain"] == "sks-dog"
    assert spec["restartPolicy"] == "Never"
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert env["PET_NPROC_PER_NODE"] == "1" and env["PET_NNODES"] == "1" and env["PET_NODE_RANK"] == "0"
    assert env["PET_MASTER_ADDR"] == "sks-dog-0.sks-dog.team.svc.cluster.local"
    assert env["PET_MASTER_PORT"] == str(rendezvous.MASTER_PORT)
    assert int(env["DREAMBOOTH_RDZV_TIMEOUT_SECONDS"]) >= 120
    assert env["DREAMBOOTH_JOB_UID"] == UID and env["DREAMBOOTH_ATTEMPT"] == "1"
    assert env["DREAMBOOTH_GRACE_SECONDS"] == "30" and spec["terminationGracePeriodSeconds"] == 30
    assert "DREAMBOOTH_MEMORY_SAVERS" not in env
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["TERMINATION_MESSAGE_PATH"] == "/dev/termination-log" and env["PROGRESS_PORT"] == "8080"
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:8333" and env["DREAMBOOTH_S3_ADDRESSING_STYLE"] == "path"
    assert "AWS_ACCESS_KEY_ID" not in env
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["DREAMBOOTH_SCRATCH"] == "/scratch" and env["HF_HOME"].startswith("/cache/")
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory"}
    assert vols["config"]["configMap"]["name"] == "sks-dog-config"
    assert c["resources"]["requests"]["ephemeral-storage"] == "1Gi"
    tol = {t["key"]: t for t in spec["tolerations"]}
    assert tol["node.kubernetes.io/not-ready"]["tolerationSeconds"] == 30
    assert tol["node.kubernetes.io/unreachable"]["tolerationSeconds"] == 30
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"] == {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}  # fmt: skip
    ref = pod["metadata"]["ownerReferences"][0]
    assert ref["uid"] == UID and ref["controller"] is True and ref["kind"] == "DreamBoothJob"


def test_pod_plumbing_gpu_and_credentials() -> None:
    job = valid(CASES["gpu-2x8-credentials"][0])
    pods = build_gang(job, 2)
    assert [p["metadata"]["name"] for p in pods] == ["sks-dog-a2-0", "sks-dog-a2-1"]
    env1 = _env(pods[1])
    assert env1["PET_NODE_RANK"] == "1" and env1["PET_NPROC_PER_NODE"] == "8" and env1["PET_NNODES"] == "2"
    assert env1["PET_MASTER_ADDR"] == "sks-dog-0.sks-dog.team.svc.cluster.local"
    assert env1["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}
    assert env1["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env1["OMP_NUM_THREADS"] == "8"  # 64 CPUs over 8 workers
    res = pods[1]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "8"
    assert res["requests"]["ephemeral-storage"] == resources.DEFAULT_EPHEMERAL_STORAGE["full"]


def test_service_and_configmap() -> None:
    job = valid()
    svc = build_service(job)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {resources.LABEL_JOB_UID: UID}
    cm = build_configmap(job)
    import json

    config = json.loads(cm["data"]["config.json"])
    assert config["method"] == "lora"
    assert config["training"]["maxTrainSteps"] == 8 and config["training"]["instancePrompt"] == "a photo of sks dog"


def test_overrides_replace_command_and_keep_user_settings() -> None:
    job = valid(CASES["pod-template-overrides"][0])
    pod = build_pod(job, 1, 0)
    spec, c = pod["spec"], pod["spec"]["containers"][0]
    assert c["command"] == ["sh", "-c"] and c["args"] == ["sleep 5"]
    assert spec["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    assert spec["priorityClassName"] == "spot-batch" and spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec["tolerations"])
    assert any(m["mountPath"] == "/data" for m in c["volumeMounts"])
    assert _env(pod)["NCCL_DEBUG"] == "INFO"
    # A command override without args gets no args of ours.
    only_cmd = copy.deepcopy(CASES["pod-template-overrides"][0])
    del only_cmd["podTemplate"]["args"]
    assert "args" not in build_pod(valid(only_cmd), 1, 0)["spec"]["containers"][0]


def test_kueue_labels_new_group_per_attempt() -> None:
    job = valid(CASES["kueue-queue-memory-savers"][0])
    a3, a4 = build_pod(job, 3, 1, True), build_pod(job, 4, 1)
    assert a3["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert a3["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == "sks-dog-a3"
    assert a4["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == "sks-dog-a4"
    assert a3["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "2"
    assert a3["metadata"]["annotations"]["kueue.x-k8s.io/retriable-in-group"] == "false"
    assert _env(a3)["DREAMBOOTH_MEMORY_SAVERS"] == "1" and "DREAMBOOTH_MEMORY_SAVERS" not in _env(a4)
    assert "kueue.x-k8s.io/queue-name" not in build_pod(valid(), 1, 0)["metadata"]["labels"]


def test_pod_metadata_and_scheduling_reach_every_pod() -> None:
    meta_job, sched_job = valid(CASES["pod-metadata"][0]), valid(CASES["pod-scheduling"][0])
    for pod in build_gang(meta_job, 1):
        assert pod["metadata"]["labels"]["team.example.com/cost-center"] == "ml-42"
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"
        # Ours sit beside theirs.
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert pod["metadata"]["annotations"]["team.example.com/owner"] == "Ada Lovelace <ada@example.com>"
        assert "dreambooth.dev/config-hash" in pod["metadata"]["annotations"]
    for pod in build_gang(sched_job, 1):
        spec = pod["spec"]
        assert spec["schedulerName"] == "volcano" and spec["runtimeClassName"] == "nvidia"
        assert spec["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    plain = build_pod(valid(), 1, 0)["spec"]
    assert not {"schedulerName", "runtimeClassName", "topologySpreadConstraints"} & set(plain)


@pytest.mark.parametrize(
    ("section", "key", "owner"),
    [("labels", "dreambooth.dev/job-uid", "dreambooth.dev/*"), ("labels", "dreambooth.dev/anything", "dreambooth.dev/*"),
     ("labels", "app.kubernetes.io/managed-by", "the operator"),
     ("labels", "kueue.x-k8s.io/queue-name", "spec.runPolicy.queueName"),
     ("labels", "kueue.x-k8s.io/pod-group-name", "pod group"),
     ("annotations", "kueue.x-k8s.io/pod-group-total-count", "gang size"),
     ("annotations", "kueue.x-k8s.io/retriable-in-group", "as a whole"),
     ("annotations", "dreambooth.dev/config-hash", "dreambooth.dev/*")],
)  # fmt: skip
def test_the_operators_metadata_keys_are_refused(section: str, key: str, owner: str) -> None:
    with pytest.raises(SpecError) as err:
        valid({"podTemplate": {section: {"team.example.com/ok": "1", key: "x"}}})
    assert err.value.field == f'spec.podTemplate.{section}["{key}"]'
    assert owner in err.value.message and f"remove it from spec.podTemplate.{section}" in err.value.message


def test_malformed_label_keys_and_values_are_refused_before_any_pod() -> None:
    with pytest.raises(SpecError, match="not a valid key") as err:
        valid({"podTemplate": {"annotations": {"cost center": "x"}}})
    assert err.value.field == 'spec.podTemplate.annotations["cost center"]'
    with pytest.raises(SpecError, match="not a valid label value.*annotations") as err:
        valid({"podTemplate": {"labels": {"owner": "Ada Lovelace"}}})
    assert err.value.field == 'spec.podTemplate.labels["owner"]'
    with pytest.raises(SpecError, match="not a valid label value"):
        valid({"podTemplate": {"labels": {"x": "y" * 64}}})
    # An annotation value is free text.
    assert valid({"podTemplate": {"annotations": {"note": "any text, at all: " + "z" * 300}}})


@pytest.mark.parametrize(
    ("env_name", "owner"),
    [("PET_MASTER_ADDR", "rendezvous"), ("AWS_ENDPOINT_URL", "spec.storage"),
     ("AWS_ACCESS_KEY_ID", "credentialsSecret"), ("DREAMBOOTH_ATTEMPT", "the operator"),
     ("OMP_NUM_THREADS", "requests.cpu"), ("DREAMBOOTH_MEMORY_SAVERS", "the operator"),
     ("TERMINATION_MESSAGE_PATH", "the operator")],
)  # fmt: skip
def test_env_collisions_are_refused(env_name: str, owner: str) -> None:
    env = [{"name": "OK", "value": "1"}, {"name": env_name, "value": "x"}]
    with pytest.raises(SpecError) as err:
        build_pod(valid({"podTemplate": {"env": env}}), 1, 0)
    assert err.value.field == "spec.podTemplate.env[1].name"
    assert env_name in err.value.message and owner in err.value.message


def test_volume_collisions_and_gpu_mismatch_are_refused() -> None:
    with pytest.raises(SpecError, match=r"spec.podTemplate.volumes\[0\].name"):
        build_pod(valid({"podTemplate": {"volumes": [{"name": "scratch", "emptyDir": {}}]}}), 1, 0)
    with pytest.raises(SpecError, match=r"spec.podTemplate.volumeMounts\[0\].mountPath"):
        build_pod(valid({"podTemplate": {"volumeMounts": [{"name": "x", "mountPath": "/dev/shm/"}]}}), 1, 0)
    with pytest.raises(SpecError, match="gpusPerNode is 8"):
        build_pod(valid({"resources": {"gpusPerNode": 8, "limits": {"nvidia.com/gpu": 4}}}), 1, 0)


def test_names_are_valid_dns_labels() -> None:
    assert names_for("sks-dog").base == "sks-dog"
    for name in ["1st-run", "a.b.c", "x" * 253, "dog-" + "y" * 60]:
        names = names_for(name)
        assert names.base[0].isalpha() and len(names.base) <= 47
        assert len(names.pod(999, 63)) <= 63 and len(names.configmap) <= 63
    assert names_for("a.b").base != names_for("a-b").base


def test_spec_rules_name_the_field() -> None:
    training = job_body()["spec"]["training"]
    with pytest.raises(SpecError) as err:
        valid({"training": {**training, "checkpointingSteps": 500}})
    assert err.value.field == "spec.training.checkpointingSteps" and "maxTrainSteps 8" in err.value.message
    with pytest.raises(SpecError) as err:
        valid({"training": {**training, "outputDir": "runs/dog"}})
    assert err.value.field == "spec.training.outputDir"
    with pytest.raises(SpecError) as err:
        valid({"training": {**training, "withPriorPreservation": True, "classDataDir": "s3://c/"}})
    assert err.value.field == "spec.training.classPrompt"
    with pytest.raises(SpecError) as err:
        valid({"training": {**training, "maxTrainStep": 3}})
    assert (
        err.value.field == "spec.training.maxTrainStep"
        and "did you mean --max_train_steps (spec.training.maxTrainSteps)?" in err.value.message
    )
    with pytest.raises(SpecError) as err:
        valid({"resources": {"nodes": 1, "gpuPerNode": 2}})
    assert err.value.field == "spec.resources.gpuPerNode"
    valid({"training": {**training, "checkpointingSteps": "auto"}})


HUB_TOKEN = "hf_notARealTokenButSecret0123456789"


def test_hub_token_in_the_manifest_is_refused_without_echoing_it() -> None:
    body = job_body()
    body["spec"]["training"]["hubToken"] = HUB_TOKEN
    with pytest.raises(SpecError) as err:
        validate(body)
    assert err.value.field == "spec.training.hubToken"
    assert "spec.hub.tokenSecretRef" in err.value.message and HUB_TOKEN not in str(err.value)


def test_hub_token_secret_reaches_the_pods_by_reference_only() -> None:
    import json

    job = valid({"hub": {"tokenSecretRef": {"name": "hf-token", "key": "token"}}})
    pod = build_pod(job, 1, 0)
    assert _env(pod)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    config = json.loads(build_configmap(job)["data"]["config.json"])
    assert "hubToken" not in config["training"] and "hf-token" not in json.dumps(config)
    # The key defaults to "token"; a second HF_TOKEN from podTemplate.env is refused, not silently shadowed.
    job = valid({"hub": {"tokenSecretRef": {"name": "hf"}}})
    assert _env(build_pod(job, 1, 0))["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    both = {"hub": {"tokenSecretRef": {"name": "hf"}}, "podTemplate": {"env": [{"name": "HF_TOKEN", "value": "x"}]}}
    with pytest.raises(SpecError, match="spec.hub.tokenSecretRef"):
        build_pod(valid(both), 1, 0)


def test_read_only_root_keeps_every_writable_path_on_an_emptydir() -> None:
    """The trainer's root filesystem is read-only; whatever it (or torch, triton, CUDA) writes lands on a volume."""
    pod = build_pod(valid(CASES["cpu-1x1"][0]), 1, 0)
    c = pod["spec"]["containers"][0]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    empty = {v["name"] for v in pod["spec"]["volumes"] if "emptyDir" in v}
    on_empty = [m["mountPath"] for m in c["volumeMounts"] if m["name"] in empty and not m.get("readOnly")]
    env = _env(pod)
    writable = ["/tmp", env["HOME"]] + [env[k] for k in (
        "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "CUDA_CACHE_PATH", "HF_HOME", "TORCH_HOME",
        "DREAMBOOTH_CACHE", "DREAMBOOTH_SCRATCH")]  # fmt: skip
    for path in writable:
        assert any(path == m or path.startswith(m + "/") for m in on_empty), f"{path} is not on an emptyDir"
    # The trainer image's home (Dockerfile: useradd --home-dir /home/trainer) is the one mounted.
    assert env["HOME"] == "/home/trainer"


HOST_PATH = {"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "d"}},
                         {"name": "node", "hostPath": {"path": "/var/lib"}}],
             "volumeMounts": [{"name": "node", "mountPath": "/node"}]}  # fmt: skip


def test_host_path_in_the_pod_template_is_refused_naming_the_field_and_the_fix() -> None:
    with pytest.raises(SpecError) as err:
        valid({"podTemplate": HOST_PATH})
    assert err.value.field == "spec.podTemplate.volumes[1].hostPath"
    assert "operator.podPowers.allow" in err.value.message and "persistentVolumeClaim" in err.value.message
    # serviceAccountName (IRSA) is no host power: allowed without the list.
    valid({"podTemplate": {"serviceAccountName": "dreambooth-irsa"}})


def test_host_path_allowed_by_the_chart_reaches_the_pod() -> None:
    job = validate(job_body({"podTemplate": HOST_PATH}), allowed_powers=frozenset({"hostPath"}))
    vols = {v["name"]: v for v in build_pod(job, 1, 0)["spec"]["volumes"]}
    assert vols["node"]["hostPath"] == {"path": "/var/lib"}
    # Allowing another power does not allow this one.
    with pytest.raises(SpecError, match="hostPath"):
        validate(job_body({"podTemplate": HOST_PATH}), allowed_powers=frozenset({"hostNetwork", "privileged"}))


# Pod-spec-shaped fields (what a passthrough podTemplate field would carry) -> the powers found, with their paths.
POWER_CASES: list[tuple[dict[str, Any], list[tuple[str, str]]]] = [
    ({}, []),
    ({"serviceAccountName": "x", "volumes": [{"name": "a", "emptyDir": {}}]}, []),
    ({"hostNetwork": True}, [("hostNetwork", "p.hostNetwork")]),
    ({"hostNetwork": False, "hostPID": True, "hostIPC": True},
     [("hostPID", "p.hostPID"), ("hostIPC", "p.hostIPC")]),
    ({"containers": [{"name": "a"}, {"name": "b", "securityContext": {"privileged": True}}]},
     [("privileged", "p.containers[1].securityContext.privileged")]),
    ({"initContainers": [{"securityContext": {"capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]}}}]},
     [("capabilities", "p.initContainers[0].securityContext.capabilities.add")]),
    ({"securityContext": {"capabilities": {"drop": ["ALL"]}, "privileged": False}}, []),
    ({"securityContext": {"privileged": True}}, [("privileged", "p.securityContext.privileged")]),
    ({"volumes": [{"name": "h", "hostPath": {"path": "/"}}], "hostPID": True},
     [("hostPath", "p.volumes[0].hostPath"), ("hostPID", "p.hostPID")]),
    ({"annotations": {"container.apparmor.security.beta.kubernetes.io/trainer": "unconfined",
                      "seccomp.security.alpha.kubernetes.io/pod": "runtime/default",
                      "container.seccomp.security.alpha.kubernetes.io/trainer": "Unconfined",
                      "team.example.com/note": "unconfined"}},
     [("unconfined", 'p.annotations["container.apparmor.security.beta.kubernetes.io/trainer"]'),
      ("unconfined", 'p.annotations["container.seccomp.security.alpha.kubernetes.io/trainer"]')]),
]  # fmt: skip


def test_an_unconfined_profile_annotation_is_a_power_the_chart_must_allow() -> None:
    ann = {"podTemplate": {"annotations": {"container.apparmor.security.beta.kubernetes.io/trainer": "unconfined"}}}
    with pytest.raises(SpecError) as err:
        validate(job_body(ann))
    assert err.value.field == 'spec.podTemplate.annotations["container.apparmor.security.beta.kubernetes.io/trainer"]'
    assert "operator.podPowers.allow" in err.value.message and "unconfined" in err.value.message
    pod = build_pod(validate(job_body(ann), allowed_powers=frozenset({"unconfined"})), 1, 0)
    assert pod["metadata"]["annotations"]["container.apparmor.security.beta.kubernetes.io/trainer"] == "unconfined"


@pytest.mark.parametrize(("spec", "expected"), POWER_CASES)
def test_find_powers_reads_pod_spec_fields(spec: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    assert powers.find_powers(spec, "p.") == expected
    for power, _ in expected:
        assert powers.CHART_VALUE in powers.refusal(power)


def test_the_allow_list_names_an_unknown_power() -> None:
    assert powers.parse_allow("") == frozenset()
    assert powers.parse_allow(" hostPath , hostNetwork") == {"hostPath", "hostNetwork"}
    with pytest.raises(ValueError, match="unknown power 'hostpath'.*hostPath"):
        powers.parse_allow("hostpath")


def test_the_chart_offers_exactly_the_powers_the_operator_knows() -> None:
    import json

    chart = Path(__file__).parents[2] / "charts" / "dreambooth-operator"
    schema = json.loads((chart / "values.schema.json").read_text())
    allow = schema["properties"]["operator"]["properties"]["podPowers"]["properties"]["allow"]
    assert allow["items"]["enum"] == list(powers.POWERS)
    deployment = (chart / "templates" / "deployment.yaml").read_text()
    assert f"name: {powers.ENV}" in deployment and ".Values.operator.podPowers.allow" in deployment


def test_log_format_reaches_the_trainer_unless_the_job_sets_its_own() -> None:
    job = valid(CASES["cpu-1x1"][0])
    assert "LOG_FORMAT" not in _env(build_pod(job, 1, 0))
    env = _env(build_pod(job, 1, 0, opts=resources.BuildOptions(log_format="json")))
    assert env["LOG_FORMAT"] == "json" and env["DREAMBOOTH_NAMESPACE"] == "team"
    own = valid({**CASES["cpu-1x1"][0], "podTemplate": {"env": [{"name": "LOG_FORMAT", "value": "text"}]}})
    pod = build_pod(own, 1, 0, opts=resources.BuildOptions(log_format="json"))
    assert [e["value"] for e in pod["spec"]["containers"][0]["env"] if e["name"] == "LOG_FORMAT"] == ["text"]
