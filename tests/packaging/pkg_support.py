"""Packaging tier helpers (imported by the tests and conftest.py): the real helm (from the PyPI wheel, via the
cluster harness's tools.py), rendering, the CRD.

``tools.py`` is loaded by file path rather than as ``k8s_harness.tools``: it imports only the standard library,
so this tier does not depend on the rest of the cluster harness.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dreambooth-operator"
CRD_FILE = REPO / "crds" / "dreambooth.dev_dreamboothjobs.yaml"
EXAMPLES = REPO / "examples"
KUBE_VERSIONS = ("1.29.0", "1.34.0")


def load_tools() -> Any:
    spec = importlib.util.spec_from_file_location("_k8s_tools", REPO / "tests" / "cluster" / "k8s_harness" / "tools.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Helm:
    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(self.binary), *args], capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def template(self, *args: str, release: str = "dbo", namespace: str = "dreambooth-system") -> list[dict[str, Any]]:
        out = self.run("template", release, str(CHART), "--namespace", namespace, *args).stdout
        return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def crd_openapi_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_FILE.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]
