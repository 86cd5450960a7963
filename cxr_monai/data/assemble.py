"""``cxr-monai prepare`` as a library call: sources -> de-duplication -> class caps -> splits -> datalist."""

from __future__ import annotations

import logging
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import sklearn

from cxr_monai.atomic import write_json_atomic
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data.datalist import (
    DATALIST_FILENAME,
    SUMMARY_FILENAME,
    count_table,
    datalist_document,
)
from cxr_monai.data.sources import (
    DEFAULT_COVID_VIEWS,
    DataItem,
    SourceScan,
    scan_covid_dir,
    scan_kaggle_dir,
    scan_site_csv,
)
from cxr_monai.data.splits import assign_splits, outer_fold_count, subsample_per_class
from cxr_monai.errors import DatasetError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareOptions:
    """What to assemble. ``n_*``: images per class (None = all); the paper took 300 Normal, 300 Pneumonia."""

    covid_dir: Path | None = None
    kaggle_dir: Path | None = None
    site_csvs: tuple[Path, ...] = ()
    views: tuple[str, ...] = DEFAULT_COVID_VIEWS
    n_covid: int | None = None
    n_normal: int | None = 300
    n_pneumonia: int | None = 300
    test_fraction: float = 0.2
    folds: int = 5
    seed: int = 0


@dataclass
class PreparedDataset:
    """The datalist JSON object, the summary JSON object and the warnings (also inside the summary)."""

    datalist: dict[str, Any]
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def _scan_sources(options: PrepareOptions) -> list[SourceScan]:
    if options.covid_dir is None and options.kaggle_dir is None and not options.site_csvs:
        raise DatasetError("no data source given: pass --covid-dir, --kaggle-dir and/or --site-csv")
    stems = [Path(path).stem for path in options.site_csvs]
    repeated = sorted({stem for stem in stems if stems.count(stem) > 1})
    if repeated:
        raise DatasetError(
            f"site CSVs must have distinct file names (they name the source and prefix patient ids): "
            f"{', '.join(repeated)} given more than once"
        )
    scans = []
    if options.covid_dir is not None:
        scans.append(scan_covid_dir(options.covid_dir, options.views))
    if options.kaggle_dir is not None:
        scans.append(scan_kaggle_dir(options.kaggle_dir))
    scans.extend(scan_site_csv(path) for path in options.site_csvs)
    return scans


def _unique_images(scans: list[SourceScan], warnings: list[str]) -> list[DataItem]:
    """All scanned items, an image path listed twice kept once (first source wins), with a warning."""
    seen: set[str] = set()
    items: list[DataItem] = []
    duplicates = 0
    for scan in scans:
        for item in scan.items:
            if item.image in seen:
                duplicates += 1
                continue
            seen.add(item.image)
            items.append(item)
    if duplicates:
        warnings.append(f"{duplicates} image path(s) listed more than once; each kept once")
    return items


def _source_confounding(items: list[DataItem]) -> str | None:
    """A warning when two classes share no source: a model can then tell them apart by source alone."""
    sources: dict[str, set[str]] = {}
    for item in items:
        sources.setdefault(item.label_name, set()).add(item.source)
    names = [name for name in CLASS_NAMES if name in sources]
    if not any(sources[a].isdisjoint(sources[b]) for a in names for b in names if a < b):
        return None
    listing = "; ".join(f"{name}: {', '.join(sorted(sources[name]))}" for name in names)
    return (
        f"classes come from different sources ({listing}): a model can separate them by source "
        "(age, scanner, format) instead of disease"
    )


def _versions() -> dict[str, str]:
    try:
        package = version("cxr-monai")
    except PackageNotFoundError:
        package = "unknown"
    return {"cxr_monai": package, "scikit-learn": sklearn.__version__, "python": platform.python_version()}


def assemble_dataset(options: PrepareOptions) -> PreparedDataset:
    """Scan the sources, cap each class, split by patient: the datalist and its summary (nothing written).

    DatasetError for a missing source layout, a bad site CSV, impossible split options or no images.
    """
    scans = _scan_sources(options)
    warnings = [warning for scan in scans for warning in scan.warnings]
    items = _unique_images(scans, warnings)
    caps = dict(enumerate((options.n_covid, options.n_normal, options.n_pneumonia)))
    items, sampled, sample_warnings = subsample_per_class(items, caps, options.seed)
    warnings.extend(sample_warnings)
    for name, sample in sampled.items():
        if sample.available == 0:
            warnings.append(f"no {name} images in the given sources")
    confounding = _source_confounding(items)
    if confounding:
        warnings.append(confounding)
    assignment = assign_splits(items, options.test_fraction, options.folds, options.seed)
    training = [
        item.to_json() | {"fold": fold}
        for item, fold in zip(items, assignment, strict=True)
        if fold is not None
    ]
    test = [item.to_json() for item, fold in zip(items, assignment, strict=True) if fold is None]
    datalist = datalist_document(training, test, options.folds, options.seed, options.test_fraction)
    option_record = {
        key: (
            [str(v) for v in value]
            if isinstance(value, tuple)
            else str(value)
            if isinstance(value, Path)
            else value
        )
        for key, value in asdict(options).items()
    }
    summary = {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "options": option_record,
        "test_split": f"1 of {outer_fold_count(options.test_fraction)} patient-grouped folds",
        "sources": {scan.source: scan.summary() for scan in scans},
        "per_class": {name: asdict(sample) for name, sample in sampled.items()},
        "counts": count_table(datalist),
        "warnings": warnings,
    }
    logger.debug("assembled %d training and %d test images", len(training), len(test))
    return PreparedDataset(datalist=datalist, summary=summary, warnings=warnings)


def write_prepared(prepared: PreparedDataset, out_dir: Path) -> tuple[Path, Path]:
    """Write ``datalist.json`` and ``prepare_summary.json`` into ``out_dir`` (created), each atomically."""
    out_dir = Path(out_dir)
    datalist_path = out_dir / DATALIST_FILENAME
    summary_path = out_dir / SUMMARY_FILENAME
    write_json_atomic(datalist_path, prepared.datalist)
    write_json_atomic(summary_path, prepared.summary | {"datalist": str(datalist_path.resolve())})
    return datalist_path, summary_path
