"""Validation of a DreamBoothJob beyond what the schema can say, with errors that name the manifest field.

The apiserver checks types, enums and minimums. Everything else — the trainer's own cross-field rules, rules
that only matter inside a pod, a podTemplate that collides with what the operator sets in every pod, and (on
1.20, which has no server-side field validation) unknown fields — is checked here, before any pod exists, so a
bad manifest fails at once instead of in a pod. This is the one place: the builders trust a ValidJob.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic.alias_generators import to_camel

from dreambooth_api.config import CommonConfig, ConfigError
from dreambooth_api.manifest import JobSpec, Resources, parse_job
from dreambooth_api.runtime import merge_spec, parse_runtime, snapshot_of, spec_hash

from .powers import find_powers, refusal
from .reserved import ENV_OWNERS, GPU_RESOURCE, HUB_TOKEN_ENV, VOLUMES, metadata_owner

# Pods in one gang unless the chart says otherwise (operator.maxNodes): a typo of 20,000 nodes would otherwise
# make the operator build and create 20,000 pods.
DEFAULT_MAX_NODES = 256

# Where the trainer reads and writes: a relative path would resolve inside a pod's throwaway filesystem.
_PATH_FIELDS = ("output_dir", "instance_data_dir", "class_data_dir")


class SpecError(ValueError):
    """The manifest cannot run as written. ``field`` is the manifest path, e.g. spec.training.classPrompt."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class ValidJob:
    name: str
    namespace: str
    uid: str
    spec: JobSpec
    config: CommonConfig
    training_hash: str
    # The effective spec without training (job ⊕ runtime ⊕ built-in defaults), as status.effectiveSpec keeps it.
    snapshot: dict[str, Any]
    spec_hash: str


def training_hash(spec: dict[str, Any]) -> str:
    """Identity of the accepted spec.training (and method): any edit changes it."""
    data = {"method": spec.get("method", "full"), "training": spec.get("training") or {}}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _training_field(name: str) -> str:
    return f"spec.training.{to_camel(name)}"


def validate(
    body: dict[str, Any],
    max_nodes: int = DEFAULT_MAX_NODES,
    allowed_powers: frozenset[str] = frozenset(),
    base: dict[str, Any] | None = None,
) -> ValidJob:
    """Parse and check a job object (as read from the apiserver), or raise SpecError naming the field.

    ``base`` is what the job's own spec is laid over (``runtime.merge_spec``): a runtime's spec, or the
    snapshot taken when the job was accepted. The checks run on the effective spec.
    """
    meta = body.get("metadata") or {}
    raw_spec = body.get("spec")
    if base and isinstance(raw_spec, dict):
        body = {**body, "spec": merge_spec(base, raw_spec)}
    try:
        job, config = parse_job(body)
    except ConfigError as exc:
        field = exc.field if exc.field.startswith("spec") else _training_field(exc.field)
        if exc.field in ("apiVersion", "kind", "manifest"):
            field = exc.field
        raise SpecError(field, str(exc).split(": ", 1)[-1]) from None
    if job.spec.resources.nodes > max_nodes:
        raise SpecError(
            "spec.resources.nodes",
            f"{job.spec.resources.nodes} is above this operator's limit of {max_nodes} pods per gang; use fewer "
            "nodes, or ask the cluster admin to raise the chart value operator.maxNodes.",
        )
    check_operator_rules(config)
    check_pod_template(job.spec, allowed_powers)
    snapshot = snapshot_of(job.spec.model_dump(by_alias=True, mode="json", exclude_none=True))
    return ValidJob(
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace", "default")),
        uid=str(meta.get("uid", "")),
        spec=job.spec,
        config=config,
        training_hash=training_hash(body.get("spec") or {}),
        snapshot=snapshot,
        spec_hash=spec_hash(snapshot),
    )


def validate_runtime(obj: Any, allowed_powers: frozenset[str] = frozenset()) -> str:
    """Check a DreamBoothRuntime as far as it can be checked alone (fields, and the podTemplate rules every job
    using it would hit); its name, or SpecError naming the field."""
    try:
        name, rt = parse_runtime(obj)
    except ConfigError as exc:
        raise SpecError(exc.field, str(exc).split(": ", 1)[-1]) from None
    res = rt.resources
    gpus = res.gpus_per_node if res.gpus_per_node is not None else 1
    as_job = JobSpec(
        training={},
        storage=rt.storage,
        resources=Resources(gpus_per_node=gpus, requests=res.requests, limits=res.limits),
        pod_template=rt.pod_template,
        run_policy=rt.run_policy,
        hub=rt.hub,
    )
    check_pod_template(as_job, allowed_powers)
    return name


