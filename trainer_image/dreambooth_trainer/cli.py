"""The trainer's commands: train, train-lora, run, tiny-model (`dreambooth` adds crd, operator, validate: dreambooth_cli)."""

from __future__ import annotations

import sys

from dreambooth_api.config import CommonConfig, ConfigError, FluxLoraConfig, FullConfig, LoraConfig, SdxlLoraConfig
from dreambooth_api.contract import EXIT_BAD_INPUT

from .logs import setup_logging

USAGE = """usage: dreambooth COMMAND [ARGS]

commands:
  train        DreamBooth full fine-tune with train_dreambooth.py's flags and defaults
  train-lora   DreamBooth LoRA with train_dreambooth_lora.py's flags and defaults
  train-lora-sdxl
               SDXL DreamBooth LoRA with train_dreambooth_lora_sdxl.py's flags and defaults
  train-lora-flux
               Flux DreamBooth LoRA with train_dreambooth_lora_flux.py's flags and defaults
  run          run a DreamBoothJob manifest on this machine, no cluster needed
  tiny-model   write a tiny random Stable Diffusion (--family sdxl: SDXL, flux: Flux) pipeline (tests, quickstart)
  crd          print the DreamBoothJob CustomResourceDefinition
  operator     run the Kubernetes operator
  validate     check DreamBoothJob manifests as the operator would, offline (GitOps CI)

`dreambooth COMMAND --help` lists each command's flags. Paths may be s3:// URIs.
"""


def _train_command(model: type[CommonConfig], argv: list[str], prog: str) -> int:
    from .accelerate_config import apply
    from .cli_args import parse_cli
    from .worker import train

    try:
        cfg = apply(parse_cli(model, argv, prog), prog.split()[-1], argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return train(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    setup_logging()
    if cmd == "train":
        return _train_command(FullConfig, rest, "dreambooth train")
    if cmd == "train-lora":
        return _train_command(LoraConfig, rest, "dreambooth train-lora")
    if cmd == "train-lora-sdxl":
        return _train_command(SdxlLoraConfig, rest, "dreambooth train-lora-sdxl")
    if cmd == "train-lora-flux":
        return _train_command(FluxLoraConfig, rest, "dreambooth train-lora-flux")
    if cmd == "worker":
        import argparse

        from .worker import run_config

        parser = argparse.ArgumentParser(prog="dreambooth worker")
        parser.add_argument("--config", required=True)
        return run_config(parser.parse_args(rest).config)
    if cmd == "run":
        from .run import main as run_main

        return run_main(rest)
    if cmd == "tiny-model":
        from .fullsize import tiny_model_main

        return tiny_model_main(rest)
    print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2
