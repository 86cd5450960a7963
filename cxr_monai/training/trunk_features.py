"""Head-only training on cached trunk features (the bundle's ``cache_trunk_features: true``).

When the trunk stays frozen for the whole run (pretrained weights, ``freeze_epochs >= max_epochs``), the
logits depend on the image only through the trunk's globally average-pooled features, so the trunk runs
once per image, when the dataset's cache is filled, instead of once per image and epoch; the trainer and
the validator then run the paper's head alone. The head is a sub-module of the network, so ``model.pt``
(saved from the whole network) holds the trained head and the untouched trunk: inference, Grad-CAM and
export are unchanged.

The cost: no augmentation reaches the head (an augmented image would need a fresh trunk pass, the very
cost the cache removes), and the trunk runs in eval mode (no drop-connect), as it does at inference.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import Compose, MapTransform

from cxr_monai.errors import BundleError
from cxr_monai.networks import PRETRAINED_NONE, CXRClassifier


class TrunkFeaturesd(MapTransform):
    """(3, S, S) network input -> (F, 1, 1) float32 CPU tensor: ``network``'s trunk in eval mode, no grad,
    then the global average pool (the first step of the paper's head, so the head's own pooling of a 1 x 1
    map is the identity). F = 1280 for EfficientNet-B0/Lite, 2048 for ResNet50, 512 for VGG16.

    Runs on the network's device; safe to call from ``CacheDataset``'s worker threads.
    """

    def __init__(self, keys: KeysCollection, network: torch.nn.Module, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if not isinstance(network, CXRClassifier):
            raise BundleError(
                "cache_trunk_features needs the plain network (not a DistributedDataParallel wrapper: "
                "multi_gpu_train.json does not support it)"
            )
        self.network = network
        self._lock = threading.Lock()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        trunk = self.network.trunk
        device = next(trunk.parameters()).device
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key], dtype=torch.float32)
            if image.ndim != 3:
                shape = tuple(image.shape)
                raise BundleError(f"{key!r}: expected a (3, H, W) network input, got shape {shape}")
            with self._lock:  # the eval-mode switch is global to the module: one pass at a time
                trunk.eval()
                with torch.inference_mode():
                    features = trunk(image.unsqueeze(0).to(device)).mean(dim=(2, 3), keepdim=True)
            d[key] = features[0].to("cpu", torch.float32).clone()
        return d


def trunk_feature_chain(
    preprocessing: Compose, network: torch.nn.Module, keys: KeysCollection = ("image",)
) -> Compose:
    """``preprocessing`` (the inference chain: deterministic, so ``CacheDataset`` caches its result) then
    :class:`TrunkFeaturesd`."""
    return Compose([*preprocessing.transforms, TrunkFeaturesd(keys, network)])


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
