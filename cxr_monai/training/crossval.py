"""Cross-validation over the datalist's patient-disjoint folds, and the final model, through the bundle.

Layout of ``out``::

    out/fold_0/ ... fold_K/   one trained bundle per fold (configs/, models/model.pt, logs/)
    out/final/                the kept model as a trained bundle (best fold copied, or retrained on all
                              training items for the folds' mean best epoch, without validation)
    out/cv_summary.json       per-fold and aggregated (mean, sd) validation figures, what ``final`` is

Each run is the ``cxr_classifier`` bundle's ``train.json`` through MONAI's ``ConfigWorkflow``, so a run
started here and one started with ``python -m monai.bundle run`` are the same; interrupted runs resume.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from cxr_monai.atomic import write_json_atomic
from cxr_monai.errors import BundleError
from cxr_monai.training import (
    best_epoch,
    default_bundle_root,
    read_training_log,
    relocate_trained_bundle,
)

logger = logging.getLogger(__name__)

FINAL_MODES: tuple[str, ...] = ("best-fold", "retrain")
CV_SUMMARY = "cv_summary.json"
FINAL_DIR = "final"


@dataclass(frozen=True)
class EpochReport:
    """Where a run stands: sent once when it starts (``epoch`` = epochs restored from a checkpoint, the
    timings None) and after every epoch.

    ``seconds`` is the epoch's wall time, validation included; ``eta_seconds`` the epochs left times the
    mean epoch time of this run so far (this run only: a cross-validation's later folds are not in it).
    """

    run: str
    epoch: int
    max_epochs: int
    train_loss: float | None = None
    val_accuracy: float | None = None
    seconds: float | None = None
    eta_seconds: float | None = None


EpochCallback = Callable[[EpochReport], None]


@dataclass(frozen=True)
class FoldResult:
    """Validation outcome of one fold's run (figures of its best epoch, the one ``model.pt`` holds)."""

    fold: int
    bundle: str
    epochs_run: int
    best_epoch: int | None
    val_accuracy: float | None
    val_loss: float | None


def run_bundle(
    name: str,
    output_dir: Path,
    overrides: Mapping[str, Any],
    on_epoch: EpochCallback | None = None,
    bundle_root: str | None = None,
) -> list[dict[str, Any]]:
    """Run the bundle's training workflow into ``output_dir``; returns its per-epoch training log.

    ``overrides`` are config overrides (``datalist``, ``fold``, ``backbone``, ``max_epochs``...).
    """
    from monai.bundle import ConfigWorkflow

    root = Path(bundle_root or default_bundle_root())
    workflow = ConfigWorkflow(
        config_file=str(root / "configs" / "train.json"),
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=False,  # the caller's logging stays as configured
        workflow_type="train",
        bundle_root=str(root),
        output_dir=str(output_dir),
        **overrides,
    )
    workflow.initialize()
    missing = workflow.check_properties()
    if missing:
        raise BundleError(f"bundle {root} lacks the training properties {missing}")
    if on_epoch is not None:
        _report_epochs(name, workflow.trainer, workflow.evaluator, on_epoch)
    workflow.run()
    workflow.finalize()
    return read_training_log(output_dir)


def _report_epochs(name: str, trainer: Engine, evaluator: Engine, on_epoch: EpochCallback) -> None:
    """Attach handlers sending :class:`EpochReport` s; attached last, they run after the bundle's
    validation and logging handlers of the same event, so an epoch's figures are complete."""
    clock = {"started": 0.0, "epoch_started": 0.0, "first_epoch": 0}

    def started(engine: Engine) -> None:  # after the resume loader: reports the restored epochs
        clock.update(started=time.perf_counter(), first_epoch=engine.state.epoch)
        on_epoch(EpochReport(name, engine.state.epoch, engine.state.max_epochs or 0))

    def epoch_started(engine: Engine) -> None:
        clock["epoch_started"] = time.perf_counter()

    def epoch_completed(engine: Engine) -> None:
        now, epoch, total = time.perf_counter(), engine.state.epoch, engine.state.max_epochs or 0
        per_epoch = (now - clock["started"]) / max(epoch - clock["first_epoch"], 1)
        accuracy = evaluator.state.metrics.get("val_accuracy") if evaluator.state.epoch > 0 else None
        loss = engine.state.metrics.get("train_loss")
        on_epoch(
            EpochReport(
                name,
                epoch,
                total,
                train_loss=None if loss is None else float(loss),
                val_accuracy=None if accuracy is None else float(accuracy),
                seconds=now - clock["epoch_started"],
                eta_seconds=per_epoch * max(total - epoch, 0),
            )
        )

    trainer.add_event_handler(Events.STARTED, started)
    trainer.add_event_handler(Events.EPOCH_STARTED, epoch_started)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, epoch_completed)


