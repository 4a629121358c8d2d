"""`dreambooth validate`: the operator's checks on manifest files, offline, exit 64 on the first bad one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dreambooth_cli import main

pytestmark = pytest.mark.unit
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def job(**spec: object) -> dict[str, object]:
    base = yaml.safe_load((EXAMPLES / "dog-lora.yaml").read_text())
    base["spec"].update(spec)
    return base


def write(tmp_path: Path, name: str, *docs: object) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs))
    return str(path)


def test_valid_files_pass_and_other_kinds_are_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}, "stringData": {"a": "b"}}
    files = [
        str(EXAMPLES / "dog-lora.yaml"),
        str(EXAMPLES / "spot-kueue.yaml"),
        write(tmp_path, "mix.yaml", secret, job()),
    ]
    assert main(["validate", *files]) == 0
    out = capsys.readouterr().out
    assert "dog-lora.yaml: valid" in out and "mix.yaml: valid (sks-dog" in out


def test_first_bad_file_exits_64_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = str(EXAMPLES / "dog-lora.yaml")
    typo = job()
    typo["spec"]["podTemplate"] = {"nodeSelektor": {"gpu": "a100"}}
    bad = write(tmp_path, "typo.yaml", typo)
    never = write(tmp_path, "never.yaml", job(resources={"gpusPerNode": 2, "limits": {"nvidia.com/gpu": 4}}))
    assert main(["validate", good, bad, never]) == 64
    captured = capsys.readouterr()
    assert "dog-lora.yaml: valid" in captured.out
    assert f"error: {bad}: spec.podTemplate.nodeSelektor" in captured.err and "nodeSelector" in captured.err
    assert "never.yaml" not in captured.out + captured.err  # stops at the first bad file


@pytest.mark.parametrize(
    ("spec", "field"),
    [({"podTemplate": {"labels": {"dreambooth.dev/job-uid": "x"}}}, 'spec.podTemplate.labels["dreambooth.dev/job-uid"]'),
     ({"podTemplate": {"env": [{"name": "AWS_ACCESS_KEY_ID", "value": "x"}]}}, "spec.podTemplate.env[0].name"),
     ({"resources": {"nodes": 300}}, "spec.resources.nodes"),
     ({"podTemplate": {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}}, "spec.podTemplate.volumes[0].hostPath")],
)  # fmt: skip
def test_operator_rules_apply_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], spec: dict[str, object], field: str
) -> None:
    assert main(["validate", write(tmp_path, "job.yaml", job(**spec))]) == 64
    assert f": {field}: " in capsys.readouterr().err


def test_the_clusters_limits_are_flags(tmp_path: Path) -> None:
    host = write(tmp_path, "host.yaml", job(podTemplate={"volumes": [{"name": "h", "hostPath": {"path": "/data"}}]}))
    assert main(["validate", "--pod-powers", "hostPath", host]) == 0
    assert main(["validate", "--pod-powers", "hostPaht", host]) == 64
    big = write(tmp_path, "big.yaml", job(resources={"nodes": 300}))
    assert main(["validate", "--max-nodes", "512", big]) == 0


def test_unreadable_input_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken.yaml").write_text("spec: [unclosed\n")
    for path in (str(tmp_path / "missing.yaml"), str(tmp_path / "broken.yaml"), str(tmp_path)):
        assert main(["validate", path]) == 64
    err = capsys.readouterr().err
    assert "does not exist" in err and "not valid YAML" in err and "is a directory" in err


def test_the_console_script_exit_code(tmp_path: Path) -> None:
    manifest = job()
    manifest["spec"]["training"]["outputDir"] = "runs/x"  # type: ignore[index]
    bad = write(tmp_path, "bad.yaml", manifest)
    run = subprocess.run(
        [sys.executable, "-m", "dreambooth_cli", "validate", bad], capture_output=True, text=True, check=False
    )
    assert run.returncode == 64 and "spec.training.outputDir: 'runs/x' is a relative path" in run.stderr
    # A rendered stream on stdin (kustomize build | dreambooth validate -).
    piped = subprocess.run(
        [sys.executable, "-m", "dreambooth_cli", "validate", "-"],
        input=Path(bad).read_text(), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert piped.returncode == 64 and "error: -: spec.training.outputDir" in piped.stderr


def test_the_kubectl_plugin_runs_it_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dreambooth_cli import kubectl_main

    bad = write(tmp_path, "bad.yaml", job(podTemplate={"labels": {"app.kubernetes.io/managed-by": "me"}}))
    monkeypatch.setattr(sys, "argv", ["kubectl-dbj", "validate", str(EXAMPLES / "dog-lora.yaml"), bad])
    assert kubectl_main() == 64
