"""``cxr-monai explain``: Grad-CAM overlay (PNG), report (JSON) and DICOM Secondary Capture per input."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cxr_monai.archive.films import NOT_IMAGES
from cxr_monai.commands import (
    bundle_option,
    console,
    examples,
    fail,
    resolve_bundle,
    site_from_institution_option,
    site_option,
    site_profiles_option,
    unknown_site_option,
    user_errors,
    warn_sites_without_profile,
)
from cxr_monai.errors import DatasetError

#: Outputs ``--format`` chooses from.
FORMATS = ("png", "json", "dcm")
EPILOG = examples(
    "cxr-monai explain study.dcm scans/ --bundle out/train/final \\\n"
    "    --out out/explain --format png,json,dcm",
    "cxr-monai explain scans/ --bundle out/train/final --site ourhospital \\\n    --unknown-site refuse",
)
#: Files a directory walk skips: hidden files and these (documentation/metadata next to images), as
#: ``cxr-monai predict`` skips them.
_NOT_IMAGES = NOT_IMAGES


def collect_inputs(paths: Sequence[Path]) -> list[Path]:
    """Files as given, directories walked (sorted, recursively; hidden and non-image documents skipped).

    Paths keep the form the user gave (a directory's files are that directory joined with their name).

    Raises:
        DatasetError: a path does not exist, or a directory holds no file to explain.
    """
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise DatasetError(f"no such file or directory: {', '.join(missing)}")
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            found.append(path)
            continue
        files = [
            p
            for p in sorted(path.rglob("*"))
            if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and p.suffix.lower() not in _NOT_IMAGES
        ]
        if not files:
            skipped = " ".join(sorted(_NOT_IMAGES))
            raise DatasetError(f"no input files found in {path} (hidden files and {skipped} are skipped)")
        found.extend(files)
    return found


def parse_formats(text: str) -> tuple[str, ...]:
    """``"png,json"`` -> ("png", "json"); unknown names are a usage error."""
    chosen = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise fail(
            f"--format: expected a comma-separated subset of {','.join(FORMATS)}, got {text!r}", code=2
        )
    return chosen


def explain(
    inputs: list[Path] = typer.Argument(
        ..., metavar="INPUT", help="Image files (DICOM, PNG, JPEG, NIfTI) or directories."
    ),
    bundle: Path | None = bundle_option(),
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
    site: str | None = site_option(),
    site_profiles: Path | None = site_profiles_option(),
    unknown_site: str = unknown_site_option(
        "A film of a site without a profile: flag (outputs say uncalibrated) or refuse (fails)."
    ),
    site_from_institution: Path | None = site_from_institution_option(),
) -> None:
    """Grad-CAM heat maps on the original films: <name>_gradcam.png, <name>.json, <name>_gradcam.dcm.

    The DICOM output is a Secondary Capture in the source study (new series, "NOT FOR CLINICAL USE").
    Probabilities and the predicted (and explained) class are calibrated for the films' site when the
    bundle has its profile; every output says which profile was applied, or that none was.
    Exit code 0 when every input succeeded, 1 when any failed, 2 on a usage error.
    """
    from cxr_monai.site.profile import UNKNOWN_SITE_POLICIES, check_site_name
    from cxr_monai.site.sitemap import SiteMap

    chosen = parse_formats(formats)
    if unknown_site not in UNKNOWN_SITE_POLICIES:
        raise fail(f"--unknown-site: expected flag or refuse, got {unknown_site!r}", code=2)
    bundle_dir = resolve_bundle(bundle)
    with user_errors():
        files = collect_inputs(inputs)  # before the bundle: a mistyped path fails in a second, not in 30
        institutions = SiteMap.read(site_from_institution) if site_from_institution else None
        if site is not None:
            check_site_name(site)
    # imported here so that `cxr-monai --help` and the other commands do not load torch
    from cxr_monai.explain.files import explain_files
    from cxr_monai.explain.gradcam import class_index
    from cxr_monai.predictor import Predictor

    with user_errors():
        predictor = Predictor.from_bundle(bundle_dir, site_profiles=site_profiles, unknown_site=unknown_site)
        target = None if class_name is None else class_index(class_name, predictor.class_names)
        named = ({site} if site else set()) | (institutions.sites if institutions else set())
        warn_sites_without_profile(named, predictor.sites.profiles, unknown_site)
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
                on_warnings=lambda path, found: console.print(
                    f"[yellow]warning:[/] {path}: {'; '.join(found)}", highlight=False, soft_wrap=True
                ),
                site=site,
                institutions=institutions,
            )
    for path, reason in failures.items():
        console.print(f"[bold red]failed:[/] {path}: {reason}", highlight=False, soft_wrap=True)
    done = len(files) - len(failures)
    console.print(f"explained {done} of {len(files)} input(s); outputs in {out}", highlight=False)
    if failures:
        raise typer.Exit(code=1)
