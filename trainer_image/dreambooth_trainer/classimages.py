"""Prior preservation: generate the class images that ``class_data_dir`` lacks, as diffusers' scripts do.

The scripts count the files in the class folder and, when there are fewer than ``num_class_images``, sample
the rest with ``class_prompt`` (PromptDataset, ``sample_batch_size``, ``prior_generation_precision``: fp16 on
GPU, fp32 on CPU by default), sharded across processes. Differences, each for correctness:

* exactly ``num_class_images`` in total: the missing indices are split between ranks with no padding (an
  accelerate-prepared DataLoader pads the last batches, so diffusers can write more images than asked for);
* each image is a function of ``(seed, index)`` alone: it has its own generator, so ranks never produce the
  same image (the scripts seed every rank alike) and a run with another world size writes the same files;
* only readable images count as present, and the folder may be ``s3://``: images are generated locally and
  uploaded batch by batch (an attempt preempted mid-stage keeps what it made), with a manifest
  (``.dreambooth-class-images.json``: model, class prompt, resolution, count, seed, files) written last;
* the folder is a stage of its own: a later attempt, or another job with the same model and class prompt, reuses
  it and generates only what is missing (filling the indices an interrupted attempt left out); a folder whose
  manifest names another model or class prompt is refused (exit 64) instead of silently mixing priors. The
  training resolution is recorded but not part of that check: images are generated at the model's own size
  and resized by the dataset like any user-supplied class image, as the scripts do.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch

from dreambooth_api.config import CommonConfig, ConfigError

from .data import DataError, list_images

logger = logging.getLogger(__name__)

CLASS_MANIFEST = ".dreambooth-class-images.json"
_GENERATED = re.compile(r"^(\d{5,})-[0-9a-f]{40}\.jpg$")


def present_class_images(folder: Path) -> list[Path]:
    """Readable images already in the class folder (a missing or empty folder has none)."""
    if not folder.is_dir():
        return []
    try:
        return list_images(folder, flag="class_data_dir", skip_bad=True)  # counts the usable ones; the data set judges
    except DataError:
        return []


def count_class_images(folder: Path) -> int:
    return len(present_class_images(folder))


def indices_to_generate(names: list[str], missing: int) -> list[int]:
    """Indices of the `missing` images to make, given the image file names present.

    Generated images are named by index; user images are not. New indices start after as many as there are
    user images (the scripts' numbering) and skip those already generated, so the holes an interrupted attempt
    left (one rank's share uploaded, another's not) are filled instead of an index being made twice.
    """
    taken = {int(m.group(1)) for m in map(_GENERATED.match, names) if m}
    out, i = [], len(names) - len(taken)
    while len(out) < missing:
        if i not in taken:
            out.append(i)
        i += 1
    return out


def _norm_model(model: str | None) -> str:
    return (model or "").rstrip("/")


def manifest_conflict(manifest: dict[str, Any], cfg: CommonConfig) -> str | None:
    """Why class images made under `manifest` must not serve this config's prior, or None when they may."""
    theirs = {
        "model": _norm_model(manifest.get("model")),
        "revision": manifest.get("revision"),
        "variant": manifest.get("variant"),
        "class prompt": manifest.get("classPrompt"),
    }
    ours = {
        "model": _norm_model(cfg.pretrained_model_name_or_path),
        "revision": cfg.revision,
        "variant": cfg.variant,
        "class prompt": cfg.class_prompt,
    }
    diffs = [f"{k} {theirs[k]!r} (this run: {ours[k]!r})" for k in ours if theirs[k] != ours[k]]
    return ", ".join(diffs) or None


def generation_dtype(cfg: CommonConfig, device: torch.device) -> torch.dtype:
    """The scripts' rule: fp16 on GPU, fp32 elsewhere, unless --prior_generation_precision says otherwise."""
    choice = cfg.prior_generation_precision
    if choice == "fp16":
        if device.type != "cuda":
            raise ConfigError(
                "prior_generation_precision", "fp16 needs a GPU; on CPU use fp32 (the default there) or bf16."
            )
        return torch.float16
    if choice == "bf16":
        return torch.bfloat16
    if choice == "fp32":
        return torch.float32
    return torch.float16 if device.type == "cuda" else torch.float32


def image_seed(seed: int, index: int) -> int:
    """The generator seed of class image `index`: independent of rank, world size and batch size."""
    digest = hashlib.sha256(f"class-image:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def shard(missing: int, rank: int, world: int) -> list[int]:
    """Positions 0..missing-1 this rank generates: round-robin, no padding, so the total is exact."""
    return list(range(rank, missing, world))


def file_name(index: int, image_bytes: bytes) -> str:
    # diffusers names them "<index>-<sha1 of the pixels>.jpg"; zero-padding keeps the listing in index order.
    return f"{index:05d}-{hashlib.sha1(image_bytes).hexdigest()}.jpg"


def ensure_class_images(
    cfg: CommonConfig,
    *,
    accelerator: Any,
    model_dir: Path,
    class_dir: Path,
    class_store: Any,
    seed: int,
    scratch: Path,
) -> int:
    """Generate the missing class images (every rank its share); returns how many this run added in total.

    ``class_dir`` is the local view of ``class_data_dir`` (the folder itself, or a synced copy of an s3://
    prefix); ``class_store`` is the Store of ``class_data_dir``. When this returns, every new image is in
    the store and, for a local folder, in ``class_dir``; an s3:// folder must be synced again by the caller.
    """
    from accelerate.utils import broadcast_object_list, gather_object

    rank, world = accelerator.process_index, accelerator.num_processes
    names: list[str] = []
    conflict = None
    if accelerator.is_main_process:
        names = [p.name for p in present_class_images(class_dir)]
        conflict = _check_manifest(class_dir / CLASS_MANIFEST, cfg)
    present = len(names)
    if world > 1:
        # Every rank learns the verdict, so a refused folder fails all of them at once (no rank left waiting).
        present, conflict, names = broadcast_object_list([present, conflict, names], from_process=0)
    if conflict:
        raise ConfigError(
            "class_data_dir",
            f"{cfg.class_data_dir} holds class images generated for {conflict}; they would teach the wrong prior. "
            f"Point class_data_dir at a folder of its own, or delete {CLASS_MANIFEST} there to use the images anyway.",
        )
    missing = cfg.num_class_images - present
    if missing <= 0:
        if accelerator.is_main_process:
            logger.info("prior preservation: reusing %d class image(s) in %s", present, cfg.class_data_dir)
        return 0
    indices = indices_to_generate(names, missing)
    mine = [indices[p] for p in shard(missing, rank, world)]
    logger.info(
        "prior preservation: %d class image(s) in %s, %d missing; this rank generates %d",
        present, cfg.class_data_dir, missing, len(mine),
    )  # fmt: skip
    local_root = class_store.local_root()
    # A local class folder is written in place; an s3:// one gets files from a scratch folder.
    write_dir = Path(local_root) if local_root is not None else scratch / "class-images"
    write_dir.mkdir(parents=True, exist_ok=True)
    written: list[dict[str, Any]] = []
    if mine:
        written = _generate(
            cfg,
            accelerator.device,
            model_dir,
            write_dir,
            mine,
            seed,
            upload=None if local_root is not None else class_store,
        )
    everything = gather_object(written) if world > 1 else written
    if accelerator.is_main_process:
        _write_manifest(class_store, cfg, seed, sorted(everything, key=lambda e: e["index"]), present + missing)
    accelerator.wait_for_everyone()
    return missing


def _check_manifest(path: Path, cfg: CommonConfig) -> str | None:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # no manifest (user-supplied images) or an unreadable one: the scripts' rule, count files
    return manifest_conflict(manifest, cfg) if isinstance(manifest, dict) else None


def _generate(
    cfg: CommonConfig,
    device: torch.device,
    model_dir: Path,
    write_dir: Path,
    indices_todo: list[int],
    seed: int,
    upload: Any = None,
) -> list[dict[str, Any]]:
    from diffusers import DiffusionPipeline

    dtype = generation_dtype(cfg, device)
    t0 = time.monotonic()
    pipeline = DiffusionPipeline.from_pretrained(
        model_dir, dtype=dtype, safety_checker=None, revision=cfg.revision, variant=cfg.variant
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(device)
    written: list[dict[str, Any]] = []
    try:
        for start in range(0, len(indices_todo), cfg.sample_batch_size):
            indices = indices_todo[start : start + cfg.sample_batch_size]
            generators = [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in indices]
            images = pipeline([cfg.class_prompt or ""] * len(indices), generator=generators).images
            for index, image in zip(indices, images, strict=True):
                name = file_name(index, image.tobytes())
                buf = io.BytesIO()
                image.save(buf, format="JPEG")
                (write_dir / name).write_bytes(buf.getvalue())
                if upload is not None:
                    upload.upload_file(write_dir / name, name)
                written.append({"file": name, "index": index, "seed": image_seed(seed, index)})
    finally:
        # Free the sampling pipeline before the training models load.
        del pipeline
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    logger.info("generated %d class image(s) in %.1fs", len(written), time.monotonic() - t0)
    return written


def _write_manifest(store: Any, cfg: CommonConfig, seed: int, entries: list[dict[str, Any]], count: int) -> None:
    """Record what was generated (appending to an earlier manifest), so a reused folder says where it came from."""
    previous: list[dict[str, Any]] = []
    try:
        previous = json.loads(store.read_text(CLASS_MANIFEST)).get("files", [])
    except Exception:  # noqa: BLE001 - no or unreadable manifest: start a new one
        previous = []
    doc = {
        "classPrompt": cfg.class_prompt,
        "numClassImages": cfg.num_class_images,
        "count": count,
        "resolution": cfg.resolution,
        "model": cfg.pretrained_model_name_or_path,
        "revision": cfg.revision,
        "variant": cfg.variant,
        "seed": seed,
        "precision": cfg.prior_generation_precision or "default",
        "files": previous + entries,
    }
    store.write_text(CLASS_MANIFEST, json.dumps(doc, indent=1))


__all__ = [
    "CLASS_MANIFEST",
    "count_class_images",
    "ensure_class_images",
    "generation_dtype",
    "image_seed",
    "indices_to_generate",
    "manifest_conflict",
    "shard",
]
