"""``cxr-monai prepare``: build the patient-disjoint MONAI datalist from public datasets and/or site CSVs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from cxr_monai.commands import console, examples, user_errors
from cxr_monai.constants import CLASS_NAMES, DEFAULT_COVID_VIEWS

EPILOG = examples(
    "cxr-monai prepare --covid-dir ../shared/data/covid-chestxray-dataset \\\n"
    "    --kaggle-dir ../shared/data/chest_xray \\\n"
    "    --site-csv nih-chestxray8=../shared/data/nih-chestxray8/labels.csv \\\n"
    "    --out out/prep"
)


class _FilmsPerSecond(ProgressColumn):
    """Films per second over rich's recent window (``task.speed``); blank until there is one."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.1f} films/s", style="progress.data.speed")


def _count(text: str, option: str) -> int | None:
    """``all`` -> None, else a positive integer (typer's BadParameter, exit 2, otherwise)."""
    if text.strip().lower() == "all":
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise typer.BadParameter(f"expected a positive integer or 'all', got {text!r}", param_hint=option)
    return int(text)


def _table(title: str, counts: dict[str, dict[str, int]]) -> Table:
    """One row per class plus Total, one column per split (a block of :func:`cxr_monai.data.count_table`)."""
    columns = list(counts["Total"])
    table = Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    table.add_column("class")
    for column in columns:
        table.add_column(column.replace("_", " "), justify="right")
    for row in [*CLASS_NAMES, "Total"]:
        table.add_row(row, *(str(counts[row][c]) for c in columns), end_section=row == CLASS_NAMES[-1])
    return table


