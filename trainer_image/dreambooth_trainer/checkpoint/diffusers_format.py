"""Resuming from a checkpoint written by diffusers' train_dreambooth.py / train_dreambooth_lora.py.

Those scripts call accelerate's `save_state`: `optimizer.bin` and `scheduler.bin` (torch.save of the state
dicts), `random_states_0.pkl`, `scaler.pt` (fp16), and, through their save hooks, `unet/` (+ `text_encoder/`)
in `save_pretrained` layout (full) or `pytorch_lora_weights.safetensors` (LoRA). The optimizer's state is keyed by
POSITION in the script's `params_to_optimize`: the UNet's parameters then the text encoder's (full: all of
them; LoRA: those that require grad). LoRA A and B matrices often share a shape, so a positional mistake would load
silently: the moments are mapped by parameter NAME, the script's order rebuilt from the same modules.

Their global RNG state does not map onto this trainer's per-step generators, so such a resume is exact in
weights, optimizer and scheduler, and bit-exact from our next checkpoint on. Our checkpoints are written beside
theirs; theirs are never touched (foreign.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dreambooth_api.config import ConfigError

from ..storage import Store
from .foreign import Kind, classify, files_of, foreign_checkpoints
from .layout import _CKPT

logger = logging.getLogger(__name__)


def is_script_checkpoint(files: list[str]) -> bool:
    weights = "pytorch_lora_weights.safetensors" in files or any(f.startswith("unet/") for f in files)
    return "optimizer.bin" in files and "scheduler.bin" in files and weights


def requested_step(store: Store, request: str | None, newest_ours: int | None) -> int | None:
    """The step of the diffusers-script checkpoint `--resume_from_checkpoint` asks for, or None (then our own
    resume rules apply). `latest` takes theirs only when it is newer than our newest; no flag never takes
    theirs (the scripts resume only when asked)."""
    if request is None:
        return None
    if request == "latest":
        theirs = [s for s in foreign_checkpoints(store) if is_script_checkpoint(files_of(store, f"checkpoint-{s}"))]
        if theirs and (newest_ours is None or theirs[-1] > newest_ours):
            return theirs[-1]
        return None
    m = _CKPT.match(Path(request).name)
    if not m:
        return None
    name = f"checkpoint-{m.group(1)}"
    if classify(store, name) is not Kind.FOREIGN:
        return None
    if not is_script_checkpoint(files_of(store, name)):
        raise ConfigError(
            "resume_from_checkpoint",
            f"{store.url(name)} is neither this trainer's checkpoint (no manifest.json) nor one of diffusers' "
            "scripts (optimizer.bin, scheduler.bin and unet/ or pytorch_lora_weights.safetensors); name another "
            "checkpoint or 'latest'.",
        )
    return int(m.group(1))


def fetch(store: Store, step: int, cache: Path) -> Path:
    root = store.local_root()
    if root is not None:
        return root / f"checkpoint-{step}"
    return store.sync_down(f"checkpoint-{step}", cache / f"checkpoint-{step}")


def script_param_names(method: str, trained: list[tuple[str, torch.nn.Module]]) -> list[str]:
    """The names of the script's `params_to_optimize`, in its order."""
    return [
        f"{prefix}.{n}"
        for prefix, mod in trained
        for n, p in mod.named_parameters()
        if method == "full" or p.requires_grad
    ]


def map_optimizer_state(
    saved: dict[str, Any], script_names: list[str], ours: dict[str, Any], our_names: list[str], where: str
) -> dict[str, Any]:
    """`saved` (the script's optimizer state dict, by position in `script_names`) as a state dict for our
    optimizer (by position in `our_names`), matched by name; hyperparameters other than the LR stay ours."""
    positions = [i for g in saved["param_groups"] for i in g["params"]]
    if len(positions) != len(script_names):
        raise ConfigError(
            "resume_from_checkpoint",
            f"{where}: its optimizer holds {len(positions)} parameters, this run's model {len(script_names)} in the "
            "script's order; resume it with the model, method and --rank/--train_text_encoder it was trained with.",
        )
    by_name = {script_names[pos]: saved["state"].get(idx) for pos, idx in enumerate(positions)}
    our_positions = [i for g in ours["param_groups"] for i in g["params"]]
    state: dict[int, Any] = {}
    for pos, idx in enumerate(our_positions):
        name = our_names[pos]
        if name not in by_name:
            raise ConfigError("resume_from_checkpoint", f"{where}: no optimizer state for parameter {name}.")
        if by_name[name] is not None:
            state[idx] = by_name[name]
    theirs = saved["param_groups"][0]
    groups = []
    for g in ours["param_groups"]:
        g = dict(g)
        for key in ("lr", "initial_lr"):
            if key in theirs:
                g[key] = theirs[key]
        groups.append(g)
    return {"state": state, "param_groups": groups}


def load_weights(folder: Path, method: str, trained: list[tuple[str, torch.nn.Module]]) -> None:
    """The scripts' load hooks, applied to our modules."""
    if method == "lora":
        from diffusers import StableDiffusionPipeline
        from diffusers.training_utils import _set_state_dict_into_text_encoder
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict

        lora, _ = StableDiffusionPipeline.lora_state_dict(str(folder))
        mods = dict(trained)
        unet_sd = {k.removeprefix("unet."): v for k, v in lora.items() if k.startswith("unet.")}
        set_peft_model_state_dict(mods["unet"], convert_unet_state_dict_to_peft(unet_sd), adapter_name="default")
        if "text_encoder" in mods:
            _set_state_dict_into_text_encoder(lora, prefix="text_encoder.", text_encoder=mods["text_encoder"])
        return
    for prefix, mod in trained:
        if not (folder / prefix).is_dir():
            raise ConfigError(
                "resume_from_checkpoint", f"{folder} has no {prefix}/ folder for the {prefix} that trains."
            )
        loaded = type(mod).from_pretrained(folder / prefix)
        mod.load_state_dict(loaded.state_dict())
        del loaded


def restore(
    folder: Path,
    *,
    method: str,
    trained: list[tuple[str, torch.nn.Module]],
    optimizer: Any,
    lr_scheduler: Any,
    scaler: Any,
    where: str,
) -> None:
    """Weights, optimizer moments (by name), LR scheduler and grad scaler from a script's checkpoint."""
    load_weights(folder, method, trained)
    saved = torch.load(folder / "optimizer.bin", map_location="cpu", weights_only=True)
    our_names = [f"{prefix}.{n}" for prefix, mod in trained for n, p in mod.named_parameters() if p.requires_grad]
    optimizer.load_state_dict(
        map_optimizer_state(saved, script_param_names(method, trained), optimizer.state_dict(), our_names, where)
    )
    lr_scheduler.load_state_dict(torch.load(folder / "scheduler.bin", map_location="cpu", weights_only=True))
    if scaler is not None and (folder / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(folder / "scaler.pt", map_location="cpu", weights_only=True))
