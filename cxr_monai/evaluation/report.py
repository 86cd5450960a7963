"""The evaluation report: score a trained bundle on a datalist split, with the shortcut check beside it,
figures per source and within each source, and the source probe (:mod:`cxr_monai.evaluation.sources`).

Each evaluated image is decoded once: the decoded image gives the model's input tensor (hence its
probabilities and pooled features, in one forward pass) and the disease-blind baseline's features
(kept; the pixels are dropped). Training items for the baseline are
decoded once for their features only. With a feature cache (:mod:`cxr_monai.evaluation.stored_features`)
an image whose trunk and baseline features are stored is not decoded at all: the head scores its stored
features, and what is computed is stored for the next evaluation. Nothing is written until everything
is computed, and every file is written atomically, so a failed run leaves no partial report.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxr_monai.atomic import write_json_atomic, write_text_atomic
from cxr_monai.constants import CLASS_NAMES, NUM_CLASSES, RESEARCH_USE_NOTICE
from cxr_monai.data import DataItem, load_datalist
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
    source_figure,
    training_curves_figure,
)
from cxr_monai.evaluation.shortcut import (
    CONTEXT,
    ShortcutBaseline,
    ShortcutFeatures,
    ShortcutResult,
    encode_features,
    score_shortcut,
    shortcut_features,
    verdict,
)
from cxr_monai.evaluation.sources import (
    DEFINITIONS,
    SourceMetrics,
    SourceProbe,
    source_metrics,
    source_probe,
    source_verdict,
)
from cxr_monai.evaluation.stored_features import StoredFeatures, head_probabilities
from cxr_monai.io import CXRImage, read_cxr
from cxr_monai.predictor import Predictor
from cxr_monai.training.crossval import trained_bundles
from cxr_monai.training.layout import TRAINING_LOG, read_run_parameters, read_training_log
from cxr_monai.versions import package_versions

logger = logging.getLogger(__name__)

#: ``--split`` values besides ``fold:K`` and ``source:NAME``.
SPLITS = ("test", "training", "all")
SOURCE_SPLIT = "source:"
#: Out-of-fold: every fold's validation items, each scored by that fold's model (``--bundle`` is then the
#: output folder of ``cxr-monai train``).
CV_SPLIT = "cv"

#: Called as ``progress(stage, done, total)``; stages "evaluate" (evaluated items) then "baseline"
#: (training items decoded for the baseline only).
ProgressHook = Callable[[str, int, int], None]


def load_splits(path: str | Path) -> dict[str, list[DataItem]]:
    """The evaluable splits of a datalist read by :func:`cxr_monai.data.load_datalist` (which checks it
    and resolves relative image paths against its folder).

    Synthetic items (``"synthetic": true``, from ``cxr-monai synthesize``) are left out: figures are
    always on real images, and the shortcut baseline is fitted on real images only.
    Returns ``{"training": [...], "test": [...], "fold:K": [...] for each fold}``.

    Raises:
        DatasetError: the datalist is missing, not JSON, or not a ``cxr-monai prepare`` datalist.
    """
    datalist = load_datalist(path)
    splits: dict[str, list[DataItem]] = {"training": [], "test": []}
    for key in ("training", "test"):
        for entry in datalist[key]:
            if entry.get("synthetic"):
                continue
            item = DataItem.from_json(entry)
            splits[key].append(item)
            if key == "training":
                splits.setdefault(f"fold:{entry['fold']}", []).append(item)
    return splits


def select_split(splits: dict[str, list[DataItem]], split: str) -> list[DataItem]:
    """Items of ``test``, ``training``, ``all`` (training + test), ``fold:K`` or ``source:NAME``.

    ``source:NAME`` is every (non-synthetic) item of source NAME in the datalist, training and test
    alike: the honest test set of a model trained without that source (``train --exclude-source``).

    Raises:
        DatasetError: unknown split name or source, or the split is empty.
    """
    if split == "all":
        items = splits["training"] + splits["test"]
    elif split.startswith(SOURCE_SPLIT):
        name = split[len(SOURCE_SPLIT) :]
        everything = splits["training"] + splits["test"]
        items = [item for item in everything if item.source == name]
        if not items:
            present = sorted({item.source for item in everything})
            raise DatasetError(
                f"source {name!r} not in the datalist (sources present: {', '.join(present) or 'none'})"
            )
    elif split in splits:
        items = splits[split]
    elif split.startswith("fold:"):
        folds = sorted(k for k in splits if k.startswith("fold:"))
        raise DatasetError(
            f"split {split!r} not in the datalist (folds present: {', '.join(folds) or 'none'})"
        )
    else:
        raise DatasetError(
            f"unknown split {split!r}; expected one of {', '.join(SPLITS)}, fold:K or source:NAME"
        )
    if not items:
        raise DatasetError(f"split {split!r} of the datalist has no items")
    return items


def cross_validation_folds(
    cv_dir: str | Path, splits: dict[str, list[DataItem]]
) -> list[tuple[Path, list[DataItem]]]:
    """``(fold bundle, its validation items)`` for each fold in ``cv_dir/cv_summary.json`` (written by
    ``cxr-monai train``), leaving out the sources that fold's run excluded (and a fold left empty).

    Raises:
        BundleError: ``cv_dir`` is not a ``cxr-monai train`` output (:func:`trained_bundles`).
        DatasetError: a fold is not in the datalist, or no fold has items left.
    """
    _, rows, _ = trained_bundles(cv_dir)
    folds = []
    for fold, bundle in rows:
        excluded = set(read_run_parameters(bundle).get("exclude_sources") or [])
        items = [item for item in select_split(splits, f"fold:{fold}") if item.source not in excluded]
        if items:  # a fold holding only excluded sources has nothing to score
            folds.append((bundle, items))
    if not folds:
        raise DatasetError(f"no fold of {cv_dir} has validation items outside its excluded sources")
    return folds


def describe_split(split: str) -> str:
    """One line on what ``split`` holds (recorded in ``metrics.json`` as ``split_scope``)."""
    if split == CV_SPLIT:
        return (
            "out of fold: every non-synthetic training item, each scored by the model of the "
            "cross-validation fold that held it out (and the baseline fitted on the other folds)"
        )
    if split.startswith(SOURCE_SPLIT):
        name = split[len(SOURCE_SPLIT) :]
        return (
            f"every non-synthetic item of source {name!r} in the datalist, training and test alike: "
            "an honest test only for a model trained without that source"
        )
    if split == "all":
        return "every non-synthetic item of the datalist (training and test)"
    if split.startswith("fold:"):
        return f"the non-synthetic training items of {split}"
    return f"the non-synthetic items of the datalist's {split!r} list"


@dataclass
class EvaluationReport:
    """What :func:`evaluate` measured; :func:`write_report` writes it."""

    items: list[DataItem]
    y_prob: np.ndarray
    metrics: ClassificationMetrics
    shortcut: ShortcutResult | None
    #: plain-words sentences: the overall baseline comparison, then :func:`source_verdict`'s
    verdict: list[str]
    model: dict[str, Any]
    by_source: list[SourceMetrics]
    probe: SourceProbe
    #: (N, K) the baseline's probabilities, when it was scored
    baseline_prob: np.ndarray | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def y_true(self) -> np.ndarray:
        return np.asarray([item.label for item in self.items], dtype=np.int64)


def _decode(
    items: Sequence[DataItem], skipped: list[dict[str, str]], stage: str, progress: ProgressHook
) -> Iterator[tuple[DataItem, CXRImage]]:
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


@dataclass
class _Predictions:
    """One predictor's outputs on its readable items, before any figure is computed."""

    items: list[DataItem]
    #: (N, K) the model's probabilities and (N, F) its pooled features
    y_prob: np.ndarray
    pooled: np.ndarray
    #: the baseline's features of each evaluated image (by path), its (N, K) probabilities, the number
    #: of training items it was fitted on and whether those overlapped the evaluated ones
    features: dict[str, ShortcutFeatures]
    baseline_prob: np.ndarray | None = None
    n_baseline_training: int = 0
    baseline_overlap: bool = False


