"""The settings a checkpoint was trained with (`training/settings.json`, format 2), so a refused re-run into an
output folder of other settings can say which setting differs instead of two hashes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dreambooth_api.config import OPERATIONAL_FIELDS, CommonConfig, flag_and_field

FILE = "training/settings.json"


def hashed_settings(cfg: CommonConfig) -> dict[str, Any]:
    """What the config hash covers (dreambooth_api.config.config_hash), by field."""
    data = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in OPERATIONAL_FIELDS}
    data["method"] = cfg.method
    return data


def settings_json(cfg: CommonConfig) -> str:
    return json.dumps(hashed_settings(cfg), indent=1, sort_keys=True)


def differences(folder: Path, current: dict[str, Any] | None, limit: int = 3) -> str:
    """ "; --rank is 4 there, 8 here" for the first settings that differ, or "" when the checkpoint predates
    the file (format 1) or nothing is known."""
    path = folder / FILE
    if current is None or not path.exists():
        return ""
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return ""
    keys = sorted(k for k in set(old) | set(current) if old.get(k) != current.get(k))
    if not keys:
        return ""
    parts = [
        f"{'spec.method' if k == 'method' else flag_and_field(k)} is {old.get(k)!r} there, {current.get(k)!r} here"
        for k in keys[:limit]
    ]
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return "; " + "; ".join(parts) + more
