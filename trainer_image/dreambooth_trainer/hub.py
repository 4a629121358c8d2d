"""The Hugging Face Hub: the base model by id (with --revision/--variant) and --push_to_hub of the output.

Like the scripts, the repository is created before training (so a bad token fails in seconds, not after
hours) and the output folder is uploaded in one commit "End of training" at the end. The token comes from
``HF_TOKEN`` (or huggingface_hub's login) unless ``--hub_token`` is given, which works but is discouraged: it
lands in shell history and manifests, where a Secret-backed environment variable does not.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dreambooth_api.config import CommonConfig, ConfigError
from dreambooth_api.contract import ExplainedError

from .modelcard import is_hub_id

logger = logging.getLogger(__name__)

# Our checkpoint protocol's files stay private to the output prefix: they are training state, not the model.
UPLOAD_IGNORE = [
    "checkpoint-*",
    "checkpoint-*/**",
    "LATEST",
    ".owner",
    ".lock",
    "logs/attempt-*/**",
    "step_*",
    "epoch_*",
]


class HubError(RuntimeError, ExplainedError):
    """The Hub could not be reached or refused an operation for a reason other than the token."""


def repo_id_for(cfg: CommonConfig) -> str:
    """--hub_model_id, else the output folder's name, as the scripts do."""
    return cfg.hub_model_id or Path(cfg.output_dir.rstrip("/")).name


def _token(cfg: CommonConfig) -> str | None:
    if cfg.hub_token:
        logger.warning(
            "--hub_token (spec.training.hubToken) puts the token in command lines and manifests; prefer the "
            "HF_TOKEN environment variable (from a Kubernetes Secret)"
        )
    return cfg.hub_token or None


def _translate(exc: Exception, what: str) -> Exception:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return ConfigError(
            "hub_token",
            f"the Hub refused to {what} (HTTP {status}): set HF_TOKEN to a token with write access "
            "(https://huggingface.co/settings/tokens), or check --hub_model_id.",
        )
    from huggingface_hub import constants

    return HubError(
        f"could not {what} on {constants.ENDPOINT}: {type(exc).__name__}: {exc}; check the network (or "
        "HF_ENDPOINT) and run again, or drop --push_to_hub and upload the output folder later."
    )


def create_hub_repo(cfg: CommonConfig) -> str:
    """Create (or reuse) the model repository; the full repo id ("user/name") is returned."""
    from huggingface_hub import create_repo

    name = repo_id_for(cfg)
    try:
        return create_repo(repo_id=name, exist_ok=True, token=_token(cfg)).repo_id
    except Exception as exc:  # noqa: BLE001 - every failure becomes a clear error naming the fix
        raise _translate(exc, f"create the repository {name}") from exc


def push_folder(cfg: CommonConfig, repo_id: str, folder: Path) -> str:
    """Upload the output folder (model, model card, validation images, TensorBoard logs) in one commit."""
    from huggingface_hub import upload_folder

    try:
        info = upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message="End of training",
            ignore_patterns=UPLOAD_IGNORE,
            token=cfg.hub_token or None,
        )
    except Exception as exc:  # noqa: BLE001
        raise _translate(exc, f"upload {folder} to {repo_id}") from exc
    logger.info("pushed %s to the Hub: %s", folder, info)
    return str(info)


def download_model(cfg: CommonConfig) -> Path | None:
    """A Hub model id as a local pipeline folder (only the files from_pretrained needs); None for paths."""
    name = cfg.pretrained_model_name_or_path
    if not is_hub_id(name) or "/" not in name:
        return None
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(name, revision=cfg.revision, variant=cfg.variant))
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(
            "pretrained_model_name_or_path",
            f"{name!r} is not a local folder and could not be fetched from the Hub"
            f"{f' at revision {cfg.revision!r}' if cfg.revision else ''} ({type(exc).__name__}: {exc}); "
            "point it at a diffusers pipeline folder (local or s3://), or check the id, revision and HF_TOKEN.",
        ) from exc


__all__ = ["HubError", "create_hub_repo", "download_model", "push_folder", "repo_id_for"]