def _predict(
    predictor: Predictor,
    items: Sequence[DataItem],
    shortcut: bool,
    batch_size: int,
    skipped: list[dict[str, str]],
    progress: ProgressHook,
    stored: StoredFeatures,
) -> _Predictions:
    """The model's probabilities and pooled features, and (``shortcut``) the baseline's features, of
    every readable item: from ``stored`` where it has them, else from one decode of the image (and then
    stored)."""
    probs: dict[int, np.ndarray] = {}
    pooled: dict[int, np.ndarray] = {}
    features: dict[str, ShortcutFeatures] = {}
    to_decode: list[int] = []
    for index, item in enumerate(items):
        known = stored.pooled(item.image)
        if known is not None:
            pooled[index] = known
        found = stored.shortcut(item.image) if shortcut else None
        if found is not None:
            features[item.image] = found
        if known is None or (shortcut and found is None):
            to_decode.append(index)
    pending: list[tuple[int, CXRImage]] = []

    def flush() -> None:
        if pending:
            batch_probs, batch_pooled = predictor.predict_with_features(
                [img for _, img in pending], batch_size
            )
            for (index, _), p, f in zip(pending, batch_probs, batch_pooled, strict=True):
                probs[index], pooled[index] = p, f
                stored.keep_pooled(items[index].image, f)
        pending.clear()

    by_path = {id(items[i]): i for i in to_decode}
    for item, image in _decode([items[i] for i in to_decode], skipped, "evaluate", progress):
        index = by_path[id(item)]
        if shortcut and item.image not in features:
            features[item.image] = shortcut_features(image)
            stored.keep_shortcut(item.image, features[item.image])
        if index not in pooled:
            pending.append((index, image))
            if len(pending) == batch_size:
                flush()
    flush()
    from_store = [i for i in pooled if i not in probs]
    if from_store:
        scored = head_probabilities(predictor, np.stack([pooled[i] for i in from_store]))
        probs.update(zip(from_store, scored, strict=True))
    kept = sorted(probs)
    if not kept:
        raise DatasetError(f"none of the {len(items)} evaluated images could be read")
    return _Predictions(
        [items[i] for i in kept],
        np.stack([probs[i] for i in kept]).astype(np.float64),
        np.stack([pooled[i] for i in kept]),
        features,
    )


