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
from cxr_monai.evaluation.metrics import ReliabilityBins


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
    """One-vs-rest ROC curve per class present (and absent from no image), AUROC in the legend."""
    fig = _figure(title or "ROC curves (one-vs-rest)", 6.0, 5.5)
    ax = fig.subplots()
    y_true = np.asarray(y_true)
    for k, name in enumerate(class_names):
        positive = y_true == k
        if 0 < positive.sum() < positive.size:
            RocCurveDisplay.from_predictions(
                positive, y_prob[:, k], name=name, ax=ax, plot_chance_level=k == 0
            )
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.legend(loc="lower right")
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


def _curve_group(key: str) -> str:
    lowered = key.lower()
    if "loss" in lowered:
        return "loss"
    if lowered == "lr" or "learning_rate" in lowered:
        return "learning rate"
    if "seconds" in lowered:
        return "seconds"
    return "other figures"


def training_curves_figure(log: Sequence[Mapping[str, Any]], title: str = "") -> Figure | None:
    """Per-epoch curves from a training log (list of dicts with ``epoch`` and numeric figures): panels
    for losses, every other figure (accuracy ...), the learning rate (log scale) and timings (keys
    containing ``seconds``), each only when the log has such keys. None when nothing is numeric."""
    keys = sorted(
        {
            k
            for row in log
            for k, v in row.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
        }
    )
    if not keys:
        return None
    groups = [
        g
        for g in ("loss", "other figures", "learning rate", "seconds")
        if any(_curve_group(k) == g for k in keys)
    ]
    fig = _figure(title or "Training curves", 4.5 * len(groups) + 1.0, 4.5)
    axes = dict(zip(groups, np.atleast_1d(fig.subplots(1, len(groups))), strict=True))
    for key in keys:
        points = [
            (row.get("epoch", i + 1), row[key])
            for i, row in enumerate(log)
            if isinstance(row.get(key), (int, float))
        ]
        epochs, values = zip(*points, strict=True)
        axes[_curve_group(key)].plot(epochs, values, marker="o", label=key)
    for name, ax in axes.items():
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if name == "learning rate":
            ax.set_yscale("log")
        ax.legend()
    return fig
