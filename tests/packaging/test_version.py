"""One version everywhere: the package, the chart, the images it deploys, the CRD's default trainer image, the docs.

scripts/release.sh publishes VERSION only when the repository says VERSION in every one of these places; this
test fails as soon as one of them moves alone.
"""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml
from pkg_support import CHART, EXAMPLES, REPO, Helm, crd_openapi_schema, one

import dreambooth_operator
import dreambooth_trainer
from dreambooth_api.manifest import DEFAULT_IMAGE

pytestmark = pytest.mark.packaging

TRAINER_REPOSITORY = "ghcr.io/dreambooth-operator/trainer"
OPERATOR_REPOSITORY = "ghcr.io/dreambooth-operator/operator"
# Release-shaped references in prose: REGISTRY/operator:0.2.0, .../trainer:0.2.0-cpu, --version 0.2.0.
DOC_REFERENCE = re.compile(r"(?:/(?:operator|trainer):|--version[ =])(\d+\.\d+\.\d+)\b")


def _tag(image: str) -> str:
    return image.rsplit(":", 1)[1].removesuffix("-cpu")


def changelog_releases() -> list[str]:
    return re.findall(r"^## \[?(\d+\.\d+\.\d+)\]?", (REPO / "CHANGELOG.md").read_text(), re.M)


def versions(helm: Helm) -> dict[str, str]:
    """Where the version is written -> what it says there."""
    found = {
        "pyproject.toml [project] version": tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"],
        "dreambooth_trainer.__version__": dreambooth_trainer.__version__,
        "dreambooth_operator.__version__": dreambooth_operator.__version__,
    }
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    found["Chart.yaml version"] = str(chart["version"])
    found["Chart.yaml appVersion"] = str(chart["appVersion"])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    if values["image"]["tag"]:
        found["values.yaml image.tag"] = values["image"]["tag"]
    deployment = one(helm.template(), "Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith(OPERATOR_REPOSITORY + ":"), image
    found["the chart's default operator image"] = _tag(image)
    if values["operator"]["defaultTrainerImage"]:
        found["values.yaml operator.defaultTrainerImage"] = _tag(values["operator"]["defaultTrainerImage"])
    found["dreambooth_trainer.manifest.DEFAULT_IMAGE"] = _tag(DEFAULT_IMAGE)
    for example in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(example.read_text()):
            image = (doc or {}).get("spec", {}).get("resources", {}).get("image")
            if image and image.startswith(TRAINER_REPOSITORY):
                found[f"examples/{example.name} spec.resources.image"] = _tag(image)
    older = set(changelog_releases()[1:])
    for doc in ("docs/install.md", "README.md", "charts/dreambooth-operator/README.md", "Dockerfile"):
        for number, line in enumerate((REPO / doc).read_text().splitlines(), 1):
            for match in DOC_REFERENCE.finditer(line):
                # Upgrade notes name the releases they upgrade from.
                if match.group(1) in older and re.search("upgrad", line, re.I):
                    continue
                found[f"{doc}:{number} ({match.group(0)})"] = match.group(1)
    return found


def test_every_place_says_the_same_version(chart: Helm) -> None:
    found = versions(chart)
    release = found["pyproject.toml [project] version"]
    wrong = {where: v for where, v in found.items() if v != release}
    assert not wrong, (
        f"pyproject.toml says {release}, but: "
        + "; ".join(f"{where} says {v}" for where, v in wrong.items())
        + ". Bump them together (README.md, Releasing)."
    )
    # The image is no schema default (it would beat every DreamBoothRuntime): the operator applies it when it
    # accepts a job and keeps it in status.effectiveSpec, which is what a job keeps across upgrades.
    resources = crd_openapi_schema()["properties"]["spec"]["properties"]["resources"]
    assert "default" not in resources and "default" not in resources["properties"]["image"]


def test_changelog_starts_with_this_version() -> None:
    release = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    headings = changelog_releases()
    assert headings and headings[0] == release, f"CHANGELOG.md's first release is {headings[:1]}, not {release}"
    assert "0.1.0" in headings


def test_the_check_catches_one_place_moving_alone(chart: Helm, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is live: the trainer's version bumped alone is reported by name."""
    monkeypatch.setattr(dreambooth_trainer, "__version__", "9.9.9")
    with pytest.raises(AssertionError, match=r"dreambooth_trainer.__version__ says 9\.9\.9"):
        test_every_place_says_the_same_version(chart)
