"""Metrics against scikit-learn and hand-computed values on a hand-built confusion matrix; bootstrap
interval properties; expected calibration error on calibrated and overconfident toy data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support, recall_score, roc_auc_score

from cxr_monai.evaluation.metrics import (
    PER_CLASS_FIGURES,
    Estimate,
    binary_auroc,
    bootstrap_indices,
    classification_metrics,
    confusion_counts,
    confusion_figures,
    expected_calibration_error,
    point_figures,
    reliability_bins,
)

#: rows = true class (COVID-19, Normal, Pneumonia), columns = predicted class.
HAND_CM = np.array([[9, 1, 0], [2, 15, 3], [1, 4, 15]])


def data_from_confusion_matrix(cm: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """y_true (N,) and y_prob (N, 3) whose arg-max realises ``cm`` exactly; probabilities vary so
    the AUROC is not trivial."""
    rng = np.random.default_rng(seed)
    y_true, y_prob = [], []
    for t in range(3):
        for p in range(3):
            for _ in range(cm[t, p]):
                top = rng.uniform(0.4, 0.95)
                row = np.full(3, (1 - top) / 2)
                row[p] = top
                y_true.append(t)
                y_prob.append(row)
    return np.asarray(y_true), np.asarray(y_prob)


def test_point_figures_match_sklearn_and_hand_values() -> None:
    y_true, y_prob = data_from_confusion_matrix(HAND_CM)
    y_pred = y_prob.argmax(axis=1)
    m = classification_metrics(y_true, y_prob, n_boot=0)

    np.testing.assert_array_equal(m.confusion_matrix, HAND_CM)
    assert m.accuracy.value == pytest.approx(39 / 50)
    assert m.n_per_class == {"COVID-19": 10, "Normal": 20, "Pneumonia": 20}

    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2])
    hand = {
        "precision": [9 / 12, 15 / 20, 15 / 18],
        "recall": [9 / 10, 15 / 20, 15 / 20],
        # specificity = TN / (TN + FP): COVID-19 has 40 negatives, 3 of them called COVID-19
        "specificity": [37 / 40, 25 / 30, 27 / 30],
    }
    for c, name in enumerate(("COVID-19", "Normal", "Pneumonia")):
        figs = m.per_class[name]
        assert figs["precision"].value == pytest.approx(precision[c]) == pytest.approx(hand["precision"][c])
        assert figs["recall"].value == pytest.approx(recall[c]) == pytest.approx(hand["recall"][c])
        assert figs["f1"].value == pytest.approx(f1[c])
        specificity = recall_score(y_true != c, y_pred != c)  # specificity = recall of the negatives
        assert (
            figs["specificity"].value == pytest.approx(specificity) == pytest.approx(hand["specificity"][c])
        )
        assert figs["auroc"].value == pytest.approx(roc_auc_score(y_true == c, y_prob[:, c]))
        assert figs["precision"].ci_low is None  # n_boot=0: no intervals


def test_auroc_is_one_for_perfect_ranking_and_half_for_constant_scores() -> None:
    y_true = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.eye(3)[y_true] * 0.7 + 0.1
    assert point_figures(y_true, perfect)["auroc"] == pytest.approx([1.0, 1.0, 1.0])
    constant = np.full((6, 3), 1 / 3)
    assert point_figures(y_true, constant)["auroc"] == pytest.approx([0.5, 0.5, 0.5])


def test_binary_auroc_equals_sklearn_with_ties_and_is_nan_for_one_kind() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 7, 60):
        positive = np.r_[True, False, rng.uniform(size=n - 2) < 0.4]
        scores = rng.integers(0, 4, n) / 4.0  # many ties
        assert binary_auroc(positive, scores) == pytest.approx(roc_auc_score(positive, scores))
    assert np.isnan(binary_auroc(np.ones(4, dtype=bool), np.arange(4.0)))
    assert np.isnan(binary_auroc(np.zeros(4, dtype=bool), np.arange(4.0)))


def test_undefined_figures_are_none() -> None:
    # no Pneumonia image, and Normal never predicted
    y_true = np.array([0, 0, 1, 1])
    y_prob = np.array([[0.8, 0.1, 0.1], [0.6, 0.1, 0.3], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    m = classification_metrics(y_true, y_prob, n_boot=20)
    assert m.per_class["Pneumonia"]["auroc"].value is None
    assert m.per_class["Pneumonia"]["recall"].value is None
    assert m.per_class["Normal"]["precision"].value is None
    assert m.per_class["Pneumonia"]["precision"].value == 0.0  # predicted once, wrongly
    assert m.per_class["COVID-19"]["auroc"].value is not None


def test_interval_contains_point_and_shrinks_with_more_data() -> None:
    y_true, y_prob = data_from_confusion_matrix(HAND_CM)
    small = classification_metrics(y_true, y_prob, n_boot=150, seed=1)
    big_true, big_prob = data_from_confusion_matrix(HAND_CM * 8, seed=2)
    big = classification_metrics(big_true, big_prob, n_boot=150, seed=1)
    for m in (small, big):
        estimates = [m.accuracy, *(m.per_class[c][f] for c in m.per_class for f in PER_CLASS_FIGURES)]
        for est in estimates:
            assert est.ci_low is not None and est.ci_high is not None
            assert est.ci_low <= est.value <= est.ci_high
    assert big.accuracy.value == pytest.approx(small.accuracy.value)
    width = lambda e: e.ci_high - e.ci_low  # noqa: E731
    assert width(big.accuracy) < 0.6 * width(small.accuracy)  # ~ 1/sqrt(8) ≈ 0.35 expected
    assert width(big.per_class["COVID-19"]["recall"]) < width(small.per_class["COVID-19"]["recall"])
    assert small.bootstrap == {
        "method": "percentile",
        "n_resamples": 150,
        "confidence": 0.95,
        "seed": 1,
        "unit": "image",
    }


def test_bootstrap_is_seeded() -> None:
    y_true, y_prob = data_from_confusion_matrix(HAND_CM)
    a = classification_metrics(y_true, y_prob, n_boot=50, seed=3)
    b = classification_metrics(y_true, y_prob, n_boot=50, seed=3)
    c = classification_metrics(y_true, y_prob, n_boot=50, seed=4)
    assert a.accuracy == b.accuracy
    assert a.accuracy != c.accuracy


def test_cluster_bootstrap_keeps_patients_whole_and_widens_intervals_for_repeated_images() -> None:
    groups = ["p0", "p0", "p1", "p2", "p2", "p2"]
    for idx in bootstrap_indices(6, 20, seed=0, groups=groups):
        drawn = [groups[i] for i in idx]
        for patient in set(drawn):  # a drawn patient brings all of its images, as often as drawn
            assert drawn.count(patient) % groups.count(patient) == 0

    # each patient's image counted 5 times: by image the copies look independent (too narrow)
    y_true, y_prob = data_from_confusion_matrix(HAND_CM)
    rep_true, rep_prob = np.repeat(y_true, 5), np.repeat(y_prob, 5, axis=0)
    patients = np.repeat(np.arange(len(y_true)), 5)
    by_image = classification_metrics(rep_true, rep_prob, n_boot=150)
    by_patient = classification_metrics(rep_true, rep_prob, n_boot=150, groups=patients.tolist())
    assert by_patient.bootstrap["unit"] == "patient"
    wide = by_patient.accuracy.ci_high - by_patient.accuracy.ci_low
    narrow = by_image.accuracy.ci_high - by_image.accuracy.ci_low
    assert wide > 1.5 * narrow


def _calibrated_toy(n: int, overconfident: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-label probability c; the top class is right with probability c (calibrated) or with
    probability c - 0.35 (overconfident)."""
    rng = np.random.default_rng(seed)
    top = rng.uniform(0.5, 1.0, n)
    predicted = rng.integers(0, 3, n)
    y_prob = np.repeat(((1 - top) / 2)[:, None], 3, axis=1)
    y_prob[np.arange(n), predicted] = top
    p_right = top - 0.35 if overconfident else top
    right = rng.uniform(size=n) < p_right
    other = (predicted + rng.integers(1, 3, n)) % 3
    return np.where(right, predicted, other), y_prob


