"""read_cxr on uncompressed DICOM the tests write: bit depths, LUTs, inversion, colour, raw data sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

from cxr_monai.io import read_cxr
from tests.dicom_factory import (
    COLUMNS,
    PATIENT_ID,
    ROWS,
    colour_gradient,
    gradient,
    make_dataset,
    save,
    save_raw,
    ybr422_native,
)


def _windowed(values: np.ndarray, center: float, width: float, low: float, high: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window, written out independently of pydicom."""
    x = values.astype(np.float64)
    c, w = center - 0.5, width - 1
    out = ((x - c) / w + 0.5) * (high - low) + low
    out[x <= c - w / 2] = low
    out[x > c + w / 2] = high
    return out


@pytest.mark.parametrize(
    ("bits", "dtype"), [(1, np.uint8), (8, np.uint8), (8, np.uint16), (12, np.uint16), (16, np.uint16)]
)
def test_monochrome2_values_pass_through(tmp_path: Path, bits: int, dtype: type) -> None:
    stored = gradient(bits).astype(dtype)
    image = read_cxr(save(make_dataset(stored, bits_stored=bits), tmp_path / "a.dcm"))
    assert image.pixels.dtype == np.float32
    assert image.shape == (ROWS, COLUMNS)
    np.testing.assert_array_equal(image.pixels, stored.astype(np.float32))
    assert image.source_format == "dicom"
    assert image.color_mode == "MONOCHROME2"
    assert image.extra["bits_stored"] == bits
    assert image.extra["inverted"] is False
    assert image.warnings == ()


def test_bits_stored_10_of_16_ignores_bits_above_high_bit(tmp_path: Path) -> None:
    stored = gradient(10)
    ds = make_dataset(stored, bits_stored=10)
    dirty = np.frombuffer(ds.PixelData, dtype="<u2").copy()
    dirty[::3] |= 0xF000  # overlay-style junk in the unused high bits
    ds.PixelData = dirty.tobytes()
    image = read_cxr(save(ds, tmp_path / "a.dcm"))
    np.testing.assert_array_equal(image.pixels, stored.astype(np.float32))
    assert (image.extra["bits_allocated"], image.extra["bits_stored"]) == (16, 10)


def test_signed_pixels_keep_their_sign(tmp_path: Path) -> None:
    stored = gradient(12, signed=True)
    image = read_cxr(save(make_dataset(stored, bits_stored=12), tmp_path / "a.dcm"))
    assert image.extra["pixel_representation"] == 1
    assert image.pixels.min() == -2048
    np.testing.assert_array_equal(image.pixels, stored.astype(np.float32))


def test_rescale_slope_and_intercept(tmp_path: Path) -> None:
    stored = gradient(12)
    ds = make_dataset(stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-100)
    image = read_cxr(save(ds, tmp_path / "a.dcm"))
    np.testing.assert_allclose(image.pixels, 2.0 * stored - 100.0)
    assert image.extra["modality_lut"] == "rescale"


def test_first_window_is_applied(tmp_path: Path) -> None:
    stored = gradient(12)
    ds = make_dataset(stored, bits_stored=12, WindowCenter=[1500, 3000], WindowWidth=[1000, 500])
    image = read_cxr(save(ds, tmp_path / "a.dcm"))
    np.testing.assert_allclose(image.pixels, _windowed(stored, 1500, 1000, 0, 4095), atol=1e-3)
    assert image.extra["voi"] == "window"
    assert (image.extra["window_center"], image.extra["window_width"]) == (1500.0, 1000.0)
    assert image.pixels.min() == 0 and image.pixels.max() == 4095  # the window clips both ends


def test_window_after_rescale(tmp_path: Path) -> None:
    stored = gradient(12)
    ds = make_dataset(stored, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024)
    ds.WindowCenter, ds.WindowWidth = 0, 2000
    image = read_cxr(save(ds, tmp_path / "a.dcm"))
    expected = _windowed(stored - 1024.0, 0, 2000, -1024, 4095 - 1024)
    np.testing.assert_allclose(image.pixels, expected, atol=1e-3)