def fold_result(fold: int, bundle_dir: Path, entries: Sequence[Mapping[str, Any]]) -> FoldResult:
    best = best_epoch(entries)
    return FoldResult(
        fold=fold,
        bundle=bundle_dir.name,
        epochs_run=len(entries),
        best_epoch=None if best is None else int(best["epoch"]),
        val_accuracy=None if best is None else best.get("val_accuracy"),
        val_loss=None if best is None else best.get("val_loss"),
    )


def aggregate(values: Sequence[float | int | None]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (n - 1; None for a single value) of the non-missing values."""
    present = [float(v) for v in values if v is not None]
    return {
        "n": len(present),
        "mean": statistics.fmean(present) if present else None,
        "sd": statistics.stdev(present) if len(present) > 1 else None,
    }


def trained_bundles(out: str | Path) -> tuple[Path, list[tuple[int, Path]], dict[str, Any]]:
    """(final bundle, [(fold, fold bundle)...], cv_summary) of a :func:`cross_validate` output folder;
    folds without a ``models/model.pt`` are left out. BundleError naming what is missing."""
    root = Path(out)
    summary_path = root / CV_SUMMARY
    if not summary_path.is_file():
        raise BundleError(f"{root}: no {CV_SUMMARY}; pass the --out folder of `cxr-monai train`")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        final = root / str((summary.get("final") or {}).get("bundle", FINAL_DIR))
        folds = [(int(r["fold"]), root / str(r["bundle"])) for r in summary.get("folds", [])]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"{summary_path}: not a cxr-monai train summary ({type(exc).__name__})") from exc
    if not (final / "models" / "model.pt").is_file():
        raise BundleError(f"{root}: {final.name}/models/model.pt is missing")
    return final, [(k, d) for k, d in folds if (d / "models" / "model.pt").is_file()], summary


def cross_validate(
    datalist: Path,
    out: Path,
    folds: Sequence[int],
    final: str,
    parameters: Mapping[str, Any],
    on_epoch: EpochCallback | None = None,
    bundle_root: str | None = None,
) -> dict[str, Any]:
    """Train one bundle per fold, then the final model; writes and returns ``out/cv_summary.json``.

    ``parameters``: bundle parameters shared by every run (``backbone``, ``max_epochs``...).
    ``final``: ``"best-fold"`` copies the fold with the highest validation accuracy to ``out/final``;
    ``"retrain"`` trains on every training item (no validation) for the rounded mean best epoch.
    """
    if final not in FINAL_MODES:
        raise BundleError(f"unknown --final {final!r}; expected one of {', '.join(FINAL_MODES)}")
    if not folds:
        raise BundleError("no folds to train")
    common = {"datalist": str(Path(datalist).resolve()), **parameters}
    results: list[FoldResult] = []
    for fold in folds:
        fold_dir = out / f"fold_{fold}"
        entries = run_bundle(f"fold {fold}", fold_dir, {**common, "fold": fold}, on_epoch, bundle_root)
        results.append(fold_result(fold, fold_dir, entries))
        logger.info(
            "Fold %d: best validation accuracy %s at epoch %s",
            fold,
            results[-1].val_accuracy,
            results[-1].best_epoch,
        )

    summary: dict[str, Any] = {
        "datalist": common["datalist"],
        "parameters": dict(parameters),
        "folds": [asdict(r) for r in results],
        "aggregate": {
            "val_accuracy": aggregate([r.val_accuracy for r in results]),
            "val_loss": aggregate([r.val_loss for r in results]),
            "best_epoch": aggregate([r.best_epoch for r in results]),
        },
    }
    final_dir = out / FINAL_DIR
    if final == "best-fold":
        scored = [r for r in results if r.val_accuracy is not None]
        if not scored:
            raise BundleError("no fold recorded a validation accuracy; cannot pick the best fold")
        best = max(scored, key=lambda r: r.val_accuracy or 0.0)
        relocate_trained_bundle(out / best.bundle, final_dir)
        summary["final"] = {"mode": final, "bundle": FINAL_DIR, "source_fold": best.fold}
    else:
        mean_best = summary["aggregate"]["best_epoch"]["mean"]
        epochs = max(1, round(mean_best)) if mean_best is not None else int(parameters.get("max_epochs", 1))
        run_bundle("final", final_dir, {**common, "fold": -1, "max_epochs": epochs}, on_epoch, bundle_root)
        summary["final"] = {"mode": final, "bundle": FINAL_DIR, "epochs": epochs, "validation": None}
    write_json_atomic(out / CV_SUMMARY, summary)
    return summary
