"""``cxr-monai prepare`` as a library call: sources -> de-duplication -> class caps -> near-duplicate groups
-> splits -> datalist (+ summary figure)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, MutableMapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxr_monai.atomic import write_json_atomic
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data.datalist import (
    DATALIST_FILENAME,
    SUMMARY_FILENAME,
    count_table,
    datalist_document,
)
from cxr_monai.data.figure import write_summary_figure
from cxr_monai.data.findings import DEFAULT_FINDING_MAP, load_finding_map
from cxr_monai.data.near_duplicates import (
    CROP_LEVELS,
    NCC_THRESHOLD,
    PHASH_CANDIDATE_BITS,
    THUMBNAIL_SIZE,
    Fingerprint,
    FingerprintCache,
    NearDuplicatePair,
    fingerprint_images,
    load_cache,
    near_duplicate_pairs,
    save_cache,
    split_groups,
)
from cxr_monai.data.sources import (
    COVID_SOURCE,
    DEFAULT_COVID_VIEWS,
    KAGGLE_SOURCE,
    DataItem,
    SiteCSV,
    SourceScan,
    scan_covid_dir,
    scan_kaggle_dir,
    scan_site_csv,
    site_csv,
)
from cxr_monai.data.splits import assign_splits, outer_fold_count, subsample_per_class
from cxr_monai.errors import DatasetError
from cxr_monai.versions import package_versions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareOptions:
    """What to assemble. ``n_*``: images per class (None = all); the paper took 300 Normal, 300 Pneumonia.

    ``site_csvs``: paths (named after their stem) or :class:`SiteCSV`; ``finding_map``: a JSON/CSV file
    updating :data:`DEFAULT_FINDING_MAP`; ``cache_dir``: where image fingerprints are cached (None = none).
    """

    covid_dir: Path | None = None
    kaggle_dir: Path | None = None
    site_csvs: tuple[Path | SiteCSV, ...] = ()
    views: tuple[str, ...] = DEFAULT_COVID_VIEWS
    finding_map: Path | None = None
    cache_dir: Path | None = None
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
    #: Image fingerprints by content key and where :func:`write_prepared` compacts them (None: not saved).
    fingerprints: MutableMapping[str, Fingerprint] = field(default_factory=dict)
    cache_dir: Path | None = None


def _sites(options: PrepareOptions) -> list[SiteCSV]:
    return [entry if isinstance(entry, SiteCSV) else site_csv(entry) for entry in options.site_csvs]


def _scan_sources(options: PrepareOptions, finding_map: dict[str, str | None]) -> list[SourceScan]:
    if options.covid_dir is None and options.kaggle_dir is None and not options.site_csvs:
        raise DatasetError("no data source given: pass --covid-dir, --kaggle-dir and/or --site-csv")
    sites = _sites(options)
    names = [site.name for site in sites]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DatasetError(
            f"site CSVs must have distinct names (file stem or NAME= of --site-csv NAME=PATH; they name the "
            f"source and prefix patient ids): {', '.join(repeated)} given more than once"
        )
    scans = []
    if options.covid_dir is not None:
        scans.append(scan_covid_dir(options.covid_dir, options.views, finding_map))
    if options.kaggle_dir is not None:
        scans.append(scan_kaggle_dir(options.kaggle_dir))
    scans.extend(scan_site_csv(site) for site in sites)
    return scans


def _unique_images(
    scans: list[SourceScan], warnings: list[str]
) -> tuple[list[DataItem], list[tuple[str, str]]]:
    """All scanned items, an image path listed twice kept once (first source wins), with a warning; and
    the (kept, dropped) patient-id pairs of paths listed under two patients (one person: one split group).
    """
    seen: dict[str, str] = {}
    items: list[DataItem] = []
    duplicates = 0
    same_patients: set[tuple[str, str]] = set()
    for scan in scans:
        for item in scan.items:
            if item.image in seen:
                duplicates += 1
                if seen[item.image] != item.patient_id:
                    same_patients.add((seen[item.image], item.patient_id))
                continue
            seen[item.image] = item.patient_id
            items.append(item)
    if duplicates:
        warnings.append(f"{duplicates} image path(s) listed more than once; each kept once")
    return items, sorted(same_patients)


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


def _readable(
    items: list[DataItem],
    cache: MutableMapping[str, Fingerprint],
    on_progress: Callable[[int, int], None] | None,
    warnings: list[str],
    on_search_progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> tuple[list[DataItem], list[NearDuplicatePair], dict[str, Any]]:
    """Items whose image decodes, their near-duplicate pairs and the report of the fingerprinting."""
    if isinstance(cache, FingerprintCache) and cache.damaged:
        warnings.append(
            f"fingerprint cache {cache.directory}: damaged parts not trusted, those images fingerprinted "
            f"again ({'; '.join(cache.damaged)})"
        )
    fingerprints, cached = fingerprint_images([item.image for item in items], cache, on_progress, workers)
    unreadable = Counter(item.source for item, fp in zip(items, fingerprints, strict=True) if fp is None)
    if unreadable:
        listing = ", ".join(f"{source} {n}" for source, n in sorted(unreadable.items()))
        count = sum(unreadable.values())
        warnings.append(f"{count} image file(s) cannot be decoded and are skipped ({listing})")
    kept = [(item, fp) for item, fp in zip(items, fingerprints, strict=True) if fp is not None]
    items = [item for item, _ in kept]
    pairs = near_duplicate_pairs([fp for _, fp in kept], on_search_progress)
    report = {
        "method": {
            "crop_levels": list(CROP_LEVELS),
            "phash_candidate_bits": PHASH_CANDIDATE_BITS,
            "thumbnail_px": THUMBNAIL_SIZE,
            "correlation_threshold": NCC_THRESHOLD,
        },
        "fingerprinted": len(fingerprints),
        "from_cache": cached,
        "unreadable": dict(sorted(unreadable.items())),
        "same_patient_pairs": sum(items[p.first].patient_id == items[p.second].patient_id for p in pairs),
        "merged_pairs": [
            {
                "phash_bits": pair.phash_bits,
                "correlation": round(pair.correlation, 4),
                "images": [_public_record(items[pair.first]), _public_record(items[pair.second])],
            }
            for pair in pairs
            if items[pair.first].patient_id != items[pair.second].patient_id
        ],
    }
    return items, pairs, report


def _public_record(item: DataItem) -> dict[str, str]:
    """An image as the dataset names it: source, patient id, class and (public datasets only) file name."""
    record = {"source": item.source, "patient_id": item.patient_id, "label_name": item.label_name}
    if item.source in (COVID_SOURCE, KAGGLE_SOURCE):
        record["file"] = os.path.basename(item.image)
    return record


def counts_by_source(datalist: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Images per source and class over both splits: ``{source: {class name: n}}``."""
    counts: dict[str, dict[str, int]] = {}
    for item in datalist["training"] + datalist["test"]:
        row = counts.setdefault(item["source"], dict.fromkeys(CLASS_NAMES, 0))
        row[CLASS_NAMES[item["label"]]] += 1
    return dict(sorted(counts.items()))


