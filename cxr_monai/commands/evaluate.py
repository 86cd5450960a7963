"""``cxr-monai evaluate``: score a trained bundle on a datalist split, with the shortcut check beside it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cxr_monai.commands import bundle_option, console, examples, resolve_bundle, user_errors
from cxr_monai.constants import CLASS_NAMES, RESEARCH_USE_NOTICE

if TYPE_CHECKING:
    from cxr_monai.evaluation.metrics import Estimate
    from cxr_monai.evaluation.report import EvaluationReport
    from cxr_monai.evaluation.sources import ScorerFigures, SourceMetrics

EPILOG = examples(
    "cxr-monai evaluate --bundle out/train/final \\\n"
    "    --datalist out/prep/datalist.json --split test --out out/eval",
    "cxr-monai evaluate --bundle out/no-nih --datalist out/prep/datalist.json \\\n"
    "    --split source:site:nih-chestxray8 --out out/eval-nih",
    "cxr-monai evaluate --bundle out/train --datalist out/prep/datalist.json \\\n"
    "    --split cv --out out/eval-cv",
)

_LABELS = {
    "precision": "precision (PPV)",
    "recall": "recall (sensitivity)",
    "specificity": "specificity",
    "f1": "F1",
    "auroc": "AUROC (one-vs-rest)",
}


def evaluate(
    bundle: Path | None = bundle_option(),
    datalist: Path = typer.Option(
        ..., "--datalist", metavar="FILE", help="MONAI datalist JSON (from `cxr-monai prepare`)."
    ),
    out: Path = typer.Option(
        ..., "--out", metavar="DIR", help="Folder for metrics.json, predictions.csv and the PNG plots."
    ),
    split: str = typer.Option(
        "test",
        "--split",
        metavar="SPLIT",
        help="test | training | all | fold:K | source:NAME (every non-synthetic item of source NAME, "
        "training and test alike: for a model trained with --exclude-source NAME) | cv (out of fold: "
        "--bundle is a `cxr-monai train` output; each fold's model scores the fold it held out).",
    ),
    shortcut: bool = typer.Option(
        True, "--shortcut/--no-shortcut", help="Fit and score the disease-blind baseline beside the model."
    ),
    bootstrap: int = typer.Option(
        2000, "--bootstrap", metavar="N", min=0, help="Bootstrap resamples for the 95% CIs (0: none)."
    ),
    by_patient: bool = typer.Option(
        True,
        "--by-patient/--by-image",
        help="Bootstrap resamples whole patients (when every item has a patient_id) or single images.",
    ),
    batch_size: int = typer.Option(8, "--batch-size", metavar="N", min=1, help="Images per forward pass."),
    device: str | None = typer.Option(
        None, "--device", metavar="DEVICE", help="cpu, cuda, cuda:1 ... (default: cuda if available)."
    ),
    seed: int = typer.Option(0, "--seed", metavar="SEED", help="Seed of the bootstrap and the baseline."),
    feature_cache: Path | None = typer.Option(
        None,
        "--feature-cache",
        metavar="DIR",
        help="Feature store read and filled instead of decoding every image (trunk features, baseline "
        "thumbnails; keyed by file content). Default: the folder the bundle's training cached its trunk "
        "features in (train --cache-trunk-features), if any.",
    ),
    no_feature_cache: bool = typer.Option(
        False, "--no-feature-cache", help="Decode every image and run the whole network, storing nothing."
    ),
) -> None:
    """Evaluate a trained bundle: accuracy, per-class precision/recall/specificity/F1/AUROC with 95%
    bootstrap CIs, confusion matrix, calibration, and a disease-blind shortcut baseline beside the model;
    per source and within each source of two or more classes (accuracy, one-vs-rest AUROC on that
    source's images only), and a probe of how well the network's pooled features name the source.

    Writes metrics.json, predictions.csv (no patient data) and PNG plots into --out. Works on any
    datalist, so a site can score a model on its own images.
    """
    bundle_dir = resolve_bundle(bundle)
    # imported here so that `cxr-monai --help` and the other commands do not load torch
    from cxr_monai.evaluation import report as evaluation
    from cxr_monai.evaluation.stored_features import training_feature_cache
    from cxr_monai.predictor import Predictor

    with user_errors():
        splits = evaluation.load_splits(datalist)
        if split == evaluation.CV_SPLIT:
            folds = evaluation.cross_validation_folds(bundle_dir, splits)
            predictors = [
                (Predictor.from_bundle(b, device=device, with_sites=False), items) for b, items in folds
            ]
            curves_bundles = [b for b, _ in folds]
            trained_bundle = folds[0][0]
        else:
            items = evaluation.select_split(splits, split)
            predictor = Predictor.from_bundle(bundle_dir, device=device, with_sites=False)
            curves_bundles = [bundle_dir]
            trained_bundle = bundle_dir
        store = None if no_feature_cache else feature_cache or training_feature_cache(trained_bundle)
        stages = {"evaluate": "model + features", "baseline": "baseline training features"}
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as progress:
            tasks = {stage: progress.add_task(text, total=None) for stage, text in stages.items()}

            def on_progress(stage: str, done: int, total: int) -> None:
                progress.update(tasks[stage], completed=done, total=total)

            options: dict[str, Any] = {
                "shortcut": shortcut,
                "batch_size": batch_size,
                "n_boot": bootstrap,
                "seed": seed,
                "by_patient": by_patient,
                "progress": on_progress,
                "feature_cache": store,
            }
            if split == evaluation.CV_SPLIT:
                report = evaluation.evaluate_cross_validated(predictors, splits["training"], **options)
            else:
                report = evaluation.evaluate(predictor, items, splits["training"], **options)
        written = evaluation.write_report(
            report,
            out,
            curves_bundles,
            bundle=str(bundle_dir.resolve()),
            datalist=str(datalist.resolve()),
            split=split,
            split_scope=evaluation.describe_split(split),
        )
        _print_report(report, split)
        console.print(f"wrote {', '.join(sorted(written))} to {out}", highlight=False)


def _print_report(report: EvaluationReport, split: str) -> None:
    """Rich table of the model's figures with CIs and the baseline's beside them, then the verdict."""
    from cxr_monai.evaluation.metrics import PER_CLASS_FIGURES
    from cxr_monai.evaluation.shortcut import CONTEXT

    m = report.metrics
    model = report.model
    title = (
        f"{model['name']} {model['version']} ({model['backbone']}) on '{split}': "
        f"{sum(m.n_per_class.values())} images ("
        + ", ".join(f"{name} {n}" for name, n in m.n_per_class.items())
        + f"); 95% CI, {m.bootstrap['n_resamples']} resamples by {m.bootstrap['unit']}"
    )
    table = Table(title=title, caption=RESEARCH_USE_NOTICE)
    table.add_column("figure")
    table.add_column("model [95% CI]", justify="right")
    baseline = report.shortcut
    if baseline is not None:
        table.add_column("disease-blind baseline [95% CI]", justify="right")

    def row(label: str, model_value: Estimate, base_value: Estimate | None = None) -> None:
        cells = [label, model_value.format()]
        if baseline is not None:
            cells.append(base_value.format() if base_value is not None else "")
        table.add_row(*cells)

    row("accuracy", m.accuracy, baseline.accuracy if baseline else None)
    for name in CLASS_NAMES:
        for fig in PER_CLASS_FIGURES:
            base = baseline.recall[name] if baseline is not None and fig == "recall" else None
            row(f"{name} {_LABELS[fig]}", m.per_class[name][fig], base)
    row("expected calibration error", m.ece)
    console.print(table)
    if report.skipped:
        console.print(
            f"[yellow]{len(report.skipped)} unreadable image(s) skipped[/] (listed in metrics.json)"
        )
    _print_sources(report)
    verdict = "\n\n".join(report.verdict)
    if baseline is not None:
        verdict += f"\n\n{CONTEXT}"
    console.print(Panel(verdict, title="disease or source?"), highlight=False)


def _print_sources(report: EvaluationReport) -> None:
    """Per-source table (accuracy, recall) and within-source table (accuracy, one-vs-rest and pairwise
    AUROC), model beside baseline, then the source probe's line."""
    has_baseline = report.shortcut is not None
    per_source = Table(title="per source (accuracy over all classes; recall of each class present)")
    within = Table(title="within source (on that source's images only)")
    for table in (per_source, within):
        table.add_column("source, figure")
        table.add_column("model [95% CI]", justify="right")
        if has_baseline:
            table.add_column("baseline [95% CI]", justify="right")
            table.add_column("model - baseline", justify="right")

    def add(table: Table, label: str, source: SourceMetrics, figure: str, name: str | None = None) -> None:
        """One row: ``figure`` (a :class:`ScorerFigures` field; ``name`` picks a class) per scorer."""

        def pick(figures: ScorerFigures | None) -> str:
            value = getattr(figures, figure, None)
            value = value[name] if name is not None and value is not None else value
            return value.format() if value is not None else "n/a"

        table.add_row(
            label, pick(source.model), *((pick(source.baseline), pick(source.gap)) if has_baseline else ())
        )

    for s in report.by_source:
        counts = ", ".join(f"{name} {s.n_per_class[name]}" for name in s.classes)
        add(per_source, f"{s.source} ({counts}) accuracy", s, "accuracy")
        for name in s.classes:
            add(per_source, f"  {name} recall", s, "recall", name)
        if len(s.classes) < 2:
            continue
        add(within, f"{s.source}: accuracy among {' / '.join(s.classes)}", s, "within_accuracy")
        for name in s.classes:
            add(within, f"  {name} vs rest AUROC", s, "auroc", name)
        for pair in s.model.pairwise:
            add(within, f"  {pair} AUROC", s, "pairwise", pair)
    console.print(per_source)
    if within.row_count:
        console.print(within)
    probe = report.probe
    if probe.model is not None:
        line = (
            f"source probe ({probe.n_splits}-fold CV by {probe.unit}): accuracy {probe.model.accuracy:.3f} "
            "on the model's pooled features"
        )
        if probe.baseline is not None:
            line += f", {probe.baseline.accuracy:.3f} on the baseline's features"
        console.print(line + f"; always the largest source {probe.majority_rate:.3f}", highlight=False)
