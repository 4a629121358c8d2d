"""Pure builders: a validated job in, the Kubernetes objects the operator creates out (plain dicts).

Names are deterministic (a create is safe to repeat: a second one answers 409), every object is owned by the
job (garbage collection cleans up; no finalizer of ours), and each pod carries the plumbing docs/design.md lists.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from dreambooth_api.config import config_hash
from dreambooth_api.manifest import API_GROUP, API_VERSION, KIND

from . import rendezvous
from .reserved import (
    CACHE_DIR,
    CONFIG_DIR,
    CREDENTIAL_ENV,
    GPU_RESOURCE,
    HOME_DIR,
    HUB_TOKEN_ENV,
    KUEUE_GROUP,
    KUEUE_QUEUE,
    KUEUE_RETRIABLE,
    KUEUE_TOTAL,
    LABEL_MANAGED_BY,
    SCRATCH_DIR,
    VOLUMES,
)
from .spec import ValidJob

LABEL_JOB_NAME = f"{API_GROUP}/job-name"
LABEL_JOB_UID = f"{API_GROUP}/job-uid"
LABEL_ATTEMPT = f"{API_GROUP}/attempt"
LABEL_INDEX = f"{API_GROUP}/pod-index"
MANAGER = "dreambooth-operator"
ANNOTATION_CONFIG_HASH = f"{API_GROUP}/config-hash"
# The gang size an attempt was created with (spec.resources.nodes may be edited for the next attempt).
ANNOTATION_GANG_SIZE = f"{API_GROUP}/gang-size"
# The newest durable checkpoint's time on every running pod: what a scheduler choosing preemption victims reads
# (Kueue issue #477 asks workloads to publish it); the job's Checkpointed condition carries the same time.
ANNOTATION_CHECKPOINT_TIME = f"{API_GROUP}/last-checkpoint-time"

CONTAINER = "trainer"
CONFIG_KEY = "config.json"
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
PROGRESS_PORT = 8080
DEFAULT_COMMAND = ["python", "-m", "dreambooth_trainer.launch"]
DEFAULT_ARGS = ["--config", f"{CONFIG_DIR}/{CONFIG_KEY}"]
# Checkpoints are written to scratch first (twice their size at worst) and the model sits in the cache:
# full fine-tune of SD (UNet 3.4 GB + AdamW 6.9 GB, twice, + ~6 GB model) vs. LoRA (MBs + the model); SDXL's
# model is ~14 GB in fp32 (UNet 10.3 GB, text encoders 3.3 GB, VAE 0.3 GB), its LoRA checkpoints MBs; FLUX.1-dev's
# diffusers folder is ~34 GB in bf16 (transformer 23.8 GB, T5-XXL 9.5 GB, CLIP and VAE 0.4 GB; docs/flux.md).
DEFAULT_EPHEMERAL_STORAGE = {"full": "30Gi", "lora": "8Gi", "lora-sdxl": "20Gi", "lora-flux": "48Gi"}
# The default 300 s keeps a gang on a dead node for five minutes before anything can recover.
NODE_FAILURE_TOLERATION_SECONDS = 30
RUN_AS_USER = 1000

# Name prefix budget: '<base>-a<attempt>-<index>' and '<base>-config' must stay valid DNS labels (<= 63).
_BASE_MAX = 47


@dataclass(frozen=True)
class Names:
    base: str

    @property
    def service(self) -> str:
        return self.base

    @property
    def configmap(self) -> str:
        return f"{self.base}-config"

    def pod(self, attempt: int, index: int) -> str:
        return f"{self.base}-a{attempt}-{index}"

    def hostname(self, index: int) -> str:
        # Stable across attempts, so pod 0's DNS name (the rendezvous master) never changes.
        return f"{self.base}-{index}"

    def pod_group(self, attempt: int) -> str:
        return f"{self.base}-a{attempt}"


def names_for(job_name: str) -> Names:
    """A DNS-1035 label derived from the job name (Service names must start with a letter, <= 63 chars).

    Job names are DNS-1123 subdomains: dots, a leading digit or length make them unusable as they are, and
    then a short hash of the full name keeps two such jobs apart.
    """
    label = re.sub(r"[^a-z0-9-]+", "-", job_name.lower()).strip("-")
    if label == job_name and label[:1].isalpha() and len(label) <= _BASE_MAX:
        return Names(label)
    digest = hashlib.sha256(job_name.encode()).hexdigest()[:6]
    stem = label if label[:1].isalpha() else f"j{label}"
    return Names(f"{stem[: _BASE_MAX - 7].rstrip('-')}-{digest}")


@dataclass(frozen=True)
class BuildOptions:
    cluster_domain: str = "cluster.local"
    # LOG_FORMAT of the trainer pods (the chart's logFormat); a job's podTemplate env may still set its own.
    log_format: str = "text"


def owner_reference(job: ValidJob) -> dict[str, Any]:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def job_labels(job: ValidJob) -> dict[str, str]:
    return {LABEL_JOB_NAME: names_for(job.name).base, LABEL_JOB_UID: job.uid, LABEL_MANAGED_BY: MANAGER}


def _metadata(job: ValidJob, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": {**job_labels(job), **(labels or {})},
        "ownerReferences": [owner_reference(job)],
    }


def config_json(job: ValidJob) -> str:
    """The launcher's config: the method and the validated training settings (camelCase, non-defaults)."""
    return json.dumps({"method": job.spec.method, "training": job.config.to_training_spec()}, indent=2, sort_keys=True)


