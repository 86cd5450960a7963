"""covid-chestxray-dataset findings -> classes: the default map, skipped counts, the override file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_layouts import covid_row, make_covid

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data import DEFAULT_FINDING_MAP, classify_finding, load_finding_map, scan_covid_dir
from cxr_monai.errors import DatasetError


@pytest.mark.parametrize(
    ("finding", "expected"),
    [
        ("COVID-19", "COVID-19"),
        ("COVID-19, ARDS", "COVID-19"),
        ("Pneumonia/Viral/COVID-19", "COVID-19"),
        ("Streptococcus", "Pneumonia"),
        ("Mycoplasma Bacterial Pneumonia", "Pneumonia"),
        ("E.Coli", "Pneumonia"),
        ("SARS", "Pneumonia"),
        ("Pneumonia/Bacterial/Klebsiella", "Pneumonia"),
        ("Pneumonia/Fungal/SomethingNew", "Pneumonia"),  # falls back to the mapped general term
        ("No Finding", "Normal"),
        ("todo", None),
        ("ARDS", None),
        ("Pneumonia/Lipoid", None),  # the specific term wins: lipoid pneumonia is not infectious
        ("Tuberculosis", None),
        ("Unheard-of", None),
        ("No Finding, Klebsiella", None),  # contradictory parts
        ("", None),
    ],
)
def test_default_map(finding: str, expected: str | None) -> None:
    assert classify_finding(finding, DEFAULT_FINDING_MAP) == expected


def _metadata(root: Path) -> Path:
    findings = ["COVID-19", "Klebsiella", "No Finding", "todo", "todo", "ARDS", "Lipoid", "Influenza"]
    rows = [covid_row(k, f"img{k}.png", finding=finding) for k, finding in enumerate(findings)]
    rows.append(covid_row(99, "lateral.png", finding="todo", view="L"))  # not a kept view: not counted
    return make_covid(root, rows)


def test_skipped_findings_are_counted_and_reported(tmp_path: Path) -> None:
    scan = scan_covid_dir(_metadata(tmp_path / "covid"))
    labels = sorted(CLASS_NAMES[item.label] for item in scan.items)
    assert labels == ["COVID-19", "Normal", "Pneumonia", "Pneumonia"]
    assert scan.skipped_findings == {"todo": 2, "ARDS": 1, "Lipoid": 1}
    assert scan.summary()["skipped_findings"] == {"ARDS": 1, "Lipoid": 1, "todo": 2}
    assert scan.eligible == 4
    assert "4 X-ray rows" in scan.warnings[0] and "ARDS 1, Lipoid 1, todo 2" in scan.warnings[0]


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_override_file(tmp_path: Path, suffix: str) -> None:
    entries = {"Influenza": None, "todo": "normal", "Lipoid": "Pneumonia"}
    path = tmp_path / f"map{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(entries))
    else:
        path.write_text("finding,label\n" + "".join(f"{k},{v or ''}\n" for k, v in entries.items()))
    mapping = load_finding_map(path)
    assert mapping["Influenza"] is None and mapping["todo"] == "Normal" and mapping["Lipoid"] == "Pneumonia"
    assert mapping["Klebsiella"] == "Pneumonia", "entries not named keep their default"
    scan = scan_covid_dir(_metadata(tmp_path / "covid"), finding_map=mapping)
    assert scan.skipped_findings == {"ARDS": 1, "Influenza": 1}
    labels = sorted(CLASS_NAMES[item.label] for item in scan.items)
    assert labels == ["COVID-19", "Normal", "Normal", "Normal", "Pneumonia", "Pneumonia"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("m.json", '{"todo": "Cancer"}', "'Cancer' is not one of COVID-19, Normal, Pneumonia"),
        ("m.json", '["todo"]', "must hold a JSON object"),
        ("m.json", '{"todo": 3}', "expected a class name or null"),
        ("m.json", "{not json", "not valid JSON"),
        ("m.json", '{" ": "Normal"}', "empty finding"),
        ("m.csv", "finding,class\ntodo,Normal\n", "lacks the columns finding,label"),
        ("m.csv", "finding,label\ntodo,Normal\ntodo,Pneumonia\n", "line 3: finding 'todo' given more"),
        ("m.txt", "todo=Normal", "expected a .json or .csv file"),
    ],
)
def test_override_file_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_finding_map(path)
    with pytest.raises(DatasetError, match="cannot be read"):
        load_finding_map(tmp_path / "absent.json")