def test_ece_small_when_calibrated_and_equal_to_the_gap_when_overconfident() -> None:
    assert expected_calibration_error(*_calibrated_toy(20_000, overconfident=False)) < 0.02
    assert expected_calibration_error(*_calibrated_toy(20_000, overconfident=True)) == pytest.approx(
        0.35, abs=0.02
    )


def test_ece_by_hand() -> None:
    # bin (0.6, 0.667]: confidences 0.65, 0.65, one right -> |0.5 - 0.65| with weight 1/2
    # bin (0.933, 1.0]: confidences 0.95, 0.95, both right -> |1 - 0.95| with weight 1/2
    y_prob = np.array([[0.65, 0.2, 0.15], [0.65, 0.2, 0.15], [0.95, 0.03, 0.02], [0.02, 0.95, 0.03]])
    y_true = np.array([0, 1, 0, 1])
    assert expected_calibration_error(y_true, y_prob) == pytest.approx(0.5 * 0.15 + 0.5 * 0.05)
    bins = reliability_bins(y_true, y_prob)
    assert bins.counts.sum() == 4 and bins.counts[9] == 2 and bins.counts[14] == 2
    assert bins.accuracy[9] == 0.5 and np.isnan(bins.accuracy[0])


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="expected y_true"):
        point_figures(np.array([0, 1]), np.ones((3, 3)) / 3)
    with pytest.raises(ValueError, match="labels"):
        point_figures(np.array([0, 3]), np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="no predictions"):
        point_figures(np.array([], dtype=int), np.ones((0, 3)))


def test_estimate_format() -> None:
    assert Estimate(0.95, 0.9, 0.98).format(2) == "0.95 [0.90, 0.98]"
    assert Estimate(None).format() == "n/a"
    assert Estimate(0.5).format(1) == "0.5"


def test_confusion_figures_equal_sklearn_also_where_a_class_is_absent_or_never_called() -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix

    rng = np.random.default_rng(3)
    cases = [(rng.integers(0, 3, 40), rng.integers(0, 3, 40)) for _ in range(20)]
    cases += [
        (np.array([0, 0, 1, 1]), np.array([0, 2, 0, 2])),  # Normal never called, Pneumonia absent
        (np.array([2, 2, 2]), np.array([2, 2, 2])),  # one class only
        (np.array([0, 1]), np.array([1, 0])),  # nothing right
    ]
    for y_true, y_pred in cases:
        cm = confusion_counts(y_true, y_pred, 3)
        np.testing.assert_array_equal(cm, confusion_matrix(y_true, y_pred, labels=[0, 1, 2]))
        figures = confusion_figures(cm)
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=[0, 1, 2], average=None, zero_division=np.nan
        )
        np.testing.assert_array_equal(figures["precision"], precision)
        np.testing.assert_array_equal(figures["recall"], recall)
        np.testing.assert_array_equal(figures["f1"], f1)
        assert figures["accuracy"][0] == accuracy_score(y_true, y_pred)
        for c in range(3):
            negatives = y_true != c
            expected = recall_score(negatives, y_pred != c) if negatives.any() else np.nan
            np.testing.assert_array_equal(figures["specificity"][c], expected)
