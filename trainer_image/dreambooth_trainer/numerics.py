"""The numerics choices a run makes for the user (fused AdamW, torch.compile), settled before the config hash.

Both change the rounding of every step, so they are part of the config hash once set (`dreambooth_api.config.
UNSET_UNHASHED_FIELDS`). Left unset, a new run takes the fast choice its device allows and a resumed run takes the
one its checkpoints were trained with: the checkpoint's hash is matched against the hash of each candidate.
"""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any

from dreambooth_api.config import CommonConfig, config_hash

from .checkpoint.layout import checkpoint_steps
from .storage import Store

logger = logging.getLogger(__name__)


def _candidates(cuda: bool) -> dict[str, list[Any]]:
    """Per unset field, the values to try: the one a new run takes first. None is a release before issue 27
    (CPU: the fused kernel; CUDA: the scripts' foreach AdamW; no compile) and is never hashed."""
    return {"adam_fused": [True, None, False] if cuda else [None, True, False], "compile": [None, True, False]}


def checkpoint_hash(store: Store, request: str | None) -> str | None:
    """The config hash of the checkpoint this run would resume (the named one, else the newest), or None."""
    wanted = request and request != "latest"
    names = [request] if wanted else [f"checkpoint-{s}" for s in checkpoint_steps(store)]
    for name in names[:3]:
        try:
            doc = json.loads(store.read_bytes(f"{name}/manifest.json"))
        except Exception:  # noqa: BLE001 - unreadable here is judged (and reported) by the resume itself
            continue
        value = doc.get("configHash") if isinstance(doc, dict) else None
        if isinstance(value, str):
            return value
    return None


def settle(cfg: CommonConfig, *, cuda: bool, resume_hash: str | None) -> CommonConfig:
    """`cfg` with every unset numerics field decided: the resumed checkpoint's choice when one matches, else the
    new run's default. Fields the user set are kept (a mismatch is then refused by the resume, naming them)."""
    options = {k: v for k, v in _candidates(cuda).items() if getattr(cfg, k) is None}
    if not options:
        return cfg
    combos = [dict(zip(options, values, strict=True)) for values in itertools.product(*options.values())]
    if resume_hash is not None:
        for combo in combos:
            candidate = cfg.model_copy(update=combo)
            if config_hash(candidate) == resume_hash:
                if combo != combos[0]:
                    logger.info("resuming with the numerics its checkpoints were trained with: %s", combo)
                return candidate
    return cfg.model_copy(update=combos[0])


def use_fused_adam(cfg: CommonConfig, device_type: str) -> bool:
    """None (a checkpoint of a release before these flags) keeps that release's choice: fused only on CPU."""
    return cfg.adam_fused if cfg.adam_fused is not None else device_type == "cpu"
