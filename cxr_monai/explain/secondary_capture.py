"""DICOM Secondary Capture of a heat-map overlay, built with highdicom from the source study.

The Secondary Capture joins the source's patient and study (``SCImage.from_ref_dataset``), opens a
new series, keeps the source's Rows x Columns, and carries the overlay as RGB with the text and colour
bar burned in (``BurnedInAnnotation`` YES). ``SeriesDescription`` says NOT FOR CLINICAL USE; the
site's calibration status is a line of the burned-in text and of ``ImageComments``.

Link to the source (:func:`link_to_source`; highdicom's SCImage has no arguments for these, so they are
set on the built data set): ``SourceImageSequence`` (the image this one was derived from) and
``ReferencedImageSequence`` (for viewers that offer "related images"), both with the source's SOP Class
and Instance UID; ``DerivationDescription``; the source's lossy-compression history
(``LossyImageCompression`` "01" once lossy stays "01", PS3.3 C.7.6.1.1.5, with ratio and method where
the source has them; a source received in a lossy transfer syntax without the tags counts as lossy);
``Modality`` from the source when it is one of :data:`SC_MODALITIES`, else highdicom's ``OT``.

PatientOrientation (:func:`patient_orientation`), in this order:

1. the source's PatientOrientation, when it has two values;
2. derived from ViewPosition: a frontal film (``PA`` or ``AP``) gets ``L\\F``. Chest films are hung
   as if the viewer faces the patient, whatever the beam direction: the patient's left is on the
   viewer's right (rows run towards the patient's Left), the head at the top (columns run towards the
   Feet). A PA acquisition is flipped by the modality to meet this convention; an AP one is seen from
   the tube side and needs no flip, so both end up ``L\\F`` (``R\\F`` would be an AP film shown from
   behind, which is not how it is displayed);
3. no ViewPosition: assumed frontal ``L\\F`` (the model only accepts frontal films), and said so;
4. a lateral (or any other view): no frontal fallback. Which side faces the viewer differs by site
   for laterals, so the value is left empty: PatientOrientation is Type 2C in the General Image
   module, and an empty Type 2 value means "unknown".

The basis used is reported to the caller (and into the JSON).
"""

from __future__ import annotations

import logging
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

from cxr_monai.constants import RESEARCH_USE_NOTICE
from cxr_monai.errors import InvalidImageError
from cxr_monai.explain.source_header import blank_invalid_values, repaired_source
from cxr_monai.versions import cxr_monai_version

logger = logging.getLogger(__name__)
# highdicom logs the source's SOPInstanceUID at INFO when it copies patient and study attributes;
# UIDs stay out of the logs (process-wide setting, as for pydicom's value validation in io.dicom).
logging.getLogger("highdicom").setLevel(logging.WARNING)

#: Row and column direction of a frontal chest film as displayed (the viewer faces the patient).
FRONTAL_PATIENT_ORIENTATION: tuple[str, str] = ("L", "F")
#: ViewPosition values that mean a frontal projection.
FRONTAL_VIEWS = ("PA", "AP")
#: Source modalities the SC keeps (PS3.3 C.7.3.1.1.1 defined terms of projection radiography);
#: anything else becomes highdicom's ``OT``.
SC_MODALITIES = ("CR", "DX", "RG", "RF", "MG", "XA")
#: Transfer syntaxes that mean the received pixels went through lossy compression, with the
#: LossyImageCompressionMethod (PS3.3 C.7.6.1.1.5.1) each implies.
LOSSY_SYNTAX_METHOD: dict[str, str] = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEG2000: "ISO_15444_1",
    JPEGLSNearLossless: "ISO_14495_1",
}
SERIES_DESCRIPTION = "Grad-CAM heat map - NOT FOR CLINICAL USE"
DERIVATION_DESCRIPTION = (
    "Grad-CAM class-activation heat map of a chest X-ray classifier blended over the source image, "
    "with the result text burned in (cxr-monai). " + RESEARCH_USE_NOTICE
)
#: Added to the source's SeriesNumber so the new series sorts after it in a viewer.
SERIES_NUMBER_OFFSET = 1000
MANUFACTURER = "cxr-monai"


