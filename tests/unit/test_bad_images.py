"""Bad images are judged when the folder is listed, before any model loads (issue 17, items 3 and 7)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth_trainer.data import DataError, list_images, load_image
from dreambooth_trainer.errors import classify

pytestmark = pytest.mark.unit


def good(folder: Path, n: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"ok-{i}.png")


def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def truncated_jpeg(path: Path) -> None:
    path.write_bytes(jpeg_bytes()[:-700])


def bomb_png(path: Path) -> None:
    # 1-bit, 10000 x 10000: a few KiB on disk, 1e8 pixels: over Pillow's limit of 89,478,485.
    Image.new("1", (10000, 10000)).save(path, optimize=True)


def garbage_png(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)


BAD = {"truncated.jpg": truncated_jpeg, "bomb.png": bomb_png, "garbage.png": garbage_png}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_image_is_exit_64_naming_the_file(name: str, tmp_path: Path) -> None:
    good(tmp_path)
    BAD[name](tmp_path / name)
    with pytest.raises(DataError) as err:
        list_images(tmp_path, flag="--instance_data_dir (spec.training.instanceDataDir)")
    message = str(err.value)
    assert classify(err.value) == 64
    assert name in message and "instanceDataDir" in message and "--skip_bad_images" in message, message


def test_skip_bad_images_skips_and_counts_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good(tmp_path)
    for name, make in BAD.items():
        make(tmp_path / name)
    with caplog.at_level(logging.WARNING, logger="dreambooth_trainer.data"):
        images = list_images(tmp_path, skip_bad=True)
    assert [p.name for p in images] == ["ok-0.png", "ok-1.png"]
    assert "skipping 3 bad image(s)" in caplog.text and all(n in caplog.text for n in BAD)


def test_a_good_jpeg_is_kept(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(jpeg_bytes())
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg"]


def test_a_decode_failure_at_first_use_names_the_file(tmp_path: Path) -> None:
    """A file damaged after listing (or damage only a full decode finds) still names itself, as bad input."""
    path = tmp_path / "late.jpg"
    truncated_jpeg(path)
    with pytest.raises(DataError, match="late.jpg") as err:
        load_image(path)
    assert classify(err.value) == 64


# ------------------------------------------------------------------------------------------------ item 7
def test_symlink_leaving_the_folder_is_refused_naming_it(tmp_path: Path) -> None:
    data, outside = tmp_path / "data", tmp_path / "secret"
    good(data)
    good(outside, 1)
    (data / "link.png").symlink_to(outside / "ok-0.png")
    with pytest.raises(DataError, match="link.png.*outside the folder"):
        list_images(data)


def test_symlink_inside_the_folder_is_fine(tmp_path: Path) -> None:
    good(tmp_path)
    (tmp_path / "alias.png").symlink_to(tmp_path / "ok-0.png")
    assert len(list_images(tmp_path)) == 3


def test_16_bit_grayscale_png_becomes_8_bit_rgb_not_white(tmp_path: Path) -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 65535 // (64 * 64 - 1)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 1], expected)
    assert rgb.min() == 0 and rgb.max() == 255 and 120 < rgb.mean() < 135  # a ramp, not white
