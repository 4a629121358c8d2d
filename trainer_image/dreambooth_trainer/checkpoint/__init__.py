"""Checkpoints: snapshot the training state, write and publish it in the background, and resume from it.

Format 2 (docs/design.md, "Checkpoint format"; format 1 is still read): ``checkpoint-N/<files>``, then ``checkpoint-N/manifest.json``
(sizes + sha256, written last: a checkpoint without a manifest does not exist), then ``LATEST``, which only moves
forward. The same code publishes to a local folder and to S3 through one Store; S3 has no rename, so the
manifest's single PUT is the commit point.

Modules: `layout` (the format: names, manifest, state, the snapshot writer), `publisher` (background publish,
total limit), `resume` (choose, verify and fetch), `owner` (one job per output prefix), `interval` (the
`auto` interval).
"""

from __future__ import annotations

from .foreign import refuse_collisions
from .interval import CheckpointInterval
from .layout import (
    FORMAT,
    LATEST,
    MANIFEST,
    OWNER,
    CheckpointError,
    Snapshot,
    TrainState,
    checkpoint_steps,
    cpu_clone,
    read_latest,
    write_safetensors,
    write_snapshot,
)
from .owner import Claim, claim_output
from .publisher import Publisher
from .resume import Loaded, choose_resume, continue_named, verify_and_fetch
from .shares import SHARES

__all__ = [
    "FORMAT",
    "LATEST",
    "MANIFEST",
    "OWNER",
    "CheckpointError",
    "CheckpointInterval",
    "Loaded",
    "Publisher",
    "SHARES",
    "Snapshot",
    "TrainState",
    "checkpoint_steps",
    "choose_resume",
    "continue_named",
    "Claim",
    "claim_output",
    "cpu_clone",
    "read_latest",
    "refuse_collisions",
    "verify_and_fetch",
    "write_safetensors",
    "write_snapshot",
]
