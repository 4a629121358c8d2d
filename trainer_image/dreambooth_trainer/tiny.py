"""A tiny, randomly initialised Stable Diffusion pipeline that tests, the quickstart and benchmarks train.

Everything is made here, offline: the tokenizer's vocab.json/merges.txt are built from code (no hub download),
and every weight comes from a seeded generator, so the same seed gives the same bytes on the same library
versions. The shapes are the smallest that still exercise every code path of real SD training (cross
attention, VAE encode/decode, text encoder, scheduler) at resolution 32 and 64.

CLI: ``dreambooth tiny-model DIR [--seed N] [--prediction-type epsilon|v_prediction] [--family sd|sdxl|flux]``
(the SDXL one: make_tiny_sdxl_model; the Flux one: make_tiny_flux_model).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Bump when the architecture, the vocab or anything else that changes the written bytes changes, so
# caches made by an older version are not reused.
TINY_MODEL_VERSION = "1"

PREDICTION_TYPES = ("epsilon", "v_prediction")
TINY_FAMILIES = ("sd", "sdxl", "flux")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77

# A handful of merges so the words of the prompts the project uses become single tokens (the rest falls back
# to one token per byte, which is still a valid byte-level BPE). Each merge's result is added to the vocab;
# order is merge priority, so prefixes come before the words they build.
_MERGES: tuple[tuple[str, str], ...] = (
    ("s", "k"),
    ("sk", "s</w>"),
    ("d", "o"),
    ("do", "g</w>"),
    ("o", "f</w>"),
    ("p", "h"),
    ("o", "t"),
    ("ph", "ot"),
    ("phot", "o</w>"),
    ("c", "a"),
    ("ca", "t</w>"),
)


# ---------------------------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character map: byte-level BPE works on these characters.

    Printable Latin-1 bytes map to themselves; the others (controls, space, ...) are shifted above 255 so
    every byte has a visible, non-whitespace stand-in.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def build_vocab() -> tuple[dict[str, int], list[str]]:
    """The tokenizer's vocab (token → id) and merges lines, laid out like CLIP's.

    CLIP's order: the 256 byte characters, the same with the end-of-word marker ``</w>``, one token per merge,
    then the two special tokens last (so ``<|endoftext|>`` has the highest id, as in CLIP).
    """
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    tokens += ["".join(pair) for pair in _MERGES]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(set(tokens)) != len(tokens):
        raise AssertionError("tiny vocab has duplicate tokens")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [f"{a} {b}" for a, b in _MERGES]
    return vocab, merges


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt (the files a CLIPTokenizer is made from) into ``folder``."""
    vocab, merges = build_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.json"
    merges_file = folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False, indent=None) + "\n", encoding="utf-8")
    # The header line is part of CLIP's merges.txt format; readers skip a first line starting with '#'.
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def make_tokenizer():  # -> transformers.CLIPTokenizer
    """A CLIPTokenizer over the tiny vocab, max length 77.

    Built from the vocab in memory rather than ``from_pretrained`` of written files: loading records
    load-time options (``local_files_only``, ...) into tokenizer_config.json, which would make the saved bytes
    depend on the environment (HF_HUB_OFFLINE) instead of only on the seed.
    """
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=MAX_LENGTH)


# ------------------------------------------------------------------------------------------------- models


def _tiny_vae(**overrides: Any) -> Any:
    """The 2-block VAE the tiny families share (32 px samples, 4 latent channels unless overridden); call it seeded."""
    from diffusers import AutoencoderKL

    config: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 32,
    }
    return AutoencoderKL(**{**config, **overrides})


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for a model's __init__ without disturbing the caller's RNG state.

    diffusers/transformers initialise weights from the global generator; forking keeps ``make_tiny_model``
    free of side effects on a training process that calls it.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _build_components(seed: int, prediction_type: str, tokenizer) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # Each component gets its own seed so changing one component's shape leaves the others' bytes alone.
    with _seeded(seed * 4 + 0):
        unet = UNet2DConditionModel(
            # Latent size at resolution 32 (VAE factor 2), so the pipeline's default height/width is 32.
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            # diffusers' legacy name: this is the number of heads per block.
            attention_head_dim=(2, 4),
            norm_num_groups=32,
        )
    with _seeded(seed * 4 + 1):
        vae = _tiny_vae()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=32,
        # Pooling finds the EOS by id (not by argmax, CLIP's legacy behaviour for eos_token_id == 2).
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed * 4 + 2):
        text_encoder = CLIPTextModel(text_config)
    # Stable Diffusion's training noise schedule (what train_dreambooth.py loads from the scheduler folder).
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    for model in (unet, vae, text_encoder):
        model.eval()
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


