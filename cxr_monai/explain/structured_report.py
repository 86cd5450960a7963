"""DICOM Structured Report of one classification, built with highdicom, referencing the source image.

Choice: a **Comprehensive SR** holding the **TID 1500 Measurement Report** that highdicom builds
(``hd.sr.MeasurementReport``), not a Basic Text SR. Text would carry the same words, but a receiving
system (a PACS worklist rule, OHIF, an AI orchestrator) can only act on coded content: the TID 1500
tree gives each class probability as a numeric item with a code and a unit, the predicted class as a
coded qualitative evaluation, the model as a coded algorithm identification (TID 4019), and the source
instance as a coded image reference; it is the template DICOM's AI result profiles build on.

Content tree (one TID 1501 measurement group each):

* per class: finding type = the class's SNOMED CT code (:data:`CLASS_CODES`), measurement
  ``Probability`` (DCM 122157) in UCUM ``1`` (a fraction in [0, 1]);
* summary: qualitative evaluation ``Finding`` (DCM 121071) = the predicted class's code;
* every group: algorithm name and version (the bundle's model name and version), the site's calibration
  status as an ``Algorithm Parameters`` text (DCM 111002, TID 4019: the site profile applied to the
  probabilities - method, films, date - or that they are NOT calibrated for this site), a tracking
  identifier, and ``Source`` = the source image (SOP Class + Instance UID);
* the evidence sequence (CurrentRequestedProcedureEvidenceSequence) names the source too. The TID 1500
  Image Library is left out: highdicom fills its projection-radiography descriptors (TID 1603) from
  PatientOrientation and ImagerPixelSpacing, which most chest films (all four sample films) lack.

"NOT FOR CLINICAL USE": ``ContentQualification`` RESEARCH (the SR attribute meant for it),
``SeriesDescription``, and the TID 1501 ``Session`` text of each group. The SR is marked partial and
unverified (``CompletionFlag`` PARTIAL, ``VerificationFlag`` UNVERIFIED): nobody signed it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from cxr_monai.constants import CLASS_NAMES, RESEARCH_USE_NOTICE
from cxr_monai.explain.secondary_capture import (
    MANUFACTURER,
    SERIES_NUMBER_OFFSET,
    check_source,
)
from cxr_monai.explain.source_header import blank_invalid_values, repaired_source
from cxr_monai.versions import cxr_monai_version

#: SNOMED CT concept of each class (CLASS_NAMES order).
CLASS_CODES: dict[str, hd.sr.CodedConcept] = {
    "COVID-19": hd.sr.CodedConcept("840539006", "SCT", "Disease caused by SARS-CoV-2"),
    "Normal": hd.sr.CodedConcept(*codes.SCT.Normal),
    "Pneumonia": hd.sr.CodedConcept("233604007", "SCT", "Pneumonia"),
}
#: The procedure the report is about (TID 1500 "Procedure reported").
PROCEDURE_REPORTED = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
SERIES_DESCRIPTION = "CXR triage result - NOT FOR CLINICAL USE"
#: The SR's series sorts after the Secondary Capture's (which uses SERIES_NUMBER_OFFSET).
SR_SERIES_NUMBER_OFFSET = SERIES_NUMBER_OFFSET + 1
#: Patient/study attributes highdicom copies from the evidence unconditionally; Type 2 in the
#: Patient and General Study modules, so a source without them gives them empty ("unknown").
_TYPE2_FROM_EVIDENCE = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
)
SESSION = f"cxr-monai triage. {RESEARCH_USE_NOTICE}"
#: How the Algorithm Parameters text on the site's calibration begins.
SITE_PARAMETER_PREFIX = "Site calibration: "


def build_structured_report(
    source: Dataset,
    probabilities: np.ndarray,
    predicted_index: int,
    model_name: str,
    model_version: str,
    class_names: Sequence[str] = CLASS_NAMES,
    *,
    site_status: str,
) -> hd.sr.ComprehensiveSR:
    """Comprehensive SR (TID 1500) of one classification in ``source``'s study.

    Args:
        source: the classified image's header (pixel data not needed).
        probabilities: float (K,) in class order, summing to 1 (the site-calibrated ones, if any).
        predicted_index: index of the predicted class.
        model_name, model_version: the bundle's metadata (algorithm identification).
        class_names: K names, each a key of :data:`CLASS_CODES`.
        site_status: one line on the site's calibration (``SiteStatus.message()``).

    Raises:
        InvalidImageError: the source lacks StudyInstanceUID, SOPClassUID or SOPInstanceUID.
        ValueError: a class has no code, or probabilities and classes differ in length.
    """
    check_source(source)
    source, _ = repaired_source(source)  # values highdicom refuses, repaired where the standard allows
    if len(probabilities) != len(class_names):
        raise ValueError(f"{len(probabilities)} probabilities for {len(class_names)} classes")
    missing = [name for name in class_names if name not in CLASS_CODES]
    if missing:
        raise ValueError(f"no SNOMED CT code for class(es) {missing}; known: {list(CLASS_CODES)}")
    algorithm = hd.sr.AlgorithmIdentification(
        name=model_name,
        version=model_version,
        parameters=[f"{SITE_PARAMETER_PREFIX}{site_status}"],
        manufacturer=MANUFACTURER,
    )
    source_image = hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=str(source.SOPClassUID),
        referenced_sop_instance_uid=str(source.SOPInstanceUID),
    )

    def group(identifier: str, **content: object) -> hd.sr.MeasurementsAndQualitativeEvaluations:
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=identifier),
            algorithm_id=algorithm,
            session=SESSION,
            source_images=[source_image],
            **content,  # type: ignore[arg-type]
        )

    groups = [
        group(
            f"{name} probability",
            finding_type=CLASS_CODES[name],
            measurements=[
                hd.sr.Measurement(
                    name=codes.DCM.Probability, value=float(probability), unit=codes.UCUM.NoUnits
                )
            ],
        )
        for name, probability in zip(class_names, probabilities, strict=True)
    ]
    predicted = CLASS_CODES[class_names[predicted_index]]
    groups.append(
        group(
            "predicted class",
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=codes.DCM.Finding, value=predicted)],
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=hd.UID(), name=f"{model_name} {model_version}", manufacturer_name=MANUFACTURER
                ),
            )
        ),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    series_number = int(source.get("SeriesNumber") or 0) + SR_SERIES_NUMBER_OFFSET
    evidence = copy.copy(source)  # shallow: the caller's header is not changed
    for keyword in _TYPE2_FROM_EVIDENCE:
        if keyword not in evidence:
            setattr(evidence, keyword, None)
    # highdicom warns about a single-component person name, quoting it: cxr_monai.log_hygiene (installed
    # by the CLI, the server and the gateway) scrubs it; catch_warnings here would not be thread-safe
    sr = hd.sr.ComprehensiveSR(
        evidence=[evidence],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=False,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        software_versions=cxr_monai_version(),
    )
    blank_invalid_values(sr)
    return sr
