"""What the gateway accepts over C-STORE, and the status it answers (PS3.4 B.2.3).

Accepted: CR, DX (for presentation and for processing) and Secondary Capture image storage, in the
uncompressed, JPEG (baseline, extended, lossless), JPEG-LS, JPEG 2000 and RLE transfer syntaxes
(decoded later by pydicom + pylibjpeg). Deflated explicit VR is not offered: a small deflated data set
can expand to gigabytes before anything can refuse it.

Each instance is checked from its header only, then written to the on-disk queue *before* the answer,
with the calling AE title of the association it came on (the gateway's site map may name its site), so
a success status means the instance is safe on disk:

* ``0x0000`` success: queued.
* ``0xA900`` (Data Set does not match SOP Class): the data set is no single-frame image this reader
  can decode - no PixelData, multi-frame, unsupported bits or photometric interpretation, uncompressed
  PixelData shorter than Rows x Columns x SamplesPerPixel x BitsAllocated / 8, a rescale or window
  that cannot give an image (RescaleSlope 0, NaN or infinite; WindowWidth below 1), a header that
  cannot be parsed (:func:`cxr_monai.io.dicom.check_header`) - or no StudyInstanceUID or
  SOPInstanceUID (Type 1: the results could not join the study or reference the source).
* ``0xC000`` (Cannot understand): a valid image this gateway does not process - not a chest
  radiograph (BodyPartExamined other than CHEST, Modality other than CR/DX for CR/DX storage), a
  lateral view, or an instance made by cxr-monai itself (a result sent back would loop).
* ``0xA700`` (Out of resources): the queue could not be written (disk full); the sender may retry.

Failure answers carry an ErrorComment naming the reason from technical tags only (never patient data),
and the log gets one line: what was refused and why. What cannot be checked from the header (encapsulated
pixel data that does not decode, a header value no repair makes valid for the outputs) is accepted and
fails later: the gateway counts it, logs it and moves it to the queue's ``failed/`` with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pydicom.uid import JPEGLossless as JPEGLosslessP14
from pynetdicom import evt

from cxr_monai.errors import InvalidImageError
from cxr_monai.explain.secondary_capture import MANUFACTURER
from cxr_monai.io.dicom import check_header, ensure_transfer_syntax, suitability_warnings, values_unvalidated

logger = logging.getLogger(__name__)

STORAGE_CLASSES = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessP14,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
#: Type 1 UIDs the results need: the study they join, the instance they reference.
_REQUIRED_UIDS = ("StudyInstanceUID", "SOPInstanceUID")
#: ErrorComment is LO: at most 64 characters.
_COMMENT_LENGTH = 64


class Refused(Exception):
    """An instance the gateway answers with a failure ``status``; the message is the ErrorComment."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def check_instance(ds: Dataset) -> None:
    """Refuse, from the header, an instance the gateway cannot or should not process.

    Raises:
        Refused: ``DOES_NOT_MATCH_SOP_CLASS`` or ``CANNOT_UNDERSTAND`` with the reason.
    """
    try:
        ensure_transfer_syntax(ds)
        check_header(ds, "instance")
        reasons = list(suitability_warnings(ds))
        manufacturer = str(ds.get("Manufacturer", "") or "")
        sop_class = str(ds.get("SOPClassUID", ""))
        missing = [k for k in _REQUIRED_UIDS if not str(ds.get(k, "") or "").strip()]
    except InvalidImageError as exc:
        raise Refused(DOES_NOT_MATCH_SOP_CLASS, str(exc)) from exc
    # pydicom converts elements on first access; a corrupt one raises, and its message may quote it
    except Exception as exc:
        raise Refused(DOES_NOT_MATCH_SOP_CLASS, f"corrupt header element ({type(exc).__name__})") from exc
    if missing:
        raise Refused(DOES_NOT_MATCH_SOP_CLASS, f"no {missing[0]} (Type 1); results could not be linked")
    if manufacturer == MANUFACTURER:
        raise Refused(CANNOT_UNDERSTAND, "made by cxr-monai (a result sent back); not processed")
    if sop_class == SecondaryCaptureImageStorage:  # a digitised film is OT: only view and body part count
        reasons = [r for r in reasons if not r.startswith("Modality")]
    if reasons:
        raise Refused(CANNOT_UNDERSTAND, reasons[0])


def _decoded(event: evt.Event) -> Dataset:
    """The received data set with its file meta; a data set pydicom cannot parse is refused."""
    try:
        ds = event.dataset
        ds.file_meta = event.file_meta
    # the parser raises many types; its messages may quote element values
    except Exception as exc:
        raise Refused(DOES_NOT_MATCH_SOP_CLASS, f"data set cannot be parsed ({type(exc).__name__})") from exc
    return ds


def store_handler(
    put: Callable[[bytes, str], str],
    on_queued: Callable[[], None],
    on_refused: Callable[[], None] = lambda: None,
) -> Callable[[evt.Event], Dataset]:
    """The EVT_C_STORE handler: check, write to the queue with ``put(data, calling AE title)`` (which
    returns once the instance is on disk), answer; then ``on_queued`` or ``on_refused``."""

    def handle(event: evt.Event) -> Dataset:
        status = Dataset()
        try:
            with values_unvalidated():  # the header's values must not be quoted by pydicom's validation
                ds = _decoded(event)
                check_instance(ds)
                sop_class = _sop_class_name(ds)
            calling = str(event.assoc.requestor.ae_title).strip()
            name = put(event.encoded_dataset(include_meta=True), calling)
        except Refused as exc:
            logger.warning("refused an instance (0x%04X): %s", exc.status, exc)
            status.Status = exc.status
            status.ErrorComment = str(exc)[:_COMMENT_LENGTH]
            on_refused()
            return status
        except OSError as exc:
            logger.error("queue write failed (%s); answered out of resources", exc.strerror or exc)
            status.Status = OUT_OF_RESOURCES
            status.ErrorComment = "gateway queue cannot be written"
            on_refused()
            return status
        # anything else is a bug of ours or a library's; its message may quote a value: the type only
        except Exception as exc:
            logger.error("instance not handled (%s); answered cannot understand", type(exc).__name__)
            status.Status = CANNOT_UNDERSTAND
            status.ErrorComment = f"gateway could not handle it ({type(exc).__name__})"[:_COMMENT_LENGTH]
            on_refused()
            return status
        logger.info("queued instance %s (%s) from %s", name, sop_class, calling)
        status.Status = SUCCESS
        on_queued()
        return status

    return handle


def _sop_class_name(ds: Dataset) -> str:
    """The storage class's name for a log line (only the accepted classes reach here)."""
    uid = str(ds.get("SOPClassUID", ""))
    return UID(uid).name if uid in STORAGE_CLASSES else "storage"
