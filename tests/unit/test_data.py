"""dreambooth_trainer.data: listing, transforms, per-item determinism, the epoch sampler (no model needed)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from dreambooth_trainer.data import (
    DataError,
    DreamBoothDataset,
    EpochSampler,
    collate_fn,
    item_generator,
    list_images,
    load_image,
    transform_image,
)

pytestmark = pytest.mark.unit
torch.set_num_threads(1)


class FakeTokenizer:
    """Enough of a tokenizer for the dataset: fixed-length ids that encode the prompt's length."""

    model_max_length = 8

    def __call__(self, prompt, truncation, padding, max_length, return_tensors):
        assert truncation and padding == "max_length" and return_tensors == "pt"
        n = min(len(prompt.split()) + 2, max_length)
        ids = torch.full((1, max_length), 99, dtype=torch.long)
        ids[0, :n] = torch.arange(1, n + 1)
        mask = torch.zeros((1, max_length), dtype=torch.long)
        mask[0, :n] = 1
        return type("Enc", (), {"input_ids": ids, "attention_mask": mask})()


def noise_images(folder: Path, n: int, size: tuple[int, int] = (48, 40), seed: int = 0) -> list[Path]:
    """Random-noise PNGs, so that every crop offset gives different pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"img-{i:02d}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def solid_images(folder: Path, values: list[int], size: int = 8) -> None:
    """One flat grey image per value: which image an item used can be read back from its pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(values):
        Image.new("RGB", (size, size), (v, v, v)).save(folder / f"{i:02d}.png")


def pixel_id(t: torch.Tensor) -> int:
    return int(round((float(t.mean()) * 0.5 + 0.5) * 255))


# ----------------------------------------------------------------------------------------------- listing


def test_list_images_sorted_and_skips_non_images_with_warning(tmp_path, caplog):
    noise_images(tmp_path, 3)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "subdir").mkdir()
    # A damaged image file is bad input (issue 17): named, unless --skip_bad_images skips and counts it.
    with pytest.raises(DataError, match="broken.png.*--skip_bad_images"):
        list_images(tmp_path)
    with caplog.at_level(logging.WARNING, logger="dreambooth_trainer.data"):
        images = list_images(tmp_path, skip_bad=True)
    assert [p.name for p in images] == ["img-00.png", "img-01.png", "img-02.png"]
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "notes.txt" in warning and "broken.png" in warning
    assert "subdir" not in warning


def test_missing_folder_is_a_data_error_naming_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=str(missing)) as err:
        list_images(missing, flag="instance_data_dir")
    assert "instance_data_dir" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_empty_folder_is_a_data_error_naming_it_and_the_fix(tmp_path):
    (tmp_path / "readme.md").write_text("# no images here")
    with pytest.raises(DataError) as err:
        list_images(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "readme.md" in message and "add" in message


def test_file_instead_of_folder_is_a_data_error(tmp_path):
    path = noise_images(tmp_path, 1)[0]
    with pytest.raises(DataError, match="not a folder"):
        list_images(path)


def test_load_image_applies_exif_orientation_and_rgb(tmp_path):
    arr = np.zeros((10, 20), dtype=np.uint8)  # 20 wide, 10 high, greyscale
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(arr, mode="L").save(tmp_path / "rot.jpg", exif=exif)
    image = load_image(tmp_path / "rot.jpg")
    assert image.mode == "RGB"
    assert image.size == (10, 20)


# -------------------------------------------------------------------------------------------- transforms


def test_transform_range_and_exact_values():
    white = Image.new("RGB", (40, 40), (255, 255, 255))
    black = Image.new("RGB", (40, 40), (0, 0, 0))
    mid = Image.new("RGB", (32, 32), (51, 102, 204))
    assert torch.equal(transform_image(white, 32, center_crop=True), torch.ones(3, 32, 32))
    assert torch.equal(transform_image(black, 32, center_crop=True), -torch.ones(3, 32, 32))
    t = transform_image(mid, 32, center_crop=True)
    assert t.dtype == torch.float32 and t.shape == (3, 32, 32)
    # ToTensor then Normalize(0.5, 0.5), channel by channel.
    for c, v in enumerate((51, 102, 204)):
        expected = torch.tensor(float(v)).div(255).sub(0.5).div(0.5)
        assert torch.equal(t[c], expected.expand(32, 32))
        assert abs(float(expected) - (v / 255 - 0.5) / 0.5) < 1e-6


def test_resize_shorter_side_then_center_crop_takes_the_middle():
    # 64x32: the shorter side is already 32 → no resize; the center crop is columns 16..48.
    arr = np.zeros((32, 64, 3), dtype=np.uint8)
    arr[:, :16] = 255
    arr[:, 48:] = 255
    t = transform_image(Image.fromarray(arr), 32, center_crop=True)
    assert torch.equal(t, -torch.ones(3, 32, 32))
    # 100x50 → shorter side 32: 64x32.
    big = transform_image(Image.new("RGB", (100, 50)), 32, center_crop=True)
    assert big.shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("mode", "pil_filter"),
    [
        ("bilinear", Image.Resampling.BILINEAR),
        ("lanczos", Image.Resampling.LANCZOS),
        ("bicubic", Image.Resampling.BICUBIC),
        ("box", Image.Resampling.BOX),
        ("hamming", Image.Resampling.HAMMING),
        ("nearest", Image.Resampling.NEAREST),
        # torchvision maps NEAREST_EXACT to PIL's nearest for PIL images.
        ("nearest_exact", Image.Resampling.NEAREST),
    ],
)
def test_resize_uses_the_asked_filter_like_torchvision_on_pil(mode, pil_filter):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8))
    # 70x50 → shorter side 32: 44x32, then the middle 32 columns (6..38).
    resized = image.resize((44, 32), resample=pil_filter).crop((6, 0, 38, 32))
    expected = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
    assert torch.equal(transform_image(image, 32, center_crop=True, interpolation=mode), expected)


