"""Issue #18, item 1: resume from a checkpoint of diffusers' train_dreambooth(_lora).py.

Each test builds the checkpoint the way the script does: its model, its `params_to_optimize` in its order, AdamW
and the LR scheduler prepared by accelerate, the script's save hook, `Accelerator.save_state`. Then the moments
are compared BY NAME (LoRA A/B matrices of equal shape would hide a positional mistake), the scheduler position,
and one step from our resume against one step after accelerate's own `load_state`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from tests.trainer_utils import run_dreambooth, tiny_args

pytestmark = pytest.mark.integration

STEPS = 2
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


def _script_models(method: str):
    """The script's trainable UNet and its params_to_optimize (train_dreambooth*.py, no text encoder training)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from dreambooth_trainer.tiny import ensure_tiny_model

    unet = UNet2DConditionModel.from_pretrained(ensure_tiny_model(), subfolder="unet")
    if method == "lora":
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
        params = list(filter(lambda p: p.requires_grad, unet.parameters()))
        names = [n for n, p in unet.named_parameters() if p.requires_grad]
    else:
        params = list(unet.parameters())
        names = [n for n, _ in unet.named_parameters()]
    lr = 5e-4 if method == "lora" else 5e-6  # the scripts' defaults
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    from diffusers.optimization import get_scheduler

    sched = get_scheduler("constant", optimizer=opt, num_warmup_steps=500, num_training_steps=6)
    return unet, opt, sched, names


