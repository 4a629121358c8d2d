"""The generated CRD: no drift from crds/, structural for apiserver 1.20, documented, defaults only where agreed."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic.alias_generators import to_camel

from dreambooth_api.config import MODELS
from dreambooth_operator import crd

pytestmark = pytest.mark.unit


def _schema() -> dict[str, Any]:
    return crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, value in (node.get("properties") or {}).items():
            out += _walk(value, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            out += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_file_in_crds_matches_generator() -> None:
    assert crd.CRD_FILE.exists(), "run `python -m dreambooth_operator.crd --write`"
    assert crd.CRD_FILE.read_text() == crd.render_crd(), (
        "crds/ is stale: regenerate with `python -m dreambooth_operator.crd --write` (never edit it by hand)"
    )


def test_generation_is_stable() -> None:
    assert crd.render_crd() == crd.render_crd()
    assert yaml.safe_load(crd.render_crd()) == crd.crd()


def test_names_and_subresources() -> None:
    spec = crd.crd()["spec"]
    assert spec["group"] == "dreambooth.dev"
    assert spec["names"]["plural"] == "dreamboothjobs"
    assert spec["names"]["kind"] == "DreamBoothJob"
    assert spec["names"]["shortNames"] == ["dbj"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"].upper() for c in version["additionalPrinterColumns"]]
    assert columns == ["PHASE", "STEP", "MAX", "LOSS", "ETA", "LAST-CHECKPOINT", "PREEMPTIONS", "AGE"]


def test_every_field_has_a_description() -> None:
    missing = [
        path for path, node in _walk(_schema()["properties"]["spec"], "spec")
        if path and not path.endswith(("[]", "{}")) and not node.get("description")
    ]  # fmt: skip
    missing += [
        path for path, node in _walk(_schema()["properties"]["status"], "status")
        if path and not path.endswith(("[]", "{}")) and not node.get("description")
    ]  # fmt: skip
    assert missing == []


def test_structural_for_apiserver_1_20() -> None:
    """Every node has a type (or int-or-string / preserve-unknown); nothing newer than 1.20 understands."""
    for path, node in _walk(_schema()):
        assert "x-kubernetes-validations" not in node, f"{path}: CEL is not available on 1.20"
        assert "$ref" not in node and "anyOf" not in node or node.get("x-kubernetes-int-or-string"), path
        assert "const" not in node and "title" not in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
            assert all(set(v) == {"type"} for v in node["anyOf"]), path
        else:
            assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        if node.get("type") == "object":
            assert not ("properties" in node and "additionalProperties" in node), path
        if "exclusiveMinimum" in node:
            assert isinstance(node["exclusiveMinimum"], bool), f"{path}: OpenAPI v3.0 form"


def test_training_is_the_union_of_every_script() -> None:
    training = _schema()["properties"]["spec"]["properties"]["training"]
    props = training["properties"]
    expected = {to_camel(n) for model in MODELS.values() for n in model.model_fields}
    assert set(props) == expected
    # The SDXL script takes --dataset_name in place of --instance_data_dir: the trainer requires one of them.
    assert training["required"] == ["instancePrompt", "pretrainedModelNameOrPath"]
    # Unknown names are kept so the operator can name the typo (1.20 would prune them silently).
    assert training["x-kubernetes-preserve-unknown-fields"] is True


def test_defaults_only_where_all_scripts_agree() -> None:
    props = _schema()["properties"]["spec"]["properties"]["training"]["properties"]
    for name, prop in props.items():
        snake = next(n for model in MODELS.values() for n in model.model_fields if to_camel(n) == name)
        fields = [model.model_fields.get(snake) for model in MODELS.values()]
        first = fields[0]
        agreed = (
            all(f is not None for f in fields)
            and first is not None
            and all(f is not None and f.default == first.default for f in fields)
            and first.default is not None
        )
        if agreed and first is not None and not first.is_required():
            assert prop.get("default") == first.default, name
        else:
            assert "default" not in prop, name
    assert "default" not in props["learningRate"] and "5e-06" in props["learningRate"]["description"]
    assert "1024 (lora-sdxl)" in props["resolution"]["description"]
    assert "default" not in props["outputDir"]
    assert "default" not in props["rank"] and props["rank"]["description"].startswith(
        "(lora, lora-sdxl, lora-flux only)"
    )
    assert props["useDora"]["description"].startswith("(lora-sdxl only)")
    assert props["validationSteps"]["description"].startswith("(full only)")


def test_types_enums_minimums() -> None:
    props = _schema()["properties"]["spec"]["properties"]["training"]["properties"]
    ck = props["checkpointingSteps"]
    assert ck["x-kubernetes-int-or-string"] is True and ck["pattern"] == "^(auto)$" and ck["minimum"] == 1
    assert props["lrScheduler"]["enum"][0] == "linear"
    assert props["mixedPrecision"]["enum"] == ["no", "fp16", "bf16"] and props["mixedPrecision"]["nullable"]
    assert props["resolution"]["minimum"] == 8
    assert props["learningRate"]["minimum"] == 0 and props["learningRate"]["exclusiveMinimum"] is True
    spec = _schema()["properties"]["spec"]
    assert spec["required"] == ["training"]
    assert spec["properties"]["method"]["enum"] == ["full", "lora", "lora-sdxl", "lora-flux"]
    assert spec["properties"]["resources"]["properties"]["nodes"]["minimum"] == 1
    quantity = spec["properties"]["resources"]["properties"]["limits"]["additionalProperties"]
    assert quantity["x-kubernetes-int-or-string"] is True


def test_no_schema_defaults_where_a_runtime_can_fill_in() -> None:
    """A default the apiserver writes into the job would read as the job's own value and beat every runtime:
    the sections a runtime fills carry none (the operator applies the built-in defaults, under the runtime)."""
    spec = _schema()["properties"]["spec"]["properties"]
    for section in ("storage", "resources", "podTemplate", "runPolicy", "hub"):
        defaulted = [path for path, node in _walk(spec[section], section) if "default" in node]
        assert defaulted == [], section
    assert spec["runtimeRef"]["properties"]["name"]["minLength"] == 1


def test_runtime_crd_is_cluster_scoped_with_the_job_sections() -> None:
    rt = crd.runtime_crd()["spec"]
    assert rt["scope"] == "Cluster" and rt["names"]["shortNames"] == ["dbr"]
    assert rt["names"]["kind"] == "DreamBoothRuntime" and rt["names"]["plural"] == "dreamboothruntimes"
    schema = rt["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert set(schema["properties"]) == {"storage", "resources", "podTemplate", "runPolicy", "hub"}
    assert "nodes" not in schema["properties"]["resources"]["properties"]  # the gang size is the job's
    assert not [path for path, node in _walk(schema, "spec") if "default" in node]
    assert crd.RUNTIME_CRD_FILE.read_text() == crd.render_crd(runtime=True), "regenerate: dreambooth crd --write"


def test_main_prints_and_writes(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert crd.main([]) == 0
    assert capsys.readouterr().out == crd.render_crd()
    out = tmp_path / "crd.yaml"
    assert crd.main(["-o", str(out)]) == 0
    assert out.read_text() == crd.render_crd()
