"""Reading the datalist back: validation, folds, test items, counts, atomic writes, MONAI compatibility."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from data_layouts import synthetic_public_data, write_image
from monai.bundle import ConfigParser
from monai.data import load_decathlon_datalist
from typer.testing import CliRunner

from cxr_monai.cli import app
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data import (
    PrepareOptions,
    assemble_dataset,
    count_table,
    get_test_items,
    items_for_fold,
    load_datalist,
    site_csv,
    write_prepared,
)
from cxr_monai.errors import DatasetError
from cxr_monai.training import fold_items


@pytest.fixture(scope="module")
def datalist_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    covid, kaggle = synthetic_public_data(root, patients_per_class=12)
    prepared = assemble_dataset(PrepareOptions(covid_dir=covid, kaggle_dir=kaggle, folds=3, seed=1))
    path, _ = write_prepared(prepared, root / "out")
    return path


def test_load_datalist_round_trip(datalist_path: Path) -> None:
    datalist = load_datalist(datalist_path)
    assert datalist["class_names"] == list(CLASS_NAMES)
    assert datalist["labels"] == {"0": "COVID-19", "1": "Normal", "2": "Pneumonia"}
    assert datalist["num_folds"] == 3 and datalist["seed"] == 1
    assert {item["fold"] for item in datalist["training"]} == {0, 1, 2}
    assert all("fold" not in item for item in datalist["test"])


def test_items_for_fold_partitions_the_training_split(datalist_path: Path) -> None:
    datalist = load_datalist(datalist_path)
    for fold in range(3):
        train, val = items_for_fold(datalist, fold)
        assert val and all(item["fold"] == fold for item in val)
        assert train and all(item["fold"] != fold for item in train)
        assert len(train) + len(val) == len(datalist["training"])
        assert not {i["patient_id"] for i in train} & {i["patient_id"] for i in val}
    everything, none = items_for_fold(datalist, None)
    assert everything == datalist["training"] and none == []
    for bad in (-1, 3):
        with pytest.raises(DatasetError, match=r"folds 0\.\.2"):
            items_for_fold(datalist, bad)


def test_get_test_items(datalist_path: Path) -> None:
    datalist = load_datalist(datalist_path)
    test = get_test_items(datalist)
    assert test == datalist["test"] and test
    training_patients = {item["patient_id"] for item in datalist["training"]}
    assert not training_patients & {item["patient_id"] for item in test}


def test_count_table_matches_items(datalist_path: Path) -> None:
    datalist = load_datalist(datalist_path)
    counts = count_table(datalist)
    for label, name in enumerate(CLASS_NAMES):
        row = counts["images"][name]
        assert row["test"] == sum(1 for item in datalist["test"] if item["label"] == label)
        assert row["fold_1"] == sum(1 for i in datalist["training"] if i["label"] == label and i["fold"] == 1)
        assert row["training"] == sum(row[f"fold_{k}"] for k in range(3))
        assert row["total"] == row["training"] + row["test"]
        patients = counts["patients"][name]
        assert patients["total"] == patients["training"] + patients["test"]  # patient-disjoint splits
    assert counts["images"]["Total"]["total"] == len(datalist["training"]) + len(datalist["test"])


def test_monai_reads_the_datalist(datalist_path: Path) -> None:
    training = load_decathlon_datalist(str(datalist_path), is_segmentation=False, data_list_key="training")
    test = load_decathlon_datalist(str(datalist_path), is_segmentation=False, data_list_key="test")
    datalist = load_datalist(datalist_path)
    assert [item["image"] for item in training] == [item["image"] for item in datalist["training"]]
    assert len(test) == len(datalist["test"])
    assert all(Path(item["image"]).is_file() for item in training + test)


def _write(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"training": []}, "lacks the 'training' and 'test' lists"),
        ({"training": [], "test": [], "class_names": ["Normal", "COVID-19"]}, "has class_names"),
        (
            {
                "training": [{"image": "a", "label": 0, "patient_id": "p"}],
                "test": [],
                "class_names": list(CLASS_NAMES),
            },
            "training item 0 lacks fold",
        ),
        (
            {"training": [], "test": [{"image": "a", "label": 0}], "class_names": list(CLASS_NAMES)},
            "test item 0 lacks patient_id",
        ),
    ],
)
def test_load_datalist_rejects_bad_content(tmp_path: Path, content: dict[str, Any], message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        load_datalist(_write(tmp_path / "datalist.json", content))


def test_load_datalist_missing_or_not_json(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cxr-monai prepare"):
        load_datalist(tmp_path / "absent.json")
    (tmp_path / "broken.json").write_text('{"training": [')
    with pytest.raises(DatasetError, match="not readable JSON"):
        load_datalist(tmp_path / "broken.json")


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A datalist of covid-chestxray-dataset, Kaggle and a site CSV named ``nih``."""
    root = tmp_path_factory.mktemp("three")
    covid, kaggle = synthetic_public_data(root, patients_per_class=12)
    site = root / "nih" / "labels.csv"
    for k in range(16):
        write_image(site.parent / f"{k}.png")
    site.write_text("image,label,patient_id\n" + "".join(f"{k}.png,{1 + k % 2},{k}\n" for k in range(16)))
    options = PrepareOptions(
        covid_dir=covid, kaggle_dir=kaggle, site_csvs=(site_csv(f"nih={site}"),), folds=3
    )
    path, _ = write_prepared(assemble_dataset(options), root / "out")
    return path


