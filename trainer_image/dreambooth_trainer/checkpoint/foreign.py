"""Which `checkpoint-N` folders of an output are ours: every cleanup and overwrite touches only those.

diffusers' scripts write `checkpoint-N/` folders of their own (accelerate's `save_state`) into the same output
folders a user points this trainer at. Nothing we did not write is ever deleted or overwritten: the total limit
counts only checkpoints carrying our manifest, a removal deletes only the files our format names (so a stray file
someone put into our folder survives too), and a name we must write that a foreign folder holds is refused.

A folder without our manifest is still ours when it is an interrupted publish of ours: publishing writes
`training/<part>.safetensors` first and only files of the names below, so "has `training/`, and nothing else but
our names" tells our partial write from a diffusers checkpoint (which always holds `optimizer.bin`, `scheduler.bin`
or a `random_states_*.pkl`, never `training/`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from enum import Enum

from dreambooth_api.config import ConfigError

from ..storage import AccessDeniedError, NotFoundError, StorageError, Store
from ..storage.s3 import S3Store, abort_upload, incomplete_uploads
from .layout import _CKPT, MANIFEST
from .shares import SHARES

logger = logging.getLogger(__name__)

# Every file name formats 1 and 2 write inside checkpoint-N/ (docs/design.md, "Checkpoint format").
_OUR_FILE = re.compile(
    r"^(manifest\.json|trainer_state\.json|pytorch_lora_weights\.safetensors|training/[^/]+"
    r"|[A-Za-z0-9_]+/(config\.json|diffusion_pytorch_model\.safetensors|model\.safetensors))$"
)


class Kind(Enum):
    ABSENT = "absent"
    OURS = "ours"  # complete: our manifest
    PARTIAL = "partial"  # ours, interrupted before its manifest
    FOREIGN = "foreign"  # written by something else (diffusers' scripts, a user)


def is_our_manifest(raw: bytes) -> bool:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("format"), int) and isinstance(doc.get("files"), dict)


def files_of(store: Store, name: str) -> list[str]:
    """Keys under `name/`, relative to it."""
    return [info.key[len(name) + 1 :] for info in store.list(f"{name}/") if info.key.startswith(f"{name}/")]


def classify(store: Store, name: str) -> Kind:
    files = files_of(store, name)
    if not files:
        return Kind.ABSENT
    if MANIFEST in files:
        try:
            if is_our_manifest(store.read_bytes(f"{name}/{MANIFEST}")):
                return Kind.OURS
        except NotFoundError:  # removed while we looked
            pass
    if all(_OUR_FILE.match(f) for f in files) and any(f.startswith("training/") for f in files):
        return Kind.PARTIAL
    return Kind.FOREIGN


def foreign_checkpoints(store: Store) -> list[int]:
    """Steps of `checkpoint-N` folders we did not write, oldest first."""
    heads = {info.key.partition("/")[0] for info in store.list("") if "/" in info.key}
    steps = [int(m.group(1)) for h in heads if (m := _CKPT.match(h))]
    return sorted(s for s in steps if classify(store, f"checkpoint-{s}") is Kind.FOREIGN)


def foreign_refusal(store: Store, step: int, why: str) -> ConfigError:
    name = f"checkpoint-{step}"
    return ConfigError(
        "output_dir",
        f"{store.url(name)} was not written by this trainer (no manifest.json of ours; e.g. diffusers' "
        f"train_dreambooth*.py wrote it) and {why}; it is never deleted or overwritten. Resume from it with "
        f"--resume_from_checkpoint {name}, move it out of the output folder, or use a new output_dir.",
    )


def refuse_collisions(store: Store, start: int, max_steps: int) -> None:
    """A foreign checkpoint-N with start < N <= max_steps is a name this run may write (any step can hold an
    emergency checkpoint): refuse before training rather than at the checkpoint."""
    for step in foreign_checkpoints(store):
        if start < step <= max_steps:
            raise foreign_refusal(store, step, f"this run (steps {start + 1}..{max_steps}) may need that name")


def remove_ours(store: Store, name: str) -> None:
    """Delete our files of `name`, the manifest first (so it stops counting at once); any other file stays."""
    store.delete(f"{name}/{MANIFEST}")
    for rel in files_of(store, name):
        if _OUR_FILE.match(rel):
            store.delete(f"{name}/{rel}")
    root = store.local_root()
    if root is not None and (root / name).is_dir():
        # Empty folders left behind (ours: training/, unet/); a folder holding anything else stays.
        for dirpath, _, _ in sorted(os.walk(root / name), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def abort_stale_uploads(store: Store) -> list[str]:
    """Abort the multipart uploads a killed publish of ours left under this output (S3 only); the keys aborted.

    Called once the run holds the output (owner.py): no other writer of ours is live, so every upload in progress
    under `checkpoint-N/` with a name our format writes is a dead publish's. Uploads of any other name, or outside
    `checkpoint-N/`, are someone else's and left alone. The coordination objects of checkpoint shares a dead
    publish left (`.shares/`, shares.py) go too."""
    if not isinstance(store, S3Store):
        return []
    try:
        if store.list(SHARES):
            logger.info("removing %s left by an interrupted shared checkpoint", store.url(SHARES))
            store.delete_prefix(SHARES)
    except StorageError as exc:  # harmless leftovers: a later start tries again
        logger.warning("could not remove %s: %s", store.url(SHARES), str(exc)[:200])
    aborted: list[str] = []
    try:
        uploads = incomplete_uploads(store, "")
    except AccessDeniedError as exc:
        # A policy written before streaming lacks the permission: the lifecycle rule is then the only sweeper.
        logger.warning(
            "cannot list incomplete multipart uploads under %s (%s): grant s3:ListBucketMultipartUploads so a "
            "killed checkpoint's parts are aborted at the next start, and set the bucket's "
            "AbortIncompleteMultipartUpload lifecycle rule (docs/s3-credentials.md)",
            store.uri,
            str(exc)[:200],
        )
        return aborted
    for key, upload_id in uploads:
        folder, _, rel = key.partition("/")
        if not _CKPT.match(folder) or not _OUR_FILE.match(rel):
            continue
        logger.warning("aborting the incomplete upload of %s left by an interrupted checkpoint", store.url(key))
        abort_upload(store, key, upload_id)
        aborted.append(key)
    return aborted
