"""``cxr-monai prepare`` on the real data in ../shared/data: counts, patient-disjointness, existing paths."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cxr_monai.cli import app
from cxr_monai.data import load_datalist

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prepared(
    shared_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], dict[str, Any]]:
    out = tmp_path_factory.mktemp("prep")
    result = CliRunner().invoke(
        app,
        [
            "prepare",
            "--covid-dir",
            str(shared_data / "covid-chestxray-dataset"),
            "--kaggle-dir",
            str(shared_data / "chest_xray"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "prepare_summary.json").read_text())
    return load_datalist(out / "datalist.json"), summary


def _covid_expected(covid_dir: Path) -> tuple[int, int]:
    """(eligible rows, rows whose file exists) by the issue's rule, computed here independently."""
    with (covid_dir / "metadata.csv").open(newline="", encoding="utf-8") as handle:
        rows = [
            row
            for row in csv.DictReader(handle)
            if row["modality"] == "X-ray"
            and "COVID-19" in row["finding"]
            and row["view"] in {"PA", "AP", "AP Supine"}
        ]
    present = sum((covid_dir / row["folder"] / row["filename"]).is_file() for row in rows)
    return len(rows), present


def test_counts_match_the_data(prepared: tuple[dict[str, Any], dict[str, Any]], shared_data: Path) -> None:
    datalist, summary = prepared
    eligible, present = _covid_expected(shared_data / "covid-chestxray-dataset")
    assert present == 294 - 17, "data README: 294 COVID-19 images, 17 of them lateral"
    kaggle = shared_data / "chest_xray" / "train"
    normal = len([p for p in (kaggle / "NORMAL").iterdir() if p.suffix == ".jpeg"])
    pneumonia = len([p for p in (kaggle / "PNEUMONIA").iterdir() if p.suffix == ".jpeg"])
    assert (normal, pneumonia) == (200, 290)

    totals = {name: row["total"] for name, row in summary["counts"]["images"].items()}
    assert totals == {"COVID-19": present, "Normal": normal, "Pneumonia": pneumonia, "Total": present + 490}
    items = datalist["training"] + datalist["test"]
    assert len(items) == present + normal + pneumonia
    covid_source = summary["sources"]["covid-chestxray-dataset"]
    assert covid_source["eligible"] == eligible and covid_source["missing"] == eligible - present
    assert summary["per_class"]["Normal"] == {"requested": 300, "available": 200, "taken": 200}
    assert summary["per_class"]["Pneumonia"] == {"requested": 300, "available": 290, "taken": 290}
    assert any("Normal: only 200 images available" in w for w in summary["warnings"])
    assert any("Pneumonia: only 290 images available" in w for w in summary["warnings"])
    assert any(f"{eligible - present} of {eligible} eligible rows skipped" in w for w in summary["warnings"])
    assert 0.15 < len(datalist["test"]) / len(items) < 0.25


def test_no_patient_in_two_splits(prepared: tuple[dict[str, Any], dict[str, Any]]) -> None:
    datalist, _ = prepared
    splits: dict[str, set[str]] = defaultdict(set)
    for item in datalist["training"]:
        splits[item["patient_id"]].add(f"fold_{item['fold']}")
    for item in datalist["test"]:
        splits[item["patient_id"]].add("test")
    shared = {patient: names for patient, names in splits.items() if len(names) > 1}
    assert not shared
    assert {name for names in splits.values() for name in names} == {"test"} | {f"fold_{k}" for k in range(5)}
    # patients with several images really are grouped: the IM-0505 pair and multi-image covid patients
    per_patient: dict[str, int] = defaultdict(int)
    for item in datalist["training"] + datalist["test"]:
        per_patient[item["patient_id"]] += 1
    assert per_patient["kaggle:IM-0505"] == 2
    assert sum(count > 1 for patient, count in per_patient.items() if patient.startswith("covid:")) > 30


def test_every_image_exists(prepared: tuple[dict[str, Any], dict[str, Any]]) -> None:
    datalist, _ = prepared
    for item in datalist["training"] + datalist["test"]:
        path = Path(item["image"])
        assert path.is_absolute() and path.is_file(), item["image"]
        assert "__MACOSX" not in item["image"]
        if item["source"] == "covid-chestxray-dataset":
            assert item["view"] in {"PA", "AP", "AP Supine"}
            assert item["offset"] is None or isinstance(item["offset"], (int, float))
