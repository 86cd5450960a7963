"""Trained runs side by side (the paper's Table 2 and Figs. 4-7): ``cxr-monai compare``.

A run is a ``cxr-monai train`` output folder (``fold_K/``, ``final/``, ``cv_summary.json``). Every model is
scored by :func:`cxr_monai.evaluation.report.evaluate` on the same split with the same bootstrap, so each
figure equals what ``cxr-monai evaluate`` reports for that bundle. Per run:

* the ``final`` model's accuracy and per-class precision / recall / F1 with 95 % bootstrap CIs;
* when the run has several fold models, each is scored too and the table gives mean ± sd over folds;
* cost: parameters, ``models/model.pt`` size, training seconds per epoch (mean ``train_seconds`` of the
  folds' ``logs/training_log.json``) and inference images/s measured here (forward pass only, pre-processed
  batches);
* the disease-blind shortcut baseline's row (fitted once on the datalist's training items);
* paired differences: accuracy(B) - accuracy(A) of every pair of final models on the same images, with a
  percentile bootstrap CI from one set of resamples applied to both (patients resampled, as in
  :mod:`cxr_monai.evaluation.metrics`);
* for augmentation-v2 runs, the GAN quality of each fold (:mod:`cxr_monai.gan.quality`) and the share of
  that run's synthetic images each v1 run's final model calls COVID-19.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

from cxr_monai.atomic import write_json_atomic, write_text_atomic
from cxr_monai.constants import CLASS_NAMES, RESEARCH_USE_NOTICE
from cxr_monai.data.sources import DataItem
from cxr_monai.errors import DatasetError
from cxr_monai.evaluation.metrics import (
    DEFAULT_N_BOOT,
    ClassificationMetrics,
    Estimate,
    bootstrap_interval,
    classification_metrics,
    to_estimate,
)
from cxr_monai.evaluation.plots import _estimate_bars, _figure, save_png
from cxr_monai.evaluation.report import EvaluationReport, evaluate
from cxr_monai.io import read_cxr
from cxr_monai.training.crossval import trained_bundles

#: Per-class figures of the table, in order (the paper's Table 2).
TABLE_FIGURES: tuple[str, ...] = ("precision", "recall", "f1")
FIGURES: dict[str, str] = {
    "curves": "fig4_training_curves.png",
    "confusion": "fig5_confusion_matrices.png",
    "classwise": "fig6_classwise.png",
    "gradcam": "fig7_gradcam.png",
}

#: ``progress(stage, done, total)``.
ProgressHook = Callable[[str, int, int], None]


@dataclass
class RunScores:
    """One run, scored. ``final``: the final model's report; ``folds``: test metrics per fold model."""

    name: str
    path: Path
    summary: dict[str, Any]
    final: EvaluationReport
    folds: dict[int, ClassificationMetrics]
    cost: dict[str, Any]
    logs: list[list[dict[str, Any]]] = field(default_factory=list)

    @property
    def augmentation(self) -> str:
        return str((self.summary.get("augmentation") or {}).get("kind", "v1"))

    @property
    def label(self) -> str:
        return f"{self.name} ({self.final.model['backbone']}, {self.augmentation})"


def patient_groups(items: Sequence[DataItem], by_patient: bool) -> list[str] | None:
    """Patient ids for the cluster bootstrap when ``by_patient`` and every item has one (as evaluate)."""
    if by_patient and all(item.patient_id for item in items):
        return [str(item.patient_id) for item in items]
    return None


def images_per_second(
    predictor: Any, items: Sequence[DataItem], batch_size: int, min_seconds: float = 0.5
) -> float:
    """Forward-pass throughput of ``predictor`` on one pre-processed batch of ``items`` (warm-up once, then
    at least 3 passes and ``min_seconds``)."""
    batch = torch.stack([torch.as_tensor(predictor.preprocess(item.image)) for item in items[:batch_size]])
    predictor.predict_tensors(batch)
    passes, start = 0, time.perf_counter()
    while passes < 3 or time.perf_counter() - start < min_seconds:
        predictor.predict_tensors(batch)
        passes += 1
    return float(passes * len(batch) / (time.perf_counter() - start))


