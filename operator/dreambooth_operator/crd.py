"""The DreamBoothJob and DreamBoothRuntime CRDs, generated from the typed models so the manifest, the CLI and
the trainer never disagree.

``spec.training`` is the union of the method models in ``MODELS`` (defaults only where all scripts agree);
the other spec sections come from ``dreambooth_api.manifest``, the status from ``status.JobStatus``, the
runtime's spec from ``dreambooth_api.runtime``. The sections a runtime can fill carry no schema defaults: a
default written into the job at create would be indistinguishable from the job's own value and always beat the
runtime (the operator applies the built-in defaults itself, under the runtime, and snapshots the result).
The schema is structural and uses nothing newer than apiextensions.k8s.io/v1 on Kubernetes 1.20 (no CEL).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from dreambooth_api.config import MODELS
from dreambooth_api.manifest import API_GROUP, API_VERSION, KIND, PLURAL, SHORT_NAME, JobSpec
from dreambooth_api.runtime import RUNTIME_KIND, RUNTIME_PLURAL, RUNTIME_SHORT_NAME, SECTIONS, RuntimeSpec

from .status import JobStatus

CRD_NAME = f"{PLURAL}.{API_GROUP}"
CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / f"{API_GROUP}_{PLURAL}.yaml"
RUNTIME_CRD_NAME = f"{RUNTIME_PLURAL}.{API_GROUP}"
RUNTIME_CRD_FILE = CRD_FILE.parent / f"{API_GROUP}_{RUNTIME_PLURAL}.yaml"

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Derived from the conditions."},
    {"name": "Step", "type": "integer", "jsonPath": ".status.step", "description": "Last optimizer step."},
    {"name": "Max", "type": "integer", "jsonPath": ".status.maxSteps", "description": "Total optimizer steps."},
    {"name": "Loss", "type": "number", "jsonPath": ".status.loss", "description": "Last training loss."},
    {"name": "ETA", "type": "string", "jsonPath": ".status.eta", "description": "Estimated time to completion."},
    {"name": "Last-Checkpoint", "type": "integer", "jsonPath": ".status.lastCheckpoint.step",
     "description": "Step of the newest durable checkpoint."},
    {"name": "Preemptions", "type": "integer", "jsonPath": ".status.preemptions",
     "description": "Attempts ended by preemption."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]  # fmt: skip

# Kubernetes quantities ("4", "16Gi") are ints or strings.
_QUANTITY = {"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}
_DROP = {"title", "additionalProperties", "$defs", "const", "exclusiveMinimum", "exclusiveMaximum", "anyOf", "$ref"}


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return node


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Turn pydantic's JSON Schema into an OpenAPI v3 structural schema the apiserver accepts."""
    node = _resolve(node, defs)
    out: dict[str, Any] = {}
    variants = node.get("anyOf")
    if variants:
        non_null = [_resolve(v, defs) for v in variants if v.get("type") != "null"]
        if len(non_null) < len(variants):
            out["nullable"] = True
        types = {v.get("type") for v in non_null}
        if types == {"integer", "string"}:
            # int | Literal["auto"]: int-or-string; minimum only constrains numbers, pattern only strings.
            out.update(copy.deepcopy(_QUANTITY))
            literals = [v["const"] for v in non_null if "const" in v] + [e for v in non_null for e in v.get("enum", [])]
            if literals:
                out["pattern"] = "^(" + "|".join(literals) + ")$"
        elif len(non_null) == 1:
            # Optional[X]: X's schema with the outer description/default.
            outer = {k: v for k, v in node.items() if k != "anyOf"}
            return {**out, **_structural({**non_null[0], **outer}, defs)}
        else:
            raise ValueError(f"no structural form for anyOf {variants}")
    for key, value in node.items():
        if key in _DROP or key == "default" and value is None:
            continue
        out[key] = value
    if "const" in node:
        out["enum"] = [node["const"]]
    if "exclusiveMinimum" in node:
        out["minimum"] = node["exclusiveMinimum"]
        out["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node:
        out["maximum"] = node["exclusiveMaximum"]
        out["exclusiveMaximum"] = True
    if out.get("type") == "object":
        if "properties" in node:
            out["properties"] = {k: _structural(v, defs) for k, v in node["properties"].items()}
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = _structural(extra, defs)
        elif extra is True or (extra is None and "properties" not in node):
            out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("type") == "array" and "items" in node:
        out["items"] = _structural(node["items"], defs)
    return out


def _model_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True)
    return _structural(raw, raw.get("$defs", {}))


