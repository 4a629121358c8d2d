"""Fused AdamW and torch.compile change every step's rounding: hashed once set, and settled before the hash so
that a new run takes the fast choice and a resumed run the one its checkpoints were trained with (issue 27)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dreambooth_api.config import FullConfig, LoraConfig, config_hash
from dreambooth_trainer import numerics
from dreambooth_trainer.storage import open_store

pytestmark = pytest.mark.unit

BASE = {"pretrained_model_name_or_path": "m", "instance_data_dir": "d", "instance_prompt": "p"}


def _cfg(**kw) -> FullConfig:
    return FullConfig(**BASE, **kw)


def _checkpoint(out: Path, step: int, cfg) -> None:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format": 3, "step": step, "configHash": config_hash(cfg)}))


def test_unset_choices_keep_the_hash_of_the_releases_before_them() -> None:
    # A hash written before these fields existed (the fixtures' checkpoints) must still match.
    plain = config_hash(_cfg())
    assert config_hash(_cfg(adam_fused=None, compile=None)) == plain
    for kw in ({"adam_fused": True}, {"adam_fused": False}, {"compile": True}, {"compile": False}):
        assert config_hash(_cfg(**kw)) != plain, kw
    assert config_hash(_cfg(compile=True)) != config_hash(_cfg(adam_fused=True))


def test_new_run_takes_fused_adamw_on_cuda_and_keeps_the_old_hash_on_cpu() -> None:
    cuda = numerics.settle(_cfg(), cuda=True, resume_hash=None)
    assert (cuda.adam_fused, cuda.compile) == (True, None)
    cpu = numerics.settle(_cfg(), cuda=False, resume_hash=None)
    assert config_hash(cpu) == config_hash(_cfg())
    assert numerics.use_fused_adam(cpu, "cpu") and not numerics.use_fused_adam(_cfg(), "cuda")
    assert numerics.use_fused_adam(cuda, "cuda") and not numerics.use_fused_adam(_cfg(adam_fused=False), "cpu")


@pytest.mark.parametrize(
    ("written_with", "device_cuda"),
    [
        ({}, True),
        ({"adam_fused": True}, False),
        ({"adam_fused": False, "compile": True}, True),
        ({"compile": True}, False),
    ],
)
def test_resume_keeps_the_choice_its_checkpoints_were_trained_with(tmp_path: Path, written_with, device_cuda) -> None:
    out = tmp_path / "out"
    written = _cfg(**written_with)
    _checkpoint(out, 2, written)
    _checkpoint(out, 4, written)
    store = open_store(str(out))
    assert numerics.checkpoint_hash(store, None) == config_hash(written)
    settled = numerics.settle(_cfg(), cuda=device_cuda, resume_hash=numerics.checkpoint_hash(store, "latest"))
    assert config_hash(settled) == config_hash(written)


def test_an_explicit_choice_is_kept_so_the_resume_refuses_it_by_name(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _checkpoint(out, 2, _cfg(adam_fused=False))
    resume_hash = numerics.checkpoint_hash(open_store(str(out)), "checkpoint-2")
    settled = numerics.settle(_cfg(adam_fused=True), cuda=True, resume_hash=resume_hash)
    assert settled.adam_fused is True and config_hash(settled) != resume_hash


def test_lora_and_flags_parse_from_the_cli() -> None:
    from dreambooth_trainer.cli_args import parse_cli

    cfg = parse_cli(LoraConfig, ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
                                 "--instance_prompt", "p", "--adam_fused", "false", "--compile"], "train-lora")  # fmt: skip
    assert (cfg.adam_fused, cfg.compile) == (False, True)
