"""Disease or source? Figures per image source, discrimination within each source, a source probe, and
the plain-words verdict built from them.

When every image of a class comes from one source, a classifier can score well by recognising the
source. Two kinds of figure cannot be earned that way:

- **within-source** figures, computed on one source's images only, for a source holding two or more
  classes (e.g. COVID-19 vs Pneumonia inside covid-chestxray-dataset): there the source is constant,
  so only what differs between the classes inside it can separate them;
- the **source probe**: how well a linear classifier on a representation tells the sources apart. A
  representation that names the source almost perfectly is one a classifier can use as a shortcut.

Inputs: ``y_true`` (N,) class indices, probabilities (N, K) of the model and, optionally, of the
disease-blind baseline, ``sources`` (N,) source names, optional ``groups`` (N,) patient ids for the
cluster bootstrap and the grouped cross-validation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.evaluation.metrics import (
    DEFAULT_CONFIDENCE,
    DEFAULT_N_BOOT,
    Estimate,
    binary_auroc,
    point_and_interval,
    to_estimate,
)

#: Most folds of the probe's cross-validation (fewer when a source has fewer patients).
PROBE_MAX_SPLITS = 5
#: Probe accuracy as a share of the headroom above always guessing the largest source:
#: (accuracy - majority) / (1 - majority). At or above STRONG: "encodes source almost perfectly";
#: at or above CLEAR: "clearly encodes source"; below: "little source information".
PROBE_STRONG, PROBE_CLEAR = 0.8, 0.4
CHANCE_AUROC = 0.5

DEFINITIONS = {
    "accuracy": "share of the source's images whose arg-max class (over all classes) is the true class",
    "recall": "per class present in the source: share of its images predicted as that class",
    "within_source.accuracy": (
        "share of the source's images whose arg-max over the classes present in the source only is the "
        "true class (a call of a class the source does not hold cannot count against it)"
    ),
    "within_source.auroc": (
        "AUROC of class c within source s: area under the ROC curve of the scorer's probability of c "
        "renormalised over the classes present in s (p_c / sum of p_k for k present; a class the source "
        "does not hold cannot blur the comparison, and in a two-class source both classes' AUROCs are "
        "equal), positives = the source's images of class c, negatives = the source's images of its other "
        "classes (images of other sources excluded); 0.5 = chance"
    ),
    "within_source.pairwise_auroc": (
        "for a source of three or more classes, AUROC of class a against class b within source s (e.g. "
        "COVID-19 vs Pneumonia): the scorer's p_a / (p_a + p_b) on the source's images of a (positives) and "
        "b (negatives) only; 0.5 = chance. The verdict judges these pairs in such a source"
    ),
    "model_minus_baseline": "model figure minus baseline figure on the same bootstrap resamples",
    "disease_signal": (
        "a within-source comparison shows disease signal when the model's AUROC has a 95% CI lower bound "
        "above 0.5 and, when the baseline was scored, the paired model-minus-baseline AUROC has a 95% CI "
        "lower bound above 0 (a point estimate above the baseline's is not enough: on the public data an "
        "untrained network's AUROC beat the baseline's inside NIH by chance)"
    ),
}


@dataclass(frozen=True)
class ScorerFigures:
    """One scorer's (or the model-minus-baseline gap's) figures on one source.

    ``recall`` and ``auroc`` are keyed by the classes present in the source; ``within_accuracy`` is None
    and ``auroc`` empty for a source of one class. ``pairwise`` (keyed "A vs B", classes in class order)
    holds one AUROC per pair of present classes in a source of three or more classes, else is empty.
    """

    accuracy: Estimate
    recall: dict[str, Estimate]
    within_accuracy: Estimate | None
    auroc: dict[str, Estimate]
    pairwise: dict[str, Estimate]

    def to_dict(self) -> dict[str, Any]:
        within = None
        if self.within_accuracy is not None:
            within = {
                "accuracy": self.within_accuracy.to_dict(),
                "auroc": {name: est.to_dict() for name, est in self.auroc.items()},
                "pairwise_auroc": {pair: est.to_dict() for pair, est in self.pairwise.items()},
            }
        return {
            "accuracy": self.accuracy.to_dict(),
            "recall": {name: est.to_dict() for name, est in self.recall.items()},
            "within_source": within,
        }


@dataclass(frozen=True)
class SourceMetrics:
    """The model's and the baseline's figures on one source's images, and their paired gap."""

    source: str
    n_per_class: dict[str, int]
    n_patients: int
    model: ScorerFigures
    baseline: ScorerFigures | None
    gap: ScorerFigures | None

    @property
    def classes(self) -> tuple[str, ...]:
        """The classes present in this source, in class order."""
        return tuple(name for name, n in self.n_per_class.items() if n > 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_images": int(sum(self.n_per_class.values())),
            "n_patients": self.n_patients,
            "n_per_class": dict(self.n_per_class),
            "classes_present": list(self.classes),
            "model": self.model.to_dict(),
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
            "model_minus_baseline": None if self.gap is None else self.gap.to_dict(),
        }


