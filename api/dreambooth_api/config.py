"""The typed trainer config: the one definition the CLI flags and the manifest's ``spec.training`` derive from.

One model per diffusers script, so each keeps its own flag names and defaults:
``FullConfig`` mirrors ``train_dreambooth.py`` (``dreambooth train``), ``LoraConfig`` mirrors
``train_dreambooth_lora.py`` (``dreambooth train-lora``) and ``SdxlLoraConfig`` mirrors
``train_dreambooth_lora_sdxl.py`` (``dreambooth train-lora-sdxl``, ``spec.method: lora-sdxl``) and ``FluxLoraConfig``
mirrors ``train_dreambooth_lora_flux.py`` (``dreambooth train-lora-flux``, ``spec.method: lora-flux``). Field names
are the scripts' snake_case flags; the
manifest uses the same fields in camelCase. Importable without torch: the operator uses it to build the CRD.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from .contract import BadInputError

Method = Literal["full", "lora", "lora-sdxl", "lora-flux"]
MixedPrecision = Literal["no", "fp16", "bf16"]
PriorPrecision = Literal["no", "fp32", "fp16", "bf16"]
LrScheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
ValidationScheduler = Literal["DPMSolverMultistepScheduler", "DDPMScheduler"]
# train_dreambooth_lora.py offers torchvision's InterpolationMode names, lower-cased; train_dreambooth.py always
# resizes with bilinear.
InterpolationMode = Literal["bicubic", "bilinear", "box", "hamming", "lanczos", "nearest", "nearest_exact"]


class ConfigError(ValueError, BadInputError):
    """Bad trainer input, found before any work starts. Maps to the launcher's bad-input exit code (64)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{flag_and_field(field)}: {message}")


def flag_and_field(field: str) -> str:
    """Name a setting the way both audiences know it: the CLI flag and the manifest path."""
    if len(field) > 80:  # an unknown key is user input too: never echo all of it
        field = field[:77] + "..."
    return f"--{field} (spec.training.{to_camel(field)})"


# Bounds the libraries need: beyond them a run dies late (MemoryError, overflow) instead of exiting 64 at once.
MAX_RESOLUTION = 4096
MAX_STEPS = 10**9
MAX_ACCUMULATION = 10**6
QUOTE_LIMIT = 200  # characters of the user's input a message repeats
URI_SCHEMES = ("s3://", "file://")
PATH_FIELDS = ("output_dir", "instance_data_dir", "class_data_dir", "pretrained_model_name_or_path", "logging_dir")


def quote(value: Any) -> str:
    """repr() of user input, cut to QUOTE_LIMIT characters: a message never echoes a whole bad document."""
    text = repr(value)
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."


def _f(default: Any, help: str, **kw: Any) -> Any:
    return Field(default, description=help, **kw)


