"""Per-site calibration of a trained model's probabilities, fitted on a site's own films.

Every method here is a map in **log-probability space**: calibrated probabilities are
``softmax(scale * log p + bias)`` for the model's probabilities ``p`` (N, K), with ``scale`` and ``bias``
(K,). Working on log p rather than the network's raw logits means the map applies wherever the model's
probabilities exist (eager, ONNX Runtime, Grad-CAM's forward pass); for ``bias`` alone the two are the
same map, since log p and the logits differ by one number per film, which softmax removes.

* ``temperature`` (:func:`fit_temperature_scaling`): one scale shared by the classes (1 / temperature) and
  a bias per class; fitted on labelled films. The default: the lowest calibration error on unseen films of
  every left-out source (``benchmarks/results/site_calibration.md``).
* ``bias`` (:func:`fit_logit_bias`): scale 1, one bias per class.
* ``vector`` (:func:`fit_vector_scaling`): a scale and a bias per class (vector scaling, Guo et al. 2017).
* ``em-prior`` (:func:`fit_em_priors`): **no labels**: the site's class priors re-estimated by EM from its
  unlabelled films (Saerens, Latinne & Decaestecker 2002), bias = log(site prior / training prior).
* :func:`with_operating_point`: an extra bias on one class, the smallest that gives that class a declared
  recall on the fitting films (a per-class operating threshold).

The labelled fits minimise the **class-balanced** negative log-likelihood (each class present among the
films weighs the same, so 5 Normal + 5 COVID-19 films do not teach the site's prevalence) times the number
of films, plus a Gaussian prior on the parameters (bias sd :data:`BIAS_PRIOR_SD` nats, log-scale sd
:data:`LOG_SCALE_PRIOR_SD`): with 2 films per class the maximum-likelihood bias is infinite (separable
films), and the prior keeps it finite and shrinks it towards no change. A class no fitting film holds is
pushed down only as far as the prior lets it.

Hand-written: scikit-learn's calibrators are binary (``CalibratedClassifierCV``) or refit a classifier;
none fits a bias on given multi-class probabilities. scipy's L-BFGS does the minimisation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize

#: Prior sd of each class's bias (nats of log-odds): shifts of a few nats are plausible, tens are not.
BIAS_PRIOR_SD = 2.0
#: Prior sd of a log-scale (temperature and vector scaling): weak, so a site whose films the model ranks at
#: chance can shrink its confidence towards uniform. Against 0.25 and 1.0 it gave the lowest calibration
#: error on unseen films of every left-out source and of simulated sites (benchmarks/results/
#: site_calibration.md).
LOG_SCALE_PRIOR_SD = 2.0
#: Probabilities are clipped to this before the log (a probability of 0 has no log).
_FLOOR = 1e-12
#: The margin by which an operating point clears a film's decision boundary (nats).
_MARGIN = 1e-6


@dataclass(frozen=True)
class LogitCalibration:
    """``softmax(scale * log p + bias)``: ``scale``, ``bias`` float64 (K,); ``method`` names the fit."""

    method: str
    scale: np.ndarray
    bias: np.ndarray

    @classmethod
    def identity(cls, num_classes: int) -> LogitCalibration:
        """The map that changes nothing (method ``none``)."""
        return cls("none", np.ones(num_classes), np.zeros(num_classes))

    def logits(self, probabilities: np.ndarray) -> np.ndarray:
        """(N, K) probabilities -> (N, K) calibrated log-odds (before the softmax)."""
        p = _as_probabilities(probabilities, len(self.bias))
        return self.scale * np.log(np.clip(p, _FLOOR, 1.0)) + self.bias

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        """(N, K) or (K,) probabilities -> calibrated probabilities of the same shape (rows sum to 1)."""
        p = np.asarray(probabilities, dtype=np.float64)
        out = _softmax(self.logits(np.atleast_2d(p)))
        return out.reshape(p.shape)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"method", "scale": [K floats], "bias": [K floats]}``."""
        return {"method": self.method, "scale": self.scale.tolist(), "bias": self.bias.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], num_classes: int) -> LogitCalibration:
        """Inverse of :meth:`to_dict`. ValueError naming the field when a value is missing or malformed."""
        try:
            method = str(data["method"])
            scale = np.asarray(data["scale"], dtype=np.float64)
            bias = np.asarray(data["bias"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"calibration needs method, scale and bias ({exc})") from None
        for name, values in (("scale", scale), ("bias", bias)):
            if values.shape != (num_classes,) or not np.all(np.isfinite(values)):
                raise ValueError(f"calibration {name} must be {num_classes} finite numbers")
        if np.any(scale <= 0):
            raise ValueError("calibration scale must be positive")
        return cls(method, scale, bias)


def fit_logit_bias(probabilities: np.ndarray, y: np.ndarray) -> LogitCalibration:
    """Per-class bias (scale 1) fitted on labelled films: ``probabilities`` (N, K), ``y`` (N,) classes."""
    p, y = _check_labelled(probabilities, y)
    k = p.shape[1]
    theta = _fit(np.log(np.clip(p, _FLOOR, 1.0)), y, scales=0)
    return LogitCalibration("bias", np.ones(k), theta[:k])


def fit_temperature_scaling(probabilities: np.ndarray, y: np.ndarray) -> LogitCalibration:
    """One shared scale and a per-class bias fitted on labelled films; shapes as in fit_logit_bias."""
    p, y = _check_labelled(probabilities, y)
    k = p.shape[1]
    theta = _fit(np.log(np.clip(p, _FLOOR, 1.0)), y, scales=1)
    return LogitCalibration("temperature", np.full(k, np.exp(theta[k])), theta[:k])


def fit_vector_scaling(probabilities: np.ndarray, y: np.ndarray) -> LogitCalibration:
    """Per-class scale and bias (vector scaling) fitted on labelled films; shapes as in fit_logit_bias."""
    p, y = _check_labelled(probabilities, y)
    k = p.shape[1]
    theta = _fit(np.log(np.clip(p, _FLOOR, 1.0)), y, scales=k)
    return LogitCalibration("vector", np.exp(theta[k:]), theta[:k])


def fit_em_priors(
    probabilities: np.ndarray,
    training_priors: Sequence[float] | np.ndarray,
    *,
    max_iter: int = 1000,
    tol: float = 1e-8,
) -> LogitCalibration:
    """No labels: the site's class priors by EM (Saerens et al. 2002) from its unlabelled films'
    probabilities (N, K), given the class shares the model was trained on (K,); bias = log(site / training).
    """
    p = _as_probabilities(probabilities, len(training_priors))
    if len(p) == 0:
        raise ValueError("EM prior re-estimation needs at least one unlabelled film")
    train = np.asarray(training_priors, dtype=np.float64)
    if np.any(train <= 0) or not np.isfinite(train).all():
        raise ValueError("training priors must be positive")
    train = train / train.sum()
    prior = train.copy()
    for _ in range(max_iter):
        adjusted = p * (prior / train)
        adjusted /= adjusted.sum(axis=1, keepdims=True)
        new = np.clip(adjusted.mean(axis=0), 1e-6, None)
        new /= new.sum()
        if np.max(np.abs(new - prior)) < tol:
            prior = new
            break
        prior = new
    return LogitCalibration("em-prior", np.ones(len(train)), np.log(prior / train))


def with_operating_point(
    calibration: LogitCalibration, probabilities: np.ndarray, y: np.ndarray, class_index: int, recall: float
) -> LogitCalibration:
    """``calibration`` with the smallest extra bias on ``class_index`` (>= 0) that makes the share of that
    class's films in (``probabilities``, ``y``) called that class reach ``recall`` in (0, 1]."""
    p, y = _check_labelled(probabilities, y)
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"target recall must be in (0, 1], got {recall}")
    members = y == class_index
    if not members.any():
        raise ValueError(f"no film of class {class_index} to set its operating point on")
    z = calibration.logits(p[members])
    others = np.delete(z, class_index, axis=1).max(axis=1)
    margins = np.sort(others - z[:, class_index])  # the shift each film needs to be called the class
    needed = int(np.ceil(recall * len(margins) - 1e-9))
    shift = max(0.0, float(margins[needed - 1]) + _MARGIN)
    bias = calibration.bias.copy()
    bias[class_index] += shift
    return LogitCalibration(f"{calibration.method}+operating-point", calibration.scale.copy(), bias)