def test_voi_lut_sequence_wins_over_window(tmp_path: Path) -> None:
    stored = gradient(8)
    first_mapped, entries = 16, 200
    table = (np.arange(entries) * 5) % 1024  # a deliberately non-monotonic 10-bit LUT
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [entries, first_mapped, 10])
    item.add_new("LUTData", "OW", table.astype("<u2").tobytes())  # OW, as scanners write it
    ds = make_dataset(stored, VOILUTSequence=[item], WindowCenter=128, WindowWidth=64)
    image = read_cxr(save(ds, tmp_path / "a.dcm"))
    expected = table[np.clip(stored.astype(int) - first_mapped, 0, entries - 1)]
    np.testing.assert_array_equal(image.pixels, expected.astype(np.float32))
    assert image.extra["voi"] == "lut"
    assert image.extra["output_range"] == (0.0, 1023.0)


def _modality_lut(table: np.ndarray, first_mapped: int, bits: int, vr: str) -> Dataset:
    """A Modality LUT Sequence item (PS3.3 C.11.1) holding ``table``; ``vr`` "OW" (bytes, as scanners
    write it) or "US" (a list of values)."""
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [len(table), first_mapped, bits])
    item.add_new("ModalityLUTType", "LO", "US")  # unspecified units
    data = table.astype("<u2").tobytes() if vr == "OW" else [int(v) for v in table]
    item.add_new("LUTData", vr, data)
    return item


def _pydicom_display(path: Path) -> np.ndarray:
    """pydicom's modality LUT then VOI stage (first window), as the reader applies them, on the file."""
    ds = pydicom.dcmread(path)
    return apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, index=0).astype(np.float64)


# 12-bit stored values 0..4095 through a 3000-entry table starting at 500: values below 500 take the first
# entry, values above 3499 the last, and the table is deliberately non-monotonic.
LUT_FIRST, LUT_ENTRIES = 500, 3000


@pytest.mark.parametrize(("bits", "vr"), [(16, "OW"), (16, "US"), (8, "US")])
def test_modality_lut_sequence_matches_pydicom(tmp_path: Path, bits: int, vr: str) -> None:
    stored = gradient(12)
    table = (np.arange(LUT_ENTRIES) * 37) % 2**bits
    ds = make_dataset(stored, bits_stored=12, ModalityLUTSequence=[_modality_lut(table, LUT_FIRST, bits, vr)])
    path = save(ds, tmp_path / "a.dcm")
    image = read_cxr(path)
    expected = table[np.clip(stored.astype(int) - LUT_FIRST, 0, LUT_ENTRIES - 1)]
    assert (stored < LUT_FIRST).any() and (stored >= LUT_FIRST + LUT_ENTRIES).any()  # both clips happen
    np.testing.assert_array_equal(image.pixels, expected.astype(np.float32))
    np.testing.assert_array_equal(image.pixels, _pydicom_display(path))
    assert (image.extra["modality_lut"], image.extra["voi"]) == ("lut", "none")
    assert image.extra["output_range"] == (0.0, float(2**bits - 1))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_window_after_modality_lut_sequence(tmp_path: Path, photometric: str) -> None:
    """The window maps the LUT's output range [0, 2**16 - 1] (PS3.3 C.11.2.1.2.1), and MONOCHROME1 is
    inverted within that range, not within the 12-bit stored range."""
    stored = gradient(12)
    table = (np.arange(LUT_ENTRIES) * 37) % 2**16
    item = _modality_lut(table, LUT_FIRST, 16, "OW")
    center, width = 30000.0, 20000.0
    ds = make_dataset(
        stored,
        photometric,
        bits_stored=12,
        ModalityLUTSequence=[item],
        WindowCenter=center,
        WindowWidth=width,
    )
    path = save(ds, tmp_path / "a.dcm")
    image = read_cxr(path)
    lut_values = table[np.clip(stored.astype(int) - LUT_FIRST, 0, LUT_ENTRIES - 1)]
    expected = _windowed(lut_values, center, width, 0, 65535)
    pydicom_values = _pydicom_display(path)
    np.testing.assert_allclose(pydicom_values, expected, atol=1e-6)  # the hand-written window agrees
    if photometric == "MONOCHROME1":
        expected = 65535.0 - expected
    np.testing.assert_allclose(image.pixels, expected, atol=1e-3)  # float32 of values up to 65535
    assert (image.extra["modality_lut"], image.extra["voi"]) == ("lut", "window")
    assert image.extra["output_range"] == (0.0, 65535.0)
    assert image.extra["inverted"] is (photometric == "MONOCHROME1")


def test_monochrome1_is_inverted_so_dense_is_bright(tmp_path: Path) -> None:
    stored = gradient(10)
    image = read_cxr(save(make_dataset(stored, "MONOCHROME1", bits_stored=10), tmp_path / "a.dcm"))
    np.testing.assert_array_equal(image.pixels, 1023.0 - stored)
    assert image.extra["inverted"] is True
    assert image.color_mode == "MONOCHROME1"