def evaluate(
    predictor: Predictor,
    items: Sequence[DataItem],
    training_items: Sequence[DataItem] = (),
    *,
    shortcut: bool = True,
    batch_size: int = 8,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    by_patient: bool = True,
    progress: ProgressHook | None = None,
    feature_cache: Path | None = None,
) -> EvaluationReport:
    """Predict every item, measure the model, and (``shortcut``) fit and score the baseline; figures per
    source and within each source, and the source probe on the model's pooled features (and on the
    baseline's features), for both side by side.

    Unreadable images are skipped and listed in the report. ``feature_cache``: a feature store folder
    (:mod:`cxr_monai.evaluation.stored_features`) read and filled instead of decoding every image.

    The bootstrap resamples patients when ``by_patient`` and every evaluated item has a ``patient_id``,
    else images; the probe's folds keep patients whole under the same condition.

    Raises:
        DatasetError: no evaluated image could be read, or no usable training items for the baseline.
    """
    report_progress = progress or (lambda stage, done, total: None)
    skipped: list[dict[str, str]] = []
    stored = StoredFeatures.open(feature_cache, predictor, shortcut)
    predicted = _predict(predictor, items, shortcut, batch_size, skipped, report_progress, stored)
    if shortcut:
        known = dict(predicted.features)
        _fit_baseline(predicted, training_items, known, skipped, seed, report_progress, stored)
    return _score([predicted], _model_info(predictor), shortcut, n_boot, seed, by_patient, skipped)


