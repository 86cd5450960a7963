"""Secondary Capture and Structured Report: highdicom from the source study, linked to the source,
dciodvfy-clean, burned-in overlay, no patient leak."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from cxr_monai import log_hygiene
from cxr_monai.errors import InvalidImageError
from cxr_monai.explain.overlay import render_overlay
from cxr_monai.explain.secondary_capture import FRONTAL_PATIENT_ORIENTATION, build_secondary_capture
from cxr_monai.explain.structured_report import CLASS_CODES, build_structured_report
from cxr_monai.io import read_cxr
from cxr_monai.site.calibration import LogitCalibration
from cxr_monai.site.profile import SiteProfile, SiteStatus
from tests.dicom_factory import PATIENT_ID, PATIENT_NAME, gradient, jpeg_baseline, make_dataset, save

ROWS, COLS = 48, 64


def source_dataset(**tags: object) -> Dataset:
    """A (48, 64) 12-bit CR source with study date/time and pixel spacing, plus ``tags``."""
    base: dict[str, object] = {
        "StudyDate": "20200314",
        "StudyTime": "101500",
        "PixelSpacing": [0.2, 0.25],
        "SeriesNumber": 3,
    }
    base.update(tags)
    return make_dataset(gradient(12).astype(np.uint16), bits_stored=12, **base)


def overlay_for(ds: Dataset, tmp_path: Path) -> np.ndarray:
    image = read_cxr(save(ds, tmp_path / "source.dcm"))
    heat = np.zeros(image.shape, dtype=np.float32)
    heat[10:30, 20:40] = 1.0
    return render_overlay(image.pixels, heat, ["Predicted: COVID-19", "NOT FOR CLINICAL USE"])


def test_secondary_capture_joins_the_source_study_in_a_new_series(tmp_path):
    source = source_dataset()
    rgb = overlay_for(source, tmp_path)
    sc, notes = build_secondary_capture(source, rgb, pixel_spacing=(0.2, 0.25))
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    written = pydicom.dcmread(path)
    assert written.StudyInstanceUID == source.StudyInstanceUID
    assert written.SeriesInstanceUID != source.SeriesInstanceUID
    assert written.SOPInstanceUID != source.SOPInstanceUID
    assert written.PatientID == PATIENT_ID
    assert (written.Rows, written.Columns) == (ROWS, COLS)
    assert written.PhotometricInterpretation == "RGB" and written.SamplesPerPixel == 3
    assert written.BurnedInAnnotation == "YES"
    assert "NOT FOR CLINICAL USE" in written.SeriesDescription
    assert [float(v) for v in written.PixelSpacing] == [0.2, 0.25]
    assert written.SeriesNumber != source.SeriesNumber
    np.testing.assert_array_equal(written.pixel_array, rgb)
    assert list(written.PatientOrientation) == list(FRONTAL_PATIENT_ORIENTATION)
    assert notes["patient_orientation_basis"] == "view_position"  # the factory's films are PA
    (reference,) = written.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    assert written.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "Grad-CAM" in written.DerivationDescription
    assert written.Modality == "CR"  # the source's, an allowed SC modality
    assert "LossyImageCompression" not in written  # the source was never lossy


def test_source_patient_orientation_is_kept(tmp_path):
    source = source_dataset(PatientOrientation=["R", "F"])
    sc, notes = build_secondary_capture(source, overlay_for(source, tmp_path))
    assert list(sc.PatientOrientation) == ["R", "F"]
    assert notes["patient_orientation_fallback"] is False
    assert "PixelSpacing" not in sc  # none given


@pytest.mark.parametrize(
    ("tags", "orientation", "basis"),
    [
        ({"ViewPosition": "AP"}, ["L", "F"], "view_position"),
        ({"ViewPosition": ""}, ["L", "F"], "assumed_frontal"),
        ({"ViewPosition": "LL"}, [], "unknown_view"),  # no frontal fallback for a lateral
        ({"ViewPosition": "LL", "PatientOrientation": ["A", "F"]}, ["A", "F"], "source"),
    ],
)
def test_patient_orientation_follows_the_view(tmp_path, tags, orientation, basis):
    source = source_dataset(**tags)
    sc, notes = build_secondary_capture(source, overlay_for(source, tmp_path))
    assert list(sc.PatientOrientation or []) == orientation
    assert notes["patient_orientation_basis"] == basis
    assert ("note" in notes) == (basis != "source")


def test_modality_outside_the_sc_list_becomes_ot(tmp_path):
    source = source_dataset(Modality="MR")
    sc, notes = build_secondary_capture(source, overlay_for(source, tmp_path))
    assert sc.Modality == "OT" and notes["modality"] == "OT"


@pytest.mark.parametrize("tagged", [True, False])
def test_lossy_history_of_the_source_is_kept(tmp_path, tagged):
    source = jpeg_baseline(gradient(8))
    source.LossyImageCompressionRatio = "12.5"
    if not tagged:  # received as JPEG baseline without the tags: the syntax says it was lossy
        del source.LossyImageCompression, source.LossyImageCompressionRatio
    rgb = np.zeros((ROWS, COLS, 3), np.uint8)
    sc, notes = build_secondary_capture(source, rgb)
    assert sc.LossyImageCompression == "01" and notes["lossy_image_compression"] is True
    assert sc.LossyImageCompressionMethod == "ISO_10918_1"
    assert ("LossyImageCompressionRatio" in sc) == tagged


def dciodvfy_errors(path: Path, iod: str) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = result.stdout + result.stderr
    assert iod in report  # dciodvfy recognised the IOD it checked
    return [line for line in report.splitlines() if line.startswith("Error")]


needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed")


@needs_dciodvfy
@pytest.mark.parametrize(
    ("tags", "body_part"),
    [
        ({}, True),
        ({}, False),
        ({"PatientOrientation": ["L", "F"], "Laterality": "R"}, True),
        ({"ViewPosition": "LL", "LossyImageCompression": "01", "PatientAge": "81"}, True),
    ],
)
@pytest.mark.parametrize("calibrated", [None, False, True])
def test_dciodvfy_reports_no_errors(tmp_path, tags, body_part, calibrated):
    source = source_dataset(**tags)
    if not body_part:
        del source.BodyPartExamined
    status = None if calibrated is None else _site_status(calibrated).message()
    sc, _ = build_secondary_capture(
        source, overlay_for(source, tmp_path), pixel_spacing=(0.2, 0.25), site_status=status
    )
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path, "SCImage") == []
    comments = pydicom.dcmread(path).ImageComments
    assert ("Site calibration: " in comments) == (status is not None)
    assert status is None or status in comments
    if body_part:  # CHEST copied: dciodvfy knows the part is unpaired and has nothing to say on Laterality
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        assert "Laterality" not in report.stdout + report.stderr


def test_wrong_size_or_missing_study_is_refused(tmp_path):
    source = source_dataset()
    rgb = overlay_for(source, tmp_path)
    with pytest.raises(InvalidImageError, match="source size"):
        build_secondary_capture(source, rgb[:, :-1])
    with pytest.raises(InvalidImageError, match="source size"):
        build_secondary_capture(source, rgb.astype(np.uint16))
    del source.SOPInstanceUID
    with pytest.raises(InvalidImageError, match="SOPInstanceUID"):
        build_secondary_capture(source, rgb)
    del source.StudyInstanceUID
    for build in (
        lambda: build_secondary_capture(source, rgb),
        lambda: build_structured_report(source, np.array([0.2, 0.3, 0.5]), 2, "m", "1", site_status="s"),
    ):
        with pytest.raises(InvalidImageError, match="StudyInstanceUID"):
            build()


def test_patient_name_is_never_printed(tmp_path, capsys, caplog):
    """highdicom warns about a one-component name, quoting it; with the log hygiene every entry point
    installs (CLI, server, gateway), the warning reaches the log with the name scrubbed."""
    source = source_dataset(PatientName="Single")  # highdicom warns about one-component names
    with warnings.catch_warnings(), caplog.at_level("WARNING"):  # restores showwarning afterwards
        warnings.simplefilter("always")
        log_hygiene.install()
        build_secondary_capture(source, overlay_for(source, tmp_path))
        build_structured_report(
            source, np.array([0.2, 0.3, 0.5]), 2, "m", "1", site_status=_site_status(False).message()
        )
    shown = capsys.readouterr()
    text = shown.out + shown.err + caplog.text
    assert "Single" not in text and PATIENT_NAME not in text and PATIENT_ID not in text
    assert "person name" in caplog.text and "<value>" in caplog.text  # visible, scrubbed


def sr_items(ds: Dataset) -> list[Dataset]:
    """Every content item of an SR tree, depth first."""
    items = []
    for item in ds.get("ContentSequence", []):
        items.append(item)
        items.extend(sr_items(item))
    return items


def _site_status(calibrated: bool) -> SiteStatus:
    if not calibrated:
        return SiteStatus(None, None)
    calibration = LogitCalibration("bias", np.ones(3), np.array([0.0, 2.0, 0.0]))
    model = {"name": "m", "version": "1", "digest": "0" * 64}
    return SiteStatus(
        "north", SiteProfile("north", model, calibration, {"created": "2026-12-02", "films": {"total": 10}})
    )


@pytest.mark.parametrize("calibrated", [False, True])
def test_structured_report_holds_probabilities_prediction_model_and_source(tmp_path, calibrated):
    source = source_dataset(PatientAge="81")  # malformed AS: must not make the SR invalid
    probabilities = np.array([0.1, 0.25, 0.65])
    status = _site_status(calibrated).message()
    sr = build_structured_report(
        source, probabilities, 2, "Tiny test classifier", "0.0.1", site_status=status
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    written = pydicom.dcmread(path)
    assert written.StudyInstanceUID == source.StudyInstanceUID and written.PatientID == PATIENT_ID
    assert written.ContentQualification == "RESEARCH" and "NOT FOR CLINICAL USE" in written.SeriesDescription
    items = sr_items(written)
    numbers = [item for item in items if item.ValueType == "NUM"]
    assert [float(n.MeasuredValueSequence[0].NumericValue) for n in numbers] == pytest.approx(probabilities)
    assert {n.ConceptNameCodeSequence[0].CodeMeaning for n in numbers} == {"Probability"}
    findings = [
        item.ConceptCodeSequence[0].CodeValue
        for item in items
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeMeaning == "Finding"
    ]
    # three finding types (one per class) and the predicted class as qualitative evaluation
    assert findings.count(CLASS_CODES["Pneumonia"].value) == 2
    texts = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
        for item in items
        if item.ValueType == "TEXT"
    }
    assert texts["Algorithm Name"] == "Tiny test classifier" and texts["Algorithm Version"] == "0.0.1"
    # the site's calibration status, in every measurement group (TID 4019 Algorithm Parameters)
    parameters = [
        item.TextValue
        for item in items
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "111002"
    ]
    assert parameters == [f"Site calibration: {status}"] * 4
    assert ("NOT calibrated" in status) != calibrated and (
        "site north calibrated (bias, 10 films" in status
    ) == calibrated
    assert "NOT FOR CLINICAL USE" in texts["Activity Session"]
    images = [item for item in items if item.ValueType == "IMAGE"]
    assert images and all(
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID for i in images
    )
    evidence = written.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(path, "ComprehensiveSR") == []
