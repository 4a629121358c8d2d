"""Bad input through the real CLI: exit 64 (bad input) with a message naming the flag or field and the fix,
before any model loads or any step runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tests.trainer_utils import DOG, REPO, trainer_env

pytestmark = pytest.mark.integration

BASE = ["--pretrained_model_name_or_path", "tiny://", "--instance_prompt", "a photo of sks dog",
        "--resolution", "32", "--train_batch_size", "1", "--max_train_steps", "2", "--seed", "1"]  # fmt: skip


def _cases(tmp: Path) -> dict[str, tuple[list[str], list[str], dict[str, str]]]:
    """name -> (argv after `dreambooth`, substrings stderr must hold, extra env)."""
    empty = tmp / "empty"
    empty.mkdir()
    junk = tmp / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    (junk / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but truncated")
    not_a_pipeline = tmp / "not-a-pipeline"
    not_a_pipeline.mkdir()
    (not_a_pipeline / "model.safetensors").write_bytes(b"{}")
    out = str(tmp / "out")
    good = ["--instance_data_dir", str(DOG), "--output_dir", out]
    prior = ["--with_prior_preservation", "--class_data_dir", str(tmp / "class"), "--class_prompt", "a photo of dog"]
    cases = {
        # Found by the config (no torch import).
        "resolution": (["train", *BASE, *good, "--resolution", "30"],
                       ["--resolution (spec.training.resolution): 30 is not a multiple of 8", "use 24 or 32"], {}),
        "prior-no-class-prompt": (["train", *BASE, *good, "--with_prior_preservation", "--class_data_dir", "c"],
                                  ["--class_prompt (spec.training.classPrompt): is required with --with_prior_preservation"], {}),
        "prior-no-class-dir": (["train-lora", *BASE, *good, "--with_prior_preservation", "--class_prompt", "dog"],
                               ["--class_data_dir (spec.training.classDataDir): is required with --with_prior_preservation"], {}),
        "zero-steps": (["train", *BASE, *good, "--max_train_steps", "0"],
                       ["--max_train_steps (spec.training.maxTrainSteps): must be greater than or equal to 1, not 0"], {}),
        "negative-epochs": (["train-lora", *BASE, *good, "--num_train_epochs", "-3"],
                            ["--num_train_epochs (spec.training.numTrainEpochs): must be greater than or equal to 1"], {}),
        "deepfloyd-if": (["train", *BASE, *good, "--class_labels_conditioning", "timesteps"],
                         ["--class_labels_conditioning (spec.training.classLabelsConditioning): applies only to DeepFloyd IF"], {}),
        # Found by the trainer's setup, before any model loads.
        "missing-instance-dir": (["train", *BASE, "--instance_data_dir", str(tmp / "nope"), "--output_dir", out],
                                 ["--instance_data_dir (spec.training.instanceDataDir)", "does not exist"], {}),
        "empty-instance-dir": (["train-lora", *BASE, "--instance_data_dir", str(empty), "--output_dir", out],
                               ["no images in", "--instance_data_dir (spec.training.instanceDataDir)", "add PNG/JPEG/WebP files"], {}),
        # A damaged image file is named at once (issue 17); with --skip_bad_images the folder holds none.
        "only-non-images": (["train", *BASE, "--instance_data_dir", str(junk), "--output_dir", out],
                            ["broken.png", "--skip_bad_images"], {}),
        "only-non-images-skipped": (["train", *BASE, "--instance_data_dir", str(junk), "--output_dir", out,
                                     "--skip_bad_images"], ["no images in", "notes.txt", "broken.png"], {}),
        "not-a-pipeline": (["train", *BASE, *good, "--pretrained_model_name_or_path", str(not_a_pipeline)],
                           ["--pretrained_model_name_or_path (spec.training.pretrainedModelNameOrPath)",
                            "is not a diffusers Stable Diffusion pipeline", "model_index.json"], {}),
        "hub-id-unreachable": (["train", *BASE, *good, "--pretrained_model_name_or_path", "no-such-org/no-such-model"],
                               ["--pretrained_model_name_or_path (spec.training.pretrainedModelNameOrPath)",
                                "could not be fetched from the Hub"], {"HF_HUB_OFFLINE": "1"}),
        "fp16-on-cpu": (["train", *BASE, *good, "--mixed_precision", "fp16"],
                        ["--mixed_precision (spec.training.mixedPrecision): fp16 needs a GPU; on CPU use bf16 or no"], {}),
        "prior-fp16-on-cpu": (["train", *BASE, *good, *prior, "--prior_generation_precision", "fp16"],
                              ["--prior_generation_precision (spec.training.priorGenerationPrecision): fp16 needs a GPU"], {}),
        "tracker-missing": (["train", *BASE, *good, "--report_to", "wandb"],
                            ["--report_to (spec.training.reportTo): wandb is not installed: `pip install wandb`"], {}),
    }  # fmt: skip
    if importlib.util.find_spec("bitsandbytes") is None:
        cases["8bit-adam-missing"] = (["train", *BASE, *good, "--use_8bit_adam"],
                                      ["--use_8bit_adam (spec.training.use8BitAdam): needs bitsandbytes", "pip install bitsandbytes"], {})  # fmt: skip
    if importlib.util.find_spec("xformers") is None:
        cases["xformers-missing"] = (["train-lora", *BASE, *good, "--enable_xformers_memory_efficient_attention"],
                                     ["needs xformers", "pip install xformers"], {})  # fmt: skip
    return cases


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dreambooth_trainer", *argv],
        capture_output=True, text=True, timeout=180, env=trainer_env(PROGRESS_PORT="off", **env), cwd=REPO,
    )  # fmt: skip


def test_each_bad_input_exits_64_naming_the_setting_before_any_work(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    # Each case is its own process, with an output of its own: two runs never share one (one writer per output);
    # two at a time keeps the wall time down on a 2-core machine.
    cases = {
        name: ([f"{a}-{name}" if a == out else a for a in argv], needles, env)
        for name, (argv, needles, env) in _cases(tmp_path).items()
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(cases, pool.map(lambda c: _run(c[0], c[2]), cases.values()), strict=True))
    failures = []
    for name, proc in results.items():
        argv, needles, _ = cases[name]
        err = proc.stderr
        problems = [f"exit {proc.returncode}, not 64"] if proc.returncode != 64 else []
        problems += [f"no {n!r}" for n in needles if n not in err]
        # Before any work: no weights were loaded and no step ran.
        problems += [f"did work: {w!r}" for w in ("Loading weights", "[dreambooth] step") if w in err]
        if problems:
            failures.append(f"{name}: {'; '.join(problems)}\n    stderr tail: {err[-600:]!r}")
    assert not failures, "\n".join(failures)
    assert not [p for p in tmp_path.glob("out-*/model_index.json")]


def test_non_image_files_are_skipped_with_a_warning_when_images_remain(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in sorted(DOG.iterdir())[:2]:
        (mixed / p.name).write_bytes(p.read_bytes())
    (mixed / "notes.txt").write_text("captions go elsewhere")
    (mixed / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    out = tmp_path / "out"
    proc = _run(["train-lora", *BASE, "--max_train_steps", "1", "--instance_data_dir", str(mixed),
                 "--output_dir", str(out), "--report_to", "none"], {})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping 1 non-image file(s)" in proc.stderr and "notes.txt" in proc.stderr
    assert ".DS_Store" not in proc.stderr  # dotfiles are never images: no noise about them
    assert (out / "pytorch_lora_weights.safetensors").is_file()