class CommonConfig(BaseModel):
    """Flags shared by both scripts, with the defaults both scripts give them."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=False,
        # `trainBatchSize: true` was silently 1 and `maxTrainSteps: 1e30` an int: a manifest says what it means.
        strict=True,
    )

    # Which diffusers script this model mirrors; not a flag.
    method: ClassVar[Method]
    script: ClassVar[str]

    pretrained_model_name_or_path: str = Field(
        ..., description="Path to a diffusers pipeline folder (local or s3://), or a hub model id."
    )
    revision: str | None = _f(None, "Revision of the pretrained model on the hub.")
    variant: str | None = _f(None, "Variant of the model files, e.g. fp16.")
    tokenizer_name: str | None = _f(None, "Tokenizer name or path if not the same as the model's.")
    instance_data_dir: str = Field(..., description="Folder (local or s3://) holding the instance images.")
    class_data_dir: str | None = _f(None, "Folder (local or s3://) holding the class images for prior preservation.")
    instance_prompt: str = Field(
        ..., description="Prompt with the identifier of the instance, e.g. 'a photo of sks dog'."
    )
    class_prompt: str | None = _f(None, "Prompt of the class, e.g. 'a photo of dog'; used to generate class images.")
    with_prior_preservation: bool = _f(False, "Add the prior-preservation loss on class images.")
    prior_loss_weight: float = _f(1.0, "Weight of the prior-preservation loss.", ge=0)
    num_class_images: int = _f(
        100, "Minimal number of class images; missing ones are generated with class_prompt.", ge=1
    )
    output_dir: str = _f("dreambooth-model", "Where the model, checkpoints and images are written (local or s3://).")
    seed: int | None = _f(
        None, "Seed for reproducible training. Exact resume is guaranteed with or without it.", ge=0, le=2**32 - 1
    )
    resolution: int = _f(512, "Resolution of the training images (multiple of 8).", ge=8)
    center_crop: bool = _f(False, "Center crop the images instead of random crops.")
    train_text_encoder: bool = _f(False, "Train the text encoder too (needs fp32 text encoder weights).")
    train_batch_size: int = _f(4, "Batch size per device.", ge=1)
    sample_batch_size: int = _f(4, "Batch size per device when generating class images.", ge=1)
    num_train_epochs: int = _f(1, "Epochs to train; max_train_steps overrides it.", ge=1, le=MAX_STEPS)
    max_train_steps: int | None = _f(None, "Total optimizer steps; overrides num_train_epochs.", ge=1, le=MAX_STEPS)
    checkpointing_steps: int | Literal["auto"] = _f(
        500,
        "Save a resumable checkpoint every N optimizer steps, or 'auto' to pick the interval from the measured "
        "checkpoint cost and expectedPreemptionIntervalSeconds.",
    )
    checkpoints_total_limit: int | None = _f(None, "Keep at most this many complete checkpoints.", ge=0)
    resume_from_checkpoint: str | None = _f(
        None, "'latest', or a checkpoint folder name like 'checkpoint-400'. Automatic when the output holds any."
    )
    gradient_accumulation_steps: int = _f(1, "Micro-batches accumulated per optimizer step.", ge=1, le=MAX_ACCUMULATION)
    gradient_checkpointing: bool = _f(False, "Trade compute for memory with activation checkpointing.")
    learning_rate: float = _f(5e-6, "Initial learning rate (after warmup).", gt=0)
    scale_lr: bool = _f(False, "Scale the learning rate by processes x accumulation x batch size.")
    # The scripts take any string and let diffusers' get_scheduler reject it mid-setup; these are the names that
    # work there (piecewise_constant also parses, but the scripts pass it no step rules, so it crashes).
    lr_scheduler: LrScheduler = _f("constant", "Learning-rate schedule.")
    lr_warmup_steps: int = _f(500, "Warmup steps of the learning-rate schedule.", ge=0)
    lr_num_cycles: int = _f(1, "Hard resets of cosine_with_restarts.", ge=1)
    lr_power: float = _f(1.0, "Power of the polynomial schedule.")
    use_8bit_adam: bool = _f(False, "Use bitsandbytes' 8-bit AdamW (needs bitsandbytes and a GPU).")
    dataloader_num_workers: int = _f(0, "DataLoader worker processes (0 = main process).", ge=0)
    adam_beta1: float = _f(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = _f(0.999, "AdamW beta2.", ge=0, lt=1)
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay.")
    adam_epsilon: float = _f(1e-08, "AdamW epsilon.", gt=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    push_to_hub: bool = _f(False, "Push the final model to the Hugging Face Hub.")
    hub_token: str | None = _f(None, "Hub token (prefer the HF_TOKEN environment variable).")
    hub_model_id: str | None = _f(None, "Hub repository name.")
    logging_dir: str = _f("logs", "TensorBoard log folder, relative to output_dir.")
    allow_tf32: bool = _f(False, "Allow TF32 matmuls on Ampere or newer GPUs.")
    report_to: str = _f("tensorboard", "Trackers: tensorboard, wandb, comet_ml, all, or none.")
    validation_prompt: str | None = _f(None, "Prompt used for validation images.")
    num_validation_images: int = _f(4, "Images generated per validation.", ge=0)
    mixed_precision: MixedPrecision | None = _f(None, "Mixed precision: no, fp16 (GPU only) or bf16.")
    prior_generation_precision: PriorPrecision | None = _f(
        None, "Precision for generating class images; fp16 on GPU, fp32 on CPU by default."
    )
    local_rank: int = _f(-1, "Set by the launcher; accepted for compatibility.")
    enable_xformers_memory_efficient_attention: bool = _f(False, "Use xformers attention (needs xformers).")
    pre_compute_text_embeddings: bool = _f(False, "Encode the prompts once and free the text encoder.")
    tokenizer_max_length: int | None = _f(None, "Tokenizer max length (default: the tokenizer's).", ge=1)
    text_encoder_use_attention_mask: bool = _f(False, "Pass the attention mask to the text encoder.")
    validation_images: list[str] | None = _f(None, "DeepFloyd IF only; refused for Stable Diffusion.")
    class_labels_conditioning: str | None = _f(None, "DeepFloyd IF only; refused for Stable Diffusion.")

    # Our extensions (not in diffusers' scripts); defaults keep diffusers' behaviour.
    snr_gamma: float | None = _f(None, "Min-SNR weighting gamma (5.0 recommended); off when unset.", gt=0)
    cache_latents: bool = _f(
        False, "Encode every training image with the VAE once and reuse the latents (needs center_crop)."
    )
    expected_preemption_interval_seconds: float = _f(
        3600.0, "Mean time between preemptions, used by checkpointing_steps='auto'.", gt=0
    )
    unsafe_shared_output: bool = _f(
        False,
        "Run on an S3 server that ignores conditional writes (If-None-Match), where nothing stops two runs from "
        "writing one output_dir at once.",
    )
    skip_bad_images: bool = _f(
        False, "Skip (and count) instance or class images that cannot be read, instead of failing the run (exit 64)."
    )
    allow_large_resolution: bool = _f(
        False,
        f"Allow a resolution above {MAX_RESOLUTION} (memory grows with its square: {MAX_RESOLUTION} needs a large GPU).",
    )
    adam_fused: bool | None = _f(
        None,
        "AdamW's fused kernel (faster; other rounding than the foreach AdamW of diffusers' scripts). Unset: fused on "
        "CPU and, for a new run, on CUDA; a resumed run keeps what its checkpoints were trained with.",
    )
    compile: bool | None = _f(
        None,
        "torch.compile the UNet (or transformer): faster steps after a compile of a minute or more, other rounding "
        "than eager. Unset: off, or what a resumed run's checkpoints were trained with.",
    )

    @model_validator(mode="after")
    def _cross_field_rules(self) -> CommonConfig:
        check_rules(self)
        return self

    # ----- derived views -----
    @property
    def resize_interpolation(self) -> InterpolationMode:
        """The filter that resizes training images: train_dreambooth.py hard-codes bilinear."""
        return "bilinear"

    def cli_args(self) -> list[str]:
        """The flags that reproduce this config (only non-default values), for torchrun command lines."""
        out: list[str] = []
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if value == info.get_default(call_default_factory=True) and not info.is_required():
                continue
            if isinstance(value, bool):
                if info.get_default() is not False:  # a switch defaulting on or unset takes a value (cli_args)
                    out.extend([f"--{name}", str(value).lower()])
                elif value:
                    out.append(f"--{name}")
            elif isinstance(value, list):
                out.append(f"--{name}")
                out.extend(str(v) for v in value)
            elif value is not None:
                out.extend([f"--{name}", str(value)])
        return out

    def to_training_spec(self) -> dict[str, Any]:
        """The manifest's ``spec.training`` for this config (camelCase, only non-default values)."""
        return self.model_dump(by_alias=True, exclude_defaults=True, mode="json")