def test_lanczos_and_bilinear_give_different_pixels_and_unknown_filters_are_refused(tmp_path: Path):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8))
    lanczos = transform_image(image, 32, center_crop=True, interpolation="lanczos")
    assert not torch.equal(lanczos, transform_image(image, 32, center_crop=True))  # bilinear by default
    with pytest.raises(ValueError, match="interpolation"):
        transform_image(image, 32, center_crop=True, interpolation="cubic")
    noise_images(tmp_path / "inst", 2, size=(56, 40))
    # The dataset passes its filter on: the same item differs between lanczos and the bilinear default.
    item = make_dataset(tmp_path, center_crop=True)[0]["instance_images"]
    assert not torch.equal(
        item, make_dataset(tmp_path, center_crop=True, interpolation="lanczos")[0]["instance_images"]
    )
    with pytest.raises(DataError, match="interpolation"):
        make_dataset(tmp_path, center_crop=True, interpolation="cubic")


def test_random_crop_needs_a_generator():
    with pytest.raises(ValueError, match="generator"):
        transform_image(Image.new("RGB", (40, 48)), 32, center_crop=False)


def test_item_generator_is_a_pure_function():
    a = torch.rand(4, generator=item_generator(1, 2, 3))
    b = torch.rand(4, generator=item_generator(1, 2, 3))
    assert torch.equal(a, b)
    for other in ((2, 2, 3), (1, 3, 3), (1, 2, 4), (1, 2, 3, 1)):
        assert not torch.equal(a, torch.rand(4, generator=item_generator(*other)))
    torch.rand(4, generator=item_generator(-5, 0, 0))  # negative seeds are accepted


# ----------------------------------------------------------------------------------------------- dataset


def make_dataset(root: Path, **kwargs) -> DreamBoothDataset:
    kwargs.setdefault("size", 32)
    return DreamBoothDataset(root / "inst", "a photo of sks dog", FakeTokenizer(), **kwargs)


def test_random_crop_is_a_function_of_seed_epoch_index(tmp_path):
    noise_images(tmp_path / "inst", 3, size=(56, 40))
    a, b = make_dataset(tmp_path, seed=7), make_dataset(tmp_path, seed=7)
    for i in range(3):
        assert torch.equal(a[i]["instance_images"], b[i]["instance_images"])
    # Asking for items in another order, or twice, changes nothing: no hidden RNG state.
    first = [a[i]["instance_images"] for i in (2, 0, 1, 0)]
    assert torch.equal(first[1], first[3])
    assert torch.equal(first[0], b[2]["instance_images"])

    # A 56x40 image resized to 44x32 has 13 crop offsets: some item must move between epochs and seeds.
    a.set_epoch(1)
    assert any(not torch.equal(a[i]["instance_images"], b[i]["instance_images"]) for i in range(3))
    other_seed = make_dataset(tmp_path, seed=8)
    assert any(not torch.equal(other_seed[i]["instance_images"], b[i]["instance_images"]) for i in range(3))
    # (epoch, index) tuples override the dataset's own epoch.
    b.set_epoch(5)
    assert torch.equal(b[(1, 2)]["instance_images"], a[2]["instance_images"])