def check_operator_rules(config: CommonConfig) -> None:
    """Rules that hold only for a job run by the operator (dreambooth run accepts what diffusers accepts)."""
    if config.hub_token:
        # Never echo the value: this message reaches the job's status and Events.
        raise SpecError(
            _training_field("hub_token"),
            "a token in the manifest would be stored in plain text in the job, its ConfigMap, status and "
            "Events; remove it, put the token in a Secret (kubectl create secret generic hf-token "
            "--from-literal=token=...) and reference it with spec.hub.tokenSecretRef: {name: hf-token, key: token}.",
        )
    steps, every = config.max_train_steps, config.checkpointing_steps
    if isinstance(every, int) and steps is not None and every > steps:
        raise SpecError(
            _training_field("checkpointing_steps"),
            f"{every} is above maxTrainSteps {steps}: no checkpoint would ever be written, so any preemption "
            f"would lose the whole run; use a value of at most {steps} (e.g. {max(1, steps // 4)}) or 'auto'.",
        )
    for name in _PATH_FIELDS:
        value = getattr(config, name)
        if value and "://" not in value and not value.startswith("/"):
            raise SpecError(
                _training_field(name),
                f"{value!r} is a relative path, which inside a pod is lost with the pod; use an s3:// URI "
                "(or an absolute path on a volume mounted through spec.podTemplate).",
            )


# Kubernetes' own rules for label keys and values (apimachinery validation.IsQualifiedName / IsValidLabelValue):
# checked here so a bad label fails the job at once, not at its first pod creation.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_QUALIFIED_NAME = re.compile(rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_NAME})?$")


def _bad_key(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if not _QUALIFIED_NAME.match(key) or len(name) > 63 or len(prefix) > 253:
        return (
            f"{key!r} is not a valid key: an optional DNS-subdomain prefix and '/', then a name of at most 63 "
            "letters, digits, '-', '_' or '.', starting and ending with a letter or digit (e.g. team.example.com/cost-center)."
        )
    return None


def check_pod_metadata(spec: JobSpec) -> None:
    """podTemplate labels and annotations: valid Kubernetes keys (and label values), none of the operator's own."""
    tpl = spec.pod_template
    for section, values in (("labels", tpl.labels), ("annotations", tpl.annotations)):
        for key, value in values.items():
            field = f'spec.podTemplate.{section}["{key}"]'
            problem = _bad_key(key)
            if problem:
                raise SpecError(field, problem)
            owner = metadata_owner(key)
            if owner:
                raise SpecError(field, f"is set by {owner}; remove it from spec.podTemplate.{section}.")
            if section == "labels" and (len(value) > 63 or not _LABEL_VALUE.match(value)):
                raise SpecError(
                    field,
                    f"{value!r} is not a valid label value: at most 63 letters, digits, '-', '_' or '.', starting "
                    "and ending with a letter or digit (or empty); put longer text in spec.podTemplate.annotations.",
                )


def check_pod_template(spec: JobSpec, allowed_powers: frozenset[str] = frozenset()) -> None:
    """What the job adds to its pods must not collide with what the operator sets in every one (reserved.py),
    nor give them host or privilege powers the chart does not allow (powers.py).

    Checked in the order a pod is laid out (volumes, mounts, env, resources): a job with several collisions is
    told of the first one there.
    """
    tpl = spec.pod_template
    check_pod_metadata(spec)
    for power, field in find_powers(tpl.model_dump(by_alias=True), "spec.podTemplate."):
        if power not in allowed_powers:
            raise SpecError(field, refusal(power))
    for i, vol in enumerate(tpl.volumes):
        if vol.get("name") in VOLUMES:
            raise SpecError(
                f"spec.podTemplate.volumes[{i}].name", f"{vol.get('name')!r} is used by the operator; rename it."
            )
    for i, mount in enumerate(tpl.volume_mounts):
        path = str(mount.get("mountPath", "")).rstrip("/")
        if path in VOLUMES.values():
            raise SpecError(
                f"spec.podTemplate.volumeMounts[{i}].mountPath", f"{path} is mounted by the operator; use another path."
            )
    for i, var in enumerate(tpl.env):
        name = var.get("name")
        if not isinstance(name, str) or not name:
            raise SpecError(f"spec.podTemplate.env[{i}].name", "is required.")
        if name == HUB_TOKEN_ENV and spec.hub.token_secret_ref is not None:
            raise SpecError(
                f"spec.podTemplate.env[{i}].name",
                f"{name} is set from spec.hub.tokenSecretRef; keep one of the two.",
            )
        if name in ENV_OWNERS:
            raise SpecError(
                f"spec.podTemplate.env[{i}].name",
                f"{name} is set by the operator from {ENV_OWNERS[name]}; remove it from spec.podTemplate.env.",
            )
    res = spec.resources
    if res.gpus_per_node > 0:
        for section, values in (("limits", res.limits), ("requests", res.requests)):
            if GPU_RESOURCE in values and str(values[GPU_RESOURCE]) != str(res.gpus_per_node):
                raise SpecError(
                    f"spec.resources.{section}.{GPU_RESOURCE}",
                    f"is {values[GPU_RESOURCE]} but gpusPerNode is {res.gpus_per_node}; remove it (it is set from gpusPerNode).",
                )
