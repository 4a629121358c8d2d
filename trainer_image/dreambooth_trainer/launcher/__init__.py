"""PID 1 of a trainer pod: torchrun as a child, SIGTERM turned into an emergency checkpoint, exit codes mapped.

    python -m dreambooth_trainer.launch --config FILE [--nproc-per-node N]

FILE is ``{"method": "full"|"lora", "training": {...camelCase spec.training...}}``. N defaults to
``$PET_NPROC_PER_NODE`` or 1. torchrun reads the other ``PET_*`` variables the operator sets (PET_NNODES,
PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT, PET_RDZV_BACKEND, PET_MAX_RESTARTS) itself; with no
PET_MASTER_ADDR and one node the rendezvous is standalone on a free local port.

What the launcher adds to torchrun (docs/design.md, launcher contract):

- Signals. On SIGTERM (or Ctrl-C) it sends SIGTERM to each worker's main process at once. Each worker finishes
  its current optimizer step, the ranks agree on the stop step, rank 0 publishes an emergency checkpoint, and
  the workers exit 75. Only the worker's main process is signalled, not its process group: DataLoader workers
  killed mid-step would turn a clean stop into a crash. Further SIGTERMs are ignored (the save goes on); a
  second Ctrl-C kills at once, which is safe because a checkpoint without its manifest does not exist.
- The stop deadline: ``$DREAMBOOTH_STOP_DEADLINE_SECONDS``, else ``$DREAMBOOTH_GRACE_SECONDS`` (the pod's
  terminationGracePeriodSeconds, default 120) minus a margin of 10% (at least 2 s, at most 10 s) for the
  launcher's own exit. When it passes, the launcher SIGKILLs every worker's process group (torchrun starts
  workers in their own sessions, so killing torchrun alone would orphan them) and torchrun's. torchrun's own
  shutdown timeout (30 s by default, after which it SIGKILLs the workers) is raised past the deadline so that
  only the launcher decides (where torchrun has --shutdown-timeout: torch 2.11's has not, and keeps its 30 s).
  If the launcher itself dies, torchrun gets SIGTERM (PR_SET_PDEATHSIG) and stops the workers the same
  graceful way.
- Exit codes: 0 done, 64 bad input, 70 crash, 71 GPU out of memory, 75 preempted (emergency checkpoint
  published, or none possible in time). torchrun exits 1 for any worker failure, so each worker leaves its own
  exit code in a per-rank result file and the launcher picks the root cause (bad input > GPU OOM > preempted >
  crash: a peer of an OOMed rank dies of a broken collective, which is not the cause).
- The termination message ``{"reason", "step", "checkpointUri", "message"}`` (at most 4 KiB of JSON) goes to
  ``$TERMINATION_MESSAGE_PATH``, default /dev/termination-log (written only if it exists when not named). After
  a SIGTERM, ``checkpointUri`` is the checkpoint the next attempt resumes from and the message says whether it
  is the emergency checkpoint or an older one that stands because the emergency one could not be made durable.

`dreambooth run` calls ``main(["--config", path, "--nproc-per-node", str(n)])`` in-process.

Modules: `decision` (pure: deadline, torchrun argv, exit code and termination message), `supervisor` (the
processes). The worker side (what torchrun runs) is `dreambooth_trainer.worker`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from dreambooth_api.contract import EXIT_BAD_INPUT, EXIT_CRASH, EXIT_OK

from .decision import Outcome, stop_deadline, write_termination_message
from .supervisor import Launcher, StopRequest

logger = logging.getLogger("dreambooth_trainer.launch")


def _setup_logging() -> None:
    from ..logsetup import setup_logging

    setup_logging(role="launcher")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreambooth_trainer.launch", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help='JSON: {"method": "full"|"lora", "training": {...}}')
    parser.add_argument(
        "--nproc-per-node", type=int, default=None, help="worker processes (default $PET_NPROC_PER_NODE or 1)"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    request = StopRequest()
    restore = request.install()  # before anything slow: a SIGTERM now must not kill the launcher unreported
    try:
        _setup_logging()
        outcome = _launch(args, request)
        write_termination_message(outcome)
    finally:
        restore()
    log = logger.info if outcome.code == EXIT_OK else logger.error
    log("exit %d (%s): %s", outcome.code, outcome.reason, outcome.message)
    return outcome.code


def _launch(args: argparse.Namespace, request: StopRequest) -> Outcome:
    from dreambooth_api.config import ConfigError, parse_training

    config = Path(args.config)
    try:
        doc = json.loads(config.read_text())
        cfg = parse_training(doc.get("method", "full"), doc["training"])
        nproc = args.nproc_per_node or int(os.environ.get("PET_NPROC_PER_NODE", "1") or 1)
        deadline = stop_deadline()
    except ConfigError as exc:
        return Outcome(EXIT_BAD_INPUT, message=f"bad config {config}: {exc}")
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        return Outcome(EXIT_BAD_INPUT, message=f"cannot read the launcher config or settings ({config}): {exc!r}")
    if nproc < 1:
        return Outcome(EXIT_BAD_INPUT, message=f"--nproc-per-node must be at least 1, not {nproc}")
    try:
        return Launcher(config.resolve(), nproc, deadline, output_dir=cfg.output_dir, request=request).run()
    except Exception as exc:  # noqa: BLE001 - the launcher's own failure still needs an exit code and a message
        logger.exception("the launcher failed")
        return Outcome(EXIT_CRASH, message=f"the launcher failed: {exc!r}")