def _hooks(acc, method: str) -> None:
    """The scripts' save/load hooks (the parts that matter for the UNet alone)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    def save(models, weights, output_dir):
        for model in models:
            if method == "lora":
                layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
                StableDiffusionPipeline.save_lora_weights(output_dir, unet_lora_layers=layers)
            else:
                model.save_pretrained(Path(output_dir) / "unet")
            weights.pop()

    def load(models, input_dir):
        model = models.pop()
        if method == "lora":
            sd, _ = StableDiffusionPipeline.lora_state_dict(input_dir)
            sd = {k.replace("unet.", ""): v for k, v in sd.items() if k.startswith("unet.")}
            set_peft_model_state_dict(model, convert_unet_state_dict_to_peft(sd), adapter_name="default")
        else:
            model.load_state_dict(UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet").state_dict())

    acc.register_save_state_pre_hook(save)
    acc.register_load_state_pre_hook(load)


def _loss(unet, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + k)
    c = unet.config
    x = torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=g)
    h = torch.randn(1, 8, c.cross_attention_dim, generator=g)
    return unet(x, torch.tensor([10 + k]), h).sample.pow(2).mean()


def _step(unet, opt, sched, k: int) -> None:
    _loss(unet, k).backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _write_script_checkpoint(method: str, out: Path) -> list[str]:
    from accelerate import Accelerator

    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    unet, opt, sched, names = _script_models(method)
    _hooks(acc, method)
    unet, opt, sched = acc.prepare(unet, opt, sched)
    for k in range(STEPS):
        _step(unet, opt, sched, k)
    acc.save_state(str(out / f"checkpoint-{STEPS}"))
    return names


def _checksums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("method", ["lora", "full"])
def test_moments_by_name_scheduler_and_one_step_match_accelerate(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from accelerate import Accelerator

    from dreambooth_api.config import MODELS
    from dreambooth_trainer.cli_args import parse_cli
    from dreambooth_trainer.train import RunEnv, Trainer

    out = tmp_path / "out"
    names = _write_script_checkpoint(method, out)
    saved = torch.load(out / f"checkpoint-{STEPS}" / "optimizer.bin", weights_only=True)
    saved_by_name = {f"unet.{names[i]}": saved["state"][i] for i in range(len(names))}

    monkeypatch.setenv("PROGRESS_PORT", "off")
    args = tiny_args(out, steps=6, ckpt=2, batch=1, extra=["--resume_from_checkpoint", f"checkpoint-{STEPS}"])
    cfg = parse_cli(MODELS[method], [*args, "--report_to", "none"], "t")
    trainer = Trainer(cfg, RunEnv())
    trainer.setup()
    try:
        assert trainer.state.global_step == STEPS
        assert trainer.lr_scheduler.scheduler.last_epoch == STEPS
        unet = trainer.trained[0]
        ours = [f"unet.{n}" for n, p in unet.named_parameters() if p.requires_grad]
        state = trainer.optimizer.state_dict()["state"]
        positions = [i for g in trainer.optimizer.state_dict()["param_groups"] for i in g["params"]]
        assert sorted(ours) == sorted(saved_by_name)
        for pos, name in enumerate(ours):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(state[positions[pos]][key], saved_by_name[name][key]), (name, key)

        # accelerate's own load_state into the script's objects, then the same step on both sides.
        acc = Accelerator(cpu=True)
        s_unet, s_opt, s_sched, _ = _script_models(method)
        _hooks(acc, method)
        s_unet, s_opt, s_sched = acc.prepare(s_unet, s_opt, s_sched)
        acc.load_state(str(out / f"checkpoint-{STEPS}"))
        _step(s_unet, s_opt, s_sched, 99)
        _step(trainer.trained_wrapped[0], trainer.optimizer, trainer.lr_scheduler, 99)
        theirs = dict(s_unet.named_parameters())
        for name, p in unet.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p, theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    finally:
        trainer.progress.close()
        trainer.rank_log.close()
        trainer.scratch.release()


def test_the_cli_resumes_it_and_writes_ours_beside_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write_script_checkpoint("lora", out)
    before = _checksums(out)
    args = tiny_args(out, steps=4, ckpt=2, batch=1, extra=["--resume_from_checkpoint", "latest"])
    proc = run_dreambooth(["train-lora", *args])
    assert "a checkpoint of diffusers' scripts" in proc.stderr and "exactness holds from" in proc.stderr
    assert (out / "checkpoint-4" / "manifest.json").exists()
    after = _checksums(out)
    assert {k: after.get(k) for k in before} == before


TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _script_models_with_text_encoder(method: str):
    """The scripts with --train_text_encoder: a UNet and a text encoder, params_to_optimize UNet first."""
    from transformers import CLIPTextModel

    from dreambooth_trainer.tiny import ensure_tiny_model

    unet, _, _, unet_names = _script_models(method)
    te = CLIPTextModel.from_pretrained(ensure_tiny_model(), subfolder="text_encoder")
    if method == "lora":
        from peft import LoraConfig

        te.requires_grad_(False)
        te.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TEXT_TARGETS))
        te_names = [n for n, p in te.named_parameters() if p.requires_grad]
    else:
        te.requires_grad_(True)
        te_names = [n for n, _ in te.named_parameters()]
    params = [p for p in unet.parameters() if p.requires_grad] + [p for p in te.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4 if method == "lora" else 5e-6, weight_decay=1e-2, eps=1e-8)
    from diffusers.optimization import get_scheduler

    sched = get_scheduler("constant", optimizer=opt, num_warmup_steps=500, num_training_steps=6)
    names = [f"unet.{n}" for n in unet_names] + [f"text_encoder.{n}" for n in te_names]
    return unet, te, opt, sched, names


def _hooks_with_text_encoder(acc, method: str, unet_type: type) -> None:
    """The scripts' save hooks with --train_text_encoder (train_dreambooth_lora.py / train_dreambooth.py)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def save(models, weights, output_dir):
        layers = {}
        for model in models:
            part = "unet" if isinstance(model, unet_type) else "text_encoder"
            if method == "lora":
                layers[f"{part}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
            else:
                model.save_pretrained(Path(output_dir) / part)
            weights.pop()
        if layers:
            StableDiffusionPipeline.save_lora_weights(output_dir, **layers)

    acc.register_save_state_pre_hook(save)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_with_the_text_encoder_weights_and_moments_of_both_parts_by_name(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--train_text_encoder: the LoRA text encoder through _set_state_dict_into_text_encoder, the full one from
    text_encoder/; every trained parameter of both parts equals the script's, and so does each moment by name."""
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    from dreambooth_api.config import MODELS
    from dreambooth_trainer.cli_args import parse_cli
    from dreambooth_trainer.train import RunEnv, Trainer

    out = tmp_path / "out"
    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    unet, te, opt, sched, names = _script_models_with_text_encoder(method)
    _hooks_with_text_encoder(acc, method, UNet2DConditionModel)
    unet, te, opt, sched = acc.prepare(unet, te, opt, sched)
    for k in range(STEPS):
        g = torch.Generator().manual_seed(k)
        ids = torch.randint(0, te.config.vocab_size, (1, 8), generator=g)
        c = unet.config
        x = torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=g)
        unet(x, torch.tensor([10 + k]), te(ids)[0]).sample.pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    acc.save_state(str(out / f"checkpoint-{STEPS}"))
    saved = torch.load(out / f"checkpoint-{STEPS}" / "optimizer.bin", weights_only=True)
    saved_by_name = {names[i]: saved["state"][i] for i in range(len(names))}
    theirs = {f"unet.{n}": p for n, p in unet.named_parameters()} | {
        f"text_encoder.{n}": p for n, p in te.named_parameters()
    }
    assert any(k.startswith("text_encoder.") and v["exp_avg"].abs().sum() > 0 for k, v in saved_by_name.items())

    monkeypatch.setenv("PROGRESS_PORT", "off")
    extra = ["--resume_from_checkpoint", f"checkpoint-{STEPS}", "--train_text_encoder"]
    args = tiny_args(out, steps=6, ckpt=2, batch=1, extra=extra)
    cfg = parse_cli(MODELS[method], [*args, "--report_to", "none"], "t")
    trainer = Trainer(cfg, RunEnv())
    trainer.setup()
    try:
        assert trainer.state.global_step == STEPS
        ours = [
            (f"{part}.{n}", p)
            for part, mod in zip(trainer._trained_names(), trainer.trained, strict=True)
            for n, p in mod.named_parameters()
            if p.requires_grad
        ]
        assert sorted(n for n, _ in ours) == sorted(saved_by_name)
        for name, p in ours:
            assert torch.equal(p, theirs[name]), name
        state = trainer.optimizer.state_dict()["state"]
        positions = [i for g in trainer.optimizer.state_dict()["param_groups"] for i in g["params"]]
        for pos, (name, _) in enumerate(ours):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(state[positions[pos]][key], saved_by_name[name][key]), (name, key)
    finally:
        trainer.progress.close()
        trainer.rank_log.close()
        trainer.scratch.release()


def test_the_cli_resumes_it_from_s3(bucket: str, aws_env: dict[str, str], tmp_path: Path) -> None:
    """An s3:// output: the script's checkpoint is fetched (sync_down), resumed, ours written beside it."""
    from dreambooth_trainer.storage import open_store

    local = tmp_path / "script-out"
    _write_script_checkpoint("lora", local)
    store = open_store(f"s3://{bucket}/out")
    store.upload_dir(local / f"checkpoint-{STEPS}", f"checkpoint-{STEPS}")
    before = {o.key: store.read_bytes(o.key) for o in store.list()}
    args = tiny_args(store.uri, steps=4, ckpt=2, batch=1, extra=["--resume_from_checkpoint", "latest"])
    env = {**aws_env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = run_dreambooth(["train-lora", *args], env=env)
    assert "a checkpoint of diffusers' scripts" in proc.stderr and f"at step {STEPS}" in proc.stderr
    assert store.exists("checkpoint-4/manifest.json") and store.exists("pytorch_lora_weights.safetensors")
    assert {k: store.read_bytes(k) for k in before} == before, "the script's checkpoint was changed"
