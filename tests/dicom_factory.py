"""Write small DICOM files for the reader's tests: every photometric, bit depth and transfer syntax.

Images are 64 columns x 48 rows (non-square, so a transposition shows). The header carries a fake
patient name and ID so tests can check that no error message repeats them.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

ROWS, COLUMNS = 48, 64
PATIENT_NAME = "Secret^Patient"
PATIENT_ID = "PID-SECRET-4711"


def gradient(bits: int, *, signed: bool = False) -> np.ndarray:
    """(48, 64) image spanning the full range of ``bits``-bit values, brightest at the bottom right.

    Smooth along both axes (so lossy codecs stay close) and distinct in every row and column.
    """
    rows = np.linspace(0.0, 1.0, ROWS)[:, None]
    cols = np.linspace(0.0, 1.0, COLUMNS)[None, :]
    unit = 0.6 * rows + 0.4 * cols
    if signed:
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return np.round(low + unit * (high - low)).astype(np.int16 if bits > 8 else np.int8)
    values = np.round(unit * (2**bits - 1))
    return values.astype(np.uint16 if bits > 8 else np.uint8)


def colour_gradient() -> np.ndarray:
    """(48, 64, 3) uint8 RGB image with different smooth ramps in each channel."""
    rows = np.linspace(0.0, 1.0, ROWS)[:, None]
    cols = np.linspace(0.0, 1.0, COLUMNS)[None, :]
    red = 40 + 200 * rows * np.ones_like(cols)
    green = 20 + 180 * cols * np.ones_like(rows)
    blue = 220 - 150 * (rows + cols) / 2
    return np.round(np.stack([red, green, blue], axis=-1)).astype(np.uint8)


def make_dataset(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **tags: object,
) -> Dataset:
    """An uncompressed (explicit VR little endian) CR data set holding ``pixels``.

    Args:
        pixels: (rows, columns) or (rows, columns, 3) for colour; (frames, rows, columns) for
            multi-frame. uint8/int8 -> BitsAllocated 8, uint16/int16 -> 16; signed -> PixelRepresentation 1.
        photometric: PhotometricInterpretation.
        bits_stored: BitsStored (default: the dtype's bits).
        tags: further elements by keyword (Modality, ViewPosition, WindowCenter, ...).
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    """Write a DICOM Part 10 file (preamble + file meta)."""
    ds.save_as(path, enforce_file_format=True)
    return path


def save_raw(ds: Dataset, path: Path, *, implicit_vr: bool = True) -> Path:
    """Write the bare data set: no preamble, no file meta, little endian."""
    del ds.file_meta
    pydicom.dcmwrite(path, ds, implicit_vr=implicit_vr, little_endian=True, enforce_file_format=False)
    return path


def jpeg_baseline(pixels: np.ndarray, *, quality: int = 95) -> Dataset:
    """JPEG baseline data set: Pillow's JPEG bytes encapsulated by pydicom.

    (rows, columns) uint8 -> MONOCHROME2; (rows, columns, 3) uint8 RGB -> YBR_FULL_422 (4:2:2 chroma).
    """
    colour = pixels.ndim == 3
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality, subsampling=1)
    ds = make_dataset(np.zeros(pixels.shape, np.uint8), "RGB" if colour else "MONOCHROME2")
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = "YBR_FULL_422" if colour else "MONOCHROME2"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    return ds


def dcmtk_encode(tool: str, options: list[str], source: Path, target: Path) -> Path:
    """Re-encode ``source`` with a dcmtk tool (dcmcjpeg, dcmcjpls) into ``target``."""
    subprocess.run([tool, *options, str(source), str(target)], check=True, capture_output=True)
    return target


def has_tool(tool: str) -> bool:
    """True when the dcmtk command is on PATH."""
    return shutil.which(tool) is not None


def syntax_of(path: Path) -> UID:
    """The transfer syntax a written file declares."""
    return UID(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def ybr422_native(rgb: np.ndarray) -> Dataset:
    """Uncompressed YBR_FULL_422: Y Y Cb Cr per horizontal pixel pair (PS3.3 C.7.6.3.1.2).

    pydicom decodes this layout but has no encoder for it, so the test writes the bytes itself;
    the chroma of a pair is averaged from the RGB->YBR_FULL conversion.
    """
    ybr = pydicom.pixels.convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.float64)
    y = ybr[..., 0].reshape(ROWS, COLUMNS // 2, 2)
    chroma = ybr[..., 1:].reshape(ROWS, COLUMNS // 2, 2, 2).mean(axis=2)
    packed = np.concatenate([y, chroma], axis=-1)  # (rows, pairs, [Y1, Y2, Cb, Cr])
    ds = make_dataset(rgb, "RGB")
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = np.round(packed).astype(np.uint8).tobytes()
    return ds