def _pairs(present: np.ndarray) -> list[tuple[int, int]]:
    """Class pairs (a, b), a < b, judged pairwise: every pair of a source with three or more classes."""
    if len(present) < 3:
        return []
    return [(int(a), int(b)) for i, a in enumerate(present) for b in present[i + 1 :]]


def _figures(y_true: np.ndarray, y_prob: np.ndarray, present: np.ndarray) -> np.ndarray:
    """[accuracy, recall per present class, (within accuracy, AUROC per present class, AUROC per pair of
    :func:`_pairs`)] on one source; the bracketed part only for two or more present classes. NaN where
    undefined on these items."""
    y_pred = y_prob.argmax(axis=1)
    out = [float(np.mean(y_pred == y_true))]
    for c in present:
        positive = y_true == c
        out.append(float(np.mean(y_pred[positive] == c)) if positive.any() else np.nan)
    if len(present) >= 2:
        within = y_prob[:, present]
        within_pred = present[within.argmax(axis=1)]
        out.append(float(np.mean(within_pred == y_true)))
        total = np.clip(within.sum(axis=1), np.finfo(np.float64).tiny, None)
        out += [binary_auroc(y_true == c, within[:, k] / total) for k, c in enumerate(present)]
        for a, b in _pairs(present):
            pair = (y_true == a) | (y_true == b)
            pair_total = np.clip(y_prob[pair, a] + y_prob[pair, b], np.finfo(np.float64).tiny, None)
            out.append(binary_auroc(y_true[pair] == a, y_prob[pair, a] / pair_total))
    return np.asarray(out)


def _paired_statistic(
    y_true: np.ndarray, probs: list[np.ndarray], present: np.ndarray
) -> Callable[[np.ndarray], np.ndarray]:
    """indices -> :func:`_figures` of the model[, of the baseline, and model minus baseline]."""

    def statistic(idx: np.ndarray) -> np.ndarray:
        parts = [_figures(y_true[idx], prob[idx], present) for prob in probs]
        if len(parts) == 2:
            parts.append(parts[0] - parts[1])
        return np.concatenate(parts)

    return statistic


def _unpack(values: Sequence[Estimate], present: np.ndarray, class_names: Sequence[str]) -> ScorerFigures:
    k = len(present)
    names = [class_names[c] for c in present]
    multi = k >= 2
    pair_names = [f"{class_names[a]} vs {class_names[b]}" for a, b in _pairs(present)]
    return ScorerFigures(
        accuracy=values[0],
        recall=dict(zip(names, values[1 : 1 + k], strict=True)),
        within_accuracy=values[1 + k] if multi else None,
        auroc=dict(zip(names, values[2 + k : 2 + 2 * k], strict=True)) if multi else {},
        pairwise=dict(zip(pair_names, values[2 + 2 * k :], strict=True)),
    )


