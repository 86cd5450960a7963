"""Decode a single-frame DICOM chest radiograph into the grayscale array a viewer shows.

Pipeline (PS3.3 C.11, the order a viewer applies): decode the stored values (pydicom + the pylibjpeg
plugins for compressed transfer syntaxes) -> modality LUT (Modality LUT Sequence or Rescale
Slope/Intercept) -> VOI LUT (VOI LUT Sequence, else the first Window Center/Width) -> inversion for
MONOCHROME1 or Presentation LUT Shape INVERSE, so that bone is bright. Colour images (RGB and the YBR
family) become their luminance (the Y of YBR_FULL) instead.

Patient data stays in the returned header: no message or log line here quotes a tag value other than
sizes, numbers, the transfer syntax and defined terms of the standard (PhotometricInterpretation,
Modality, ViewPosition, BodyPartExamined: any other value is named as unrecognised, not shown), and a
library's exception message is passed on as one line with its quoted parts scrubbed (:func:`detail`).
"""

from __future__ import annotations

import io
import logging
import struct
import threading
import warnings
import zlib
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import read_preamble
from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from cxr_monai.errors import InvalidImageError
from cxr_monai.io.image import DEFAULT_LIMITS, CXRImage, ImageLimits
from cxr_monai.log_hygiene import ScrubQuotedValues, scrub_quoted

logger = logging.getLogger(__name__)

_validation_lock = threading.Lock()
_validation_readers = 0
_validation_mode_found = pydicom.config.WARN


@contextmanager
def values_unvalidated() -> Iterator[None]:
    """pydicom's reading validation off inside: its warnings quote the offending value ("Invalid value
    for VR PN ..."), which may be a birth date or a patient's name, into warnings and pydicom's logger,
    and patient data must never reach a log.

    pydicom's settings are one process-wide object (not per thread), and its own
    ``config.disable_value_validation`` restores what it found on exit, which breaks under concurrent
    readers (the server decodes in several threads: a reader that entered second would restore IGNORE
    for good). Here the readers are counted under a lock: the first one in sets IGNORE, the last one
    out restores the mode it found. Another thread's pydicom reads in that window are not validated
    either (nothing is quoted; nothing else changes).
    """
    global _validation_readers, _validation_mode_found
    with _validation_lock:
        if _validation_readers == 0:
            _validation_mode_found = pydicom.config.settings.reading_validation_mode
            pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        _validation_readers += 1
    try:
        yield
    finally:
        with _validation_lock:
            _validation_readers -= 1
            if _validation_readers == 0:
                pydicom.config.settings.reading_validation_mode = _validation_mode_found


def _convert_values(ds: Dataset) -> None:
    """Convert every element of ``ds`` (and of its sequences' items) from the raw bytes pydicom keeps
    until first access. pydicom validates a value when it converts it, so a header converted here,
    under :func:`values_unvalidated`, is never validated (and quoted) by a later reader such as
    highdicom. An element that cannot be converted stays raw: it raises where it is used, as before.
    (pydicom has no "convert all" call; ``Dataset.iterall`` stops at the first corrupt element.)"""
    for tag in list(ds.keys()):
        try:
            element = ds[tag]
        except _CORRUPT_ELEMENT_ERRORS:
            continue
        if element.VR == "SQ":
            for item in element.value:
                _convert_values(item)


