"""One training process: what torchrun runs under the launcher, and what `dreambooth train` runs in-process.

It owns the two things the launcher reads back from a worker (docs/design.md, launcher contract):

- the early-SIGTERM flag: a SIGTERM that arrives while the worker imports torch and builds the trainer is only
  noted (raising from the handler would interrupt whatever import is running: torch half-imported crashes,
  seen as SystemError then SIGSEGV); the trainer's own handler then stops the run before its first step;
- the result files: this rank's exit code (``$DREAMBOOTH_RANK_RESULT_DIR/rank-<LOCAL_RANK>.json``) and, from local
  rank 0, the outcome's detail (``$DREAMBOOTH_RESULT_FILE``: reason, step, checkpoint, message), from which the
  launcher writes the pod's termination message.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from dreambooth_api.config import CommonConfig, ConfigError, parse_training
from dreambooth_api.contract import (
    ENV_RANK_RESULT_DIR,
    ENV_RESULT_FILE,
    EXIT_BAD_INPUT,
    EXIT_CRASH,
    EXIT_PREEMPTED,
    REASONS,
)

# Set by SIGTERM between the worker's start and the trainer's own handler (the trainer sets the same Event).
early_stop = threading.Event()


def _note_early_sigterm(signum: int, frame: Any) -> None:  # noqa: ARG001
    early_stop.set()


def train(cfg: CommonConfig, stop: threading.Event | None = None) -> int:
    """Run training in this process (one rank); map the outcome to the launcher's exit codes."""
    from . import errors

    try:
        from .train import RunEnv, run_training

        env = RunEnv.from_environ()
        if stop is not None:
            env.stop = stop
        result = run_training(cfg, env)
    except BaseException as exc:  # noqa: BLE001 - every failure must become an exit code
        code = errors.classify(exc)
        debug = logging.getLogger().isEnabledFor(logging.DEBUG)
        if code == EXIT_BAD_INPUT or (errors.explained(exc) and not debug):
            print(f"error: {exc}", file=sys.stderr)
        elif code != EXIT_PREEMPTED:
            traceback.print_exc()
        else:
            print(f"preempted: {exc}", file=sys.stderr)
        write_result(code, exc)
        return code
    write_result(0, None, step=result.global_step, uri=result.output_uri, images=result.latest_validation_images)
    return 0


def write_result(
    code: int,
    exc: BaseException | None,
    step: int | None = None,
    uri: str | None = None,
    images: list[str] | None = None,
) -> None:
    """Leave the outcome for the launcher (which writes the pod's termination message)."""
    path = os.environ.get(ENV_RESULT_FILE)
    if not path or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    doc = {
        "exitCode": code,
        "reason": getattr(exc, "reason", None) or REASONS.get(code, "Crashed"),
        "step": getattr(exc, "step", step),
        "checkpointUri": getattr(exc, "checkpoint_uri", uri),
        "message": (str(exc) if exc else "training finished")[:2000],
    }
    if images:
        doc["validationImages"] = [str(u) for u in images]
    Path(path).write_text(json.dumps(doc))


def run_config(config: str) -> int:
    """The trainer on a launcher config file (`dreambooth worker --config FILE`, hidden: torchrun runs it)."""
    from .logs import setup_logging

    setup_logging()
    doc = json.loads(Path(config).read_text())
    try:
        cfg = parse_training(doc.get("method", "full"), doc["training"])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        write_result(EXIT_BAD_INPUT, exc)
        return EXIT_BAD_INPUT
    return train(cfg, stop=early_stop)


def main(config: str) -> int:
    """One torchrun worker: the trainer on the launcher's config, plus this rank's exit code for the launcher."""
    signal.signal(signal.SIGTERM, _note_early_sigterm)
    try:
        code = run_config(config)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else EXIT_CRASH
    except BaseException:  # noqa: BLE001 - every failure must become an exit code
        traceback.print_exc()
        code = EXIT_CRASH
    result_dir = os.environ.get(ENV_RANK_RESULT_DIR)
    if result_dir:
        path = Path(result_dir) / f"rank-{os.environ.get('LOCAL_RANK', '0')}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"exitCode": code}))
        tmp.replace(path)  # the launcher never reads half a file
    return code
