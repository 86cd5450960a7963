"""The shortcut check: a deliberately disease-blind baseline scored beside the model.

The baseline is a logistic regression (scikit-learn, standardised features) on what says where an image
came from rather than what it shows: a 16 x 16 grayscale thumbnail (per-image min-max to [0, 1]), the
original width and height in pixels, and the file's colour mode (one-hot). Fitted on the bundle's
training items and scored on the evaluated items, it measures how much of a classification can be done
from image source alone. If it comes close to the model, the model's accuracy is not evidence that it
sees disease.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from monai.transforms import Compose, EnsureChannelFirst, Resize, ScaleIntensity
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.evaluation.metrics import (
    DEFAULT_CONFIDENCE,
    DEFAULT_N_BOOT,
    Estimate,
    confusion_counts,
    confusion_figures,
    point_and_interval,
    to_estimate,
)
from cxr_monai.io import CXRImage

THUMBNAIL_SIDE = 16

#: What such a baseline did on the public data (measured by the project on images not shipped here).
CONTEXT = (
    "For context: on the public COVID-19 / Kaggle paediatric data such a baseline scores about 0.93 "
    "accuracy on a patient-disjoint test split and about 0.21 on adult films from other hospitals, "
    "calling almost every adult normal film COVID-19: every COVID-19 image there is an adult's, every "
    "Normal/Pneumonia image a child's."
)

DESCRIPTION = (
    "logistic regression on 16x16 grayscale thumbnails plus image width, height and colour mode "
    "(standardised features); disease-blind by design"
)

_thumbnail = Compose(
    [
        EnsureChannelFirst(channel_dim="no_channel"),
        ScaleIntensity(minv=0.0, maxv=1.0),
        Resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), mode="area"),
    ]
)


@dataclass(frozen=True)
class ShortcutFeatures:
    """What the baseline sees of one image: ``thumbnail`` float32 (16, 16) in [0, 1], the original
    ``width`` and ``height`` (pixels) and ``color_mode`` (Pillow mode or DICOM photometric)."""

    thumbnail: np.ndarray
    width: int
    height: int
    color_mode: str


def shortcut_features(image: CXRImage) -> ShortcutFeatures:
    """Reduce a decoded image to the baseline's features (cheap to keep; the pixels can be dropped)."""
    rows, cols = image.shape
    thumb = np.asarray(_thumbnail(image.pixels), dtype=np.float32)[0]
    return ShortcutFeatures(thumbnail=thumb, width=cols, height=rows, color_mode=image.color_mode)


#: Spec of the baseline's features in a :class:`~cxr_monai.feature_store.FeatureStore` (change it when
#: :func:`shortcut_features` changes, so stored features are not reused).
SHORTCUT_SPEC = f"shortcut-{THUMBNAIL_SIDE}px-v1"
_RECORD = np.dtype(
    [
        ("color_mode", "U32"),
        ("width", "i8"),
        ("height", "i8"),
        ("thumbnail", "f4", (THUMBNAIL_SIDE, THUMBNAIL_SIDE)),
    ]
)


def to_record(features: ShortcutFeatures) -> np.ndarray:
    """The features as one structured array (shape ()), for a feature store."""
    record = np.zeros((), dtype=_RECORD)
    record["color_mode"], record["width"], record["height"] = (
        features.color_mode,
        features.width,
        features.height,
    )
    record["thumbnail"] = features.thumbnail
    return record


def from_record(record: np.ndarray) -> ShortcutFeatures:
    """Inverse of :func:`to_record`."""
    return ShortcutFeatures(
        thumbnail=np.array(record["thumbnail"], dtype=np.float32),
        width=int(record["width"]),
        height=int(record["height"]),
        color_mode=str(record["color_mode"]),
    )


def _design_matrix(features: Sequence[ShortcutFeatures]) -> np.ndarray:
    """(N, 3 + 256) object array: colour mode, width, height, thumbnail pixels."""
    rows = [[f.color_mode, f.width, f.height, *f.thumbnail.ravel().tolist()] for f in features]
    return np.asarray(rows, dtype=object)


def _encoder() -> ColumnTransformer:
    """Design matrix (:func:`_design_matrix`) -> numeric: one-hot colour mode, the rest as is."""
    return ColumnTransformer(
        [
            ("color_mode", OneHotEncoder(handle_unknown="ignore", sparse_output=False), [0]),
            ("numeric", "passthrough", slice(1, None)),
        ]
    )


def encode_features(features: Sequence[ShortcutFeatures]) -> np.ndarray:
    """(N, D) float matrix of the baseline's features (one-hot colour mode over the modes present in
    ``features``, width, height, 256 thumbnail pixels), unstandardised: the disease-blind input of the
    source probe. The one-hot categories are learnt from ``features`` themselves (no labels involved)."""
    return np.asarray(_encoder().fit_transform(_design_matrix(features)), dtype=np.float64)


