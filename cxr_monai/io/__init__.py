"""Reading chest X-rays: DICOM, PNG/JPEG and NIfTI into the array a viewer shows.

``image`` defines :class:`CXRImage` and the size budgets (:class:`ImageLimits`); the format readers
(``dicom``, ``nifti``) build it; ``reader`` picks the format by content. Readers import ``image``,
never ``reader``: no import circle.
"""

from cxr_monai.io.image import DEFAULT_LIMITS, MAX_PIXELS, MAX_SIDE, CXRImage, ImageLimits, ImageSource
from cxr_monai.io.reader import read_cxr

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_PIXELS",
    "MAX_SIDE",
    "CXRImage",
    "ImageLimits",
    "ImageSource",
    "read_cxr",
]