# pydicom logs header values it cannot use ("Unknown encoding 'X'" for a SpecificCharacterSet, whenever
# text is decoded): its records are scrubbed here too, for programs that never call log_hygiene.install()
logging.getLogger("pydicom").addFilter(ScrubQuotedValues())
# the same message also goes out as a UserWarning; the (scrubbed) log record above is kept instead
warnings.filterwarnings("ignore", message="Unknown encoding", category=UserWarning, module="pydicom.charset")

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: PhotometricInterpretation defined terms (PS3.3 C.7.6.3.1.2): a message may name one of these; any
#: other value is not quoted (a header value may carry anything a modality put there).
PHOTOMETRIC_TERMS = (
    *MONOCHROME,
    *COLOUR,
    "PALETTE COLOR",
    "YBR_PARTIAL_422",
    "YBR_PARTIAL_420",
    "HSV",
    "ARGB",
    "CMYK",
    "XYB",
)
#: Modality defined terms (PS3.3 C.7.3.1.1.1, current and retired) a message may name.
MODALITY_TERMS = _words(
    "AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO "
    "LEN LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN POS PR PT PX REG RESP RF RG "
    "RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN "
    "TEXTUREMAP TG US VA XA XAPROTOCOL XC CD DD DF DM DS EC FA FS LP MA MS OPR ST VF"
)
#: BodyPartExamined defined terms (PS3.16 Annex L, the common ones) a message may name.
BODY_PART_TERMS = _words(
    "ABDOMEN ABDOMENPELVIS ACJOINT ADRENAL AKNEE ANKLE AORTA ARM AXILLA BACK BLADDER BRAIN BREAST "
    "BRONCHUS BUTTOCK CALCANEUS CALF CAROTID CEREBELLUM CERVIX CHEEK CHEST CHESTABDOMEN CHESTABDPELVIS "
    "CIRCLEOFWILLIS CLAVICLE COCCYX COLON CORNEA CORONARYARTERY CSPINE CTSPINE DUODENUM EAR ELBOW "
    "ESOPHAGUS EXTREMITY EYE EYELID FACE FEMUR FINGER FOOT FOREARM GALLBLADDER HAND HEAD HEADNECK HEART "
    "HIP HUMERUS IAC ILEUM ILIUM INTESTINE JAW JEJUNUM KIDNEY KNEE LARYNX LEG LIVER LSPINE LSSPINE LUNG "
    "MAXILLA MEDIASTINUM MOUTH NECK NECKCHEST NECKCHESTABDOMEN NECKCHESTABDPELV NOSE ORBIT OVARY PANCREAS "
    "PAROTID PATELLA PELVIS PENIS PHARYNX PROSTATE RECTUM RIB SACRUM SCAPULA SCLERA SCROTUM SHOULDER "
    "SKULL SPINE SPLEEN SSPINE STERNUM STOMACH SUBMANDIBULAR TESTIS THIGH THUMB THYMUS THYROID TIBIA "
    "TMJ TOE TONGUE TRACHEA TSPINE TLSPINE UTERUS VAGINA WHOLEBODY WRIST ZYGOMA"
)
#: Modalities of projection chest radiographs; anything else gets a warning.
RADIOGRAPHY_MODALITIES = ("CR", "DX")
#: ViewPosition values (DICOM defined terms plus common free text) that mean a lateral projection.
LATERAL_VIEWS = ("LL", "RL", "L", "LAT", "LATERAL", "LEFT LATERAL", "RIGHT LATERAL")
#: Tags that, when present without a preamble, make a byte string look like a raw DICOM data set.
_RAW_DATASET_EVIDENCE = ("SOPClassUID", "Modality", "Rows", "PixelData")
#: What pydicom raises when it converts a corrupt element (wrong length, unknown VR, bad number).
_CORRUPT_ELEMENT_ERRORS = (
    BytesLengthException,
    NotImplementedError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    struct.error,
)
#: What pydicom's pixel handlers and the pylibjpeg / pillow decoders raise for pixel data they cannot
#: decode (truncated, corrupt, or a transfer syntax without an installed decoder).
_DECODER_ERRORS = (*_CORRUPT_ELEMENT_ERRORS, RuntimeError, AttributeError, OSError, EOFError, zlib.error)


def detail(exc: BaseException) -> str:
    """A library exception as one line for our messages: its type and the first line of its message,
    with quoted parts scrubbed (pydicom and numpy quote the offending value)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # "raised by all available plugins:" + the first
        lines[0] = f"{lines[0]} {lines[1]}"
    text = scrub_quoted(lines[0]) if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def looks_like_dicom(data: bytes) -> bool:
    """True when ``data`` is a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


#: Inflate in steps of this many bytes of output, so a bomb is stopped without holding its output.
_INFLATE_STEP = 1024 * 1024


def check_deflated_size(data: bytes, name: str, limits: ImageLimits) -> None:
    """Refuse a Deflated Explicit VR Little Endian file whose data set inflates past the budget.

    pydicom inflates the whole data set in one ``zlib.decompress`` before any element can be checked
    (1.7 MB can become 1 GiB), so the inflated size is counted here first, in bounded steps, with the
    output discarded. Files in any other transfer syntax pass unchanged.

    Raises:
        InvalidImageError: the data set inflates to more than ``limits.max_decoded_bytes``.
    """
    stream = io.BytesIO(data)
    try:
        read_preamble(stream, False)
        meta = pydicom.filereader._read_file_meta_info(stream)  # public read_file_meta_info wants a path
    except (InvalidDicomError, EOFError, OSError, *_CORRUPT_ELEMENT_ERRORS):
        return  # parse_dicom reports the broken header
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return
    budget = limits.max_decoded_bytes
    inflater, pending, inflated = zlib.decompressobj(-zlib.MAX_WBITS), data[stream.tell() :], 0
    try:
        while pending and not inflater.eof:
            inflated += len(inflater.decompress(pending, _INFLATE_STEP))
            pending = inflater.unconsumed_tail
            if inflated > budget:
                raise InvalidImageError(
                    f"{name}: deflate-compressed DICOM data set inflates to more than "
                    f"{budget / 2**20:.0f} MiB (the budget for {limits.max_pixels:,} pixels); "
                    "refused before decoding"
                )
    except zlib.error:
        return  # parse_dicom reports the corrupt stream