def _ensure_text_encoder_weights(out_dir: Path, encoders: dict[str, Any]) -> None:
    """Write each text encoder's weights where save_pretrained left none: transformers skips a model's weights when
    torch.distributed says this is not rank 0, which left the tiny model of a non-zero rank (e.g. the second pod
    of a gang) without text-encoder weights."""
    from safetensors.torch import save_file

    for name, module in encoders.items():
        folder = out_dir / name
        if not (folder / "model.safetensors").exists():
            folder.mkdir(parents=True, exist_ok=True)
            module.config.to_json_file(folder / "config.json")
            state = {k: v.contiguous() for k, v in module.state_dict().items()}
            save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def make_tiny_model(out_dir: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny random Stable Diffusion pipeline folder to ``out_dir`` and return it.

    Loads with ``StableDiffusionPipeline.from_pretrained(out_dir)`` offline; same seed → same bytes.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, not {seed}")
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    components = _build_components(seed, prediction_type, tokenizer)
    pipe = StableDiffusionPipeline(
        **components,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _ensure_text_encoder_weights(out_dir, {"text_encoder": pipe.text_encoder})
    # The tokenizer's save may write only tokenizer.json; the files the project itself builds are written
    # last so the folder always holds them (older transformers and other tools read them).
    write_tokenizer_files(out_dir / "tokenizer")
    return out_dir


# ------------------------------------------------------------------------------------------ tiny SDXL

# A tiny, randomly initialised Stable Diffusion XL pipeline (`--family sdxl`): SDXL's shape at toy size, a UNet
# conditioned on `text_time` (pooled text embeddings + the six add_time_ids), CLIPTextModel +
# CLIPTextModelWithProjection whose penultimate hidden states are concatenated (32 + 32 = the UNet's
# cross-attention width 64), the project's tokenizer twice, a VAE and SDXL's Euler scheduler.
TINY_SDXL_VERSION = "1"
# add_time_ids are six numbers (original h, w, crop top, left, target h, w), each embedded in this width;
# with the second text encoder's projection (32) they make the UNet's added-embedding input.
ADDITION_TIME_EMBED_DIM = 8
PROJECTION_DIM = 32


def _text_config(tokenizer, hidden: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=PROJECTION_DIM,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_tiny_sdxl_model(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random SDXL pipeline folder to ``out_dir`` and return it."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, not {seed}")
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    with _seeded(seed * 5 + 0):
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + PROJECTION_DIM,
            cross_attention_dim=64,
            norm_num_groups=32,
        )
    with _seeded(seed * 5 + 1):
        vae = _tiny_vae(scaling_factor=0.13025)  # SDXL's VAE factor
    with _seeded(seed * 5 + 2):
        text_encoder = CLIPTextModel(_text_config(tokenizer, 32))
    with _seeded(seed * 5 + 3):
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, 32))
    # SDXL base's scheduler folder (the script loads DDPMScheduler from it, or Euler for EDM-style training).
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
    )
    for model in (unet, vae, text_encoder, text_encoder_2):
        model.eval()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=make_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # The project's tokenizer files last, as in make_tiny_model.
    _ensure_text_encoder_weights(out_dir, {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2})
    write_tokenizer_files(out_dir / "tokenizer")
    write_tokenizer_files(out_dir / "tokenizer_2")
    return out_dir


# ------------------------------------------------------------------------------------------ tiny Flux

# A tiny, randomly initialised Flux.1 pipeline (`--family flux`): FluxTransformer2DModel with a guidance embedding
# (dev's shape: guidance-distilled), a 16-channel VAE with Flux's shift and scale, CLIPTextModel (pooled
# projection) + T5EncoderModel (the sequence the transformer attends to), the project's CLIP tokenizer and a T5
# tokenizer built here with the `tokenizers` package (a tokenizer.json: T5TokenizerFast reads it, no
# sentencepiece), and Flux's FlowMatchEulerDiscreteScheduler.
TINY_FLUX_VERSION = "1"
FLUX_LATENT_CHANNELS = 16
# T5-XXL's tokenizer says 512; FluxPipeline refuses more.
T5_MAX_LENGTH = 512
# T5's special ids (pad 0, eos 1, unk 2), then whole words of the project's prompts, then single characters.
_T5_WORDS = ("a", "photo", "of", "sks", "dog", "cat", "in", "the", "on", "beach")


