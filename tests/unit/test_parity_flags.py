"""Every flag of diffusers' DreamBooth scripts exists here with the same name and default, each script its own.

The tables are written from the scripts' ``parse_args`` (examples/dreambooth/train_dreambooth.py and
train_dreambooth_lora.py), never derived from our config: a changed default in config.py fails here. REQUIRED
marks ``required=True`` flags.

Upstream source of the tables: the newest copy of both scripts reachable from here, ``check_min_version(
"0.37.0.dev0")``, in the diffusers fork ChrisColeTech/diffusers at commit 725959a41dab7fe82d92cac23db7f6e469cca971
(a fork's copy of main, with no local edits seen in parse_args; the pinned 0.42.1 sdist ships no examples and
huggingface/diffusers itself is indexed here only at its 0.22-era commit). Changes since 0.22 that these tables record: train_dreambooth.py's output_dir
default became ``dreambooth-model`` (0.25 already had it), and train_dreambooth_lora.py gained ``--lora_dropout``
and ``--image_interpolation_mode`` (default lanczos; the full script still resizes with bilinear).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dreambooth_api.config import IF_ONLY_FIELDS, ConfigError, FullConfig, LoraConfig, parse_training
from dreambooth_trainer.cli_args import build_parser

pytestmark = pytest.mark.unit

REQUIRED = object()
DOCS = Path(__file__).resolve().parents[2] / "docs" / "flags.md"

# Flags both scripts declare with the same default.
_SHARED = {
    "pretrained_model_name_or_path": REQUIRED,
    "revision": None,
    "variant": None,
    "tokenizer_name": None,
    "instance_data_dir": REQUIRED,
    "class_data_dir": None,
    "instance_prompt": REQUIRED,
    "class_prompt": None,
    "with_prior_preservation": False,
    "prior_loss_weight": 1.0,
    "num_class_images": 100,
    "seed": None,
    "resolution": 512,
    "center_crop": False,
    "train_text_encoder": False,
    "train_batch_size": 4,
    "sample_batch_size": 4,
    "num_train_epochs": 1,
    "max_train_steps": None,
    "checkpointing_steps": 500,
    "checkpoints_total_limit": None,
    "resume_from_checkpoint": None,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False,
    "scale_lr": False,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 500,
    "lr_num_cycles": 1,
    "lr_power": 1.0,
    "use_8bit_adam": False,
    "dataloader_num_workers": 0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 1e-2,
    "adam_epsilon": 1e-08,
    "max_grad_norm": 1.0,
    "push_to_hub": False,
    "hub_token": None,
    "hub_model_id": None,
    "logging_dir": "logs",
    "allow_tf32": False,
    "report_to": "tensorboard",
    "validation_prompt": None,
    "num_validation_images": 4,
    "mixed_precision": None,
    "prior_generation_precision": None,
    "local_rank": -1,
    "enable_xformers_memory_efficient_attention": False,
    "pre_compute_text_embeddings": False,
    "tokenizer_max_length": None,
    "text_encoder_use_attention_mask": False,
    "validation_images": None,
    "class_labels_conditioning": None,
}

TRAIN_DREAMBOOTH = {
    **_SHARED,
    "output_dir": "dreambooth-model",
    "learning_rate": 5e-6,
    "validation_steps": 100,
    "set_grads_to_none": False,
    "offset_noise": False,
    "snr_gamma": None,
    "skip_save_text_encoder": False,
    "validation_scheduler": "DPMSolverMultistepScheduler",
}

TRAIN_DREAMBOOTH_LORA = {
    **_SHARED,
    "output_dir": "lora-dreambooth-model",
    "learning_rate": 5e-4,
    "validation_epochs": 50,
    "rank": 4,
    "lora_dropout": 0.0,
    "image_interpolation_mode": "lanczos",
}

# The flags whose upstream declaration has ``choices``, with them (torchvision's InterpolationMode names for
# image_interpolation_mode). lr_scheduler and report_to take any string there.
CHOICES = {
    "full": {
        "mixed_precision": ["no", "fp16", "bf16"],
        "prior_generation_precision": ["no", "fp32", "fp16", "bf16"],
        "validation_scheduler": ["DPMSolverMultistepScheduler", "DDPMScheduler"],
    },
    "lora": {
        "mixed_precision": ["no", "fp16", "bf16"],
        "prior_generation_precision": ["no", "fp32", "fp16", "bf16"],
        "image_interpolation_mode": ["bicubic", "bilinear", "box", "hamming", "lanczos", "nearest", "nearest_exact"],
    },
}

# Settings that are ours, not the scripts' (each keeps the script's behaviour at its default).
OURS = {"skip_bad_images": False, "allow_large_resolution": False, "unsafe_shared_output": False,
        "adam_fused": None, "compile": None}  # fmt: skip
EXTENSIONS = {
    "full": {"cache_latents": False, "expected_preemption_interval_seconds": 3600.0, **OURS},
    "lora": {"cache_latents": False, "expected_preemption_interval_seconds": 3600.0, "snr_gamma": None, **OURS},
}

CASES = [(FullConfig, TRAIN_DREAMBOOTH, "full"), (LoraConfig, TRAIN_DREAMBOOTH_LORA, "lora")]


def _default(model, name):
    info = model.model_fields[name]
    return REQUIRED if info.is_required() else info.get_default(call_default_factory=True)


@pytest.mark.parametrize(("model", "table", "method"), CASES, ids=["train_dreambooth", "train_dreambooth_lora"])
def test_every_script_flag_exists_with_the_scripts_default(model, table, method) -> None:
    ours = set(model.model_fields)
    missing = sorted(set(table) - ours)
    assert not missing, f"flags of {model.script} missing from {model.__name__}: {missing}"
    extra = sorted(ours - set(table) - set(EXTENSIONS[method]))
    assert not extra, (
        f"{model.__name__} has settings that are neither {model.script}'s nor declared extensions: {extra}"
    )
    wrong = {
        n: (_default(model, n), d)
        for n, d in table.items()
        if _default(model, n) != d or (d is REQUIRED) != (_default(model, n) is REQUIRED)
    }
    assert not wrong, f"defaults differ from {model.script} (ours, diffusers'): {wrong}"
    for name, default in EXTENSIONS[method].items():
        assert _default(model, name) == default, f"extension {name} must default to the script's behaviour"


@pytest.mark.parametrize(("model", "table", "method"), CASES, ids=["train_dreambooth", "train_dreambooth_lora"])
def test_cli_takes_the_scripts_flag_spellings(model, table, method) -> None:
    parser = build_parser(model, "x")
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {f"--{n}" for n in table} <= flags


@pytest.mark.parametrize("method", ["full", "lora"])
def test_cli_offers_the_scripts_choices(method) -> None:
    model = FullConfig if method == "full" else LoraConfig
    choices = {a.dest: a.choices for a in build_parser(model, "x")._actions if a.choices}
    # No other flag is narrowed to a list the script does not have.
    assert set(choices) == set(CHOICES[method]) | {"lr_scheduler"}
    for name, expected in CHOICES[method].items():
        assert sorted(choices[name]) == sorted(expected), name
    # The scripts' free-text lr_scheduler: ours lists the names diffusers' get_scheduler builds without step rules.
    assert set(choices["lr_scheduler"]) == {
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    }  # fmt: skip


def test_each_script_keeps_its_own_flags() -> None:
    only_full = {
        "validation_steps",
        "validation_scheduler",
        "set_grads_to_none",
        "offset_noise",
        "skip_save_text_encoder",
    }
    only_lora = {"validation_epochs", "rank", "lora_dropout", "image_interpolation_mode"}
    assert only_full.isdisjoint(LoraConfig.model_fields) and only_lora.isdisjoint(FullConfig.model_fields)
    with pytest.raises(ConfigError, match=r"--rank \(spec.training.rank\): applies only to method 'lora'"):
        parse_training(
            "full", {"pretrainedModelNameOrPath": "m", "instanceDataDir": "d", "instancePrompt": "p", "rank": 8}
        )


@pytest.mark.parametrize("name", IF_ONLY_FIELDS)
def test_deepfloyd_if_flags_are_refused_with_a_clear_message(name) -> None:
    value = ["img.png"] if name == "validation_images" else "timesteps"
    training = {"pretrainedModelNameOrPath": "m", "instanceDataDir": "d", "instancePrompt": "p", name: value}
    with pytest.raises(ConfigError, match=rf"--{name} \(spec.training.\w+\): applies only to DeepFloyd IF"):
        parse_training("full", training)


@pytest.mark.parametrize(("model", "table", "method"), CASES, ids=["train_dreambooth", "train_dreambooth_lora"])
def test_docs_flags_table_lists_every_setting(model, table, method) -> None:
    """docs/flags.md (linked from the README) has one row per setting, with its manifest field and default."""
    text = DOCS.read_text()
    section = text.split(f"## `dreambooth {'train' if method == 'full' else 'train-lora'}`", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `--(\w+)` \|.*$", section, flags=re.M)}
    assert set(rows) == set(model.model_fields), sorted(set(rows) ^ set(model.model_fields))
    for name, info in model.model_fields.items():
        assert f"`spec.training.{info.alias}`" in rows[name], name
