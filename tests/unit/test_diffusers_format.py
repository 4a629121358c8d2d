"""The optimizer state of a diffusers-script checkpoint is keyed by position in the script's parameter order;
it must land on our parameters by NAME (LoRA A and B matrices often share a shape, so a positional slip would
load silently)."""

from __future__ import annotations

import pytest
import torch

from dreambooth_api.config import ConfigError
from dreambooth_trainer.checkpoint.diffusers_format import is_script_checkpoint, map_optimizer_state


def _opt(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=1e-3)


def test_moments_follow_the_name_not_the_position() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2, 2))  # equal shapes
    theirs = _opt([a, b])  # the script's order: lora_A, lora_B
    a.grad, b.grad = torch.full((2, 2), 1.0), torch.full((2, 2), -3.0)
    theirs.step()
    saved = theirs.state_dict()
    saved["param_groups"][0]["lr"] = 7e-4  # the scheduler's current LR travels with the checkpoint
    x, y = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2, 2))
    ours = _opt([y, x])  # ours in another order: B first
    mapped = map_optimizer_state(
        saved, ["unet.lora_A", "unet.lora_B"], ours.state_dict(), ["unet.lora_B", "unet.lora_A"], "t"
    )
    ours.load_state_dict(mapped)
    assert torch.equal(ours.state[y]["exp_avg"], theirs.state[b]["exp_avg"])
    assert torch.equal(ours.state[x]["exp_avg_sq"], theirs.state[a]["exp_avg_sq"])
    assert ours.param_groups[0]["lr"] == 7e-4


def test_a_checkpoint_of_another_parameter_count_is_refused() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    saved = _opt([p]).state_dict()
    with pytest.raises(ConfigError, match="holds 1 parameters"):
        map_optimizer_state(saved, ["unet.a", "unet.b"], saved, ["unet.a"], "ckpt")


def test_what_counts_as_a_script_checkpoint() -> None:
    assert is_script_checkpoint(["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "unet/config.json"])
    assert is_script_checkpoint(["optimizer.bin", "scheduler.bin", "pytorch_lora_weights.safetensors"])
    assert not is_script_checkpoint(["pytorch_lora_weights.safetensors", "training/unet.safetensors"])
