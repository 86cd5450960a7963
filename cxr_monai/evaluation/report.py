"""The evaluation report: score a trained bundle on a datalist split, with the shortcut check beside it.

Each evaluated image is decoded once: the decoded image gives both the model's input tensor and the
disease-blind baseline's features (kept; the pixels are dropped). Training items for the baseline are
decoded once for their features only. Nothing is written until everything is computed, and every file
is written atomically, so a failed run leaves no partial report.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from cxr_monai.atomic import write_json_atomic, write_text_atomic
from cxr_monai.constants import CLASS_NAMES, NUM_CLASSES, RESEARCH_USE_NOTICE
from cxr_monai.errors import DatasetError, InvalidImageError
from cxr_monai.evaluation.metrics import (
    DEFAULT_N_BOOT,
    ClassificationMetrics,
    classification_metrics,
    reliability_bins,
)
from cxr_monai.evaluation.plots import (
    confusion_matrix_figure,
    reliability_figure,
    roc_figure,
    save_png,
    training_curves_figure,
)
from cxr_monai.evaluation.shortcut import (
    CONTEXT,
    ShortcutBaseline,
    ShortcutFeatures,
    ShortcutResult,
    score_shortcut,
    shortcut_features,
    verdict,
)
from cxr_monai.io import CXRImage, read_cxr
from cxr_monai.predictor import Predictor

logger = logging.getLogger(__name__)

#: ``--split`` values besides ``fold:K``.
SPLITS = ("test", "training", "all")
TRAINING_LOG = Path("logs") / "training_log.json"

#: Called as ``progress(stage, done, total)``; stages "evaluate" (evaluated items) then "baseline"
#: (training items decoded for the baseline only).
ProgressHook = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Item:
    """One datalist entry: absolute ``image`` path, class index ``label``, optional ``patient_id``."""

    image: str
    label: int
    patient_id: str | None = None


def load_datalist(path: str | Path) -> dict[str, list[Item]]:
    """Read a MONAI datalist JSON (``training`` items with ``fold``, ``test`` items).

    Relative image paths are resolved against the datalist's folder (MONAI's ``base_dir`` convention).
    Synthetic items (``"synthetic": true``, from ``cxr-monai synthesize``) are left out: figures are
    always on real images, and the shortcut baseline is fitted on real images only.
    Returns ``{"training": [...], "test": [...], "fold:K": [...] for each fold}``.

    Raises:
        DatasetError: the file is missing, not JSON, or an item lacks ``image`` or a valid ``label``.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such datalist file")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not a JSON datalist ({exc})") from exc
    if not isinstance(raw, dict) or not any(isinstance(raw.get(k), list) for k in ("training", "test")):
        raise DatasetError(f"{path}: expected a JSON object with 'training' and/or 'test' lists")
    splits: dict[str, list[Item]] = {"training": [], "test": []}
    for key in ("training", "test"):
        for n, entry in enumerate(raw.get(key) or []):
            if isinstance(entry, dict) and entry.get("synthetic"):
                continue
            item = _item(entry, path.parent, f"{path}: {key}[{n}]")
            splits[key].append(item)
            if key == "training" and isinstance(entry.get("fold"), int):
                splits.setdefault(f"fold:{entry['fold']}", []).append(item)
    return splits


def _item(entry: Any, base: Path, where: str) -> Item:
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        raise DatasetError(f"{where}: item has no 'image' path")
    label = entry.get("label")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_CLASSES:
        raise DatasetError(
            f"{where}: 'label' must be a class index 0..{NUM_CLASSES - 1} ({', '.join(CLASS_NAMES)})"
        )
    image = Path(entry["image"])
    patient = entry.get("patient_id")
    return Item(
        str(image if image.is_absolute() else base / image), label, None if patient is None else str(patient)
    )


def select_split(splits: dict[str, list[Item]], split: str) -> list[Item]:
    """Items of ``test``, ``training``, ``all`` (training + test) or ``fold:K``.

    Raises:
        DatasetError: unknown split name, or the split is empty.
    """
    if split == "all":
        items = splits["training"] + splits["test"]
    elif split in splits:
        items = splits[split]
    elif split.startswith("fold:"):
        folds = sorted(k for k in splits if k.startswith("fold:"))
        raise DatasetError(
            f"split {split!r} not in the datalist (folds present: {', '.join(folds) or 'none'})"
        )
    else:
        raise DatasetError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)} or fold:K")
    if not items:
        raise DatasetError(f"split {split!r} of the datalist has no items")
    return items


