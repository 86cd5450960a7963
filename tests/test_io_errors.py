"""read_cxr refuses what it cannot read with an InvalidImageError naming the problem, never patient data."""

from __future__ import annotations

import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

from cxr_monai.errors import CXRMonaiError, InvalidImageError
from cxr_monai.io import MAX_PIXELS, MAX_SIDE, ImageLimits, read_cxr
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


# --- budgets checked before decoding (issue 8, "Why" 1 and 5) and content checks (issue 8, "Why" 7) ---


def one_bit_png(width: int, height: int) -> bytes:
    """A real, decodable all-black 1-bit PNG: ``width`` x ``height`` pixels in a few kB on disk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(row * height, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def deflate_bomb(inflated_mib: int) -> bytes:
    """A Deflated Explicit VR Little Endian file of a 64 x 64 image whose PixelData element holds
    ``inflated_mib`` MiB of zeros: a few hundred kB on disk."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = make_dataset(np.zeros((64, 64), np.uint16))
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta, body = DicomBytesIO(), DicomBytesIO()
    write_file_meta_info(meta, ds.file_meta)
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, inflated_mib * 2**20)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = deflater.compress(body.getvalue() + pixel_header) + deflater.flush(zlib.Z_FULL_FLUSH)
    # after a full flush each MiB of zeros compresses to the same self-contained bytes
    block = deflater.compress(b"\0" * 2**20) + deflater.flush(zlib.Z_FULL_FLUSH)
    return b"\0" * 128 + b"DICM" + meta.getvalue() + head + block * inflated_mib + deflater.flush()


def test_a_9999_squared_one_bit_png_is_refused_by_the_pixel_budget_before_decoding() -> None:
    data = one_bit_png(9999, 9999)
    assert len(data) < 100_000  # small upload, 100 Mpx
    start = time.perf_counter()
    _refused(data, "9999 x 9999 = 99,980,001 pixels", f"limit is {MAX_PIXELS:,} pixels")
    assert time.perf_counter() - start < 1.0  # decoding would take seconds and ~1 GB
    smaller = ImageLimits(max_pixels=1_000_000)
    with pytest.raises(InvalidImageError, match="limit is 1,000,000 pixels"):
        read_cxr(one_bit_png(1001, 1000), limits=smaller)
    assert read_cxr(one_bit_png(1000, 1000), limits=smaller).shape == (1000, 1000)


def test_side_limit_is_configurable(tmp_path: Path) -> None:
    path = save(make_dataset(gradient(8)), tmp_path / "a.dcm")
    with pytest.raises(InvalidImageError, match="limit is 50 per side"):
        read_cxr(path, limits=ImageLimits(max_side=50))
    with pytest.raises(InvalidImageError, match="limit is 2,000 pixels"):
        read_cxr(path, limits=ImageLimits(max_pixels=2000))


def test_a_deflate_bomb_is_refused_while_inflating(tmp_path: Path) -> None:
    """200 MiB of PixelData behind a 64 x 64 header: pydicom alone would inflate all of it first."""
    data = deflate_bomb(200)
    assert len(data) < 1_000_000
    _refused(data, "deflate-compressed", "inflates to more than", "MiB")
    # the same layout within budget is read: the declared 64 x 64 frame, the excess ignored
    assert read_cxr(deflate_bomb(1)).shape == (64, 64)


def test_a_deflated_dicom_within_budget_reads(tmp_path: Path) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = make_dataset(gradient(12), bits_stored=12)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    image = read_cxr(save(ds, tmp_path / "deflated.dcm"))
    assert image.extra["transfer_syntax_uid"] == DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(image.pixels, gradient(12).astype(np.float32))


def _nifti_bytes(pixels: np.ndarray) -> bytes:
    import nibabel as nib

    return nib.Nifti1Image(pixels[:, :, None], np.eye(4)).to_bytes()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_pixels_are_refused(bad: float) -> None:
    pixels = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    pixels[3, 5] = bad
    _refused(_nifti_bytes(pixels), "1 of 4096 pixels NaN or infinite")
    _refused(_nifti_bytes(np.full((64, 64), bad, np.float32)), "4096 of 4096 pixels")


def test_nan_rescale_slope_is_refused(tmp_path: Path) -> None:
    ds = make_dataset(gradient(12), bits_stored=12, RescaleSlope="NaN", RescaleIntercept=0)
    _refused(save(ds, tmp_path / "a.dcm"), "NaN or infinite")


@pytest.mark.parametrize(
    ("shape", "constant", "words"),
    [
        ((1, 1), False, ("1 x 1 pixels", "under 32 per side", "constant")),
        ((1, 10_000), False, ("10000 x 1 pixels", "aspect ratio is 10000.0:1")),
        ((100, 500), False, ("aspect ratio is 5.0:1",)),
        ((256, 256), True, ("constant",)),
    ],
    ids=["1x1", "10000x1", "5:1", "all-black"],
)
def test_degenerate_images_are_read_with_a_warning(
    shape: tuple[int, int], constant: bool, words: tuple[str, ...]
) -> None:
    pixels = np.zeros(shape, np.uint8) if constant or shape == (1, 1) else _noise(shape)
    image = read_cxr(_png(pixels))
    text = "; ".join(image.warnings)
    for word in words:
        assert word in text
    assert len(image.warnings) == len([w for w in ("per side", "aspect", "constant") if w in text])


def test_an_ordinary_image_gets_no_content_warning() -> None:
    assert read_cxr(_png(_noise((64, 100)))).warnings == ()


def _noise(shape: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 255, shape, dtype=np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
