"""Read a 2-D NIfTI image (nibabel) into the (rows, columns) array a viewer shows.

Orientation convention. nibabel arrays are indexed in voxel order (i, j, k) = (x, y, z), so a 2-D
image comes out as (columns, rows) in some direction that only the affine tells. The reader
reorients the voxel axes with the affine to **L, P, I** (i increasing to the patient's left,
j to posterior, k to inferior), drops the one singleton axis and transposes, so that

* rows run top to bottom = anterior to posterior (axial plane) or superior to inferior (coronal and
  sagittal planes),
* columns run left to right = the patient's right to left (radiological convention).

That is how 3D Slicer or ITK-SNAP display the slice, and it is DICOM's LPS index order, so a PNG or
DICOM written to NIfTI by ITK/MONAI (affine diag(-1, -1, 1) for an identity direction) reads back
with its first pixel at the top left.
"""

from __future__ import annotations

import gzip
import io

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

from cxr_monai.errors import InvalidImageError
from cxr_monai.io.image import DEFAULT_LIMITS, CXRImage, ImageLimits

#: Target voxel-axis directions after reorientation (see the module docstring).
VIEWER_AXCODES = ("L", "P", "I")
GZIP_MAGIC = b"\x1f\x8b"


def _header_bytes(data: bytes) -> bytes:
    """The first 548 bytes of the (possibly gzipped) file: enough for either NIfTI header."""
    if data[:2] == GZIP_MAGIC:
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
                return stream.read(548)
        except (OSError, EOFError):
            return b""
    return data[:548]


def looks_like_nifti(data: bytes) -> bool:
    """True when the (possibly gzipped) bytes start with a single-file NIfTI-1 or NIfTI-2 header."""
    header = _header_bytes(data)
    return header[344:348] == b"n+1\x00" or header[4:8] == b"n+2\x00"


def _load(data: bytes, name: str) -> nib.Nifti1Image | nib.Nifti2Image:
    """Parse the header from bytes; the voxel data stays a lazy proxy until read."""
    header = _header_bytes(data)
    klass = nib.Nifti2Image if header[4:8] == b"n+2\x00" else nib.Nifti1Image
    stream: io.IOBase = io.BytesIO(data)
    if data[:2] == GZIP_MAGIC:
        stream = gzip.GzipFile(fileobj=stream)
    try:
        file_map = klass.make_file_map({"image": stream, "header": stream})
        return klass.from_file_map(file_map)
    except (ImageFileError, HeaderDataError, WrapStructError, OSError, EOFError, ValueError) as exc:
        raise InvalidImageError(f"{name}: not a readable NIfTI file ({exc})") from exc


def read_nifti(data: bytes, name: str, *, limits: ImageLimits = DEFAULT_LIMITS) -> CXRImage:
    """Read a single-file NIfTI-1/2 (``.nii`` or ``.nii.gz``) holding one 2-D image.

    Args:
        data: the whole file (gzipped or not).
        name: how to name the input in error messages.
        limits: size budgets, checked on the header's shape before the voxels are read.

    Returns:
        :class:`~cxr_monai.io.CXRImage` with float32 (rows, columns) values after the header's
        scl_slope/scl_inter, oriented as described in the module docstring; ``extra`` has
        ``pixel_spacing_mm`` (row, column) from the voxel sizes and ``orientation`` (the anatomical
        directions of columns and rows, e.g. "LP"); a warning when the file has no orientation.

    Raises:
        InvalidImageError: unreadable or truncated, a 3-D volume or a time series, over a budget
            of ``limits``, or a voxel type that is not a number (e.g. RGB24).
    """
    img = _load(data, name)
    shape = tuple(int(n) for n in img.shape)
    if len(shape) > 3 and any(n != 1 for n in shape[3:]):
        raise InvalidImageError(f"{name}: NIfTI has shape {shape}; expected one 2-D image")
    shape3 = (*shape, 1, 1)[:3]
    if 1 not in shape3:
        raise InvalidImageError(f"{name}: NIfTI is a 3-D volume {shape3}; expected one 2-D image")
    in_plane = sorted(shape3)[1:]  # the two sides; the third is the singleton slice axis
    limits.check(in_plane[0], in_plane[1], name, what=f"NIfTI image {shape3}")
    try:
        voxels = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape3)
    except (OSError, EOFError, ValueError, TypeError) as exc:
        raise InvalidImageError(f"{name}: NIfTI voxel data cannot be read ({exc})") from exc
    transform = ornt_transform(io_orientation(img.affine), axcodes2ornt(VIEWER_AXCODES))
    voxels = apply_orientation(voxels, transform)
    zooms_in = [abs(float(z)) for z in img.header.get_zooms()[:3]]
    zooms_in += [1.0] * (3 - len(zooms_in))
    zooms = [0.0, 0.0, 0.0]  # voxel sizes (mm) along the reoriented axes
    for axis_in, axis_out in enumerate(transform[:, 0].astype(int)):
        zooms[axis_out] = zooms_in[axis_in]
    # Drop the last singleton axis (k for an ordinary 2-D image); the other two are (columns, rows).
    drop = max(axis for axis in range(3) if voxels.shape[axis] == 1)
    keep = [axis for axis in range(3) if axis != drop]
    pixels = np.squeeze(voxels, axis=drop).T
    spacing = (float(zooms[keep[1]]), float(zooms[keep[0]]))
    warnings: tuple[str, ...] = ()
    if int(img.header["sform_code"]) == 0 and int(img.header["qform_code"]) == 0:
        warnings = (
            "NIfTI has no orientation (qform_code and sform_code are 0); up/down and left/right "
            "follow nibabel's default (LAS) and may be wrong",
        )
    return CXRImage(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        source_format="nifti",
        color_mode=str(img.get_data_dtype()),
        warnings=warnings,
        extra={"pixel_spacing_mm": spacing, "orientation": "".join(VIEWER_AXCODES[a] for a in keep)},
    )
