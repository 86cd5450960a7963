"""Classification figures with bootstrap confidence intervals, and calibration.

Inputs everywhere: ``y_true`` int array (N,) of class indices, ``y_prob`` float array (N, K) of class
probabilities (rows sum to 1; the predicted class is the arg-max).

Figures: accuracy; per class precision (PPV), recall (sensitivity), specificity, F1 and one-vs-rest AUROC
(the Mann-Whitney statistic, equal to scikit-learn's; specificity from the confusion matrix); the
confusion matrix (rows = true class, columns = predicted class); top-label expected calibration error.
A figure that is undefined on the data (AUROC of a class with no images, precision of a class never
predicted) is ``None``.

Confidence intervals: percentile bootstrap (Efron), seeded. Images are resampled with replacement; when
``groups`` (patient ids) are given, whole patients are resampled instead (cluster bootstrap), which is
the honest choice when a patient contributes several images: their images are not independent. A
replicate in which a figure is undefined (e.g. no image of a class drawn) is left out of that figure's
interval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import confusion_matrix

from cxr_monai.constants import CLASS_NAMES

#: Per-class figures, in report order.
PER_CLASS_FIGURES: tuple[str, ...] = ("precision", "recall", "specificity", "f1", "auroc")
DEFAULT_N_BOOT = 2000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_ECE_BINS = 15


@dataclass(frozen=True)
class Estimate:
    """A figure with its bootstrap confidence interval; any part is None when undefined."""

    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high}

    def format(self, digits: int = 3) -> str:
        """``0.950 [0.910, 0.980]``, or ``n/a``."""
        if self.value is None:
            return "n/a"
        text = f"{self.value:.{digits}f}"
        if self.ci_low is not None and self.ci_high is not None:
            text += f" [{self.ci_low:.{digits}f}, {self.ci_high:.{digits}f}]"
        return text


@dataclass(frozen=True)
class ReliabilityBins:
    """Top-label reliability diagram data: ``n_bins`` equal-width confidence bins (lo, hi] on [0, 1].

    ``counts`` (n_bins,) images per bin; ``confidence`` and ``accuracy`` (n_bins,) the bin's mean
    top-label probability and fraction correct (NaN for empty bins).
    """

    edges: np.ndarray
    counts: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray


@dataclass(frozen=True)
class ClassificationMetrics:
    """Everything :func:`classification_metrics` measures, ready for ``metrics.json``."""

    class_names: tuple[str, ...]
    n_per_class: dict[str, int]
    accuracy: Estimate
    per_class: dict[str, dict[str, Estimate]]
    confusion_matrix: np.ndarray
    ece: Estimate
    bootstrap: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_images": int(sum(self.n_per_class.values())),
            "n_per_class": dict(self.n_per_class),
            "accuracy": self.accuracy.to_dict(),
            "per_class": {
                name: {fig: est.to_dict() for fig, est in figures.items()}
                for name, figures in self.per_class.items()
            },
            "confusion_matrix": {
                "rows": "true class",
                "columns": "predicted class",
                "labels": list(self.class_names),
                "counts": self.confusion_matrix.tolist(),
            },
            "expected_calibration_error": {
                **self.ece.to_dict(),
                "bins": DEFAULT_ECE_BINS,
                "kind": "top-label",
            },
            "bootstrap": dict(self.bootstrap),
        }


def _check_inputs(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.int64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    if y_prob.ndim != 2 or y_true.shape != (y_prob.shape[0],):
        raise ValueError(f"expected y_true (N,) and y_prob (N, K); got {y_true.shape} and {y_prob.shape}")
    if y_true.size == 0:
        raise ValueError("no predictions to evaluate")
    if y_true.min() < 0 or y_true.max() >= y_prob.shape[1]:
        raise ValueError(f"labels must lie in 0..{y_prob.shape[1] - 1}")
    return y_true, y_prob


def binary_auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of ``scores`` (N,) for the boolean labels ``positive`` (N,); NaN unless both kinds occur.

    The Mann-Whitney form, (rank sum of the positives - n1 (n1 + 1) / 2) / (n1 n0) with tied scores
    given average ranks (:func:`scipy.stats.rankdata`): equal to scikit-learn's ``roc_auc_score``
    (a test checks it) and about 25 times faster, which matters inside the bootstrap where it runs
    thousands of times per class and source.
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, K) int64 counts, rows the true class, columns the predicted one: scikit-learn's
    ``confusion_matrix(y_true, y_pred, labels=range(K))`` from one ``np.bincount``. Its input checks
    cost about 2 ms a call, and the bootstrap calls it thousands of times (a test checks equality)."""
    flat = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def confusion_figures(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy (shape (1,)) and precision, recall, specificity, F1 per class (shape (K,)) of (K, K)
    confusion counts; NaN where undefined. As scikit-learn's ``accuracy_score`` and
    ``precision_recall_fscore_support(zero_division=nan)`` define them (F1 = 2 TP / (2 TP + FP + FN));
    a test checks they are equal."""
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    fp, fn = predicted - tp, support - tp
    negatives = cm.sum() - support  # images whose true class is not k
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "accuracy": np.array([tp.sum() / cm.sum()]),
            "precision": np.where(predicted > 0, tp / predicted, np.nan),
            "recall": np.where(support > 0, tp / support, np.nan),
            "specificity": np.where(negatives > 0, (negatives - fp) / negatives, np.nan),
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan),
        }


def point_figures(y_true: np.ndarray, y_prob: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy (shape (1,)) and each per-class figure (shape (K,)); NaN where undefined."""
    y_true, y_prob = _check_inputs(y_true, y_prob)
    cm = confusion_counts(y_true, y_prob.argmax(axis=1), y_prob.shape[1])
    auroc = np.array([binary_auroc(y_true == k, y_prob[:, k]) for k in range(y_prob.shape[1])])
    return {**confusion_figures(cm), "auroc": auroc}


def bootstrap_indices(
    n: int, n_boot: int, seed: int = 0, groups: Sequence[Any] | None = None
) -> Iterator[np.ndarray]:
    """Yield ``n_boot`` resamples of ``range(n)`` (index arrays), seeded.

    Without ``groups`` each resample draws n indices with replacement. With ``groups`` (length n, e.g.
    patient ids) it draws as many groups as there are, with replacement, and takes all their indices.
    The same (n, n_boot, seed, groups) always gives the same resamples, so two classifiers scored on
    the same items get paired intervals.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(n_boot):
            yield rng.integers(0, n, size=n)
        return
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries for {n} items")
    _, group_of = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    members = [np.flatnonzero(group_of == g) for g in range(group_of.max() + 1)]
    for _ in range(n_boot):
        drawn = rng.integers(0, len(members), size=len(members))
        yield np.concatenate([members[g] for g in drawn])


def percentile_interval(samples: np.ndarray, confidence: float = DEFAULT_CONFIDENCE) -> np.ndarray:
    """(n_boot, M) bootstrap replicates -> (2, M) percentile interval, NaN replicates ignored."""
    alpha = (1.0 - confidence) / 2.0
    out = np.full((2, samples.shape[1]), np.nan)
    for m in range(samples.shape[1]):
        column = samples[:, m]
        column = column[~np.isnan(column)]
        if column.size:
            out[:, m] = np.quantile(column, [alpha, 1.0 - alpha])
    return out


def bootstrap_interval(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
) -> np.ndarray:
    """Percentile interval (2, M) of ``statistic(indices) -> (M,)`` over :func:`bootstrap_indices`."""
    replicates = np.stack([statistic(idx) for idx in bootstrap_indices(n, n_boot, seed, groups)])
    return percentile_interval(replicates, confidence)


def point_and_interval(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(point (M,), low (M,), high (M,)) of ``statistic(indices) -> (M,)`` on all ``n`` items and its
    :func:`bootstrap_interval`; with ``n_boot == 0`` the bounds are NaN (no interval)."""
    point = statistic(np.arange(n))
    if n_boot <= 0:
        return point, np.full_like(point, np.nan), np.full_like(point, np.nan)
    low, high = bootstrap_interval(
        statistic, n, n_boot=n_boot, confidence=confidence, seed=seed, groups=groups
    )
    return point, low, high


def to_estimate(value: float, low: float, high: float) -> Estimate:
    """An :class:`Estimate` from a point and its interval bounds; NaN means undefined."""

    def clean(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    point = clean(value)
    if point is None:
        return Estimate(None)
    return Estimate(point, clean(low), clean(high))


def classification_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    class_names: Sequence[str] = CLASS_NAMES,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
) -> ClassificationMetrics:
    """All figures with percentile-bootstrap intervals (``n_boot`` = 0: no intervals).

    Args:
        y_true: (N,) true class indices.
        y_prob: (N, K) probabilities, K = len(class_names).
        groups: optional (N,) cluster ids (patients) for the cluster bootstrap; see the module docstring.
    """
    y_true, y_prob = _check_inputs(y_true, y_prob)
    if y_prob.shape[1] != len(class_names):
        raise ValueError(f"y_prob has {y_prob.shape[1]} columns for {len(class_names)} class names")
    names = ("accuracy", *PER_CLASS_FIGURES)

    def flat(true: np.ndarray, prob: np.ndarray) -> np.ndarray:
        figures = point_figures(true, prob)
        ece = expected_calibration_error(true, prob)
        return np.concatenate([*(figures[name] for name in names), [ece]])

    point = flat(y_true, y_prob)
    if n_boot > 0:
        low, high = bootstrap_interval(
            lambda idx: flat(y_true[idx], y_prob[idx]),
            len(y_true),
            n_boot=n_boot,
            confidence=confidence,
            seed=seed,
            groups=groups,
        )
    else:
        low = high = np.full_like(point, np.nan)
    estimates = [to_estimate(p, lo, hi) for p, lo, hi in zip(point, low, high, strict=True)]
    k = len(class_names)
    per_class = {
        name: {fig: estimates[1 + f * k + c] for f, fig in enumerate(PER_CLASS_FIGURES)}
        for c, name in enumerate(class_names)
    }
    counts = np.bincount(y_true, minlength=k)
    return ClassificationMetrics(
        class_names=tuple(class_names),
        n_per_class={name: int(counts[c]) for c, name in enumerate(class_names)},
        accuracy=estimates[0],
        per_class=per_class,
        confusion_matrix=confusion_matrix(y_true, y_prob.argmax(axis=1), labels=np.arange(k)),
        ece=estimates[-1],
        bootstrap={
            "method": "percentile",
            "n_resamples": int(n_boot),
            "confidence": float(confidence),
            "seed": int(seed),
            "unit": "image" if groups is None else "patient",
        },
    )


def reliability_bins(
    y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = DEFAULT_ECE_BINS
) -> ReliabilityBins:
    """Bin the top-label confidence into ``n_bins`` equal-width bins (lo, hi].

    Hand-written: scikit-learn's ``calibration_curve`` is binary and returns no bin counts, which the
    expected calibration error weights by; MONAI's calibration metric is per class, not top-label.
    """
    y_true, y_prob = _check_inputs(y_true, y_prob)
    confidence = y_prob.max(axis=1)
    correct = (y_prob.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges[1:-1], confidence, side="left"), 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=confidence, minlength=n_bins) / counts
        accuracy = np.bincount(which, weights=correct, minlength=n_bins) / counts
    return ReliabilityBins(edges=edges, counts=counts, confidence=mean_conf, accuracy=accuracy)


def expected_calibration_error(
    y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = DEFAULT_ECE_BINS
) -> float:
    """Top-label ECE (Guo et al. 2017): sum over bins of (bin share) x |accuracy - mean confidence|."""
    bins = reliability_bins(y_true, y_prob, n_bins)
    filled = bins.counts > 0
    share = bins.counts[filled] / bins.counts.sum()
    return float(np.sum(share * np.abs(bins.accuracy[filled] - bins.confidence[filled])))
