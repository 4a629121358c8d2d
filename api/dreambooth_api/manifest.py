"""The ``DreamBoothJob`` manifest: one typed definition for ``dreambooth run`` and the operator's CRD.

Every trainer setting lives in ``spec.training`` (validated by the method's config model); the other sections
say where and how the trainer runs. Importable without torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from .config import CommonConfig, ConfigError, Method, nearest, parse_training, quote

API_GROUP = "dreambooth.dev"
API_VERSION = "v1alpha1"
KIND = "DreamBoothJob"
# The release's trainer image (scripts/release.sh pushes it; tests/packaging/test_version.py keeps the tag in step
# with the release). The built-in default, under a runtime's and the job's: the operator snapshots the effective
# image into the job's status when it accepts the job, so a job keeps it when the operator is upgraded.
DEFAULT_IMAGE = "ghcr.io/dreambooth-operator/trainer:0.2.0"
PLURAL = "dreamboothjobs"
SHORT_NAME = "dbj"


class _Spec(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Storage(_Spec):
    """Where s3:// paths live. Credentials come from the standard AWS chain: a Secret, or IRSA/workload identity."""

    endpoint: str = Field("", description="S3 endpoint URL for S3-compatible stores (MinIO, SeaweedFS); empty = AWS.")
    region: str = Field("", description="S3 region; empty = the SDK's default chain (us-east-1 when unset).")
    path_style: bool = Field(False, description="Use path-style addressing (most S3-compatible servers need it).")
    credentials_secret: str = Field(
        "",
        description="Name of a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; empty = IRSA/workload identity.",
    )

    def env(self) -> dict[str, str]:
        """Environment that points boto3 (and our Store) at this storage."""
        out: dict[str, str] = {}
        if self.endpoint:
            out["AWS_ENDPOINT_URL"] = self.endpoint
        if self.region:
            out["AWS_REGION"] = self.region
            out["AWS_DEFAULT_REGION"] = self.region
        if self.path_style:
            out["DREAMBOOTH_S3_ADDRESSING_STYLE"] = "path"
        # boto3 >= 1.36 sends CRC checksums that several S3-compatible servers reject.
        out["AWS_REQUEST_CHECKSUM_CALCULATION"] = "when_required"
        out["AWS_RESPONSE_CHECKSUM_VALIDATION"] = "when_required"
        return out


class Resources(_Spec):
    nodes: int = Field(1, ge=1, description="Pods in the gang, one per node.")
    gpus_per_node: int = Field(
        1, ge=0, description="GPUs per pod = torchrun processes per pod (0 = one CPU process, for tests)."
    )
    image: str = Field(DEFAULT_IMAGE, description="Trainer container image (Dockerfile target trainer).")
    requests: dict[str, Any] = Field(
        default_factory=dict, description="Container resource requests (cpu, memory, ...)."
    )
    limits: dict[str, Any] = Field(
        default_factory=dict, description="Container resource limits; nvidia.com/gpu is set for you."
    )


class PodTemplate(_Spec):
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra pod labels (Kueue priority class, cost allocation, workload identity); the operator's "
        "own keys (dreambooth.dev/*, app.kubernetes.io/managed-by, the Kueue pod-group keys) are refused.",
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Extra pod annotations; the operator's own keys are refused."
    )
    scheduler_name: str = Field("", description="Scheduler of the pods (e.g. volcano); empty = the default one.")
    runtime_class_name: str = Field("", description="RuntimeClass of the pods (e.g. nvidia); empty = the node's.")
    topology_spread_constraints: list[dict[str, Any]] = Field(
        default_factory=list, description="Pod topologySpreadConstraints, passed through as written."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods must match.")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra tolerations (e.g. for spot or GPU taints)."
    )
    affinity: dict[str, Any] = Field(default_factory=dict, description="Pod affinity/anti-affinity.")
    priority_class_name: str = Field("", description="PriorityClass of the pods.")
    service_account_name: str = Field("", description="ServiceAccount of the pods (e.g. one annotated for IRSA).")
    image_pull_secrets: list[dict[str, Any]] = Field(default_factory=list, description="Secrets to pull the image.")
    env: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra container env vars (not trainer settings)."
    )
    volumes: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra volumes (mounted via volumeMounts in env-free form)."
    )
    volume_mounts: list[dict[str, Any]] = Field(default_factory=list, description="Mounts for the extra volumes.")
    command: list[str] = Field(
        default_factory=list, description="Override the container command (debugging, benchmarks)."
    )
    args: list[str] = Field(default_factory=list, description="Override the container args.")