def patient_orientation(source: Dataset) -> tuple[tuple[str, str] | None, str]:
    """PatientOrientation for an image on the source's pixel grid and the basis it rests on.

    Returns:
        (row direction, column direction) or None when it cannot be known (a lateral), and the basis:
        ``"source"``, ``"view_position"`` (frontal ViewPosition), ``"assumed_frontal"`` (no
        ViewPosition) or ``"unknown_view"`` (lateral or other view; omitted).
    """
    value = source.get("PatientOrientation")
    if value is not None and not isinstance(value, str) and len(value) == 2 and all(str(v) for v in value):
        return (str(value[0]), str(value[1])), "source"
    view = str(source.get("ViewPosition", "") or "").strip().upper()
    if view in FRONTAL_VIEWS:
        return FRONTAL_PATIENT_ORIENTATION, "view_position"
    if not view:
        return FRONTAL_PATIENT_ORIENTATION, "assumed_frontal"
    return None, "unknown_view"


def lossy_history(source: Dataset) -> dict[str, Any]:
    """The source's lossy-compression history: {} when never lossy, else LossyImageCompression "01"
    and, where known, LossyImageCompressionRatio / LossyImageCompressionMethod (keyword -> value)."""
    history: dict[str, Any] = {}
    syntax = str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", "") or "")
    if str(source.get("LossyImageCompression", "")).strip() == "01" or syntax in LOSSY_SYNTAX_METHOD:
        history["LossyImageCompression"] = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if source.get(keyword):
                history[keyword] = source[keyword].value
        if "LossyImageCompressionMethod" not in history and syntax in LOSSY_SYNTAX_METHOD:
            history["LossyImageCompressionMethod"] = LOSSY_SYNTAX_METHOD[syntax]
    return history


def source_reference(source: Dataset) -> Dataset:
    """An item naming the source instance: ReferencedSOPClassUID + ReferencedSOPInstanceUID."""
    item = Dataset()
    item.ReferencedSOPClassUID = UID(str(source.SOPClassUID))
    item.ReferencedSOPInstanceUID = UID(str(source.SOPInstanceUID))
    return item


def check_source(source: Dataset) -> None:
    """Refuse a source an output cannot join or reference.

    Raises:
        InvalidImageError: StudyInstanceUID, SOPClassUID or SOPInstanceUID is missing (names which).
    """
    for keyword, why in (
        ("StudyInstanceUID", "cannot add a series to its study"),
        ("SOPClassUID", "cannot reference it"),
        ("SOPInstanceUID", "cannot reference it"),
    ):
        if not str(source.get(keyword, "") or "").strip():
            raise InvalidImageError(f"source DICOM has no {keyword}; {why}")


def link_to_source(derived: Dataset, source: Dataset) -> None:
    """Set the source references, derivation, lossy history and Modality on ``derived`` (an image)."""
    derived.SourceImageSequence = [source_reference(source)]
    derived.ReferencedImageSequence = [source_reference(source)]
    derived.DerivationDescription = DERIVATION_DESCRIPTION
    for keyword, value in lossy_history(source).items():
        setattr(derived, keyword, value)
    modality = str(source.get("Modality", "") or "").strip().upper()
    if modality in SC_MODALITIES:
        derived.Modality = modality


