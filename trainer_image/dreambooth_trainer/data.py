"""Instance/class image datasets and the deterministic sampler.

Behaviour follows diffusers' ``examples/dreambooth/train_dreambooth.py`` (DreamBoothDataset, collate_fn,
PromptDataset) with two deliberate differences that the exact-resume promise needs:

* every random choice of an item (crop offset, optional flip) is a pure function of ``(seed, epoch, index)``
  drawn from a generator made for that item, never from a global RNG, so DataLoader workers, restarts and a
  resumed run produce the same tensors;
* files are listed in sorted order (diffusers uses ``iterdir`` order, which differs between filesystems), and
  non-image files are skipped with a warning instead of crashing mid-run.

No torchvision: PyPI's torchvision wheels do not match our torch build, so the transforms are written with
PIL and torch, reproducing torchvision's Resize / CenterCrop / RandomCrop / ToTensor / Normalize.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from dreambooth_api.contract import BadInputError

logger = logging.getLogger(__name__)

__all__ = [
    "CachedLatentsDataset",
    "DataError",
    "DreamBoothDataset",
    "EpochSampler",
    "collate_fn",
    "item_generator",
    "list_images",
    "load_image",
    "tokenize_prompt",
    "transform_image",
]

# Streams of one item's randomness, so the instance and the class image of the same index do not share draws.
_STREAM_INSTANCE = 0
_STREAM_CLASS = 1


class DataError(ValueError, BadInputError):
    """Bad training data (missing folder, no images): the launcher maps it to exit 64, bad input."""


# ----------------------------------------------------------------------------------------------- images


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def _image_problem(path: Path) -> str | None:
    """Why an image file cannot be trained on, from its header and size (cheap: no full decode), or None."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            fmt = im.format
            # verify() checks the file's structure without decoding all pixels (PNG: every chunk's CRC).
            im.verify()
    except Image.DecompressionBombError as exc:
        return f"over Pillow's decompression-bomb limit ({str(exc)[:120]})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"unreadable ({type(exc).__name__}: {str(exc)[:120]})"
    if width * height > (Image.MAX_IMAGE_PIXELS or math.inf):
        return f"{width}x{height} pixels, over Pillow's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS}"
    if fmt == "JPEG":
        # A JPEG's verify() reads nothing: a cut-off file lacks its end-of-image marker near the end.
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            if b"\xff\xd9" not in f.read():
                return "truncated (no JPEG end-of-image marker)"
    return None


