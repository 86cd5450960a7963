"""The decoded chest X-ray every reader returns, the size budgets every reader checks before decoding,
and the content checks :func:`~cxr_monai.io.read_cxr` applies after it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cxr_monai.constants import MAX_PIXELS, MAX_SIDE
from cxr_monai.errors import InvalidImageError

#: Decoded bytes per pixel at most: 8-bit RGB (16-bit colour is refused; 16-bit grayscale is 2).
MAX_BYTES_PER_PIXEL = 3
#: Room for the header and non-pixel elements when a whole data set is inflated (deflate syntax).
HEADER_ALLOWANCE_BYTES = 16 * 1024 * 1024
#: Below this many pixels per side, or above this aspect ratio, the image gets a warning.
MIN_SIDE: int = 32
MAX_ASPECT_RATIO: float = 4.0

ImageSource = str | os.PathLike[str] | bytes


@dataclass(frozen=True)
class ImageLimits:
    """Size budgets checked from the header before any pixel is decoded.

    Attributes:
        max_pixels: rows x columns at most.
        max_side: rows and columns each at most.
    """

    max_pixels: int = MAX_PIXELS
    max_side: int = MAX_SIDE

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_side < 1:
            raise ValueError(f"image limits must be positive, got {self.max_pixels} px, {self.max_side} side")

    @property
    def max_decoded_bytes(self) -> int:
        """Largest decompressed data set (bytes) a deflate-compressed DICOM may expand to."""
        return self.max_pixels * MAX_BYTES_PER_PIXEL + HEADER_ALLOWANCE_BYTES

    def check(self, rows: int, cols: int, name: str, what: str = "image") -> None:
        """Refuse a ``rows`` x ``cols`` image over either budget (from the header: nothing is decoded).

        Raises:
            InvalidImageError: a side above ``max_side`` or more than ``max_pixels`` pixels.
        """
        if max(rows, cols) > self.max_side:
            raise InvalidImageError(
                f"{name}: {what} is {cols} x {rows} pixels (columns x rows); "
                f"the limit is {self.max_side} per side"
            )
        if rows * cols > self.max_pixels:
            raise InvalidImageError(
                f"{name}: {what} is {cols} x {rows} = {rows * cols:,} pixels (columns x rows); "
                f"the limit is {self.max_pixels:,} pixels"
            )


DEFAULT_LIMITS = ImageLimits()


@dataclass(frozen=True)
class CXRImage:
    """A decoded chest X-ray.

    Attributes:
        pixels: float32 array of shape (rows, columns), the orientation a viewer shows; higher values
            are brighter (bone bright, air dark), whatever the file's photometric convention.
        source_format: ``"dicom"``, ``"png"``, ``"jpeg"``, ``"nifti"`` or another Pillow format name
            in lower case.
        color_mode: how the file stored its pixels (Pillow mode such as ``"L"``/``"RGB"``/``"RGBA"``,
            the DICOM PhotometricInterpretation, or the NIfTI voxel dtype).
        warnings: reasons the input may not suit this model (lateral view, not CR/DX, tiny, extreme
            aspect ratio, constant ...); the image was still read.
        dataset: the DICOM header (pydicom ``Dataset`` without PixelData) for DICOM inputs, else None.
            It may hold patient data: never log it.
        extra: what outputs need, free of patient data. Always ``pixel_spacing_mm``: (row, column)
            spacing in mm or None. DICOM adds ``transfer_syntax`` (name), ``transfer_syntax_uid``,
            ``transfer_syntax_inferred``, ``bits_allocated``, ``bits_stored``, ``pixel_representation``,
            ``photometric_interpretation``, ``modality``, ``view_position``, ``pixel_spacing_source``
            (PixelSpacing or ImagerPixelSpacing), ``modality_lut`` / ``voi`` (what was applied:
            "lut", "rescale"/"window" or "none"; ``window_center``/``window_width`` for a window),
            ``inverted`` and ``output_range`` (low, high) of the display values.
    """

    pixels: np.ndarray
    source_format: str
    color_mode: str
    warnings: tuple[str, ...] = ()
    dataset: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the original pixel grid."""
        rows, cols = self.pixels.shape
        return int(rows), int(cols)


def checked_content(image: CXRImage, name: str) -> CXRImage:
    """Refuse non-finite pixels; add warnings for degenerate images (the image is still classified).

    Degenerate means a side under :data:`MIN_SIDE`, an aspect ratio above :data:`MAX_ASPECT_RATIO` or
    one value everywhere: the model's answer for such an input says nothing about a chest.

    Raises:
        InvalidImageError: NaN or infinite values (a NaN pixel makes every probability NaN).
    """
    finite = np.isfinite(image.pixels)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise InvalidImageError(f"{name}: image has {bad} of {finite.size} pixels NaN or infinite")
    rows, cols = image.shape
    found: list[str] = []
    if min(rows, cols) < MIN_SIDE:
        found.append(f"image is {cols} x {rows} pixels (columns x rows); under {MIN_SIDE} per side")
    if max(rows, cols) > MAX_ASPECT_RATIO * min(rows, cols):
        found.append(
            f"image aspect ratio is {max(rows, cols) / min(rows, cols):.1f}:1; a chest film is "
            f"at most {MAX_ASPECT_RATIO:g}:1"
        )
    if float(image.pixels.min()) == float(image.pixels.max()):
        found.append("image is constant (every pixel has the same value)")
    return replace(image, warnings=(*image.warnings, *found)) if found else image
