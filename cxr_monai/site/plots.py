"""The site calibration report's figure: before vs after, each figure with its 95 % interval."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cxr_monai.evaluation.plots import _figure
from cxr_monai.site.profile import SiteProfile

_BEFORE, _AFTER = "tab:grey", "tab:blue"


def _bars(ax: Any, labels: list[str], pairs: list[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> None:
    """Grouped bars (before, after) with interval whiskers; ``pairs`` of Estimate dicts."""
    x = np.arange(len(labels))
    for offset, colour, name, which in (
        (-0.2, _BEFORE, "model as trained", 0),
        (0.2, _AFTER, "calibrated", 1),
    ):
        values = [p[which]["value"] or 0.0 for p in pairs]
        low = [
            v - (p[which]["ci_low"] if p[which]["ci_low"] is not None else v)
            for v, p in zip(values, pairs, strict=True)
        ]
        high = [
            (p[which]["ci_high"] if p[which]["ci_high"] is not None else v) - v
            for v, p in zip(values, pairs, strict=True)
        ]
        ax.bar(x + offset, values, 0.4, color=colour, label=name, yerr=[low, high], capsize=4)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1.05)
    ax.legend(loc="upper left", fontsize=8)


def site_calibration_figure(profile: SiteProfile) -> Figure:
    """Per-class recall (left) and accuracy / calibration error (right) of the site's films, the model as
    trained beside the calibration scored out of patient."""
    evaluation = profile.report["evaluation"]
    before, after = evaluation["before"], evaluation["after"]
    counts = profile.report["films"]["per_class"]
    present = [name for name, n in counts.items() if n]
    fig = _figure(
        f"Site {profile.site}: {profile.calibration.method} calibration on "
        f"{profile.report['films']['total']} films ({evaluation['scheme']})",
        11.0,
        4.6,
    )
    recall_ax, overall_ax = fig.subplots(1, 2)
    _bars(
        recall_ax,
        [f"{name}\n(n={counts[name]})" for name in present],
        [(before["per_class"][n]["recall"], after["per_class"][n]["recall"]) for n in present],
    )
    recall_ax.set_title("recall: share of each class's films called that class")
    _bars(
        overall_ax,
        ["accuracy", "calibration error (ECE)"],
        [
            (before["accuracy"], after["accuracy"]),
            (before["expected_calibration_error"], after["expected_calibration_error"]),
        ],
    )
    overall_ax.set_title("accuracy (higher is better), ECE (lower is better)")
    return fig
