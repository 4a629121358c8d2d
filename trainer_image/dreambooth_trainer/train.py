"""One training run: inputs staged, models built, the loop driven, checkpoints and outputs published.

Exactness (docs/design.md, "Checkpoint format"): data order is a function of (seed, epoch), crops of (seed, epoch, index), noise and
timesteps of (seed, epoch, micro-step, rank); the weights, optimizer, scheduler and scaler states are restored
from the checkpoint. So a run stopped at any optimizer step and resumed ends with bit-identical weights on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dreambooth_api.config import CommonConfig, ConfigError, FullConfig, LoraConfig, config_hash, flag_and_field
from dreambooth_api.contract import NonFiniteLossError, PreemptedError

from . import checkpoint as ckpt
from . import hub, logs, numerics
from .checkpoint import diffusers_format
from .checkpoint.settings import FILE as SETTINGS_FILE
from .checkpoint.settings import hashed_settings, settings_json
from .classimages import ensure_class_images
from .compat import warn_like_the_scripts
from .data import CachedLatentsDataset, DreamBoothDataset, EpochSampler, collate_fn, list_images
from .families import family_for
from .latents import latent_transform
from .launcher.decision import stop_deadline
from .model import (
    check_optional_libraries,
    config_json,
    load_trainable_state,
    optimizer_class,
    optimizer_options,
    weights_file,
)
from .modelcard import model_card, write_model_card
from .objective import seed_global_rng, step_generator
from .progress import Progress, serve_progress
from .scratch import Scratch, new_run_id
from .startup import StartupClock
from .storage import AccessDeniedError, BucketMissingError, NotFoundError, Store, local_cache_for, open_store
from .testhooks import hooks
from .trackers import Trackers, trackers_for
from .validation import Validator

# The adapters of a LoRA run in diffusers' names: the final model's file, and (format 3) a checkpoint's only copy.
LORA_FILE = "pytorch_lora_weights.safetensors"
# Log boundaries (the loss read back from the device) at most this often, besides the first step and checkpoints.
LOG_SECONDS = 1.0
# After a crash, how long the checkpoint already being written may take to land before the process exits.
CRASH_PUBLISH_WAIT_SECONDS = 300.0

logger = logging.getLogger(__name__)


class Preempted(PreemptedError):
    """SIGTERM arrived: the emergency checkpoint (if any) is published; the process should exit 75."""


@dataclass
class RunEnv:
    """What the launcher or the operator tells a run, beyond its config."""

    job_uid: str = ""
    attempt: int = 0
    memory_savers: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    stop_time: float | None = None  # time.monotonic() of the SIGTERM, when the handler saw it

    @classmethod
    def from_environ(cls) -> RunEnv:
        return cls(
            job_uid=os.environ.get("DREAMBOOTH_JOB_UID", ""),
            attempt=int(os.environ.get("DREAMBOOTH_ATTEMPT", "0") or 0),
            memory_savers=os.environ.get("DREAMBOOTH_MEMORY_SAVERS", "") == "1",
        )


@dataclass
class TrainResult:
    output_uri: str
    global_step: int
    final_loss: float | None
    validation_images: list[str]  # every validation's, in order
    latest_validation_images: list[str] = field(default_factory=list)  # the last validation's (status, progress)


@contextlib.contextmanager
def naming_field(field: str):  # noqa: ANN201 - a context manager
    """Storage errors a user fixes (credentials, bucket, a missing object) name the setting that points there."""
    try:
        yield
    except (AccessDeniedError, BucketMissingError, NotFoundError) as exc:
        raise type(exc)(f"{flag_and_field(field)}: {exc}") from exc


def stage_folder(uri: str, what: str, field: str | None = None, *, may_be_empty: bool = False) -> Path:
    """A local folder holding the contents of `uri` (an s3:// prefix is synced into a cache).

    `tiny://epsilon`, `tiny://v_prediction` or `tiny://sdxl` names one of the project's tiny test models, made
    once into a cache.
    With `field`, storage errors and an s3:// prefix holding nothing (a typo reads as an empty prefix: S3 has no
    folders) say which setting to fix, before any model loads.
    """
    if uri.startswith("tiny://"):
        from .tiny import ensure_tiny_model, tiny_uri_model

        family, prediction_type = tiny_uri_model(uri)
        return ensure_tiny_model(prediction_type=prediction_type, family=family)
    with naming_field(field) if field else contextlib.nullcontext():
        store = open_store(uri)
        root = store.local_root()
        if root is not None:
            return root
        local = local_cache_for(uri)
        store.sync_down("", local)
    if field and not may_be_empty and not any(p.is_file() for p in local.rglob("*")):
        raise ConfigError(field, f"{uri} holds no objects: upload the {what} there, or fix the bucket or prefix.")
    logger.info("%s %s synced to %s", what, uri, local)
    return local


def check_image_folder(uri: str, field: str) -> None:
    """--dataset_name names an image folder here (local or s3://); a Hub dataset id is refused with the fix."""
    if field != "dataset_name" or uri.startswith(("s3://", "file://")) or Path(uri).is_dir():
        return
    raise ConfigError(
        "dataset_name",
        f"{uri!r} is not a local or s3:// image folder. Hub datasets are not read here (no network to the Hub): save "
        "the images and a metadata.jsonl of captions (datasets' imagefolder layout) to a folder or S3 prefix and "
        "give that, or use --instance_data_dir for images without captions.",
    )


def _check_device_precision(cfg: CommonConfig) -> None:
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision", "fp16 needs a GPU; on CPU use bf16 or no.")
    if cfg.with_prior_preservation and cfg.prior_generation_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "prior_generation_precision", "fp16 needs a GPU; on CPU use fp32 (the default there) or bf16."
        )