def assemble_dataset(
    options: PrepareOptions,
    on_progress: Callable[[int, int], None] | None = None,
    on_search_progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> PreparedDataset:
    """Scan the sources, cap each class, fingerprint the images, split by patient merged with its
    near-duplicates: the datalist and its summary (nothing written but the fingerprint cache in
    ``options.cache_dir``, to which each new fingerprint is appended as soon as it is computed, so that an
    interrupted run resumes).

    ``on_progress(done, total)`` after each image fingerprinted; ``on_search_progress(done, total)`` as
    the near-duplicate search goes through the images; ``workers``: fingerprinting processes (the result
    does not depend on it). Images that cannot be decoded are skipped
    with a warning. DatasetError for a missing source layout, a bad site CSV or finding map, impossible
    split options or no images.
    """
    finding_map = (
        DEFAULT_FINDING_MAP if options.finding_map is None else load_finding_map(options.finding_map)
    )
    scans = _scan_sources(options, finding_map)
    warnings = [warning for scan in scans for warning in scan.warnings]
    items, same_patients = _unique_images(scans, warnings)
    caps = dict(enumerate((options.n_covid, options.n_normal, options.n_pneumonia)))
    items, sampled, sample_warnings = subsample_per_class(items, caps, options.seed)
    warnings.extend(sample_warnings)
    cache = load_cache(options.cache_dir) if options.cache_dir is not None else {}
    items, pairs, near_duplicates = _readable(
        items, cache, on_progress, warnings, on_search_progress, workers
    )
    groups = split_groups(items, pairs, same_patients)
    near_duplicates["same_file_patients"] = [list(pair) for pair in same_patients]
    for name, sample in sampled.items():
        if sample.available == 0:
            warnings.append(f"no {name} images in the given sources")
    confounding = _source_confounding(items)
    if confounding:
        warnings.append(confounding)
    assignment = assign_splits(items, options.test_fraction, options.folds, options.seed, groups)
    training = [
        item.to_json() | {"group": group, "fold": fold}
        for item, group, fold in zip(items, groups, assignment, strict=True)
        if fold is not None
    ]
    test = [
        item.to_json() | {"group": group}
        for item, group, fold in zip(items, groups, assignment, strict=True)
        if fold is None
    ]
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
    option_record["site_csvs"] = [f"{site.name}={site.path}" for site in _sites(options)]
    summary = {
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(),
        "options": option_record,
        "test_split": f"1 of {outer_fold_count(options.test_fraction)} patient-grouped folds",
        "sources": {scan.source: scan.summary() for scan in scans},
        "finding_map": finding_map if options.covid_dir is not None else None,
        "per_class": {name: asdict(sample) for name, sample in sampled.items()},
        "counts": count_table(datalist),
        "counts_by_source": counts_by_source(datalist),
        "near_duplicates": near_duplicates,
        "warnings": warnings,
    }
    logger.debug("assembled %d training and %d test images", len(training), len(test))
    return PreparedDataset(
        datalist=datalist, summary=summary, warnings=warnings, fingerprints=cache, cache_dir=options.cache_dir
    )


def write_prepared(prepared: PreparedDataset, out_dir: Path) -> tuple[Path, Path]:
    """Write ``datalist.json``, ``prepare_summary.json`` and ``dataset_summary.png`` into ``out_dir``
    (created), each atomically, and compact the fingerprint cache in ``prepared.cache_dir``; returns the
    first two paths."""
    out_dir = Path(out_dir)
    if prepared.cache_dir is not None:
        save_cache(prepared.cache_dir, prepared.fingerprints)
    datalist_path = out_dir / DATALIST_FILENAME
    summary_path = out_dir / SUMMARY_FILENAME
    write_json_atomic(datalist_path, prepared.datalist)
    figure = write_summary_figure(prepared.datalist, out_dir)
    write_json_atomic(
        summary_path,
        prepared.summary | {"datalist": str(datalist_path.resolve()), "figure": str(figure.resolve())},
    )
    return datalist_path, summary_path