def score_run(
    run: str | Path,
    items: Sequence[DataItem],
    training_items: Sequence[DataItem],
    *,
    shortcut: bool,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    batch_size: int = 8,
    by_patient: bool = True,
    device: str | None = None,
    name: str | None = None,
    progress: ProgressHook | None = None,
) -> RunScores:
    """Score the run's final model (with the shortcut baseline when ``shortcut``) and each fold model on
    ``items`` through :func:`evaluate`, and measure its cost."""
    from cxr_monai.predictor import Predictor
    from cxr_monai.training import read_training_log

    final_dir, fold_dirs, summary = trained_bundles(run)
    name = name or Path(run).name

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(f"{name}: {stage}", done, total)

    predictor = Predictor.from_bundle(final_dir, device=device, with_sites=False)
    final = evaluate(
        predictor, items, training_items, shortcut=shortcut, batch_size=batch_size, n_boot=n_boot, seed=seed,
        by_patient=by_patient, progress=report,
    )  # fmt: skip
    folds = {}
    for k, fold_dir in fold_dirs:
        fold_predictor = Predictor.from_bundle(fold_dir, device=device, with_sites=False)
        folds[k] = evaluate(
            fold_predictor, items, shortcut=False, batch_size=batch_size, n_boot=n_boot, seed=seed,
            by_patient=by_patient, progress=_renamed(report, f"fold {k}"),
        ).metrics  # fmt: skip
    logs = [read_training_log(d) for _, d in fold_dirs] or [read_training_log(final_dir)]
    seconds = [float(e["train_seconds"]) for log in logs for e in log if e.get("train_seconds") is not None]
    cost = {
        "parameters": int(sum(p.numel() for p in predictor.model.parameters())),
        "model_pt_bytes": int((final_dir / "models" / "model.pt").stat().st_size),
        "train_seconds_per_epoch": statistics.fmean(seconds) if seconds else None,
        "inference_images_per_second": images_per_second(predictor, final.items, batch_size),
        "inference_device": str(predictor.device),
        "inference_batch_size": int(min(batch_size, len(final.items))),
    }
    return RunScores(name, Path(run), summary, final, folds, cost, [log for log in logs if log])


def _renamed(hook: ProgressHook, stage: str) -> ProgressHook:
    """``hook`` with every stage reported as ``stage``."""
    return lambda _stage, done, total: hook(stage, done, total)


def fold_spread(folds: dict[int, ClassificationMetrics]) -> dict[str, Any]:
    """Mean and sd (n - 1) over fold models of accuracy and each class's precision / recall / F1."""
    from cxr_monai.training.crossval import aggregate

    out: dict[str, Any] = {
        "n_folds": len(folds),
        "accuracy": aggregate([m.accuracy.value for m in folds.values()]),
    }
    for name in CLASS_NAMES:
        out[name] = {
            fig: aggregate([m.per_class[name][fig].value for m in folds.values()]) for fig in TABLE_FIGURES
        }
    return out


def metrics_row(metrics: ClassificationMetrics) -> dict[str, Any]:
    """Accuracy and per-class precision / recall / F1 estimates (value, ci_low, ci_high)."""
    return {
        "accuracy": metrics.accuracy.to_dict(),
        "per_class": {
            name: {fig: metrics.per_class[name][fig].to_dict() for fig in TABLE_FIGURES}
            for name in CLASS_NAMES
        },
    }


def paired_accuracy_difference(
    y_true: np.ndarray,
    prob_a: np.ndarray,
    prob_b: np.ndarray,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
) -> Estimate:
    """accuracy(B) - accuracy(A) on the same N images (``prob_*`` (N, K)), with a percentile bootstrap
    CI: each resample (of images, or of whole patients with ``groups``) scores both models, so the
    interval reflects the pairing."""
    y_true = np.asarray(y_true)
    correct_a = (np.asarray(prob_a).argmax(axis=1) == y_true).astype(np.float64)
    correct_b = (np.asarray(prob_b).argmax(axis=1) == y_true).astype(np.float64)
    difference = correct_b - correct_a
    point = float(difference.mean())
    if n_boot <= 0:
        return Estimate(point)
    low, high = bootstrap_interval(
        lambda idx: np.array([difference[idx].mean()]), len(y_true), n_boot=n_boot, seed=seed, groups=groups
    )[:, 0]
    return to_estimate(point, low, high)