def list_images(folder: Path | str, *, flag: str | None = None, skip_bad: bool = False) -> list[Path]:
    """The image files directly in ``folder``, sorted by name.

    Every file's header and size are checked now (cheap), so a bad image fails the run before any model loads:
    an image file (by suffix) that is truncated, unreadable or over the decompression-bomb limit raises DataError
    naming it, unless ``skip_bad`` (--skip_bad_images) skips and counts it. Other files PIL cannot read are
    skipped with one warning. A symlink to outside the folder is refused, naming it. Raises DataError naming the
    folder (and ``flag``, the setting that points at it) when the folder is missing or holds no readable image.
    """
    folder = Path(folder)
    where = f" (set by {flag})" if flag else ""
    if not folder.exists():
        raise DataError(f"image folder {folder}{where} does not exist: create it and put the training images in it")
    if not folder.is_dir():
        raise DataError(f"{folder}{where} is a file, not a folder: point it at the folder that holds the images")

    images: list[Path] = []
    skipped: list[str] = []
    bad: list[str] = []
    inside = folder.resolve()
    # Dotfiles (.DS_Store, our class-image manifest) are never training images: pass over them silently.
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.is_symlink() and not path.resolve().is_relative_to(inside):
            raise DataError(
                f"{path}{where} is a symlink to {path.resolve()}, outside the folder: copy the file in instead"
            )
        problem = _image_problem(path)
        if problem is None:
            images.append(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            if not skip_bad:
                raise DataError(
                    f"image {path}{where} is {problem}: replace or remove it, or set --skip_bad_images "
                    "(spec.training.skipBadImages: true) to skip such files"
                )
            bad.append(f"{path.name}: {problem}")
        else:
            skipped.append(f"{path.name} ({problem})")
    if bad:
        logger.warning("--skip_bad_images: skipping %d bad image(s) in %s: %s", len(bad), folder, "; ".join(bad))
    if skipped:
        logger.warning("skipping %d non-image file(s) in %s: %s", len(skipped), folder, ", ".join(skipped))
    if not images:
        raise DataError(
            f"no images in {folder}{where}"
            + (f" (unreadable: {', '.join(skipped)})" if skipped else "")
            + ": add PNG/JPEG/WebP files to it, or point it at the folder that holds them"
        )
    return images


def load_image(path: Path | str) -> Image.Image:
    """Open an image upright (EXIF orientation applied) in RGB, as diffusers' dataset does.

    One difference: 16-bit grayscale (PIL mode I;16 / I) is scaled to 8 bits first; diffusers' plain
    convert("RGB") clips it, so such an image trains as white. A file that fails to decode names itself (exit 64).
    """
    try:
        with Image.open(path) as im:
            image = ImageOps.exif_transpose(im)
            if image.mode.startswith("I;16") or image.mode == "I":
                wide = np.asarray(image).astype(np.int64)
                image = Image.fromarray(((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8), "L")
            if image.mode != "RGB":
                image = image.convert("RGB")
            # Force the decode now, so the file handle can close.
            image.load()
            return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"image {path} cannot be decoded ({type(exc).__name__}: {str(exc)[:200]}): replace or remove it"
        ) from exc


def item_generator(seed: int, epoch: int, index: int, stream: int = 0) -> torch.Generator:
    """A torch.Generator that depends only on ``(seed, epoch, index, stream)``.

    SeedSequence mixes the four numbers into a well-spread 64-bit seed, so neighbouring indices or epochs do
    not get correlated streams (seed + index would).
    """
    # SeedSequence wants non-negative entries; masking keeps any Python int (a negative --seed included).
    mask = (1 << 64) - 1
    entropy = [seed & mask, epoch & mask, index & mask, stream & mask]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    generator = torch.Generator()
    generator.manual_seed((int(state[0]) << 32 | int(state[1])) & ((1 << 63) - 1))
    return generator


# torchvision's InterpolationMode (lower-cased, as train_dreambooth_lora.py's --image_interpolation_mode takes it)
# → the PIL filter its Resize uses on PIL images (its pil_modes_mapping: nearest_exact is PIL's nearest).
PIL_FILTERS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


def transform_image(
    image: Image.Image,
    size: int,
    *,
    center_crop: bool,
    generator: torch.Generator | None = None,
    random_flip: bool = False,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Resize the shorter side to ``size``, crop ``size`` x ``size``, → float CHW in [-1, 1] (see transform_with_crop)."""
    return transform_with_crop(
        image, size, center_crop=center_crop, generator=generator, random_flip=random_flip, interpolation=interpolation
    )[0]


def transform_with_crop(
    image: Image.Image,
    size: int,
    *,
    center_crop: bool,
    generator: torch.Generator | None = None,
    random_flip: bool = False,
    interpolation: str = "bilinear",
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize the shorter side to ``size``, crop ``size`` x ``size``, → float CHW in [-1, 1], and the crop's
    (top, left) in the resized (and, when flipped, mirrored) image: SDXL's ``crop_top_left`` conditioning.

    Matches torchvision's Resize(size, interpolation) + CenterCrop/RandomCrop + ToTensor + Normalize([0.5],[0.5])
    on PIL images (train_dreambooth.py resizes with bilinear, train_dreambooth_lora.py with
    ``--image_interpolation_mode``). The random crop (and flip) draw from ``generator``, which must be given
    unless ``center_crop`` is set and ``random_flip`` is not.
    """
    if interpolation not in PIL_FILTERS:
        raise ValueError(f"unknown interpolation {interpolation!r}; one of {sorted(PIL_FILTERS)}")
    width, height = image.size
    # torchvision's rule: the shorter side becomes `size`, the longer one int(size * long / short).
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample=PIL_FILTERS[interpolation])

    if center_crop:
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
    else:
        if generator is None:
            raise ValueError("a random crop needs a generator (pass item_generator(seed, epoch, index))")
        # Same draws and order as torchvision's RandomCrop.get_params: top, then left.
        top = int(torch.randint(0, new_h - size + 1, size=(1,), generator=generator).item())
        left = int(torch.randint(0, new_w - size + 1, size=(1,), generator=generator).item())
    image = image.crop((left, top, left + size, top + size))

    if random_flip:
        if generator is None:
            raise ValueError("a random flip needs a generator (pass item_generator(seed, epoch, index))")
        if torch.rand(1, generator=generator).item() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            # The SDXL script flips before it crops: this crop, in the mirrored image, starts here.
            left = new_w - size - left

    array = np.asarray(image, dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    # Same operations in the same order as ToTensor + Normalize, so the values are bit-identical to theirs.
    return tensor.to(torch.float32).div(255).sub(0.5).div(0.5), (top, left)


# ----------------------------------------------------------------------------------------------- prompts


def tokenize_prompt(tokenizer: Any, prompt: str, tokenizer_max_length: int | None = None) -> Any:
    """Tokenize one prompt padded to the max length (the tokenizer's own unless given), as diffusers does."""
    max_length = tokenizer_max_length if tokenizer_max_length is not None else tokenizer.model_max_length
    return tokenizer(prompt, truncation=True, padding="max_length", max_length=max_length, return_tensors="pt")


# ---------------------------------------------------------------------------------------------- captions

METADATA_FILE = "metadata.jsonl"


def read_captions(folder: Path, image_column: str, caption_column: str | None) -> dict[str, str]:
    """Captions by image path relative to `folder`, from an image folder's metadata.jsonl (datasets' imagefolder
    convention: one JSON object per line with `file_name` and the caption columns). Without `caption_column`
    there are none (every image gets the instance prompt, as in the script)."""
    if image_column != "image":
        raise DataError(
            f"--image_column: an image folder's image column is 'image' (its files, named by metadata.jsonl's "
            f"file_name), not {image_column!r}"
        )
    if caption_column is None:
        return {}
    path = folder / METADATA_FILE
    if not path.is_file():
        raise DataError(f"--caption_column {caption_column!r}: {folder} has no {METADATA_FILE} to read captions from")
    out: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise DataError(f"{path}, line {number}: each line needs a file_name")
        if caption_column not in row:
            raise DataError(
                f"--caption_column {caption_column!r} is not a column of {path} (line {number} has "
                f"{', '.join(sorted(row))})"
            )
        out[str(row["file_name"])] = str(row[caption_column] or "")
    return out


# ---------------------------------------------------------------------------------------------- datasets


class DreamBoothDataset(Dataset):
    """Instance images (and, with prior preservation, class images) with their tokenized prompts.

    Length is the number of instance images, or max(instance, class) when class images are used; item ``i``
    holds instance image ``i % num_instance`` and class image ``i % num_class``. An item is a pure function
    of ``(seed, epoch, i)``: call ``set_epoch`` before each epoch's iterator is created (DataLoader workers
    receive a copy of the dataset then), or index with ``(epoch, i)`` tuples (``EpochSampler(with_epoch=True)``)
    when workers are persistent.

    ``encoder_hidden_states`` / ``class_prompt_encoder_hidden_states``: precomputed text embeddings (diffusers'
    ``--pre_compute_text_embeddings``) returned in place of the prompt ids, without attention masks.
    """

    def __init__(
        self,
        instance_data_root: Path | str,
        instance_prompt: str,
        tokenizer: Any,
        class_data_root: Path | str | None = None,
        class_prompt: str | None = None,
        class_num: int | None = None,
        size: int = 512,
        center_crop: bool = False,
        encoder_hidden_states: torch.Tensor | None = None,
        class_prompt_encoder_hidden_states: torch.Tensor | None = None,
        tokenizer_max_length: int | None = None,
        *,
        seed: int = 0,
        random_flip: bool = False,
        interpolation: str = "bilinear",
        skip_bad_images: bool = False,
        repeats: int = 1,
        with_geometry: bool = False,
        captions: dict[str, str] | None = None,
    ) -> None:
        if size <= 0:
            raise DataError(f"resolution must be positive, not {size}")
        if interpolation not in PIL_FILTERS:
            raise DataError(f"unknown interpolation {interpolation!r}; one of {sorted(PIL_FILTERS)}")
        self.size = size
        self.interpolation = interpolation
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self.tokenizer = tokenizer
        self.tokenizer_max_length = tokenizer_max_length
        self.encoder_hidden_states = encoder_hidden_states
        self.class_prompt_encoder_hidden_states = class_prompt_encoder_hidden_states

        self.instance_data_root = Path(instance_data_root)
        self.instance_images_path = list_images(
            self.instance_data_root, flag="instance_data_dir", skip_bad=skip_bad_images
        )
        # Per-image captions (the SDXL script's --dataset_name/--caption_column); an empty or missing one falls
        # back to the instance prompt, as there.
        prompts = None
        if captions:
            root = self.instance_data_root
            prompts = [
                captions.get(p.relative_to(root).as_posix()) or instance_prompt for p in self.instance_images_path
            ]
        if repeats > 1:
            # As train_dreambooth_lora_sdxl.py's --repeats: each image `repeats` times in a row, one epoch longer.
            self.instance_images_path = [p for p in self.instance_images_path for _ in range(repeats)]
            prompts = None if prompts is None else [c for c in prompts for _ in range(repeats)]
        # SDXL conditions on each image's original size and crop (add_time_ids): items then carry both.
        self.with_geometry = with_geometry
        self.num_instance_images = len(self.instance_images_path)
        self.instance_prompt = instance_prompt
        self._length = self.num_instance_images

        self.class_data_root: Path | None = None
        self.class_images_path: list[Path] = []
        self.num_class_images = 0
        self.class_prompt = class_prompt
        if class_data_root is not None:
            self.class_data_root = Path(class_data_root)
            self.class_images_path = list_images(self.class_data_root, flag="class_data_dir", skip_bad=skip_bad_images)
            if class_num is not None:
                if class_num <= 0:
                    raise DataError(f"class_num must be positive, not {class_num}")
                self.class_images_path = self.class_images_path[:class_num]
            self.num_class_images = len(self.class_images_path)
            self._length = max(self.num_class_images, self.num_instance_images)

        # The prompts never change between items: tokenize once instead of once per item.
        self._instance_text = self._tokenize(instance_prompt, encoder_hidden_states, "instance_prompt")
        self._instance_texts: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None
        if prompts is not None:
            tokenized = {c: self._tokenize(c, None, "caption") for c in dict.fromkeys(prompts)}
            self._instance_texts = [tokenized[c] for c in prompts]
        self._class_text = (
            self._tokenize(class_prompt, class_prompt_encoder_hidden_states, "class_prompt")
            if self.class_data_root is not None
            else None
        )

    def _tokenize(
        self, prompt: str | None, hidden_states: torch.Tensor | None, name: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if hidden_states is not None:
            return hidden_states, None
        if prompt is None:
            raise DataError(f"{name} is required (no precomputed text embeddings were given)")
        if self.tokenizer is None:
            raise DataError(f"a tokenizer is required to tokenize {name}")
        inputs = tokenize_prompt(self.tokenizer, prompt, self.tokenizer_max_length)
        return inputs.input_ids, inputs.attention_mask

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._length

    def _instance_text_of(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._instance_texts is not None:
            return self._instance_texts[index % self.num_instance_images]
        return self._instance_text

    def _image(self, path: Path, epoch: int, index: int, stream: int) -> torch.Tensor:
        return self._image_and_geometry(path, epoch, index, stream)[0]

    def _image_and_geometry(
        self, path: Path, epoch: int, index: int, stream: int
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """The image tensor, its original (height, width) and its crop's (top, left)."""
        needs_rng = not self.center_crop or self.random_flip
        generator = item_generator(self.seed, epoch, index, stream) if needs_rng else None
        image = load_image(path)
        tensor, crop = transform_with_crop(
            image,
            self.size,
            center_crop=self.center_crop,
            generator=generator,
            random_flip=self.random_flip,
            interpolation=self.interpolation,
        )
        return tensor, (image.height, image.width), crop

    def _add_image(self, example: dict[str, Any], kind: str, path: Path, epoch: int, index: int, stream: int) -> None:
        if not self.with_geometry:
            example[f"{kind}_images"] = self._image(path, epoch, index, stream)
            return
        tensor, original, crop = self._image_and_geometry(path, epoch, index, stream)
        example[f"{kind}_images"] = tensor
        example[f"{kind}_original_size"] = original
        example[f"{kind}_crop_top_left"] = crop

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(index, tuple):
            epoch, index = index
        else:
            epoch = self.epoch
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for a dataset of {self._length}")

        example: dict[str, Any] = {}
        instance_path = self.instance_images_path[index % self.num_instance_images]
        self._add_image(example, "instance", instance_path, epoch, index, _STREAM_INSTANCE)
        ids, mask = self._instance_text_of(index)
        example["instance_prompt_ids"] = ids
        if mask is not None:
            example["instance_attention_mask"] = mask

        if self.class_data_root is not None and self._class_text is not None:
            class_path = self.class_images_path[index % self.num_class_images]
            self._add_image(example, "class", class_path, epoch, index, _STREAM_CLASS)
            ids, mask = self._class_text
            example["class_prompt_ids"] = ids
            if mask is not None:
                example["class_attention_mask"] = mask
        return example


def collate_fn(examples: Sequence[dict[str, Any]], with_prior_preservation: bool = False) -> dict[str, Any]:
    """Batch items: instance rows first, then (with prior preservation) the class rows, in one tensor each.

    One forward pass then serves both losses; the trainer splits the batch in halves.
    """
    has_attention_mask = "instance_attention_mask" in examples[0]
    # CachedLatentsDataset items carry VAE latent-distribution parameters in place of pixels.
    kind = "latents" if "instance_latents" in examples[0] else "images"
    input_ids = [ex["instance_prompt_ids"] for ex in examples]
    pixel_values = [ex[f"instance_{kind}"] for ex in examples]
    attention_mask = [ex["instance_attention_mask"] for ex in examples] if has_attention_mask else []
    if with_prior_preservation:
        input_ids += [ex["class_prompt_ids"] for ex in examples]
        pixel_values += [ex[f"class_{kind}"] for ex in examples]
        if has_attention_mask:
            attention_mask += [ex["class_attention_mask"] for ex in examples]

    stacked = torch.stack(pixel_values).to(memory_format=torch.contiguous_format).float()
    batch = {
        "input_ids": torch.cat(input_ids, dim=0),
        "pixel_values" if kind == "images" else "latent_parameters": stacked,
    }
    if has_attention_mask:
        batch["attention_mask"] = torch.cat(attention_mask, dim=0)
    if "instance_original_size" in examples[0]:
        kinds = ("instance", "class") if with_prior_preservation else ("instance",)
        batch["original_sizes"] = [ex[f"{k}_original_size"] for k in kinds for ex in examples]
        batch["crop_top_lefts"] = [ex[f"{k}_crop_top_left"] for k in kinds for ex in examples]
    return batch


class CachedLatentsDataset(Dataset):
    """A center-cropped DreamBoothDataset whose images are VAE-encoded once (``cache_latents``, our extension).

    With center crops (and no flips) an item's pixels depend only on its file, so each distinct instance and
    class image is encoded once and its latent-distribution parameters (mean and log-variance, what
    ``vae.encode(x).latent_dist.parameters`` holds) replace the pixels: the trainer still draws the latent
    sample with the step's generator, so training randomness is unchanged, only the decode and the VAE
    encoder's forward pass per step are gone. ``encode`` maps a (1, 3, H, W) batch to its parameters.
    """

    def __init__(self, dataset: DreamBoothDataset, encode: Any) -> None:
        if not dataset.center_crop or dataset.random_flip:
            raise DataError("cached latents need center crops and no flips (an item must not vary by epoch)")
        self.dataset = dataset

        # SDXL's conditioning on each image's size and crop: fixed per file under center crops, kept beside it.
        self.geometry: dict[tuple[str, Path], tuple[tuple[int, int], tuple[int, int]]] = {}

        def encode_all(paths: list[Path], stream: int, kind: str) -> list[torch.Tensor]:
            out = []
            for p in paths:
                pixels, original, crop = dataset._image_and_geometry(p, 0, 0, stream)
                self.geometry[(kind, p)] = (original, crop)
                out.append(encode(pixels.unsqueeze(0))[0].detach().to("cpu"))
            return out

        self.instance_latents = encode_all(dataset.instance_images_path, _STREAM_INSTANCE, "instance")
        self.class_latents = encode_all(dataset.class_images_path, _STREAM_CLASS, "class")

    def _add_geometry(self, example: dict[str, Any], kind: str, path: Path) -> None:
        if self.dataset.with_geometry:
            example[f"{kind}_original_size"], example[f"{kind}_crop_top_left"] = self.geometry[(kind, path)]

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(index, tuple):
            index = index[1]
        ds = self.dataset
        if not 0 <= index < len(ds):
            raise IndexError(f"index {index} out of range for a dataset of {len(ds)}")
        example: dict[str, Any] = {"instance_latents": self.instance_latents[index % ds.num_instance_images]}
        self._add_geometry(example, "instance", ds.instance_images_path[index % ds.num_instance_images])
        ids, mask = ds._instance_text_of(index)
        example["instance_prompt_ids"] = ids
        if mask is not None:
            example["instance_attention_mask"] = mask
        if ds.class_data_root is not None and ds._class_text is not None:
            example["class_latents"] = self.class_latents[index % ds.num_class_images]
            self._add_geometry(example, "class", ds.class_images_path[index % ds.num_class_images])
            ids, mask = ds._class_text
            example["class_prompt_ids"] = ids
            if mask is not None:
                example["class_attention_mask"] = mask
        return example


# ----------------------------------------------------------------------------------------------- sampler


class EpochSampler(Sampler):
    """This rank's indices for one epoch: a pure function of ``(seed, epoch)``, sharded like DistributedSampler.

    The permutation is ``torch.randperm(dataset_len)`` from a generator seeded with ``seed + epoch`` and the
    padding/sharding is DistributedSampler's, so the order equals DistributedSampler's for the same arguments
    (a run can switch between the two without changing its data order).

    ``skip(num_batches)`` starts the current epoch after the first ``num_batches * batch_size`` indices of this
    rank, for an exact mid-epoch resume that does not load the consumed samples. It holds until ``set_epoch``
    moves to another epoch: call ``set_epoch`` first, then ``skip``. ``len()`` is what is left of the epoch;
    ``num_samples`` is a full epoch's count on this rank.

    ``with_epoch=True`` yields ``(epoch, index)`` pairs, which DreamBoothDataset accepts: the epoch then
    reaches persistent DataLoader workers, whose dataset copy never sees ``set_epoch``.
    """

    def __init__(
        self,
        dataset_len: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        *,
        drop_last: bool = False,
        batch_size: int = 1,
        with_epoch: bool = False,
    ) -> None:
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be positive, not {dataset_len}")
        if num_replicas <= 0:
            raise ValueError(f"num_replicas must be positive, not {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        if drop_last and dataset_len < num_replicas:
            raise ValueError(f"drop_last with {dataset_len} samples on {num_replicas} replicas leaves none")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.batch_size = batch_size
        self.with_epoch = with_epoch
        self.epoch = 0
        self._skip_samples = 0
        if drop_last and dataset_len % num_replicas != 0:
            self.num_samples = math.ceil((dataset_len - num_replicas) / num_replicas)
        else:
            self.num_samples = math.ceil(dataset_len / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip_samples = 0
        self.epoch = epoch

    def skip(self, num_batches: int) -> None:
        """Start the current epoch after ``num_batches`` batches (of ``batch_size``) of this rank's indices."""
        batches_per_epoch = math.ceil(self.num_samples / self.batch_size)
        if not 0 <= num_batches <= batches_per_epoch:
            raise ValueError(
                f"cannot skip {num_batches} batches: an epoch has {batches_per_epoch} batches of {self.batch_size} "
                f"on this rank"
            )
        # A skipped last partial batch holds fewer than batch_size samples.
        self._skip_samples = min(num_batches * self.batch_size, self.num_samples)

    def epoch_indices(self, epoch: int | None = None) -> list[int]:
        """This rank's full index list for ``epoch`` (default: the current one), ignoring skip."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            indices = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            indices = list(range(self.dataset_len))
        if self.drop_last:
            indices = indices[: self.total_size]
        else:
            padding = self.total_size - len(indices)
            if padding:
                # Repeat from the start, as often as needed (more replicas than samples needs several copies).
                indices += (indices * math.ceil(padding / len(indices)))[:padding]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[Any]:
        indices = self.epoch_indices()[self._skip_samples :]
        if self.with_epoch:
            epoch = self.epoch
            return iter([(epoch, i) for i in indices])
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self._skip_samples