def _source_table(counts: dict[str, dict[str, int]]) -> Table:
    """Images per source (rows) and class (columns)."""
    table = Table(title="Images per source and class", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("source")
    for name in CLASS_NAMES:
        table.add_column(name, justify="right")
    for source, row in counts.items():
        table.add_row(source, *(str(row[name]) for name in CLASS_NAMES))
    return table


def _duplicate_table(report: dict[str, Any]) -> Table:
    """The near-duplicate pairs of different patients merged into one split group."""
    count = len(report["merged_pairs"])
    table = Table(
        title=f"Near-duplicates of different patients merged into one split group: {count}",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for column in ("image A", "image B", "r", "phash bits"):
        table.add_column(column, justify="right" if column in ("r", "phash bits") else "left")
    for pair in report["merged_pairs"]:
        a, b = (
            f"{image['patient_id']} {image.get('file', '')} ({image['label_name']})".replace("  ", " ")
            for image in pair["images"]
        )
        table.add_row(a, b, f"{pair['correlation']:.3f}", str(pair["phash_bits"]))
    return table


def prepare(
    covid_dir: Path | None = typer.Option(
        None, "--covid-dir", metavar="DIR", help="covid-chestxray-dataset checkout (metadata.csv + images/)."
    ),
    kaggle_dir: Path | None = typer.Option(
        None,
        "--kaggle-dir",
        metavar="DIR",
        help="Kaggle chest-xray-pneumonia folder holding {train,val,test}/{NORMAL,PNEUMONIA}/.",
    ),
    site_csvs: list[str] | None = typer.Option(
        None,
        "--site-csv",
        metavar="[NAME=]CSV",
        help="[NAME=]CSV with columns image,label[,patient_id,age,sex] (label: class name or index; "
        "relative paths from the CSV's folder). Its source is site:NAME (default NAME: the file stem). "
        "Repeatable.",
    ),
    views: str = typer.Option(
        ",".join(DEFAULT_COVID_VIEWS),
        "--views",
        metavar="VIEWS",
        help="covid-chestxray-dataset views to keep, comma-separated.",
    ),
    finding_map: Path | None = typer.Option(
        None,
        "--finding-map",
        metavar="FILE",
        help="JSON {finding: class or null} or CSV finding,label updating the default "
        "covid-chestxray-dataset finding -> class map (COVID-19 findings -> COVID-19; bacterial, "
        "viral, fungal pneumonias and SARS -> Pneumonia; No Finding -> Normal; todo, ARDS, Lipoid ... "
        "skipped). Null/empty = skip.",
    ),
    cache_dir: Path | None = typer.Option(
        None,
        "--cache-dir",
        metavar="DIR",
        help="Folder for the image fingerprint cache (default: OUT); an interrupted run resumes from it.",
    ),
    n_covid: str = typer.Option(
        "all", "--n-covid", metavar="N|all", help="COVID-19 images to take (a number or 'all')."
    ),
    n_normal: str = typer.Option(
        "300", "--n-normal", metavar="N|all", help="Normal images to take (a number or 'all')."
    ),
    n_pneumonia: str = typer.Option(
        "300", "--n-pneumonia", metavar="N|all", help="Pneumonia images to take (a number or 'all')."
    ),
    test_fraction: float = typer.Option(
        0.2,
        "--test-fraction",
        metavar="FRACTION",
        help="Held-out test share: one of round(1/fraction) patient-grouped folds.",
    ),
    folds: int = typer.Option(
        5, "--folds", metavar="N", help="Cross-validation folds of the training split."
    ),
    seed: int = typer.Option(0, "--seed", metavar="SEED", help="Seed of the subsampling and the splits."),
    workers: int | None = typer.Option(
        None,
        "--workers",
        min=1,
        metavar="N",
        help="Processes reading and fingerprinting the films (default: the CPUs this process may use; "
        "the datalist does not depend on it).",
    ),
    out: Path = typer.Option(
        Path("out/prep"),
        "--out",
        metavar="DIR",
        help="Output folder for datalist.json and prepare_summary.json.",
    ),
) -> None:
    """Build a patient-disjoint datalist (test split + cross-validation folds) from any of the sources.

    Rows whose image file is missing are counted and skipped. Every image is fingerprinted (perceptual
    hash + thumbnail correlation, cached by file content as it goes, so an interrupted run resumes):
    near-duplicates of different patients are put in one split group and listed; images that cannot be
    decoded are skipped with a warning.

    Writes OUT/datalist.json (MONAI datalist: "training" items with "fold", "test" items; each with
    source, group and, where known, age and sex), OUT/prepare_summary.json (counts, near-duplicate pairs,
    options, versions, warnings) and OUT/dataset_summary.png; prints the datalist path on stdout.
    """
    # imported here so that `cxr-monai --help` and the other commands do not load scikit-learn
    from cxr_monai.data import FIGURE_FILENAME, PrepareOptions, assemble_dataset, site_csv, write_prepared
    from cxr_monai.data.near_duplicates import fingerprint_workers

    with user_errors():
        options = PrepareOptions(
            covid_dir=covid_dir,
            kaggle_dir=kaggle_dir,
            site_csvs=tuple(site_csv(spec) for spec in site_csvs or ()),
            views=tuple(view.strip() for view in views.split(",") if view.strip()),
            finding_map=finding_map,
            cache_dir=cache_dir if cache_dir is not None else out,
            n_covid=_count(n_covid, "--n-covid"),
            n_normal=_count(n_normal, "--n-normal"),
            n_pneumonia=_count(n_pneumonia, "--n-pneumonia"),
            test_fraction=test_fraction,
            folds=folds,
            seed=seed,
        )
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _FilmsPerSecond(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as progress:
            fingerprints = progress.add_task("fingerprinting images", total=None)
            search = progress.add_task("near-duplicate search", total=None, visible=False)
            prepared = assemble_dataset(
                options,
                on_progress=lambda done, total: progress.update(fingerprints, completed=done, total=total),
                on_search_progress=lambda done, total: progress.update(
                    search, completed=done, total=total, visible=True
                ),
                workers=workers or fingerprint_workers(),
            )
        datalist_path, summary_path = write_prepared(prepared, out)
    counts = prepared.summary["counts"]
    console.print(_table("Images per class and split", counts["images"]))
    console.print(_table("Patients per class and split", counts["patients"]))
    console.print(_source_table(prepared.summary["counts_by_source"]))
    console.print(_duplicate_table(prepared.summary["near_duplicates"]))
    for warning in prepared.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    console.print(
        f"wrote {datalist_path}, {summary_path.name} and {FIGURE_FILENAME}",
        highlight=False,
        soft_wrap=True,
    )
    typer.echo(str(datalist_path))
