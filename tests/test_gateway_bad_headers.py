"""Header values modalities send that highdicom refuses (PatientSex ``U``, ``Male``; SpecificCharacterSet
``ISO IR 100``; a date that is not a date) are repaired in our outputs, and a film whose outputs still
cannot be built fails alone: the gateway's worker goes on with the films behind it."""

from __future__ import annotations

import shutil

import pydicom
import pytest

import cxr_monai.gateway.service as service
from cxr_monai.explain.source_header import repaired_source
from tests.dicom_factory import PATIENT_ID, PATIENT_NAME
from tests.test_gateway import (
    SC_CLASS,
    SR_CLASS,
    cr_film,
    dciodvfy_errors,
    needs_storescu,
    predictor,  # noqa: F401  (fixture)
    receiver,  # noqa: F401  (fixture)
    start_gateway,
    storescu,
    wait_for,
)

BAD_HEADERS = [
    {"PatientSex": "U"},
    {"PatientSex": "Male"},
    {"PatientSex": "m"},
    {"SpecificCharacterSet": "ISO IR 100"},
    {"PatientBirthDate": "notadate", "AcquisitionDate": "2020"},
]


@pytest.mark.parametrize(
    "tags, expected",
    [
        ({"PatientSex": "U"}, {"PatientSex": ""}),
        ({"PatientSex": "Male"}, {"PatientSex": "M"}),
        ({"PatientSex": "f"}, {"PatientSex": "F"}),
        ({"PatientSex": "O"}, {}),
        ({"SpecificCharacterSet": "ISO IR 100"}, {"SpecificCharacterSet": "ISO_IR 100"}),
        ({"SpecificCharacterSet": "ISO-IR 192"}, {"SpecificCharacterSet": "ISO_IR 192"}),
        ({"SpecificCharacterSet": "ISO_IR 100"}, {}),
        ({"SpecificCharacterSet": "LATIN-1-ish"}, {"SpecificCharacterSet": "ISO_IR 192"}),
        ({"PatientBirthDate": "notadate"}, {"PatientBirthDate": None}),
    ],
)
def test_the_source_header_is_repaired_where_the_standard_allows(tmp_path, tags, expected):
    source = pydicom.dcmread(cr_film(tmp_path, "f.dcm", **tags))
    repaired, keywords = repaired_source(source)
    assert sorted(keywords) == sorted(expected)
    for keyword, value in expected.items():
        assert (repaired.get(keyword) or None) == (value or None)
    for keyword, value in tags.items():  # the source itself is left as it was
        assert str(source.get(keyword)) == value
    assert "PixelData" not in repaired and "PixelData" in source


@needs_storescu
def test_films_with_refused_header_values_get_valid_results(predictor, receiver, tmp_path):  # noqa: F811
    films = tmp_path / "films"
    films.mkdir()
    sent = [cr_film(films, f"bad_{i}.dcm", **tags) for i, tags in enumerate(BAD_HEADERS)]
    gateway = start_gateway(predictor, tmp_path / "queue", receiver.port)
    try:
        assert storescu(gateway.port, *sent).returncode == 0
        assert wait_for(lambda: len(receiver.of_class(SR_CLASS)) == len(sent))
        assert wait_for(lambda: len(receiver.of_class(SC_CLASS)) == len(sent))
    finally:
        gateway.stop()
    assert not any(gateway.queue.failed_dir.iterdir())
    assert {str(ds.get("PatientSex", "")) for ds in receiver.of_class(SC_CLASS)} <= {"", "M", "F", "O"}
    if shutil.which("dciodvfy"):
        for i, ds in enumerate(receiver.received):
            assert dciodvfy_errors(ds, tmp_path / f"out_{i}.dcm") == []


@needs_storescu
def test_a_film_whose_results_cannot_be_built_fails_alone_and_the_worker_goes_on(
    predictor,  # noqa: F811
    receiver,  # noqa: F811
    tmp_path,
    monkeypatch,
    caplog,
):
    """The first film's SR build raises a library error quoting a header value (as highdicom's do): it
    lands in failed/ with a reason that quotes nothing, and the good film behind it is delivered."""
    films = tmp_path / "films"
    films.mkdir()
    poisoned = cr_film(films, "poisoned.dcm", PatientSex="U", InstitutionName="POISON")
    good = cr_film(films, "good.dcm", PatientSex="F")
    built = service.explained_image

    def poisoned_outputs(predictor, name, image, result):
        explained = built(predictor, name, image, result)
        if str(image.dataset.get("InstitutionName", "")) == "POISON":

            def refuse(*_args: object) -> None:
                raise ValueError(f"'{PATIENT_NAME}' is not a valid value")

            object.__setattr__(explained, "structured_report", refuse)
        return explained

    monkeypatch.setattr(service, "explained_image", poisoned_outputs)
    gateway = start_gateway(predictor, tmp_path / "queue", receiver.port, batch_size=1)
    try:
        assert storescu(gateway.port, poisoned, good).returncode == 0
        assert wait_for(
            lambda: len(receiver.of_class(SR_CLASS)) == 1 and len(receiver.of_class(SC_CLASS)) == 1
        )
        assert wait_for(lambda: len(list(gateway.queue.failed_dir.glob("*.txt"))) == 1)
        assert all(thread.is_alive() for thread in gateway._threads)
    finally:
        gateway.stop()
    (reason_file,) = gateway.queue.failed_dir.glob("*.txt")
    reason = reason_file.read_text()
    assert "no results" in reason and "ValueError" in reason
    assert PATIENT_NAME not in reason and PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text
    assert receiver.of_class(SR_CLASS)[0].SOPInstanceUID  # the good film's results arrived
    assert not gateway.queue.inbox()
