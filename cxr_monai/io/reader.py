"""Read a chest X-ray file (DICOM, PNG/JPEG, NIfTI) into the array a radiologist's viewer shows.

Every entry point (bundle, CLI, server) reads through :func:`read_cxr`, so there is one place where
orientation, intensity conventions and errors are decided.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxr_monai.errors import InvalidImageError
from cxr_monai.io import dicom, nifti
from cxr_monai.io.image import DEFAULT_LIMITS, CXRImage, ImageLimits, ImageSource, checked_content


def read_cxr(source: ImageSource, limits: ImageLimits = DEFAULT_LIMITS) -> CXRImage:
    """Read one chest X-ray from a path or from the file's bytes.

    The format is decided by content, never by extension alone: ``DICM`` after a 128-byte preamble
    -> DICOM; a NIfTI-1/2 header (gzipped or not) or a ``.nii``/``.nii.gz`` name -> NIfTI; anything
    Pillow identifies (PNG, JPEG, ...) -> Pillow; otherwise a raw DICOM data set without preamble
    or file meta is tried.

    Args:
        source: a file path, or the whole file as bytes (as the gRPC server receives it).
        limits: size budgets checked from the header before decoding (and, for deflate-compressed
            DICOM, on the inflated size while inflating).

    Returns:
        The decoded image; see :class:`CXRImage`. Degenerate images (tiny, extreme aspect ratio,
        constant) carry a warning.

    Raises:
        InvalidImageError: the file is missing, empty, truncated, not an image, multi-frame, too large,
            over a budget, NaN or infinite somewhere, or in a representation this reader does not
            support; the message says which.
    """
    if isinstance(source, bytes):
        data, name = source, "<bytes>"
    else:
        path = Path(source)
        if not path.is_file():
            raise InvalidImageError(f"{path}: no such file")
        try:
            data, name = path.read_bytes(), path.name
        except OSError as exc:
            raise InvalidImageError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if not data:
        raise InvalidImageError(f"{name}: file is empty")
    return checked_content(_dispatch(data, name, limits), name)


def _dispatch(data: bytes, name: str, limits: ImageLimits) -> CXRImage:
    """Pick the reader from the content (see :func:`read_cxr`)."""
    if dicom.looks_like_dicom(data):
        return dicom.read_dicom(data, name, limits=limits)
    if nifti.looks_like_nifti(data) or name.lower().endswith((".nii", ".nii.gz")):
        return nifti.read_nifti(data, name, limits=limits)
    if _pillow_identifies(data):
        return _read_pil(data, name, limits)
    return dicom.read_dicom(data, name, force=True, limits=limits)


def _pillow_identifies(data: bytes) -> bool:
    """True when Pillow recognises the bytes as an image format (header only, no decoding)."""
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except Image.DecompressionBombError:
        return True  # an image, too large: _read_pil says so
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def _read_pil(data: bytes, name: str, limits: ImageLimits) -> CXRImage:
    """Decode PNG/JPEG (anything Pillow opens) to grayscale float32 (rows, columns), EXIF-rotated.

    ``Image.open`` reads the header only; the size is checked against ``limits`` before ``load``.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            limits.check(height, width, name)
            frames = int(getattr(img, "n_frames", 1))
            if frames > 1:
                raise InvalidImageError(f"{name}: image has {frames} frames; expected one")
            mode = img.mode
            fmt = (img.format or "unknown").lower()
            # Viewers honour the EXIF Orientation tag (photographed films, phone exports).
            pixels = _pil_to_gray(ImageOps.exif_transpose(img))
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow refuses, from the header alone, images of more than 2 x MAX_IMAGE_PIXELS pixels
        raise InvalidImageError(
            f"{name}: image is too large ({exc}); the limit is {limits.max_side} per side"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"{name}: not a readable image ({exc})") from exc
    return CXRImage(pixels=pixels, source_format=fmt, color_mode=mode, extra={"pixel_spacing_mm": None})


def _pil_to_gray(img: Image.Image) -> np.ndarray:
    """Pillow image of any mode -> float32 luminance (rows, columns), alpha dropped."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        return np.asarray(img, dtype=np.float32)
    if img.mode != "L":
        img = img.convert("RGB").convert("L")
    return np.asarray(img, dtype=np.float32)
