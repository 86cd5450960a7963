"""``cxr-monai explain``: Grad-CAM overlay (PNG), report (JSON) and DICOM Secondary Capture per input."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cxr_monai.commands import console, examples, user_errors
from cxr_monai.errors import CXRMonaiError

#: Outputs ``--format`` chooses from.
FORMATS = ("png", "json", "dcm")
BUNDLE_ENV = "CXR_MONAI_BUNDLE"
EPILOG = examples(
    "cxr-monai explain study.dcm scans/ --bundle out/train/final \\\n"
    "    --out out/explain --format png,json,dcm"
)
#: Files a directory walk skips: hidden files and these (documentation/metadata next to images).
_NOT_IMAGES = {".json", ".txt", ".md", ".csv", ".xml", ".html", ".pdf", ".py"}


def usage_error(message: str) -> typer.Exit:
    """Print a one-line usage error; the caller raises the returned exit (code 2)."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def resolve_bundle(bundle: Path | None) -> Path:
    """``--bundle`` or ``$CXR_MONAI_BUNDLE``; else a one-line usage error (exit 2)."""
    if bundle is None:
        raise usage_error(f"no trained bundle: pass --bundle DIR or set {BUNDLE_ENV}")
    return bundle


def collect_inputs(paths: Sequence[Path]) -> list[Path]:
    """Files as given, directories walked (sorted, recursively; hidden and non-image documents skipped)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(
                p
                for p in sorted(path.rglob("*"))
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and p.suffix.lower() not in _NOT_IMAGES
            )
        else:
            found.append(path)
    return found


def parse_formats(text: str) -> tuple[str, ...]:
    """``"png,json"`` -> ("png", "json"); unknown names are a usage error."""
    chosen = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise usage_error(f"--format: expected a comma-separated subset of {','.join(FORMATS)}, got {text!r}")
    return chosen


def explain(
    inputs: list[Path] = typer.Argument(..., help="Image files (DICOM, PNG, JPEG, NIfTI) or directories."),
    bundle: Path | None = typer.Option(
        None,
        "--bundle",
        metavar="DIR",
        envvar=BUNDLE_ENV,
        help=f"Trained bundle directory (default: ${BUNDLE_ENV}).",
    ),
    class_name: str | None = typer.Option(
        None,
        "--class",
        metavar="CLASS",
        help="Explain this class (COVID-19, Normal, Pneumonia) instead of the predicted one.",
    ),
    out: Path = typer.Option(Path("explain_out"), "--out", metavar="DIR", help="Output directory."),
    formats: str = typer.Option(
        "png,json,dcm", "--format", metavar="FORMATS", help="Outputs to write: png, json, dcm."
    ),
    batch_size: int = typer.Option(4, "--batch-size", metavar="N", min=1, help="Images per Grad-CAM batch."),
) -> None:
    """Grad-CAM heat maps on the original films: <name>_gradcam.png, <name>.json, <name>_gradcam.dcm.

    The DICOM output is a Secondary Capture in the source study (new series, "NOT FOR CLINICAL USE").
    Exit code 0 when every input succeeded, 1 when any failed, 2 on a usage error.
    """
    chosen = parse_formats(formats)
    bundle_dir = resolve_bundle(bundle)
    # imported here so that `cxr-monai --help` and the other commands do not load torch
    from cxr_monai.explain.files import explain_files
    from cxr_monai.explain.gradcam import class_index
    from cxr_monai.predictor import Predictor

    with user_errors():
        predictor = Predictor.from_bundle(bundle_dir)
        target = None if class_name is None else class_index(class_name, predictor.class_names)
        files = collect_inputs(inputs)
        if not files:
            raise CXRMonaiError("no input files found")
        columns = (TextColumn("explain"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True, disable=len(files) < 2) as progress:
            task = progress.add_task("explain", total=len(files))
            failures = explain_files(
                files,
                predictor,
                out,
                chosen,
                target,
                batch_size,
                on_done=lambda: progress.advance(task),
                on_note=lambda note: console.print(note, highlight=False, soft_wrap=True),
            )
    for message in failures.values():
        console.print(f"[bold red]failed:[/] {message}", highlight=False, soft_wrap=True)
    done = len(files) - len(failures)
    console.print(f"explained {done} of {len(files)} input(s); outputs in {out}", highlight=False)
    if failures:
        raise typer.Exit(code=1)
