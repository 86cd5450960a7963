"""The three dataset sources, read from tiny layouts the tests write: ids, filters, missing files, errors."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from data_layouts import covid_row, make_covid, make_kaggle, write_image

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data import COVID_SOURCE, KAGGLE_SOURCE, kaggle_patient_id, scan_covid_dir, scan_kaggle_dir
from cxr_monai.data.sources import parse_label, scan_site_csv, site_csv
from cxr_monai.errors import DatasetError

COVID, NORMAL, PNEUMONIA = (CLASS_NAMES.index(name) for name in ("COVID-19", "Normal", "Pneumonia"))


@pytest.mark.parametrize(
    ("filename", "patient"),
    [
        ("person1234_bacteria_3133.jpeg", "kaggle:person1234"),
        ("person1_virus_6.jpeg", "kaggle:person1"),
        ("person1_bacteria_2.jpeg", "kaggle:person1"),
        ("IM-0115-0001.jpeg", "kaggle:IM-0115"),
        ("IM-0505-0001-0001.jpeg", "kaggle:IM-0505"),
        ("IM-0505-0001-0002.jpeg", "kaggle:IM-0505"),
        ("NORMAL2-IM-0383-0001.jpeg", "kaggle:NORMAL2-IM-0383"),
        ("NORMAL2-IM-1294-0001-0002.jpeg", "kaggle:NORMAL2-IM-1294"),
        ("scan_0001.jpeg", None),
        ("IM-0505.jpeg", None),
        ("person12.jpeg", None),
    ],
)
def test_kaggle_patient_id(filename: str, patient: str | None) -> None:
    assert kaggle_patient_id(filename) == patient


def test_kaggle_scan_reads_exactly_the_split_class_folders(tmp_path: Path) -> None:
    root = make_kaggle(
        tmp_path / "chest_xray",
        {
            "train": {
                "NORMAL": ["IM-0505-0001-0001.jpeg", "NORMAL2-IM-0383-0001.jpeg"],
                "PNEUMONIA": ["person1_bacteria_2.jpeg", "person1_virus_6.jpeg", "person7_virus_9.JPEG"],
            },
            "test": {"NORMAL": ["IM-0505-0001-0002.jpeg"]},
            "val": {"PNEUMONIA": ["person8_bacteria_10.png"]},
            # the published zip's nested copy and macOS metadata: never counted
            "chest_xray/train": {"NORMAL": ["IM-0900-0001.jpeg"], "PNEUMONIA": ["person99_virus_1.jpeg"]},
            "__MACOSX/chest_xray/train": {"NORMAL": ["._IM-0505-0001-0001.jpeg"]},
        },
    )
    write_image(root / "train" / "NORMAL" / "._IM-0505-0001-0001.jpeg")  # AppleDouble file
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    (root / "train" / "NORMAL" / "subdir.jpeg").mkdir()

    scan = scan_kaggle_dir(root)

    by_name = {Path(item.image).name: item for item in scan.items}
    assert sorted(by_name) == sorted(
        [
            "IM-0505-0001-0001.jpeg",
            "NORMAL2-IM-0383-0001.jpeg",
            "person1_bacteria_2.jpeg",
            "person1_virus_6.jpeg",
            "person7_virus_9.JPEG",
            "IM-0505-0001-0002.jpeg",
            "person8_bacteria_10.png",
        ]
    )
    assert scan.source == KAGGLE_SOURCE and scan.eligible == 7 and not scan.missing_lines
    assert by_name["IM-0505-0001-0001.jpeg"].patient_id == by_name["IM-0505-0001-0002.jpeg"].patient_id
    assert by_name["person1_bacteria_2.jpeg"].patient_id == by_name["person1_virus_6.jpeg"].patient_id
    assert by_name["NORMAL2-IM-0383-0001.jpeg"].label == NORMAL
    assert by_name["person8_bacteria_10.png"].label == PNEUMONIA
    for item in scan.items:
        assert Path(item.image).is_absolute() and Path(item.image).is_file()
        assert item.view is None and item.offset is None
        assert "chest_xray/chest_xray" not in item.image and "__MACOSX" not in item.image
    assert not scan.warnings


def test_kaggle_unparsed_names_are_own_patients_with_a_warning(tmp_path: Path) -> None:
    root = make_kaggle(tmp_path, {"train": {"NORMAL": ["scan_a.jpeg", "scan_b.jpeg", "IM-0001-0001.jpeg"]}})
    scan = scan_kaggle_dir(root)
    assert len({item.patient_id for item in scan.items}) == 3
    assert len(scan.warnings) == 1 and "2 file name(s)" in scan.warnings[0]


def test_kaggle_dir_without_layout_is_a_dataset_error(tmp_path: Path) -> None:
    make_kaggle(tmp_path / "download" / "chest_xray", {"train": {"NORMAL": ["IM-0001-0001.jpeg"]}})
    with pytest.raises(DatasetError, match=r"\{train,val,test\}/\{NORMAL,PNEUMONIA\}") as info:
        scan_kaggle_dir(tmp_path / "download")
    assert "did you mean" in str(info.value)
    with pytest.raises(DatasetError, match="NORMAL,PNEUMONIA"):
        scan_kaggle_dir(tmp_path / "nowhere")


def test_covid_scan_filters_modality_and_view_and_labels_by_finding(tmp_path: Path) -> None:
    rows = [
        covid_row(1, "keep-pa.png", offset="0", age="61", sex="M"),
        covid_row(1, "keep-ap-supine.jpeg", view="AP Supine", offset="5", finding="COVID-19, ARDS"),
        covid_row(2, "keep-ap.jpg", view="AP", offset="", finding="Pneumonia/Viral/COVID-19", sex="F"),
        covid_row(3, "drop-ct.png", view="Axial", modality="CT"),
        covid_row(4, "sars.png", finding="SARS", age="44.5"),
        covid_row(5, "nofinding.png", finding="No Finding"),
        covid_row(6, "drop-lateral.png", view="L"),
        covid_row(7, "drop-ct-volume.png", view="Coronal", modality="CT", folder="volumes"),
        covid_row(8, "fractional.png", offset="2.5"),
        covid_row(9, "drop-todo.png", finding="todo"),
    ]
    root = make_covid(tmp_path / "covid", rows)

    scan = scan_covid_dir(root)

    kept = {Path(item.image).name: item for item in scan.items}
    expected = [
        *("fractional.png", "keep-ap-supine.jpeg", "keep-ap.jpg", "keep-pa.png"),
        *("nofinding.png", "sars.png"),
    ]
    assert sorted(kept) == expected
    assert scan.source == COVID_SOURCE and scan.eligible == 6
    assert scan.skipped_findings == {"todo": 1} and "todo 1" in scan.warnings[0]
    assert kept["keep-pa.png"].patient_id == kept["keep-ap-supine.jpeg"].patient_id == "covid:1"
    assert kept["keep-ap-supine.jpeg"].view == "AP Supine" and kept["keep-ap-supine.jpeg"].offset == 5
    assert kept["keep-ap.jpg"].offset is None and kept["fractional.png"].offset == 2.5
    labels = {name: CLASS_NAMES[item.label] for name, item in kept.items()}
    others = {"sars.png": "Pneumonia", "nofinding.png": "Normal"}
    assert labels == dict.fromkeys(expected, "COVID-19") | others
    assert all(Path(item.image).is_absolute() for item in scan.items)
    entry = kept["keep-ap.jpg"].to_json()
    assert entry["label_name"] == "COVID-19" and entry["view"] == "AP" and entry["offset"] is None
    assert entry["sex"] == "F" and "age" not in entry
    assert (kept["keep-pa.png"].age, kept["keep-pa.png"].sex) == (61, "M")
    assert (kept["sars.png"].age, kept["sars.png"].sex) == (44.5, None)

    laterals = scan_covid_dir(root, views=["L"])
    assert [Path(item.image).name for item in laterals.items] == ["drop-lateral.png"]


def test_covid_missing_files_are_counted_and_reported(tmp_path: Path) -> None:
    rows = [covid_row(p, f"img{p}.png") for p in range(6)] + [covid_row(9, "ct.png", modality="CT")]
    root = make_covid(tmp_path / "covid", rows, absent=["img1.png", "img4.png", "ct.png"])

    scan = scan_covid_dir(root)

    assert len(scan.items) == 4 and scan.eligible == 6
    assert scan.missing_lines == [3, 6]  # CSV lines: the header is line 1, img1 is line 3
    assert scan.summary()["missing"] == 2
    assert len(scan.warnings) == 1 and "2 of 6 eligible rows" in scan.warnings[0]
    assert "metadata.csv lines 3, 6" in scan.warnings[0]


def test_covid_dir_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"metadata\.csv and an images/ folder"):
        scan_covid_dir(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "metadata.csv").write_text("patientid,finding,filename\n1,COVID-19,a.png\n")
    with pytest.raises(DatasetError, match="lacks column"):
        scan_covid_dir(tmp_path)


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_site_csv_with_patient_ids_and_class_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    for name in ("a1.png", "a2.png", "b1.jpg"):
        write_image(site / "img" / name)
    absolute = write_image(tmp_path / "elsewhere" / "c1.png")
    csv_path = _write_csv(
        site / "hospital_a.csv",
        ["image", "label", "patient_id"],
        [
            ["img/a1.png", "COVID-19", "P1"],
            ["img/a2.png", "covid-19", "P1"],
            ["img/b1.jpg", "Pneumonia", "P2"],
            [str(absolute), "Normal", "P3"],
            ["img/missing.png", "Normal", "P4"],
        ],
    )
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative paths resolve against the CSV's folder, not the cwd

    scan = scan_site_csv(csv_path)

    assert scan.source == "site:hospital_a"
    assert [Path(item.image) for item in scan.items] == [
        site / "img" / "a1.png",
        site / "img" / "a2.png",
        site / "img" / "b1.jpg",
        absolute,
    ]
    assert [item.label for item in scan.items] == [COVID, COVID, PNEUMONIA, NORMAL]
    assert [item.patient_id for item in scan.items] == [
        "hospital_a:P1",
        "hospital_a:P1",
        "hospital_a:P2",
        "hospital_a:P3",
    ]
    assert scan.missing_lines == [6] and scan.eligible == 5
    assert len(scan.warnings) == 1 and "hospital_a.csv lines 6" in scan.warnings[0]


def test_site_csv_without_patient_ids_uses_one_patient_per_image(tmp_path: Path) -> None:
    for name in ("x.png", "y.png", "z.png"):
        write_image(tmp_path / name)
    csv_path = _write_csv(
        tmp_path / "clinic.csv", ["image", "label"], [["x.png", "0"], ["y.png", "1"], ["z.png", "2"]]
    )

    scan = scan_site_csv(csv_path)

    assert [item.label for item in scan.items] == [0, 1, 2]
    assert len({item.patient_id for item in scan.items}) == 3
    assert all(item.patient_id.startswith("clinic:") for item in scan.items)
    assert len(scan.warnings) == 1 and "no patient_id column" in scan.warnings[0]
    assert "own patient" in scan.warnings[0]


def test_site_csv_empty_patient_cells_warn(tmp_path: Path) -> None:
    write_image(tmp_path / "x.png")
    write_image(tmp_path / "y.png")
    csv_path = _write_csv(
        tmp_path / "s.csv",
        ["image", "label", "patient_id"],
        [["x.png", "Normal", ""], ["y.png", "Normal", "7"]],
    )
    scan = scan_site_csv(csv_path)
    assert scan.items[1].patient_id == "s:7"
    assert (
        len(scan.warnings) == 1
        and "empty patient_id" in scan.warnings[0]
        and "1 image(s)" in scan.warnings[0]
    )


@pytest.mark.parametrize(
    ("header", "row", "message"),
    [
        (["image", "label"], ["x.png", "Tuberculosis"], "line 2: label 'Tuberculosis' is not one of"),
        (["image", "label"], ["x.png", "3"], "line 2: label '3'"),
        (["image", "label"], ["", "Normal"], "line 2: empty image path"),
        (["path", "label"], ["x.png", "Normal"], "lacks column"),
    ],
)
def test_site_csv_errors(tmp_path: Path, header: list[str], row: list[str], message: str) -> None:
    write_image(tmp_path / "x.png")
    with pytest.raises(DatasetError, match=message):
        scan_site_csv(_write_csv(tmp_path / "bad.csv", header, [row]))


def test_site_csv_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a file"):
        scan_site_csv(tmp_path / "absent.csv")


@pytest.mark.parametrize(
    ("text", "index"),
    [
        ("COVID-19", 0),
        ("normal", 1),
        (" PNEUMONIA ", 2),
        ("0", 0),
        ("2", 2),
        ("3", None),
        ("-1", None),
        ("", None),
    ],
)
def test_parse_label(text: str, index: int | None) -> None:
    assert parse_label(text) == index


def test_site_csv_name_age_and_sex(tmp_path: Path) -> None:
    write_image(tmp_path / "site" / "a.png")
    write_image(tmp_path / "site" / "b.png")
    path = _write_csv(
        tmp_path / "site" / "labels.csv",
        ["image", "label", "patient_id", "age", "sex"],
        [["a.png", "Normal", "1", "70", "female"], ["b.png", "Pneumonia", "2", "", ""]],
    )
    scan = scan_site_csv(site_csv(f"nih-chestxray8={path}"))
    assert scan.source == "site:nih-chestxray8"
    a, b = scan.items
    assert (a.patient_id, a.age, a.sex) == ("nih-chestxray8:1", 70, "F")
    assert (b.age, b.sex) == (None, None) and "age" not in b.to_json() and "sex" not in b.to_json()
    assert a.to_json()["age"] == 70 and a.to_json()["sex"] == "F"
    assert scan_site_csv(path).source == "site:labels", "a bare path is named after its stem"


@pytest.mark.parametrize(
    ("age", "sex", "message"),
    [("old", "", "age is not a number"), ("200", "", "age is not a number"), ("", "x", "sex is not one of")],
)
def test_site_csv_bad_age_or_sex_names_the_line_not_the_value(
    tmp_path: Path, age: str, sex: str, message: str
) -> None:
    path = _write_csv(tmp_path / "s.csv", ["image", "label", "age", "sex"], [["a.png", "Normal", age, sex]])
    with pytest.raises(DatasetError, match=message) as info:
        scan_site_csv(path)
    assert "line 2" in str(info.value)
    assert not any(value and f"{value!r}" in str(info.value) for value in (age, sex))


def test_site_csv_bad_name(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="site name"):
        site_csv(f"bad name={tmp_path / 'x.csv'}")