# Numerics choices added after checkpoints existed (issue 27): hashed only once set, so that the checkpoints of
# earlier releases keep their hash. The trainer sets them before hashing (dreambooth_trainer.numerics).
UNSET_UNHASHED_FIELDS = ("adam_fused", "compile")

# Fields that change neither the data order nor the math of an optimizer step: editing them between attempts
# keeps a resume exact, so they stay out of the config hash.
OPERATIONAL_FIELDS = frozenset(
    {
        "output_dir", "resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit", "logging_dir",
        "report_to", "validation_prompt", "num_validation_images", "validation_steps", "validation_epochs",
        "validation_scheduler", "push_to_hub", "hub_token", "hub_model_id", "dataloader_num_workers", "local_rank",
        "sample_batch_size", "prior_generation_precision", "skip_save_text_encoder", "gradient_checkpointing",
        "enable_xformers_memory_efficient_attention", "allow_tf32", "expected_preemption_interval_seconds",
        "instance_data_dir", "class_data_dir", "pretrained_model_name_or_path", "allow_large_resolution",
        "skip_bad_images", "unsafe_shared_output", "cache_dir", "pretrained_vae_model_name_or_path", "dataset_name",
        "output_kohya_format", "upcast_before_saving", "enable_npu_flash_attention",
    }
)  # fmt: skip


