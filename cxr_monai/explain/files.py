"""Explain image files in batches and write what each gets: overlay PNG, JSON record, DICOM Secondary Capture.

The work behind ``cxr-monai explain``; one input's failure (unreadable file, a site refused under
``--unknown-site refuse``, failed write) is recorded and the others still go through.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cxr_monai.atomic import atomic_path
from cxr_monai.errors import CXRMonaiError
from cxr_monai.explain.gradcam import Explainer, Explanation
from cxr_monai.explain.overlay import png_bytes, render_captioned
from cxr_monai.explain.record import dicom_bytes, explained_image, overlay_lines
from cxr_monai.io import CXRImage, read_cxr
from cxr_monai.predictor import Predictor
from cxr_monai.site.profile import SiteStatus
from cxr_monai.site.sitemap import SiteMap


@dataclass
class _Job:
    source: Path
    name: str
    image: CXRImage
    site: SiteStatus


def film_site(image: CXRImage, site: str | None, institutions: SiteMap | None) -> str | None:
    """The site of a film: its DICOM InstitutionName's in ``institutions`` (when given and it names it),
    else ``site`` (None: unknown). The InstitutionName itself is never returned or quoted."""
    if institutions is not None and image.dataset is not None:
        mapped = institutions.site_for(None, str(image.dataset.get("InstitutionName", "") or ""))
        if mapped:
            return mapped
    return site


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Output stems, all different: the file stem, or the stem with ``_2``, ``_3``... when taken
    (``x/a.png``, ``y/a.png``, ``z/a_2.png`` -> ``a``, ``a_2``, ``a_2_2``)."""
    taken: set[str] = set()
    names = []
    for path in paths:
        name, n = path.stem, 1
        while name in taken:
            n += 1
            name = f"{path.stem}_{n}"
        taken.add(name)
        names.append(name)
    return names


def _write_outputs(
    job: _Job, result: Explanation, predictor: Predictor, out: Path, formats: Sequence[str]
) -> list[str]:
    """Write the chosen outputs of one input, all or none; returns notes for the user (e.g. why no DICOM).

    Every output is encoded in memory first, so an output that cannot be built (a DICOM without the
    UIDs a Secondary Capture needs) fails the input before anything is written; when a write fails,
    the outputs already written for this input are removed again.

    Raises:
        CXRMonaiError, OSError, ValueError: an output cannot be built or written (nothing left behind).
    """
    explained = explained_image(predictor, job.source.name, job.image, result)
    record = dict(explained.record)
    notes: list[str] = []
    payloads: dict[Path, bytes] = {}
    if "png" in formats:
        # a small film's text goes in a strip below it; the Secondary Capture keeps the source's grid
        picture = render_captioned(
            job.image.pixels, explained.heatmap, overlay_lines(predictor, job.image, result)
        )
        payloads[out / f"{job.name}_gradcam.png"] = png_bytes(picture)
    if "dcm" in formats:
        if job.image.dataset is None:
            record["secondary_capture"] = {"written": False, "reason": "not a DICOM input: no source study"}
            notes.append(f"{job.source}: not DICOM, no source study; Secondary Capture skipped")
        else:
            try:
                sc, sc_notes = explained.secondary_capture()
            except CXRMonaiError as exc:
                raise CXRMonaiError(f"Secondary Capture cannot be built ({exc}); nothing written") from exc
            payloads[out / f"{job.name}_gradcam.dcm"] = dicom_bytes(sc)
            record["secondary_capture"] = {"written": True, **sc_notes}
    if "json" in formats:
        text = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
        payloads[out / f"{job.name}.json"] = text.encode("utf-8")
    written: list[Path] = []
    try:
        for path, data in payloads.items():
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return notes


def explain_files(
    files: Sequence[Path],
    predictor: Predictor,
    out: Path,
    formats: Sequence[str],
    target: int | None,
    batch_size: int,
    on_done: Callable[[], None] = lambda: None,
    on_note: Callable[[str], None] = lambda _: None,
    on_warnings: Callable[[Path, tuple[str, ...]], None] = lambda _path, _found: None,
    site: str | None = None,
    institutions: SiteMap | None = None,
) -> dict[Path, str]:
    """Explain ``files`` in batches, writing ``formats`` (a subset of "png", "json", "dcm") into ``out``.

    ``target`` is the class index to explain (None: the predicted class; the site-calibrated arg-max).
    Each film's site is :func:`film_site` of ``site`` and ``institutions``; its status comes from
    ``predictor.sites`` (a film refused there fails, nothing written for it). ``on_done`` is called once per
    input, ``on_note`` with remarks for the user (e.g. why no DICOM was written), ``on_warnings`` with
    each explained file that has :attr:`CXRImage.warnings` (lateral view, not CR/DX, not CHEST ...: the
    result may not mean much). Returns {file: one-line reason, without the file's name} for the inputs
    that failed.
    """
    explainer = Explainer(predictor.model, predictor.preprocess, batch_size=batch_size)
    failures: dict[Path, str] = {}
    names = unique_names(files)
    for start in range(0, len(files), batch_size):
        jobs: list[_Job] = []
        for path, name in zip(
            files[start : start + batch_size], names[start : start + batch_size], strict=True
        ):
            try:
                image = read_cxr(path)
                jobs.append(
                    _Job(path, name, image, predictor.sites.resolve(film_site(image, site, institutions)))
                )
            except (CXRMonaiError, OSError) as exc:
                if isinstance(exc, CXRMonaiError):
                    # read_cxr names the file by its base name; the caller prints the path as given instead
                    failures[path] = str(exc).removeprefix(f"{path.name}: ")
                else:
                    failures[path] = exc.strerror or str(exc)
                on_done()
        if not jobs:
            continue
        try:
            results = explainer.explain([job.image for job in jobs], target, [job.site for job in jobs])
        except (CXRMonaiError, RuntimeError, ValueError) as exc:
            for job in jobs:
                failures[job.source] = f"Grad-CAM failed ({exc})"
                on_done()
            continue
        for job, result in zip(jobs, results, strict=True):
            try:
                for note in _write_outputs(job, result, predictor, out, formats):
                    on_note(note)
                if job.image.warnings:
                    on_warnings(job.source, job.image.warnings)
            except (CXRMonaiError, OSError, ValueError) as exc:
                failures[job.source] = f"outputs not written ({exc})"
            on_done()
    return failures
