"""Seeded per-class subsampling by patient; patient-grouped stratified test split and CV folds."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data.sources import DataItem
from cxr_monai.errors import DatasetError


@dataclass(frozen=True)
class ClassSample:
    """How many images of one class were requested (None = all), available and taken."""

    requested: int | None
    available: int
    taken: int


def subsample_per_class(
    items: Sequence[DataItem], caps: dict[int, int | None], seed: int
) -> tuple[list[DataItem], dict[str, ClassSample], list[str]]:
    """At most ``caps[label]`` images per class (None = all), chosen by whole patients, seeded.

    Patients of the class are shuffled (``numpy.random.default_rng([seed, label])``, so one class's cap does
    not change another's sample) and taken whole until the cap is reached; the last patient contributes only
    the images still needed. When fewer images exist than requested all are taken and a warning says so.
    Returns the kept items in their input order, the per-class numbers and the warnings.
    """
    keep: set[int] = set()
    report: dict[str, ClassSample] = {}
    warnings: list[str] = []
    for label, name in enumerate(CLASS_NAMES):
        indices = [i for i, item in enumerate(items) if item.label == label]
        cap = caps.get(label)
        if cap is not None and cap < 0:
            raise DatasetError(f"the number of {name} images must be >= 0, got {cap}")
        if cap is None or len(indices) <= cap:
            keep.update(indices)
            report[name] = ClassSample(cap, len(indices), len(indices))
            if cap is not None and len(indices) < cap:
                warnings.append(
                    f"{name}: only {len(indices)} images available, fewer than the {cap} requested; all taken"
                )
            continue
        by_patient: dict[str, list[int]] = defaultdict(list)
        for i in indices:
            by_patient[items[i].patient_id].append(i)
        patients = list(by_patient)
        order = np.random.default_rng([seed, label]).permutation(len(patients))
        taken = 0
        for position in order:
            chosen = by_patient[patients[position]][: cap - taken]
            keep.update(chosen)
            taken += len(chosen)
            if taken == cap:
                break
        report[name] = ClassSample(cap, len(indices), taken)
    return [item for i, item in enumerate(items) if i in keep], report, warnings


def _groups_per_class(
    items: Sequence[DataItem], groups: Sequence[str], indices: Sequence[int]
) -> dict[int, int]:
    members: dict[int, set[str]] = defaultdict(set)
    for i in indices:
        members[items[i].label].add(groups[i])
    return {label: len(ids) for label, ids in members.items()}


def outer_fold_count(test_fraction: float) -> int:
    """Number of patient-grouped folds of which one is the test split: round(1 / test_fraction), >= 2."""
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"--test-fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    count = round(1.0 / test_fraction)
    if count < 2:
        raise DatasetError(
            f"--test-fraction {test_fraction} leaves round(1 / {test_fraction}) = {count} fold(s); "
            "it must be at most 0.66 so that something remains for training"
        )
    return count


def _check_patients(
    items: Sequence[DataItem], groups: Sequence[str], indices: Sequence[int], needed: int, what: str
) -> None:
    for label, count in sorted(_groups_per_class(items, groups, indices).items()):
        if count < needed:
            raise DatasetError(
                f"{CLASS_NAMES[label]} has {count} patient(s) {what}, fewer than the {needed} needed; "
                "add data or lower --folds / raise --test-fraction"
            )


def _grouped_folds(
    items: Sequence[DataItem], groups: Sequence[str], indices: Sequence[int], n_splits: int, seed: int
) -> list[int]:
    """Fold (0..n_splits-1) of each of ``indices``: StratifiedGroupKFold on the label, grouped by
    ``groups``."""
    labels = np.array([items[i].label for i in indices])
    group_ids = np.array([groups[i] for i in indices])
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    fold_of = np.full(len(indices), -1)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(indices)), labels, group_ids)):
        fold_of[held_out] = fold
    return [int(fold) for fold in fold_of]


def assign_splits(
    items: Sequence[DataItem],
    test_fraction: float,
    folds: int,
    seed: int,
    groups: Sequence[str] | None = None,
) -> list[int | None]:
    """Split of each item: None for the test split, else its cross-validation fold 0..folds-1.

    The test split is fold 0 of round(1 / test_fraction) StratifiedGroupKFold folds (shuffled with ``seed``);
    the rest is split into ``folds`` folds the same way. Grouping by ``groups`` (default: ``patient_id``;
    prepare passes patients merged with their near-duplicates) keeps every group in exactly one split and
    one fold. DatasetError when a class has fewer groups than a split needs.
    """
    if groups is None:
        groups = [item.patient_id for item in items]
    if folds < 2:
        raise DatasetError(f"--folds must be at least 2, got {folds}")
    if not items:
        raise DatasetError("no images found in the given sources")
    n_test = outer_fold_count(test_fraction)
    everything = list(range(len(items)))
    _check_patients(items, groups, everything, n_test, f"in all, for a test split of 1 in {n_test}")
    outer = _grouped_folds(items, groups, everything, n_test, seed)
    training = [i for i in everything if outer[i] != 0]
    _check_patients(
        items, groups, training, folds, f"left for training after the test split, for --folds {folds}"
    )
    inner = _grouped_folds(items, groups, training, folds, seed)
    assignment: list[int | None] = [None] * len(items)
    for i, fold in zip(training, inner, strict=True):
        assignment[i] = fold
    return assignment