def config_hash(config: CommonConfig) -> str:
    """Identity of a training run's math: two configs with the same hash resume each other's checkpoints."""
    data = {k: v for k, v in config.model_dump(mode="json").items() if k not in OPERATIONAL_FIELDS}
    for name in UNSET_UNHASHED_FIELDS:
        if data.get(name) is None:
            # Unset, these keep the optimizer and UNet of the releases before them: so do the hashes.
            data.pop(name, None)
    data["method"] = config.method
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class FullConfig(CommonConfig):
    """``train_dreambooth.py``: full fine-tune of the UNet (and optionally the text encoder)."""

    method: ClassVar[Method] = "full"
    script: ClassVar[str] = "train_dreambooth.py"

    validation_steps: int = _f(100, "Run validation every N steps.", ge=1)
    validation_scheduler: ValidationScheduler = _f("DPMSolverMultistepScheduler", "Scheduler for validation.")
    set_grads_to_none: bool = _f(False, "Set gradients to None instead of zero (saves memory).")
    offset_noise: bool = _f(False, "Fine-tune against offset noise.")
    skip_save_text_encoder: bool = _f(False, "Do not save the text encoder in the final pipeline.")


class LoraConfig(CommonConfig):
    """``train_dreambooth_lora.py``: LoRA adapters on the UNet (and optionally the text encoder)."""

    method: ClassVar[Method] = "lora"
    script: ClassVar[str] = "train_dreambooth_lora.py"

    output_dir: str = _f("lora-dreambooth-model", "Where the LoRA weights, checkpoints and images are written.")
    learning_rate: float = _f(5e-4, "Initial learning rate (after warmup).", gt=0)
    validation_epochs: int = _f(50, "Run validation every N epochs.", ge=1)
    rank: int = _f(4, "Dimension of the LoRA update matrices.", ge=1)
    lora_dropout: float = _f(0.0, "Dropout probability of the LoRA layers (UNet and text encoder).", ge=0, le=1)
    image_interpolation_mode: InterpolationMode = _f(
        "lanczos", "Filter that resizes the training images (instance and class) to the resolution."
    )

    @property
    def resize_interpolation(self) -> InterpolationMode:
        return self.image_interpolation_mode


