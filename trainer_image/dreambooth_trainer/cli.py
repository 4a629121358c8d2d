"""`dreambooth` console script: train, train-lora, run, tiny-model, crd, operator (and the hidden worker)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from dreambooth_api.config import CommonConfig, ConfigError, FullConfig, LoraConfig
from dreambooth_api.contract import EXIT_BAD_INPUT, EXIT_PREEMPTED

USAGE = """usage: dreambooth COMMAND [ARGS]

commands:
  train        DreamBooth full fine-tune with train_dreambooth.py's flags and defaults
  train-lora   DreamBooth LoRA with train_dreambooth_lora.py's flags and defaults
  run          run a DreamBoothJob manifest on this machine, no cluster needed
  tiny-model   write a tiny random Stable Diffusion pipeline (tests, quickstart)
  crd          print the DreamBoothJob CustomResourceDefinition
  operator     run the Kubernetes operator

`dreambooth COMMAND --help` lists each command's flags. Paths may be s3:// URIs.
"""


def _setup_logging() -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "botocore", "s3transfer", "PIL", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _train(cfg: CommonConfig) -> int:
    """Run training in this process (one rank); map the outcome to the launcher's exit codes."""
    from . import errors

    try:
        from .train import run_training

        result = run_training(cfg)
    except BaseException as exc:  # noqa: BLE001 - every failure must become an exit code
        code = errors.classify(exc)
        debug = logging.getLogger().isEnabledFor(logging.DEBUG)
        if code == EXIT_BAD_INPUT or (errors.explained(exc) and not debug):
            print(f"error: {exc}", file=sys.stderr)
        elif code != EXIT_PREEMPTED:
            traceback.print_exc()
        else:
            print(f"preempted: {exc}", file=sys.stderr)
        _write_result(code, exc)
        return code
    _write_result(0, None, step=result.global_step, uri=result.output_uri)
    return 0


def _write_result(code: int, exc: BaseException | None, step: int | None = None, uri: str | None = None) -> None:
    """Leave the outcome for the launcher (which writes the pod's termination message)."""
    path = os.environ.get("DREAMBOOTH_RESULT_FILE")
    if not path or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    from dreambooth_api.contract import REASONS

    doc = {
        "exitCode": code,
        "reason": REASONS.get(code, "Crashed"),
        "step": getattr(exc, "step", step),
        "checkpointUri": getattr(exc, "checkpoint_uri", uri),
        "message": (str(exc) if exc else "training finished")[:2000],
    }
    Path(path).write_text(json.dumps(doc))


def _train_command(model: type[CommonConfig], argv: list[str], prog: str) -> int:
    from .cli_args import parse_cli

    try:
        cfg = parse_cli(model, argv, prog)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return _train(cfg)


def _worker(argv: list[str]) -> int:
    """What the launcher runs under torchrun: the trainer config from a JSON file."""
    from dreambooth_api.config import parse_training

    parser = argparse.ArgumentParser(prog="dreambooth worker")
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    doc = json.loads(Path(args.config).read_text())
    try:
        cfg = parse_training(doc.get("method", "full"), doc["training"])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        _write_result(EXIT_BAD_INPUT, exc)
        return EXIT_BAD_INPUT
    return _train(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    _setup_logging()
    if cmd == "train":
        return _train_command(FullConfig, rest, "dreambooth train")
    if cmd == "train-lora":
        return _train_command(LoraConfig, rest, "dreambooth train-lora")
    if cmd == "worker":
        return _worker(rest)
    if cmd == "run":
        from .run import main as run_main

        return run_main(rest)
    if cmd == "tiny-model":
        from .tiny import main as tiny_main

        return tiny_main(rest)
    if cmd == "crd":
        from dreambooth_operator.crd import main as crd_main

        return crd_main(rest)
    if cmd == "operator":
        from dreambooth_operator.__main__ import main as operator_main

        return operator_main(rest)
    print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2
