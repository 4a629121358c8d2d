"""The docs a user follows: every relative link resolves, and the README reaches every guide."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pkg_support import REPO

pytestmark = pytest.mark.packaging

DOCS = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub-style heading anchors of a Markdown file."""
    out = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


CHART_README = REPO / "charts" / "dreambooth-operator" / "README.md"


@pytest.mark.parametrize(
    "path", [*DOCS, REPO / "README.md", REPO / "CHANGELOG.md", CHART_README], ids=lambda p: str(p.relative_to(REPO))
)
def test_relative_links_resolve(path: Path) -> None:
    for target in LINK.findall(path.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: broken link {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{path.name}: no heading #{anchor} in {dest.name}"


def test_readme_links_every_guide() -> None:
    readme = REPO / "README.md"
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in LINK.findall(readme.read_text())}
    missing = [p.name for p in DOCS if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_chart_readme_values_table_is_generated_from_the_schema() -> None:
    """Fix a failure with: python scripts/chart_readme.py"""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "chart_readme.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    schema = json.loads((REPO / "charts" / "dreambooth-operator" / "values.schema.json").read_text())
    for key in ("image", "rbac", "crds", "operator", "metrics"):
        assert key in schema["properties"]
        assert f"| `{key}." in CHART_README.read_text(), key


def test_readme_links_the_changelog_license_and_chart_readme() -> None:
    text = (REPO / "README.md").read_text()
    for target in ("CHANGELOG.md", "LICENSE", "charts/dreambooth-operator/README.md"):
        assert f"]({target})" in text, target