def evaluate_cross_validated(
    folds: Sequence[tuple[Predictor, Sequence[DataItem]]],
    training_items: Sequence[DataItem],
    *,
    shortcut: bool = True,
    batch_size: int = 8,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    by_patient: bool = True,
    progress: ProgressHook | None = None,
    feature_cache: Path | None = None,
) -> EvaluationReport:
    """Out-of-fold evaluation of a cross-validation: each ``(predictor, items)`` pair is one fold's model
    and that fold's validation items, which it never trained on; the disease-blind baseline of each fold
    is fitted on the other ``training_items`` in the same way. The figures are then computed once over
    all folds' items, as :func:`evaluate` computes them over one split: every training-split image counts
    once, so the intervals are narrower than the test split's. (The source probe pools the folds'
    features; with a frozen trunk they come from one and the same network.)
    """
    if not folds:
        raise DatasetError("no folds to evaluate")
    report_progress = progress or (lambda stage, done, total: None)
    skipped: list[dict[str, str]] = []
    parts = []
    for n, (predictor, items) in enumerate(folds):

        def fold_progress(stage: str, done: int, total: int, n: int = n) -> None:
            report_progress(stage, done + n * total, total * len(folds))

        stored = StoredFeatures.open(feature_cache, predictor, shortcut)
        parts.append(_predict(predictor, items, shortcut, batch_size, skipped, fold_progress, stored))
    if shortcut:  # each image decoded once: the folds' evaluated images are the others' fitting images
        known = {path: f for part in parts for path, f in part.features.items()}
        for part in parts:
            evaluated = {item.image for item in part.items}
            fit = [item for item in training_items if item.image not in evaluated]
            _fit_baseline(part, fit, known, skipped, seed, report_progress, stored)
    return _score(parts, _model_info(folds[0][0]), shortcut, n_boot, seed, by_patient, skipped)


def _model_info(predictor: Predictor) -> dict[str, Any]:
    return {
        "name": predictor.model_name,
        "version": predictor.model_version,
        "backbone": predictor.backbone,
        "spatial_size": predictor.spatial_size,
    }


def _score(
    parts: Sequence[_Predictions],
    model: dict[str, Any],
    shortcut: bool,
    n_boot: int,
    seed: int,
    by_patient: bool,
    skipped: list[dict[str, str]],
) -> EvaluationReport:
    """Every figure of the report over the items of ``parts`` taken together."""
    kept = [item for part in parts for item in part.items]
    y_true = np.asarray([item.label for item in kept], dtype=np.int64)
    y_prob = np.concatenate([part.y_prob for part in parts])
    groups = [item.patient_id for item in kept] if by_patient and all(i.patient_id for i in kept) else None
    metrics = classification_metrics(y_true, y_prob, CLASS_NAMES, n_boot=n_boot, seed=seed, groups=groups)

    result = baseline_prob = None
    sentences = []
    features = {path: f for part in parts for path, f in part.features.items()}
    if shortcut:
        baseline_prob = np.concatenate(
            [part.baseline_prob for part in parts if part.baseline_prob is not None]
        )
        result = score_shortcut(
            baseline_prob.argmax(axis=1),
            y_true,
            y_prob.argmax(axis=1),
            class_names=CLASS_NAMES,
            n_training_items=min(part.n_baseline_training for part in parts),
            fitted_on_evaluated_items=any(part.baseline_overlap for part in parts),
            n_boot=n_boot,
            seed=seed,
            groups=groups,
        )
        majority = float(np.bincount(y_true, minlength=NUM_CLASSES).max() / len(y_true))
        sentences.append(verdict(metrics.accuracy, result, majority))
    sources = [item.source for item in kept]
    by_source = source_metrics(
        y_true, y_prob, sources, baseline_prob, groups=groups, n_boot=n_boot, seed=seed
    )
    probe = source_probe(
        np.concatenate([part.pooled for part in parts]),
        sources,
        encode_features([features[item.image] for item in kept]) if shortcut else None,
        groups=groups,
        seed=seed,
    )
    sentences += source_verdict(by_source, probe)
    return EvaluationReport(
        kept, y_prob, metrics, result, sentences, model, by_source, probe, baseline_prob, skipped
    )