@dataclass
class EvaluationReport:
    """What :func:`evaluate` measured; :func:`write_report` writes it."""

    items: list[Item]
    y_prob: np.ndarray
    metrics: ClassificationMetrics
    shortcut: ShortcutResult | None
    verdict: str | None
    model: dict[str, Any]
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def y_true(self) -> np.ndarray:
        return np.asarray([item.label for item in self.items], dtype=np.int64)


def _decode(
    items: Sequence[Item], skipped: list[dict[str, str]], stage: str, progress: ProgressHook
) -> Iterator[tuple[Item, CXRImage]]:
    """Yield (item, decoded image) for readable items; unreadable ones go to ``skipped``. Reports
    progress after each item, readable or not."""
    for done, item in enumerate(items, start=1):
        try:
            image = read_cxr(item.image)
        except InvalidImageError as exc:
            logger.warning("skipped unreadable image: %s", exc)
            skipped.append({"image": item.image, "reason": str(exc), "stage": stage})
        else:
            yield item, image
        progress(stage, done, len(items))


def evaluate(
    predictor: Predictor,
    items: Sequence[Item],
    training_items: Sequence[Item] = (),
    *,
    shortcut: bool = True,
    batch_size: int = 8,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    by_patient: bool = True,
    progress: ProgressHook | None = None,
) -> EvaluationReport:
    """Predict every item, measure the model, and (``shortcut``) fit and score the baseline.

    Unreadable images are skipped and listed in the report. The bootstrap resamples patients when
    ``by_patient`` and every evaluated item has a ``patient_id``, else images.

    Raises:
        DatasetError: no evaluated image could be read, or no usable training items for the baseline.
    """
    report_progress = progress or (lambda stage, done, total: None)
    skipped: list[dict[str, str]] = []
    kept: list[Item] = []
    probs: list[np.ndarray] = []
    features: dict[str, ShortcutFeatures] = {}
    pending: list[tuple[Item, CXRImage]] = []

    def flush() -> None:
        for (item, _), prediction in zip(
            pending, predictor.predict([img for _, img in pending], batch_size), strict=True
        ):
            kept.append(item)
            probs.append(prediction.probabilities)
        pending.clear()

    for item, image in _decode(items, skipped, "evaluate", report_progress):
        if shortcut:
            features[item.image] = shortcut_features(image)
        pending.append((item, image))
        if len(pending) == batch_size:
            flush()
    flush()
    if not kept:
        raise DatasetError(f"none of the {len(items)} evaluated images could be read")

    y_true = np.asarray([item.label for item in kept], dtype=np.int64)
    y_prob = np.stack(probs).astype(np.float64)
    groups = [item.patient_id for item in kept] if by_patient and all(i.patient_id for i in kept) else None
    metrics = classification_metrics(y_true, y_prob, CLASS_NAMES, n_boot=n_boot, seed=seed, groups=groups)

    result = text = None
    if shortcut:
        result = _shortcut_check(
            kept, features, training_items, y_true, y_prob, skipped, n_boot, seed, groups, report_progress
        )
        majority = float(np.bincount(y_true, minlength=NUM_CLASSES).max() / len(y_true))
        text = verdict(metrics.accuracy, result, majority)
    model = {
        "name": predictor.model_name,
        "version": predictor.model_version,
        "backbone": predictor.backbone,
        "spatial_size": predictor.spatial_size,
    }
    return EvaluationReport(kept, y_prob, metrics, result, text, model, skipped)


def _shortcut_check(
    kept: list[Item],
    features: dict[str, ShortcutFeatures],
    training_items: Sequence[Item],
    y_true: np.ndarray,
    y_prob: np.ndarray,
    skipped: list[dict[str, str]],
    n_boot: int,
    seed: int,
    groups: list[Any] | None,
    progress: ProgressHook,
) -> ShortcutResult:
    """Fit the baseline on training items not evaluated (all training items if that leaves fewer than
    two classes, flagged), reusing features already computed, and score it on the evaluated items."""
    evaluated = {item.image for item in kept}
    fit_items = [item for item in training_items if item.image not in evaluated]
    overlap = len({item.label for item in fit_items}) < 2
    if overlap:
        fit_items = list(training_items)
    todo = [item for item in fit_items if item.image not in features]
    for item, image in _decode(todo, skipped, "baseline", progress):
        features[item.image] = shortcut_features(image)
    usable = [item for item in fit_items if item.image in features]
    if len({item.label for item in usable}) < 2:
        raise DatasetError(
            "the shortcut baseline needs training items of at least two classes in the datalist's "
            "'training' list (or pass --no-shortcut)"
        )
    baseline = ShortcutBaseline(seed=seed).fit([features[i.image] for i in usable], [i.label for i in usable])
    predicted = baseline.predict([features[item.image] for item in kept])
    return score_shortcut(
        predicted,
        y_true,
        y_prob.argmax(axis=1),
        class_names=CLASS_NAMES,
        n_training_items=len(usable),
        fitted_on_evaluated_items=overlap,
        n_boot=n_boot,
        seed=seed,
        groups=groups,
    )