class ScriptLoraConfig(LoraConfig):
    """The flags the SDXL and Flux LoRA scripts share beyond the SD one: an image folder with captions in place of
    the instance folder, repeats and flips (both part of the data order), prodigy, and the text encoders' own
    learning rate and weight decay. Each family's script subclasses it."""

    instance_data_dir: str | None = _f(  # type: ignore[assignment]
        None, "Folder (local or s3://) holding the instance images (required unless dataset_name is given)."
    )
    dataset_name: str | None = _f(
        None,
        "An image folder (local or s3://, the imagefolder convention) with a metadata.jsonl of captions, in place of "
        "instance_data_dir; Hub dataset names are refused (no Hub access here).",
    )
    dataset_config_name: str | None = _f(None, "Hub dataset config name (Hub datasets are not supported here).")
    cache_dir: str | None = _f(None, "Where downloaded models and datasets are cached.")
    image_column: str = _f("image", "The dataset column holding the images (with dataset_name).")
    caption_column: str | None = _f(None, "The dataset column holding the captions (with dataset_name).")
    repeats: int = _f(1, "How many times each training image is repeated per epoch.", ge=1, le=MAX_STEPS)
    random_flip: bool = _f(False, "Flip training images horizontally at random.")
    learning_rate: float = _f(1e-4, "Initial learning rate (after warmup).", gt=0)
    text_encoder_lr: float = _f(5e-6, "Learning rate of the text encoders' LoRA (with train_text_encoder).", gt=0)
    optimizer: str = _f("AdamW", "AdamW or prodigy; any other value warns and falls back to AdamW, as the script does.")
    prodigy_beta3: float | None = _f(None, "Prodigy's beta3 (default: sqrt(beta2)).")
    prodigy_decouple: bool = _f(True, "Prodigy: decoupled weight decay (AdamW style).")
    prodigy_use_bias_correction: bool = _f(True, "Prodigy: Adam's bias correction.")
    prodigy_safeguard_warmup: bool = _f(True, "Prodigy: remove the learning rate from D's estimate in warmup.")
    adam_weight_decay: float = _f(1e-04, "AdamW weight decay of the trained model's parameters.")
    adam_weight_decay_text_encoder: float = _f(1e-03, "AdamW weight decay of the text encoders' parameters.")

    @property
    def uses_prodigy(self) -> bool:
        return self.optimizer.lower() == "prodigy"


class SdxlLoraConfig(ScriptLoraConfig):
    """``train_dreambooth_lora_sdxl.py``: LoRA on the SDXL UNet (and optionally both text encoders)."""

    method: ClassVar[Method] = "lora-sdxl"
    script: ClassVar[str] = "train_dreambooth_lora_sdxl.py"

    pretrained_vae_model_name_or_path: str | None = _f(
        None, "A VAE folder (local or s3://) to use in place of the model's, e.g. an fp16-safe SDXL VAE."
    )
    resolution: int = _f(1024, "Resolution of the training images (multiple of 8).", ge=8)
    adam_weight_decay: float = _f(1e-04, "AdamW weight decay of the UNet's parameters.")
    use_dora: bool = _f(False, "Train DoRA (weight-decomposed LoRA) adapters instead of plain LoRA.")
    do_edm_style_training: bool = _f(False, "Train with the EDM formulation (Karras et al. 2022) on Euler sigmas.")
    output_kohya_format: bool = _f(False, "Also write the LoRA in kohya's format (pytorch_lora_weights_kohya).")


WeightingScheme = Literal["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"]