def training_schema() -> dict[str, Any]:
    """spec.training: every flag of every script. A default only where all scripts that have it agree on it."""
    schemas = {method: _model_schema(model)["properties"] for method, model in MODELS.items()}
    props: dict[str, Any] = {}
    names = list(dict.fromkeys(name for schema in schemas.values() for name in schema))
    for name in names:
        having = {method: schema[name] for method, schema in schemas.items() if name in schema}
        prop = copy.deepcopy(next(iter(having.values())))
        defaults = {method: p.get("default") for method, p in having.items()}
        if len(having) < len(schemas):
            prop.pop("default", None)
            prop["description"] = f"({', '.join(having)} only) {prop.get('description', '')}".strip()
        if len(set(map(repr, defaults.values()))) > 1:
            prop.pop("default", None)
            each = ", ".join(f"{d!r} ({m})" for m, d in defaults.items())
            prop["description"] = f"{prop.get('description', '')} Default: {each}."
        props[name] = prop
    # The type allows any int; the trainer's rule (positive, or 'auto') belongs in the schema too.
    props["checkpointingSteps"]["minimum"] = 1
    required = sorted(
        set.intersection(*(set(m.model_json_schema(by_alias=True).get("required", [])) for m in MODELS.values()))
    )
    return {
        "type": "object",
        "description": (
            "Every trainer setting, and only here: the flags of train_dreambooth.py (method full), "
            "train_dreambooth_lora.py (method lora), train_dreambooth_lora_sdxl.py (method lora-sdxl) or "
            "train_dreambooth_lora_flux.py (method lora-flux) in camelCase, "
            "e.g. maxTrainSteps for --max_train_steps. "
            "Unknown names are kept so the operator can name them; editing this section of a running job is refused."
        ),
        "required": required,
        "properties": props,
        # Kept (not pruned) so a typo reaches the operator, which fails the job naming the field: 1.20 has no
        # server-side field validation and would otherwise drop it silently.
        "x-kubernetes-preserve-unknown-fields": True,
    }


def spec_schema() -> dict[str, Any]:
    spec = _model_schema(JobSpec)
    spec["description"] = "The desired run: what to train (training), where (storage, resources) and how (runPolicy)."
    props = spec["properties"]
    props["training"] = training_schema()
    _sections(props)
    spec["x-kubernetes-preserve-unknown-fields"] = True
    return spec


def _sections(props: dict[str, Any]) -> None:
    """The sections a runtime can fill: no defaults (the operator applies them), unknown keys kept for the
    did-you-mean, quantities as int-or-string."""
    for section in SECTIONS:
        props[section] = _strip_defaults(props[section])
        props[section]["x-kubernetes-preserve-unknown-fields"] = True
    for quantities in ("requests", "limits"):
        field = props["resources"]["properties"][quantities]
        field.pop("x-kubernetes-preserve-unknown-fields", None)
        field["additionalProperties"] = copy.deepcopy(_QUANTITY)


