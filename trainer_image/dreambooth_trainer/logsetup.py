"""Console logging of the launcher and the workers: plain text, or with ``LOG_FORMAT=json`` one JSON object per
line carrying job, namespace, attempt, rank and step (docs/metrics.md). Imports nothing heavy: the launcher uses
it and must stay free of torch.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from dreambooth_api.contract import BadInputError
from dreambooth_api.logformat import json_handler, log_format

# The optimizer step this process is at, for LOG_FORMAT=json lines (set by Progress.update on every rank).
_current_step: int | None = None


def set_step(step: int) -> None:
    global _current_step
    _current_step = step


def json_logging() -> bool:
    try:
        return log_format(os.environ) == "json"
    except BadInputError as exc:
        # A log format is no reason to lose a run: plain text, and the fix said once at the top of the log.
        print(f"warning: {exc}; logging plain text", file=sys.stderr)
        return False


def context_fields(role: str) -> dict[str, Any]:
    """The fields every JSON line carries: who (job, namespace, attempt, rank) and when in the run (step)."""
    env = os.environ

    def number(name: str) -> int | None:
        value = env.get(name, "")
        return int(value) if value.isdigit() else None

    return {
        "job": env.get("DREAMBOOTH_JOB_NAME") or None,
        "namespace": env.get("DREAMBOOTH_NAMESPACE") or None,
        "attempt": number("DREAMBOOTH_ATTEMPT"),
        # The launcher is not a rank: it supervises them. Workers have RANK from torchrun (a single process: 0).
        "rank": (number("RANK") or 0) if role == "worker" else None,
        "role": role,
        "step": lambda: _current_step,
    }


def _libraries_through_root() -> None:
    """transformers and diffusers log through a handler of their own ("[transformers] ...") and draw tqdm bars:
    route their records to the root (JSON) handler and drop the bars. Workers import both anyway."""
    import importlib

    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            lib = importlib.import_module(name)
        except ImportError:
            continue
        lib.disable_default_handler()
        lib.enable_propagation()
        lib.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        return
    disable_progress_bars()


def setup_logging(role: str = "worker") -> None:
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    if json_logging():
        logging.basicConfig(level=level, handlers=[json_handler(context_fields(role))], force=True)
        # Every line JSON: Python warnings become log records, and the libraries' own stderr output goes too.
        logging.captureWarnings(True)
        if role == "worker":
            _libraries_through_root()
    else:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        fmt = f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"
        if role == "launcher":
            fmt = "%(asctime)s launcher %(levelname)s: %(message)s"
        logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S")
    for noisy in ("urllib3", "botocore", "s3transfer", "PIL", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