@pytest.mark.parametrize("excluded", [["site:nih"], ["site:nih", "kaggle-chest-xray"]])
def test_exclude_source_leaves_no_item_of_it_in_training_or_validation(
    three_sources: Path, excluded: list[str]
) -> None:
    datalist = load_datalist(three_sources)
    source_of = {item["image"]: item["source"] for item in datalist["training"] + datalist["test"]}
    for fold in (-1, 0, 1, 2):
        for role in ("train", "validate"):
            kept = fold_items(str(three_sources), fold, role, excluded)
            assert all(set(item) == {"image", "label"} for item in kept)
            assert not {source_of[item["image"]] for item in kept} & set(excluded)
            everything = fold_items(str(three_sources), fold, role)
            assert len(kept) < len(everything) or not everything
    test = fold_items(str(three_sources), -1, "test", excluded)
    assert {source_of[item["image"]] for item in test} >= set(excluded), "the left-out source is still scored"


def test_exclude_unknown_source_names_the_sources_present(three_sources: Path) -> None:
    with pytest.raises(
        DatasetError, match="its sources are covid-chestxray-dataset, kaggle-chest-xray, site:nih"
    ):
        fold_items(str(three_sources), 0, "train", ["nih"])


def test_bundle_config_passes_exclude_sources(three_sources: Path) -> None:
    parser = ConfigParser()
    parser.read_config(Path(__file__).resolve().parents[1] / "bundles/cxr_classifier/configs/train.json")
    parser.update({"datalist": str(three_sources), "fold": 0, "exclude_sources": ["site:nih"]})
    train = parser.get_parsed_content("train#dataset#data")
    assert train == fold_items(str(three_sources), 0, "train", ["site:nih"])
    parser.update({"exclude_sources": []})
    parser.parse(reset=True)
    assert len(parser.get_parsed_content("train#dataset#data")) > len(train)


def test_train_cli_refuses_an_unknown_source_before_training(three_sources: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["train", "--datalist", str(three_sources), "--out", str(tmp_path / "t"), "--exclude-source", "nope"],
    )
    assert result.exit_code == 1 and "its sources are" in result.output
    assert not (tmp_path / "t").exists()


def test_relative_image_paths_resolve_against_the_datalist_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decathlon semantics (``monai.data.load_decathlon_datalist``), the same for training and the GAN."""
    from cxr_monai.training.datalists import fold_items

    folder = tmp_path / "site"
    folder.mkdir()
    item = {"label": 0, "label_name": "COVID-19", "patient_id": "p", "source": "s"}
    doc = {
        "class_names": list(CLASS_NAMES),
        "training": [{**item, "image": "img/a.png", "fold": 0}, {**item, "image": "img/b.png", "fold": 1}],
        "test": [{**item, "image": "img/c.png"}],
    }
    (folder / "datalist.json").write_text(json.dumps(doc))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working folder must not matter
    expected = load_decathlon_datalist(
        str(folder / "datalist.json"), is_segmentation=False, data_list_key="test"
    )
    assert fold_items(str(folder / "datalist.json"), -1, "test") == [
        {"image": expected[0]["image"], "label": 0}
    ]
    assert [i["image"] for i in fold_items(str(folder / "datalist.json"), 0, "train")] == [
        str(folder / "img" / "b.png")
    ]