def build_configmap(job: ValidJob) -> dict[str, Any]:
    # Immutable: spec.training edits are refused, so every attempt of a job reads the same config.
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, names_for(job.name).configmap),
        "immutable": True,
        "data": {CONFIG_KEY: config_json(job) + "\n"},
    }


def build_service(job: ValidJob) -> dict[str, Any]:
    # Headless, and publishing not-ready pods: each pod's DNS name must resolve before rendezvous, not after.
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, names_for(job.name).service),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB_UID: job.uid},
            "ports": [{"name": "rdzv", "port": rendezvous.MASTER_PORT, "targetPort": rendezvous.MASTER_PORT}],
        },
    }


def _value_env(pairs: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": k, "value": v} for k, v in pairs.items()]


def _parse_cpu(value: Any) -> float | None:
    text = str(value)
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


def omp_threads(job: ValidJob) -> int:
    """Intra-op threads per worker: the pod's CPU request split among its workers (oversubscription is slow)."""
    cpu = _parse_cpu(job.spec.resources.requests.get("cpu", job.spec.resources.limits.get("cpu", 1)))
    return max(1, int((cpu or 1) // rendezvous.nproc_per_node(job.spec.resources.gpus_per_node)))


def _env(job: ValidJob, attempt: int, index: int, memory_savers: bool, opts: BuildOptions) -> list[dict[str, Any]]:
    names = names_for(job.name)
    policy = job.spec.run_policy
    env = _value_env(
        {
            "DREAMBOOTH_JOB_NAME": job.name,
            "DREAMBOOTH_NAMESPACE": job.namespace,
            "DREAMBOOTH_JOB_UID": job.uid,
            "DREAMBOOTH_ATTEMPT": str(attempt),
            "DREAMBOOTH_GRACE_SECONDS": str(policy.termination_grace_period_seconds),
        }
    )
    if memory_savers:
        env.append({"name": "DREAMBOOTH_MEMORY_SAVERS", "value": "1"})
    env += _value_env({"TERMINATION_MESSAGE_PATH": TERMINATION_MESSAGE_PATH, "PROGRESS_PORT": str(PROGRESS_PORT)})
    env.append({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    env += rendezvous.rendezvous_env(
        nodes=job.spec.resources.nodes,
        gpus_per_node=job.spec.resources.gpus_per_node,
        node_rank=index,
        hostname0=names.hostname(0),
        service=names.service,
        namespace=job.namespace,
        scheduling_timeout_seconds=policy.scheduling_timeout_seconds,
        cluster_domain=opts.cluster_domain,
    )
    env += _value_env(job.spec.storage.env())
    secret = job.spec.storage.credentials_secret
    if secret:
        # By reference only: the operator never reads Secret data.
        env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": k}}} for k in CREDENTIAL_ENV]
    ref = job.spec.hub.token_secret_ref
    if ref is not None:
        # By reference only, like the S3 credentials: the operator never reads the token.
        env.append({"name": HUB_TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    env += _value_env(
        {
            "HF_HOME": f"{CACHE_DIR}/huggingface",
            "TORCH_HOME": f"{CACHE_DIR}/torch",
            "DREAMBOOTH_CACHE": f"{CACHE_DIR}/dreambooth",
            "DREAMBOOTH_SCRATCH": SCRATCH_DIR,
            # The root filesystem is read-only: HOME on its emptyDir, the compilers' caches in the cache one
            # (their defaults are under HOME or /tmp, which an image other than ours may not have writable).
            "HOME": HOME_DIR,
            "TRITON_CACHE_DIR": f"{CACHE_DIR}/triton",
            "TORCHINDUCTOR_CACHE_DIR": f"{CACHE_DIR}/torchinductor",
            "CUDA_CACHE_PATH": f"{CACHE_DIR}/nv",
            "OMP_NUM_THREADS": str(omp_threads(job)),
        }
    )
    user = [dict(v) for v in job.spec.pod_template.env]
    if opts.log_format != "text" and not any(v.get("name") == "LOG_FORMAT" for v in user):
        env.append({"name": "LOG_FORMAT", "value": opts.log_format})
    return env + user


def _volumes(job: ValidJob) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    names = names_for(job.name)
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": names.configmap}},
        # The 64 MiB default /dev/shm breaks NCCL and DataLoader workers.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "scratch", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "home", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": n, "mountPath": p, **({"readOnly": True} if n == "config" else {})} for n, p in VOLUMES.items()
    ]
    return volumes + [dict(v) for v in job.spec.pod_template.volumes], mounts + [
        dict(m) for m in job.spec.pod_template.volume_mounts
    ]


def _container_resources(job: ValidJob) -> dict[str, Any]:
    res = job.spec.resources
    requests = dict(res.requests)
    limits = dict(res.limits)
    requests.setdefault("ephemeral-storage", DEFAULT_EPHEMERAL_STORAGE[job.spec.method])
    if res.gpus_per_node > 0:
        limits[GPU_RESOURCE] = res.gpus_per_node
    # Quantities as strings, their canonical form ("4", "16Gi"): what kubectl shows and validators expect.
    out: dict[str, Any] = {"requests": {k: str(v) for k, v in requests.items()}}
    if limits:
        out["limits"] = {k: str(v) for k, v in limits.items()}
    return out


def _tolerations(job: ValidJob) -> list[dict[str, Any]]:
    ours = [
        {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": NODE_FAILURE_TOLERATION_SECONDS}
        for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
    ]
    return ours + [dict(t) for t in job.spec.pod_template.tolerations]


def _command(job: ValidJob) -> tuple[list[str], list[str]]:
    tpl = job.spec.pod_template
    if tpl.command:
        # A replaced command gets only the args given with it: ours mean something only to the launcher.
        return list(tpl.command), list(tpl.args)
    return list(DEFAULT_COMMAND), list(tpl.args) or list(DEFAULT_ARGS)


def pod_labels(job: ValidJob, attempt: int, index: int) -> dict[str, str]:
    # The job's own labels first: spec.py refuses the keys below, so nothing of theirs is overwritten here.
    labels = {
        **job.spec.pod_template.labels,
        **job_labels(job),
        LABEL_ATTEMPT: str(attempt),
        LABEL_INDEX: str(index),
    }
    queue = job.spec.run_policy.queue_name
    if queue:
        labels[KUEUE_QUEUE] = queue
        # A new group per attempt: Kueue finishes a group when one pod fails (retriable-in-group false).
        labels[KUEUE_GROUP] = names_for(job.name).pod_group(attempt)
    return labels


def build_pod(
    job: ValidJob, attempt: int, index: int, memory_savers: bool = False, opts: BuildOptions | None = None
) -> dict[str, Any]:
    opts = opts or BuildOptions()
    names = names_for(job.name)
    tpl = job.spec.pod_template
    command, args = _command(job)
    volumes, mounts = _volumes(job)
    annotations = {
        **tpl.annotations,
        ANNOTATION_CONFIG_HASH: config_hash(job.config),
        ANNOTATION_GANG_SIZE: str(job.spec.resources.nodes),
    }
    if job.spec.run_policy.queue_name:
        annotations[KUEUE_TOTAL] = str(job.spec.resources.nodes)
        annotations[KUEUE_RETRIABLE] = "false"
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": job.spec.resources.image,
        "command": command,
        "env": _env(job, attempt, index, memory_savers, opts),
        "ports": [
            {"name": "progress", "containerPort": PROGRESS_PORT},
            {"name": "rdzv", "containerPort": rendezvous.MASTER_PORT},
        ],
        "resources": _container_resources(job),
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        # A launcher that dies before writing its message still leaves the tail of its log for the operator.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if args:
        container["args"] = args
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "hostname": names.hostname(index),
        "subdomain": names.service,
        "terminationGracePeriodSeconds": job.spec.run_policy.termination_grace_period_seconds,
        "enableServiceLinks": False,
        # The trainer never talks to the apiserver; IRSA/workload identity inject their own token.
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "tolerations": _tolerations(job),
        "containers": [container],
        "volumes": volumes,
    }
    if tpl.service_account_name:
        spec["serviceAccountName"] = tpl.service_account_name
    if tpl.node_selector:
        spec["nodeSelector"] = dict(tpl.node_selector)
    if tpl.affinity:
        spec["affinity"] = dict(tpl.affinity)
    if tpl.priority_class_name:
        spec["priorityClassName"] = tpl.priority_class_name
    if tpl.image_pull_secrets:
        spec["imagePullSecrets"] = [dict(s) for s in tpl.image_pull_secrets]
    if tpl.scheduler_name:
        spec["schedulerName"] = tpl.scheduler_name
    if tpl.runtime_class_name:
        spec["runtimeClassName"] = tpl.runtime_class_name
    if tpl.topology_spread_constraints:
        spec["topologySpreadConstraints"] = [dict(c) for c in tpl.topology_spread_constraints]
    meta = _metadata(job, names.pod(attempt, index), pod_labels(job, attempt, index))
    meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def build_gang(
    job: ValidJob, attempt: int, memory_savers: bool = False, opts: BuildOptions | None = None
) -> list[dict[str, Any]]:
    return [build_pod(job, attempt, i, memory_savers, opts) for i in range(job.spec.resources.nodes)]


def logs_uri(job: ValidJob, attempt: int) -> str:
    return f"{job.config.output_dir.rstrip('/')}/logs/attempt-{attempt}/"