#: Groups a raw data set (no preamble, no file meta) can begin with: file meta, or the identifying group.
_RAW_FIRST_GROUPS = (0x0002, 0x0008)


def starts_like_raw_dataset(data: bytes) -> bool:
    """True when the first element's tag (little or big endian) is in a group a raw image data set starts
    with. Bytes that are no data set at all (63 MiB of zeros parse as two million empty elements, seconds
    of CPU) are refused before pydicom walks them."""
    if len(data) < 8:
        return False
    return any(int.from_bytes(data[:2], order) in _RAW_FIRST_GROUPS for order in ("little", "big"))


def parse_dicom(data: bytes, name: str, *, force: bool, limits: ImageLimits = DEFAULT_LIMITS) -> Dataset:
    """Parse a DICOM file or raw data set (``force=True``) from its bytes; pixels are not decoded.

    Raises:
        InvalidImageError: the bytes are not DICOM, the file is truncated inside its header, or a
            deflate-compressed data set inflates past ``limits`` (:func:`check_deflated_size`).
    """
    if not force:
        check_deflated_size(data, name, limits)
    elif not starts_like_raw_dataset(data):
        raise InvalidImageError(f"{name}: not a DICOM, PNG, JPEG or NIfTI image")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
    except (InvalidDicomError, EOFError, OSError, *_CORRUPT_ELEMENT_ERRORS) as exc:
        raise InvalidImageError(f"{name}: not a readable DICOM file ({detail(exc)})") from exc
    if force and not any(keyword in ds for keyword in _RAW_DATASET_EVIDENCE):
        raise InvalidImageError(f"{name}: not a DICOM, PNG, JPEG or NIfTI image")
    return ds


def ensure_transfer_syntax(ds: Dataset) -> bool:
    """Set file_meta.TransferSyntaxUID from how the data set was encoded when the file gave none.

    A raw data set (no preamble, no file meta, as ACR-NEMA style writers produce) is read by pydicom
    with its encoding detected (``ds.original_encoding``); decoding its pixels needs that encoding
    as a transfer syntax. Returns True when the syntax was inferred here.
    """
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and "TransferSyntaxUID" in file_meta:
        return False
    implicit_vr, little_endian = ds.original_encoding
    if implicit_vr:
        syntax = ImplicitVRLittleEndian
    elif little_endian:
        syntax = ExplicitVRLittleEndian
    else:
        syntax = ExplicitVRBigEndian
    if file_meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    logger.debug("DICOM without a declared transfer syntax: inferred %s", syntax.name)
    return True