class ShortcutBaseline:
    """Standardise (one-hot colour mode, width, height, thumbnail) -> multinomial logistic regression."""

    def __init__(self, seed: int = 0) -> None:
        self.pipeline = Pipeline(
            [
                ("encode", _encoder()),
                ("standardise", StandardScaler()),
                ("classify", LogisticRegression(max_iter=2000, random_state=seed)),
            ]
        )

    def fit(self, features: Sequence[ShortcutFeatures], labels: Sequence[int]) -> ShortcutBaseline:
        """Fit on training items; needs at least two classes."""
        y = np.asarray(labels, dtype=np.int64)
        if len(np.unique(y)) < 2:
            raise ValueError("the shortcut baseline needs training items of at least two classes")
        self.pipeline.fit(_design_matrix(features), y)
        return self

    def predict(self, features: Sequence[ShortcutFeatures]) -> np.ndarray:
        """(N,) predicted class indices."""
        return np.asarray(self.pipeline.predict(_design_matrix(features)), dtype=np.int64)

    def predict_proba(
        self, features: Sequence[ShortcutFeatures], n_classes: int = len(CLASS_NAMES)
    ) -> np.ndarray:
        """(N, n_classes) class probabilities; a class absent from the training items gets 0."""
        fitted = self.pipeline.predict_proba(_design_matrix(features))
        out = np.zeros((fitted.shape[0], n_classes))
        out[:, self.pipeline.classes_] = fitted
        return out


@dataclass(frozen=True)
class ShortcutResult:
    """The baseline's figures on the evaluated items, with bootstrap intervals paired with the model's.

    ``accuracy_gap`` is model accuracy minus baseline accuracy on the same resamples.
    """

    accuracy: Estimate
    recall: dict[str, Estimate]
    accuracy_gap: Estimate
    predictions: np.ndarray
    n_training_items: int
    fitted_on_evaluated_items: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "description": DESCRIPTION,
            "accuracy": self.accuracy.to_dict(),
            "recall": {name: est.to_dict() for name, est in self.recall.items()},
            "model_minus_baseline_accuracy": self.accuracy_gap.to_dict(),
            "n_training_items": self.n_training_items,
            "fitted_on_evaluated_items": self.fitted_on_evaluated_items,
        }


def score_shortcut(
    baseline_pred: np.ndarray,
    y_true: np.ndarray,
    model_pred: np.ndarray,
    *,
    class_names: Sequence[str] = CLASS_NAMES,
    n_training_items: int,
    fitted_on_evaluated_items: bool = False,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
    groups: Sequence[Any] | None = None,
) -> ShortcutResult:
    """Accuracy and per-class recall of the baseline's predictions (N,), and the model's lead over it.

    Uses the same resamples as :func:`cxr_monai.evaluation.metrics.classification_metrics` with the same
    ``seed``/``groups``, so the intervals are paired with the model's.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    base_ok = (np.asarray(baseline_pred) == y_true).astype(np.float64)
    model_ok = (np.asarray(model_pred) == y_true).astype(np.float64)
    k = len(class_names)

    def figures(idx: np.ndarray) -> np.ndarray:
        recall = confusion_figures(confusion_counts(y_true[idx], baseline_pred[idx], k))["recall"]
        return np.array([base_ok[idx].mean(), model_ok[idx].mean() - base_ok[idx].mean(), *recall])

    point, low, high = point_and_interval(
        figures, len(y_true), n_boot=n_boot, confidence=confidence, seed=seed, groups=groups
    )

    def estimate(i: int) -> Estimate:
        return to_estimate(point[i], low[i], high[i])

    return ShortcutResult(
        accuracy=estimate(0),
        recall={name: estimate(2 + c) for c, name in enumerate(class_names)},
        accuracy_gap=estimate(1),
        predictions=np.asarray(baseline_pred, dtype=np.int64),
        n_training_items=int(n_training_items),
        fitted_on_evaluated_items=fitted_on_evaluated_items,
    )


def verdict(model_accuracy: Estimate, shortcut: ShortcutResult, majority_share: float) -> str:
    """Plain words: how close the disease-blind baseline comes to the model.

    ``majority_share`` is the largest class's share of the evaluated items (the accuracy of always
    guessing that class).
    """
    base, gap = shortcut.accuracy, shortcut.accuracy_gap
    head = f"The disease-blind baseline reaches {base.format(2)} vs the model's {model_accuracy.format(2)}"
    if base.value is None or model_accuracy.value is None or gap.value is None:
        return head + "."
    if gap.value <= 0.0:
        text = (
            f"{head}: image source alone (size, format, colour mode, overall appearance) matches or beats "
            "the model, so the model's accuracy is no evidence that it sees disease."
        )
    elif gap.value <= 0.05 or (gap.ci_low is not None and gap.ci_low <= 0.0):
        text = (
            f"{head}: most of the model's accuracy may come from image source (size, format, colour mode, "
            "overall appearance), not disease."
        )
    elif base.ci_low is not None and base.ci_low > majority_share:
        text = (
            f"{head}: the baseline is well above always guessing the largest class ({majority_share:.2f}), "
            "so part of the model's accuracy may come from image source rather than disease."
        )
    else:
        text = (
            f"{head}: the baseline is near always guessing the largest class ({majority_share:.2f}); "
            "image source alone does not explain the model's figure on these images."
        )
    if shortcut.fitted_on_evaluated_items:
        text += " (The baseline was fitted on the evaluated items themselves, so its figure is optimistic.)"
    return text
