"""Every example manifest is one a user can apply as it is (after the lines marked CHANGE).

Each DreamBoothJob is checked three ways: against the generated CRD's openAPIV3Schema (as the apiserver would,
with unknown fields refused where the schema does not preserve them), by the trainer's own ``parse_job``, and by
the operator's ``spec.validate`` plus its pod/Service/ConfigMap builders, whose output must pass
kubernetes-validate (laid over the DreamBoothRuntime of the same file, if any, as the operator would). A
DreamBoothRuntime passes the operator's runtime checks; the other objects in the examples (Secret,
ServiceAccount) pass kubernetes-validate.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pkg_support import EXAMPLES, KUBE_VERSIONS, crd_openapi_schema

from dreambooth_api.manifest import KIND, parse_job
from dreambooth_api.runtime import RUNTIME_KIND, parse_runtime, runtime_spec_set
from dreambooth_operator import resources, spec

pytestmark = pytest.mark.packaging

FILES = sorted(EXAMPLES.glob("*.yaml"))
# The quickstart runs on this machine (`dreambooth run`): its relative paths are refused by the operator on purpose.
LOCAL_ONLY = {"quickstart.yaml"}
# What the issue promises, by file name.
EXPECTED = {
    "quickstart.yaml", "dog-full.yaml", "dog-lora.yaml", "prior-preservation.yaml", "multi-node.yaml",
    "spot-kueue.yaml", "s3-secret-minio.yaml", "irsa-service-account.yaml", "sdxl-lora.yaml", "flux-lora.yaml",
    "platform-runtime.yaml",
}  # fmt: skip


def to_json_schema(node: Any) -> Any:
    """OpenAPI v3 (structural, as in a CRD) → JSON Schema draft 4, which shares its boolean exclusiveMinimum.

    ``nullable`` becomes "or null"; an object with properties and neither x-kubernetes-preserve-unknown-fields
    nor additionalProperties refuses unknown fields, as strict server-side field validation does.
    """
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if (
        "properties" in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in node
    ):
        out["additionalProperties"] = False
    if node.get("nullable"):
        return {"anyOf": [out, {"type": "null"}]}
    return out


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Draft4Validator:
    schema = to_json_schema(crd_openapi_schema())
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def docs_of(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def jobs_of(path: Path) -> list[dict[str, Any]]:
    return [d for d in docs_of(path) if d.get("kind") == KIND]


def test_the_promised_examples_exist() -> None:
    assert {p.name for p in FILES} >= EXPECTED


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_matches_the_crd_schema_and_the_trainer_config(
    path: Path, crd_validator: jsonschema.Draft4Validator
) -> None:
    jobs = jobs_of(path)
    assert len(jobs) == 1, f"{path.name}: one DreamBoothJob per example"
    job = jobs[0]
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator.iter_errors(job)]
    assert not errors, f"{path.name} does not match the CRD schema:\n" + "\n".join(errors)
    parse_job(job)


def test_the_checks_are_not_rubber_stamps(crd_validator: jsonschema.Draft4Validator) -> None:
    """The converted schema refuses what the apiserver refuses (types, enums, minimums, required fields)."""
    job = jobs_of(EXAMPLES / "dog-lora.yaml")[0]
    for mutate in (
        lambda j: j["spec"].update(method="sdxl"),
        lambda j: j["spec"]["resources"].update(nodes=0),
        lambda j: j["spec"]["training"].update(checkpointingSteps="often"),
        lambda j: j["spec"]["training"].pop("instancePrompt"),
        lambda j: j.pop("spec"),
    ):
        bad = copy.deepcopy(job)
        mutate(bad)
        assert not crd_validator.is_valid(bad)
    # The CRD preserves unknown fields under spec on purpose (1.20 would prune them silently); a typo there is
    # refused by parse_job, which the operator runs before creating anything.
    typo = copy.deepcopy(job)
    typo["spec"]["storage"] = {"credentialSecret": "minio"}
    assert crd_validator.is_valid(typo)
    with pytest.raises(ValueError, match="spec.storage.credentialSecret"):
        parse_job(typo)


@pytest.mark.parametrize("path", [p for p in FILES if p.name not in LOCAL_ONLY], ids=lambda p: p.name)
def test_operator_accepts_example_and_builds_valid_objects(path: Path) -> None:
    body = copy.deepcopy(jobs_of(path)[0])
    body["metadata"].update(namespace="team-a", uid="0f0e0d0c-0b0a-4000-8000-000000000001")
    runtimes = [runtime_spec_set(parse_runtime(d)[1]) for d in docs_of(path) if d.get("kind") == RUNTIME_KIND]
    job = spec.validate(body, base=runtimes[0] if runtimes else None)
    objects = [resources.build_configmap(job), resources.build_service(job), *resources.build_gang(job, attempt=1)]
    assert len(objects) == 2 + job.spec.resources.nodes
    for obj in objects:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_other_objects_in_examples_are_valid_kubernetes(path: Path) -> None:
    for doc in docs_of(path):
        if doc.get("kind") == KIND:
            continue
        if doc.get("kind") == RUNTIME_KIND:
            spec.validate_runtime(doc)
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("path", [p for p in FILES if p.name not in LOCAL_ONLY], ids=lambda p: p.name)
def test_example_marks_what_the_user_must_change(path: Path) -> None:
    text = path.read_text()
    assert "# CHANGE" in text, f"{path.name}: mark the lines a user must edit with '# CHANGE'"
    # Every s3:// path and the image are placeholders a user must replace.
    for line in text.splitlines():
        if ("s3://" in line or "image:" in line) and not line.lstrip().startswith("#"):
            assert "CHANGE" in line, f"{path.name}: placeholder without a CHANGE mark: {line.strip()}"


def test_examples_can_be_applied_side_by_side() -> None:
    """Distinct job names and output prefixes: a prefix is owned by one job, so a copy-paste clash would fail."""
    jobs = [jobs_of(p)[0] for p in FILES]
    names = [j["metadata"]["name"] for j in jobs]
    outputs = [j["spec"]["training"]["outputDir"] for j in jobs]
    assert len(set(names)) == len(names), names
    assert len(set(outputs)) == len(outputs), outputs


def test_secret_example_is_wired_to_its_job() -> None:
    docs = docs_of(EXAMPLES / "s3-secret-minio.yaml")
    secret = next(d for d in docs if d["kind"] == "Secret")
    job = next(d for d in docs if d["kind"] == KIND)
    assert job["spec"]["storage"]["credentialsSecret"] == secret["metadata"]["name"]
    assert set(secret["stringData"]) == set(resources.CREDENTIAL_ENV)
    assert job["spec"]["storage"]["pathStyle"] is True and job["spec"]["storage"]["endpoint"]


def test_irsa_example_is_wired_to_its_job() -> None:
    docs = docs_of(EXAMPLES / "irsa-service-account.yaml")
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    job = next(d for d in docs if d["kind"] == KIND)
    assert job["spec"]["podTemplate"]["serviceAccountName"] == sa["metadata"]["name"]
    assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]
    assert not job["spec"]["storage"].get("credentialsSecret")