def build_secondary_capture(
    source: Dataset,
    rgb: np.ndarray,
    pixel_spacing: tuple[float, float] | None = None,
    *,
    site_status: str | None = None,
) -> tuple[hd.sc.SCImage, dict[str, Any]]:
    """Secondary Capture of ``rgb`` in ``source``'s study, referencing ``source``.

    Args:
        source: the source image's header (pixel data not needed).
        rgb: uint8 (Rows, Columns, 3), the same size as the source.
        pixel_spacing: (row, column) spacing in mm, copied into PixelSpacing when given.
        site_status: one line on the site's calibration, added to ImageComments when given.

    Returns:
        The SCImage and notes for the report: ``patient_orientation`` (list or None),
        ``patient_orientation_basis`` (see :func:`patient_orientation`), ``patient_orientation_fallback``
        (True when not the source's own), ``modality``, ``lossy_image_compression`` and, for anything
        assumed or omitted, a ``note``.

    Raises:
        InvalidImageError: see :func:`check_source`; no Rows/Columns, or ``rgb`` has another size.
    """
    check_source(source)
    source, _ = repaired_source(source)  # values highdicom refuses, repaired where the standard allows
    if "Rows" not in source or "Columns" not in source:
        raise InvalidImageError("source DICOM has no Rows/Columns")
    expected = (int(source.Rows), int(source.Columns), 3)
    if rgb.shape != expected or rgb.dtype != np.uint8:
        raise InvalidImageError(
            f"overlay is {rgb.shape} {rgb.dtype}; expected {expected} uint8 (source size)"
        )
    orientation, basis = patient_orientation(source)
    if basis != "source":
        logger.debug("source has no PatientOrientation; PatientOrientation %s (%s)", orientation, basis)
    series_number = int(source.get("SeriesNumber") or 0) + SERIES_NUMBER_OFFSET
    # highdicom warns about a single-component person name, quoting it: cxr_monai.log_hygiene (installed
    # by the CLI, the server and the gateway) scrubs it; catch_warnings here would not be thread-safe
    # highdicom needs an orientation for a patient-based image; an unknown one is emptied below
    sc = _from_ref_dataset(
        source, rgb, orientation or FRONTAL_PATIENT_ORIENTATION, series_number, pixel_spacing
    )
    if orientation is None:
        sc.PatientOrientation = []  # Type 2: present and empty = unknown
    link_to_source(sc, source)
    blank_invalid_values(sc)
    # General Series Laterality is Type 2C: present for paired body parts, absent for unpaired ones.
    # With the source's BodyPartExamined copied, CHEST (unpaired) gets none; for other or unknown
    # parts it is the source's, or empty (Type 2: "unknown"), as dciodvfy then requires it present.
    body_part = str(source.get("BodyPartExamined", "")).strip().upper()
    if body_part:
        sc.BodyPartExamined = body_part
    if body_part != "CHEST":
        sc.Laterality = source.get("Laterality", "")
    sc.BurnedInAnnotation = "YES"
    comments = ["Grad-CAM overlay generated by cxr-monai.", RESEARCH_USE_NOTICE]
    if site_status:
        comments.insert(1, f"Site calibration: {site_status}.")
    sc.ImageComments = " ".join(comments)
    notes: dict[str, Any] = {
        "patient_orientation": list(orientation) if orientation else None,
        "patient_orientation_basis": basis,
        "patient_orientation_fallback": basis != "source",
        "modality": str(sc.Modality),
        "lossy_image_compression": str(sc.get("LossyImageCompression", "")) == "01",
    }
    if basis in _ORIENTATION_NOTES:
        notes["note"] = _ORIENTATION_NOTES[basis]
    return sc, notes


_ORIENTATION_NOTES = {
    "view_position": "source has no PatientOrientation; L\\F derived from its frontal ViewPosition",
    "assumed_frontal": "source has no PatientOrientation or ViewPosition; assumed L\\F (frontal film)",
    "unknown_view": "source has no PatientOrientation and is not a frontal view; PatientOrientation left "
    "empty (unknown) rather than guessed",
}


def _from_ref_dataset(
    source: Dataset,
    rgb: np.ndarray,
    orientation: tuple[str, str],
    series_number: int,
    pixel_spacing: tuple[float, float] | None,
) -> hd.sc.SCImage:
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        pixel_spacing=pixel_spacing,  # type: ignore[arg-type]  # highdicom annotates floats (mm) as int
        patient_orientation=orientation,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SERIES_DESCRIPTION,
        software_versions=cxr_monai_version(),
    )