def test_center_crop_ignores_seed_and_epoch(tmp_path):
    noise_images(tmp_path / "inst", 2, size=(56, 40))
    a = make_dataset(tmp_path, center_crop=True, seed=1)
    b = make_dataset(tmp_path, center_crop=True, seed=2)
    b.set_epoch(3)
    assert all(torch.equal(a[i]["instance_images"], b[i]["instance_images"]) for i in range(2))


def test_random_flip_is_deterministic_too(tmp_path):
    noise_images(tmp_path / "inst", 4, size=(32, 32))
    a = make_dataset(tmp_path, center_crop=True, random_flip=True, seed=3)
    b = make_dataset(tmp_path, center_crop=True, random_flip=True, seed=3)
    plain = make_dataset(tmp_path, center_crop=True)
    flipped = 0
    for epoch in range(4):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for i in range(4):
            x = a[i]["instance_images"]
            assert torch.equal(x, b[i]["instance_images"])
            flipped += not torch.equal(x, plain[i]["instance_images"])
    assert 0 < flipped < 16


def test_length_and_indices_with_class_images(tmp_path):
    solid_images(tmp_path / "inst", [10, 20, 30])
    solid_images(tmp_path / "cls", [100, 110, 120, 130, 140])
    ds = make_dataset(tmp_path, class_data_root=tmp_path / "cls", class_prompt="a photo of dog", size=8)
    assert len(ds) == 5 and ds.num_instance_images == 3 and ds.num_class_images == 5
    for i in range(5):
        ex = ds[i]
        assert pixel_id(ex["instance_images"]) == [10, 20, 30][i % 3]
        assert pixel_id(ex["class_images"]) == [100, 110, 120, 130, 140][i]
        assert ex["instance_prompt_ids"].shape == (1, 8) and ex["class_prompt_ids"].shape == (1, 8)
        # "a photo of sks dog" (5 words) and "a photo of dog" (4) tokenize differently.
        assert int(ex["instance_attention_mask"].sum()) == 7 and int(ex["class_attention_mask"].sum()) == 6
    with pytest.raises(IndexError):
        ds[5]

    # class_num caps the class images used; more instance than class images sets the length.
    capped = make_dataset(tmp_path, class_data_root=tmp_path / "cls", class_prompt="dog", class_num=2, size=8)
    assert len(capped) == 3 and capped.num_class_images == 2
    assert [pixel_id(capped[i]["class_images"]) for i in range(3)] == [100, 110, 100]


def test_without_class_images_length_is_instance_count(tmp_path):
    solid_images(tmp_path / "inst", [10, 20, 30, 40])
    ds = make_dataset(tmp_path, size=8)
    assert len(ds) == 4
    assert "class_images" not in ds[0]


def test_empty_class_folder_is_a_data_error(tmp_path):
    solid_images(tmp_path / "inst", [10])
    (tmp_path / "cls").mkdir()
    with pytest.raises(DataError, match="class_data_dir"):
        make_dataset(tmp_path, class_data_root=tmp_path / "cls", class_prompt="dog")


def test_tokenizer_max_length_overrides_the_tokenizer(tmp_path):
    solid_images(tmp_path / "inst", [10])
    ds = make_dataset(tmp_path, size=8, tokenizer_max_length=4)
    assert ds[0]["instance_prompt_ids"].shape == (1, 4)


def test_collate_puts_instance_rows_first_then_class(tmp_path):
    solid_images(tmp_path / "inst", [10, 20])
    solid_images(tmp_path / "cls", [100, 110])
    ds = make_dataset(tmp_path, class_data_root=tmp_path / "cls", class_prompt="a dog", size=8)
    batch = collate_fn([ds[0], ds[1]], with_prior_preservation=True)
    assert [pixel_id(x) for x in batch["pixel_values"]] == [10, 20, 100, 110]
    assert batch["pixel_values"].shape == (4, 3, 8, 8) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == (4, 8) and batch["attention_mask"].shape == (4, 8)
    assert [int(m.sum()) for m in batch["attention_mask"]] == [7, 7, 4, 4]
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1

    only_instance = collate_fn([ds[0], ds[1]])
    assert only_instance["pixel_values"].shape[0] == 2 and only_instance["input_ids"].shape == (2, 8)


def test_precomputed_text_embeddings_replace_ids_without_mask(tmp_path):
    solid_images(tmp_path / "inst", [10, 20])
    solid_images(tmp_path / "cls", [100])
    inst_h, cls_h = torch.randn(1, 8, 32), torch.randn(1, 8, 32)
    ds = DreamBoothDataset(
        tmp_path / "inst",
        "ignored",
        None,
        class_data_root=tmp_path / "cls",
        class_prompt="ignored",
        size=8,
        encoder_hidden_states=inst_h,
        class_prompt_encoder_hidden_states=cls_h,
    )
    ex = ds[0]
    assert ex["instance_prompt_ids"] is inst_h and "instance_attention_mask" not in ex
    batch = collate_fn([ds[0], ds[1]], with_prior_preservation=True)
    assert batch["input_ids"].shape == (4, 8, 32) and "attention_mask" not in batch
    assert torch.equal(batch["input_ids"][3], cls_h[0])


