"""``cxr-monai predict``'s work: plan what is left, score this rank's shard batch by batch, merge.

1. **Plan** (rank 0): the output is repaired (a partial last line cut off), part files left by a killed
   torchrun run are merged into it, and its run record (``<out>.run.json``: the model, backend and site
   settings the rows were made with) is checked, so a rerun never mixes two models' rows. The films
   without a row are the plan; every rank gets it.
2. **Score**: each rank reads its share of the batches (:meth:`Shard.take`) with DataLoader workers,
   runs the batched forward and appends each batch's rows, fsynced, to the output (one process) or its
   part file.
3. **Merge** (rank 0, after a barrier): parts and output become one output in archive order, written
   atomically; so the result of N ranks equals the result of one.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxr_monai.archive.backends import Forward
from cxr_monai.archive.films import Film
from cxr_monai.archive.loader import FilmDataset, film_batches
from cxr_monai.archive.results import ResultFile, Row, columns, failed_row, is_failed, scored_row
from cxr_monai.archive.shards import Group, Shard, part_files, part_path
from cxr_monai.atomic import write_json_atomic
from cxr_monai.constants import RESEARCH_USE_NOTICE
from cxr_monai.errors import CXRMonaiError, DatasetError
from cxr_monai.predictor import Predictor
from cxr_monai.site.profile import SiteNotCalibratedError, SiteStatus
from cxr_monai.site.sitemap import SiteMap
from cxr_monai.versions import package_versions

RECORD_FORMAT = "cxr-monai predict run"
#: How many failed films a summary names (all of them are in the output's error column).
LISTED_FAILURES = 20


@dataclass(frozen=True)
class Settings:
    """How films are read and scored.

    Attributes:
        batch_size: films per forward.
        workers: DataLoader worker processes per rank (0: read in the scoring process).
        site: the site of films the site map does not place (None: unknown).
        institutions: InstitutionName -> site map, or None.
        retry_failed: score again the films the output lists as failed.
    """

    batch_size: int = 16
    workers: int = 2
    site: str | None = None
    institutions: SiteMap | None = None
    retry_failed: bool = False


@dataclass
class Summary:
    """The merged output's account (rank 0 only): films in the archive, rows scored (of them, without a
    site calibration) and failed (the first :data:`LISTED_FAILURES` named), films this run handled."""

    output: Path
    films: int
    scored: int
    uncalibrated: int
    failed_count: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    this_run: int = 0


def record_path(out: Path) -> Path:
    """The run record beside ``out``."""
    return out.with_name(f"{out.name}.run.json")


def identity(predictor: Predictor, backend: str, settings: Settings) -> dict[str, Any]:
    """What every row of one output must share: model, backend, pre-processing and site settings."""
    institutions = settings.institutions
    usable = ({settings.site} if settings.site else set()) | (institutions.sites if institutions else set())
    profiles = {  # only the profiles a film can get: another site's new profile does not stop a resume
        name: _digest(profile.to_dict())
        for name, profile in sorted(predictor.sites.profiles.items())
        if name in usable
    }
    site_map = (
        _digest({"ae": dict(institutions.ae_titles), "institutions": dict(institutions.institution_names)})
        if institutions
        else None
    )
    return {
        "model": {
            "name": predictor.model_name,
            "version": predictor.model_version,
            "digest": predictor.model_digest,
        },
        "class_names": list(predictor.class_names),
        "spatial_size": predictor.spatial_size,
        "preprocessing": dict(predictor.preprocessing_options),
        "backend": backend,
        "site": settings.site,
        "unknown_site": predictor.sites.unknown_site,
        "site_map_sha256": site_map,
        "site_profiles_sha256": profiles,
    }


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def consolidate(out: Path, header: Sequence[str], order: Sequence[str]) -> None:
    """Make the output hold every row of itself and of any part files, each key once, in ``order`` (keys
    no longer in the archive last); rewrite it (atomically) only when that changes it, then remove the
    parts.

    Files in order (the output and the parts as runs append them) are merged streaming, in bounded
    memory; an output out of order (films scored again with ``--retry-failed``, films added to the
    archive) is sorted in memory.
    """
    main = ResultFile(out, header)
    main.repair()
    parts = part_files(out)
    files = [main] + [ResultFile(part, header) for part in parts]
    position = {key: index for index, key in enumerate(order)}
    last = len(position)

    def rank(row: Row) -> int:
        return position.get(row[0], last)

    in_order = all(_in_order(file.rows(), rank) for file in files)
    if not parts and in_order:
        return
    if in_order:
        merged: Iterable[Row] = heapq.merge(*(file.rows() for file in files), key=rank)
    else:
        merged = sorted((row for file in files for row in file.rows()), key=rank)
    main.replace(_unique(merged, rank, last))
    for part in parts:
        part.unlink(missing_ok=True)


def _in_order(rows: Iterable[Row], rank: Callable[[Row], int]) -> bool:
    previous = -1
    for row in rows:
        current = rank(row)
        if current < previous:
            return False
        previous = current
    return True


def _unique(rows: Iterable[Row], rank: Callable[[Row], int], last: int) -> Iterator[Row]:
    """``rows`` (in order) without repeated keys, the first row of each kept (the output's own before a
    part's, as merged). A key of the archive repeats only next to itself; the few keys not in it are
    remembered."""
    previous: str | None = None
    strays: set[str] = set()
    for row in rows:
        key, stray = row[0], rank(row) == last
        if key == previous or (stray and key in strays):
            continue
        if stray:
            strays.add(key)
        previous = key
        yield row


def plan(
    out: Path, header: Sequence[str], films: Sequence[Film], run_identity: dict[str, Any], retry_failed: bool
) -> tuple[list[Film], int]:
    """(the films still to score, the rows already in the output), after checking, repairing and
    merging what earlier runs left (rank 0's job).

    Raises:
        DatasetError: the output holds rows made with another model, backend or site settings, or is not
            a predict output.
    """
    earlier = _read_record(record_path(out))
    has_rows = next(ResultFile(out, header).rows(), None) is not None or bool(part_files(out))
    if has_rows and not isinstance(earlier.get("identity"), dict):
        raise DatasetError(
            f"{out} holds rows but no run record ({record_path(out).name}) says how they were made; pass "
            "another --out, or remove it to start again"
        )
    if has_rows and earlier["identity"] != run_identity:
        changed = sorted(key for key in run_identity if earlier["identity"].get(key) != run_identity[key])
        raise DatasetError(
            f"{out} holds rows made with other settings ({', '.join(changed)} differ); pass another "
            "--out, or remove it and its .run.json to start again"
        )
    consolidate(out, header, [film.key for film in films])
    main = ResultFile(out, header)
    if retry_failed and any(is_failed(row) for row in main.rows()):
        main.replace(row for row in main.rows() if not is_failed(row))
    done = {row[0] for row in main.rows()}
    _write_record(out, run_identity, status="running", films=len(films), rows=len(done))
    return [film for film in films if film.key not in done], len(done)


def score(
    films: Sequence[Film],
    predictor: Predictor,
    forward: Forward,
    target: ResultFile,
    settings: Settings,
    on_batch: Callable[[int], None] = lambda _n: None,
) -> int:
    """Score ``films`` in batches, appending each batch's rows to ``target`` (fsynced); returns the rows
    written. A film that cannot be read, or whose site is refused, gets a failed row."""
    if not films:
        return 0
    dataset = FilmDataset(films, predictor.preprocess, settings.site, settings.institutions)
    statuses: dict[str | None, SiteStatus | str] = {}
    written = 0
    try:
        for batch in film_batches(dataset, settings.batch_size, settings.workers):
            probabilities = forward(batch.inputs) if batch.inputs is not None else None
            slot = {index: position for position, index in enumerate(batch.readable)}
            rows: list[Row] = []
            for index, record in enumerate(batch.records):
                key, names = record.film.key, predictor.class_names
                status = _status(predictor, record.site, statuses)
                if record.error is not None or probabilities is None:
                    rows.append(failed_row(key, names, record.site, record.error or "not read"))
                elif isinstance(status, str):
                    rows.append(failed_row(key, names, record.site, status))
                else:
                    model = probabilities[slot[index]]
                    rows.append(scored_row(key, names, model, status, record.warnings))
            target.append(rows)
            written += len(rows)
            on_batch(len(rows))
    finally:
        target.close()
    return written


def _status(
    predictor: Predictor, site: str | None, cache: dict[str | None, SiteStatus | str]
) -> SiteStatus | str:
    """The site's status, or the reason its films are refused (one resolution per site)."""
    if site not in cache:
        try:
            cache[site] = predictor.sites.resolve(site)
        except SiteNotCalibratedError as exc:
            cache[site] = str(exc)
    return cache[site]


def predict_archive(
    films: Sequence[Film],
    out: Path,
    predictor: Predictor,
    forward: Forward,
    backend: str,
    settings: Settings,
    shard: Shard,
    group: Group,
    on_plan: Callable[[int, int, int], None] = lambda _todo, _mine, _done: None,
    on_batch: Callable[[int], None] = lambda _n: None,
) -> Summary | None:
    """Plan, score this rank's shard, merge; the summary on rank 0 (None on the other ranks).

    ``on_plan(films to score, of them this rank's, rows already there)`` is called once the plan is known.

    Raises:
        CXRMonaiError: the plan cannot be made (on every rank: rank 0's reason is broadcast).
    """
    header = columns(predictor.class_names)
    run_identity = identity(predictor, backend, settings)
    message: str | None = None
    pending: list[Film] = []
    done = 0
    if shard.rank == 0:
        try:
            pending, done = plan(out, header, films, run_identity, settings.retry_failed)
        except (CXRMonaiError, OSError) as exc:
            message = str(exc)
    message, pending, done = group.broadcast((message, pending, done))
    if message is not None:
        raise CXRMonaiError(message)
    mine = shard.take(pending, settings.batch_size)
    on_plan(len(pending), len(mine), done)
    target = ResultFile(part_path(out, shard.rank) if shard.distributed else out, header)
    score(mine, predictor, forward, target, settings, on_batch)
    group.barrier()
    if shard.rank != 0:
        return None
    consolidate(out, header, [film.key for film in films])
    calibrated_column = header.index("site_calibrated")
    summary = Summary(output=out, films=len(films), scored=0, uncalibrated=0, this_run=len(pending))
    rows = 0
    for row in ResultFile(out, header).rows():
        rows += 1
        if is_failed(row):
            summary.failed_count += 1
            if len(summary.failed) < LISTED_FAILURES:
                summary.failed.append((row[0], row[-1]))
        else:
            summary.scored += 1
            summary.uncalibrated += row[calibrated_column] == "false"
    _write_record(
        out, run_identity, status="complete", films=len(films), rows=rows, failed=summary.failed_count
    )
    return summary


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise DatasetError(f"{path}: damaged run record; remove the output and it to start again") from None
    return record if isinstance(record, dict) else {}


def _write_record(out: Path, run_identity: dict[str, Any], status: str, **counts: int) -> None:
    write_json_atomic(
        record_path(out),
        {
            "format": RECORD_FORMAT,
            "status": status,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "output": out.name,
            "identity": run_identity,
            "counts": counts,
            "versions": package_versions(),
            "intended_use": RESEARCH_USE_NOTICE,
        },
    )