def paired_differences(
    runs: Sequence[RunScores], *, n_boot: int, seed: int, by_patient: bool
) -> list[dict[str, Any]]:
    """Every pair (A before B in ``runs``) of final models on the images both scored."""
    out = []
    for i, a in enumerate(runs):
        for b in runs[i + 1 :]:
            index_b = {item.image: n for n, item in enumerate(b.final.items)}
            shared = [
                (n, index_b[item.image]) for n, item in enumerate(a.final.items) if item.image in index_b
            ]
            if not shared:
                continue
            ia, ib = (np.asarray(x) for x in zip(*shared, strict=True))
            items = [a.final.items[n] for n in ia]
            estimate = paired_accuracy_difference(
                a.final.y_true[ia], a.final.y_prob[ia], b.final.y_prob[ib],
                n_boot=n_boot, seed=seed, groups=patient_groups(items, by_patient),
            )  # fmt: skip
            out.append({"a": a.label, "b": b.label, "n_images": len(shared), "accuracy_b_minus_a": estimate})
    return out


def difference_sentence(row: dict[str, Any]) -> str:
    """Plain words for one paired difference."""
    est: Estimate = row["accuracy_b_minus_a"]
    if est.value is None:
        return f"{row['b']} vs {row['a']}: undefined"
    text = f"{row['b']} minus {row['a']}: accuracy {est.value:+.3f}"
    if est.ci_low is None or est.ci_high is None:
        return text + " (no interval)"
    text += f" [95% CI {est.ci_low:+.3f}, {est.ci_high:+.3f}] on {row['n_images']} paired images: "
    if est.ci_low > 0:
        return text + f"{row['b']} is better."
    if est.ci_high < 0:
        return text + f"{row['a']} is better."
    return text + "the interval includes 0, no evidence of a difference."


def v1_call_rates(runs: Sequence[RunScores], batch_size: int = 8) -> list[dict[str, Any]]:
    """Share of each v2 run's synthetic images that each v1 run's final model calls COVID-19."""
    from cxr_monai.data import load_datalist
    from cxr_monai.gan.quality import covid_call_rate

    rows = []
    v1_runs = [r for r in runs if r.augmentation == "v1"]
    for run in runs:
        record = run.summary.get("augmentation") or {}
        if run.augmentation != "v2" or not v1_runs:
            continue
        content = load_datalist(record["augmented_datalist"])
        synthetic = [str(i["image"]) for i in content["training"] if i.get("synthetic")]
        for v1 in v1_runs:
            final_dir = trained_bundles(v1.path)[0]
            rate = covid_call_rate(final_dir, synthetic, batch_size)
            rows.append(
                {"v2_run": run.label, "v1_run": v1.label, "n_synthetic": len(synthetic), "covid_rate": rate}
            )
    return rows


# ---- figures ---------------------------------------------------------------------------------------------


def _mean_curve(logs: Sequence[Sequence[dict[str, Any]]], key: str) -> tuple[list[int], list[float]]:
    """Per-epoch mean of ``key`` over the logs that have it (folds of one run)."""
    by_epoch: dict[int, list[float]] = {}
    for log in logs:
        for entry in log:
            value = entry.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                by_epoch.setdefault(int(entry["epoch"]), []).append(float(value))
    epochs = sorted(by_epoch)
    return epochs, [statistics.fmean(by_epoch[e]) for e in epochs]


def curves_figure(runs: Sequence[RunScores]) -> Figure:
    """Fig. 4: training (solid) and validation (dashed) loss and accuracy of every run on shared axes
    (mean over the run's folds per epoch)."""
    fig = _figure("Training and validation curves (mean over folds)", 12.0, 4.8)
    loss_ax, acc_ax = fig.subplots(1, 2, sharex=True)
    for n, run in enumerate(runs):
        colour = f"C{n}"
        for ax, figure in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            for stage, style in (("train", "-"), ("val", "--")):
                epochs, values = _mean_curve(run.logs, f"{stage}_{figure}")
                if epochs:
                    ax.plot(epochs, values, style, color=colour, marker="o", label=f"{run.label} {stage}")
    for ax, figure in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(figure)
    _shared_legend(fig, [loss_ax, acc_ax])
    return fig