def check_header(ds: Dataset, name: str, limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """Refuse, before any decoding, what this reader cannot turn into one grayscale image.

    The pixel budget is also the decoded-size budget of the compressed transfer syntaxes (RLE, JPEG,
    JPEG-LS, JPEG 2000): a decoder's output is Rows x Columns x SamplesPerPixel x BitsAllocated / 8
    bytes, at most 3 bytes per pixel for what passes here.

    Raises:
        InvalidImageError: no PixelData, more than one frame, Rows/Columns over ``limits``,
            BitsAllocated not 8 or 16, BitsStored out of range, an unsupported
            PhotometricInterpretation, SamplesPerPixel not matching it, native PixelData shorter than
            the header says, or a rescale or window that cannot give an image (RescaleSlope 0, NaN
            or infinite; WindowWidth below 1; a value that is not a number).
    """
    if "PixelData" not in ds:
        raise InvalidImageError(f"{name}: DICOM has no PixelData (not an image, or the file is truncated)")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows < 1 or cols < 1:
        raise InvalidImageError(f"{name}: DICOM has no valid Rows/Columns ({rows} x {cols})")
    limits.check(rows, cols, name, what="DICOM image")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise InvalidImageError(f"{name}: DICOM is multi-frame ({frames} frames); expected a single image")
    bits_allocated = int(ds.get("BitsAllocated") or 0)
    if bits_allocated not in (8, 16):
        raise InvalidImageError(f"{name}: DICOM has BitsAllocated {bits_allocated}; expected 8 or 16")
    bits_stored = int(ds.get("BitsStored") or bits_allocated)
    if not 1 <= bits_stored <= bits_allocated:
        raise InvalidImageError(
            f"{name}: DICOM has BitsStored {bits_stored}; expected 1 to BitsAllocated ({bits_allocated})"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in MONOCHROME + COLOUR:
        raise InvalidImageError(
            f"{name}: DICOM has PhotometricInterpretation {shown(photometric, PHOTOMETRIC_TERMS)}; "
            f"expected MONOCHROME1, MONOCHROME2, RGB or YBR ({', '.join(COLOUR[1:])})"
        )
    if photometric in COLOUR and bits_allocated != 8:
        raise InvalidImageError(
            f"{name}: DICOM {photometric} with BitsAllocated {bits_allocated}; colour images must have 8"
        )
    samples, expected = int(ds.get("SamplesPerPixel") or 1), 1 if photometric in MONOCHROME else 3
    if samples != expected:
        raise InvalidImageError(
            f"{name}: DICOM has SamplesPerPixel {samples}; {photometric} needs {expected}"
        )
    _check_pixel_data_length(ds, name, rows * cols, samples, bits_allocated, photometric)
    _check_lut_values(ds, name)


def shown(value: str, terms: Collection[str]) -> str:
    """A header value as a message may show it: itself when it is one of the standard's defined
    ``terms``, else ``(an unrecognised value, not shown)`` (a header value may carry anything a
    modality put there, patient data included), ``(none)`` when empty."""
    if not value:
        return "(none)"
    return value if value in terms else "(an unrecognised value, not shown)"


def _check_pixel_data_length(
    ds: Dataset, name: str, pixels: int, samples: int, bits_allocated: int, photometric: str
) -> None:
    """Native (uncompressed) PixelData must hold Rows x Columns x SamplesPerPixel x BitsAllocated / 8
    bytes (YBR_FULL_422: 2 bytes per pixel); a shorter one is a truncated file, refused before decoding.
    Encapsulated (compressed) pixel data is only checked by decoding it."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
    if syntax is None or UID(syntax).is_encapsulated:
        return
    per_pixel = 2 if photometric == "YBR_FULL_422" else samples * bits_allocated // 8
    expected = pixels * per_pixel
    found = len(ds.PixelData)
    if found < expected:
        raise InvalidImageError(
            f"{name}: DICOM PixelData has {found} bytes; Rows x Columns x SamplesPerPixel x "
            f"BitsAllocated / 8 needs {expected} (the file is truncated or its header is wrong)"
        )


def _number(ds: Dataset, keyword: str, name: str) -> float | None:
    """The first value of a DS element as a float; None when absent or empty.

    Raises:
        InvalidImageError: the value is not a finite number (the value itself is not quoted).
    """
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        number = _first(value)
    except (ValueError, TypeError, IndexError):
        raise InvalidImageError(f"{name}: DICOM {keyword} is not a number") from None
    if not np.isfinite(number):
        raise InvalidImageError(f"{name}: DICOM {keyword} is NaN or infinite; expected a finite number")
    return number


def _check_lut_values(ds: Dataset, name: str) -> None:
    """Refuse, before decoding, a rescale or window the grayscale pipeline would apply that cannot give
    an image: RescaleSlope 0, NaN or infinite, a RescaleIntercept or WindowCenter that is not a finite
    number, WindowWidth below 1 (above 0 for LINEAR_EXACT and SIGMOID; PS3.3 C.11.2.1.2)."""
    if _modality_kind(ds) == "rescale":
        slope = _number(ds, "RescaleSlope", name)
        _number(ds, "RescaleIntercept", name)
        if slope == 0:
            raise InvalidImageError(f"{name}: DICOM RescaleSlope is 0; expected a finite, non-zero number")
    if _voi_kind(ds) == "window":
        _number(ds, "WindowCenter", name)
        width = _number(ds, "WindowWidth", name)
        function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
        least = 0.0 if function in ("LINEAR_EXACT", "SIGMOID") else 1.0
        if width is not None and (width < least or width <= 0):
            raise InvalidImageError(
                f"{name}: DICOM WindowWidth is {width:g}; the window (Window Width) must be "
                f"{'above 0' if least == 0 else 'at least 1'}"
            )


def decode_stored(ds: Dataset, name: str) -> np.ndarray:
    """Decode PixelData to stored values: (rows, columns) for monochrome, (rows, columns, 3) RGB.

    pydicom masks bits above BitsStored, sign-extends PixelRepresentation 1, expands YBR_FULL_422 and
    converts YBR to RGB (JPEG 2000 YBR_ICT/YBR_RCT come out of the decoder as RGB).

    Raises:
        InvalidImageError: the decoder fails (truncated or corrupt pixel data, or a transfer syntax
            without an installed decoder); the message names the transfer syntax.
    """
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    # more PixelData than Rows x Columns (x frames) need: decode the declared frame, not the excess
    ds.pixel_array_options(allow_excess_frames=False)
    try:
        return np.asarray(ds.pixel_array)
    # each means the same thing to the caller: these pixels cannot be read (a MemoryError is not one)
    except _DECODER_ERRORS as exc:
        raise InvalidImageError(
            f"{name}: DICOM pixel data ({syntax.name}) cannot be decoded; the file may be truncated "
            f"or corrupt ({detail(exc)})"
        ) from exc


def to_display(stored: np.ndarray, ds: Dataset, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Stored values -> float32 (rows, columns) display values, bright = dense.

    Args:
        stored: :func:`decode_stored`'s output.
        ds: the data set's header.
        name: how to name the input in error messages.

    Returns:
        The pixels and what was applied: ``modality_lut`` ("lut", "rescale" or "none"), ``voi``
        ("lut", "window" or "none", with ``window_center``/``window_width`` for a window),
        ``inverted`` and ``output_range`` (the (low, high) range the grayscale pipeline maps into,
        which MONOCHROME1 is inverted within).

    Raises:
        InvalidImageError: the modality LUT, VOI LUT or window is malformed (e.g. WindowWidth 0).
    """
    photometric = str(ds.PhotometricInterpretation).strip()
    if photometric in COLOUR:
        # Luminance = the Y of YBR_FULL (ITU-R BT.601), computed by pydicom's colour conversion.
        luma = convert_color_space(stored, "RGB", "YBR_FULL")[..., 0]
        high = float(2 ** int(ds.BitsStored) - 1)
        colour = {"modality_lut": "none", "voi": "none", "inverted": False, "output_range": (0.0, high)}
        return luma.astype(np.float32), colour

    voi = _voi_kind(ds)
    info: dict[str, Any] = {"modality_lut": _modality_kind(ds), "voi": voi}
    try:
        values = apply_voi_lut(apply_modality_lut(stored, ds), ds, index=0)
        if voi == "window":
            info["window_center"] = _first(ds.WindowCenter)
            info["window_width"] = _first(ds.WindowWidth)
        low, high = _output_range(ds, voi)
    except (ValueError, TypeError, IndexError, AttributeError, NotImplementedError) as exc:
        raise InvalidImageError(
            f"{name}: DICOM modality LUT / VOI LUT / window cannot be applied ({detail(exc)})"
        ) from exc
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    # One inversion whichever of the two asks for it: in the DX/MG IODs MONOCHROME1 *requires*
    # Presentation LUT Shape INVERSE, and both describe the same single inversion to P-values.
    # pydicom's apply_presentation_lut inverts around arr.max(), which depends on the image content;
    # inverting within the pipeline's output range keeps a stored value's display value fixed.
    inverted = photometric == "MONOCHROME1" or shape == "INVERSE"
    if inverted:
        values = (low + high) - np.asarray(values, dtype=np.float64)
    info.update(inverted=inverted, output_range=(low, high))
    return np.asarray(values, dtype=np.float32), info


def _modality_kind(ds: Dataset) -> str:
    """Which modality transformation apply_modality_lut performs for ``ds``."""
    if ds.get("ModalityLUTSequence"):
        return "lut"
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        return "rescale"
    return "none"


def _voi_kind(ds: Dataset) -> str:
    """Which VOI transformation apply_voi_lut (prefer_lut=True) performs for ``ds``."""
    sequence = ds.get("VOILUTSequence")
    if sequence and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]:
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        return "window"
    return "none"


def _first(value: Any) -> float:
    """First of a multi-valued DS element (several windows: the first is the default)."""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0]
    return float(value)


