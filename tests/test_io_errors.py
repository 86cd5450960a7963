"""read_cxr refuses what it cannot read with an InvalidImageError naming the problem, never patient data."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

from cxr_monai.errors import CXRMonaiError, InvalidImageError
from cxr_monai.io import MAX_SIDE, read_cxr
from tests.dicom_factory import PATIENT_ID, PATIENT_NAME, gradient, make_dataset, save


def _refused(source: Path | bytes, *fragments: str) -> str:
    """Read ``source``, expect InvalidImageError containing every fragment; return the message."""
    with pytest.raises(InvalidImageError) as caught:
        read_cxr(source)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message
    for secret in (PATIENT_ID, *PATIENT_NAME.split("^")):
        assert secret not in message
    return message


def test_error_type_is_the_projects_and_a_value_error() -> None:
    assert issubclass(InvalidImageError, CXRMonaiError)
    assert issubclass(InvalidImageError, ValueError)


def test_missing_file(tmp_path: Path) -> None:
    _refused(tmp_path / "nope.dcm", "nope.dcm", "no such file")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    _refused(path, "empty.dcm", "empty")
    _refused(b"", "empty")


@pytest.mark.parametrize(
    "data",
    [b"hello, this is a text file and not an image\n" * 20, np.random.default_rng(0).bytes(4096)],
    ids=["text", "random"],
)
def test_not_an_image(data: bytes) -> None:
    _refused(data, "not a")


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.05], ids=["pixel-data-half", "pixel-data-tail", "header"])
def test_truncated_dicom(tmp_path: Path, keep: float) -> None:
    data = save(make_dataset(gradient(16)), tmp_path / "a.dcm").read_bytes()
    _refused(data[: int(len(data) * keep)], "truncated")


def test_no_pixel_data(tmp_path: Path) -> None:
    ds = make_dataset(gradient(8))
    del ds.PixelData
    _refused(save(ds, tmp_path / "a.dcm"), "no PixelData")


def test_multi_frame(tmp_path: Path) -> None:
    frames = np.stack([gradient(8)] * 3)
    _refused(save(make_dataset(frames), tmp_path / "a.dcm"), "multi-frame", "3 frames")


def test_palette_colour(tmp_path: Path) -> None:
    ds = make_dataset(gradient(8), "PALETTE COLOR")
    _refused(
        save(ds, tmp_path / "a.dcm"),
        "PhotometricInterpretation PALETTE COLOR",
        "expected MONOCHROME1, MONOCHROME2, RGB or YBR",
    )


def test_oversized_header_refused_before_decoding(tmp_path: Path) -> None:
    ds = make_dataset(gradient(8))  # 48 x 64 pixels of data, but the header claims far more
    ds.Rows = MAX_SIDE + 1
    _refused(save(ds, tmp_path / "a.dcm"), f"{MAX_SIDE + 1}", f"limit is {MAX_SIDE}")


def test_bits_allocated_32(tmp_path: Path) -> None:
    ds = make_dataset(gradient(16))
    ds.BitsAllocated = 32
    _refused(save(ds, tmp_path / "a.dcm"), "BitsAllocated 32", "expected 8 or 16")


def test_window_width_zero(tmp_path: Path) -> None:
    ds = make_dataset(gradient(12), bits_stored=12, WindowCenter=100, WindowWidth=0)
    _refused(save(ds, tmp_path / "a.dcm"), "window", "Window Width")


def test_corrupt_header_value_is_named_without_quoting_it(tmp_path: Path) -> None:
    ds = make_dataset(gradient(8))
    ds.add_new(0x00280008, "IS", "1")  # NumberOfFrames, patched below into a non-number
    data = save(ds, tmp_path / "a.dcm").read_bytes()
    at = data.index(b"\x28\x00\x08\x00IS\x02\x00") + 8
    message = _refused(data[:at] + b"x7" + data[at + 2 :], "corrupt element")
    assert "x7" not in message


def test_invalid_patient_values_are_not_echoed_into_warnings(tmp_path: Path) -> None:
    ds = make_dataset(gradient(8))
    ds.PatientName = "Verylongsecretname" * 5 + "^Patient"  # PN component over 64 characters
    path = save(ds, tmp_path / "a.dcm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_cxr(path)
        assert str(image.dataset.PatientName).startswith("Verylongsecretname")
    assert not [w for w in caught if "Verylongsecretname" in str(w.message) or "PN" in str(w.message)]


def test_samples_per_pixel_must_match_photometric(tmp_path: Path) -> None:
    ds = make_dataset(gradient(8))
    ds.SamplesPerPixel = 3
    _refused(save(ds, tmp_path / "a.dcm"), "SamplesPerPixel 3", "MONOCHROME2 needs 1")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` pixels, with one empty IDAT (never decoded)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [12_000, 20_000])
def test_huge_png_header_is_refused_with_a_typed_error(side: int) -> None:
    """20000 x 20000 trips Pillow's decompression-bomb guard in Image.open; both must be InvalidImageError."""
    with pytest.raises(InvalidImageError, match="limit is 10000 per side"):
        read_cxr(_png_header_only(side, side))


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(InvalidImageError, match="no such file"):
        read_cxr(tmp_path)


def test_sixteen_bit_colour_is_refused_by_name(tmp_path: Path) -> None:
    rgb = (np.arange(48 * 64 * 3, dtype=np.uint16).reshape(48, 64, 3) % 4096).astype(np.uint16)
    path = save(make_dataset(rgb, photometric="RGB", bits_stored=12), tmp_path / "rgb16.dcm")
    _refused(path, "RGB with BitsAllocated 16")
