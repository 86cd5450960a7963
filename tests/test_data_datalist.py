"""Reading the datalist back: validation, folds, test items, counts, atomic writes, MONAI compatibility."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from data_layouts import synthetic_public_data
from monai.data import load_decathlon_datalist

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data import (
    PrepareOptions,
    assemble_dataset,
    count_table,
    get_test_items,
    items_for_fold,
    load_datalist,
    write_prepared,
)
from cxr_monai.errors import DatasetError


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