class SecretKeyRef(_Spec):
    name: str = Field(..., min_length=1, description="Name of a Secret in the job's namespace.")
    key: str = Field("token", min_length=1, description="Key in that Secret holding the value.")


class Hub(_Spec):
    """Hugging Face Hub access. The token comes from a Secret: a manifest (and so the job's ConfigMap, status
    and Events) never holds it."""

    token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the Hub token; the pods get it as HF_TOKEN (read by reference only)."
    )


class RunPolicy(_Spec):
    backoff_limit: int = Field(
        3, ge=0, description="Failed attempts (crashes, hung gangs) before the job fails; preemptions do not count."
    )
    max_preemptions: int = Field(20, ge=0, description="Preemptions tolerated before the job fails.")
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail the job (DeadlineExceeded) after this long."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="Delete the job this long after it finished."
    )
    suspend: bool = Field(
        False, description="true: checkpoint and stop the pods; false again: resume from the checkpoint."
    )
    termination_grace_period_seconds: int = Field(
        120, ge=1, description="Pod grace period: the time the emergency checkpoint has on SIGTERM."
    )
    progress_deadline_seconds: int = Field(
        1800, ge=1, description="No step progress this long while Running = hung gang."
    )
    scheduling_timeout_seconds: int = Field(
        1800, ge=1, description="How long pods may wait for capacity before the attempt is retried."
    )
    queue_name: str = Field("", description="Kueue LocalQueue; empty = no Kueue.")


class RuntimeRef(_Spec):
    name: str = Field(..., min_length=1, description="Name of a DreamBoothRuntime (cluster-scoped).")


class JobSpec(_Spec):
    method: Method = Field(
        "full",
        description="full (train_dreambooth.py), lora (train_dreambooth_lora.py), lora-sdxl "
        "(train_dreambooth_lora_sdxl.py) or lora-flux (train_dreambooth_lora_flux.py).",
    )
    training: dict[str, Any] = Field(
        ..., description="Every trainer setting: the flags of the method's script, in camelCase."
    )
    storage: Storage = Field(default_factory=Storage, description="S3 endpoint and credentials.")
    resources: Resources = Field(default_factory=Resources, description="Gang size, GPUs and image.")
    pod_template: PodTemplate = Field(default_factory=PodTemplate, description="Pod-level overrides.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Retries, preemptions, deadlines, suspend.")
    hub: Hub = Field(default_factory=Hub, description="Hugging Face Hub access (the token from a Secret).")
    runtime_ref: RuntimeRef | None = Field(
        None,
        description="The DreamBoothRuntime whose platform defaults fill what this job leaves out (job wins); "
        "empty = the runtime annotated dreambooth.dev/default-runtime=true, if any. Read once, when the job is "
        "accepted: status.effectiveSpec keeps the result.",
    )

    def training_config(self) -> CommonConfig:
        return parse_training(self.method, self.training)


class Job(BaseModel):
    model_config = ConfigDict(extra="ignore")

    api_version: str = Field(alias="apiVersion")
    kind: Literal["DreamBoothJob"]
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: JobSpec

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", "dreambooth-job"))


def parse_job(obj: dict[str, Any]) -> tuple[Job, CommonConfig]:
    """Validate a manifest and its trainer config. Errors name the manifest field and the fix."""
    if not isinstance(obj, dict):
        raise ConfigError("manifest", "must be a YAML mapping with apiVersion, kind, metadata and spec.")
    if obj.get("kind") != KIND:
        raise ManifestError("kind", f"must be {KIND}, not {quote(obj.get('kind'))}.")
    if obj.get("apiVersion") != f"{API_GROUP}/{API_VERSION}":
        raise ManifestError("apiVersion", f"must be {API_GROUP}/{API_VERSION}, not {quote(obj.get('apiVersion'))}.")
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ManifestError("metadata", f"must be a mapping like {{name: my-job}}, not {quote(metadata)}.")
    if not isinstance(metadata.get("name", ""), str):
        raise ManifestError("metadata.name", f"must be a string, not {quote(metadata.get('name'))}.")
    try:
        job = Job.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        path = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ManifestError(path, _unknown_field(err["loc"])) from None
        raise ManifestError(path, f"{err['msg']} (got {quote(err.get('input'))}).") from None
    return job, job.spec.training_config()