def _weight_dtype(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


class Trainer:
    def __init__(self, cfg: CommonConfig, env: RunEnv | None = None) -> None:
        self.cfg = cfg
        self.env = env or RunEnv.from_environ()
        self.hash = config_hash(cfg)
        self.family = family_for(cfg)
        self.startup = StartupClock()
        # The OOM retry trades speed for memory without touching the config hash (docs/design.md, failure policy).
        self.batch_size = cfg.train_batch_size
        self.accum = cfg.gradient_accumulation_steps
        self.grad_ckpt = cfg.gradient_checkpointing
        if self.env.memory_savers:
            self.grad_ckpt = True
            if self.batch_size > 1:
                self.batch_size //= 2
                self.accum *= 2
            logger.warning(
                "memory savers on after a GPU OOM: gradient checkpointing, micro-batch %d x accumulation %d; "
                "the data order per optimizer step changes, so this run is no longer bit-exact",
                self.batch_size,
                self.accum,
            )

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from accelerate import Accelerator

        cfg = self.cfg
        check_optional_libraries(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            warn_like_the_scripts(cfg)
        _check_device_precision(cfg)
        self.tracker_names = trackers_for(cfg)
        # Without cpu=True accelerate ignores torchrun's env on a GPU-less machine and every rank trains alone.
        self.accelerator = acc = Accelerator(
            # "no", not None: None would let accelerate read ACCELERATE_MIXED_PRECISION (cli folded it in already).
            mixed_precision=cfg.mixed_precision or "no",
            gradient_accumulation_steps=1,
            cpu=not torch.cuda.is_available(),
        )
        self.rank, self.world = acc.process_index, acc.num_processes
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.world:
            raise RuntimeError(f"torchrun started {launched} processes but accelerate sees {self.world}")
        if acc.is_main_process:
            logger.info(
                "training on %d process(es), device %s, mixed precision %s", self.world, acc.device, acc.mixed_precision
            )
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.out: Store = open_store(cfg.output_dir)
        log_key = logs.log_key(self.env.attempt, self.rank)
        self.run_id = self._agree([new_run_id()])[0]
        self.scratch = Scratch(self.out.uri, self.run_id, self.rank)
        # Captured from here on; uploaded only once the prefix is known to be this job's (never into another's).
        self.rank_log = logs.RankLog(self.scratch / log_key)
        if acc.is_main_process:
            with naming_field("output_dir"):
                self.out.check_writable()
            self.claim = ckpt.claim_output(self.out, self.env.job_uid, unsafe_shared=cfg.unsafe_shared_output)
            self.rank_log.start_upload(self.out.uri, log_key)

        self.instance_field = "instance_data_dir" if cfg.instance_data_dir else "dataset_name"
        instance_uri = cfg.instance_data_dir or getattr(cfg, "dataset_name", None) or ""
        check_image_folder(instance_uri, self.instance_field)
        # The images download beside the model (both are S3 syncs): start-up waits for the longer, not the sum.
        with (
            acc.local_main_process_first(),
            self.startup.phase("sync"),
            ThreadPoolExecutor(1, thread_name_prefix="stage-data") as pool,
        ):
            data = pool.submit(self._stage_data, instance_uri)
            try:
                self.model_dir = hub.download_model(cfg) or stage_folder(
                    cfg.pretrained_model_name_or_path, "model", "pretrained_model_name_or_path"
                )
            except BaseException:
                # The model's error wins, as when the two were staged one after the other.
                with contextlib.suppress(Exception):
                    data.result()
                raise
            self.instance_dir, self.class_dir = data.result()
        self.family.check_model_dir(self.model_dir)
        # Parts given apart from the model folder (SDXL's --pretrained_vae_model_name_or_path), staged like it.
        self.extra_dirs: dict[str, Path] = {}
        vae_uri = getattr(cfg, "pretrained_vae_model_name_or_path", None)
        if vae_uri:
            with acc.local_main_process_first():
                self.extra_dirs["vae"] = stage_folder(vae_uri, "VAE", "pretrained_vae_model_name_or_path")
        # A missing or empty instance folder fails now, before any model loads.
        list_images(self.instance_dir, flag=flag_and_field(self.instance_field), skip_bad=cfg.skip_bad_images)
        # As the scripts do, the Hub repository is made before training: a bad token fails in seconds.
        self.hub_repo = hub.create_hub_repo(cfg) if cfg.push_to_hub and acc.is_main_process else None

        # Unset numerics choices (fused AdamW, compile) are settled before the hash: a resume keeps its checkpoints'.
        resume_hash = numerics.checkpoint_hash(self.out, cfg.resume_from_checkpoint) if acc.is_main_process else None
        self.cfg = cfg = numerics.settle(cfg, cuda=acc.device.type == "cuda", resume_hash=self._agree([resume_hash])[0])
        self.hash = config_hash(cfg)
        # Resume decision first: a resumed run takes its seed from the checkpoint.
        self.resumed: ckpt.Loaded | None = None
        # A checkpoint of diffusers' scripts asked for by --resume_from_checkpoint (every rank reads the listing).
        newest = ckpt.checkpoint_steps(self.out)
        request = ckpt.continue_named(self.out, cfg.resume_from_checkpoint, self.env.job_uid)
        self.script_step = diffusers_format.requested_step(self.out, request, newest[0] if newest else None)
        loaded = None
        with acc.main_process_first():
            if self.script_step is None:
                loaded = ckpt.choose_resume(self.out, request, self.hash, self.scratch / "resume", hashed_settings(cfg))
        self.rank_log.start_upload(self.out.uri, log_key)  # other ranks: rank 0's claim held (barrier above)
        steps = self._agree([loaded.step if loaded else -1])
        if steps[0] >= 0:
            self.resumed = (
                loaded
                if loaded and loaded.step == steps[0]
                else ckpt.verify_and_fetch(self.out, steps[0], self.scratch / "resume")
            )
        seed = cfg.seed if cfg.seed is not None else secrets.randbits(31)
        self.run_seed = self.resumed.state.run_seed if self.resumed else self._agree([seed])[0]

        from accelerate.utils import set_seed

        set_seed(self.run_seed)
        if cfg.with_prior_preservation:
            with self.startup.phase("data"):
                self._prepare_class_images()
        t_load = time.monotonic()
        self.models = m = self.family.load(cfg, self.model_dir, self.extra_dirs)
        if isinstance(cfg, LoraConfig):
            self.family.add_lora(m, cfg)
        self.trained = self.family.set_trainable(m, cfg)
        self.family.enable_memory_savers(m, cfg, self.grad_ckpt)
        wdtype = _weight_dtype(acc)
        # In fp32 only the device changes: diffusers warns on every to(dtype=...) of a model, even a no-op one.
        vae_dtype = torch.float32 if self.family.upcast_vae and "vae" not in self.extra_dirs else wdtype
        m.vae.to(acc.device, **({"dtype": vae_dtype} if vae_dtype != torch.float32 else {}))
        # Frozen encoders go to the device in the weight dtype (Flux's T5 is frozen even with train_text_encoder).
        trained_ids = {id(mod) for mod in self.trained}
        for encoder in self.family.text_encoders(m).values():
            if id(encoder) not in trained_ids:
                encoder.to(acc.device, dtype=wdtype)
        if isinstance(cfg, LoraConfig) and wdtype != torch.float32:
            from diffusers.training_utils import cast_training_params

            m.unet.to(acc.device, dtype=wdtype)
            cast_training_params(self.trained, dtype=torch.float32)
        self._fast_paths(m)
        self.startup.add("load", time.monotonic() - t_load)

        with self.startup.phase("data"):
            self._build_data()
            self._free_text_encoders()
        # Every rank decides alike (same listing), so none waits at a barrier for one that refused.
        start = self.resumed.step if self.resumed else (self.script_step or 0)
        ckpt.refuse_collisions(self.out, start, self.max_steps)
        params = [p for mod in self.trained for p in mod.parameters() if p.requires_grad]
        lr = cfg.learning_rate
        if cfg.scale_lr:
            lr = lr * self.accum * self.batch_size * self.world
        self.params_to_clip = params  # built once: walking every module's parameters each step costs ms
        opt_class = optimizer_class(cfg)
        # On CPU torch's default AdamW loops over tensors in Python (~10x slower than its fused kernel, which CPU
        # has had since torch 2.4); on CUDA the fused kernel saves the foreach version's launches (numerics.py).
        fused = (
            {"fused": True} if opt_class is torch.optim.AdamW and numerics.use_fused_adam(cfg, acc.device.type) else {}
        )
        self.optimizer = opt_class(
            self.family.optimizer_params(cfg, self.trained, lr), lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, **(optimizer_options(cfg) or fused),
        )  # fmt: skip
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=self.optimizer,
            # accelerate steps a prepared scheduler once per process per optimizer step (as diffusers' scripts do).
            num_warmup_steps=cfg.lr_warmup_steps * self.world,
            num_training_steps=self.max_steps * self.world,
            num_cycles=cfg.lr_num_cycles,
            power=cfg.lr_power,
        )
        prepared = acc.prepare(*self.trained, self.optimizer, self.lr_scheduler)
        n = len(self.trained)
        self.trained_wrapped = list(prepared[:n])
        self.optimizer, self.lr_scheduler = prepared[n], prepared[n + 1]
        self.state = ckpt.TrainState(
            run_seed=self.run_seed,
            world_size=self.world,
            config_hash=self.hash,
            method=cfg.method,
            job_uid=self.env.job_uid,
        )
        if self.resumed:
            self._restore(self.resumed)
            hooks().restored(self.rank, {
                "optimizer": self.optimizer.state_dict(),
                "weights": {n: p.detach().clone() for n, p in self.trained[0].named_parameters() if p.requires_grad},
            })  # fmt: skip
        elif self.script_step is not None:
            self._restore_script_checkpoint(self.script_step)
        # One rank per node (or every rank) uploads its share of an s3:// checkpoint (checkpoint/shares.py): the
        # ranks must then checkpoint at the same steps, and each uploading rank snapshots.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "") or self.world)
        index, sharing = ckpt.shares.participant(ckpt.shares.mode(), self.rank, self.world, local_world)
        self.publisher = ckpt.Publisher(self.out, self.scratch / "publish", cfg.checkpoints_total_limit,
                                        rank=index or 0, world=sharing, share_id=self.run_id)  # fmt: skip
        self.shared = self.publisher.shared
        self.uploads_share = self.shared and index is not None
        self._due_requested = False
        self.progress = Progress(self.max_steps, enabled=acc.is_main_process)
        self.progress.startup = self.startup
        self.progress.update(step=self.state.global_step, phase="Running")
        if self.resumed:
            # The checkpoint this run started from is the newest durable one until the next is published.
            step = self.resumed.step
            info = {"step": step, "uri": self.out.url(f"checkpoint-{step}"), "time": self.resumed.manifest.get("time")}
            self.progress.record_publish(info, None)
        self.interval = ckpt.CheckpointInterval(
            cfg.expected_preemption_interval_seconds, self.state.global_step, log=acc.is_main_process
        )
        self.publisher.on_published = self._on_published
        self.progress_server = serve_progress(self.progress) if acc.is_main_process else None
        self._setup_reporting()

    def _stage_data(self, instance_uri: str) -> tuple[Path, Path | None]:
        cfg = self.cfg
        instance = stage_folder(instance_uri, "instance images", self.instance_field)
        if not cfg.with_prior_preservation:
            return instance, None
        return instance, stage_folder(cfg.class_data_dir, "class images", "class_data_dir", may_be_empty=True)

    def _fast_paths(self, m: Any) -> None:
        """CUDA only: convolutions in channels_last (tensor cores read NHWC without transposes), and with
        `--compile` the denoiser compiled in place (its parameter names, hence checkpoints, unchanged)."""
        if self.accelerator.device.type == "cuda":
            for module in (m.unet, m.vae):
                module.to(memory_format=torch.channels_last)
        if self.cfg.compile:
            m.unet.compile()

    def _prepare_class_images(self) -> None:
        """Generate the class images prior preservation lacks (every rank its share), before the models load."""
        cfg = self.cfg
        store = open_store(cfg.class_data_dir or "")
        added = ensure_class_images(
            cfg, accelerator=self.accelerator, model_dir=self.model_dir, class_dir=self.class_dir,
            class_store=store, seed=self.run_seed, scratch=self.scratch,
        )  # fmt: skip
        if added and store.local_root() is None:
            with self.accelerator.local_main_process_first():
                self.class_dir = stage_folder(cfg.class_data_dir or "", "class images")

    def _setup_reporting(self) -> None:
        """Trackers (TensorBoard under <output>/<logging_dir>) and the validator, on rank 0."""
        cfg, acc = self.cfg, self.accelerator
        # The local mirror of the output: the output itself, or the folder _save_final uploads from.
        self.local_out = self.out.local_root() or (self.scratch / "final")
        logs = Path(cfg.logging_dir) if Path(cfg.logging_dir).is_absolute() else self.local_out / cfg.logging_dir
        self.trackers = Trackers(
            self.tracker_names, run_name="dreambooth-lora" if isinstance(cfg, LoraConfig) else "dreambooth", local_dir=logs,
            config=cfg.model_dump(mode="json"), enabled=acc.is_main_process,
        )  # fmt: skip
        self.validator = Validator(
            cfg, device=acc.device, weight_dtype=_weight_dtype(acc), model_dir=self.model_dir, out=self.out,
            local_out=self.local_out, trackers=self.trackers, seed=self.run_seed, prompt_embeds=self.validation_embeds,
            family=self.family,
        )  # fmt: skip

    def _validate(self, tag: str = "validation") -> None:
        if not self.accelerator.is_main_process:
            return
        m, acc = self.models, self.accelerator
        encoders = self.family.text_encoders(m)
        if self.cfg.train_text_encoder:
            encoders = {
                name: acc.unwrap_model(mod) for name, mod in zip(encoders, self.trained_wrapped[1:], strict=False)
            }
        first = encoders.pop("text_encoder", None)
        run = self.validator.run(
            self.state.global_step,
            unet=acc.unwrap_model(self.trained_wrapped[0]),
            text_encoder=first if self.cfg.train_text_encoder else m.text_encoder,
            vae=m.vae, tokenizer=m.tokenizer, noise_scheduler=m.noise_scheduler, tag=tag, more=encoders,
        )  # fmt: skip
        self.progress.update(validation_images=run.uris)

    def _on_published(self, info: dict[str, Any]) -> None:
        self.progress.record_publish(info, self.publisher.last_cost_seconds)
        self.interval.observe_publish(self.publisher.last_cost_seconds)

    def _agree(self, values: list[Any]) -> list[Any]:
        """Rank 0's values, on every rank."""
        if self.world == 1:
            return values
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list(list(values), from_process=0)

    def _build_data(self) -> None:
        cfg, m = self.cfg, self.models
        self.prompt_embeds = None
        self.validation_embeds: tuple[torch.Tensor, torch.Tensor] | None = None
        enc, class_enc = None, None
        if cfg.pre_compute_text_embeddings:
            enc = self._encode_text(cfg.instance_prompt)
            class_enc = self._encode_text(cfg.class_prompt) if cfg.with_prior_preservation else None
            if cfg.validation_prompt:
                # Validation needs them too once the text encoder is freed (the scripts' negative prompt is "").
                self.validation_embeds = (self._encode_text(cfg.validation_prompt), self._encode_text(""))
        captions = self._captions()
        self.fixed_prompts = not captions.get("captions")
        self.dataset = DreamBoothDataset(
            self.instance_dir,
            cfg.instance_prompt,
            m.tokenizer,
            class_data_root=self.class_dir,
            class_prompt=cfg.class_prompt,
            class_num=cfg.num_class_images,
            size=cfg.resolution,
            center_crop=cfg.center_crop,
            encoder_hidden_states=enc,
            class_prompt_encoder_hidden_states=class_enc,
            tokenizer_max_length=cfg.tokenizer_max_length,
            seed=self.run_seed,
            interpolation=cfg.resize_interpolation,
            skip_bad_images=cfg.skip_bad_images,
            **self.family.dataset_options(cfg),
            **captions,
        )
        if cfg.cache_latents:
            self.dataset = CachedLatentsDataset(self.dataset, self._encode_latent_parameters)
        self.sampler = EpochSampler(
            len(self.dataset), self.world, self.rank, seed=self.run_seed, batch_size=self.batch_size,
            with_epoch=cfg.dataloader_num_workers > 0,
        )  # fmt: skip
        self.batches_per_epoch = math.ceil(self.sampler.num_samples / self.batch_size)
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / self.accum)
        self.max_steps = cfg.max_train_steps or cfg.num_train_epochs * self.updates_per_epoch
        self.num_epochs = math.ceil(self.max_steps / self.updates_per_epoch)
        if cfg.pre_compute_text_embeddings:
            # The text encoder is no longer needed: free it, as diffusers does.
            m.text_encoder = None  # type: ignore[assignment]
        # Kept apart from the VAE: with cached latents this transform is all the loop needs of it.
        self.to_latent_space = latent_transform(m.vae.config)
        if cfg.cache_latents and not cfg.validation_prompt:
            # Every latent is cached and nothing decodes (no validation; the final save loads the VAE from the
            # model folder): free the VAE, as diffusers' train_dreambooth_lora_sdxl.py does with --cache_latents
            # (SD's VAE: 83.6M parameters, 335 MB in fp32, on the GPU on a GPU run).
            m.vae = None  # type: ignore[assignment]

    def _free_text_encoders(self) -> None:
        """With no per-image captions and no text encoder training, encode the run's prompts once and free the
        text encoders, as diffusers' SDXL and Flux LoRA scripts do (FLUX.1's T5-XXL: 9.5 GB in bf16); validation
        loads them again from the model folder for its own prompt, as the scripts do."""
        cfg, m = self.cfg, self.models
        if cfg.train_text_encoder or not self.fixed_prompts:
            return
        from .data import tokenize_prompt

        prompts = [cfg.instance_prompt] + ([cfg.class_prompt] if cfg.with_prior_preservation else [])
        ids = [tokenize_prompt(m.tokenizer, p or "", cfg.tokenizer_max_length).input_ids for p in prompts]
        freed = self.family.encode_fixed_prompts(m, ids, self.accelerator.device)
        if not freed:
            return
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.accelerator.is_main_process:
            logger.info(
                "text encoders: the run's %d prompt(s) encoded once, the frozen text encoders freed (%.1f M "
                "parameters), as %s's script does; validation loads them again", len(ids), freed / 1e6,
                self.family.name,
            )  # fmt: skip

    def _captions(self) -> dict[str, Any]:
        """Per-image captions of a --dataset_name image folder (its metadata.jsonl), for the dataset."""
        cfg = self.cfg
        if not getattr(cfg, "dataset_name", None):
            return {}
        from .data import read_captions

        return {"captions": read_captions(self.instance_dir, cfg.image_column, cfg.caption_column)}

    def _encode_latent_parameters(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE latent-distribution parameters (mean and log-variance) of a batch of images, for cache_latents."""
        vae = self.models.vae
        with torch.no_grad():
            return vae.encode(pixels.to(self.accelerator.device, dtype=vae.dtype)).latent_dist.parameters.float()

    def _encode_text(self, prompt: str | None) -> torch.Tensor:
        from .data import tokenize_prompt

        m, cfg = self.models, self.cfg
        ids = tokenize_prompt(m.tokenizer, prompt or "", cfg.tokenizer_max_length)
        with torch.no_grad():
            mask = ids.attention_mask.to(self.accelerator.device) if cfg.text_encoder_use_attention_mask else None
            return self.family.encode_prompt(m.text_encoder, ids.input_ids.to(self.accelerator.device), mask).to("cpu")

    def _loader(self, epoch: int, skip_batches: int):
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        if skip_batches:
            self.sampler.skip(skip_batches)
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            collate_fn=lambda ex: collate_fn(ex, self.cfg.with_prior_preservation),
            num_workers=self.cfg.dataloader_num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
        )

    # ------------------------------------------------------------------ state
    def _trained_names(self) -> list[str]:
        return self.family.trained_names(len(self.trained))

    def snapshot(self) -> ckpt.Snapshot:
        # The copies reuse the previous checkpoint's buffers, so its upload must be over (submit waits anyway).
        self.publisher.wait()
        reuse = self.publisher.staging
        snap = ckpt.Snapshot(state=ckpt.TrainState(**vars(self.state)))
        for name, mod in zip(self._trained_names(), self.trained, strict=True):
            if isinstance(self.cfg, FullConfig):
                # Format 2: the part in diffusers' layout, so `from_pretrained(".../checkpoint-N/unet")` loads it;
                # the resume reads the same file (no second copy of the weights).
                snap.tensors[f"{name}/{weights_file(mod)}"] = ckpt.cpu_clone(mod.state_dict(), reuse, name)
                snap.texts[f"{name}/config.json"] = config_json(mod)
        if isinstance(self.cfg, LoraConfig):
            # Format 3: the adapters once, in diffusers' names (what `load_lora_weights` and the scripts'
            # checkpoints hold); the resume maps them back by the same conversion (_restore_lora).
            snap.tensors[LORA_FILE] = self._lora_layers(cpu=True)
        snap.texts[SETTINGS_FILE] = settings_json(self.cfg)
        snap.objects["training/optimizer.pt"] = ckpt.cpu_clone(self.optimizer.state_dict(), reuse, "optimizer")
        snap.objects["training/scheduler.pt"] = self.lr_scheduler.state_dict()
        if self.accelerator.scaler is not None:
            snap.objects["training/scaler.pt"] = self.accelerator.scaler.state_dict()
        padding = hooks().state_padding()  # DREAMBOOTH_TEST_PAD_STATE_MB: benchmarks a bigger state
        if padding is not None:
            snap.tensors["training/test-padding.safetensors"] = ckpt.cpu_clone(padding, reuse, "padding")
        return snap

    def _lora_layers(self, cpu: bool) -> dict[str, torch.Tensor]:
        out = self.family.lora_layers(self.models, self.cfg.train_text_encoder)
        return {k: (v.detach().to("cpu", copy=True).contiguous() if cpu else v) for k, v in out.items()}

    def _restore(self, loaded: ckpt.Loaded) -> None:
        from safetensors.torch import load_file

        files = loaded.manifest["files"]
        if isinstance(self.cfg, LoraConfig) and not any(
            f"training/{n}.safetensors" in files for n in self._trained_names()
        ):
            self._restore_lora(load_file(loaded.folder / LORA_FILE))  # format 3
        for name, mod in zip(self._trained_names(), self.trained, strict=True):
            if f"training/{name}.safetensors" in files:  # format 1, and LoRA in format 2
                load_trainable_state(mod, load_file(loaded.folder / f"training/{name}.safetensors"))
            elif self.cfg.method == "full":  # formats 2 and 3: the part's diffusers-layout file, buffers left out
                trains = {n for n, p in mod.named_parameters() if p.requires_grad}
                state = load_file(loaded.folder / f"{name}/{weights_file(mod)}")
                load_trainable_state(mod, {k: v for k, v in state.items() if k in trains})
        self.optimizer.load_state_dict(torch.load(loaded.folder / "training/optimizer.pt", weights_only=False))
        self.lr_scheduler.load_state_dict(torch.load(loaded.folder / "training/scheduler.pt", weights_only=False))
        scaler = loaded.folder / "training/scaler.pt"
        if scaler.exists() and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(torch.load(scaler, weights_only=False))
        old = loaded.state
        self.state.global_step, self.state.epoch = old.global_step, old.epoch
        if old.world_size == self.world:
            self.state.micro_in_epoch = old.micro_in_epoch
            self.state.samples_in_epoch = old.samples_in_epoch
        else:
            # Another world size shards the epoch differently: continue after the samples already seen.
            per_batch = self.batch_size * self.world
            # The old world size's count holds its padding (a rank repeats samples to even the shards out): an
            # epoch it had finished is finished here too, never more than finished.
            self.state.micro_in_epoch = min(old.samples_in_epoch // per_batch, self.batches_per_epoch)
            self.state.samples_in_epoch = self.state.micro_in_epoch * per_batch
            logger.warning(
                "resuming checkpoint-%d of world size %d at world size %d: the rest of epoch %d is re-sharded "
                "(%d samples seen), so the run is resumed exactly in weights and optimizer state but not in data order",
                old.global_step, old.world_size, self.world, old.epoch, old.samples_in_epoch,
            )  # fmt: skip
        logger.info("resumed from %s at step %d", self.out.url(f"checkpoint-{loaded.step}"), loaded.step)

    def _restore_lora(self, layers: dict[str, torch.Tensor]) -> None:
        """The trained adapters from `pytorch_lora_weights.safetensors` (diffusers' names), bit for bit.

        The names are mapped by running the conversion that wrote the file (peft's names to diffusers', per part)
        on the live parameters and matching each output to its parameter by storage: the exact inverse of the
        save, whatever names peft and diffusers use. Every trained parameter must be found, and every adapter in
        the file used.
        """
        by_storage = {t.data_ptr(): key for key, t in self._lora_layers(cpu=False).items()}
        used: set[str] = set()
        for name, mod in zip(self._trained_names(), self.trained, strict=True):
            state = {}
            for pname, p in mod.named_parameters():
                if not p.requires_grad:
                    continue
                key = by_storage.get(p.data_ptr())
                if key is None or key not in layers:
                    raise ckpt.CheckpointError(f"{LORA_FILE} holds no adapter for {name}.{pname} ({key})")
                state[pname] = layers[key]
                used.add(key)
            load_trainable_state(mod, state)
        if extra := sorted(set(layers) - used)[:3]:
            raise ckpt.CheckpointError(f"{LORA_FILE} holds adapters this run does not train: {extra}")

    def _restore_script_checkpoint(self, step: int) -> None:
        name = f"checkpoint-{step}"
        if self.cfg.method not in ("lora", "full"):
            # The scripts' SDXL checkpoints hold two text encoders' adapters the SD mapping does not know yet.
            raise ConfigError(
                "resume_from_checkpoint",
                f"{name} was written by diffusers' script; resuming a script checkpoint is supported for methods lora "
                f"and full, not {self.cfg.method} yet. Start a new output, or resume from one of this trainer's "
                "checkpoints.",
            )
        with self.accelerator.local_main_process_first():
            folder = diffusers_format.fetch(self.out, step, self.scratch / "resume")
        diffusers_format.restore(
            folder, method="lora" if isinstance(self.cfg, LoraConfig) else "full", trained=list(zip(self._trained_names(), self.trained, strict=True)),
            optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, scaler=self.accelerator.scaler,
            where=self.out.url(name),
        )  # fmt: skip
        st = self.state
        # The scripts start the epoch over at step // updates_per_epoch; ours continues inside it.
        st.global_step, st.epoch = step, step // self.updates_per_epoch
        st.micro_in_epoch = min((step % self.updates_per_epoch) * self.accum, self.batches_per_epoch)
        st.samples_in_epoch = st.micro_in_epoch * self.batch_size * self.world
        logger.warning(
            "resumed from %s, a checkpoint of diffusers' scripts (accelerate save_state format), at step %d: weights, "
            "optimizer moments (by parameter name), LR scheduler and step restored; its global RNG state does not "
            "map onto this trainer's per-step generators, so exactness holds from this run's next checkpoint on "
            "(written in this trainer's format beside it)",
            self.out.url(name), step,
        )  # fmt: skip

    # ------------------------------------------------------------------ loop
    def _micro_step(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        cfg, m, acc = self.cfg, self.models, self.accelerator
        wdtype = _weight_dtype(acc)
        if "latent_parameters" in batch:
            # cache_latents: the VAE's output was cached; the sample is still drawn from this step's generator.
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            dist = DiagonalGaussianDistribution(batch["latent_parameters"].to(acc.device, non_blocking=True).to(wdtype))
            latents = dist.sample(generator=gen)
        else:
            # From pinned memory (the loader's pin_memory on CUDA), so the copy overlaps the previous step's kernels.
            pixel_values = batch["pixel_values"].to(acc.device, non_blocking=True)
            pixel_values = pixel_values.to(m.vae.dtype if self.family.upcast_vae else wdtype)
            if pixel_values.device.type == "cuda":
                pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                latents = m.vae.encode(pixel_values).latent_dist.sample(generator=gen)
        latents = self.to_latent_space(latents)
        if self.family.upcast_vae:
            latents = latents.to(wdtype)
        family = self.family
        noise = family.sample_noise(latents, gen, cfg)
        timesteps = family.sample_timesteps(m, latents.shape[0], gen, latents.device)
        noisy = family.add_noise(m, latents, noise, timesteps)
        text_encoders = self.trained_wrapped[1:] if cfg.train_text_encoder else list(family.text_encoders(m).values())
        states, prompt_extra = family.encode_batch(cfg, m, text_encoders, batch, acc.device)
        extra = {**family.extra_conditioning(batch, acc.device), **prompt_extra}
        model_pred = family.denoise(m, self.trained_wrapped[0], noisy, timesteps, states, extra)
        return family.loss(m, cfg, model_pred, latents, noise, timesteps)

    def _stop_agreed(self, *, exact: bool = False) -> bool:
        """Whether every rank stops now (SIGTERM on any). One process: the host flag alone (the loss is judged
        at log boundaries). More ranks: the finite-loss flag rides on the vote, so they stop on a diverged loss
        together. On CUDA, unless `exact`, the vote is lagged by one step: step N's all-reduce is copied to pinned
        memory behind an event and read at step N+1, when the GPU is past it, so the step never waits for the
        device queue to drain; every rank reads the same vote at the same step."""
        flag = 1.0 if self.env.stop.is_set() else 0.0
        self._agreed_due = False
        if self.world == 1:
            return flag > 0
        dev = self.accelerator.device
        diverged = getattr(self, "_loss_finite", None)
        bad = torch.zeros((), device=dev) if diverged is None else (~diverged).float()
        due, self._vote_due = getattr(self, "_vote_due", 0.0), 0.0
        t = torch.stack([torch.full((), flag, device=dev), bad, torch.full((), due, device=dev)])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        if exact or dev.type != "cuda":
            self._vote = None
            stop, bad_any, due_any = t.tolist()
        else:
            host = self._vote_buffers[0]
            self._vote_buffers.reverse()  # the other buffer may still be read below
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            previous, self._vote = self._vote, (host, done)
            if previous is None:
                return False
            previous[1].synchronize()
            stop, bad_any, due_any = previous[0].tolist()
        if bad_any > 0:
            raise self._diverged("loss")
        self._agreed_due = due_any > 0
        return bool(stop > 0)

    def _diverged(self, what: str) -> NonFiniteLossError:
        step = self.state.global_step
        last = self.publisher.last_published or (
            {"step": self.resumed.step, "uri": self.out.url(f"checkpoint-{self.resumed.step}")}
            if self.resumed
            else None
        )
        stands = f"the last good checkpoint {last['uri']} (step {last['step']}) stands" if last else "nothing was saved"
        cfg = self.cfg
        return NonFiniteLossError(
            step, last["uri"] if last else None,
            f"the training diverged: the {what} became NaN or infinite by step {step}; nothing of it is published and "
            f"{stands}. The likely setting: --learning_rate (spec.training.learningRate, now {cfg.learning_rate:g}) "
            f"is too high{' or fp16 overflowed (try bf16)' if cfg.mixed_precision == 'fp16' else ''}; lower it and "
            "use a new output dir (or resume from that checkpoint with a lower rate).",
        )  # fmt: skip

    def _check_weights_finite(self) -> None:
        """Before anything is published: one device-side reduction over the trained weights, one host sync."""
        flags = [torch.isfinite(p).all() for p in self.params_to_clip]
        if flags and not bool(torch.stack(flags).all()):
            raise self._diverged("trained weights")

    def _due_voted(self) -> bool:
        """Whether the ranks agree on rank 0's checkpoint decision through the stop vote: shares need every rank
        at every checkpoint, and `auto` decides from rank 0's measured speed alone."""
        return self.shared and self.cfg.checkpointing_steps == "auto"

    def _checkpoint_due(self, step: int) -> bool:
        every = self.cfg.checkpointing_steps
        if every == "auto":
            # Counted from the last checkpoint, not `step % every`: the interval moves as costs are measured.
            due = self.interval.due(step, self.progress.steps_per_second)
            self.progress.checkpoint_interval_steps = self.interval.current
            return due
        self.progress.checkpoint_interval_steps = int(every)
        return step % int(every) == 0

    def save_checkpoint(self, *, background: bool, deadline: float | None = None) -> None:
        """Snapshot on rank 0 (and on every uploading rank with checkpoint shares); the write and upload happen on a
        background thread unless asked otherwise."""
        self._flush_logs()
        self._due_requested = False
        if self.accelerator.is_main_process:
            # With more ranks the vote reads the flag a step late: not late enough for what is published now.
            finite = getattr(self, "_loss_finite", None)
            if finite is not None and not bool(finite):
                raise self._diverged("loss")
            self._check_weights_finite()  # the ranks' weights are equal (DDP): rank 0 speaks for all
        if self.accelerator.is_main_process or self.uploads_share:
            t0 = time.monotonic()
            snap = self.snapshot()
            self.publisher.submit(snap, background=background, deadline=deadline)
            self.progress.record_stall(time.monotonic() - t0)
            self.interval.observe_stall(time.monotonic() - t0)
            self.interval.saved(self.state.global_step)
        if self.accelerator.is_main_process:
            self.publish_events(sync=not background)

    def publish_events(self, *, wait: bool = False, sync: bool = False) -> None:
        """TensorBoard's event files to ``<output>/logs/tensorboard/attempt-N/`` of an s3:// output, at every
        checkpoint and at exit: the run can be watched while it trains, and a preempted attempt's events outlive
        its emptyDir (docs/cli.md). A local output holds them in place already. On a background thread, one at a
        time (the files only grow: a skipped upload is caught up by the next); ``wait`` = now, on this thread,
        after the one in flight (the final save). ``sync`` (the emergency checkpoint, inside the grace period) =
        on this thread unless one is in flight. Best effort: a failed upload is a warning, never a failed
        checkpoint or run. A crashed attempt's events reach S3 up to its last checkpoint."""
        trackers: Trackers | None = getattr(self, "trackers", None)
        if trackers is None or not trackers.active or self.out.local_root() is not None:
            return
        trackers.flush()
        running: threading.Thread | None = getattr(self, "_events_thread", None)
        busy = running is not None and running.is_alive()
        if wait and running is not None:
            running.join()
        if wait or (sync and not busy):
            self._upload_events(trackers)
        elif not busy:
            self._events_thread = threading.Thread(target=self._upload_events, args=(trackers,), daemon=True,
                                                   name="tensorboard-upload")  # fmt: skip
            self._events_thread.start()

    def _upload_events(self, trackers: Trackers) -> None:
        base = f"logs/tensorboard/attempt-{self.env.attempt}"
        try:
            for path in sorted(trackers.local_dir.rglob("*")):
                if path.is_file():
                    self.out.upload_file(path, f"{base}/{path.relative_to(trackers.local_dir).as_posix()}")
        except Exception as exc:  # noqa: BLE001 - see publish_events
            logger.warning("TensorBoard events not uploaded to %s: %s", self.out.url(base), exc)

    def fit(self) -> TrainResult:
        """Train to max_steps: `step` per micro-batch, `end_epoch` when an epoch runs out before training does."""
        acc, st = self.accelerator, self.state
        for mod in self.trained_wrapped:
            mod.train()
        self._last_loss: float | None = None
        # The step keeps the device busy: its loss and the all-finite flag stay on the device and reach the host at
        # log boundaries only (_flush_logs: the first step, then at most every LOG_SECONDS, and before anything is
        # published), in one read for every step since the last.
        self._accum_loss = torch.zeros((), device=acc.device)
        self._pending_logs: list[tuple[int, torch.Tensor, float]] = []
        self._last_flush = time.monotonic()
        self._loss_finite = torch.ones((), dtype=torch.bool, device=acc.device)
        self._vote: tuple[torch.Tensor, Any] | None = None
        self._vote_buffers = [torch.zeros(3, pin_memory=acc.device.type == "cuda") for _ in range(2)]
        self._test_hooks = hooks()
        self._oom_step = self._test_hooks.oom_at(self.rank)
        if self._stop_agreed(exact=True):
            # SIGTERM during setup: nothing was trained since the checkpoint this run started from.
            uri = self.out.url(f"checkpoint-{self.resumed.step}") if self.resumed else None
            self.progress.update(phase="Preempted")
            raise Preempted(
                st.global_step, uri, f"SIGTERM before the first step: nothing new to save (step {st.global_step})"
            )
        t_start = self._t_fit = time.monotonic()
        self._first_step_timed = False
        self._staging_ready = False
        while st.global_step < self.max_steps:
            for batch in self._loader(st.epoch, st.micro_in_epoch):
                self.step(batch)
                if st.global_step >= self.max_steps:
                    break
            if st.global_step < self.max_steps:
                self.end_epoch()
        if st.micro_in_epoch >= self.batches_per_epoch:
            # The last step ended its epoch too: a checkpoint of the finished run points at the next one.
            st.epoch, st.micro_in_epoch, st.samples_in_epoch = st.epoch + 1, 0, 0
        logger.info("training loop done: %d steps in %.1fs", st.global_step, time.monotonic() - t_start)
        return self.finish(self._last_loss)

    def step(self, batch: dict[str, Any]) -> None:
        """One micro-batch: forward and backward; at the end of an accumulation, the optimizer step and what follows
        it (progress, validation, the stop vote, a periodic checkpoint)."""
        cfg, acc, st = self.cfg, self.accelerator, self.state
        micro = st.micro_in_epoch
        sync = (micro + 1) % self.accum == 0 or micro + 1 == self.batches_per_epoch
        gen = step_generator(self.run_seed, st.epoch, micro, self.rank, acc.device)
        if isinstance(cfg, LoraConfig) and cfg.lora_dropout:
            # Dropout draws from the global RNG, which checkpoints do not hold: reseed it per position.
            seed_global_rng(self.run_seed, st.epoch, micro, self.rank)
        with contextlib.ExitStack() as stack:
            if not sync:
                for mod in self.trained_wrapped:
                    stack.enter_context(acc.no_sync(mod))
            with acc.autocast():
                loss = self._micro_step(batch, gen)
            acc.backward(loss / self.accum)
        self._loss_finite &= torch.isfinite(loss.detach()).all()
        self._accum_loss += loss.detach().float() / self.accum
        st.micro_in_epoch += 1
        st.samples_in_epoch += self.batch_size * self.world
        if not sync:
            return
        if cfg.max_grad_norm is not None:
            acc.clip_grad_norm_(self.params_to_clip, cfg.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        # train_dreambooth.py zeroes grads unless --set_grads_to_none; the LoRA script sets them to None.
        self.optimizer.zero_grad(set_to_none=not isinstance(cfg, FullConfig) or cfg.set_grads_to_none)
        st.global_step += 1
        lr = self.lr_scheduler.get_last_lr()[0]
        self._pending_logs.append((st.global_step, self._accum_loss, lr))
        self._accum_loss = torch.zeros((), device=acc.device)
        self._test_hooks.after_step()
        if st.global_step == self._oom_step:
            raise torch.OutOfMemoryError(f"test hook: simulated CUDA out of memory at step {self._oom_step}")
        last = st.global_step >= self.max_steps
        if last or not self._first_step_timed or time.monotonic() - self._last_flush >= LOG_SECONDS:
            self._flush_logs()
        else:
            self.progress.update(step=st.global_step, lr=lr)
        if not self._staging_ready and not last:
            self._prepare_staging()
        if self.validator.due_after_step(st.global_step):
            self._flush_logs()
            self._validate()
        if st.global_step >= self.max_steps:
            return  # the end of training: finish() takes the last checkpoint and the stop vote
        due = self._checkpoint_due(st.global_step)
        if self._due_voted():
            # `auto` is measured on rank 0 alone: its decision rides on the stop vote, asked for once.
            self._vote_due = 1.0 if due and self.rank == 0 and not self._due_requested else 0.0
            self._due_requested = self._due_requested or self._vote_due > 0
        if self._stop_agreed():
            self._emergency_stop()
        if self._due_voted():
            due = self._agreed_due
        if due:
            self.save_checkpoint(background=True)

    def _prepare_staging(self) -> None:
        """After the first optimizer step (the optimizer's state exists from then on): the snapshot's host buffers,
        allocated and touched now rather than when SIGTERM comes. The first checkpoint would allocate them anyway;
        an emergency one before any periodic checkpoint otherwise paid a fresh page per page of state (on GPU:
        pinned memory, slower still) inside the grace period."""
        self._staging_ready = True
        if not (self.accelerator.is_main_process or self.uploads_share):
            return  # this rank never writes a checkpoint file
        t0 = time.monotonic()
        self.snapshot()
        size = sum(t.numel() * t.element_size() for t in self.publisher.staging.values())
        logger.info(
            "checkpoint staging: %.2f GiB of host memory ready in %.2fs, so that a SIGTERM's checkpoint need not "
            "allocate it", size / 2**30, time.monotonic() - t0,
        )  # fmt: skip

    def _flush_logs(self) -> None:
        """A log boundary: the losses of the steps since the last one, read in one host sync, go to the trackers
        (each at its own step) and to the progress line; a non-finite loss stops a single-process run here (with
        more ranks the stop vote carries the flag, so that every rank stops at the same step)."""
        self._last_flush = time.monotonic()
        if not getattr(self, "_pending_logs", None):  # nothing trained yet (or called before fit)
            return
        values = torch.stack([loss for _, loss, _ in self._pending_logs]).tolist()
        for (step, _, lr), value in zip(self._pending_logs, values, strict=True):
            self.trackers.log({"loss": value, "lr": lr}, step)
        step, _, lr = self._pending_logs[-1]
        self._pending_logs.clear()
        self._last_loss = values[-1]
        if not self._first_step_timed:
            self._first_step_timed = True
            self.startup.first_step_done(time.monotonic() - self._t_fit)
            if self.accelerator.is_main_process:
                logger.info("%s", self.startup.line())
        self.progress.update(step=step, loss=self._last_loss, lr=lr)
        if self.world == 1 and not bool(self._loss_finite):
            raise self._diverged("loss")

    def end_epoch(self) -> None:
        """An epoch ran out before training did: its validation, then the next epoch's counters."""
        st = self.state
        if self.validator.due_after_epoch(st.epoch):
            self._flush_logs()
            self._validate()
        st.epoch += 1
        st.micro_in_epoch = 0
        st.samples_in_epoch = 0

    def _emergency_stop(self) -> None:
        """SIGTERM on some rank: every rank stopped at this step; publish it now, synchronously.

        The launcher owns the deadline: if this takes too long it kills the process, and since the manifest is
        written last, a checkpoint cut short simply does not exist.
        """
        st = self.state
        uri = None
        t0 = time.monotonic()
        self._flush_logs()
        self.progress.update(phase="Stopping", preemptions=self.progress.preemptions + 1)
        main = self.accelerator.is_main_process
        if main or self.uploads_share:
            try:
                self.publisher.wait()  # the upload in flight must land first: LATEST only moves forward
            except Exception as exc:  # noqa: BLE001 - an older checkpoint's failure must not cost the emergency one
                logger.error(
                    "the checkpoint in flight at SIGTERM failed (%s); saving step %d anyway", exc, st.global_step
                )
            # No rank waits for another's share past the launcher's kill (launcher.decision.stop_deadline).
            deadline = (self.env.stop_time or t0) + stop_deadline()
            self.save_checkpoint(background=False, deadline=deadline)
        if main:
            uri = self.out.url(f"checkpoint-{st.global_step}")
            self.trackers.flush()  # after the checkpoint: TensorBoard otherwise holds up to 2 min of events
        self.accelerator.wait_for_everyone()
        if main:
            self._remove_share_docs()
        self.progress.update(phase="Preempted")
        seconds = time.monotonic() - t0
        what = f"checkpoint {uri} published in {seconds:.1f}s" if uri else "rank 0 publishes the checkpoint"
        raise Preempted(st.global_step, uri, f"stopped at step {st.global_step} on SIGTERM; {what}")

    def _remove_share_docs(self) -> None:
        """Every rank's share is over: a report that came after its checkpoint was done (or given up) goes."""
        if self.shared:
            try:
                if self.out.list(ckpt.SHARES):
                    self.out.delete_prefix(ckpt.SHARES)
            except Exception as exc:  # noqa: BLE001 - leftovers the next start removes
                logger.warning("could not remove %s: %s", self.out.url(ckpt.SHARES), exc)

    def finish(self, loss_value: float | None) -> TrainResult:
        acc = self.accelerator
        acc.wait_for_everyone()
        self._flush_logs()
        self._stop_agreed(exact=True)  # the last step's loss too: raises on a diverged run before anything is saved
        step = self.state.global_step
        already = (self.resumed is not None and self.resumed.step == step) or self.script_step == step
        due = self._checkpoint_due(step)
        if self._due_voted():
            due = self._agree([due])[0]
        if due and not already:
            self.save_checkpoint(background=True)
        if acc.is_main_process:
            self.publisher.wait()
            self._save_final()
            self.publish_events(wait=True)
        elif self.uploads_share:
            self.publisher.wait()  # this rank's share of the last checkpoint, before the barrier
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._remove_share_docs()
        self.trackers.finish()
        self.progress.update(phase="Succeeded")
        self.progress.close()
        self.rank_log.close()  # here too, not only in run_training: in-process callers (tests, benchmarks) end here
        runs = self.validator.runs
        images = [uri for run in runs for uri in run.uris]
        return TrainResult(self.out.uri, self.state.global_step, loss_value, images, runs[-1].uris if runs else [])

    def _save_final(self) -> None:
        cfg = self.cfg
        self._check_weights_finite()
        local = self.out.local_root() or (self.scratch / "final")
        local.mkdir(parents=True, exist_ok=True)
        if isinstance(cfg, LoraConfig):
            written = self.family.save_lora(local, self._lora_layers(cpu=True), cfg)
        else:
            trained = {
                name: self.accelerator.unwrap_model(mod)
                for name, mod in zip(self._trained_names(), self.trained_wrapped, strict=True)
            }
            pipe = self.family.full_pipeline(self.model_dir, cfg, trained)
            before = set(p for p in local.rglob("*") if p.is_file())
            pipe.save_pretrained(local, safe_serialization=True)
            written = [str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and p not in before]
            written = [w for w in written if not w.startswith("checkpoint-")]
        written.append(self._final_validation_and_card(local))
        readable_as_umask_allows(local, written)
        if self.out.local_root() is None:
            if self.trackers.active and self.trackers.local_dir.is_relative_to(local):
                self.trackers.flush()
                written += [
                    str(p.relative_to(local)) for p in sorted(self.trackers.local_dir.rglob("*")) if p.is_file()
                ]
            logger.info("uploading the final model: %d file(s) to %s", len(written), self.out.uri)
            hooks().before_final_upload()
            # Every file this run wrote, each checked where it landed: "saved" is said only of a model in S3.
            self.out.upload_verified([(local / rel, rel) for rel in dict.fromkeys(written)])
        logger.info("model saved to %s", self.out.uri)
        if cfg.push_to_hub and self.hub_repo:
            hub.push_folder(cfg, self.hub_repo, local)

    def _final_validation_and_card(self, local: Path) -> str:
        """Validate the final weights (as the LoRA script does) and write the model card; returns its name."""
        step = self.state.global_step
        if self.validator.due_at_end(step):
            self._validate(tag="test")
        last = self.validator.last
        text = model_card(
            self.cfg, steps=step, repo_id=self.hub_repo, validation_images=last.files if last else [],
            validation_step=last.step if last else None,
        )  # fmt: skip
        return write_model_card(local, text).name


def readable_as_umask_allows(root: Path, files: list[str]) -> None:
    """safetensors writes its files 0600: the model a run hands over gets the mode any new file gets (0644 under
    the usual umask 022), so the group that shares the output folder can load it."""
    umask = os.umask(0o022)
    os.umask(umask)
    for rel in files:
        path = root / rel
        if path.is_file():
            path.chmod(path.stat().st_mode | (0o666 & ~umask))


def install_sigterm(env: RunEnv) -> None:
    """Ask the loop to stop at the next optimizer step; the loop publishes a checkpoint and exits 75."""

    def handler(signum, frame):  # noqa: ARG001
        if env.stop.is_set():
            return
        logger.warning("SIGTERM: finishing the current step, then an emergency checkpoint")
        env.stop_time = time.monotonic()
        env.stop.set()

    signal.signal(signal.SIGTERM, handler)
    # A SIGTERM that came while the worker was starting set env.stop already (worker.early_stop is the same
    # Event: raising in the middle of an import can leave torch half-initialised); the run stops before its
    # first step.
    if env.stop.is_set():
        logger.warning("SIGTERM came while the worker was starting: stopping before the first step")


def run_training(cfg: CommonConfig, env: RunEnv | None = None) -> TrainResult:
    env = env or RunEnv.from_environ()
    install_sigterm(env)
    trainer = Trainer(cfg, env)
    failure: BaseException | None = None
    try:
        trainer.setup()
        return trainer.fit()
    except BaseException as exc:
        failure = exc
        if isinstance(exc, Exception) and not isinstance(exc, PreemptedError):
            # A crash (an OOM, a bug, a storage error) must not cost the checkpoint already on its way: a step-950
            # crash with checkpoint-900 in flight would otherwise resume from 800. A preemption drains it itself.
            publisher: ckpt.Publisher | None = getattr(trainer, "publisher", None)
            said = publisher.finish_in_flight(CRASH_PUBLISH_WAIT_SECONDS) if publisher is not None else None
            if said:
                logger.warning("training failed; the checkpoint in flight first: %s", said)
        raise
    finally:
        # The per-rank log's last upload, on success, preemption and crash alike (bounded: S3 may be down).
        rank_log: logs.RankLog | None = getattr(trainer, "rank_log", None)
        if rank_log is not None:
            rank_log.close(failure)
        claim: ckpt.Claim | None = getattr(trainer, "claim", None)
        if claim is not None:
            claim.release()  # after the log's last upload: the next run may start writing once this returns
        scratch: Scratch | None = getattr(trainer, "scratch", None)
        if scratch is not None:
            scratch.release()