def _shared_legend(fig: Figure, axes: Sequence[Axes]) -> None:
    """One legend right of the panels (from the first axes' entries) instead of one per panel: with
    several runs, per-panel legends hide the bars and curves they label."""
    for ax in axes:
        legend = ax.get_legend()
        if legend is not None:
            legend.remove()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)


def confusion_figure(runs: Sequence[RunScores]) -> Figure:
    """Fig. 5: the final models' confusion matrices (rows = true class) side by side."""
    fig = _figure("Confusion matrices (rows: true class, columns: predicted)", 4.2 * len(runs) + 0.5, 4.6)
    for ax, run in zip(np.atleast_1d(fig.subplots(1, len(runs))), runs, strict=True):
        ConfusionMatrixDisplay(run.final.metrics.confusion_matrix, display_labels=list(CLASS_NAMES)).plot(
            ax=ax, colorbar=False, values_format="d"
        )
        ax.set_title(run.label, fontsize=9)
    return fig


def class_accuracy(cm: np.ndarray, k: int) -> float:
    """One-vs-rest accuracy of class ``k`` from a confusion matrix (K, K): (TP + TN) / N."""
    cm = np.asarray(cm)
    tp = cm[k, k]
    tn = cm.sum() - cm[k, :].sum() - cm[:, k].sum() + tp
    return float((tp + tn) / cm.sum())


def classwise_figure(runs: Sequence[RunScores]) -> Figure:
    """Fig. 6: per class precision, recall (95 % CI bars) and one-vs-rest accuracy, one bar per run."""
    fig = _figure("Class-wise precision, recall and accuracy (final models)", 15.0, 3.0 + 0.5 * len(runs))
    axes = fig.subplots(1, 3)
    for ax, figure in zip(axes, ("precision", "recall", "accuracy"), strict=True):
        series: dict[str, list[Estimate | None]] = {}
        for run in runs:
            m = run.final.metrics
            if figure == "accuracy":
                cm = m.confusion_matrix
                series[run.label] = [Estimate(class_accuracy(cm, k)) for k in range(len(CLASS_NAMES))]
            else:
                series[run.label] = [m.per_class[name][figure] for name in CLASS_NAMES]
        _estimate_bars(
            ax, list(CLASS_NAMES), series, figure if figure != "accuracy" else "one-vs-rest accuracy"
        )
        ax.set_title(figure)
    _shared_legend(fig, list(axes))
    return fig


def example_items(items: Sequence[DataItem]) -> list[DataItem]:
    """The first item of each class present (class order), for Fig. 7."""
    chosen: dict[int, DataItem] = {}
    for item in items:
        chosen.setdefault(item.label, item)
    return [chosen[k] for k in sorted(chosen)]


def gradcam_figure(
    runs: Sequence[RunScores], examples: Sequence[DataItem], device: str | None = None
) -> Figure:
    """Fig. 7: Grad-CAM of each run's final model (rows) on the same test images, one per class (columns),
    explaining the predicted class."""
    from cxr_monai.explain.gradcam import Explainer, normalise
    from cxr_monai.explain.overlay import blend
    from cxr_monai.predictor import Predictor

    images = [read_cxr(item.image) for item in examples]
    fig = _figure(
        "Grad-CAM of the predicted class, same test images", 3.2 * len(examples) + 0.5, 3.4 * len(runs)
    )
    axes = np.atleast_2d(fig.subplots(len(runs), len(examples), squeeze=False))
    for r, run in enumerate(runs):
        predictor = Predictor.from_bundle(trained_bundles(run.path)[0], device=device, with_sites=False)
        explanations = Explainer(predictor.model, predictor.preprocess).explain(images)
        for c, (item, image, expl) in enumerate(zip(examples, images, explanations, strict=True)):
            ax = axes[r, c]
            ax.imshow(blend(image.pixels, normalise(expl.raw_map)))
            predicted = CLASS_NAMES[expl.predicted_index]
            ax.set_title(
                f"{run.label}\ntrue {CLASS_NAMES[item.label]}, predicted {predicted} "
                f"({expl.probabilities[expl.predicted_index]:.2f})",
                fontsize=7,
            )
            ax.set_axis_off()
    return fig


