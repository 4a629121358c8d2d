"""``DreamBoothRuntime``: a platform's defaults for DreamBoothJobs, said once, and the one merge rule set.

A cluster-scoped object a platform team writes (image, tolerations, node selector, scheduler, queue, storage
endpoint and credentials Secret, resources, pod labels, run-policy defaults). A job names one with
``spec.runtimeRef.name``, or gets the runtime annotated ``dreambooth.dev/default-runtime: "true"``.

The effective spec is ``job ⊕ runtime ⊕ built-in defaults`` (``merge_spec``, pure): the job wins, maps merge
per key, lists of named things merge by their key (``LIST_KEYS``), everything else is replaced whole. The
built-in defaults are the model defaults, applied when the merged spec is parsed. Nothing here knows about
Kubernetes clients: the operator snapshots the result into the job's status when it accepts the job.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from pydantic import Field, ValidationError

from .config import nearest, quote
from .manifest import (
    API_GROUP,
    API_VERSION,
    Hub,
    ManifestError,
    PodTemplate,
    RunPolicy,
    Storage,
    _Spec,
)

RUNTIME_KIND = "DreamBoothRuntime"
RUNTIME_PLURAL = "dreamboothruntimes"
RUNTIME_SHORT_NAME = "dbr"
# Like StorageClass's is-default-class: the runtime a job without runtimeRef gets.
DEFAULT_RUNTIME_ANNOTATION = f"{API_GROUP}/default-runtime"

# Lists merged item by item: items with the same key are one item (the job's replaces the runtime's, in the
# runtime's place); the job's new items follow. Other lists (command, args) are replaced whole.
LIST_KEYS: dict[str, tuple[str, ...]] = {
    "podTemplate.tolerations": ("key", "effect"),
    "podTemplate.env": ("name",),
    "podTemplate.volumes": ("name",),
    "podTemplate.volumeMounts": ("mountPath",),
    "podTemplate.imagePullSecrets": ("name",),
    "podTemplate.topologySpreadConstraints": ("topologyKey", "whenUnsatisfiable"),
}
# Maps merged key by key (the job's value wins for a key both have).
MAP_FIELDS = frozenset(
    {
        "podTemplate.labels",
        "podTemplate.annotations",
        "podTemplate.nodeSelector",
        "podTemplate.affinity",
        "resources.requests",
        "resources.limits",
    }
)
# Sections merged field by field; any other field (and hub.tokenSecretRef inside hub) is replaced whole.
SECTIONS = ("storage", "resources", "podTemplate", "runPolicy", "hub")


class RuntimeResources(_Spec):
    """What a runtime may say about resources: the gang size (nodes) is the job's own."""

    image: str | None = Field(None, description="Trainer container image for jobs that do not set one.")
    gpus_per_node: int | None = Field(None, ge=0, description="GPUs per pod for jobs that do not set it.")
    requests: dict[str, Any] = Field(default_factory=dict, description="Container resource requests, per key.")
    limits: dict[str, Any] = Field(default_factory=dict, description="Container resource limits, per key.")


class RuntimeSpec(_Spec):
    """Defaults for every job that uses this runtime; a job's own value always wins."""

    storage: Storage = Field(default_factory=Storage, description="S3 endpoint, region and credentials Secret.")
    resources: RuntimeResources = Field(default_factory=RuntimeResources, description="Image, GPUs, requests, limits.")
    pod_template: PodTemplate = Field(
        default_factory=PodTemplate, description="Pod labels, tolerations, node selector, scheduler, env, ..."
    )
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Run-policy defaults (queueName, ...).")
    hub: Hub = Field(default_factory=Hub, description="Hugging Face Hub token Secret.")


def runtime_spec_set(spec: RuntimeSpec) -> dict[str, Any]:
    """Only what the runtime says: the model's defaults are the built-in layer, not the runtime's."""
    return spec.model_dump(by_alias=True, exclude_unset=True, mode="json")


def parse_runtime(obj: Any) -> tuple[str, RuntimeSpec]:
    """A DreamBoothRuntime object → (name, spec). Errors name the field (``spec.podTemplate.tolerationz``)."""
    if not isinstance(obj, dict):
        raise ManifestError(
            "manifest", f"must be a YAML mapping with apiVersion, kind, metadata and spec, not {quote(obj)}."
        )
    if obj.get("kind") != RUNTIME_KIND:
        raise ManifestError("kind", f"must be {RUNTIME_KIND}, not {quote(obj.get('kind'))}.")
    if obj.get("apiVersion") != f"{API_GROUP}/{API_VERSION}":
        raise ManifestError("apiVersion", f"must be {API_GROUP}/{API_VERSION}, not {quote(obj.get('apiVersion'))}.")
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta.get("name"):
        raise ManifestError(
            "metadata.name", "a DreamBoothRuntime needs a name (jobs refer to it by spec.runtimeRef.name)."
        )
    spec = obj.get("spec", {})
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ManifestError("spec", f"must be a mapping, not {quote(spec)}.")
    try:
        return meta["name"], RuntimeSpec.model_validate(spec)
    except ValidationError as exc:
        err = exc.errors()[0]
        path = "spec." + ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ManifestError(path, _unknown(err["loc"])) from None
        raise ManifestError(path, f"{err['msg']} (got {quote(err.get('input'))}).") from None