class FluxLoraConfig(ScriptLoraConfig):
    """``train_dreambooth_lora_flux.py``: LoRA on the Flux transformer (and optionally the CLIP text encoder)."""

    method: ClassVar[Method] = "lora-flux"
    script: ClassVar[str] = "train_dreambooth_lora_flux.py"

    output_dir: str = _f("flux-dreambooth-lora", "Where the LoRA weights, checkpoints and images are written.")
    # The Flux script resizes with bilinear; ours keeps the LoRA script's flag, defaulting to the Flux script's filter.
    image_interpolation_mode: InterpolationMode = _f(
        "bilinear", "Filter that resizes the training images (instance and class) to the resolution."
    )
    text_encoder_lr: float = _f(5e-6, "Learning rate of the CLIP text encoder's LoRA (with train_text_encoder).", gt=0)
    adam_weight_decay: float = _f(1e-04, "AdamW weight decay of the transformer's parameters.")
    adam_weight_decay_text_encoder: float = _f(1e-03, "AdamW weight decay of the text encoder's parameters.")
    max_sequence_length: int = _f(512, "Maximum sequence length of the T5 text encoder's prompt.", ge=1)
    guidance_scale: float = _f(
        3.5, "Guidance the transformer is conditioned on (FLUX.1-dev is guidance-distilled); ignored without it."
    )
    weighting_scheme: WeightingScheme = _f(
        "none", "How timesteps are sampled (logit_normal, mode) or the loss weighted (sigma_sqrt, cosmap)."
    )
    logit_mean: float = _f(0.0, "Mean of the logit_normal weighting scheme.")
    logit_std: float = _f(1.0, "Standard deviation of the logit_normal weighting scheme.")
    mode_scale: float = _f(1.29, "Scale of the mode weighting scheme.")
    lora_alpha: int = _f(4, "LoRA alpha (the adapters' scaling is alpha / rank).", ge=1)
    lora_layers: str | None = _f(
        None,
        "Comma-separated transformer modules to train LoRA on, e.g. 'attn.to_k,attn.to_q' (default: the script's).",
    )
    upcast_before_saving: bool = _f(False, "Upcast the trained transformer's LoRA to fp32 before the final save.")
    enable_npu_flash_attention: bool = _f(False, "Flash attention on an Ascend NPU (refused: no NPU support here).")


MODELS: dict[str, type[CommonConfig]] = {
    "full": FullConfig, "lora": LoraConfig, "lora-sdxl": SdxlLoraConfig, "lora-flux": FluxLoraConfig,
}  # fmt: skip
# Settings of the SD scripts that the SDXL script does not have and that make no sense for SDXL's two encoders.
SD_ONLY_FIELDS = (
    "tokenizer_name",
    "pre_compute_text_embeddings",
    "tokenizer_max_length",
    "text_encoder_use_attention_mask",
)
IF_ONLY_FIELDS = ("validation_images", "class_labels_conditioning")


def check_rules(cfg: CommonConfig) -> None:
    """Rules the field types cannot express. Each names the flag, the manifest field and the fix."""
    for name in IF_ONLY_FIELDS:
        if getattr(cfg, name) is not None:
            raise ConfigError(name, "applies only to DeepFloyd IF, which this trainer does not support; remove it.")
    if cfg.resolution > MAX_RESOLUTION and not cfg.allow_large_resolution:
        raise ConfigError(
            "resolution",
            f"{cfg.resolution} is above {MAX_RESOLUTION}; memory grows with its square. Use {MAX_RESOLUTION} or "
            "less, or set --allow_large_resolution (spec.training.allowLargeResolution: true) if you mean it.",
        )
    for name in PATH_FIELDS:
        check_location(name, getattr(cfg, name))
    if cfg.resolution % 8:
        lower = cfg.resolution - cfg.resolution % 8
        raise ConfigError(
            "resolution",
            f"{cfg.resolution} is not a multiple of 8 (the VAE downsamples by 8); use {lower} or {lower + 8}.",
        )
    if cfg.with_prior_preservation:
        if not cfg.class_data_dir:
            raise ConfigError(
                "class_data_dir", "is required with --with_prior_preservation: a folder for class images."
            )
        if not cfg.class_prompt:
            raise ConfigError("class_prompt", "is required with --with_prior_preservation, e.g. 'a photo of dog'.")
    if cfg.train_text_encoder and cfg.pre_compute_text_embeddings:
        raise ConfigError(
            "pre_compute_text_embeddings", "cannot be used with --train_text_encoder; drop one of the two."
        )
    if isinstance(cfg.checkpointing_steps, int) and cfg.checkpointing_steps < 1:
        raise ConfigError(
            "checkpointing_steps", f"must be a positive number of steps or 'auto', not {cfg.checkpointing_steps}."
        )
    if cfg.cache_latents and not cfg.center_crop:
        raise ConfigError("cache_latents", "needs --center_crop (random crops change the latents every epoch).")
    if isinstance(cfg, SdxlLoraConfig):
        check_sdxl_rules(cfg)
    if isinstance(cfg, FluxLoraConfig):
        check_flux_rules(cfg)
    if cfg.hub_token and cfg.report_to in ("wandb", "all"):
        # As the scripts: the tracker records the run's arguments, token included.
        raise ConfigError(
            "hub_token",
            f"cannot be used with --report_to {cfg.report_to}: the tracker would record the token. Log in with "
            "`hf auth login` or set HF_TOKEN instead.",
        )


