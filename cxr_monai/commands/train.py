"""``cxr-monai train``: cross-validate the ``cxr_classifier`` bundle over the folds, keep one model."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cxr_monai.commands import console, examples, user_errors
from cxr_monai.constants import BACKBONES, DEFAULT_SPATIAL_SIZE, RESEARCH_USE_NOTICE
from cxr_monai.errors import DatasetError

if TYPE_CHECKING:
    from cxr_monai.training.crossval import EpochReport

logger = logging.getLogger(__name__)

#: OUT's folder of cached trunk features (``--cache-trunk-features``).
TRUNK_FEATURE_CACHE = "trunk_features"

EPILOG = examples(
    "cxr-monai train --datalist out/prep/datalist.json --folds 0 --max-epochs 3 \\\n    --out out/train"
)


def _parse_folds(folds: str, available: list[int]) -> list[int]:
    if folds.strip().lower() == "all":
        return available
    try:
        chosen = [int(part) for part in folds.split(",") if part.strip()]
    except ValueError as exc:
        raise DatasetError(f"--folds {folds!r}: expected 'all' or comma-separated fold numbers") from exc
    unknown = sorted(set(chosen) - set(available))
    if unknown or not chosen:
        raise DatasetError(f"--folds {folds!r}: the datalist has folds {available}")
    return chosen


def train(
    datalist: Path = typer.Option(
        ..., "--datalist", metavar="FILE", help="MONAI datalist JSON (from `cxr-monai prepare`)."
    ),
    out: Path = typer.Option(
        ..., "--out", metavar="DIR", help="Folder for fold_K/ bundles, final/ and cv_summary.json."
    ),
    backbone: str = typer.Option("efficientnet_b0", "--backbone", metavar="NAME", help=" | ".join(BACKBONES)),
    pretrained: str = typer.Option(
        "none",
        "--pretrained",
        metavar="WEIGHTS",
        help="none (from scratch) | imagenet (internet once; efficientnet_lite* offline) | /path/weights.pth"
        " (densenet121_xrv: a TorchXRayVision DenseNet state_dict, see the README)",
    ),
    folds: str = typer.Option(
        "all", "--folds", metavar="FOLDS", help="all, or fold numbers such as 0 or 0,1."
    ),
    final: str = typer.Option(
        "best-fold",
        "--final",
        metavar="MODE",
        help="best-fold: keep the fold with the best validation accuracy; retrain: train on all "
        "training items for the folds' mean best epoch.",
    ),
    max_epochs: int = typer.Option(30, "--max-epochs", metavar="N", min=1),
    freeze_epochs: int = typer.Option(
        5, "--freeze-epochs", metavar="N", min=0, help="Head-only epochs (pretrained only)."
    ),
    unfreeze_blocks: int = typer.Option(
        2, "--unfreeze-blocks", metavar="N", min=0, help="Top trunk blocks fine-tuned."
    ),
    batch_size: int = typer.Option(16, "--batch-size", metavar="N", min=1),
    learning_rate: float = typer.Option(
        1e-3, "--learning-rate", metavar="LR", help="Adam learning rate (from scratch / head)."
    ),
    finetune_learning_rate: float = typer.Option(
        1e-4, "--finetune-learning-rate", metavar="LR", help="Adam lr, stage 2."
    ),
    cosine_lr: bool = typer.Option(True, "--cosine-lr/--constant-lr", help="Cosine decay over max epochs."),
    spatial_size: int = typer.Option(DEFAULT_SPATIAL_SIZE, "--spatial-size", metavar="N", min=16),
    histogram_equalize: bool = typer.Option(
        False, "--histogram-equalize", help="Equalise each image's histogram (training and inference)."
    ),
    crop_borders: bool = typer.Option(
        False, "--crop-borders", help="Crop the dark frame around the film (training and inference)."
    ),
    strong_augmentation: bool = typer.Option(
        False, "--strong-augmentation", help="Add histogram shift, gamma, zoom and noise to augmentation v1."
    ),
    source_balanced: bool = typer.Option(
        False, "--source-balanced", help="Sample every (source, class) cell equally often."
    ),
    source_adversarial: float = typer.Option(
        0.0,
        "--source-adversarial",
        metavar="WEIGHT",
        min=0.0,
        help="Weight of a source-adversarial head (gradient reversal: the trunk unlearns the image's "
        "source); 0: off.",
    ),
    cache_trunk_features: bool = typer.Option(
        False,
        "--cache-trunk-features",
        help="With the trunk frozen throughout (--freeze-epochs >= --max-epochs): run it once per image "
        "and train the head on its cached features (no augmentation; many epochs in seconds).",
    ),
    trunk_feature_cache: Path | None = typer.Option(
        None,
        "--trunk-feature-cache",
        metavar="DIR",
        help="With --cache-trunk-features: folder of the feature files (default: OUT/trunk_features); "
        "share it between runs on the same images, backbone and pre-processing.",
    ),
    num_workers: int | None = typer.Option(
        None,
        "--num-workers",
        metavar="N",
        min=0,
        help="DataLoader worker processes (default: the CPUs this process may use, minus one).",
    ),
    cache_rate: float = typer.Option(1.0, "--cache-rate", metavar="FRACTION", min=0.0, max=1.0),
    early_stop_patience: int = typer.Option(0, "--early-stop-patience", metavar="N", min=0, help="0: off."),
    seed: int = typer.Option(0, "--seed", metavar="SEED"),
    exclude_source: list[str] | None = typer.Option(
        None,
        "--exclude-source",
        metavar="SOURCE",
        help="Leave this source's items out of training and validation (leave-one-source-out; e.g. "
        "site:nih-chestxray8). Repeatable.",
    ),
    device: str | None = typer.Option(
        None, "--device", metavar="DEVICE", help="cpu, cuda, cuda:1 ... (default: cuda if available)."
    ),
    threads: int | None = typer.Option(
        None,
        "--threads",
        metavar="N",
        min=1,
        help="CPU threads per operation (default: torch's; 1 helps on busy shared CPUs).",
    ),
    augmentation: str = typer.Option(
        "v1",
        "--augmentation",
        metavar="V",
        help="v1: flips/rotations only; v2: also CycleGAN COVID-19 images, one GAN per fold trained "
        "without that fold (cached).",
    ),
    n_synthetic: int = typer.Option(
        100, "--n-synthetic", metavar="N", min=1, help="v2: synthetic COVID-19 images per fold."
    ),
    gan_iterations: int = typer.Option(
        5000, "--gan-iterations", metavar="N", min=1, help="v2: CycleGAN iterations."
    ),
    gan_size: int = typer.Option(
        128, "--gan-size", metavar="PX", min=32, help="v2: CycleGAN image side (multiple of 4)."
    ),
    gan_channels: int = typer.Option(
        64, "--gan-channels", metavar="N", min=1, help="v2: CycleGAN base channels."
    ),
    gan_cache: Path | None = typer.Option(
        None, "--gan-cache", metavar="DIR", help="v2: folder of cached GAN runs (default: OUT/../gan_cache)."
    ),
) -> None:
    """Train the cxr_classifier MONAI bundle on each patient-disjoint fold and keep one model.

    Each fold is a trained bundle in OUT/fold_K (resumed if interrupted); OUT/final is the kept model
    (use it as --bundle for evaluate, explain and serve); OUT/cv_summary.json holds the per-fold and
    mean +- sd validation accuracy.
    """
    import torch

    from cxr_monai.data import load_datalist
    from cxr_monai.training import check_sources, crossval, datalist_folds
    from cxr_monai.training.augmentation_v2 import AUGMENTATIONS, GanSettings, record_augmentation

    with user_errors():
        if augmentation not in AUGMENTATIONS:
            raise DatasetError(f"--augmentation {augmentation!r}: expected one of {', '.join(AUGMENTATIONS)}")
        if backbone not in BACKBONES:
            raise DatasetError(f"--backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")
        chosen = _parse_folds(folds, datalist_folds(str(datalist)))
        excluded = list(exclude_source or [])
        check_sources(load_datalist(datalist), excluded)
        parameters: dict[str, Any] = {
            "backbone": backbone,
            "pretrained": pretrained,
            "max_epochs": max_epochs,
            "freeze_epochs": freeze_epochs,
            "unfreeze_blocks": unfreeze_blocks,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "finetune_learning_rate": finetune_learning_rate,
            "cosine_lr": cosine_lr,
            "spatial_size": spatial_size,
            "histogram_equalize": histogram_equalize,
            "crop_borders": crop_borders,
            "strong_augmentation": strong_augmentation,
            "source_balanced": source_balanced,
            "source_adversarial_weight": source_adversarial,
            "cache_trunk_features": cache_trunk_features,
            # One feature file per image, shared by the folds and the final retraining.
            "trunk_feature_cache_dir": str((trunk_feature_cache or out / TRUNK_FEATURE_CACHE).resolve())
            if cache_trunk_features
            else "",
            "cache_rate": cache_rate,
            "early_stop_patience": early_stop_patience,
            "seed": seed,
            "exclude_sources": excluded,
            "verbose": logging.getLogger().isEnabledFor(logging.DEBUG),  # per-epoch/iteration logs
        }
        if num_workers is not None:  # else the bundle's default, from the CPUs this process may use
            parameters["num_workers"] = num_workers
        if device:
            parameters["device"] = f"$torch.device({device!r})"
        if threads:
            torch.set_num_threads(threads)
        # Two runs with the same data, seed, versions, threads and workers give the same weights: kernels
        # without a deterministic version only warn; cuBLAS needs its fixed workspace set before CUDA starts.
        # (set_determinism in train.json seeds Python, NumPy, torch and the DataLoader workers.)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        if not parameters["verbose"]:
            # The progress bar shows epochs and validation accuracy; engine lines would interleave with it,
            # and MONAI warns that this process, not the bundle's logging.conf, configures logging.
            logging.getLogger("ignite.engine.engine").setLevel(logging.WARNING)
            logging.getLogger("monai.bundle.workflows").setLevel(logging.ERROR)
        console.print(f"[dim]{RESEARCH_USE_NOTICE}[/]")
        # A progress bar on a terminal; written to a file (CI, nohup, a scheduler), a bar only shows when
        # it finishes, so there each epoch is a log line instead.
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}  {task.fields[accuracy]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not console.is_terminal,
        ) as progress:
            tasks: dict[str, Any] = {}

            def on_epoch(report: EpochReport) -> None:
                if not console.is_terminal:
                    if report.seconds is not None:
                        logger.info("%s", epoch_line(report))
                    return
                if report.run not in tasks:
                    tasks[report.run] = progress.add_task(
                        report.run, total=report.max_epochs, accuracy="", unit="epochs"
                    )
                accuracy = report.val_accuracy
                shown = "" if accuracy is None else f"val acc {accuracy:.3f}"
                progress.update(
                    tasks[report.run], completed=report.epoch, total=report.max_epochs, accuracy=shown
                )

            record = None
            if augmentation == "v2":
                record = _augment(
                    datalist,
                    out,
                    chosen,
                    seed,
                    device,
                    progress,
                    n_synthetic,
                    gan_cache,
                    GanSettings(gan_iterations, gan_size, gan_channels, seed=seed),
                )
                datalist = Path(record["augmented_datalist"])
            summary = crossval.cross_validate(datalist, out, chosen, final, parameters, on_epoch=on_epoch)
            if record is not None:
                summary = record_augmentation(out, summary, record)
        _print_summary(summary, out)


def _augment(
    datalist: Path,
    out: Path,
    folds: list[int],
    seed: int,
    device: str | None,
    progress: Progress,
    n_synthetic: int,
    gan_cache: Path | None,
    settings: Any,
) -> dict[str, Any]:
    """Augmentation v2: each fold's GAN (cached), its synthetic images and their quality, with
    progress bars per stage; returns the augmentation record (folds train on its ``augmented_datalist``)."""
    from cxr_monai.training.augmentation_v2 import AUGMENTED_DATALIST, augment_datalist

    stages: dict[str, Any] = {}

    def on_stage(stage: str, done: int, total: int) -> None:
        if stage not in stages:
            unit = "iterations" if stage.startswith("GAN fold") else "images" if "synthesis" in stage else ""
            stages[stage] = progress.add_task(stage, total=total, accuracy="", unit=unit)
        progress.update(stages[stage], completed=done, total=total)

    cache = gan_cache if gan_cache is not None else out.resolve().parent / "gan_cache"
    return augment_datalist(
        datalist,
        folds,
        out / AUGMENTED_DATALIST,
        cache,
        settings,
        n_synthetic,
        seed,
        device,
        progress=on_stage,
    )


def epoch_line(report: EpochReport) -> str:
    """``fold 0 epoch 3/30: train loss 0.812, val accuracy 0.733, 41 s, ETA 18 min`` (figures a run
    lacks, such as validation in the final retraining, are left out)."""
    figures = []
    if report.train_loss is not None:
        figures.append(f"train loss {report.train_loss:.4f}")
    if report.val_accuracy is not None:
        figures.append(f"val accuracy {report.val_accuracy:.3f}")
    figures.append(f"{report.seconds or 0.0:.0f} s")
    eta = report.eta_seconds or 0.0
    figures.append(f"ETA {eta / 60:.0f} min" if eta >= 90 else f"ETA {eta:.0f} s")
    return f"{report.run} epoch {report.epoch}/{report.max_epochs}: " + ", ".join(figures)


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    table = Table(title="Validation (best epoch of each fold)")
    for column in ("fold", "best epoch", "val accuracy", "val loss"):
        table.add_column(column, justify="right")
    for row in summary["folds"]:
        acc, loss = row["val_accuracy"], row["val_loss"]
        table.add_row(
            str(row["fold"]),
            str(row["best_epoch"]),
            "-" if acc is None else f"{acc:.3f}",
            "-" if loss is None else f"{loss:.3f}",
        )
    agg = summary["aggregate"]["val_accuracy"]
    if agg["mean"] is not None:
        sd = "" if agg["sd"] is None else f" +- {agg['sd']:.3f}"
        table.add_row("mean", "", f"{agg['mean']:.3f}{sd}", "")
    console.print(table)
    final = summary["final"]
    how = (
        f"fold {final['source_fold']}"
        if final["mode"] == "best-fold"
        else f"retrained {final['epochs']} epochs"
    )
    console.print(f"Kept model ({how}): {out / final['bundle']}  (use it as --bundle)")
    console.print(f"Summary: {out / 'cv_summary.json'}")
