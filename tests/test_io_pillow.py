"""read_cxr on PNG and JPEG: grayscale float32 (rows, columns), whatever the Pillow mode."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_monai.errors import InvalidImageError
from cxr_monai.io import MAX_SIDE, read_cxr
from tests.dicom_factory import COLUMNS, ROWS, colour_gradient, gradient

LUMA = np.array([0.299, 0.587, 0.114])


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_png_8bit_grayscale() -> None:
    stored = gradient(8)
    image = read_cxr(_encode(Image.fromarray(stored), "PNG"))
    assert (image.source_format, image.color_mode) == ("png", "L")
    assert image.pixels.dtype == np.float32
    np.testing.assert_array_equal(image.pixels, stored)
    assert image.dataset is None and image.warnings == ()
    assert image.extra["pixel_spacing_mm"] is None


def test_png_16bit_grayscale_keeps_full_range() -> None:
    stored = gradient(16)
    image = read_cxr(_encode(Image.fromarray(stored), "PNG"))
    assert image.color_mode.startswith("I")
    np.testing.assert_array_equal(image.pixels, stored)
    assert image.pixels.max() == 65535


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_png_colour_becomes_luminance(mode: str) -> None:
    rgb = colour_gradient()
    picture = Image.fromarray(rgb)
    if mode == "RGBA":
        picture.putalpha(Image.fromarray(gradient(8)))  # alpha must not change the gray values
    image = read_cxr(_encode(picture, "PNG"))
    assert image.color_mode == mode
    assert image.shape == (ROWS, COLUMNS)
    np.testing.assert_allclose(image.pixels, rgb @ LUMA, atol=1.0)


def test_jpeg_grayscale_and_colour() -> None:
    gray = read_cxr(_encode(Image.fromarray(gradient(8)), "JPEG", quality=95))
    assert (gray.source_format, gray.color_mode, gray.shape) == ("jpeg", "L", (ROWS, COLUMNS))
    assert np.abs(gray.pixels - gradient(8)).mean() < 2.0
    colour = read_cxr(_encode(Image.fromarray(colour_gradient()), "JPEG", quality=95))
    assert colour.color_mode == "RGB"
    assert np.abs(colour.pixels - colour_gradient() @ LUMA).mean() < 2.0


def test_exif_orientation_is_applied_as_viewers_do() -> None:
    picture = np.zeros((ROWS, COLUMNS), np.uint8)
    picture[:8, :8] = 255  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: display rotated 90 degrees clockwise
    image = read_cxr(_encode(Image.fromarray(picture), "JPEG", quality=95, exif=exif))
    assert image.shape == (COLUMNS, ROWS)
    rows, cols = np.nonzero(image.pixels > 128)
    assert rows.max() < 8 and cols.min() >= ROWS - 8  # now in the top-right corner


def test_path_equals_bytes_and_extension_does_not_matter(tmp_path: Path) -> None:
    data = _encode(Image.fromarray(gradient(8)), "PNG")
    path = tmp_path / "scan.dcm"  # a misleading extension: content decides
    path.write_bytes(data)
    np.testing.assert_array_equal(read_cxr(path).pixels, read_cxr(data).pixels)
    assert read_cxr(path).source_format == "png"


def test_truncated_png() -> None:
    data = _encode(Image.fromarray(gradient(16)), "PNG")
    with pytest.raises(InvalidImageError, match="not a readable image"):
        read_cxr(data[: len(data) // 2])


def test_oversized_png_refused() -> None:
    wide = Image.new("1", (MAX_SIDE + 1, 1))
    with pytest.raises(InvalidImageError, match=f"{MAX_SIDE + 1} x 1 pixels"):
        read_cxr(_encode(wide, "PNG"))
