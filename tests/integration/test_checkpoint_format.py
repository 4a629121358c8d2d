"""The checkpoint format's compatibility promise (docs/design.md, "Checkpoint format"): this release resumes a
format-1 checkpoint written by 0.1.0 bit-exactly, and refuses a checkpoint of a newer format with exit 64
naming the format and the way out (it never falls back past it, which would start over and later delete it).

The fixture (tests/fixtures/checkpoint-format-1) was written by the 0.1.0 trainer; see its README. "Bit-exactly"
holds on a CPU that computes as the one that wrote the fixtures; on another CPU generation the uninterrupted run
itself ends a few ulps away, and the resume is held to that CPU's own run within rounding
(`_assert_ends_as_the_old_release`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.trainer_utils import DOG, REPO, assert_identical, run_dreambooth

pytestmark = pytest.mark.integration

FIXTURE = REPO / "tests" / "fixtures" / "checkpoint-format-1"


def _args(out: Path) -> list[str]:
    # Exactly the command in the fixture's README.
    return [
        "train-lora", "--pretrained_model_name_or_path", "tiny://", "--instance_data_dir", str(DOG),
        "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--resolution", "32",
        "--train_batch_size", "1", "--max_train_steps", "4", "--checkpointing_steps", "2", "--seed", "7",
        "--report_to", "none",
    ]  # fmt: skip


LORA = "pytorch_lora_weights.safetensors"
UNET = "unet/diffusion_pytorch_model.safetensors"
# How far from this CPU's own uninterrupted run a resume of an old checkpoint may end where the CPU rounds
# differently from the fixture's, as a share of what steps 3-4 move the weights. Measured on a Xeon with AMX: 0.3%
# (full fine-tune), 0.002% (LoRA); a resume that lost the optimizer's moments, the RNG or the data position is off
# by a large part of the update.
ROUNDING_SHARE = 0.05


def _norm(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a) ** 0.5)


def _assert_ends_as_the_old_release(
    args: list[str], weights: str, matches_fixture: Callable[[dict[str, torch.Tensor]], bool], tmp: Path
) -> None:
    """The resumed run (`args`, done) ends with the old release's uninterrupted weights bit-identically — on a CPU
    whose float kernels compute as those of the machine that wrote the fixture. MKL and oneDNN pick their kernels
    per CPU generation, so another CPU ends the same command a few ulps away even uninterrupted; there the resume
    is held to this CPU's own uninterrupted run of the command, within rounding."""
    out = Path(args[args.index("--output_dir") + 1])
    got = load_file(out / weights)
    if matches_fixture(got):
        return
    here = tmp / "uninterrupted-here"
    mine_args = list(args)
    mine_args[mine_args.index("--output_dir") + 1] = str(here)
    run_dreambooth(mine_args)
    mine = load_file(here / weights)
    assert not matches_fixture(mine), (
        "this CPU computes the fixture's run bit-identically, so its resume must too: "
        f"{sum(not torch.equal(got[k], mine[k]) for k in got)} tensors differ"
    )
    off, update = _norm(got, mine), _norm(mine, load_file(here / "checkpoint-2" / weights))
    assert off <= ROUNDING_SHARE * update, (
        f"the resumed run ends {off:.3g} (L2) from this CPU's uninterrupted run, {off / update:.1%} of what steps 3-4 "
        "move the weights: more than rounding"
    )