def build_t5_tokenizer():  # -> tokenizers.Tokenizer
    """A T5-style Unigram tokenizer (Metaspace pre-tokenizer, ``</s>`` appended) over a tiny vocab."""
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in _T5_WORDS]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + "\u2581"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return tok


def write_t5_tokenizer_files(folder: Path) -> None:
    """tokenizer.json and the config T5TokenizerFast.from_pretrained(folder) needs (no spiece.model)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        stale.unlink()
    build_t5_tokenizer().save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": T5_MAX_LENGTH, "extra_ids": 0,
              "additional_special_tokens": [], **special}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1, sort_keys=True) + "\n")


def make_tiny_flux_model(out_dir: Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Write a tiny random Flux pipeline folder to ``out_dir`` and return it (dev's shape; ``guidance_embeds=False``
    gives schnell's, without a guidance embedding)."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, not {seed}")
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        write_t5_tokenizer_files(Path(tmp))
        tokenizer_2 = T5TokenizerFast.from_pretrained(tmp)
    with _seeded(seed * 5 + 0):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=FLUX_LATENT_CHANNELS * 4,  # 2x2 latent patches, packed
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5's d_model
            pooled_projection_dim=32,  # CLIP's pooled output
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )
    with _seeded(seed * 5 + 1):
        # Flux's VAE: 16 latent channels, no quant convs, latents shifted then scaled.
        vae = _tiny_vae(
            latent_channels=FLUX_LATENT_CHANNELS, shift_factor=0.1159, scaling_factor=0.3611,
            use_quant_conv=False, use_post_quant_conv=False,
        )  # fmt: skip
    with _seeded(seed * 5 + 2):
        text_encoder = CLIPTextModel(_text_config(tokenizer, 32))
    with _seeded(seed * 5 + 3):
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            )
        )  # fmt: skip
    # FLUX.1-dev's scheduler folder: shift 3, resolution-dependent shifting at inference.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    for model in (transformer, vae, text_encoder, text_encoder_2):
        model.eval()
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, transformer=transformer,
    )  # fmt: skip
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # The project's tokenizer files last, as in make_tiny_model.
    _ensure_text_encoder_weights(out_dir, {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2})
    write_tokenizer_files(out_dir / "tokenizer")
    write_t5_tokenizer_files(out_dir / "tokenizer_2")
    return out_dir


# ------------------------------------------------------------------------------------------ sample images

# The instance subject: one particular dog (golden coat, dark ears, white chest), seen in different poses
# and places, the way DreamBooth instance photos show one subject. Class images are assorted other dogs.
_INSTANCE_COAT = ((201, 146, 72), (92, 58, 30), (245, 240, 228))
_CLASS_COATS = (
    ((40, 40, 44), (20, 20, 22), (210, 210, 210)),
    ((235, 232, 225), (150, 120, 100), (255, 255, 255)),
    ((128, 128, 136), (70, 70, 78), (200, 200, 205)),
    ((150, 82, 40), (60, 35, 20), (230, 200, 170)),
    ((215, 190, 140), (170, 120, 70), (250, 245, 235)),
)
_BACKGROUNDS = (
    ((150, 200, 240), (90, 160, 70)),  # sky, grass
    ((235, 225, 205), (170, 130, 90)),  # wall, wooden floor
    ((200, 220, 235), (225, 215, 170)),  # haze, sand
    ((60, 70, 110), (50, 90, 50)),  # dusk, dark grass
    ((245, 215, 215), (140, 140, 150)),  # pink wall, grey floor
    ((190, 230, 200), (110, 100, 90)),  # mint wall, stone
)
_SAMPLE_SIZE = 64
_SUPERSAMPLE = 4  # drawn at 4x and downsampled: smooth edges without an antialiasing drawer


def _draw_dog(rng, coat: tuple[tuple[int, int, int], ...], background: tuple[tuple[int, int, int], ...]):
    from PIL import Image, ImageDraw

    s = _SAMPLE_SIZE * _SUPERSAMPLE
    sky, ground = background
    fur, ears, chest = coat
    image = Image.new("RGB", (s, s), sky)
    draw = ImageDraw.Draw(image)
    horizon = int(s * rng.uniform(0.55, 0.7))
    draw.rectangle((0, horizon, s, s), fill=ground)

    def u(v: float) -> int:
        return int(round(v * s / _SAMPLE_SIZE))

    scale = rng.uniform(0.8, 1.1)
    facing = 1 if rng.random() < 0.5 else -1  # head on the right (1) or on the left (-1)
    cx = _SAMPLE_SIZE / 2 + rng.uniform(-6, 6)
    cy = _SAMPLE_SIZE * 0.6 + rng.uniform(-4, 4)
    body_w, body_h = 26 * scale, 12 * scale
    leg_h, leg_w = 9 * scale, 3.2 * scale

    # Legs first so the body overlaps their tops.
    for fx in (-0.38, -0.22, 0.22, 0.38):
        lx = cx + fx * body_w
        draw.rectangle((u(lx - leg_w / 2), u(cy), u(lx + leg_w / 2), u(cy + body_h / 2 + leg_h)), fill=fur)
    # Tail: a raised, slightly random wedge at the back.
    tail_angle = rng.uniform(0.3, 1.2)
    tx, ty = cx - facing * body_w / 2, cy - body_h / 4
    tip = (tx - facing * 9 * scale * math.cos(tail_angle), ty - 9 * scale * math.sin(tail_angle))
    draw.line((u(tx), u(ty), u(tip[0]), u(tip[1])), fill=fur, width=u(2.5 * scale))
    draw.ellipse((u(cx - body_w / 2), u(cy - body_h / 2), u(cx + body_w / 2), u(cy + body_h / 2)), fill=fur)
    # Chest patch, then head, snout, ear, eye, nose.
    px = cx + facing * body_w * 0.3
    draw.ellipse((u(px - 4 * scale), u(cy - 3 * scale), u(px + 4 * scale), u(cy + 5 * scale)), fill=chest)
    hx, hy, hr = cx + facing * body_w * 0.45, cy - body_h * 0.75, 7 * scale
    draw.ellipse((u(hx - hr), u(hy - hr), u(hx + hr), u(hy + hr)), fill=fur)
    sx = hx + facing * hr * 0.9
    draw.ellipse((u(sx - 4 * scale), u(hy), u(sx + 4 * scale), u(hy + 5 * scale)), fill=fur)
    ex = hx - facing * hr * 0.35
    draw.ellipse((u(ex - 3 * scale), u(hy - hr * 0.6), u(ex + 3 * scale), u(hy + hr * 0.9)), fill=ears)
    eye_x = hx + facing * hr * 0.35
    draw.ellipse((u(eye_x - 1.2), u(hy - 2.8), u(eye_x + 1.2), u(hy - 0.4)), fill=(15, 15, 15))
    nx = sx + facing * 3.2 * scale
    draw.ellipse((u(nx - 1.6), u(hy + 0.2), u(nx + 1.6), u(hy + 2.6)), fill=(10, 10, 10))
    return image.resize((_SAMPLE_SIZE, _SAMPLE_SIZE), resample=Image.Resampling.LANCZOS)


def write_sample_images(out_dir: Path, n: int = 4, *, kind: str = "instance", seed: int = 0) -> list[Path]:
    """Write ``n`` small 64x64 PNG dog drawings to ``out_dir`` and return their paths (sorted).

    ``kind="instance"``: the same dog in different poses and places (``dog-00.png``, ...); ``kind="class"``:
    assorted dogs for prior preservation (``class-dog-00.png``, ...). Same arguments → same bytes.
    """
    import numpy as np

    if kind not in ("instance", "class"):
        raise ValueError(f"kind must be 'instance' or 'class', not {kind!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0 if kind == "instance" else 1])
    prefix = "dog" if kind == "instance" else "class-dog"
    paths = []
    for i in range(n):
        coat = _INSTANCE_COAT if kind == "instance" else _CLASS_COATS[i % len(_CLASS_COATS)]
        background = _BACKGROUNDS[(i + (0 if kind == "instance" else 3)) % len(_BACKGROUNDS)]
        path = out_dir / f"{prefix}-{i:02d}.png"
        # optimize=True: smaller files; PNG encoding has no timestamps, so the bytes are reproducible.
        _draw_dog(rng, coat, background).save(path, format="PNG", optimize=True)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------- cache


def default_cache_root() -> Path:
    env = os.environ.get("DREAMBOOTH_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dreambooth-operator"


def tiny_model_dirname(prediction_type: str = "epsilon", family: str = "sd") -> str:
    if family == "sdxl":
        return f"tiny-sdxl-model-{TINY_SDXL_VERSION}"
    if family == "flux":
        return f"tiny-flux-model-{TINY_FLUX_VERSION}"
    suffix = "" if prediction_type == "epsilon" else f"-{prediction_type}"
    return f"tiny-model-{TINY_MODEL_VERSION}{suffix}"


def tiny_uri_model(uri: str) -> tuple[str, str]:
    """(family, prediction type) of a ``tiny://`` model name: tiny://, tiny://v_prediction, tiny://sdxl,
    tiny://flux (flow matching: its "prediction type" is only the cache's name)."""
    name = uri.removeprefix("tiny://") or "epsilon"
    if name in ("sdxl", "flux"):
        return name, "epsilon"
    return "sd", name