def _versions() -> dict[str, str]:
    out = {}
    for package in ("cxr-monai", "monai", "torch", "scikit-learn", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "unknown"
    return out


def report_dict(report: EvaluationReport, **context: Any) -> dict[str, Any]:
    """The ``metrics.json`` content; ``context`` (bundle, datalist, split, ...) is recorded as given."""
    data: dict[str, Any] = {
        "intended_use": RESEARCH_USE_NOTICE,
        "class_names": list(CLASS_NAMES),
        "model": dict(report.model),
        **context,
        "model_metrics": report.metrics.to_dict(),
        "shortcut_check": None,
        "skipped_images": list(report.skipped),
        "versions": _versions(),
    }
    if report.shortcut is not None:
        data["shortcut_check"] = {**report.shortcut.to_dict(), "verdict": report.verdict, "context": CONTEXT}
    return data


def predictions_csv(report: EvaluationReport) -> str:
    """Per-image CSV: image path, true and predicted class, each class probability, and the baseline's
    prediction. No patient data (not even the patient id)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["image", "true_class", "predicted_class", *(f"prob_{name}" for name in CLASS_NAMES)]
    if report.shortcut is not None:
        header.append("baseline_predicted_class")
    writer.writerow(header)
    for n, (item, probs) in enumerate(zip(report.items, report.y_prob, strict=True)):
        row = [item.image, CLASS_NAMES[item.label], CLASS_NAMES[int(np.argmax(probs))]]
        row += [f"{p:.6f}" for p in probs]
        if report.shortcut is not None:
            row.append(CLASS_NAMES[int(report.shortcut.predictions[n])])
        writer.writerow(row)
    return buffer.getvalue()


def read_training_log(bundle_dir: str | Path) -> list[dict[str, Any]] | None:
    """The bundle's ``logs/training_log.json`` (list of per-epoch dicts), or None when absent/unreadable."""
    path = Path(bundle_dir) / TRAINING_LOG
    try:
        log = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return [row for row in log if isinstance(row, dict)] if isinstance(log, list) else None


def write_report(
    report: EvaluationReport, out_dir: str | Path, bundle_dir: str | Path, **context: Any
) -> dict[str, Path]:
    """Write ``metrics.json``, ``predictions.csv`` and the PNG plots into ``out_dir``; return their paths.

    The training-curves plot needs the bundle's ``logs/training_log.json``; without it the plot is
    skipped and ``metrics.json`` says so under ``notes``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{report.model['name']} ({report.model['backbone']})"
    notes: list[str] = []
    figures = {
        "confusion_matrix.png": confusion_matrix_figure(
            report.metrics.confusion_matrix, CLASS_NAMES, f"Confusion matrix - {name}"
        ),
        "roc_curves.png": roc_figure(report.y_true, report.y_prob, CLASS_NAMES, f"ROC curves - {name}"),
        "reliability.png": reliability_figure(
            reliability_bins(report.y_true, report.y_prob),
            report.metrics.ece.value,
            f"Reliability diagram - {name}",
        ),
    }
    log = read_training_log(bundle_dir)
    curves = training_curves_figure(log, f"Training curves - {name}") if log else None
    if curves is None:
        notes.append(
            f"no training curves: {Path(bundle_dir) / TRAINING_LOG} is absent or has no numeric figures"
        )
    else:
        figures["training_curves.png"] = curves
    written = {file: save_png(fig, out / file) for file, fig in figures.items()}
    write_text_atomic(out / "predictions.csv", predictions_csv(report))
    written["predictions.csv"] = out / "predictions.csv"
    data = report_dict(report, **context, plots=sorted(figures), notes=notes)
    write_json_atomic(out / "metrics.json", data)
    written["metrics.json"] = out / "metrics.json"
    return written
