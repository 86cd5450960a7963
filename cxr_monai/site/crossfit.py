"""Honest figures for a site calibration: no film is scored by a calibration fitted on it.

:func:`cross_fitted` splits the site's films by patient (leave-one-patient-out up to
:data:`MAX_LEAVE_ONE_OUT` patients, else :data:`K_FOLDS` patient-grouped folds), fits the calibration on
the other patients' films and applies it to the held-out ones. :func:`site_figures` then scores the
model's own and the cross-fitted probabilities with patient-cluster bootstrap intervals (the same
:func:`~cxr_monai.evaluation.metrics.classification_metrics` as ``cxr-monai evaluate``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import GroupKFold, LeaveOneGroupOut

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.evaluation.metrics import DEFAULT_N_BOOT, classification_metrics
from cxr_monai.site.calibration import LogitCalibration

#: Up to this many patients every patient is held out on its own; more use K_FOLDS folds.
MAX_LEAVE_ONE_OUT = 200
K_FOLDS = 10
Fit = Callable[[np.ndarray, np.ndarray], LogitCalibration]


@dataclass(frozen=True)
class CrossFit:
    """Out-of-patient calibrated probabilities.

    Attributes:
        probabilities: float64 (N, K): film i calibrated by a fit that saw none of its patient's films.
        scheme: ``leave-one-patient-out`` or ``10-fold by patient``.
        folds: int (N,): which fit scored each film.
    """

    probabilities: np.ndarray
    scheme: str
    folds: np.ndarray


def cross_fitted(probabilities: np.ndarray, y: np.ndarray, groups: Sequence[Any], fit: Fit) -> CrossFit:
    """Apply ``fit`` (probabilities, labels) -> calibration out of patient: shapes (N, K), (N,), (N,).

    Raises:
        ValueError: fewer than two patients (nothing to hold out).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(y)
    patients = np.asarray([str(g) for g in groups])
    n_patients = len(np.unique(patients))
    if n_patients < 2:
        raise ValueError("cross-fitting needs films of at least two patients")
    if n_patients <= MAX_LEAVE_ONE_OUT:
        splitter: Any = LeaveOneGroupOut()
        scheme = "leave-one-patient-out"
    else:
        splitter = GroupKFold(n_splits=K_FOLDS)
        scheme = f"{K_FOLDS}-fold by patient"
    out = np.empty_like(p)
    folds = np.empty(len(p), dtype=np.int64)
    for fold, (fit_rows, held_out) in enumerate(splitter.split(p, labels, patients)):
        calibration = fit(p[fit_rows], labels[fit_rows])
        out[held_out] = calibration.apply(p[held_out])
        folds[held_out] = fold
    return CrossFit(out, scheme, folds)


def site_figures(
    y: np.ndarray,
    probabilities: np.ndarray,
    groups: Sequence[Any],
    *,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """``metrics.json``-style figures (accuracy, per-class recall/precision/AUROC..., ECE, confusion
    matrix) with patient-cluster bootstrap intervals, plus the share of films called each class."""
    figures = classification_metrics(
        np.asarray(y), np.asarray(probabilities), CLASS_NAMES, n_boot=n_boot, seed=seed, groups=groups
    ).to_dict()
    called = np.bincount(np.asarray(probabilities).argmax(axis=1), minlength=len(CLASS_NAMES))
    figures["called"] = {name: float(called[c] / len(y)) for c, name in enumerate(CLASS_NAMES)}
    return figures
