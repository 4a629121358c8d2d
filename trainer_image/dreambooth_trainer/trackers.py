"""Experiment trackers (TensorBoard and the others accelerate knows) for ``--report_to``, as the scripts use them:
which ones are wanted and installed, and one object that logs scalars, images and hyperparameters to them."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from dreambooth_api.config import CommonConfig, ConfigError

logger = logging.getLogger(__name__)

# accelerate's tracker names and the module each needs (accelerate's own `is_*_available` checks).
TRACKER_MODULES: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "comet_ml": ("comet_ml",),
    "mlflow": ("mlflow",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "aim": ("aim",),
    "swanlab": ("swanlab",),
    "trackio": ("trackio",),
}


def _installed(name: str) -> bool:
    return any(importlib.util.find_spec(mod) is not None for mod in TRACKER_MODULES[name])


def resolve_trackers(
    report_to: str, *, explicit: bool, installed: Callable[[str], bool] = _installed
) -> tuple[list[str], str | None]:
    """Trackers to start for ``--report_to``, and a warning to log (or None).

    ``explicit`` says whether the user set the flag. diffusers' default ``tensorboard`` crashes a run where
    TensorBoard is not installed; here the default quietly degrades (warning, no tracker), while a tracker the
    user asked for by name must be installed. ``all`` means every installed tracker, as in accelerate.
    """
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if not names or names == ["none"]:
        return [], None
    if names == ["all"]:
        return [n for n in TRACKER_MODULES if installed(n)], None
    unknown = [n for n in names if n not in TRACKER_MODULES]
    if unknown:
        raise ConfigError(
            "report_to",
            f"unknown tracker {', '.join(unknown)}; use one or more of {', '.join(TRACKER_MODULES)} "
            "(comma-separated), all, or none.",
        )
    chosen: list[str] = []
    warning = None
    for name in names:
        if installed(name):
            chosen.append(name)
        elif name == "tensorboard" and not explicit:
            warning = (
                "TensorBoard is not installed, so the default --report_to tensorboard logs nothing; "
                "`pip install tensorboard` to get the logs, or pass --report_to none to silence this."
            )
        else:
            raise ConfigError(
                "report_to",
                f"{name} is not installed: `pip install {TRACKER_MODULES[name][0]}`, or pass --report_to none.",
            )
    return chosen, warning


def trackers_for(cfg: CommonConfig) -> list[str]:
    """The trackers this config asks for, checked before any work starts (raises ConfigError)."""
    names, warning = resolve_trackers(cfg.report_to, explicit="report_to" in cfg.model_fields_set)
    if warning:
        logger.warning(warning)
    return names


def _hparam(value: Any) -> bool | int | float | str:
    return value if isinstance(value, bool | int | float | str) else str(value)


class Trackers:
    """accelerate's tracker classes on rank 0, writing under ``<logging_dir>/<run_name>`` like the scripts.

    The logging folder is local; for an s3:// output the caller uploads it (``local_dir``) when it publishes.
    """

    def __init__(
        self, names: Sequence[str], *, run_name: str, local_dir: Path, config: dict[str, Any], enabled: bool
    ) -> None:
        self.local_dir = local_dir
        self.trackers: list[Any] = []
        if not enabled or not names:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        local_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            tracker = cls(run_name, local_dir) if getattr(cls, "requires_logging_directory", False) else cls(run_name)
            tracker.start()
            # TensorBoard's hparams accept only scalars and strings; the token is a secret.
            tracker.store_init_configuration(
                {k: _hparam(v) for k, v in config.items() if k != "hub_token" and v is not None}
            )
            self.trackers.append(tracker)

    @property
    def active(self) -> bool:
        return bool(self.trackers)

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def log_images(self, tag: str, images: Sequence[Image.Image], step: int) -> None:
        if not images:
            return
        import numpy as np

        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images(tag, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
                tracker.writer.flush()
            elif tracker.name == "wandb":
                import wandb

                tracker.log({tag: [wandb.Image(im, caption=f"{i}") for i, im in enumerate(images)]}, step=step)

    def flush(self) -> None:
        for tracker in self.trackers:
            writer = getattr(tracker, "writer", None)
            if writer is not None:
                writer.flush()

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
