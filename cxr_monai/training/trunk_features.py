"""Head-only training on cached trunk features (the bundle's ``cache_trunk_features: true``).

When the trunk stays frozen for the whole run (pretrained weights, ``freeze_epochs >= max_epochs``), the
logits depend on the image only through the trunk's globally average-pooled features, so the trunk runs
once per image, when the dataset's cache is filled, instead of once per image and epoch; the trainer and
the validator then run the paper's head alone. The head is a sub-module of the network, so ``model.pt``
(saved from the whole network) holds the trained head and the untouched trunk: inference, Grad-CAM and
export are unchanged.

With ``trunk_feature_cache_dir`` the features are also kept on disk, one file per image, so the folds of
a cross-validation (and its final retraining) compute each image's features once. MONAI's
``PersistentDataset`` is not used for this: it fills its cache lazily inside DataLoader worker processes,
where a CUDA trunk cannot run, and keys entries by the data item only, so another backbone, weights file
or pre-processing would silently reuse stale features. Here an entry's key holds the image file (path,
size, modification time), the pre-processing options, the trunk's weights and cxr-monai's version.

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

import torch
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform
from monai.utils import convert_to_tensor

from cxr_monai.atomic import atomic_path
from cxr_monai.errors import BundleError
from cxr_monai.networks import PRETRAINED_NONE, CXRClassifier
from cxr_monai.transforms import inference_transforms_d
from cxr_monai.versions import cxr_monai_version


class TrunkFeaturesd(MapTransform):
    """Image path -> (F, 1, 1) float32 CPU tensor: the inference pre-processing (``spatial_size``,
    ``histogram_equalize``, ``crop_borders``), ``network``'s trunk in eval mode without gradients, then the
    global average pool (the first step of the paper's head, so the head's own pooling of a 1 x 1 map is
    the identity). F = 1280 for EfficientNet-B0/Lite, 2048 for ResNet50, 512 for VGG16.

    Other keys of the item pass through unchanged. With ``cache_dir`` each image's features are read
    from, or written (atomically) to, ``cache_dir/<key>.pt``. Runs on the network's device; safe to call
    from ``CacheDataset``'s worker threads.
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
                "cache_trunk_features needs the plain network (not a DistributedDataParallel wrapper: "
                "multi_gpu_train.json does not support it)"
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
        self._spec: str | None = None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            entry = self._entry(d[key])
            if entry is not None and entry.is_file():
                d[key] = torch.load(entry, weights_only=True)
                continue
            image = convert_to_tensor(self.preprocessing({key: d[key]})[key], track_meta=False)
            d[key] = self._features(image)
            if entry is not None:
                with atomic_path(entry) as tmp:
                    torch.save(d[key], tmp)
        return d

    def _features(self, image: torch.Tensor) -> torch.Tensor:
        trunk = self.network.trunk
        with self._lock:  # the eval-mode switch is global to the module: one pass at a time
            trunk.eval()
            with torch.inference_mode():
                device = next(trunk.parameters()).device
                pooled = trunk(image.unsqueeze(0).to(device)).mean(dim=(2, 3), keepdim=True)
        return pooled[0].to("cpu", torch.float32).clone()

    def _entry(self, image: Any) -> Path | None:
        """The cache file of an image path; None without a cache, or for an input that is not the path of
        an existing file."""
        if self.cache_dir is None or not isinstance(image, (str, os.PathLike)):
            return None
        path = Path(image).resolve()
        try:
            stat = path.stat()
        except OSError:  # the reader names the problem when it tries the file
            return None
        item = json.dumps([self._weights_spec(), str(path), stat.st_size, stat.st_mtime_ns])
        return self.cache_dir / f"{hashlib.sha256(item.encode()).hexdigest()}.pt"

    def _weights_spec(self) -> str:
        """Digest of what the features depend on besides the image, computed once (after the bundle's
        ``initialize`` has loaded the weights: datasets are built when the trainer is)."""
        with self._lock:
            if self._spec is None:
                digest = hashlib.sha256(
                    json.dumps([cxr_monai_version(), self.network.backbone_name, self.options]).encode()
                )
                for name, tensor in sorted(self.network.trunk.state_dict().items()):
                    digest.update(name.encode())
                    digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
                self._spec = digest.hexdigest()
            return self._spec


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


def trainable_network(network: torch.nn.Module, cache_trunk_features: bool) -> torch.nn.Module:
    """What the trainer and validator run: the head alone on cached features, else the whole network."""
    if not cache_trunk_features:
        return network
    if not isinstance(network, CXRClassifier):
        raise BundleError("cache_trunk_features does not support multi_gpu_train.json (a wrapped network)")
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
