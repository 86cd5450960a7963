"""The dataset summary figure ``prepare`` writes: images per class x source, ages, views (Agg canvas)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cxr_monai.constants import CLASS_NAMES, RESEARCH_USE_NOTICE
from cxr_monai.evaluation.plots import save_png

FIGURE_FILENAME = "dataset_summary.png"
_AGE_BINS = np.arange(0, 101, 5)  # years
_NO_VIEW = "not given"


def summary_figure(datalist: dict[str, Any]) -> Figure:
    """Three panels over training + test items: images per class and source (bars), age histograms per
    class and source where ages are known (5-year bins), and views per class (bars)."""
    items = datalist["training"] + datalist["test"]
    sources = sorted({item["source"] for item in items})
    fig = Figure(figsize=(16.0, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"Dataset: {len(items)} images, {len(sources)} source(s), training + test splits")
    fig.supxlabel(RESEARCH_USE_NOTICE, fontsize=8, color="darkred")
    counts_ax, age_ax, view_ax = fig.subplots(1, 3)

    per = Counter((CLASS_NAMES[item["label"]], item["source"]) for item in items)
    width = 0.8 / max(len(sources), 1)
    positions = np.arange(len(CLASS_NAMES))
    for k, source in enumerate(sources):
        heights = [per[name, source] for name in CLASS_NAMES]
        bars = counts_ax.bar(positions + k * width, heights, width, label=source)
        counts_ax.bar_label(bars, fontsize=7)
    counts_ax.set_xticks(positions + width * (len(sources) - 1) / 2, CLASS_NAMES)
    counts_ax.set_ylabel("images")
    counts_ax.set_title("images per class and source")
    counts_ax.legend(fontsize=7)

    ages: dict[tuple[str, str], list[float]] = {}
    for item in items:
        if item.get("age") is not None:
            ages.setdefault((CLASS_NAMES[item["label"]], item["source"]), []).append(float(item["age"]))
    for (name, source), values in sorted(ages.items()):
        age_ax.hist(values, bins=_AGE_BINS, histtype="step", linewidth=1.5, label=f"{name} / {source}")
    unknown = sum(item.get("age") is None for item in items)
    age_ax.set_title(f"age where known ({len(items) - unknown} images; {unknown} without age)")
    age_ax.set_xlabel("age (years)")
    age_ax.set_ylabel("images")
    if ages:
        age_ax.legend(fontsize=7)

    views = Counter((CLASS_NAMES[item["label"]], item.get("view") or _NO_VIEW) for item in items)
    view_names = sorted({view for _, view in views}, key=lambda view: (view == _NO_VIEW, view))
    bottom = np.zeros(len(CLASS_NAMES))
    for view in view_names:
        stack = np.array([views[name, view] for name in CLASS_NAMES])
        view_ax.bar(CLASS_NAMES, stack, bottom=bottom, label=view)
        bottom += stack
    view_ax.set_title("views per class (not given: Kaggle, site CSVs)")
    view_ax.set_ylabel("images")
    view_ax.legend(fontsize=7)
    return fig


def write_summary_figure(datalist: dict[str, Any], out_dir: Path) -> Path:
    """``out_dir/dataset_summary.png`` from :func:`summary_figure`, written atomically."""
    return save_png(summary_figure(datalist), Path(out_dir) / FIGURE_FILENAME)