def make_family_model(out_dir: Path, *, family: str = "sd", seed: int = 0, prediction_type: str = "epsilon") -> Path:
    if family not in TINY_FAMILIES:
        raise ValueError(f"family must be one of {TINY_FAMILIES}, not {family!r}")
    if family == "sdxl":
        if prediction_type != "epsilon":
            raise ValueError("the tiny SDXL model predicts epsilon only")
        return make_tiny_sdxl_model(out_dir, seed=seed)
    if family == "flux":
        if prediction_type != "epsilon":
            raise ValueError("the tiny Flux model is trained by flow matching; it takes no prediction type")
        return make_tiny_flux_model(out_dir, seed=seed)
    return make_tiny_model(out_dir, seed=seed, prediction_type=prediction_type)


def _is_complete(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def ensure_tiny_model(cache_dir: Path | None = None, prediction_type: str = "epsilon", family: str = "sd") -> Path:
    """Return the cached tiny model (seed 0), making it on first use.

    ``cache_dir`` is the cache root (default ``$DREAMBOOTH_CACHE`` or ``~/.cache/dreambooth-operator``); the
    model lives in ``<root>/tiny-model-<version>[-v_prediction]``. Safe when processes race: the model is
    written to a temporary sibling folder and renamed into place (a reader never sees a half-written model),
    and a file lock keeps the others from doing the same work at the same time.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    final = root / tiny_model_dirname(prediction_type, family)
    if _is_complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    lock_path = root / f".{final.name}.lock"
    with open(lock_path, "a+") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if _is_complete(final):
                return final
            if final.exists():
                # Our own writes appear only by rename, complete; a folder without model_index.json was put
                # there by something else, so move it aside rather than delete what we did not make.
                aside = final.with_name(f"{final.name}.incomplete-{os.getpid()}-{int(time.time())}")
                logger.warning("tiny model cache %s is incomplete; moving it to %s", final, aside)
                final.rename(aside)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
            try:
                make_family_model(tmp, family=family, seed=0, prediction_type=prediction_type)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return final


# --------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", type=Path, help="folder to write the pipeline into (created)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed; the same seed gives the same bytes")
    parser.add_argument(
        "--prediction-type",
        "--prediction_type",
        dest="prediction_type",
        choices=PREDICTION_TYPES,
        default="epsilon",
        help="the scheduler's prediction_type (what the UNet is trained to predict)",
    )
    parser.add_argument(
        "--family",
        choices=TINY_FAMILIES,
        default="sd",
        help="sd: Stable Diffusion 1.x/2.x (StableDiffusionPipeline); sdxl: StableDiffusionXLPipeline; flux: "
        "FluxPipeline (Flux.1-dev's shape)",
    )
    parser.add_argument(
        "--preset",
        choices=("tiny", "sd15-full"),
        default="tiny",
        help="tiny (default): test-sized; sd15-full: Stable Diffusion 1.5's real shapes with random weights (~4.3 GB, "
        "for start-up and GPU benchmarks)",
    )


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    family = getattr(args, "family", "sd")
    try:
        out = make_family_model(args.dir, family=family, seed=args.seed, prediction_type=args.prediction_type)
    except ValueError as exc:
        print(f"error: --prediction-type: {exc}", file=sys.stderr)
        return 64
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    kind = {"sdxl": "Stable Diffusion XL", "flux": "Flux"}.get(family, "Stable Diffusion")
    print(
        f"wrote tiny {kind} pipeline to {out} ({size / 1e6:.1f} MB, "
        f"{time.perf_counter() - start:.1f} s, seed {args.seed}, {args.prediction_type})"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dreambooth tiny-model", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
