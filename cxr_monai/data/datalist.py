"""The MONAI datalist JSON written by ``cxr-monai prepare``: reading it back, folds, counts.

Layout (a MONAI "decathlon-style" datalist, readable by ``monai.data.load_decathlon_datalist``)::

    {"class_names": ["COVID-19", "Normal", "Pneumonia"], "labels": {"0": "COVID-19", ...},
     "num_folds": 5, "seed": 0, "test_fraction": 0.2,
     "training": [{"image": "/abs/path.png", "label": 0, "label_name": "COVID-19", "patient_id": "covid:19",
                   "source": "covid-chestxray-dataset", "offset": 3, "view": "PA", "fold": 2}, ...],
     "test": [{...same keys, no "fold"...}, ...]}
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.errors import DatasetError

DATALIST_FILENAME = "datalist.json"
SUMMARY_FILENAME = "prepare_summary.json"
_ITEM_KEYS = ("image", "label", "patient_id")


def load_datalist(path: str | Path) -> dict[str, Any]:
    """Read and check a datalist written by ``cxr-monai prepare``.

    Relative ``image`` paths are resolved against the datalist's folder, as
    ``monai.data.load_decathlon_datalist`` resolves them, so training, the GAN and evaluation read the
    same files from the same datalist.

    Raises DatasetError when the file is missing or not JSON, lacks ``training``/``test`` lists, an item
    lacks image/label/patient_id (or, in ``training``, an integer ``fold``) or its label is not a class
    index, or its ``class_names`` differ from :data:`cxr_monai.constants.CLASS_NAMES`.
    """
    path = Path(path)
    try:
        datalist = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DatasetError(f"datalist {path} not found; build it with `cxr-monai prepare`") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"datalist {path} is not readable JSON: {exc}") from exc
    if not isinstance(datalist, dict) or not all(
        isinstance(datalist.get(key), list) for key in ("training", "test")
    ):
        raise DatasetError(f"datalist {path} lacks the 'training' and 'test' lists")
    if datalist.get("class_names") != list(CLASS_NAMES):
        raise DatasetError(
            f"datalist {path} has class_names {datalist.get('class_names')}; expected {list(CLASS_NAMES)}"
        )
    for key in ("training", "test"):
        for number, item in enumerate(datalist[key]):
            absent = [name for name in _ITEM_KEYS if not isinstance(item, dict) or name not in item]
            if key == "training" and isinstance(item, dict) and not isinstance(item.get("fold"), int):
                absent.append("fold")
            if absent:
                raise DatasetError(f"datalist {path}: {key} item {number} lacks {', '.join(absent)}")
            label = item["label"]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(CLASS_NAMES):
                raise DatasetError(
                    f"datalist {path}: {key} item {number}: 'label' must be a class index "
                    f"0..{len(CLASS_NAMES) - 1} ({', '.join(CLASS_NAMES)})"
                )
            image = Path(str(item["image"]))
            item["image"] = str(image if image.is_absolute() else path.parent.resolve() / image)
    return datalist


def num_folds(datalist: dict[str, Any]) -> int:
    """Number of cross-validation folds: ``num_folds`` if recorded, else one more than the largest fold."""
    recorded = datalist.get("num_folds")
    if isinstance(recorded, int):
        return recorded
    return 1 + max((item["fold"] for item in datalist["training"]), default=-1)


def items_for_fold(
    datalist: dict[str, Any], fold: int | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train items, validation items) for cross-validation fold ``fold``: validation = items with that fold.

    ``fold=None`` gives all training items and no validation items (a final model on the whole training
    split). DatasetError when ``fold`` is not in 0..num_folds-1.
    """
    training = list(datalist["training"])
    if fold is None:
        return training, []
    folds = num_folds(datalist)
    if not 0 <= fold < folds:
        raise DatasetError(f"fold {fold} does not exist; this datalist has folds 0..{folds - 1}")
    return [item for item in training if item["fold"] != fold], [
        item for item in training if item["fold"] == fold
    ]


def get_test_items(datalist: dict[str, Any]) -> list[dict[str, Any]]:
    """The held-out test items (never used for training or model selection)."""
    return list(datalist["test"])


def _split_names(datalist: dict[str, Any]) -> list[str]:
    return [f"fold_{fold}" for fold in range(num_folds(datalist))] + ["training", "test", "total"]


def count_table(datalist: dict[str, Any]) -> dict[str, dict[str, dict[str, int]]]:
    """Images and distinct patients per class and split.

    Returns ``{"images": {class or "Total": {"fold_0": n, ..., "training": n, "test": n, "total": n}},
    "patients": {...same...}}``.
    """
    members: dict[tuple[str, str], list[str]] = defaultdict(list)
    for split, items in (("training", datalist["training"]), ("test", datalist["test"])):
        for item in items:
            names = [split, "total"] + ([f"fold_{item['fold']}"] if split == "training" else [])
            for row in (CLASS_NAMES[item["label"]], "Total"):
                for name in names:
                    members[row, name].append(item["patient_id"])
    rows = [*CLASS_NAMES, "Total"]
    columns = _split_names(datalist)
    return {
        "images": {row: {col: len(members[row, col]) for col in columns} for row in rows},
        "patients": {row: {col: len(set(members[row, col])) for col in columns} for row in rows},
    }


def datalist_document(
    train_items: Sequence[dict[str, Any]],
    test: Sequence[dict[str, Any]],
    folds: int,
    seed: int,
    test_fraction: float,
) -> dict[str, Any]:
    """The datalist JSON object; ``train_items`` already carry their ``fold``."""
    return {
        "description": "cxr-monai datalist: patient-disjoint test split and cross-validation folds",
        "class_names": list(CLASS_NAMES),
        "labels": {str(index): name for index, name in enumerate(CLASS_NAMES)},
        "num_folds": folds,
        "seed": seed,
        "test_fraction": test_fraction,
        "training": list(train_items),
        "test": list(test),
    }
