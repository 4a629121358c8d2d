"""The output prefix's owner record: a job never writes into another job's output."""

from __future__ import annotations

from dreambooth_api.config import ConfigError

from ..storage import NotFoundError, Store
from .layout import OWNER


def claim_output(store: Store, job_uid: str) -> None:
    """Refuse an output prefix owned by another job; claim an unowned one."""
    if not job_uid:
        return
    try:
        owner = store.read_bytes(OWNER).decode().strip()
    except NotFoundError:
        store.write_bytes(OWNER, f"{job_uid}\n".encode())
        return
    if owner != job_uid:
        raise ConfigError(
            "output_dir",
            f"{store.uri} belongs to another job (UID {owner}); give this job its own output_dir, or delete "
            f"{store.url(OWNER)} if that job is gone.",
        )
