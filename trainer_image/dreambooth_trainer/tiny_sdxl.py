"""A tiny, randomly initialised Stable Diffusion XL pipeline for tests (``dreambooth tiny-model --family sdxl``).

SDXL's shape at toy size: a UNet conditioned on ``text_time`` (pooled text embeddings + the six ``add_time_ids``),
``CLIPTextModel`` + ``CLIPTextModelWithProjection`` whose penultimate hidden states are concatenated (32 + 32 =
the UNet's cross-attention width 64), the project's own tokenizer twice, a VAE and SDXL's Euler scheduler.
``StableDiffusionXLPipeline.from_pretrained(DIR)`` loads it offline and generates at 32 px; same seed, same bytes.
"""

from __future__ import annotations

from pathlib import Path

from .tiny import MAX_LENGTH, _seeded, make_tokenizer, write_tokenizer_files

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
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
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
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=32,
            scaling_factor=0.13025,  # SDXL's VAE factor
        )
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
    # As in tiny.make_tiny_model: transformers skips weights off rank 0, and the project's tokenizer files last.
    from safetensors.torch import save_file

    for name, module in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        folder = out_dir / name
        if not (folder / "model.safetensors").exists():
            folder.mkdir(parents=True, exist_ok=True)
            module.config.to_json_file(folder / "config.json")
            state = {k: v.contiguous() for k, v in module.state_dict().items()}
            save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    write_tokenizer_files(out_dir / "tokenizer")
    write_tokenizer_files(out_dir / "tokenizer_2")
    return out_dir
