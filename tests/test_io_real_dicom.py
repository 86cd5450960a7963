"""read_cxr on the four real chest radiographs in ../shared/data/dicom, against pydicom's own LUTs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ImplicitVRLittleEndian

from cxr_monai.io import read_cxr

pytestmark = pytest.mark.integration

NAMES = ("CR-MONO1-10-chest.dcm", "nih_", "rsna_", "siim_")


def _path(shared_data: Path, prefix: str) -> Path:
    matches = sorted((shared_data / "dicom").glob(f"{prefix}*"))
    if not matches:
        pytest.skip(f"no {prefix}* file in {shared_data / 'dicom'}")
    return matches[0]


def _expected(path: Path) -> np.ndarray:
    """pydicom's modality LUT then VOI LUT, and a MONOCHROME1 inversion done here by hand."""
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        # The Fuji sample is a raw data set; shared/data/README.md says it is implicit VR little endian.
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = (2 ** int(ds.BitsStored) - 1) - values  # no rescale in these files: stored range
    return values


@pytest.mark.parametrize("prefix", NAMES)
def test_real_dicom_matches_pydicom(shared_data: Path, prefix: str) -> None:
    path = _path(shared_data, prefix)
    image = read_cxr(path)
    expected = _expected(path)
    assert image.pixels.dtype == np.float32
    assert image.shape == expected.shape
    np.testing.assert_allclose(image.pixels, expected, atol=1e-3)
    assert image.source_format == "dicom"
    assert "PixelData" not in image.dataset
    assert image.warnings == ()  # all four are frontal chest CR/DX


def test_fuji_monochrome1_raw_data_set(shared_data: Path) -> None:
    image = read_cxr(_path(shared_data, "CR-MONO1-10-chest.dcm"))
    assert image.color_mode == "MONOCHROME1"
    assert image.extra["transfer_syntax"] == "Implicit VR Little Endian"
    assert image.extra["transfer_syntax_inferred"] is True
    assert (image.extra["bits_allocated"], image.extra["bits_stored"]) == (16, 10)
    assert image.extra["voi"] == "window" and image.extra["inverted"] is True
    # Bone bright: the spine (centre columns, middle rows) is brighter than the lung fields beside it.
    rows, cols = image.shape
    middle = image.pixels[rows // 3 : 2 * rows // 3]
    spine = middle[:, cols // 2 - cols // 20 : cols // 2 + cols // 20].mean()
    lungs = np.r_[middle[:, cols // 5 : cols // 3].ravel(), middle[:, 2 * cols // 3 : 4 * cols // 5].ravel()]
    assert spine > lungs.mean() + 100


@pytest.mark.parametrize("prefix", ["rsna_", "siim_"])
def test_jpeg_baseline_files_keep_pixel_spacing(shared_data: Path, prefix: str) -> None:
    image = read_cxr(_path(shared_data, prefix))
    assert image.extra["transfer_syntax"] == "JPEG Baseline (Process 1)"
    assert image.extra["pixel_spacing_mm"] is not None
    assert all(0.05 < s < 1.0 for s in image.extra["pixel_spacing_mm"])
    np.testing.assert_array_equal(read_cxr(_path(shared_data, prefix).read_bytes()).pixels, image.pixels)