# ---- report ----------------------------------------------------------------------------------------------


def _cell(est: Estimate) -> str:
    return est.format()


def _spread(agg: dict[str, Any]) -> str:
    if agg["mean"] is None:
        return "n/a"
    return f"{agg['mean']:.3f}" + ("" if agg["sd"] is None else f" ± {agg['sd']:.3f}")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def compare_runs(
    runs: Sequence[str | Path],
    splits: dict[str, list[DataItem]],
    items: Sequence[DataItem],
    *,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    batch_size: int = 8,
    by_patient: bool = True,
    device: str | None = None,
    progress: ProgressHook | None = None,
) -> tuple[list[RunScores], ClassificationMetrics | None]:
    """Score every run (the first one also fits the shortcut baseline); returns the runs and the
    baseline's metrics on the same items. DatasetError for no runs or two runs with the same folder."""
    if not runs:
        raise DatasetError("no runs to compare: pass one or more `cxr-monai train` --out folders")
    paths = [Path(r).resolve() for r in runs]
    if len(set(paths)) < len(paths):
        raise DatasetError("the same run folder is given twice")
    names = [
        p.name if [q.name for q in paths].count(p.name) == 1 else f"{p.parent.name}/{p.name}" for p in paths
    ]
    scored = []
    for n, (path, name) in enumerate(zip(paths, names, strict=True)):
        scored.append(
            score_run(
                path,
                items,
                splits["training"],
                shortcut=n == 0,
                n_boot=n_boot,
                seed=seed,
                batch_size=batch_size,
                by_patient=by_patient,
                device=device,
                name=name,
                progress=progress,
            )
        )
    first = scored[0].final
    baseline = None
    if first.baseline_prob is not None:
        groups = patient_groups(first.items, by_patient)
        baseline = classification_metrics(
            first.y_true, first.baseline_prob, n_boot=n_boot, seed=seed, groups=groups
        )
    return scored, baseline


