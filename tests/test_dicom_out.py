"""Secondary Capture: highdicom from the source study, dciodvfy-clean, burned-in overlay, no patient leak."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from cxr_monai.errors import InvalidImageError
from cxr_monai.explain.overlay import render_overlay
from cxr_monai.explain.secondary_capture import FALLBACK_PATIENT_ORIENTATION, build_secondary_capture
from cxr_monai.io import read_cxr
from tests.dicom_factory import PATIENT_ID, PATIENT_NAME, gradient, make_dataset, save

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
    assert list(written.PatientOrientation) == list(FALLBACK_PATIENT_ORIENTATION)
    assert notes["patient_orientation_fallback"] is True


def test_source_patient_orientation_is_kept(tmp_path):
    source = source_dataset(PatientOrientation=["R", "F"])
    sc, notes = build_secondary_capture(source, overlay_for(source, tmp_path))
    assert list(sc.PatientOrientation) == ["R", "F"]
    assert notes["patient_orientation_fallback"] is False
    assert "PixelSpacing" not in sc  # none given


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
@pytest.mark.parametrize(
    ("tags", "body_part"),
    [({}, True), ({}, False), ({"PatientOrientation": ["L", "F"], "Laterality": "R"}, True)],
)
def test_dciodvfy_reports_no_errors(tmp_path, tags, body_part):
    source = source_dataset(**tags)
    if not body_part:
        del source.BodyPartExamined
    sc, _ = build_secondary_capture(source, overlay_for(source, tmp_path), pixel_spacing=(0.2, 0.25))
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = result.stdout + result.stderr
    assert "SCImage" in report  # dciodvfy recognised the IOD it checked
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert errors == []
    if body_part:  # CHEST copied: dciodvfy knows the part is unpaired and has nothing to say on Laterality
        assert "Laterality" not in report


def test_wrong_size_or_missing_study_is_refused(tmp_path):
    source = source_dataset()
    rgb = overlay_for(source, tmp_path)
    with pytest.raises(InvalidImageError, match="source size"):
        build_secondary_capture(source, rgb[:, :-1])
    with pytest.raises(InvalidImageError, match="source size"):
        build_secondary_capture(source, rgb.astype(np.uint16))
    del source.StudyInstanceUID
    with pytest.raises(InvalidImageError, match="StudyInstanceUID"):
        build_secondary_capture(source, rgb)


def test_patient_name_is_never_printed(tmp_path, capsys, caplog):
    source = source_dataset(PatientName="Single")  # highdicom warns about one-component names
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_secondary_capture(source, overlay_for(source, tmp_path))
    shown = capsys.readouterr()
    text = shown.out + shown.err + caplog.text + " ".join(str(w.message) for w in caught)
    assert "Single" not in text and PATIENT_NAME not in text and PATIENT_ID not in text
