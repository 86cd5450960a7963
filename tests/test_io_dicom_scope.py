"""The DICOM reader changes no process-wide pydicom setting: validation is off only while it reads, and
a MemoryError while decoding is not reported as a corrupt file."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from cxr_monai.errors import InvalidImageError
from cxr_monai.explain.secondary_capture import build_secondary_capture
from cxr_monai.io import dicom, read_cxr
from tests.dicom_factory import gradient, make_dataset, save

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_readers_leaves_pydicom_settings_as_they_were() -> None:
    script = (
        "import pydicom\n"
        "pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE\n"
        "before = pydicom.config.settings.reading_validation_mode\n"
        "import cxr_monai.io, cxr_monai.io.dicom\n"
        "print(before, pydicom.config.settings.reading_validation_mode)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    before, after = out.stdout.split()
    assert before == after == str(pydicom.config.RAISE)


@pytest.fixture
def raise_mode() -> object:
    """pydicom set to raise on invalid values (as a strict caller might), restored afterwards."""
    found = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.RAISE
    yield
    pydicom.config.settings.reading_validation_mode = found


def _over_long_name_file(tmp_path: Path) -> Path:
    """A DICOM whose PatientName has a component over PN's 64 characters."""
    # writing it is not what is tested (elements keep the validation mode they were made under)
    with pydicom.config.disable_value_validation(), dicom.values_unvalidated():
        ds = make_dataset(gradient(8))
        ds.PatientName = "Secret" * 12 + "^Patient"
        return save(ds, tmp_path / "a.dcm")


@pytest.mark.usefixtures("raise_mode")
def test_a_read_validates_nothing_and_restores_the_callers_mode(tmp_path: Path) -> None:
    path = _over_long_name_file(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_cxr(path)
        # converted while reading: a later reader of the header does not validate (nor quote) it
        assert str(image.dataset.PatientName).startswith("SecretSecret")
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.RAISE
    assert not [w for w in caught if "Secret" in str(w.message) or "PN" in str(w.message)]
    # outside the reader, pydicom validates as the caller asked
    with pytest.raises(ValueError, match="PN component length"):
        _ = pydicom.dcmread(path).PatientName


@pytest.mark.usefixtures("raise_mode")
def test_overlapping_readers_in_threads_restore_the_mode_when_the_last_leaves() -> None:
    first_in, second_in, release = threading.Event(), threading.Event(), threading.Event()
    seen: list[int] = []

    def reader(entered: threading.Event) -> None:
        with dicom.values_unvalidated():
            entered.set()
            seen.append(pydicom.config.settings.reading_validation_mode)
            release.wait(10)

    threads = [threading.Thread(target=reader, args=(event,)) for event in (first_in, second_in)]
    threads[0].start()
    assert first_in.wait(10)
    threads[1].start()
    assert second_in.wait(10)
    release.set()
    for thread in threads:
        thread.join(10)
    assert seen == [pydicom.config.IGNORE, pydicom.config.IGNORE]
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.RAISE


def test_memory_error_while_decoding_is_not_a_corrupt_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = save(make_dataset(gradient(8)), tmp_path / "a.dcm")

    def out_of_memory(self: Dataset) -> np.ndarray:
        raise MemoryError

    monkeypatch.setattr(Dataset, "pixel_array", property(out_of_memory))
    with pytest.raises(MemoryError):
        read_cxr(path)
    assert pydicom.config.settings.reading_validation_mode != pydicom.config.IGNORE


@pytest.mark.parametrize("keyword", ["StudyDate", "PatientBirthDate", "StudyTime"])
def test_writing_a_secondary_capture_from_a_malformed_header_quotes_nothing(
    tmp_path: Path, keyword: str
) -> None:
    with dicom.values_unvalidated():  # the test writes the malformed value; the reader and writer are tested
        ds = make_dataset(gradient(8))
        setattr(ds, keyword, "SECRETVALUE")
    image = read_cxr(save(ds, tmp_path / "a.dcm"))
    rgb = np.zeros((*image.pixels.shape, 3), dtype=np.uint8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with contextlib.suppress(InvalidImageError, ValueError):  # refusing the value is allowed
            build_secondary_capture(image.dataset, rgb)
    assert not [w for w in caught if "SECRETVALUE" in str(w.message)]
