"""The class-image stage's pure rules: which indices a later attempt generates, and which folders it refuses."""

from __future__ import annotations

import pytest

from dreambooth_api.config import FullConfig
from dreambooth_trainer.classimages import file_name, indices_to_generate, manifest_conflict

pytestmark = pytest.mark.unit

CFG = FullConfig(
    pretrained_model_name_or_path="s3://models/sd/", instance_data_dir="d", instance_prompt="a photo of sks dog",
    with_prior_preservation=True, class_data_dir="s3://data/class/", class_prompt="a photo of dog",
)  # fmt: skip


def ours(*indices: int) -> list[str]:
    return [file_name(i, bytes([i])) for i in indices]


@pytest.mark.parametrize(
    ("names", "missing", "expected"),
    [
        ([], 3, [0, 1, 2]),  # an empty folder
        (["a.png", "b.png"], 3, [2, 3, 4]),  # after the user's images, as the scripts number them
        (ours(0, 1, 2), 2, [3, 4]),  # a larger num_class_images later
        (ours(1, 3), 2, [0, 2]),  # one rank's share of an interrupted attempt made it: fill the holes
        (["a.png", *ours(1, 3)], 2, [2, 4]),
    ],
)
def test_indices_to_generate_fill_holes_and_never_repeat(names: list[str], missing: int, expected: list[int]) -> None:
    got = indices_to_generate(names, missing)
    assert got == expected
    assert not {int(n[:5]) for n in names if n[:5].isdigit()} & set(got)


def test_a_manifest_of_the_same_model_and_prompt_is_reused_whatever_the_resolution() -> None:
    manifest = {"model": "s3://models/sd", "classPrompt": "a photo of dog", "revision": None, "variant": None,
                "resolution": 768}  # fmt: skip
    assert manifest_conflict(manifest, CFG) is None


def test_a_manifest_of_another_model_or_prompt_is_a_conflict_naming_both() -> None:
    manifest = {"model": "s3://models/other/", "classPrompt": "a photo of cat", "revision": None, "variant": None}
    why = manifest_conflict(manifest, CFG)
    assert why is not None
    assert "model 's3://models/other' (this run: 's3://models/sd')" in why
    assert "class prompt 'a photo of cat' (this run: 'a photo of dog')" in why