#: The labelled fits by name.
FITTERS: dict[str, Callable[[np.ndarray, np.ndarray], LogitCalibration]] = {
    "temperature": fit_temperature_scaling,
    "bias": fit_logit_bias,
    "vector": fit_vector_scaling,
}


def _fit(log_p: np.ndarray, y: np.ndarray, *, scales: int) -> np.ndarray:
    """MAP parameters [bias (K), log-scale (``scales``: 0, 1 shared, or K)]: class-balanced NLL + prior."""
    n, k = log_p.shape
    onehot = np.eye(k)[y]
    counts = np.bincount(y, minlength=k).astype(np.float64)
    present = counts > 0
    # each present class's films share 1/(classes present) of the weight; times n: a sum over films
    weights = n / (present.sum() * counts[y])
    sd = np.concatenate([np.full(k, BIAS_PRIOR_SD), np.full(scales, LOG_SCALE_PRIOR_SD)])

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        bias = theta[:k]
        scale = np.exp(theta[k:]) if scales else 1.0  # (K,), (1,) shared, or none
        z = scale * log_p + bias
        z = z - z.max(axis=1, keepdims=True)
        log_q = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nll = -np.sum(weights * log_q[np.arange(n), y])
        residual = weights[:, None] * (np.exp(log_q) - onehot)  # d NLL / d z, (N, K)
        grad = [residual.sum(axis=0)]
        if scales:  # d / d log-scale: per class, or summed over the classes for one shared scale
            by_class = (residual * log_p).sum(axis=0)
            grad.append(scale * (by_class if scales == k else by_class.sum(keepdims=True)))
        prior = 0.5 * np.sum((theta / sd) ** 2)
        return nll + prior, np.concatenate(grad) + theta / sd**2

    result = minimize(objective, np.zeros(len(sd)), jac=True, method="L-BFGS-B")
    return np.asarray(result.x, dtype=np.float64)


def _check_labelled(probabilities: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = _as_probabilities(probabilities, None)
    labels = np.asarray(y)
    if labels.shape != (len(p),):
        raise ValueError(f"{len(p)} films but {labels.shape} labels")
    if len(p) == 0:
        raise ValueError("no labelled film to fit on")
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= p.shape[1]:
        raise ValueError(f"labels must be class indices in 0..{p.shape[1] - 1}")
    return p, labels.astype(np.int64)


def _as_probabilities(probabilities: np.ndarray, num_classes: int | None) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or (num_classes is not None and p.shape[1] != num_classes):
        raise ValueError(f"probabilities must be (N, {num_classes or 'K'}), got shape {p.shape}")
    if not np.isfinite(p).all() or np.any(p < 0):
        raise ValueError("probabilities must be finite and non-negative")
    return p


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
