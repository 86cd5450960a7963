"""What an evaluation reuses instead of decoding a film again: its trunk features and its baseline
features, from the content-keyed :class:`~cxr_monai.feature_store.FeatureStore` that ``cxr-monai train
--cache-trunk-features`` fills (the trunk's) and that evaluations fill (the baseline's).

A film whose pooled trunk features are stored is scored by the network's head alone: for
:class:`~cxr_monai.networks.CXRClassifier` the head's first step is the global average pool, so the head
on the pooled (F, 1, 1) features gives the whole network's logits. The store's spec holds the trunk's
weights and pre-processing (:func:`~cxr_monai.training.trunk_features.trunk_spec`), so a fine-tuned trunk
never reads a frozen one's features.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxr_monai.evaluation.shortcut import SHORTCUT_SPEC, ShortcutFeatures, from_record, to_record
from cxr_monai.feature_store import FeatureStore
from cxr_monai.networks import CXRClassifier
from cxr_monai.predictor import Predictor
from cxr_monai.training.layout import read_run_parameters
from cxr_monai.training.trunk_features import trunk_spec


@dataclass(frozen=True)
class StoredFeatures:
    """The stores one evaluation reads and fills; either may be None (nothing stored of that kind)."""

    trunk: FeatureStore | None = None
    baseline: FeatureStore | None = None

    @classmethod
    def open(
        cls, root: str | os.PathLike[str] | None, predictor: Predictor, shortcut: bool
    ) -> StoredFeatures:
        """The stores under ``root`` for ``predictor``'s trunk (a :class:`CXRClassifier` only) and, with
        ``shortcut``, for the baseline; none without ``root``."""
        if root is None:
            return cls()
        trunk = None
        if isinstance(predictor.model, CXRClassifier):
            options = {"spatial_size": predictor.spatial_size, **predictor.preprocessing_options}
            trunk = FeatureStore(root, trunk_spec(predictor.model, options))
        return cls(trunk, FeatureStore(root, SHORTCUT_SPEC) if shortcut else None)

    def pooled(self, path: str) -> np.ndarray | None:
        """The film's pooled trunk features (F,) float32, or None."""
        stored = self.trunk.get(path) if self.trunk is not None else None
        return None if stored is None else np.array(stored, dtype=np.float32).reshape(-1)

    def keep_pooled(self, path: str, pooled: np.ndarray) -> None:
        if self.trunk is not None:
            self.trunk.put(path, np.asarray(pooled, dtype=np.float32).reshape(-1))

    def shortcut(self, path: str) -> ShortcutFeatures | None:
        """The film's baseline features, or None."""
        stored = self.baseline.get(path) if self.baseline is not None else None
        return None if stored is None else from_record(stored)

    def keep_shortcut(self, path: str, features: ShortcutFeatures) -> None:
        if self.baseline is not None:
            self.baseline.put(path, to_record(features))


@torch.inference_mode()
def head_probabilities(predictor: Predictor, pooled: np.ndarray) -> np.ndarray:
    """Probabilities (N, K) float32 of films from their pooled trunk features (N, F): the head alone."""
    model = predictor.model
    if not isinstance(model, CXRClassifier):
        raise TypeError("stored trunk features are scored by a CXRClassifier's head")
    head = model.head
    features = torch.from_numpy(np.ascontiguousarray(pooled, dtype=np.float32)).to(predictor.device)
    logits = head(features[:, :, None, None])
    return torch.softmax(logits.float(), dim=1).cpu().numpy()


def training_feature_cache(bundle_dir: str | Path) -> Path | None:
    """The folder a trained bundle's run cached its trunk features in (``trunk_feature_cache_dir`` of
    its ``train.json``), when it exists; else None."""
    parameters = read_run_parameters(bundle_dir)
    folder = parameters.get("trunk_feature_cache_dir") if parameters.get("cache_trunk_features") else None
    return Path(folder) if folder and Path(folder).is_dir() else None
