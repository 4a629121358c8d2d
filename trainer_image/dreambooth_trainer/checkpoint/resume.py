"""Finding, verifying and fetching the checkpoint a run resumes from, falling back past damaged ones."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreambooth_api.config import ConfigError

from ..storage import NotFoundError, Store
from ..storage.localfs import file_sha256
from .layout import _CKPT, FORMAT, MANIFEST, CheckpointError, TrainState, check_manifest, checkpoint_steps, parse_state
from .settings import differences

logger = logging.getLogger(__name__)


@dataclass
class Loaded:
    step: int
    folder: Path
    manifest: dict[str, Any]
    state: TrainState


def verify_and_fetch(store: Store, step: int, cache: Path) -> Loaded:
    """Download (or locate) a checkpoint and check every file against its manifest."""
    name = f"checkpoint-{step}"
    try:
        manifest = json.loads(store.read_bytes(f"{name}/{MANIFEST}"))
    except (NotFoundError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{name}: unreadable manifest ({str(exc)[:200]})") from exc
    check_format(store, name, manifest)
    check_manifest(manifest, name)
    root = store.local_root()
    folder = (root / name) if root is not None else (cache / name)
    for rel, meta in manifest["files"].items():
        path = folder / rel
        if root is None and not _matches(path, meta):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                store.download_file(f"{name}/{rel}", path)
            except NotFoundError as exc:
                raise CheckpointError(f"{name}: file {rel} is missing") from exc
        if not path.exists():
            raise CheckpointError(f"{name}: file {rel} is missing")
        if not _matches(path, meta):
            raise CheckpointError(f"{name}: file {rel} does not match its manifest (size or sha256 differs)")
    state = parse_state((folder / "trainer_state.json").read_text(errors="replace"), name)
    return Loaded(step, folder, manifest, state)


def check_format(store: Store, name: str, manifest: dict[str, Any]) -> None:
    """A checkpoint of a newer format is refused, never skipped: falling back past it would start the run over
    (and later delete it by the total limit). Format 1 manifests written by 0.1.0 carry "format": 1."""
    fmt = manifest.get("format", 1) if isinstance(manifest, dict) else 1
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise CheckpointError(f"{name}: manifest format {str(fmt)[:50]!r} is not a format number")  # damaged
    if fmt <= FORMAT:
        return
    from .. import __version__

    raise ConfigError(
        "output_dir",
        f"{store.url(name)} is in checkpoint format {fmt!r}, written by a newer release; this release "
        f"({__version__}) reads checkpoint formats up to {FORMAT}. Resume it with the release that wrote it (its "
        "trainer image), or use a new output_dir to start over.",
    )


def _matches(path: Path, meta: dict[str, Any]) -> bool:
    if not path.exists() or path.stat().st_size != meta["size"]:
        return False
    return file_sha256(path) == meta["sha256"]


def continue_named(store: Store, request: str | None, job_uid: str) -> str | None:
    """The request a job's later attempt resumes with: a named checkpoint (``checkpoint-N``) is where the *job*
    starts, so once this job has written a newer complete checkpoint (an attempt preempted after it), that one is
    taken — resuming checkpoint-N again after every preemption would throw away the job's work. Checkpoints of
    other runs in the folder (newer ones a user rolled back from) are never taken: only manifests naming this job."""
    m = _CKPT.match(Path(str(request)).name) if request not in (None, "latest") else None
    if m is None or not job_uid:
        return request
    named = int(m.group(1))
    for step in checkpoint_steps(store):  # newest first
        if step <= named:
            break
        try:
            manifest = json.loads(store.read_bytes(f"checkpoint-{step}/{MANIFEST}"))
        except (NotFoundError, ValueError):
            continue  # damaged: choose_resume would fall back past it anyway
        if isinstance(manifest, dict) and manifest.get("jobUid") == job_uid:
            logger.info(
                "resume_from_checkpoint names checkpoint-%d, but this job wrote checkpoint-%d since (an earlier "
                "attempt): resuming checkpoint-%d",
                named, step, step,
            )  # fmt: skip
            return f"checkpoint-{step}"
    return request


def choose_resume(
    store: Store, request: str | None, config_hash: str, cache: Path, settings: dict[str, Any] | None = None
) -> Loaded | None:
    """Pick the checkpoint to resume from, falling back past corrupt ones, or None to start fresh.

    `request` is resume_from_checkpoint: None (automatic when checkpoints exist), 'latest', or 'checkpoint-N'.
    """
    steps = checkpoint_steps(store)
    if request not in (None, "latest"):
        m = _CKPT.match(Path(str(request)).name)
        if not m:
            raise ConfigError(
                "resume_from_checkpoint", f"{request!r} is not 'latest' or a folder name like 'checkpoint-400'."
            )
        wanted = int(m.group(1))
        if wanted not in steps:
            # As the scripts (accelerate's load_state fails on it): a named checkpoint never means "start over".
            raise ConfigError(
                "resume_from_checkpoint",
                f"{store.url(f'checkpoint-{wanted}')} does not exist or is incomplete (no manifest.json); name one "
                "that exists in output_dir, 'latest', or drop the flag to start over.",
            )
        steps = [wanted]
    if not steps:
        if request is not None:
            logger.warning("no complete checkpoint in %s: starting a new training run", store.uri)
        return None
    for step in steps:
        try:
            loaded = verify_and_fetch(store, step, cache)
        except CheckpointError as exc:
            if request not in (None, "latest"):
                raise ConfigError(
                    "resume_from_checkpoint",
                    f"cannot resume from {request}: {exc}; name another checkpoint or 'latest'.",
                ) from exc
            logger.warning("cannot resume from checkpoint-%d: %s; falling back to the previous checkpoint", step, exc)
            continue
        if loaded.state.config_hash != config_hash:
            raise ConfigError(
                "output_dir",
                f"{store.uri} holds checkpoint-{step} of a different training config (hash {loaded.state.config_hash}, "
                f"this run {config_hash}{differences(loaded.folder, settings)}); pick a new output_dir, or the same "
                "training settings to resume.",
            )
        return loaded
    logger.warning("no intact checkpoint in %s: starting a new training run", store.uri)
    return None