def _output_range(ds: Dataset, voi: str) -> tuple[float, float]:
    """(low, high) the modality + VOI stages can produce, as PS3.3 C.11 defines them.

    A VOI LUT maps into [0, 2**bits - 1] with bits from its LUT Descriptor; a window (pydicom's
    apply_windowing) and no VOI at all both keep the modality LUT's output range: the stored range
    from BitsStored/PixelRepresentation, passed through Rescale Slope/Intercept, or the Modality LUT's
    [0, 2**bits - 1]. pydicom computes this inside apply_windowing but does not expose it.
    """
    if voi == "lut":
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    return low, high


def suitability_warnings(ds: Dataset) -> tuple[str, ...]:
    """Human-readable reasons the image may not suit a frontal chest radiograph model."""
    found: list[str] = []
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality and modality not in RADIOGRAPHY_MODALITIES:
        found.append(
            f"Modality is {shown(modality, MODALITY_TERMS)}; this model expects a chest radiograph (CR or DX)"
        )
    view = str(ds.get("ViewPosition", "")).strip().upper()
    if view in LATERAL_VIEWS:
        found.append(f"ViewPosition is {view} (lateral); this model expects a frontal (PA or AP) view")
    body_part = str(ds.get("BodyPartExamined", "")).strip().upper()
    if body_part and body_part != "CHEST":
        found.append(f"BodyPartExamined is {shown(body_part, BODY_PART_TERMS)}; this model expects CHEST")
    return tuple(found)


