"""Head-only training on cached trunk features (the bundle's ``cache_trunk_features: true``).

When the trunk stays frozen for the whole run (pretrained weights, ``freeze_epochs >= max_epochs``), the
logits depend on the image only through the trunk's globally average-pooled features, so the trunk runs
once per image, when the dataset's cache is filled, instead of once per image and epoch; the trainer and
the validator then run the paper's head alone. The head is a sub-module of the network, so ``model.pt``
(saved from the whole network) holds the trained head and the untouched trunk: inference, Grad-CAM and
export are unchanged.

With ``trunk_feature_cache_dir`` the features are also kept on disk (:class:`~cxr_monai.feature_store.
FeatureStore`), one file per film content, so the folds of a cross-validation, its final retraining and
``cxr-monai evaluate`` (test split, out of fold, source probe) compute each film's features once. MONAI's
``PersistentDataset`` is not used for this: it fills its cache lazily inside DataLoader worker processes,
where a CUDA trunk cannot run, and keys entries by the data item only, so another backbone, weights file
or pre-processing would silently reuse stale features. Here an entry is keyed by the film's bytes, under a
spec digest of the pre-processing options, the trunk's weights and cxr-monai's version
(:func:`trunk_spec`). The film decoded for its features also gives the disease-blind baseline's thumbnail,
stored beside them (:data:`~cxr_monai.evaluation.shortcut.SHORTCUT_SPEC`), so an evaluation after the run
decodes none of the training films again.

The cost: no augmentation reaches the head (an augmented image would need a fresh trunk pass, the very
cost the cache removes), and the trunk runs in eval mode (no drop-connect), as it does at inference.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import DataLoader, list_data_collate
from monai.transforms import Compose, MapTransform
from monai.utils import convert_to_tensor

from cxr_monai.errors import BundleError
from cxr_monai.evaluation.shortcut import SHORTCUT_SPEC, shortcut_features, to_record
from cxr_monai.feature_store import FeatureStore
from cxr_monai.io import read_cxr
from cxr_monai.networks import PRETRAINED_NONE, CXRClassifier
from cxr_monai.transforms import inference_transforms_d
from cxr_monai.versions import cxr_monai_version


class TrunkFeaturesd(MapTransform):
    """Image path -> (F, 1, 1) float32 CPU tensor: the inference pre-processing (``spatial_size``,
    ``histogram_equalize``, ``crop_borders``), ``network``'s trunk in eval mode without gradients, then the
    global average pool (the first step of the paper's head, so the head's own pooling of a 1 x 1 map is
    the identity). F = 1280 for EfficientNet-B0/Lite, 2048 for ResNet50, 512 for VGG16.

    Other keys of the item pass through unchanged. With ``cache_dir`` each image's features are read
    from, or written to, a :class:`~cxr_monai.feature_store.FeatureStore` there (spec :func:`trunk_spec`).
    Runs on the network's device; safe to call from ``CacheDataset``'s worker threads.
    """

    def __init__(
        self,
        keys: KeysCollection,
        network: torch.nn.Module,
        spatial_size: int,
        histogram_equalize: bool = False,
        crop_borders: bool = False,
        cache_dir: str | Path = "",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not isinstance(network, CXRClassifier):
            raise BundleError(
                "cache_trunk_features needs the plain network, not a DistributedDataParallel wrapper "
                "(multi_gpu_train.json wraps the head only when features are cached)"
            )
        self.network = network
        self.options: dict[str, Any] = {
            "spatial_size": int(spatial_size),
            "histogram_equalize": bool(histogram_equalize),
            "crop_borders": bool(crop_borders),
        }
        self.preprocessing = inference_transforms_d(keys, int(spatial_size), histogram_equalize, crop_borders)
        self.cache_dir = Path(cache_dir) if str(cache_dir) else None
        self._lock = threading.Lock()
        self._store: FeatureStore | None = None
        self._thumbnails = FeatureStore(self.cache_dir, SHORTCUT_SPEC) if self.cache_dir is not None else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            store = self._file_store(image)
            cached = store.get(image) if store is not None else None
            if cached is not None:
                d[key] = torch.from_numpy(np.array(cached, dtype=np.float32)).reshape(-1, 1, 1)
                continue
            if store is not None and store.key(image) is not None:  # decoded once: trunk input + thumbnail
                decoded = read_cxr(image)
                if self._thumbnails is not None and self._thumbnails.get(image) is None:
                    self._thumbnails.put(image, to_record(shortcut_features(decoded)))
                image = decoded
            tensor = convert_to_tensor(self.preprocessing({key: image})[key], track_meta=False)
            d[key] = self._features(tensor)
            if store is not None:
                store.put(data[key], d[key].reshape(-1).numpy())
        return d

    def _features(self, image: torch.Tensor) -> torch.Tensor:
        trunk = self.network.trunk
        with self._lock:  # the eval-mode switch is global to the module: one pass at a time
            trunk.eval()
            with torch.inference_mode():
                device = next(trunk.parameters()).device
                pooled = trunk(image.unsqueeze(0).to(device)).mean(dim=(2, 3), keepdim=True)
        return pooled[0].to("cpu", torch.float32).clone()

    def _file_store(self, image: Any) -> FeatureStore | None:
        """The store for this trunk; None without a cache, or for an input that is not a file path. Made
        on first use, after the bundle's ``initialize`` has loaded the weights (datasets are built when
        the trainer is)."""
        if self.cache_dir is None or not isinstance(image, (str, os.PathLike)):
            return None
        with self._lock:
            if self._store is None:
                self._store = FeatureStore(self.cache_dir, trunk_spec(self.network, self.options))
            return self._store


def trunk_spec(network: CXRClassifier, options: Mapping[str, Any]) -> str:
    """Digest of what a film's trunk features depend on besides the film: cxr-monai's version, the
    backbone, the pre-processing ``options`` (spatial_size, histogram_equalize, crop_borders) and the
    trunk's weights."""
    described = json.dumps([cxr_monai_version(), network.backbone_name, dict(options)], sort_keys=True)
    digest = hashlib.sha256(described.encode())
    for name, tensor in sorted(network.trunk.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return "trunk-" + digest.hexdigest()[:32]


def trunk_feature_chain(
    network: torch.nn.Module,
    spatial_size: int,
    histogram_equalize: bool = False,
    crop_borders: bool = False,
    cache_dir: str | Path = "",
    keys: KeysCollection = ("image",),
) -> Compose:
    """The cached run's dataset transform: one deterministic :class:`TrunkFeaturesd`, so ``CacheDataset``
    keeps its output in memory for every epoch."""
    return Compose([TrunkFeaturesd(keys, network, spatial_size, histogram_equalize, crop_borders, cache_dir)])


def training_loader(
    dataset: Any, cache_trunk_features: bool, num_workers: int, **options: Any
) -> torch.utils.data.DataLoader:
    """The trainer's or validator's loader: MONAI's ``DataLoader`` with ``num_workers`` worker processes,
    or, on cached features (in memory, nothing to decode), torch's in the main process with MONAI's
    collation. Workers there only cost time: starting them each epoch doubled the head's training time.
    Not MONAI's loader with ``num_workers=0``: it re-seeds the global generator to emulate worker seeds,
    which would change the run's random stream (shuffles, dropout) and so its models; torch's leaves the
    stream as the worker-process loader did, so a cached run trains the same head either way.
    ``options``: the other ``DataLoader`` arguments (batch_size, shuffle, sampler, drop_last)."""
    if cache_trunk_features:
        return torch.utils.data.DataLoader(dataset, num_workers=0, collate_fn=list_data_collate, **options)
    return DataLoader(dataset, num_workers=int(num_workers), **options)


def trainable_network(network: torch.nn.Module, cache_trunk_features: bool) -> torch.nn.Module:
    """What the trainer and validator run: the head alone on cached features, else the whole network."""
    if not cache_trunk_features:
        return network
    if not isinstance(network, CXRClassifier):
        raise BundleError(
            "cache_trunk_features needs the plain network, not a wrapper (multi_gpu_train.json wraps "
            "the head only when features are cached)"
        )
    return network.head


def check_trunk_feature_options(
    cache_trunk_features: bool,
    pretrained: str,
    freeze_epochs: int,
    max_epochs: int,
    source_adversarial_weight: float,
) -> None:
    """BundleError naming the conflicting option when cached trunk features cannot give the same training."""
    if not cache_trunk_features:
        return
    if str(pretrained) == PRETRAINED_NONE:
        raise BundleError(
            "cache_trunk_features needs pretrained weights (pretrained: imagenet or a weights file): "
            "a trunk from scratch is trained, not frozen"
        )
    if int(freeze_epochs) < int(max_epochs):
        raise BundleError(
            f"cache_trunk_features needs the trunk frozen for the whole run: freeze_epochs "
            f"({freeze_epochs}) must be at least max_epochs ({max_epochs})"
        )
    if float(source_adversarial_weight) > 0:
        raise BundleError(
            "cache_trunk_features cannot train a source-adversarial head: it acts on the trunk, which "
            "is frozen (set source_adversarial_weight: 0)"
        )