def write_comparison(
    runs: Sequence[RunScores],
    baseline: ClassificationMetrics | None,
    out: str | Path,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    by_patient: bool = True,
    gradcam: bool = True,
    device: str | None = None,
    **context: Any,
) -> dict[str, Path]:
    """Write the figures, ``compare.json`` and ``report.md`` into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        FIGURES["curves"]: curves_figure(runs),
        FIGURES["confusion"]: confusion_figure(runs),
        FIGURES["classwise"]: classwise_figure(runs),
    }
    examples = example_items(runs[0].final.items)
    if gradcam:
        figures[FIGURES["gradcam"]] = gradcam_figure(runs, examples, device)
    written = {name: save_png(fig, out / name) for name, fig in figures.items()}
    differences = paired_differences(runs, n_boot=n_boot, seed=seed, by_patient=by_patient)
    call_rates = v1_call_rates(runs)
    data = {
        "intended_use": RESEARCH_USE_NOTICE,
        "class_names": list(CLASS_NAMES),
        **context,
        "bootstrap": runs[0].final.metrics.bootstrap,
        "runs": [
            {
                "name": run.name,
                "label": run.label,
                "path": str(run.path),
                "backbone": run.final.model["backbone"],
                "spatial_size": run.final.model["spatial_size"],
                "augmentation": run.augmentation,
                "n_images": int(sum(run.final.metrics.n_per_class.values())),
                "final": metrics_row(run.final.metrics),
                "folds": {str(k): metrics_row(m) for k, m in sorted(run.folds.items())},
                "fold_spread": fold_spread(run.folds) if run.folds else None,
                "cost": run.cost,
                "gan_quality": [
                    {"fold": f["fold"], **(f.get("quality") or {})}
                    for f in (run.summary.get("augmentation") or {}).get("folds", [])
                ],
            }
            for run in runs
        ],
        "shortcut_baseline": None if baseline is None else metrics_row(baseline),
        "paired_differences": [
            {**d, "accuracy_b_minus_a": d["accuracy_b_minus_a"].to_dict()} for d in differences
        ],
        "v1_covid_rate_on_synthetic": call_rates,
        "gradcam_examples": [item.image for item in examples] if gradcam else [],
        "figures": sorted(figures),
    }
    write_json_atomic(out / "compare.json", data)
    written["compare.json"] = out / "compare.json"
    write_text_atomic(
        out / "report.md", _markdown(runs, baseline, differences, call_rates, sorted(figures), context)
    )
    written["report.md"] = out / "report.md"
    return written


def _markdown(
    runs: Sequence[RunScores],
    baseline: ClassificationMetrics | None,
    differences: Sequence[dict[str, Any]],
    call_rates: Sequence[dict[str, Any]],
    figures: Sequence[str],
    context: dict[str, Any],
) -> str:
    from cxr_monai.gan.quality import describe

    first = runs[0].final.metrics
    boot = first.bootstrap
    lines = [
        "# Runs compared",
        "",
        f"**{RESEARCH_USE_NOTICE}.**",
        "",
        f"Split `{context.get('split', '?')}` of `{context.get('datalist', '?')}`: "
        + ", ".join(f"{name} {n}" for name, n in first.n_per_class.items())
        + f"; 95% CIs: percentile bootstrap, {boot['n_resamples']} resamples by {boot['unit']}.",
        "",
        "## Final models (Table 2)",
        "",
    ]
    header = ["run", "accuracy", *(f"{name} {fig}" for name in CLASS_NAMES for fig in TABLE_FIGURES)]
    rows = []
    for label, m in [(r.label, r.final.metrics) for r in runs] + (
        [("shortcut baseline (disease-blind)", baseline)] if baseline is not None else []
    ):
        rows.append(
            [
                label,
                _cell(m.accuracy),
                *(_cell(m.per_class[n][f]) for n in CLASS_NAMES for f in TABLE_FIGURES),
            ]
        )
    lines += _table(header, rows)
    with_folds = [r for r in runs if r.folds]
    if with_folds:
        lines += ["", "## Fold models on the same split (mean ± sd over folds)", ""]
        rows = []
        for run in with_folds:
            spread = fold_spread(run.folds)
            rows.append(
                [f"{run.label} ({spread['n_folds']} folds)", _spread(spread["accuracy"])]
                + [_spread(spread[n][f]) for n in CLASS_NAMES for f in TABLE_FIGURES]
            )
        lines += _table(header, rows)
    lines += ["", "## Cost", ""]
    lines += _table(
        ["run", "parameters", "model.pt (MB)", "training s/epoch", "inference images/s (device, batch)"],
        [
            [
                r.label,
                f"{r.cost['parameters']:,}",
                f"{r.cost['model_pt_bytes'] / 1e6:.1f}",
                "n/a"
                if r.cost["train_seconds_per_epoch"] is None
                else f"{r.cost['train_seconds_per_epoch']:.1f}",
                f"{r.cost['inference_images_per_second']:.1f} ({r.cost['inference_device']}, "
                f"{r.cost['inference_batch_size']})",
            ]
            for r in runs
        ],
    )
    if differences:
        lines += ["", "## Paired differences (same images, same resamples)", ""]
        lines += [f"- {difference_sentence(d)}" for d in differences]
    v2 = [r for r in runs if r.augmentation == "v2"]
    if v2:
        lines += ["", "## GAN quality (augmentation v2)", ""]
        for run in v2:
            for entry in (run.summary.get("augmentation") or {}).get("folds", []):
                if entry.get("quality"):
                    lines.append(f"- {run.label}, fold {entry['fold']} GAN:")
                    lines += [f"  - {line}" for line in describe(entry["quality"])]
        lines += [
            f"- {c['v1_run']} calls {c['covid_rate']:.3f} of the {c['n_synthetic']} synthetic images of "
            f"{c['v2_run']} COVID-19"
            for c in call_rates
        ]
    lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in figures]
    lines += [
        "",
        "Fig. 4 curves are means over each run's folds; Figs. 5-7 use the final models. The shortcut "
        "baseline sees only thumbnails, size and colour mode: a model near it may be reading the source, "
        "not the disease.",
    ]
    return "\n".join(lines) + "\n"