def test_pixels_span_the_full_range(tmp_path):
    # 40x32 with size 32: no resize (which would smooth the noise), so bytes 0 and 255 reach the output.
    noise_images(tmp_path / "inst", 2, size=(40, 32))
    ds = make_dataset(tmp_path, size=32)
    for i in range(2):
        x = ds[i]["instance_images"]
        assert x.shape == (3, 32, 32)
        assert x.min() == -1 and x.max() == 1


# ----------------------------------------------------------------------------------------------- sampler


def test_sampler_is_a_pure_function_of_seed_and_epoch():
    a, b = EpochSampler(10, seed=3), EpochSampler(10, seed=3)
    assert list(a) == list(b) and sorted(a) == list(range(10))
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(a) != list(EpochSampler(10, seed=3))
    assert list(EpochSampler(10, seed=4)) != list(EpochSampler(10, seed=3))
    # Iterating twice, or after other torch draws, gives the same order: no global RNG involved.
    torch.manual_seed(123)
    first = list(a)
    torch.rand(10)
    assert list(a) == first
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("n,replicas,drop_last", [(10, 2, False), (11, 3, False), (11, 3, True), (2, 4, False)])
def test_sampler_matches_distributed_sampler(n, replicas, drop_last):
    for epoch in (0, 3):
        for rank in range(replicas):
            ours = EpochSampler(n, replicas, rank, seed=5, drop_last=drop_last)
            theirs = DistributedSampler(range(n), replicas, rank, shuffle=True, seed=5, drop_last=drop_last)
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)
            assert len(ours) == len(theirs)


def test_shards_are_disjoint_and_cover():
    n, replicas = 12, 3
    shards = [list(EpochSampler(n, replicas, r, seed=1)) for r in range(replicas)]
    assert all(len(s) == 4 for s in shards)
    assert sorted(sum(shards, [])) == list(range(n))
    # Uneven: every index appears, padding repeats only a few, every rank gets the same count.
    shards = [list(EpochSampler(10, 3, r, seed=1)) for r in range(3)]
    flat = sum(shards, [])
    assert set(flat) == set(range(10)) and len(flat) == 12 and {len(s) for s in shards} == {4}


@pytest.mark.parametrize("batch_size,skip", [(1, 3), (2, 1), (2, 3), (3, 2), (4, 0)])
def test_skip_equals_dropping_the_first_batches(batch_size, skip):
    for rank in range(2):
        full = EpochSampler(11, 2, rank, seed=9, batch_size=batch_size)
        full.set_epoch(2)
        expected = list(DataLoader(range(100), batch_size=batch_size, sampler=full))[skip:]

        resumed = EpochSampler(11, 2, rank, seed=9, batch_size=batch_size)
        resumed.set_epoch(2)
        resumed.skip(skip)
        got = list(DataLoader(range(100), batch_size=batch_size, sampler=resumed))
        assert [b.tolist() for b in got] == [b.tolist() for b in expected]
        assert len(resumed) == full.num_samples - min(skip * batch_size, full.num_samples)


def test_skip_holds_for_its_epoch_only():
    s = EpochSampler(8, seed=0, batch_size=2)
    s.set_epoch(4)
    s.skip(2)
    s.set_epoch(4)  # same epoch: still skipped
    assert list(s) == s.epoch_indices()[4:] and len(s) == 4
    s.set_epoch(5)
    assert list(s) == s.epoch_indices() and len(s) == 8


def test_skip_bounds():
    s = EpochSampler(5, batch_size=2)  # batches of 2, 2, 1
    s.skip(3)
    assert list(s) == [] and len(s) == 0
    with pytest.raises(ValueError, match="cannot skip"):
        s.skip(4)
    with pytest.raises(ValueError):
        EpochSampler(5, 2, 2)


def test_with_epoch_pairs_drive_the_dataset(tmp_path):
    noise_images(tmp_path / "inst", 3, size=(56, 40))
    ds = make_dataset(tmp_path, seed=2)
    sampler = EpochSampler(len(ds), seed=2, with_epoch=True)
    sampler.set_epoch(3)
    pairs = list(sampler)
    assert all(e == 3 for e, _ in pairs)
    ds.set_epoch(3)
    for e, i in pairs:
        assert torch.equal(ds[(e, i)]["instance_images"], ds[i]["instance_images"])
