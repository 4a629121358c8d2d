"""Issue #18, item 4: `accelerate config` is honoured by the plain commands and never by a manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.trainer_utils import DOG, run_dreambooth, tiny_args, trainer_env

pytestmark = pytest.mark.integration


def _hf_home(tmp: Path, *, mixed_precision: str = "bf16", processes: int = 1) -> Path:
    """A machine where `accelerate config` was answered (accelerate reads $HF_HOME/accelerate/default_config.yaml)."""
    home = tmp / "hf"
    distributed = "MULTI_CPU" if processes > 1 else "'NO'"
    (home / "accelerate").mkdir(parents=True)
    (home / "accelerate" / "default_config.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\n"
        f"distributed_type: {distributed}\n"
        f"mixed_precision: {mixed_precision}\nnum_processes: {processes}\nnum_machines: 1\nuse_cpu: true\n"
    )
    return home


def _hash(out: Path) -> str:
    return json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["config_hash"]


def test_the_plain_command_applies_it_and_hashes_it_a_manifest_does_not(tmp_path: Path) -> None:
    env = trainer_env(HF_HOME=str(_hf_home(tmp_path)))
    out, plain = tmp_path / "cli", tmp_path / "plain"
    proc = run_dreambooth(["train-lora", *tiny_args(out, steps=1, ckpt=1, batch=1)], env=env)
    assert "mixed precision bf16" in proc.stderr and "default_config.yaml" in proc.stderr
    run_dreambooth(["train-lora", *tiny_args(plain, steps=1, ckpt=1, batch=1)])
    # The effective precision is part of the config hash: a changed config file is refused, not resumed.
    assert _hash(out) != _hash(plain)

    manifest = tmp_path / "job.yaml"
    training = {
        "pretrainedModelNameOrPath": "tiny://", "instanceDataDir": str(DOG), "instancePrompt": "a photo of sks dog",
        "outputDir": str(tmp_path / "run"), "resolution": 32, "trainBatchSize": 1, "maxTrainSteps": 1,
        "checkpointingSteps": 1, "seed": 7,
    }  # fmt: skip
    job = {"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamBoothJob", "metadata": {"name": "t"},
           "spec": {"method": "lora", "training": training, "resources": {"nodes": 1, "gpusPerNode": 0}}}  # fmt: skip
    manifest.write_text(json.dumps(job))
    proc = run_dreambooth(["run", str(manifest)], env=env)
    assert "mixed precision no" in proc.stderr, proc.stderr[-3000:]
    assert _hash(tmp_path / "run") == _hash(plain)


def test_more_than_one_process_prints_the_command_to_start_them(tmp_path: Path) -> None:
    env = trainer_env(HF_HOME=str(_hf_home(tmp_path, mixed_precision="no", processes=2)))
    args = tiny_args(tmp_path / "out", steps=1, ckpt=1, batch=1)
    proc = run_dreambooth(["train-lora", *args], env=env, check=False)
    assert proc.returncode == 64, proc.stderr[-3000:]
    assert "accelerate launch -m dreambooth_trainer train-lora --pretrained_model_name_or_path" in proc.stderr
    assert "torchrun --nproc_per_node 2 -m dreambooth_trainer train-lora" in proc.stderr
    assert not (tmp_path / "out").exists()