def test_monochrome1_inverted_after_window(tmp_path: Path) -> None:
    stored = gradient(10)
    ds = make_dataset(stored, "MONOCHROME1", bits_stored=10, WindowCenter=550, WindowWidth=1024)
    image = read_cxr(save(ds, tmp_path / "a.dcm"))
    np.testing.assert_allclose(image.pixels, 1023.0 - _windowed(stored, 550, 1024, 0, 1023), atol=1e-3)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_presentation_lut_shape_inverse_inverts_once(tmp_path: Path, photometric: str) -> None:
    stored = gradient(8)
    ds = make_dataset(stored, photometric, PresentationLUTShape="INVERSE")
    image = read_cxr(save(ds, tmp_path / "a.dcm"))
    np.testing.assert_array_equal(image.pixels, 255.0 - stored)


def test_rgb_becomes_luminance(tmp_path: Path) -> None:
    rgb = colour_gradient()
    image = read_cxr(save(make_dataset(rgb, "RGB"), tmp_path / "a.dcm"))
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert image.shape == (ROWS, COLUMNS)
    assert image.color_mode == "RGB"
    np.testing.assert_allclose(image.pixels, luma, atol=1.0)


def test_ybr_full_becomes_its_luma(tmp_path: Path) -> None:
    ybr = convert_color_space(colour_gradient(), "RGB", "YBR_FULL")
    image = read_cxr(save(make_dataset(ybr, "YBR_FULL"), tmp_path / "a.dcm"))
    np.testing.assert_allclose(image.pixels, ybr[..., 0], atol=1.0)


def test_ybr_full_422_native_becomes_its_luma(tmp_path: Path) -> None:
    rgb = colour_gradient()
    image = read_cxr(save(ybr422_native(rgb), tmp_path / "a.dcm"))
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert image.color_mode == "YBR_FULL_422"
    np.testing.assert_allclose(image.pixels, luma, atol=2.0)


@pytest.mark.parametrize(("implicit_vr", "syntax"), [(True, "Implicit"), (False, "Explicit")])
def test_raw_data_set_without_preamble(tmp_path: Path, implicit_vr: bool, syntax: str) -> None:
    stored = gradient(10)
    path = save_raw(make_dataset(stored, "MONOCHROME1", bits_stored=10), tmp_path / "raw.dcm",
                    implicit_vr=implicit_vr)  # fmt: skip
    assert path.read_bytes()[128:132] != b"DICM"
    image = read_cxr(path)
    np.testing.assert_array_equal(image.pixels, 1023.0 - stored)
    assert image.extra["transfer_syntax"] == f"{syntax} VR Little Endian"
    assert image.extra["transfer_syntax_inferred"] is True


def test_bytes_input_equals_path_input(tmp_path: Path) -> None:
    path = save(
        make_dataset(gradient(12), bits_stored=12, WindowCenter=2000, WindowWidth=3000), tmp_path / "a"
    )
    from_path, from_bytes = read_cxr(path), read_cxr(path.read_bytes())
    np.testing.assert_array_equal(from_path.pixels, from_bytes.pixels)
    assert from_path.extra == from_bytes.extra


def test_header_is_kept_without_pixel_data(tmp_path: Path) -> None:
    ds = make_dataset(gradient(8), PixelSpacing=[0.2, 0.15])
    image = read_cxr(save(ds, tmp_path / "a.dcm"))
    assert "PixelData" not in image.dataset
    assert image.dataset.PatientID == PATIENT_ID
    assert image.dataset.SOPInstanceUID == ds.SOPInstanceUID
    assert image.extra["pixel_spacing_mm"] == (0.2, 0.15)
    assert image.extra["pixel_spacing_source"] == "PixelSpacing"
    assert image.extra["transfer_syntax"] == "Explicit VR Little Endian"
    assert image.extra["transfer_syntax_inferred"] is False


def test_imager_pixel_spacing_is_the_fallback(tmp_path: Path) -> None:
    image = read_cxr(save(make_dataset(gradient(8), ImagerPixelSpacing=[0.143, 0.143]), tmp_path / "a"))
    assert image.extra["pixel_spacing_mm"] == (0.143, 0.143)
    assert image.extra["pixel_spacing_source"] == "ImagerPixelSpacing"
