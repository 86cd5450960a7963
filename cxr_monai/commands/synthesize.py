"""``cxr-monai synthesize``: synthetic COVID-19 training images from a trained CycleGAN (augmentation v2)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cxr_monai.commands import console, examples, user_errors
from cxr_monai.constants import RESEARCH_USE_NOTICE

EPILOG = examples(
    "cxr-monai synthesize --gan out/gan --datalist out/prep/datalist.json \\\n    --n 100 --out out/synth"
)


def synthesize(
    gan: Path = typer.Option(
        ..., "--gan", metavar="DIR", help="CycleGAN training output_dir (bundles/cxr_cyclegan)."
    ),
    datalist: Path = typer.Option(
        ..., "--datalist", metavar="FILE", help="MONAI datalist JSON (from `cxr-monai prepare`)."
    ),
    n: int = typer.Option(100, "--n", metavar="N", min=1, help="Number of synthetic COVID-19 images."),
    out: Path = typer.Option(
        ..., "--out", metavar="DIR", help="Folder for images/, datalist.json, synthesize_report.json."
    ),
    seed: int = typer.Option(0, "--seed", metavar="SEED", help="Seed for choosing the Normal source images."),
    fold: int = typer.Option(
        -1,
        "--fold",
        metavar="K",
        help="Draw no sources from this cross-validation fold (-1: all training folds).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", metavar="N", min=1),
    quality: bool = typer.Option(
        True,
        "--quality/--no-quality",
        help="Measure the images: real-vs-synthetic AUROC, Fréchet distances (EfficientNet-Lite0 ImageNet "
        "features), the shortcut baseline's COVID-19 call rate.",
    ),
    v1_bundle: Path | None = typer.Option(
        None,
        "--v1-bundle",
        metavar="DIR",
        help="A trained v1 classifier: report the share of images it calls COVID-19.",
    ),
) -> None:
    """Turn N randomly chosen Normal training images into synthetic COVID-19 training items.

    Writes 8-bit PNGs, a new datalist (the input plus the synthetic items, appended to `training` with
    `synthetic: true`, each in its source image's fold; never in `test`) and a JSON report. Classifier
    validation skips synthetic items. Research use only."""
    from cxr_monai.gan.synthesize import synthesize_covid

    logging.getLogger("monai.bundle.workflows").setLevel(logging.ERROR)  # "logging file is False" noise
    with user_errors():
        console.print(RESEARCH_USE_NOTICE, style="dim")
        with Progress(
            TextColumn("synthesizing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("synthesize", total=n)
            report = synthesize_covid(
                gan,
                datalist,
                out,
                n=n,
                seed=seed,
                batch_size=batch_size,
                fold=fold,
                on_image=lambda done, _total: progress.update(task, completed=done),
            )
        console.print(
            f"{report['synthetic_images']} synthetic COVID-19 images; datalist {report['datalist']}"
        )
        if quality:
            report = _add_quality(report, out, datalist, fold, seed, v1_bundle)
        typer.echo(json.dumps(report, indent=2))


def _add_quality(
    report: dict[str, Any], out: Path, datalist: Path, fold: int, seed: int, v1_bundle: Path | None
) -> dict[str, Any]:
    """The report with ``quality`` (:func:`cxr_monai.gan.quality.gan_quality` against the real training
    images outside ``fold``), rewritten to the report file, and its plain-words lines printed."""
    from cxr_monai.atomic import write_json_atomic
    from cxr_monai.data import items_for_fold, load_datalist
    from cxr_monai.gan.quality import describe, gan_quality
    from cxr_monai.gan.synthesize import REPORT_FILE

    with console.status("measuring the synthetic images"):
        real, _ = items_for_fold(load_datalist(datalist), None if fold < 0 else fold)
        synthetic = [
            str(i["image"]) for i in load_datalist(report["datalist"])["training"] if i.get("synthetic")
        ]
        measured = gan_quality(real, synthetic, v1_bundle=v1_bundle, seed=seed)
    updated = {**report, "quality": measured}
    write_json_atomic(out / REPORT_FILE, updated)
    for line in describe(measured):
        console.print(f"- {line}", highlight=False)
    return updated
