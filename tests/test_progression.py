"""Disease progression: ordering by StudyDate / offset, series-max normalisation, the montage command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from typer.testing import CliRunner

from cxr_monai.cli import app
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.errors import DatasetError
from cxr_monai.explain.progression import datalist_series, order_studies
from cxr_monai.io import CXRImage
from tests.bundle_factory import blob_image, make_trained_bundle
from tests.dicom_factory import gradient, make_dataset, save

runner = CliRunner()


def dicom_image(date: str | None, time: str | None = None) -> CXRImage:
    ds = Dataset()
    if date is not None:
        ds.StudyDate = date
    if time is not None:
        ds.StudyTime = time
    return CXRImage(
        pixels=np.zeros((4, 4), np.float32), source_format="dicom", color_mode="MONOCHROME2", dataset=ds
    )


def test_dicom_studies_are_ordered_by_date_and_time():
    items = [
        (Path("c.dcm"), dicom_image("20200320")),
        (Path("a.dcm"), dicom_image("20200314", "235900")),
        (Path("b.dcm"), dicom_image("20200314", "080000.123")),
    ]
    studies, how = order_studies(items)
    assert how == "StudyDate"
    assert [s.path.name for s in studies] == ["b.dcm", "a.dcm", "c.dcm"]
    assert studies[0].day == 0.0 and studies[2].day == pytest.approx(5 + 16 / 24)
    assert studies[0].label.startswith("2020-03-14")


def test_given_order_is_kept_when_a_date_is_missing():
    items = [
        (Path("z.dcm"), dicom_image("20200320")),
        (Path("y.png"), CXRImage(np.zeros((4, 4), np.float32), "png", "L")),
        (Path("x.dcm"), dicom_image("20200101")),
    ]
    studies, how = order_studies(items)
    assert how == "as given"
    assert [s.path.name for s in studies] == ["z.dcm", "y.png", "x.dcm"]


def write_series_datalist(folder: Path) -> Path:
    """Prepare-style datalist: patient covid:7 has four images in training and test, one without offset."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)

    def item(name: str, patient: str, offset: int | None, fold: int | None) -> dict:
        path = folder / f"{name}.png"
        Image.fromarray(blob_image(40 + len(name), 36, rng)).save(path)
        entry = {"image": path.name, "label": 0, "label_name": "COVID-19", "patient_id": patient,
                 "source": "covid-chestxray-dataset", "offset": offset, "view": "PA"}  # fmt: skip
        if fold is not None:
            entry["fold"] = fold
        return entry

    datalist = {
        "class_names": list(CLASS_NAMES),
        "training": [
            item("d5", "covid:7", 5, 0),
            item("other", "covid:8", 1, 1),
            item("dx", "covid:7", None, 0),
        ],
        "test": [item("d2", "covid:7", 2, None), item("d0", "covid:7", 0, None)],
    }
    path = folder / "datalist.json"
    path.write_text(json.dumps(datalist))
    return path


def test_datalist_series_orders_a_patient_by_offset(tmp_path):
    datalist = write_series_datalist(tmp_path / "data")
    items = datalist_series(datalist, "covid:7")
    assert [Path(i["image"]).name for i in items] == ["d0.png", "d2.png", "d5.png", "dx.png"]
    assert Path(items[0]["image"]).is_absolute()  # resolved against the datalist's folder
    assert [i["image"] for i in datalist_series(datalist, "7")] == [i["image"] for i in items]
    with pytest.raises(DatasetError, match="no images of patient"):
        datalist_series(datalist, "covid:99")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_trained_bundle(tmp_path_factory.mktemp("bundle"), spatial_size=32)


def test_progression_command_from_datalist_writes_montage_and_series_json(tmp_path, bundle):
    datalist = write_series_datalist(tmp_path / "data")
    out = tmp_path / "out"
    result = runner.invoke(
        app,
        [
            "progression",
            "--datalist",
            str(datalist),
            "--patient-id",
            "7",
            "--bundle",
            str(bundle),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["progression.json", "progression.png"]
    record = json.loads((out / "progression.json").read_text())
    assert [s["input"] for s in record["studies"]] == ["d0.png", "d2.png", "d5.png", "dx.png"]
    assert [s["day"] for s in record["studies"]] == [0.0, 2.0, 5.0, None]
    assert record["normalisation"] == "series maximum"
    for study in record["studies"]:
        assert sum(study["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    peaks = [s["peak_value"] for s in record["studies"]]
    assert max(peaks) == pytest.approx(1.0)  # one scale for the series: only the hottest study reaches 1
    assert min(peaks) < 0.999
    with Image.open(out / "progression.png") as montage:
        assert montage.width > montage.height  # one column per study


def test_progression_command_orders_dicom_files_by_study_date(tmp_path, bundle):
    folder = tmp_path / "in"
    folder.mkdir()
    bright = gradient(12).astype(np.uint16)
    save(make_dataset(bright, bits_stored=12, StudyDate="20200310"), folder / "later.dcm")
    save(make_dataset(bright[::-1].copy(), bits_stored=12, StudyDate="20200301"), folder / "earlier.dcm")
    out = tmp_path / "out"
    files = [str(folder / "later.dcm"), str(folder / "earlier.dcm")]
    result = runner.invoke(app, ["progression", *files, "--bundle", str(bundle), "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "progression.json").read_text())
    assert record["ordered_by"] == "StudyDate"
    assert [s["input"] for s in record["studies"]] == ["earlier.dcm", "later.dcm"]
    assert [s["day"] for s in record["studies"]] == [0.0, 9.0]


def test_progression_needs_patient_id_with_datalist(tmp_path, bundle):
    result = runner.invoke(
        app, ["progression", "--datalist", "x.json", "--bundle", str(bundle), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "--patient-id" in result.output
