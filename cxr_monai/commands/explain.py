"""``cxr-monai explain``: Grad-CAM overlay (PNG), report (JSON) and DICOM Secondary Capture per input."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import typer
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cxr_monai.atomic import atomic_path, write_json_atomic
from cxr_monai.commands import console, user_errors
from cxr_monai.errors import CXRMonaiError
from cxr_monai.explain import Explainer, Explanation, class_index
from cxr_monai.explain_report import explained_image
from cxr_monai.io import CXRImage, read_cxr
from cxr_monai.predictor import Predictor

logger = logging.getLogger(__name__)

FORMATS = ("png", "json", "dcm")
BUNDLE_ENV = "CXR_MONAI_BUNDLE"
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


def save_png(rgb: np.ndarray, path: Path) -> None:
    """RGB uint8 (rows, cols, 3) -> PNG at ``path``, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(rgb, mode="RGB").save(tmp, format="PNG")


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


@dataclass
class _Job:
    source: Path
    name: str
    image: CXRImage


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Output stems: the file stem, with ``_2``, ``_3``... when two inputs share one."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        count = seen.get(path.stem, 0) + 1
        seen[path.stem] = count
        names.append(path.stem if count == 1 else f"{path.stem}_{count}")
    return names


def _write_outputs(
    job: _Job, result: Explanation, predictor: Predictor, out: Path, formats: Sequence[str]
) -> list[str]:
    """Write the chosen outputs of one input; returns notes for the user (e.g. why no DICOM)."""
    explained = explained_image(predictor, job.source.name, job.image, result)
    notes: list[str] = []
    if "png" in formats:
        save_png(explained.overlay, out / f"{job.name}_gradcam.png")
    if "dcm" in formats:
        if job.image.dataset is None:
            explained.record["secondary_capture"] = {
                "written": False,
                "reason": "not a DICOM input: no source study",
            }
            notes.append(f"{job.source.name}: not DICOM, no source study; Secondary Capture skipped")
        else:
            sc = explained.secondary_capture()  # also records the orientation used in the record
            with atomic_path(out / f"{job.name}_gradcam.dcm") as tmp:
                sc.save_as(tmp, enforce_file_format=True)
    if "json" in formats:
        write_json_atomic(out / f"{job.name}.json", explained.record)
    return notes


def run_explain(
    files: Sequence[Path],
    predictor: Predictor,
    out: Path,
    formats: Sequence[str],
    target: int | None,
    batch_size: int,
    on_done: Callable[[], None] = lambda: None,
) -> dict[Path, str]:
    """Explain ``files`` in batches; returns {file: one-line error} for the inputs that failed."""
    explainer = Explainer(predictor.model, predictor.preprocess, batch_size=batch_size)
    failures: dict[Path, str] = {}
    names = _unique_names(files)
    for start in range(0, len(files), batch_size):
        jobs: list[_Job] = []
        for path, name in zip(
            files[start : start + batch_size], names[start : start + batch_size], strict=True
        ):
            try:
                jobs.append(_Job(path, name, read_cxr(path)))
            except (CXRMonaiError, OSError) as exc:
                failures[path] = (
                    str(exc) if isinstance(exc, CXRMonaiError) else f"{path.name}: {exc.strerror}"
                )
                on_done()
        if not jobs:
            continue
        try:
            results = explainer.explain([job.image for job in jobs], target)
        except (CXRMonaiError, RuntimeError, ValueError) as exc:
            for job in jobs:
                failures[job.source] = f"{job.source.name}: Grad-CAM failed ({exc})"
                on_done()
            continue
        for job, result in zip(jobs, results, strict=True):
            try:
                for note in _write_outputs(job, result, predictor, out, formats):
                    console.print(note, highlight=False, soft_wrap=True)
            except (CXRMonaiError, OSError, ValueError) as exc:
                failures[job.source] = f"{job.source.name}: outputs not written ({exc})"
            on_done()
    return failures


def explain(
    inputs: list[Path] = typer.Argument(..., help="Image files (DICOM, PNG, JPEG, NIfTI) or directories."),
    bundle: Path | None = typer.Option(
        None, "--bundle", envvar=BUNDLE_ENV, help=f"Trained bundle directory (default: ${BUNDLE_ENV})."
    ),
    class_name: str | None = typer.Option(
        None, "--class", help="Explain this class (COVID-19, Normal, Pneumonia) instead of the predicted one."
    ),
    out: Path = typer.Option(Path("explain_out"), "--out", help="Output directory."),
    formats: str = typer.Option("png,json,dcm", "--format", help="Outputs to write: png, json, dcm."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Images per Grad-CAM batch."),
) -> None:
    """Grad-CAM heat maps on the original films: <name>_gradcam.png, <name>.json, <name>_gradcam.dcm.

    The DICOM output is a Secondary Capture in the source study (new series, "NOT FOR CLINICAL USE").
    Exit code 0 when every input succeeded, 1 when any failed, 2 on a usage error.

    Example: cxr-monai explain study.dcm scans/ --bundle out/bundle --out out/explain --format png,json,dcm
    """
    chosen = parse_formats(formats)
    bundle_dir = resolve_bundle(bundle)
    with user_errors():
        predictor = Predictor.from_bundle(bundle_dir)
        target = None if class_name is None else class_index(class_name, predictor.class_names)
        files = collect_inputs(inputs)
        if not files:
            raise CXRMonaiError("no input files found")
        columns = (TextColumn("explain"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True, disable=len(files) < 2) as progress:
            task = progress.add_task("explain", total=len(files))
            failures = run_explain(
                files, predictor, out, chosen, target, batch_size, lambda: progress.advance(task)
            )
    for message in failures.values():
        console.print(f"[bold red]failed:[/] {message}", highlight=False, soft_wrap=True)
    done = len(files) - len(failures)
    console.print(f"explained {done} of {len(files)} input(s); outputs in {out}", highlight=False)
    if failures:
        raise typer.Exit(code=1)