def source_metrics(
    y_true: np.ndarray,
    model_prob: np.ndarray,
    sources: Sequence[str],
    baseline_prob: np.ndarray | None = None,
    *,
    class_names: Sequence[str] = CLASS_NAMES,
    groups: Sequence[Any] | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> list[SourceMetrics]:
    """Per source (sorted by name): accuracy and per-class recall; for a source of two or more classes
    also the within-source accuracy and one-vs-rest AUROCs (see :data:`DEFINITIONS`).

    Intervals: percentile bootstrap over the source's images (whole patients when ``groups`` is given),
    via :func:`cxr_monai.evaluation.metrics.bootstrap_interval`; the model's, the baseline's and their gap
    come from the same resamples, so the gap's interval is paired.

    Args:
        y_true: (N,) class indices.
        model_prob, baseline_prob: (N, K) probabilities, K = len(class_names).
        sources: (N,) source name of each item.
        groups: optional (N,) patient ids.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    source_of = np.asarray([str(s) for s in sources])
    if source_of.shape != y_true.shape or model_prob.shape != (len(y_true), len(class_names)):
        raise ValueError(
            f"expected y_true (N,), sources (N,), probabilities (N, {len(class_names)}); got "
            f"{y_true.shape}, {source_of.shape}, {model_prob.shape}"
        )
    if baseline_prob is not None and baseline_prob.shape != model_prob.shape:
        raise ValueError(f"baseline probabilities {baseline_prob.shape} do not match {model_prob.shape}")
    out = []
    for source in sorted(set(source_of.tolist())):
        rows = np.flatnonzero(source_of == source)
        y = y_true[rows]
        counts = np.bincount(y, minlength=len(class_names))
        present = np.flatnonzero(counts)
        probs = [np.asarray(model_prob)[rows]]
        if baseline_prob is not None:
            probs.append(np.asarray(baseline_prob)[rows])

        statistic = _paired_statistic(y, probs, present)
        group_rows = None if groups is None else [groups[int(i)] for i in rows]
        point, low, high = point_and_interval(
            statistic, len(rows), n_boot=n_boot, confidence=confidence, seed=seed, groups=group_rows
        )
        estimates = [to_estimate(p, lo, hi) for p, lo, hi in zip(point, low, high, strict=True)]
        width = len(point) // (1 if baseline_prob is None else 3)  # model[, baseline, gap]
        scorers = [
            _unpack(estimates[start : start + width], present, class_names)
            for start in range(0, len(point), width)
        ]
        out.append(
            SourceMetrics(
                source=source,
                n_per_class={name: int(counts[c]) for c, name in enumerate(class_names)},
                n_patients=len(rows) if group_rows is None else len({str(g) for g in group_rows}),
                model=scorers[0],
                baseline=scorers[1] if len(scorers) == 3 else None,
                gap=scorers[2] if len(scorers) == 3 else None,
            )
        )
    return out


@dataclass(frozen=True)
class ProbeResult:
    """Cross-validated accuracy of predicting the source from one feature set (N, F)."""

    accuracy: float
    fold_accuracies: tuple[float, ...]
    n_features: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "fold_accuracies": list(self.fold_accuracies),
            "n_features": self.n_features,
        }


@dataclass(frozen=True)
class SourceProbe:
    """The source probe on the model's pooled features and (when given) the baseline's features.

    ``model``/``baseline`` are None when the probe could not run; ``note`` then says why.
    """

    n_per_source: dict[str, int]
    majority_rate: float
    n_splits: int
    unit: str
    model: ProbeResult | None
    baseline: ProbeResult | None
    note: str | None = None

    @property
    def headroom_share(self) -> float | None:
        """(model probe accuracy - majority rate) / (1 - majority rate); None when not run."""
        if self.model is None or self.majority_rate >= 1.0:
            return None
        return (self.model.accuracy - self.majority_rate) / (1.0 - self.majority_rate)

    def to_dict(self) -> dict[str, Any]:
        return {
            "description": (
                "logistic regression (scikit-learn, standardised features) predicting each image's source; "
                "accuracy = mean over the folds of a patient-grouped, source-stratified cross-validation "
                "(StratifiedGroupKFold, shuffled, seeded)"
            ),
            "n_per_source": dict(self.n_per_source),
            "majority_source_rate": self.majority_rate,
            "cross_validation": {"n_splits": self.n_splits, "unit": self.unit},
            "model_features": None if self.model is None else self.model.to_dict(),
            "baseline_features": None if self.baseline is None else self.baseline.to_dict(),
            "note": self.note,
        }


def probe_accuracy(
    features: np.ndarray, sources: Sequence[str], groups: Sequence[Any], n_splits: int, seed: int = 0
) -> ProbeResult:
    """Cross-validated accuracy (mean over folds) of a standardised logistic regression predicting
    ``sources`` (N,) from ``features`` (N, F); folds keep each group (patient) whole and stratify by
    source (:class:`~sklearn.model_selection.StratifiedGroupKFold`, shuffled with ``seed``)."""
    x = np.asarray(features, dtype=np.float64)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    scores = cross_val_score(
        pipeline, x, np.asarray(sources), groups=np.asarray([str(g) for g in groups]), cv=folds
    )
    return ProbeResult(float(np.mean(scores)), tuple(float(s) for s in scores), int(x.shape[1]))


def source_probe(
    model_features: np.ndarray,
    sources: Sequence[str],
    baseline_features: np.ndarray | None = None,
    *,
    groups: Sequence[Any] | None = None,
    seed: int = 0,
    max_splits: int = PROBE_MAX_SPLITS,
) -> SourceProbe:
    """Probe ``model_features`` (N, F) and ``baseline_features`` (N, D) for the source.

    Folds: ``min(max_splits, fewest patients of any source)``; needs two sources with two patients (or
    images, without ``groups``) each, else the result carries a ``note`` and no accuracy.
    """
    names = [str(s) for s in sources]
    unit_groups = list(groups) if groups is not None else list(range(len(names)))
    per_source: dict[str, set[str]] = {}
    for name, group in zip(names, unit_groups, strict=True):
        per_source.setdefault(name, set()).add(str(group))
    counts = {name: names.count(name) for name in sorted(per_source)}
    majority = max(counts.values()) / len(names)
    unit = "image" if groups is None else "patient"
    fewest = min(len(g) for g in per_source.values())
    n_splits = min(max_splits, fewest)
    if len(per_source) < 2 or n_splits < 2:
        note = (
            "only one source among the evaluated images"
            if len(per_source) < 2
            else f"a source has fewer than two {unit}s, too few for a grouped cross-validation"
        )
        return SourceProbe(counts, majority, 0, unit, None, None, note)
    return SourceProbe(
        counts,
        majority,
        n_splits,
        unit,
        probe_accuracy(model_features, names, unit_groups, n_splits, seed),
        None
        if baseline_features is None
        else probe_accuracy(baseline_features, names, unit_groups, n_splits, seed),
    )


def _comparisons(source: SourceMetrics) -> list[tuple[str, Callable[[ScorerFigures], Estimate]]]:
    """The within-source comparisons the verdict judges: (name, scorer -> its AUROC). A two-class source
    is one comparison; a source of three or more classes is judged pair by pair."""
    classes = source.classes
    if len(classes) < 2:
        return []
    if len(classes) == 2:
        return [(f"{classes[1]} vs {classes[0]}", lambda scorer: scorer.auroc[classes[1]])]
    return [(pair, _pairwise_auroc(pair)) for pair in source.model.pairwise]


def _pairwise_auroc(pair: str) -> Callable[[ScorerFigures], Estimate]:
    return lambda scorer: scorer.pairwise[pair]


def _verdict_on_comparison(
    source: SourceMetrics, name: str, auroc: Callable[[ScorerFigures], Estimate]
) -> tuple[bool, str]:
    """(shows disease signal, "COVID-19 vs Pneumonia in S: AUROC 0.91 [0.85, 0.96], baseline 0.62 [...]")
    by the rule in :data:`DEFINITIONS`."""
    model = auroc(source.model)
    base = auroc(source.baseline) if source.baseline is not None else None
    gap = auroc(source.gap) if source.gap is not None else None
    text = f"{name} in {source.source}: AUROC {model.format(2)}"
    if base is not None:
        text += f", baseline {base.format(2)}"
    if model.value is None:
        return False, text + " (undefined)"
    if model.ci_low is None:
        return False, text + " (no CI)"
    if model.ci_low <= CHANCE_AUROC:
        return False, text + " (CI reaches chance)"
    if gap is not None and (gap.value is None or gap.value <= 0.0):
        return False, text + " (baseline as good)"
    if gap is not None and (gap.ci_low is None or gap.ci_low <= 0.0):
        return False, text + " (not clearly above the baseline: the gap's CI reaches 0)"
    return True, text


def source_verdict(by_source: Sequence[SourceMetrics], probe: SourceProbe | None) -> list[str]:
    """Plain-words sentences: which within-source comparisons show disease signal (:data:`DEFINITIONS`),
    which do not, how strongly the model's features encode source, and what that adds up to."""
    sentences = []
    comparisons = [(source, *comparison) for source in by_source for comparison in _comparisons(source)]
    judged = [_verdict_on_comparison(source, name, auroc) for source, name, auroc in comparisons]
    shown = [text for ok, text in judged if ok]
    missing = [text for ok, text in judged if not ok]
    has_baseline = any(source.baseline is not None for source in by_source)
    if not comparisons:
        sentences.append(
            "No evaluated source holds two or more classes, so nothing here separates disease from image "
            "source: every figure above may measure where an image came from."
        )
    else:
        rule = "model AUROC's 95% CI above 0.5"
        rule += " and its lead over the baseline's AUROC with a 95% CI above 0" if has_baseline else ""
        if shown:
            sentences.append(f"Disease signal within a source ({rule}): " + "; ".join(shown) + ".")
        if missing:
            sentences.append("No clear disease signal: " + "; ".join(missing) + ".")
        if not has_baseline:
            sentences.append("(No disease-blind baseline was scored, so no comparison with it.)")
    share = None if probe is None else probe.headroom_share
    if probe is not None and probe.model is not None and share is not None:
        text = (
            "A linear probe on the model's pooled features names the image source with cross-validated "
            f"accuracy {probe.model.accuracy:.2f} (always guessing the largest source: "
            f"{probe.majority_rate:.2f}"
        )
        if probe.baseline is not None:
            text += f"; the same probe on the disease-blind features: {probe.baseline.accuracy:.2f}"
        if share >= PROBE_STRONG:
            text += "): the representation encodes source almost perfectly."
        elif share >= PROBE_CLEAR:
            text += "): the representation clearly encodes source."
        else:
            text += "): the representation carries little source information beyond the source mix."
        sentences.append(text)
    elif probe is not None and probe.note:
        sentences.append(f"Source probe not run: {probe.note}.")
    if comparisons:
        strong = share is not None and share >= PROBE_STRONG
        if not shown and strong:
            sentences.append(
                "Taken together the representation is mostly source: it tells where an image came from, "
                "and no within-source comparison shows disease."
            )
        elif not shown:
            sentences.append(
                "No within-source comparison shows disease signal: these figures are no evidence that the "
                "model sees disease."
            )
        elif missing:
            sentences.append(
                f"Disease signal shows in {len(shown)} of {len(comparisons)} within-source comparisons; "
                "where it does not, the model's figures may come from source, not disease."
            )
        else:
            sentences.append(
                "Every within-source comparison shows disease signal"
                + (", although the features still encode source strongly." if strong else ".")
            )
    return sentences