def _identical_to(expected: dict[str, torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], bool]:
    return lambda got: got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_a_format_1_checkpoint_from_0_1_0_resumes_bit_exactly(tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(FIXTURE, out, ignore=shutil.ignore_patterns("README.md", "uninterrupted-*"))
    proc = run_dreambooth(_args(out))
    assert "resumed from" in proc.stderr and "checkpoint-2" in proc.stderr, proc.stderr[-3000:]
    expected = load_file(FIXTURE / "uninterrupted-step-4-lora-weights.safetensors")
    _assert_ends_as_the_old_release(_args(out), LORA, _identical_to(expected), tmp_path)


def test_a_newer_format_is_refused_with_exit_64_never_skipped(tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(FIXTURE, out, ignore=shutil.ignore_patterns("README.md", "uninterrupted-*"))
    manifest = out / "checkpoint-2" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["format"] = 99
    manifest.write_text(json.dumps(doc))
    proc = run_dreambooth(_args(out), check=False)
    assert proc.returncode == 64, proc.stderr[-3000:]
    assert "checkpoint format 99" in proc.stderr and "reads checkpoint formats up to 3" in proc.stderr
    assert "new output_dir" in proc.stderr
    # Nothing was trained over it: the checkpoint is still there, no new one appeared.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]


FULL_FIXTURE = REPO / "tests" / "fixtures" / "checkpoint-format-1-full"


def test_a_format_1_full_checkpoint_resumes_bit_exactly_under_format_2(tmp_path: Path) -> None:
    """Format 2 moved a full fine-tune's weights to `unet/`; the format-1 reader (training/unet.safetensors) stays."""
    import hashlib

    out = tmp_path / "out"
    shutil.copytree(FULL_FIXTURE, out, ignore=shutil.ignore_patterns("README.md", "uninterrupted-*"))
    args = _args(out)
    args[0] = "train"
    proc = run_dreambooth(args)
    assert "resumed from" in proc.stderr and "checkpoint-2" in proc.stderr, proc.stderr[-3000:]
    expected = json.loads((FULL_FIXTURE / "uninterrupted-step-4-unet-sha256.json").read_text())

    def matches(final: dict[str, torch.Tensor]) -> bool:
        return {k: hashlib.sha256(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                for k, v in final.items()} == expected  # fmt: skip

    _assert_ends_as_the_old_release(args, UNET, matches, tmp_path)


def test_a_full_checkpoint_loads_with_diffusers_from_pretrained(tmp_path: Path) -> None:
    """diffusers' documented "inference from a checkpoint": UNet2DConditionModel.from_pretrained(checkpoint-N/unet)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    out = tmp_path / "out"
    args = [*_args(out), "--train_text_encoder"]
    args[0] = "train"
    args[args.index("--max_train_steps") + 1] = "2"
    run_dreambooth(args)
    ckpt = out / "checkpoint-2"
    assert not (ckpt / "training" / "unet.safetensors").exists(), "one copy of the weights, not two"
    unet = UNet2DConditionModel.from_pretrained(ckpt / "unet")
    final = UNet2DConditionModel.from_pretrained(out / "unet")  # step 2 is the last: the same weights
    assert_identical(unet.state_dict(), final.state_dict())
    CLIPTextModel.from_pretrained(ckpt / "text_encoder")
    assert json.loads((ckpt / "manifest.json").read_text())["format"] == 3


LORA2_FIXTURE = REPO / "tests" / "fixtures" / "checkpoint-format-2-lora"


def test_a_format_2_lora_checkpoint_resumes_bit_exactly_under_format_3(tmp_path: Path) -> None:
    """Format 3 dropped the adapters' peft-named copy (training/<part>.safetensors); its reader stays."""
    out = tmp_path / "out"
    shutil.copytree(LORA2_FIXTURE, out, ignore=shutil.ignore_patterns("README.md", "uninterrupted-*"))
    args = [*_args(out), "--train_text_encoder"]
    proc = run_dreambooth(args)
    assert "resumed from" in proc.stderr and "checkpoint-2" in proc.stderr, proc.stderr[-3000:]
    expected = load_file(LORA2_FIXTURE / "uninterrupted-step-4-lora-weights.safetensors")
    _assert_ends_as_the_old_release(args, LORA, _identical_to(expected), tmp_path)
    # The checkpoint written after the resume is format 3: the adapters once, loadable as diffusers' LoRA file.
    ckpt = out / "checkpoint-4"
    assert json.loads((ckpt / "manifest.json").read_text())["format"] == 3
    assert not list((ckpt / "training").glob("*.safetensors")), "one copy of the adapters, not two"
    assert_identical(load_file(ckpt / LORA), load_file(out / LORA))  # step 4 is the last


def test_a_format_3_lora_checkpoint_resumes_bit_exactly(tmp_path: Path) -> None:
    """Resume from the diffusers-named adapters alone (text encoder too) ends with the uninterrupted weights."""
    out = tmp_path / "out"
    args = [*_args(out), "--train_text_encoder"]
    run_dreambooth(args)
    assert not list((out / "checkpoint-2" / "training").glob("*.safetensors"))
    uninterrupted = load_file(out / LORA)
    # As if stopped after checkpoint-2: later checkpoints and the final model gone.
    shutil.rmtree(out / "checkpoint-4")
    (out / LORA).unlink()
    proc = run_dreambooth(args)
    assert "resumed from" in proc.stderr and "checkpoint-2" in proc.stderr, proc.stderr[-3000:]
    assert_identical(load_file(out / LORA), uninterrupted)
