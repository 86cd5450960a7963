"""Evaluation plots as matplotlib figures (Agg canvas, no pyplot state): each titled and carrying the
research-use notice. The caller saves them (:func:`save_png`)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

from cxr_monai.atomic import atomic_path
from cxr_monai.constants import CLASS_NAMES, RESEARCH_USE_NOTICE
from cxr_monai.evaluation.metrics import Estimate, ReliabilityBins
from cxr_monai.evaluation.sources import ScorerFigures, SourceMetrics


def _figure(title: str, width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(textwrap.fill(title, width=int(width * 9)))  # ~9 title characters per inch
    fig.supxlabel(RESEARCH_USE_NOTICE, fontsize=8, color="darkred")
    return fig


def save_png(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def confusion_matrix_figure(
    cm: np.ndarray, class_names: Sequence[str] = CLASS_NAMES, title: str = ""
) -> Figure:
    """Counts (left) and row-normalised shares (right; each true class sums to 1). ``cm`` (K, K),
    rows = true class, columns = predicted class."""
    fig = _figure(title or "Confusion matrix", 11.0, 4.8)
    counts_ax, norm_ax = fig.subplots(1, 2)
    cm = np.asarray(cm)
    ConfusionMatrixDisplay(cm, display_labels=list(class_names)).plot(
        ax=counts_ax, colorbar=False, values_format="d"
    )
    counts_ax.set_title("counts")
    with np.errstate(invalid="ignore", divide="ignore"):
        share = cm / cm.sum(axis=1, keepdims=True)
    ConfusionMatrixDisplay(np.nan_to_num(share), display_labels=list(class_names)).plot(
        ax=norm_ax, colorbar=False, values_format=".2f"
    )
    norm_ax.set_title("share of each true class (recall on the diagonal)")
    return fig


def roc_figure(
    y_true: np.ndarray, y_prob: np.ndarray, class_names: Sequence[str] = CLASS_NAMES, title: str = ""
) -> Figure:
    """One-vs-rest ROC curve per class present (and absent from no image), AUROC in the legend; the
    chance diagonal is drawn and labelled on the plot, not listed among the classes."""
    fig = _figure(title or "ROC curves (one-vs-rest)", 6.0, 5.5)
    ax = fig.subplots()
    y_true = np.asarray(y_true)
    for k, name in enumerate(class_names):
        positive = y_true == k
        if 0 < positive.sum() < positive.size:
            RocCurveDisplay.from_predictions(positive, y_prob[:, k], name=name, ax=ax)
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="_chance")  # "_": no legend
    ax.text(0.62, 0.56, "chance (AUROC 0.5)", color="gray", rotation=45, rotation_mode="anchor", fontsize=8)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.legend(loc="lower right", title="class vs rest")
    return fig


def reliability_figure(bins: ReliabilityBins, ece: float | None, title: str = "") -> Figure:
    """Top-label reliability diagram: accuracy vs mean confidence per bin, image counts beneath."""
    fig = _figure(title or "Reliability diagram (top-label)", 6.0, 6.5)
    acc_ax, count_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    width = np.diff(bins.edges)
    centers = bins.edges[:-1] + width / 2
    filled = bins.counts > 0
    acc_ax.bar(
        centers[filled], bins.accuracy[filled], width=width[filled], edgecolor="black", label="accuracy"
    )
    acc_ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    acc_ax.plot(
        centers[filled],
        bins.confidence[filled],
        "_",
        markersize=14,
        markeredgewidth=2.5,
        color="darkred",
        label="mean confidence in the bin",
    )
    acc_ax.set_ylabel("fraction correct")
    acc_ax.set_ylim(0, 1)
    acc_ax.set_title("ECE n/a" if ece is None else f"expected calibration error {ece:.3f}")
    acc_ax.legend(loc="upper left")
    count_ax.bar(centers, bins.counts, width=width, edgecolor="black", color="gray")
    count_ax.set_xlabel("confidence (top-label probability)")
    count_ax.set_ylabel("images")
    count_ax.set_xlim(0, 1)
    return fig


#: Panels of the training-curves figure, in order; keys that fit none share a last panel titled by them.
_CURVE_PANELS = ("loss", "accuracy", "learning rate", "seconds")


def _curve_group(key: str) -> str:
    lowered = key.lower()
    if "loss" in lowered:
        return "loss"
    if "accuracy" in lowered:
        return "accuracy"
    if lowered == "lr" or "learning_rate" in lowered:
        return "learning rate"
    if "seconds" in lowered:
        return "seconds"
    return ""


def training_curves_figure(logs: Sequence[Sequence[Mapping[str, Any]]], title: str = "") -> Figure | None:
    """Per-epoch curves from one or more training logs (each a list of dicts with ``epoch`` and numeric
    figures; several: the folds of a cross-validation, one thin line each in the figure's colour, so the
    spread across folds shows): panels for losses, accuracies, the learning rate (log scale), timings
    (keys containing ``seconds``) and any other figures (titled by their keys), each only when a log has
    such keys. None when nothing is numeric."""
    keys = sorted(
        {
            k
            for log in logs
            for row in log
            for k, v in row.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
        }
    )
    if not keys:
        return None
    groups = [g for g in (*_CURVE_PANELS, "") if any(_curve_group(k) == g for k in keys)]
    fig = _figure(title or "Training curves", 4.5 * len(groups) + 1.0, 4.5)
    axes = dict(zip(groups, np.atleast_1d(fig.subplots(1, len(groups))), strict=True))
    several = len(logs) > 1
    for colour, key in enumerate(keys):
        labelled = False
        for log in logs:
            points = [
                (row.get("epoch", i + 1), row[key])
                for i, row in enumerate(log)
                if isinstance(row.get(key), (int, float))
            ]
            if not points:
                continue
            epochs, values = zip(*points, strict=True)
            axes[_curve_group(key)].plot(
                epochs,
                values,
                color=f"C{colour}",
                marker="." if several else "o",
                linewidth=1.0 if several else 1.5,
                alpha=0.7 if several else 1.0,
                label=None if labelled else (f"{key} ({len(logs)} runs)" if several else key),
            )
            labelled = True
    for name, ax in axes.items():
        ax.set_xlabel("epoch")
        ax.set_title(name or ", ".join(k for k in keys if not _curve_group(k)))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if name == "learning rate":
            ax.set_yscale("log")
        ax.legend()
    return fig


def _estimate_bars(
    ax: Any, labels: Sequence[str], series: Mapping[str, Sequence[Estimate | None]], xlabel: str
) -> None:
    """Horizontal grouped bars, one group per label and one bar per series, with CI error bars; a
    missing or undefined estimate leaves its bar out."""
    height = 0.8 / max(len(series), 1)
    y = np.arange(len(labels))
    for s, (name, estimates) in enumerate(series.items()):
        rows = [(i, e) for i, e in enumerate(estimates) if e is not None and e.value is not None]
        if not rows:
            continue
        pos = np.array([y[i] for i, _ in rows]) + (s - (len(series) - 1) / 2) * height
        values = np.array([e.value for _, e in rows], dtype=float)
        lows = np.array([e.ci_low if e.ci_low is not None else e.value for _, e in rows], dtype=float)
        highs = np.array([e.ci_high if e.ci_high is not None else e.value for _, e in rows], dtype=float)
        ax.barh(pos, values, height=height, label=name, xerr=[values - lows, highs - values], capsize=3)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.legend(loc="best", fontsize=8)


def source_figure(by_source: Sequence[SourceMetrics], title: str = "") -> Figure:
    """Left: accuracy per source; right: within-source one-vs-rest AUROC per (source, class), and per
    class pair in a source of three or more classes, with the chance line at 0.5. Model and disease-blind
    baseline side by side, 95% CI bars."""
    comparisons = [(s, c) for s in by_source if len(s.classes) >= 2 for c in [*s.classes, *s.model.pairwise]]
    rows = max(len(by_source), len(comparisons), 1)
    fig = _figure(title or "Per source and within source", 13.0, 2.5 + 0.45 * rows)
    acc_ax, auc_ax = fig.subplots(1, 2)
    has_baseline = any(s.baseline is not None for s in by_source)
    acc_series: dict[str, list[Estimate | None]] = {"model": [s.model.accuracy for s in by_source]}
    if has_baseline:
        acc_series["baseline"] = [s.baseline.accuracy if s.baseline else None for s in by_source]
    labels = [f"{s.source} (n={sum(s.n_per_class.values())})" for s in by_source]
    _estimate_bars(acc_ax, labels, acc_series, "accuracy (all classes)")
    acc_ax.set_title("per source")
    if not comparisons:
        auc_ax.text(0.5, 0.5, "no evaluated source holds two classes", ha="center", va="center")
        auc_ax.set_axis_off()
        return fig
    auc_series: dict[str, list[Estimate | None]] = {"model": [_auroc(s.model, c) for s, c in comparisons]}
    if has_baseline:
        auc_series["baseline"] = [_auroc(s.baseline, c) if s.baseline else None for s, c in comparisons]
    auc_labels = [
        f"{s.source}: {c} (n={s.n_per_class[c.split(' vs ')[0]]} vs {s.n_per_class[c.split(' vs ')[1]]})"
        if c in s.model.pairwise
        else f"{s.source}: {c} vs rest (n={s.n_per_class[c]})"
        for s, c in comparisons
    ]
    _estimate_bars(auc_ax, auc_labels, auc_series, "AUROC within the source")
    auc_ax.axvline(0.5, color="gray", linestyle="--", linewidth=1)
    auc_ax.set_title("within source (one-vs-rest and class pairs, on the source's images)")
    return fig


def _auroc(figures: ScorerFigures, comparison: str) -> Estimate:
    """A class's one-vs-rest AUROC, or a pair's ("A vs B") AUROC."""
    return figures.pairwise[comparison] if comparison in figures.pairwise else figures.auroc[comparison]