def _unknown(loc: tuple[Any, ...]) -> str:
    model: Any = RuntimeSpec
    for part in loc[:-1]:
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        model = field.annotation if field is not None else None
        if not isinstance(model, type):
            return "is not a field here; check the spelling."
    known = [f.alias or n for n, f in model.model_fields.items()]
    close = nearest(str(loc[-1]), known)
    where = ".".join(["spec", *map(str, loc[:-1])])
    if close:
        return f"is not a field of a DreamBoothRuntime here; did you mean {where}.{close}?"
    return f"is not a field of a DreamBoothRuntime here; the fields are {', '.join(known)}."


def is_default(obj: dict[str, Any]) -> bool:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(DEFAULT_RUNTIME_ANNOTATION, "")).lower() == "true"


def pick_default(runtimes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The runtime marked default; with several marked (a mistake), the oldest by name order wins, as a
    stable choice the job's status then names."""
    marked = sorted((r for r in runtimes if is_default(r)), key=lambda r: str((r.get("metadata") or {}).get("name")))
    return marked[0] if marked else None


def runtime_ref(job_spec: dict[str, Any]) -> str | None:
    ref = job_spec.get("runtimeRef")
    if isinstance(ref, dict) and isinstance(ref.get("name"), str) and ref["name"]:
        return ref["name"]
    return None


# ----- the merge (pure) -----


def _item_key(item: Any, keys: tuple[str, ...]) -> tuple[Any, ...] | None:
    if not isinstance(item, dict):
        return None
    return tuple(item.get(k) for k in keys)


def merge_list(base: list[Any], over: list[Any], keys: tuple[str, ...]) -> list[Any]:
    """``over``'s items replace ``base``'s items with the same key, in place; its new ones are appended."""
    out = [copy.deepcopy(i) for i in base]
    index = {_item_key(i, keys): n for n, i in enumerate(out) if _item_key(i, keys) is not None}
    for item in over:
        key = _item_key(item, keys)
        if key is not None and key in index:
            out[index[key]] = copy.deepcopy(item)
        else:
            out.append(copy.deepcopy(item))
    return out


def _merge_field(path: str, base: Any, over: Any) -> Any:
    if path in LIST_KEYS and isinstance(base, list) and isinstance(over, list):
        return merge_list(base, over, LIST_KEYS[path])
    if path in MAP_FIELDS and isinstance(base, dict) and isinstance(over, dict):
        return {**copy.deepcopy(base), **copy.deepcopy(over)}
    # Scalars, atomic objects and ill-typed values: the job's, whole (validation then names an ill-typed one).
    return copy.deepcopy(over)


def merge_spec(base: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """The job's spec over ``base`` (a runtime's spec, or an accepted snapshot): the job wins field by field.

    Only fields present in ``job`` count as set: the CRD writes no defaults into the sections a runtime can
    fill, so an absent field is one the job leaves to the runtime.
    """
    out = copy.deepcopy(job)
    for section in SECTIONS:
        b, j = base.get(section), job.get(section)
        if b is None:
            continue
        if j is None:
            out[section] = copy.deepcopy(b)
            continue
        if not (isinstance(b, dict) and isinstance(j, dict)):
            continue  # the job's ill-typed section stays for validation to name
        merged = copy.deepcopy(b)
        for key, value in j.items():
            merged[key] = _merge_field(f"{section}.{key}", b[key], value) if key in b else copy.deepcopy(value)
        out[section] = merged
    return out


def effective_of(job: dict[str, Any]) -> dict[str, Any]:
    """A stored job's spec as it runs: its own spec over the snapshot the operator took at acceptance (none yet:
    its own spec). For readers of a job object — the CLI, dashboards — that want its storage, queue or GPUs."""
    spec = job.get("spec") if isinstance(job.get("spec"), dict) else {}
    snapshot = (job.get("status") or {}).get("effectiveSpec")
    return merge_spec(snapshot, spec) if isinstance(snapshot, dict) else dict(spec)


def snapshot_of(effective: dict[str, Any]) -> dict[str, Any]:
    """What the status keeps of an effective spec: everything but the training (kept by trainingHash and the
    ConfigMap) and the runtime reference (kept as status.runtime)."""
    return {k: v for k, v in effective.items() if k not in ("training", "method", "runtimeRef")}


def spec_hash(snapshot: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(snapshot, sort_keys=True).encode()).hexdigest()[:16]