MAX_MANIFEST_BYTES = 1 << 20
# Nodes of the document once every alias is expanded: what a validator or json.dumps walks. A YAML alias bomb is
# a few hundred bytes that expand to billions of nodes (the review's took 72 s and 1.57 GB before its error).
MAX_EXPANDED_NODES = 100_000


class _Loader(yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses duplicate keys and documents whose aliases expand beyond reason."""

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            _check_node(node)
        return node


def _check_node(root: yaml.Node) -> None:
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node: yaml.Node, path: str) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in on_path:
            raise ManifestError(path or "manifest", "refers to itself through a YAML alias; spell the value out.")
        on_path.add(id(node))
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    line = key.start_mark.line + 1
                    if key.value in seen:
                        where = f"{path}.{key.value}" if path else str(key.value)
                        raise ManifestError(
                            where[:200], f"is given twice (lines {seen[key.value]} and {line}); keep one."
                        )
                    seen[key.value] = line
                    child = f"{path}.{key.value}" if path else str(key.value)
                else:
                    child = path
                total += size(key, child) + size(value, child)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item, f"{path}[{i}]") for i, item in enumerate(node.value))
        on_path.discard(id(node))
        sizes[id(node)] = total
        if total > MAX_EXPANDED_NODES:
            raise ManifestError(
                "manifest", f"expands to more than {MAX_EXPANDED_NODES} values through YAML aliases; refused."
            )
        return total

    size(root, "")


# YAML 1.2 (and kubectl) read `1e-4` as a number; PyYAML's YAML 1.1 reads it as a string, which the strict
# config would refuse: the manifest means the same to `dreambooth run` as to the cluster.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_documents(path: str | Path) -> list[Any]:
    """The non-empty YAML documents of a manifest file, read with the same limits as any manifest."""
    with open(path, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError("manifest", f"{path} is larger than 1 MiB; a DreamBoothJob is a few KiB.")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw[:4]:
        raise ManifestError("manifest", f"{path} is UTF-16 or UTF-32; save it as UTF-8.")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError("manifest", f"{path} is not UTF-8 (byte {exc.start}); save it as UTF-8.") from None
    try:
        docs = [d for d in yaml.load_all(text, Loader=_Loader) if d]  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ManifestError("manifest", f"{path} is not valid YAML: {str(exc)[:500]}") from None
    return docs


def load_job(path: str | Path) -> tuple[Job, CommonConfig]:
    docs = load_documents(path)
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if len(docs) == 1 and not jobs:
        return parse_job(docs[0])  # names what is wrong with the one document: its kind, or that it is no mapping
    if len(jobs) != 1:
        kinds = sorted({quote(d.get("kind")) for d in docs if isinstance(d, dict)})
        raise ManifestError(
            "kind",
            f"{path} must hold exactly one {KIND}; it holds {len(jobs)} among {len(docs)} document(s)"
            f"{' (kinds: ' + ', '.join(kinds)[:200] + ')' if kinds else ''}.",
        )
    return parse_job(jobs[0])


def _unknown_field(loc: tuple[Any, ...]) -> str:
    """The message for a field no section has: the nearest real one, or the section's fields."""
    model: Any = Job
    for part in loc[:-1]:
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return "is not a field here; check the spelling."
    known = [f.alias or n for n, f in model.model_fields.items()]
    close = nearest(str(loc[-1]), known)
    if close:
        return f"is not a field here; did you mean {'.'.join(map(str, loc[:-1]))}.{close}?"
    return f"is not a field here; the fields are {', '.join(known)}."


class ManifestError(ConfigError):
    """A manifest field outside spec.training is wrong."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        ValueError.__init__(self, f"{field}: {message}")
