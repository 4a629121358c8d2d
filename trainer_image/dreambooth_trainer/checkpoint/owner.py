"""One writer per output prefix: a job never writes into another job's output, and two runs never write one at once.

- A local folder: an OS lock (``flock`` on ``<output>/.lock``) held for the run's lifetime decides; it dies with
  the process, so a re-run of the same command after the first ended resumes. ``.owner`` is informational there.
  NFS locking depends on the server (and its lock daemon).
- ``s3://``: a conditional create (``If-None-Match: *``) decides, never a read-then-write. A job (the operator
  sets its UID) claims ``.owner`` for good: its later attempts pass, another job is refused. A run without a job
  UID (``dreambooth train``) creates ``.lock`` and deletes it when it ends; one killed with SIGKILL leaves it:
  a run on the same host finds its process gone and takes the lock over (re-running the same command resumes);
  from another host the next run says which file to delete. The server is probed once per run: one that ignores the header is
  refused (exit 64, naming the endpoint) unless ``--unsafe_shared_output``.

Neither record is a security boundary: anyone who can write the prefix can delete them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from dreambooth_api.config import ConfigError

from ..storage import NotFoundError, StorageError, Store
from .foreign import abort_stale_uploads
from .layout import OWNER

logger = logging.getLogger(__name__)
LOCK = ".lock"


@dataclass
class Claim:
    """What a run holds on its output until `release` (or its process ends, for a local folder)."""

    store: Store
    fd: int | None = None  # the flock'd file of a local folder
    lock_key: str | None = None  # the s3 .lock this run created
    token: str = ""

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        if self.lock_key is not None:
            key, self.lock_key = self.lock_key, None
            try:
                if self.store.read_bytes(key).decode(errors="replace") == self.token:
                    self.store.delete(key)
            except Exception as exc:  # noqa: BLE001 - a stale lock is reported by the next run, with the fix
                logger.warning("could not remove %s: %s", self.store.url(key), exc)


def _me(job_uid: str) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    who = f"job {job_uid}" if job_uid else "a run"
    return f"{who}, pid {os.getpid()} on {socket.gethostname()}, since {when} [{uuid.uuid4().hex[:12]}]"


def _in_use(store: Store, holder: str, fix: str) -> ConfigError:
    return ConfigError("output_dir", f"{store.uri} is in use by {holder.strip()[:300]}; {fix}")


def claim_output(store: Store, job_uid: str, *, unsafe_shared: bool = False) -> Claim:
    """Claim the output for this run, or raise ConfigError (exit 64) naming its owner."""
    root = store.local_root()
    claim = _claim_local(store, root, job_uid) if root is not None else _claim_s3(store, job_uid, unsafe_shared)
    try:
        _check_job_owner(store, job_uid, local=root is not None)
        # Held now: a multipart upload of ours still open under the prefix is a killed publish's (parts billed
        # until aborted). The bucket's lifecycle rule is the backstop for outputs never resumed (docs/storage.md).
        abort_stale_uploads(store)
    except BaseException:
        claim.release()
        raise
    return claim


def _claim_local(store: Store, root: Path, job_uid: str) -> Claim:
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = (root / LOCK).read_text(errors="replace") or "another run"
        os.close(fd)
        raise _in_use(store, holder, "wait for it to end, or give this run another output_dir.") from None
    me = _me(job_uid)
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.encode(), 0)
    return Claim(store, fd=fd, token=me)


def _claim_s3(store: Store, job_uid: str, unsafe_shared: bool) -> Claim:
    _probe_conditional_create(store, unsafe_shared)
    if job_uid:
        return Claim(store)  # the job's .owner decides (_check_job_owner): the operator serialises its attempts
    me = _me(job_uid)
    for _ in range(3):
        if store.create_exclusive(LOCK, me.encode()):
            return Claim(store, lock_key=LOCK, token=me)
        try:
            holder = store.read_bytes(LOCK).decode(errors="replace")
        except NotFoundError:
            continue  # released between our create and read: try again
        if holder == me:  # our own PUT landed and its retry read 412
            return Claim(store, lock_key=LOCK, token=me)
        if _dead_here(holder):
            # Killed (SIGKILL, OOM) on this very machine: re-running the same command must resume, as it does for
            # a local folder whose flock died with the process.
            logger.warning("removing %s of a run that is gone (%s)", store.url(LOCK), holder.strip()[:200])
            store.delete(LOCK)
            continue
        raise _in_use(
            store,
            holder,
            f"wait for it to end, or give this run another output_dir; if that run was killed, delete "
            f"{store.url(LOCK)}.",
        )
    raise _in_use(store, "runs that keep starting and ending", "try again.")


def _dead_here(holder: str) -> bool:
    """The lock names a process on this host that no longer exists (a PID reused since reads as alive: refused)."""
    m = re.search(r"pid (\d+) on (\S+), since", holder)
    if not m or m.group(2) != socket.gethostname():
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _check_job_owner(store: Store, job_uid: str, *, local: bool) -> None:
    """A job's output stays its own: another job's UID in .owner refuses the prefix."""
    if not job_uid:
        return
    record = f"{job_uid}\n".encode()
    if local:
        try:
            owner = store.read_bytes(OWNER).decode(errors="replace").strip()
        except NotFoundError:
            store.write_bytes(OWNER, record)  # under the folder's lock: no other run is here
            return
    elif store.create_exclusive(OWNER, record):
        return
    else:
        owner = store.read_bytes(OWNER).decode(errors="replace").strip()
    if owner != job_uid:
        raise ConfigError(
            "output_dir",
            f"{store.uri} belongs to another job (UID {owner[:100]}); give this job its own output_dir, or delete "
            f"{store.url(OWNER)} if that job is gone.",
        )


def _probe_conditional_create(store: Store, unsafe_shared: bool) -> None:
    """A second conditional PUT of one key must be refused; a server that accepts it cannot fence writers."""
    key = f".dreambooth-probe-{uuid.uuid4().hex}"
    detail = "a second conditional PUT of one key was accepted"
    try:
        first = store.create_exclusive(key, b"1")
        second = store.create_exclusive(key, b"2")
        if first and not second:
            return
    except StorageError as exc:
        detail = f"a conditional PUT failed: {str(exc)[:200]}"
    finally:
        with contextlib.suppress(Exception):
            store.delete(key)
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "AWS S3 (no AWS_ENDPOINT_URL)"
    if unsafe_shared:
        logger.warning(
            "the S3 server at %s does not honour If-None-Match (%s): --unsafe_shared_output is set, so nothing "
            "stops a second run from writing %s at the same time",
            endpoint,
            detail,
            store.uri,
        )
        return
    raise ConfigError(
        "output_dir",
        f"the S3 server at {endpoint} does not honour conditional writes (If-None-Match: *; {detail}), so two "
        f"runs could write {store.uri} at once. Use a server that does (AWS S3, MinIO, SeaweedFS), or set "
        "--unsafe_shared_output (spec.training.unsafeSharedOutput: true) if you make sure only one run uses it.",
    )
