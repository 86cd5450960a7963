"""The decoded chest X-ray every reader returns, and the size limit every reader checks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Larger images are refused before decoding (rows or columns, pixels).
MAX_SIDE: int = 10_000

ImageSource = str | os.PathLike[str] | bytes


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
        warnings: reasons the input may not suit this model (lateral view, not CR/DX, ...); the image
            was still read.
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
