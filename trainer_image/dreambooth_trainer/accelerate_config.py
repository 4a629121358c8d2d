"""`accelerate config`'s settings for the plain `dreambooth train` / `train-lora` commands.

`accelerate launch train_dreambooth.py` turns the machine's accelerate config file into environment variables
(`ACCELERATE_MIXED_PRECISION`, the process count) that the script's `Accelerator()` reads. A user who switches to
`dreambooth train` expects the same settings without the launcher, so the plain command reads the file itself;
under `accelerate launch` (or torchrun) the launcher's environment is used instead. Either way the effective
mixed precision lands in the config, hence in the config hash: a changed config file can never silently break an
exact resume. A manifest (`dreambooth run`, pods) never comes here: it means the same on every machine.

The default (`no`) is left as "not set", so the hash of a run without mixed precision is the one it always was.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from dreambooth_api.config import CommonConfig, ConfigError

logger = logging.getLogger(__name__)

_LAUNCHED = ("ACCELERATE_MIXED_PRECISION", "WORLD_SIZE", "LOCAL_RANK")
_UNSUPPORTED = ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA", "TPU")


def config_file() -> Path | None:
    """The file `accelerate config` writes and `accelerate launch` reads by default ($HF_HOME/accelerate/...)."""
    from accelerate.commands.config.config_args import default_config_file

    return Path(default_config_file) if os.path.isfile(default_config_file) else None


def read_settings(path: Path) -> dict[str, Any]:
    from accelerate.commands.config.config_args import load_config_from_file

    conf = load_config_from_file(str(path))
    distributed = getattr(conf, "distributed_type", None)
    return {
        "mixed_precision": str(getattr(conf, "mixed_precision", None) or "no"),
        "num_processes": int(getattr(conf, "num_processes", 1) or 1) * int(getattr(conf, "num_machines", 1) or 1),
        "distributed_type": str(getattr(distributed, "value", distributed) or "NO"),
    }


def launch_commands(command: str, argv: list[str], processes: int, mixed_precision: str | None) -> list[str]:
    args = shlex.join(argv)
    mp = f" --mixed_precision {mixed_precision}" if mixed_precision and "--mixed_precision" not in argv else ""
    return [
        f"accelerate launch -m dreambooth_trainer {command} {args}",
        f"torchrun --nproc_per_node {processes} -m dreambooth_trainer {command} {args}{mp}",
    ]


def apply(cfg: CommonConfig, command: str, argv: list[str]) -> CommonConfig:
    """The config with the effective mixed precision of `accelerate config` (or of the launcher) folded in."""
    if cfg.mixed_precision is not None:  # the flag wins, as with accelerate launch
        return cfg
    if any(k in os.environ for k in _LAUNCHED):
        mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        source = "the launcher's ACCELERATE_MIXED_PRECISION"
    else:
        path = config_file()
        if path is None:
            return cfg
        settings = read_settings(path)
        if settings["distributed_type"].upper() in _UNSUPPORTED:
            raise ConfigError(
                "mixed_precision",
                f"{path} configures {settings['distributed_type']}, which this trainer does not support; "
                "run `accelerate config` for multi-GPU (or no distribution), or pass --mixed_precision explicitly.",
            )
        if settings["num_processes"] > 1:
            mp = settings["mixed_precision"] if settings["mixed_precision"] != "no" else None
            cmds = "\n  ".join(launch_commands(command, argv, settings["num_processes"], mp))
            print(
                f"{path} configures {settings['num_processes']} processes; this command runs one. Start them with "
                f"one of:\n  {cmds}",
                file=sys.stderr,
            )
            raise ConfigError("mixed_precision", f"{path} asks for {settings['num_processes']} processes: see above.")
        mp = settings["mixed_precision"]
        source = str(path)
    if mp in ("no", ""):
        return cfg
    logger.info("mixed precision %s from %s (part of the config hash)", mp, source)
    return type(cfg).model_validate({**cfg.model_dump(), "mixed_precision": mp})
