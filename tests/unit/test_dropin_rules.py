"""Issue #18, item 5: the scripts' refusals, warnings and accepted values, from the config alone."""

from __future__ import annotations

import pytest

from dreambooth_api.config import ConfigError, LoraConfig, parse_training
from dreambooth_trainer.compat import script_warnings

BASE = {"pretrainedModelNameOrPath": "m", "instanceDataDir": "d", "instancePrompt": "p"}


@pytest.mark.parametrize("report_to", ["wandb", "all"])
def test_a_hub_token_with_wandb_is_refused_as_the_scripts_do(report_to: str) -> None:
    with pytest.raises(ConfigError, match=r"--hub_token .*cannot be used with --report_to .*hf auth login"):
        parse_training("lora", {**BASE, "hubToken": "hf_x", "reportTo": report_to})
    parse_training("lora", {**BASE, "hubToken": "hf_x", "reportTo": "tensorboard"})


def test_values_the_scripts_accept_are_accepted() -> None:
    cfg = parse_training("lora", {**BASE, "checkpointsTotalLimit": 0, "numValidationImages": 0})
    assert cfg.checkpoints_total_limit == 0 and cfg.num_validation_images == 0


def test_class_flags_without_prior_preservation_warn() -> None:
    cfg = LoraConfig.model_validate({**BASE, "classDataDir": "c", "classPrompt": "a dog"})
    warnings = script_warnings(cfg)
    assert len(warnings) == 2 and all("without --with_prior_preservation" in w for w in warnings)
    assert script_warnings(LoraConfig.model_validate(BASE)) == []
