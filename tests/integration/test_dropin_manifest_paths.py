"""Issue #18, item 7: a manifest's relative path that exists only next to the manifest is exit 64 naming both
locations and the command, instead of "does not exist"; paths from the current directory keep working."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.trainer_utils import DOG, REPO, trainer_env

pytestmark = pytest.mark.integration


def test_a_path_meant_from_the_manifests_folder_names_both_and_the_command(tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(DOG, project / "data" / "dog")
    manifest = project / "job.yaml"
    manifest.write_text(
        "apiVersion: dreambooth.dev/v1alpha1\nkind: DreamBoothJob\nmetadata: {name: t}\nspec:\n  method: lora\n"
        "  training:\n    pretrainedModelNameOrPath: tiny://\n    instanceDataDir: data/dog\n"
        "    instancePrompt: a photo of sks dog\n    outputDir: out\n    resolution: 32\n    maxTrainSteps: 1\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "dreambooth_trainer", "run", str(manifest)],
        capture_output=True, text=True, env=trainer_env(), cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 64, proc.stderr[-2000:]
    err = proc.stderr
    assert "spec.training.instanceDataDir" in err and str(REPO / "data" / "dog") in err
    assert str(project / "data" / "dog") in err and f"cd {project} && dreambooth run job.yaml" in err
    assert not (project / "out").exists() and not (REPO / "out").exists()
