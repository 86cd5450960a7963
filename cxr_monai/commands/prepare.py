"""``cxr-monai prepare``: build the patient-disjoint MONAI datalist from public datasets and/or site CSVs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.table import Table

from cxr_monai.commands import console, user_errors
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data import DEFAULT_COVID_VIEWS, PrepareOptions, assemble_dataset, write_prepared


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


def prepare(
    covid_dir: Path | None = typer.Option(
        None, "--covid-dir", help="covid-chestxray-dataset checkout (metadata.csv + images/)."
    ),
    kaggle_dir: Path | None = typer.Option(
        None,
        "--kaggle-dir",
        help="Kaggle chest-xray-pneumonia folder holding {train,val,test}/{NORMAL,PNEUMONIA}/.",
    ),
    site_csv: list[Path] | None = typer.Option(
        None,
        "--site-csv",
        help="Site CSV with columns image,label[,patient_id] (label: class name or index; "
        "relative paths from the CSV's folder). Repeatable.",
    ),
    views: str = typer.Option(
        ",".join(DEFAULT_COVID_VIEWS),
        "--views",
        help="covid-chestxray-dataset views to keep, comma-separated.",
    ),
    n_covid: str = typer.Option("all", "--n-covid", help="COVID-19 images to take (a number or 'all')."),
    n_normal: str = typer.Option("300", "--n-normal", help="Normal images to take (a number or 'all')."),
    n_pneumonia: str = typer.Option(
        "300", "--n-pneumonia", help="Pneumonia images to take (a number or 'all')."
    ),
    test_fraction: float = typer.Option(
        0.2, "--test-fraction", help="Held-out test share: one of round(1/fraction) patient-grouped folds."
    ),
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds of the training split."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subsampling and the splits."),
    out: Path = typer.Option(
        Path("out/prep"), "--out", help="Output folder for datalist.json and prepare_summary.json."
    ),
) -> None:
    """Build a patient-disjoint datalist (test split + cross-validation folds) from any of the three sources.

    Reads file names and CSVs only, no pixels. Rows whose image file is missing are counted and skipped.

    Writes OUT/datalist.json (MONAI datalist: "training" items with "fold", "test" items) and
    OUT/prepare_summary.json (counts, options, versions, warnings); prints the datalist path on stdout.

    Example:

        cxr-monai prepare --covid-dir ../shared/data/covid-chestxray-dataset \\
            --kaggle-dir ../shared/data/chest_xray --out out/prep
    """
    with user_errors():
        options = PrepareOptions(
            covid_dir=covid_dir,
            kaggle_dir=kaggle_dir,
            site_csvs=tuple(site_csv or ()),
            views=tuple(view.strip() for view in views.split(",") if view.strip()),
            n_covid=_count(n_covid, "--n-covid"),
            n_normal=_count(n_normal, "--n-normal"),
            n_pneumonia=_count(n_pneumonia, "--n-pneumonia"),
            test_fraction=test_fraction,
            folds=folds,
            seed=seed,
        )
        prepared = assemble_dataset(options)
        datalist_path, summary_path = write_prepared(prepared, out)
    counts = prepared.summary["counts"]
    console.print(_table("Images per class and split", counts["images"]))
    console.print(_table("Patients per class and split", counts["patients"]))
    for warning in prepared.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    console.print(f"wrote {datalist_path} and {summary_path.name}", highlight=False, soft_wrap=True)
    typer.echo(str(datalist_path))