def _fit_baseline(
    predicted: _Predictions,
    training_items: Sequence[DataItem],
    known: dict[str, ShortcutFeatures],
    skipped: list[dict[str, str]],
    seed: int,
    progress: ProgressHook,
    stored: StoredFeatures,
) -> None:
    """Fit the baseline on training items not evaluated (all training items if that leaves fewer than
    two classes, flagged) and put its probabilities on the evaluated items into ``predicted``.

    ``known``: baseline features already computed, by image path (the evaluated images' among them);
    training images not in it are read from ``stored`` or decoded once (and stored), and added to it,
    except those ``skipped`` already lists.
    """
    evaluated = {item.image for item in predicted.items}
    fit_items = [item for item in training_items if item.image not in evaluated]
    overlap = len({item.label for item in fit_items}) < 2
    if overlap:
        fit_items = list(training_items)
    unreadable = {entry["image"] for entry in skipped}  # tried once already: listed once
    todo = [item for item in fit_items if item.image not in known and item.image not in unreadable]
    for item in todo:
        found = stored.shortcut(item.image)
        if found is not None:
            known[item.image] = found
    todo = [item for item in todo if item.image not in known]
    for item, image in _decode(todo, skipped, "baseline", progress):
        known[item.image] = shortcut_features(image)
        stored.keep_shortcut(item.image, known[item.image])
    usable = [item for item in fit_items if item.image in known]
    if len({item.label for item in usable}) < 2:
        raise DatasetError(
            "the shortcut baseline needs training items of at least two classes in the datalist's "
            "'training' list (or pass --no-shortcut)"
        )
    baseline = ShortcutBaseline(seed=seed).fit([known[i.image] for i in usable], [i.label for i in usable])
    predicted.baseline_prob = baseline.predict_proba([known[item.image] for item in predicted.items])
    predicted.n_baseline_training = len(usable)
    predicted.baseline_overlap = overlap


def report_dict(report: EvaluationReport, **context: Any) -> dict[str, Any]:
    """The ``metrics.json`` content; ``context`` (bundle, datalist, split, ...) is recorded as given."""
    data: dict[str, Any] = {
        "intended_use": RESEARCH_USE_NOTICE,
        "class_names": list(CLASS_NAMES),
        "model": dict(report.model),
        **context,
        "model_metrics": report.metrics.to_dict(),
        "shortcut_check": None,
        "by_source": {
            "definitions": dict(DEFINITIONS),
            "bootstrap": report.metrics.bootstrap,
            "sources": {s.source: s.to_dict() for s in report.by_source},
        },
        "source_probe": report.probe.to_dict(),
        "verdict": list(report.verdict),
        "skipped_images": list(report.skipped),
        "versions": package_versions(),
    }
    if report.shortcut is not None:
        data["shortcut_check"] = {**report.shortcut.to_dict(), "context": CONTEXT}
    return data


def predictions_csv(report: EvaluationReport) -> str:
    """Per-image CSV: image path, true and predicted class, each class probability, and the baseline's
    prediction. No patient data (not even the patient id)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = ["image", "source", "true_class", "predicted_class", *(f"prob_{name}" for name in CLASS_NAMES)]
    if report.shortcut is not None:
        header.append("baseline_predicted_class")
    writer.writerow(header)
    for n, (item, probs) in enumerate(zip(report.items, report.y_prob, strict=True)):
        row = [item.image, item.source, CLASS_NAMES[item.label], CLASS_NAMES[int(np.argmax(probs))]]
        row += [f"{p:.6f}" for p in probs]
        if report.shortcut is not None:
            row.append(CLASS_NAMES[int(report.shortcut.predictions[n])])
        writer.writerow(row)
    return buffer.getvalue()


def write_report(
    report: EvaluationReport, out_dir: str | Path, bundle_dirs: Sequence[str | Path], **context: Any
) -> dict[str, Path]:
    """Write ``metrics.json``, ``predictions.csv`` and the PNG plots into ``out_dir``; return their paths.

    The training-curves plot draws the ``logs/training_log.json`` of each of ``bundle_dirs`` (one
    bundle, or every fold of a cross-validation); a bundle without it is left out, and when none has
    one the plot is skipped and ``metrics.json`` says so under ``notes``.
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
        "sources.png": source_figure(report.by_source, f"Per source and within source - {name}"),
    }
    logs = [log for log in map(read_training_log, bundle_dirs) if log]
    title = f"Training curves - {name}" + (f", {len(logs)} folds" if len(logs) > 1 else "")
    curves = training_curves_figure(logs, title) if logs else None
    if curves is None:
        where = ", ".join(str(Path(b) / TRAINING_LOG) for b in bundle_dirs)
        notes.append(f"no training curves: {where} absent or without numeric figures")
    else:
        figures["training_curves.png"] = curves
    written = {file: save_png(fig, out / file) for file, fig in figures.items()}
    write_text_atomic(out / "predictions.csv", predictions_csv(report))
    written["predictions.csv"] = out / "predictions.csv"
    data = report_dict(report, **context, plots=sorted(figures), notes=notes)
    write_json_atomic(out / "metrics.json", data)
    written["metrics.json"] = out / "metrics.json"
    return written
