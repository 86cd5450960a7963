"""read_cxr on 2-D NIfTI: the affine decides what is up and left, as in a NIfTI viewer.

Convention under test (cxr_monai.io.nifti): rows run anterior->posterior (axial plane) or
superior->inferior (coronal), columns run from the patient's right to left (radiological display).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cxr_monai.errors import InvalidImageError
from cxr_monai.io import read_cxr
from tests.dicom_factory import COLUMNS, ROWS, gradient

#: ITK (and MONAI's ITK/pydicom readers) store a picture as (x=column, y=row) with this RAS affine.
ITK_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def _marked_picture() -> np.ndarray:
    """(48, 64) float32 picture: a ramp with a bright 4 x 6 marker in the top-left corner."""
    picture = gradient(8).astype(np.float32)
    picture[:4, :6] = 1000.0
    return picture


def _assert_marker_top_left(pixels: np.ndarray) -> None:
    assert pixels.shape == (ROWS, COLUMNS)
    marker = np.argwhere(pixels == 1000.0)
    assert marker.min(axis=0).tolist() == [0, 0] and marker.max(axis=0).tolist() == [3, 5]


def _bytes(img: nib.Nifti1Image) -> bytes:
    return bytes(img.to_bytes())


@pytest.mark.parametrize("trailing", [(), (1,)], ids=["2d", "3d-singleton"])
def test_itk_style_file_reads_back_as_the_picture(trailing: tuple[int, ...]) -> None:
    picture = _marked_picture()
    data = picture.T.reshape(picture.T.shape + trailing)
    image = read_cxr(_bytes(nib.Nifti1Image(data, ITK_AFFINE)))
    _assert_marker_top_left(image.pixels)
    np.testing.assert_array_equal(image.pixels, picture)
    assert image.source_format == "nifti"
    assert image.pixels.dtype == np.float32


def test_orientation_codes_are_trusted_and_their_absence_warns() -> None:
    picture = _marked_picture()
    img = nib.Nifti1Image(picture.T, ITK_AFFINE)
    assert read_cxr(_bytes(img)).warnings == ()
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    image = read_cxr(_bytes(img))
    assert len(image.warnings) == 1 and "no orientation" in image.warnings[0]
    # nibabel's fallback affine is LAS: columns keep their order, rows are flipped.
    np.testing.assert_array_equal(image.pixels, picture[::-1])


def test_ras_affine_puts_anterior_right_voxel_top_left() -> None:
    # Identity affine = RAS: the voxel with the largest i is the patient's rightmost (screen left
    # in radiological display), the largest j the most anterior (screen top).
    data = np.zeros((COLUMNS, ROWS), np.float32)
    data[-6:, -4:] = 1000.0
    _assert_marker_top_left(read_cxr(_bytes(nib.Nifti1Image(data, np.eye(4)))).pixels)


def test_coronal_slice_has_superior_at_the_top() -> None:
    # (x, 1, z) in RAS: the rows of the result run from superior (largest z) down.
    data = np.zeros((COLUMNS, 1, ROWS), np.float32)
    data[-6:, 0, -4:] = 1000.0
    image = read_cxr(_bytes(nib.Nifti1Image(data, np.eye(4))))
    _assert_marker_top_left(image.pixels)
    assert image.extra["orientation"] == "LI"


def test_gzipped_path_equals_bytes_and_spacing_follows_axes(tmp_path: Path) -> None:
    picture = _marked_picture()
    affine = ITK_AFFINE @ np.diag([0.5, 0.25, 1.0, 1.0])  # 0.5 mm between columns, 0.25 mm between rows
    path = tmp_path / "cxr.nii.gz"
    nib.save(nib.Nifti1Image(picture.T, affine), path)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    from_path = read_cxr(path)
    np.testing.assert_array_equal(from_path.pixels, picture)
    np.testing.assert_array_equal(read_cxr(path.read_bytes()).pixels, picture)
    assert from_path.extra["pixel_spacing_mm"] == (0.25, 0.5)


def test_nifti2_and_scaling() -> None:
    stored = gradient(12).T.astype(np.int16)
    img = nib.Nifti2Image(stored, ITK_AFFINE)
    img.header.set_slope_inter(2.0, 10.0)
    image = read_cxr(bytes(img.to_bytes()))
    np.testing.assert_allclose(image.pixels, 2.0 * stored.T + 10.0)


def test_volume_is_refused() -> None:
    volume = np.zeros((COLUMNS, ROWS, 5), np.float32)
    with pytest.raises(InvalidImageError, match="3-D volume"):
        read_cxr(_bytes(nib.Nifti1Image(volume, np.eye(4))))


def test_broken_nii_named_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(gzip.compress(b"not a nifti header at all" * 10))
    with pytest.raises(InvalidImageError, match=r"broken\.nii\.gz"):
        read_cxr(path)


def test_truncated_nifti_is_refused() -> None:
    data = _bytes(nib.Nifti1Image(_marked_picture().T, ITK_AFFINE))
    with pytest.raises(InvalidImageError, match="NIfTI"):
        read_cxr(data[: len(data) // 2])
