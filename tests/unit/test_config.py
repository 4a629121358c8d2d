"""The typed config: CLI and manifest agree, errors name the flag and the manifest field."""

from __future__ import annotations

import pytest

from dreambooth_api.config import (
    ConfigError,
    FullConfig,
    LoraConfig,
    config_hash,
    parse_training,
)
from dreambooth_api.manifest import ManifestError, parse_job
from dreambooth_trainer.cli_args import build_parser, parse_cli

pytestmark = pytest.mark.unit

REQUIRED = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "a sks dog"]
ARGV = [
    *REQUIRED,
    "--output_dir", "s3://b/run", "--resolution", "64", "--center_crop", "--train_batch_size", "2",
    "--max_train_steps", "40", "--learning_rate", "1e-4", "--lr_scheduler", "cosine", "--gradient_accumulation_steps", "2",
    "--seed", "3", "--mixed_precision", "bf16", "--gradient_checkpointing", "--checkpointing_steps", "10",
    "--checkpoints_total_limit", "2", "--resume_from_checkpoint", "latest", "--snr_gamma", "5.0",
    "--with_prior_preservation", "--class_data_dir", "c", "--class_prompt", "a dog", "--train_text_encoder",
]  # fmt: skip


@pytest.mark.parametrize("model", [FullConfig, LoraConfig])
def test_cli_and_manifest_give_the_same_config(model) -> None:
    from_cli = parse_cli(model, ARGV, "t")
    manifest = {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "DreamBoothJob",
        "metadata": {"name": "x"},
        "spec": {"method": model.method, "training": from_cli.to_training_spec()},
    }
    _, from_manifest = parse_job(manifest)
    assert from_manifest == from_cli
    assert "maxTrainSteps" in from_cli.to_training_spec()  # camelCase in the manifest
    assert parse_cli(model, from_cli.cli_args(), "t") == from_cli  # and the flags round-trip


def test_each_script_keeps_its_own_defaults() -> None:
    full = parse_cli(FullConfig, REQUIRED, "t")
    lora = parse_cli(LoraConfig, REQUIRED, "t")
    assert (full.learning_rate, full.output_dir) == (5e-6, "dreambooth-model")
    assert (lora.learning_rate, lora.output_dir, lora.rank, lora.validation_epochs) == (
        5e-4,
        "lora-dreambooth-model",
        4,
        50,
    )
    assert (lora.lora_dropout, lora.image_interpolation_mode) == (0.0, "lanczos")
    # Each script resizes training images its own way: the full one always bilinear, LoRA by the flag.
    assert (full.resize_interpolation, lora.resize_interpolation) == ("bilinear", "lanczos")
    assert not hasattr(lora, "validation_steps") and full.validation_steps == 100


@pytest.mark.parametrize(
    ("training", "field", "fix"),
    [
        ({"resolution": 500}, "--resolution (spec.training.resolution)", "use 496 or 504"),
        ({"maxTrainSteps": 0}, "--max_train_steps (spec.training.maxTrainSteps)", "greater than or equal to 1"),
        ({"maxTrainSteps": -5}, "--max_train_steps (spec.training.maxTrainSteps)", "greater than or equal to 1"),
        ({"withPriorPreservation": True}, "--class_data_dir (spec.training.classDataDir)", "is required"),
        (
            {"withPriorPreservation": True, "classDataDir": "c"},
            "--class_prompt (spec.training.classPrompt)",
            "is required",
        ),
        ({"rank": 8}, "--rank (spec.training.rank)", "only to method 'lora'"),
        ({"validationImages": ["a.png"]}, "--validation_images", "DeepFloyd IF"),
        ({"learningRat": 1e-4}, "--learning_rat ", "did you mean --learning_rate (spec.training.learningRate)?"),
        ({"zzzTop": 1}, "--zzz_top ", "check the spelling"),
        ({"trainTextEncoder": True, "preComputeTextEmbeddings": True}, "--pre_compute_text_embeddings", "drop one"),
        ({"lrScheduler": "steps"}, "--lr_scheduler (spec.training.lrScheduler)", "cosine"),
    ],
)
def test_bad_values_name_flag_field_and_fix(training: dict, field: str, fix: str) -> None:
    base = {"pretrainedModelNameOrPath": "m", "instanceDataDir": "d", "instancePrompt": "p"}
    with pytest.raises(ConfigError) as err:
        parse_training("full", {**base, **training})
    assert field in str(err.value) and fix in str(err.value)


def test_misspelt_cli_flags_get_the_nearest_real_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_cli(LoraConfig, [*REQUIRED, "--rnak", "8", "--seeds=3", "--zzz"], "t")
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "unrecognized arguments: --rnak 8 --seeds=3 --zzz" in err
    assert "did you mean: --rnak -> --rank, --seeds -> --seed?" in err


def test_missing_required_flag_names_it() -> None:
    with pytest.raises(ConfigError, match=r"--instance_prompt \(spec.training.instancePrompt\): is required"):
        parse_training("lora", {"pretrainedModelNameOrPath": "m", "instanceDataDir": "d"})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"runPolicy": {"backofLimit": 2}}, "spec.runPolicy.backofLimit: is not a field here; did you mean spec.runPolicy.backoffLimit?"),
        ({"resources": {"node": 2}}, "spec.resources.node: is not a field here; did you mean spec.resources.nodes?"),
        ({"podTemplat": {}}, "spec.podTemplat: is not a field here; did you mean spec.podTemplate?"),
        ({"storage": {"zzz": 1}}, "spec.storage.zzz: is not a field here; the fields are endpoint, region, pathStyle, credentialsSecret."),
    ],
)  # fmt: skip
def test_unknown_manifest_fields_name_the_nearest_real_one(spec: dict, message: str) -> None:
    training = {"pretrainedModelNameOrPath": "m", "instanceDataDir": "d", "instancePrompt": "p"}
    with pytest.raises(ManifestError) as err:
        parse_job({"apiVersion": "dreambooth.dev/v1alpha1", "kind": "DreamBoothJob",
                   "spec": {"training": training, **spec}})  # fmt: skip
    assert message in str(err.value)


def test_manifest_errors_name_the_path() -> None:
    with pytest.raises(ManifestError, match=r"spec.runPolicy.backoffLimit"):
        parse_job(
            {
                "apiVersion": "dreambooth.dev/v1alpha1",
                "kind": "DreamBoothJob",
                "spec": {"training": {}, "runPolicy": {"backoffLimit": -1}},
            }
        )
    with pytest.raises(ManifestError, match="apiVersion: must be dreambooth.dev/v1alpha1"):
        parse_job({"apiVersion": "v1", "kind": "DreamBoothJob", "spec": {}})


def test_config_hash_ignores_operational_settings_only() -> None:
    base = parse_cli(LoraConfig, REQUIRED, "t")
    same = parse_cli(
        LoraConfig,
        [*REQUIRED, "--output_dir", "elsewhere", "--checkpointing_steps", "7", "--gradient_checkpointing"],
        "t",
    )
    other = parse_cli(LoraConfig, [*REQUIRED, "--rank", "8"], "t")
    assert config_hash(base) == config_hash(same)
    assert config_hash(base) != config_hash(other)
    assert config_hash(base) != config_hash(parse_cli(FullConfig, REQUIRED, "t"))


def test_every_flag_has_help_and_parses() -> None:
    for model in (FullConfig, LoraConfig):
        parser = build_parser(model, "t")
        for action in parser._actions[1:]:
            assert action.help, f"{action.dest} has no help"
    assert parse_cli(FullConfig, [*REQUIRED, "--checkpointing_steps", "auto"], "t").checkpointing_steps == "auto"
