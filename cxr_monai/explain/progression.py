"""Disease progression (the paper's Fig. 8): one patient's studies in time order, each with its Grad-CAM.

Ordering: DICOM studies by StudyDate + StudyTime when every input has a StudyDate, otherwise the given
order; a covid-chestxray-dataset patient's images by ``offset`` (days since symptom onset). Maps are
normalised by the series maximum (:func:`cxr_monai.explain.gradcam.normalise_series`), so the heat-map area of
one day compares with the next.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from monai.data import load_decathlon_datalist
from PIL import Image

from cxr_monai.data.datalist import load_datalist
from cxr_monai.errors import DatasetError
from cxr_monai.explain.overlay import COLORMAP, blend, to_display_gray
from cxr_monai.io import CXRImage

#: Longest side (pixels) of each panel in the montage.
PANEL_SIDE = 384


@dataclass(frozen=True)
class Study:
    """One time point of a series: ``label`` names it in the montage ("2020-03-02, day 3", "day 3")."""

    path: Path
    image: CXRImage
    label: str
    day: float | None


def _study_datetime(image: CXRImage) -> dt.datetime | None:
    """StudyDate (+ StudyTime, default midnight) of a DICOM header, or None when absent or malformed."""
    ds = image.dataset
    date = str(ds.get("StudyDate", "")).strip() if ds is not None else ""
    if len(date) != 8 or not date.isdigit():
        return None
    time = "".join(c for c in str(ds.get("StudyTime", "")).split(".")[0] if c.isdigit()).ljust(6, "0")[:6]
    try:
        return dt.datetime.strptime(date + time, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def order_studies(items: Sequence[tuple[Path, CXRImage]]) -> tuple[list[Study], str]:
    """Sort by StudyDate/StudyTime when every item has one; otherwise keep the given order.

    Returns the studies and how they were ordered (``"StudyDate"`` or ``"as given"``).
    """
    when = [_study_datetime(image) for _, image in items]
    if items and all(w is not None for w in when):
        dated = sorted(zip(when, items, strict=True), key=lambda pair: pair[0])  # type: ignore[arg-type, return-value]
        first = dated[0][0]
        studies = []
        for moment, (path, image) in dated:
            assert moment is not None and first is not None
            day = (moment - first).total_seconds() / 86400.0
            studies.append(Study(path, image, f"{moment:%Y-%m-%d}, day {day:g}", day))
        return studies, "StudyDate"
    return [Study(path, image, f"#{i + 1}", None) for i, (path, image) in enumerate(items)], "as given"


def _matches(item_patient: str, wanted: str) -> bool:
    """``covid:19`` matches ``covid:19`` and the bare dataset id ``19``."""
    return item_patient == wanted or item_patient.split(":", 1)[-1] == wanted


def datalist_series(datalist: str | Path, patient_id: str) -> list[dict[str, Any]]:
    """A patient's items from the ``training`` and ``test`` lists of a datalist, ordered by ``offset``.

    Items without an offset come last, in datalist order. ``patient_id`` may be the datalist's
    (``covid:19``) or the dataset's own (``19``). Image paths are resolved as MONAI does (relative to
    the datalist's folder).

    Raises:
        DatasetError: the datalist is unreadable, or the patient has no images in it.
    """
    load_datalist(datalist)  # checks the layout, raises DatasetError
    items = [
        item
        for key in ("training", "test")
        for item in load_decathlon_datalist(str(datalist), is_segmentation=False, data_list_key=key)
        if _matches(str(item.get("patient_id", "")), patient_id)
    ]
    if not items:
        raise DatasetError(f"datalist {datalist}: no images of patient {patient_id!r}")
    return sorted(items, key=lambda it: (it.get("offset") is None, it.get("offset") or 0))


def _panel(array: np.ndarray) -> np.ndarray:
    """Downscale a (rows, cols[, 3]) uint8 picture so its longer side is at most PANEL_SIDE."""
    image = Image.fromarray(array)
    image.thumbnail((PANEL_SIDE, PANEL_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(image)


def render_montage(
    studies: Sequence[Study],
    heatmaps: Sequence[np.ndarray],
    probabilities: Sequence[np.ndarray],
    areas: Sequence[float],
    class_names: Sequence[str],
    title: str,
) -> Figure:
    """Two rows (film, overlay) x one column per study; probabilities and area under each column;
    one colour bar for the whole series (maps already normalised by the series maximum)."""
    n = len(studies)
    fig = Figure(figsize=(3.2 * n + 1.2, 7.4), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    for i, (study, heat) in enumerate(zip(studies, heatmaps, strict=True)):
        film, overlay = axes[0][i], axes[1][i]
        film.imshow(_panel(to_display_gray(study.image.pixels)), cmap="gray")
        film.set_title(study.label, fontsize=10)
        overlay.imshow(_panel(blend(study.image.pixels, heat)))
        probs = "\n".join(f"{c}: {p:.2f}" for c, p in zip(class_names, probabilities[i], strict=True))
        overlay.set_xlabel(f"{probs}\narea > 0.5: {areas[i]:.1%}", fontsize=9)
        for ax in (film, overlay):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(
        ScalarMappable(norm=Normalize(0.0, 1.0), cmap=matplotlib.colormaps[COLORMAP]),
        ax=list(axes[:, -1]),
        label="Grad-CAM (series maximum = 1)",
        shrink=0.8,
    )
    fig.suptitle(title, fontsize=11)
    return fig