def check_sdxl_rules(cfg: SdxlLoraConfig) -> None:
    for name in SD_ONLY_FIELDS:
        if getattr(cfg, name) not in (None, False):
            raise ConfigError(
                name,
                f"is a setting of the SD 1.x/2.x scripts, not of {cfg.script} (SDXL has two text encoders); remove it.",
            )
    check_script_lora_rules(cfg)
    if cfg.do_edm_style_training and cfg.snr_gamma is not None:
        raise ConfigError(
            "snr_gamma", "Min-SNR weighting is not supported with --do_edm_style_training (as in the script); drop one."
        )
    check_location("pretrained_vae_model_name_or_path", cfg.pretrained_vae_model_name_or_path)


# Settings of other families' scripts that mean nothing to Flux (a transformer trained by flow matching).
NOT_FLUX_FIELDS = (*SD_ONLY_FIELDS, "snr_gamma", "enable_xformers_memory_efficient_attention")


def check_flux_rules(cfg: FluxLoraConfig) -> None:
    for name in NOT_FLUX_FIELDS:
        if getattr(cfg, name) not in (None, False):
            raise ConfigError(
                name,
                f"is not a setting of {cfg.script} (Flux trains a transformer by flow matching, with CLIP and T5 "
                "prompts); remove it" + (" (--weighting_scheme weights the loss)." if name == "snr_gamma" else "."),
            )
    check_script_lora_rules(cfg)
    if cfg.lora_layers is not None and not [layer for layer in cfg.lora_layers.split(",") if layer.strip()]:
        raise ConfigError("lora_layers", "names no module; give e.g. 'attn.to_k,attn.to_q,attn.to_v' or remove it.")
    if cfg.enable_npu_flash_attention:
        # The script raises unless torch_npu is installed and an NPU is present; this trainer has no NPU build.
        raise ConfigError(
            "enable_npu_flash_attention",
            "needs an Ascend NPU with torch_npu, which this trainer does not support; remove it (PyTorch's SDPA "
            "attention is used).",
        )


def check_script_lora_rules(cfg: ScriptLoraConfig) -> None:
    """As the scripts with --dataset_name: one source of instance images, an image folder, not a Hub dataset; and
    cached latents cannot hold a random flip."""
    if cfg.cache_latents and cfg.random_flip:
        raise ConfigError("cache_latents", "cannot be used with --random_flip (a flip changes the latents); drop one.")
    if cfg.dataset_name is None and cfg.instance_data_dir is None:
        raise ConfigError(
            "instance_data_dir",
            "is required: a folder of images (local or s3://), or --dataset_name for one with captions.",
        )
    if cfg.dataset_name is not None and cfg.instance_data_dir is not None:
        raise ConfigError(
            "dataset_name", "and --instance_data_dir are both set; give only one of them (as the script)."
        )
    if cfg.dataset_config_name is not None:
        raise ConfigError(
            "dataset_config_name",
            "names a Hub dataset's config; an image folder has none (Hub datasets are not read here).",
        )
    check_location("dataset_name", cfg.dataset_name)


