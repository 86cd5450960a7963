"""``cxr-monai site calibrate`` without the command line: a site's labelled films -> a checked site profile.

Steps: :func:`load_site_films` reads and checks the labels CSV (before any model runs), :func:`score_films`
runs the bundle over the films (each film's probabilities cached by content), :func:`calibrate_site` fits
the chosen calibration on every film for the profile and scores it out of patient
(:func:`~cxr_monai.site.crossfit.cross_fitted`) with intervals and the acceptance verdict.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data.datalist import load_datalist
from cxr_monai.data.sources import DataItem, SiteCSV, scan_site_csv
from cxr_monai.errors import BundleError, DatasetError
from cxr_monai.evaluation.metrics import DEFAULT_N_BOOT
from cxr_monai.feature_store import FeatureStore, file_digest
from cxr_monai.predictor import Predictor
from cxr_monai.site.acceptance import Criterion, judge
from cxr_monai.site.calibration import FITTERS, LogitCalibration, fit_em_priors, with_operating_point
from cxr_monai.site.crossfit import Fit, cross_fitted, site_figures
from cxr_monai.site.profile import SiteProfile, check_site_name
from cxr_monai.training.layout import read_run_parameters
from cxr_monai.versions import cxr_monai_version

#: Calibration methods the command offers: the labelled fits, then the label-free one.
METHODS: tuple[str, ...] = (*FITTERS, "em-prior")
#: Fewest films of each class present among the labelled films.
MIN_FILMS_PER_CLASS = 2
#: Below this many films of a class the report says the intervals are wide.
FEW_FILMS = 10


@dataclass(frozen=True)
class SiteFilms:
    """A site's labelled films: ``items`` (image path, label, patient id) and each film's SHA-256."""

    items: list[DataItem]
    digests: list[str]
    warnings: list[str]

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([item.label for item in self.items], dtype=np.int64)

    @property
    def patients(self) -> list[str]:
        return [item.patient_id for item in self.items]

    def counts(self) -> dict[str, int]:
        """Films per class (every class, 0 where absent)."""
        found = Counter(self.labels.tolist())
        return {name: int(found.get(c, 0)) for c, name in enumerate(CLASS_NAMES)}

    def digest(self) -> str:
        """SHA-256 of the sorted (film content digest, label) pairs: the same films and labels, the same
        digest, whatever their paths or order."""
        lines = sorted(f"{d},{CLASS_NAMES[i.label]}" for d, i in zip(self.digests, self.items, strict=True))
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def load_site_films(labels_csv: Path, site: str, films_dir: Path | None = None) -> SiteFilms:
    """The films a labels CSV (``image,label[,patient_id]``) names, checked.

    ``image`` paths are relative to ``films_dir`` (default: the CSV's folder). Without ``patient_id`` each
    film is its own patient.

    Raises:
        DatasetError: a bad site name, an unknown class, a missing file, a film listed twice (same path or
            same content), a single class, or fewer than :data:`MIN_FILMS_PER_CLASS` films of a class.
    """
    check_site_name(site)
    if films_dir is not None and not films_dir.is_dir():
        raise DatasetError(f"--films {films_dir} is not a folder")
    scan = scan_site_csv(SiteCSV(labels_csv, site), base_dir=films_dir)
    if scan.missing_lines:
        shown = ", ".join(str(line) for line in scan.missing_lines[:5])
        more = ", ..." if len(scan.missing_lines) > 5 else ""
        raise DatasetError(
            f"{labels_csv}: {len(scan.missing_lines)} film(s) missing (CSV lines {shown}{more}); fix the "
            "paths or remove those lines"
        )
    items = scan.items
    if not items:
        raise DatasetError(f"{labels_csv}: lists no film")
    digests = [file_digest(item.image) for item in items]
    _check_no_duplicates(labels_csv, items, digests)
    films = SiteFilms(items, digests, list(scan.warnings))
    counts = {name: n for name, n in films.counts().items() if n}
    if len(counts) < 2:
        raise DatasetError(
            f"{labels_csv}: every film is {next(iter(counts))}; calibration needs films of at least two "
            "classes"
        )
    few = {name: n for name, n in counts.items() if n < MIN_FILMS_PER_CLASS}
    if few:
        listed = ", ".join(f"{name} {n}" for name, n in few.items())
        raise DatasetError(
            f"{labels_csv}: {listed} film(s); each class present needs at least {MIN_FILMS_PER_CLASS}"
        )
    return films


def _check_no_duplicates(labels_csv: Path, items: Sequence[DataItem], digests: Sequence[str]) -> None:
    """DatasetError when two lines name the same file, or files of the same content (CSV lines named)."""
    first: dict[str, int] = {}
    for line, digest in enumerate(digests, start=2):
        if digest in first:
            raise DatasetError(
                f"{labels_csv}: lines {first[digest]} and {line} are the same film (same content); list each "
                "film once"
            )
        first[digest] = line


def score_films(
    predictor: Predictor,
    films: SiteFilms,
    digest: str,
    *,
    cache_dir: Path | None = None,
    batch_size: int = 8,
    on_done: Callable[[int], None] = lambda _n: None,
) -> np.ndarray:
    """The model's own probabilities (N, K) for the films, in order. With ``cache_dir`` they are kept in a
    :class:`~cxr_monai.feature_store.FeatureStore` keyed by film content, under a spec of the model's
    weights (``digest``, see :func:`~cxr_monai.site.profile.model_digest`) and pre-processing, so a rerun
    (another method, other criteria) runs the model on new films only.

    Raises:
        InvalidImageError: a film cannot be read (the message names it).
    """
    spec = f"{digest}|{predictor.spatial_size}|{sorted(predictor.preprocessing_options.items())}"
    store = (
        FeatureStore(cache_dir, "site-scores-" + hashlib.sha256(spec.encode()).hexdigest()[:32])
        if cache_dir
        else None
    )
    out = np.full((len(films.items), len(predictor.class_names)), np.nan)
    todo = []
    for i, item in enumerate(films.items):
        cached = store.get(item.image) if store is not None else None
        if cached is not None:
            out[i] = cached
            on_done(1)
        else:
            todo.append(i)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        predictions = predictor.predict([films.items[i].image for i in chunk], batch_size)
        for i, prediction in zip(chunk, predictions, strict=True):
            out[i] = prediction.model_probabilities
            if store is not None:
                store.put(films.items[i].image, out[i])
        on_done(len(chunk))
    return out


def training_priors(bundle: Path) -> np.ndarray:
    """Class shares (K,) of the training split the bundle was trained on (its ``train.json`` datalist).

    Raises:
        BundleError: the bundle does not name a readable datalist (pass the shares yourself).
    """
    datalist = read_run_parameters(bundle).get("datalist")
    try:
        items = load_datalist(str(datalist))["training"] if datalist else []
    except (DatasetError, OSError, KeyError) as exc:
        raise BundleError(
            f"{bundle}: its training datalist cannot be read ({exc}); pass --training-priors"
        ) from None
    labels = [int(item["label"]) for item in items]
    if not labels:
        raise BundleError(f"{bundle}: names no training datalist; pass --training-priors")
    counts = np.bincount(labels, minlength=len(CLASS_NAMES)).astype(np.float64)
    return np.clip(counts, 1.0, None) / np.clip(counts, 1.0, None).sum()


def labelled_fit(method: str, target: tuple[int, float] | None) -> Fit:
    """The fitting function of a labelled method, with an operating point (class index, recall) if given."""
    fitter = FITTERS[method]
    if target is None:
        return fitter
    class_index, recall = target

    def fit(p: np.ndarray, y: np.ndarray) -> LogitCalibration:
        base = fitter(p, y)
        if not np.any(y == class_index):  # a fold without that class keeps the plain fit
            return base
        return with_operating_point(base, p, y, class_index, recall)

    return fit


def calibrate_site(
    site: str,
    films: SiteFilms,
    probabilities: np.ndarray,
    model: dict[str, str],
    *,
    method: str = "bias",
    target: tuple[int, float] | None = None,
    criteria: Sequence[Criterion] = (),
    priors: np.ndarray | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> SiteProfile:
    """Fit ``method`` on every film (the profile's calibration) and measure it honestly.

    Labelled methods are scored out of patient (:func:`cross_fitted`); ``em-prior`` uses no label, so it
    is fitted on every film's probabilities and the labels only score it. ``model`` is the profile's
    ``{"name", "version", "digest"}``; ``priors`` the training class shares (``em-prior`` only).
    """
    y, patients = films.labels, films.patients
    if method == "em-prior":
        if priors is None:
            raise ValueError("em-prior needs the training class shares")
        calibration = fit_em_priors(probabilities, priors)
        after = calibration.apply(probabilities)
        scheme = "label-free: fitted on every film's probabilities without their labels; labels only score it"
    elif method in FITTERS:
        fit = labelled_fit(method, target)
        calibration = fit(probabilities, y)
        crossfit = cross_fitted(probabilities, y, patients, fit)
        after, scheme = crossfit.probabilities, crossfit.scheme
    else:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
    before_figures = site_figures(y, probabilities, patients, n_boot=n_boot, seed=seed)
    after_figures = site_figures(y, after, patients, n_boot=n_boot, seed=seed)
    counts = films.counts()
    report: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cxr_monai_version": cxr_monai_version(),
        "films": {
            "total": len(films.items),
            "patients": len(set(patients)),
            "per_class": counts,
            "digest": films.digest(),
        },
        "method": {
            "name": method,
            "operating_point": None
            if target is None
            else {"class": CLASS_NAMES[target[0]], "recall": target[1]},
        },
        "evaluation": {
            "scheme": scheme,
            "before": before_figures,
            "after": after_figures,
        },
        "uncertainty": uncertainty_note(counts, before_figures),
        "warnings": list(films.warnings),
    }
    report["acceptance"] = (
        {"criteria_text": ",".join(str(c) for c in criteria), **judge(criteria, after_figures)}
        if criteria
        else {"verdict": "no criteria given", "criteria": []}
    )
    return SiteProfile(check_site_name(site), dict(model), calibration, report)


def uncertainty_note(counts: dict[str, int], before: dict[str, Any]) -> list[str]:
    """Plain sentences on how far to trust the figures: few films, and a ranking no calibration can fix."""
    notes = []
    present = {name: n for name, n in counts.items() if n}
    smallest = min(present.values())
    if smallest < FEW_FILMS:
        notes.append(
            f"Few films: the smallest class has {smallest}. Every figure's 95 % interval is wide (read "
            "ci_low and ci_high, not the value); a verdict stays undecided until more films narrow it. "
            "Add labelled films and recalibrate."
        )
    for name in present:
        auroc = before["per_class"][name]["auroc"]
        if auroc["ci_low"] is not None and auroc["ci_low"] <= 0.5:
            notes.append(
                f"The model's ranking of {name} against this site's other films is not shown to beat chance "
                f"(AUROC {auroc['value']:.2f} [{auroc['ci_low']:.2f}, {auroc['ci_high']:.2f}]): calibration "
                "moves the decision threshold, it cannot create ranking."
            )
    return notes