def _pixel_spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str | None]:
    """(row spacing, column spacing) in mm and the tag it came from, or (None, None)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            return (float(value[0]), float(value[1])), keyword
    return None, None


def read_dicom(
    data: bytes, name: str, *, force: bool = False, limits: ImageLimits = DEFAULT_LIMITS
) -> CXRImage:
    """Read a single-frame DICOM (Part 10 file, or a raw data set with ``force=True``).

    Args:
        data: the whole file.
        name: how to name the input in error messages (file name or ``"<bytes>"``).
        force: parse without the ``DICM`` preamble check (raw data sets).
        limits: size budgets checked before decoding.

    Returns:
        :class:`~cxr_monai.io.CXRImage` with float32 (rows, columns) display values (bright = dense),
        ``color_mode`` = PhotometricInterpretation, ``dataset`` = the header without PixelData, and
        ``extra`` holding transfer syntax, bits, what the grayscale pipeline applied and the pixel
        spacing (mm, (row, column)).

    Raises:
        InvalidImageError: see :func:`parse_dicom`, :func:`check_header` and :func:`decode_stored`.
    """
    with values_unvalidated():
        ds = parse_dicom(data, name, force=force, limits=limits)
        try:
            image = _read_parsed(ds, name, limits)
        # pydicom converts element values on first access, so a corrupt header element raises here; its
        # message may quote the value, so only the exception type is reported.
        except _CORRUPT_ELEMENT_ERRORS as exc:
            if isinstance(exc, InvalidImageError):
                raise
            raise InvalidImageError(
                f"{name}: DICOM header has a corrupt element ({type(exc).__name__})"
            ) from exc
        _convert_values(ds)
    return image


def _read_parsed(ds: Dataset, name: str, limits: ImageLimits) -> CXRImage:
    """:func:`read_dicom` after parsing."""
    inferred = ensure_transfer_syntax(ds)
    check_header(ds, name, limits)
    stored = decode_stored(ds, name)
    pixels, applied = to_display(stored, ds, name)
    spacing, spacing_tag = _pixel_spacing(ds)
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    extra: dict[str, Any] = {
        "transfer_syntax": syntax.name,
        "transfer_syntax_uid": str(syntax),
        "transfer_syntax_inferred": inferred,
        "bits_allocated": int(ds.BitsAllocated),
        "bits_stored": int(ds.BitsStored),
        "pixel_representation": int(ds.get("PixelRepresentation", 0)),
        "photometric_interpretation": str(ds.PhotometricInterpretation).strip(),
        "modality": str(ds.get("Modality", "")).strip() or None,
        "view_position": str(ds.get("ViewPosition", "")).strip() or None,
        "pixel_spacing_mm": spacing,
        "pixel_spacing_source": spacing_tag,
        **applied,
    }
    del ds.PixelData
    return CXRImage(
        pixels=pixels,
        source_format="dicom",
        color_mode=extra["photometric_interpretation"],
        warnings=suitability_warnings(ds),
        dataset=ds,
        extra=extra,
    )