def check_location(name: str, value: str | None) -> None:
    """A path or URI: not empty, a scheme the trainer reads, no `..` segment inside an s3:// key."""
    if value is None:
        return
    if not value.strip():
        raise ConfigError(name, "is empty; give a local folder or an s3://bucket/prefix.")
    allowed = URI_SCHEMES + (("tiny://",) if name == "pretrained_model_name_or_path" else ())
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", value)
    if scheme and not value.startswith(allowed):
        raise ConfigError(
            name, f"{quote(value)} uses {scheme.group(1)}://, which the trainer cannot read; use a local path or s3://."
        )
    if value.startswith("s3://") and ".." in value[5:].split("/"):
        raise ConfigError(
            name, f"{quote(value)} has a '..' segment; S3 keys have no parent folders: spell the prefix out."
        )


def parse_training(method: str, training: dict[str, Any]) -> CommonConfig:
    """Build a config from a manifest's ``spec.training`` (camelCase; snake_case accepted), or raise ConfigError."""
    if method not in MODELS:
        raise ConfigError(
            "method", f"spec.method must be 'full', 'lora', 'lora-sdxl' or 'lora-flux', not {quote(method)}."
        )
    model = MODELS[method]
    try:
        return model.model_validate(training)
    except ValidationError as exc:
        raise from_validation_error(exc, model) from None


def from_validation_error(exc: ValidationError, model: type[CommonConfig]) -> ConfigError:
    """Turn pydantic's error into one that names the flag, the manifest field and the fix."""
    err = exc.errors()[0]
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, ConfigError):
        return ctx_error
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    name = _snake(loc[0]) if loc else "training"
    kind = err["type"]
    if kind == "missing":
        return ConfigError(name, "is required.")
    if kind == "extra_forbidden":
        other = next((m for m in MODELS.values() if m is not model and name in m.model_fields), None)
        if other is not None:
            return ConfigError(
                name, f"applies only to method '{other.method}' ({other.script}); remove it or change spec.method."
            )
        close = nearest(name, model.model_fields)
        hint = f"did you mean {flag_and_field(close)}?" if close else "check the spelling"
        return ConfigError(name, f"is not a setting of {model.script}; {hint} (see `dreambooth {_cmd(model)} --help`).")
    ctx = err.get("ctx") or {}
    if kind in ("greater_than_equal", "greater_than"):
        # Zero or negative counts (steps, epochs, batch sizes): say the bound and the fix, not pydantic's wording.
        bound = (
            f"greater than or equal to {ctx.get('ge')}"
            if kind == "greater_than_equal"
            else f"greater than {ctx.get('gt')}"
        )
        return ConfigError(
            name, f"must be {bound}, not {quote(err.get('input'))}; set a value in range or remove the setting."
        )
    if kind in ("less_than_equal", "less_than"):
        bound = f"at most {ctx.get('le')}" if kind == "less_than_equal" else f"less than {ctx.get('lt')}"
        return ConfigError(name, f"must be {bound}, not {quote(err.get('input'))}; set a value in range.")
    return ConfigError(name, f"{err['msg']} (got {quote(err.get('input'))}).")


def nearest(name: str, known: Iterable[str]) -> str | None:
    """The known name a misspelt ``name`` most likely meant (flags, fields), or None when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return close[0] if close else None


COMMANDS: dict[str, str] = {
    "full": "train", "lora": "train-lora", "lora-sdxl": "train-lora-sdxl", "lora-flux": "train-lora-flux",
}  # fmt: skip


def _cmd(model: type[CommonConfig]) -> str:
    return COMMANDS[model.method]


def _snake(name: str) -> str:
    out = []
    for ch in name:
        if ch.isupper():
            out.append("_" + ch.lower())
        else:
            out.append(ch)
    return "".join(out)
