"""Per-class capping by patient, and the patient-grouped stratified test split and folds (no files needed)."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data.sources import DataItem
from cxr_monai.data.splits import assign_splits, outer_fold_count, subsample_per_class
from cxr_monai.errors import DatasetError


def make_items(patients_per_class: tuple[int, ...], seed: int = 0, max_images: int = 4) -> list[DataItem]:
    """Items of ``patients_per_class[label]`` patients per class, each with 1..max_images images."""
    rng = np.random.default_rng(seed)
    items = []
    for label, count in enumerate(patients_per_class):
        for patient in range(count):
            for k in range(int(rng.integers(1, max_images + 1))):
                items.append(
                    DataItem(f"/data/{label}/{patient}/{k}.png", label, f"p{label}-{patient}", "test")
                )
    return items


def split_members(items: list[DataItem], assignment: list[int | None]) -> dict[str, set[str]]:
    """Patients of each split: "test" and "fold_k"."""
    members: dict[str, set[str]] = defaultdict(set)
    for item, fold in zip(items, assignment, strict=True):
        members["test" if fold is None else f"fold_{fold}"].add(item.patient_id)
    return members


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("test_fraction", "folds"), [(0.2, 5), (0.25, 3), (0.1, 4)])
def test_no_patient_in_two_splits(seed: int, test_fraction: float, folds: int) -> None:
    items = make_items((40, 35, 50), seed=seed)
    assignment = assign_splits(items, test_fraction, folds, seed)
    members = split_members(items, assignment)
    assert set(members) == {"test"} | {f"fold_{k}" for k in range(folds)}
    names = list(members)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not members[a] & members[b], f"patients shared by {a} and {b}"
    assert set().union(*members.values()) == {item.patient_id for item in items}


@pytest.mark.parametrize("seed", range(3))
def test_splits_are_stratified(seed: int) -> None:
    items = make_items((60, 60, 90), seed=seed, max_images=3)
    assignment = assign_splits(items, 0.2, 5, seed)
    per_class = Counter(item.label for item in items)
    test = Counter(item.label for item, fold in zip(items, assignment, strict=True) if fold is None)
    for label, total in per_class.items():
        assert 0.15 <= test[label] / total <= 0.25, CLASS_NAMES[label]
    training = [(item.label, fold) for item, fold in zip(items, assignment, strict=True) if fold is not None]
    for label in per_class:
        sizes = [sum(1 for lab, f in training if lab == label and f == fold) for fold in range(5)]
        assert max(sizes) - min(sizes) <= 0.25 * np.mean(sizes) + 2, (CLASS_NAMES[label], sizes)


def test_splits_are_deterministic_under_the_seed() -> None:
    items = make_items((30, 30, 30))
    first = assign_splits(items, 0.2, 5, seed=3)
    assert assign_splits(items, 0.2, 5, seed=3) == first
    assert assign_splits(items, 0.2, 5, seed=4) != first


def test_outer_fold_count() -> None:
    assert outer_fold_count(0.2) == 5
    assert outer_fold_count(0.3) == 3
    assert outer_fold_count(0.5) == 2
    for bad in (0.0, 1.0, -0.1, 0.8):
        with pytest.raises(DatasetError, match="--test-fraction"):
            outer_fold_count(bad)


def test_split_option_errors() -> None:
    items = make_items((10, 10, 10))
    with pytest.raises(DatasetError, match="--folds must be at least 2"):
        assign_splits(items, 0.2, 1, 0)
    with pytest.raises(DatasetError, match="no images"):
        assign_splits([], 0.2, 5, 0)


def test_too_few_patients_for_the_test_split() -> None:
    items = make_items((10, 3, 10))
    with pytest.raises(DatasetError, match="Normal has 3 patient"):
        assign_splits(items, 0.2, 2, 0)


def test_too_few_patients_left_for_the_folds() -> None:
    items = make_items((20, 6, 20))
    with pytest.raises(DatasetError, match=r"Normal has [45] patient\(s\) left for training.*--folds 6"):
        assign_splits(items, 0.2, 6, 0)


def test_cap_takes_whole_patients_and_the_exact_count() -> None:
    items = make_items((0, 50, 40), max_images=3)
    kept, report, warnings = subsample_per_class(items, {0: None, 1: 31, 2: None}, seed=0)
    normal = [item for item in kept if item.label == 1]
    assert len(normal) == 31
    available = Counter(item.patient_id for item in items if item.label == 1)
    taken = Counter(item.patient_id for item in normal)
    partial = [patient for patient, count in taken.items() if count < available[patient]]
    assert len(partial) <= 1, "at most the last patient is cut"
    assert report["Normal"].requested == 31 and report["Normal"].taken == 31
    assert report["Normal"].available == sum(available.values())
    assert [item for item in kept if item.label == 2] == [item for item in items if item.label == 2]
    assert not warnings
    assert kept == [item for item in items if item in set(kept)], "input order kept"


def test_cap_is_seeded_and_per_class() -> None:
    items = make_items((30, 30, 30))
    a, _, _ = subsample_per_class(items, {0: 20, 1: 20, 2: 20}, seed=1)
    b, _, _ = subsample_per_class(items, {0: 20, 1: 20, 2: 20}, seed=1)
    c, _, _ = subsample_per_class(items, {0: 20, 1: 20, 2: 20}, seed=2)
    assert a == b and a != c
    # changing one class's cap leaves the other classes' samples as they were
    d, _, _ = subsample_per_class(items, {0: 20, 1: 25, 2: 20}, seed=1)
    assert [i for i in a if i.label != 1] == [i for i in d if i.label != 1]


def test_cap_above_available_takes_all_and_warns() -> None:
    items = make_items((5, 8, 0), max_images=1)
    kept, report, warnings = subsample_per_class(items, {0: None, 1: 300, 2: 300}, seed=0)
    assert kept == items
    assert report["Normal"].available == 8 and report["Normal"].taken == 8
    assert report["Pneumonia"].available == 0
    assert any("Normal: only 8 images available" in w and "300" in w for w in warnings)
    assert any("Pneumonia: only 0" in w for w in warnings)
    assert not any(w.startswith("COVID-19") for w in warnings)


def test_negative_cap_is_an_error() -> None:
    with pytest.raises(DatasetError, match=">= 0"):
        subsample_per_class(make_items((3, 3, 3)), {0: -1}, seed=0)
