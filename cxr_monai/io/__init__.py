"""Reading chest X-rays: DICOM, PNG/JPEG and NIfTI into the array a viewer shows.

``image`` defines :class:`CXRImage` and the size limit; the format readers (``dicom``, ``nifti``) build
it; ``reader`` picks the format by content. Readers import ``image``, never ``reader``: no import circle.
"""

from cxr_monai.io.image import MAX_SIDE, CXRImage, ImageSource
from cxr_monai.io.reader import read_cxr

__all__ = ["MAX_SIDE", "CXRImage", "ImageSource", "read_cxr"]