def runtime_spec_schema() -> dict[str, Any]:
    spec = _model_schema(RuntimeSpec)
    spec["description"] = (
        "Platform defaults for the DreamBoothJobs that use this runtime (spec.runtimeRef.name, or the runtime "
        "annotated dreambooth.dev/default-runtime=true): a job's own value always wins, maps and keyed lists merge "
        "(docs/runtime.md). Read when a job is accepted; later edits change new jobs only."
    )
    _sections(spec["properties"])
    spec["x-kubernetes-preserve-unknown-fields"] = True
    return spec


def _strip_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_strip_defaults(v) for v in node]
    return node


def status_schema() -> dict[str, Any]:
    # Only the operator writes status, always whole fields: server-side defaults there would only add noise.
    schema = _strip_defaults(_model_schema(JobStatus))
    schema["description"] = "Observed state, written only by the operator."
    schema["properties"]["conditions"]["items"]["required"] = ["type", "status"]
    return schema


def runtime_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": RUNTIME_CRD_NAME,
            "annotations": {"dreambooth.dev/generated-by": "dreambooth crd (do not edit by hand)"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Cluster",
            "names": {
                "kind": RUNTIME_KIND,
                "listKind": f"{RUNTIME_KIND}List",
                "plural": RUNTIME_PLURAL,
                "singular": RUNTIME_KIND.lower(),
                "shortNames": [RUNTIME_SHORT_NAME],
                "categories": ["dreambooth"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "additionalPrinterColumns": [
                        {
                            "name": "Default",
                            "type": "string",
                            "jsonPath": ".metadata.annotations.dreambooth\\.dev/default-runtime",
                            "description": "true: jobs without spec.runtimeRef use this runtime.",
                        },
                        {
                            "name": "Image",
                            "type": "string",
                            "jsonPath": ".spec.resources.image",
                            "description": "Trainer image for jobs that set none.",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],  # fmt: skip
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "Platform defaults for DreamBoothJobs, said once by a platform team: "
                            "image, tolerations, node selector, scheduler, queue, storage, resources, pod labels, "
                            "run-policy defaults.",
                            "properties": {
                                "apiVersion": {"type": "string", "description": f"{API_GROUP}/{API_VERSION}"},
                                "kind": {"type": "string", "description": RUNTIME_KIND},
                                "metadata": {"type": "object"},
                                "spec": runtime_spec_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "annotations": {"dreambooth.dev/generated-by": "dreambooth crd (do not edit by hand)"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT_NAME],
                "categories": ["all", "dreambooth"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A DreamBooth fine-tune of Stable Diffusion (full or LoRA) run as a gang "
                            "of torchrun pods that survives preemption by resuming from its last checkpoint.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": f"{API_GROUP}/{API_VERSION}"},
                                "kind": {"type": "string", "description": KIND},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def render_crd(runtime: bool = False) -> str:
    # The leading document marker: `helm show crds` concatenates the chart's CRD files as they are, and without it
    # `helm show crds ... | kubectl apply -f -` reads both CRDs as one document (the last one's keys win).
    header = "---\n# Generated by `dreambooth crd` from the typed models; do not edit by hand.\n"
    return header + yaml.safe_dump(runtime_crd() if runtime else crd(), sort_keys=False, width=120, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    """`dreambooth crd`: print a CRD, or write them (``--write`` = both files in crds/, or ``-o PATH``)."""
    parser = argparse.ArgumentParser(prog="dreambooth crd", description="Print the DreamBoothJob CRD (YAML).")
    parser.add_argument("-o", "--output", help="write to this file instead of stdout")
    parser.add_argument("--runtime", action="store_true", help="the DreamBoothRuntime CRD instead")
    parser.add_argument(
        "--write", action="store_true", help=f"write the repository's {CRD_FILE.name} and {RUNTIME_CRD_FILE.name}"
    )
    args = parser.parse_args(argv)
    if args.write:
        for target, runtime in ((CRD_FILE, False), (RUNTIME_CRD_FILE, True)):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(render_crd(runtime))
            print(f"wrote {target}", file=sys.stderr)
        return 0
    text = render_crd(args.runtime)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
