"""The paper's three classifiers: a torchvision trunk with a small new head, plus freezing and weight loading.

``build_network(backbone)`` only builds the architecture (random weights, never a download), so
``ckpt_export`` and inference instantiate it offline; :func:`load_pretrained` is what a training run calls
when it initialises. Every classifier maps a batch (B, 3, H, W) of ImageNet-normalised images to logits
(B, num_classes); softmax belongs to post-processing, cross-entropy takes the logits.

Head (Zebin & Rezvy 2020): ``AdaptiveAvgPool2d(1) -> flatten -> Linear(C, 64) -> ReLU -> Dropout(0.5)
-> Linear(64, num_classes)``.
"""

from __future__ import annotations

import logging
import urllib.error
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from cxr_monai.constants import BACKBONES, NUM_CLASSES
from cxr_monai.errors import WeightsError

logger = logging.getLogger(__name__)

#: ``pretrained`` values besides a file path.
PRETRAINED_NONE = "none"
PRETRAINED_IMAGENET = "imagenet"

HEAD_HIDDEN_UNITS = 64
HEAD_DROPOUT = 0.5


@dataclass(frozen=True)
class _BackboneSpec:
    """How to cut a torchvision classifier into a trunk, and where its blocks and Grad-CAM layer are."""

    build: Callable[[], nn.Module]
    imagenet_weights: str  # torchvision weights enum member, e.g. "VGG16_Weights.IMAGENET1K_V1"
    trunk_children: tuple[str, ...]  # torchvision child modules kept as the trunk, in forward order
    num_features: int  # channels of the trunk's last feature map


_SPECS: dict[str, _BackboneSpec] = {
    "vgg16": _BackboneSpec(
        build=lambda: torchvision.models.vgg16(weights=None),
        imagenet_weights="VGG16_Weights.IMAGENET1K_V1",
        trunk_children=("features",),
        num_features=512,
    ),
    "resnet50": _BackboneSpec(
        build=lambda: torchvision.models.resnet50(weights=None),
        imagenet_weights="ResNet50_Weights.IMAGENET1K_V1",
        trunk_children=("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"),
        num_features=2048,
    ),
    "efficientnet_b0": _BackboneSpec(
        build=lambda: torchvision.models.efficientnet_b0(weights=None),
        imagenet_weights="EfficientNet_B0_Weights.IMAGENET1K_V1",
        trunk_children=("features",),
        num_features=1280,
    ),
}

#: VGG16's five conv blocks as index ranges of ``features`` (each ends with its max-pool).
_VGG16_BLOCKS: tuple[tuple[int, int], ...] = ((0, 5), (5, 10), (10, 17), (17, 24), (24, 31))
#: VGG16's last convolution (block5_conv3), before its ReLU: the layer Grad-CAM hooks.
_VGG16_LAST_CONV = 28


def _disable_inplace_activations(module: nn.Module) -> None:
    """Make every in-place activation out-of-place.

    An in-place ReLU right after a hooked layer (VGG16's ``features[28]``) overwrites the output the
    Grad-CAM hook captured and autograd refuses the backward pass; out-of-place activations cost a little
    memory and let hooks attach to any layer.
    """
    for child in module.modules():
        if hasattr(child, "inplace") and isinstance(child.inplace, bool):
            child.inplace = False


class CXRClassifier(nn.Module):
    """A torchvision trunk and the paper's head: (B, 3, H, W) ImageNet-normalised -> logits (B, classes).

    ``trunk`` keeps torchvision's module names (``features.*`` for VGG16/EfficientNet-B0, ``conv1``,
    ``layer1``... for ResNet50), so a torchvision state_dict loads into it key for key.
    A BatchNorm layer whose parameters are frozen stays in eval mode in :meth:`train` (its running
    statistics are part of what is frozen, as Keras does for fine-tuning).
    """

    # TorchScript compiles properties unless told not to; this one returns a Python object for hooks.
    __jit_unused_properties__ = ["gradcam_layer"]  # noqa: RUF012

    def __init__(self, backbone: str, trunk: nn.Module, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.backbone_name: str = backbone
        self.trunk = trunk
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Linear(num_features, HEAD_HIDDEN_UNITS),
            nn.ReLU(),
            nn.Dropout(HEAD_DROPOUT),
            nn.Linear(HEAD_HIDDEN_UNITS, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    @property
    def gradcam_layer(self) -> nn.Module:
        """The layer Grad-CAM hooks: its output is the last spatial feature map the decision uses.

        VGG16: ``features[28]`` (block5_conv3's convolution, 14x14 at 224 px), hooked before its ReLU as
        the project's spec asks; Keras' block5_conv3, which the paper hooked, includes the ReLU, so the
        paper's maps come from ``features[29]``'s output. ResNet50: ``layer4`` (2048 x 7 x 7).
        EfficientNet-B0: ``features[-1]`` (the 1x1 conv 320 -> 1280 + BN + SiLU, 7 x 7): the very map the
        head pools, so the heat map explains exactly the features the classifier weighs; ``features[7]``
        has the same 7 x 7 grid but only 320 channels before the final projection.
        """
        if self.backbone_name == "vgg16":
            return self._features()[_VGG16_LAST_CONV]
        if self.backbone_name == "resnet50":
            return self.trunk.get_submodule("layer4")
        return self._features()[-1]

    def trunk_blocks(self) -> list[nn.Module]:
        """The trunk's blocks from input to output (the unit :func:`unfreeze_top` counts).

        VGG16: its 5 conv blocks; ResNet50: stem (conv1 + bn1), layer1..layer4; EfficientNet-B0:
        ``features[0..8]`` (stem, 7 MBConv stages, final 1x1 conv).
        """
        if self.backbone_name == "vgg16":
            features = self._features()
            return [features[start:stop] for start, stop in _VGG16_BLOCKS]
        if self.backbone_name == "resnet50":
            stem = nn.ModuleList([self.trunk.get_submodule("conv1"), self.trunk.get_submodule("bn1")])
            return [stem, *(self.trunk.get_submodule(f"layer{i}") for i in range(1, 5))]
        return list(self._features().children())

    def _features(self) -> nn.Sequential:
        features = self.trunk.get_submodule("features")
        assert isinstance(features, nn.Sequential)
        return features

    def train(self, mode: bool = True) -> CXRClassifier:
        super().train(mode)
        if mode:
            for module in self.trunk.modules():
                is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
                if is_bn and not any(p.requires_grad for p in module.parameters()):
                    module.eval()
        return self


def build_network(backbone: str, num_classes: int = NUM_CLASSES) -> CXRClassifier:
    """Build a classifier with random weights (no download). ``backbone`` is one of :data:`BACKBONES`."""
    if backbone not in _SPECS:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")
    spec = _SPECS[backbone]
    full = spec.build()
    trunk = nn.Sequential(OrderedDict((name, getattr(full, name)) for name in spec.trunk_children))
    _disable_inplace_activations(trunk)
    return CXRClassifier(backbone, trunk, spec.num_features, num_classes)


def freeze_backbone(model: nn.Module) -> None:
    """Freeze the whole trunk (``requires_grad = False``); the head stays trainable."""
    for p in _unwrap(model).trunk.parameters():
        p.requires_grad_(False)


def unfreeze_top(model: nn.Module, n_blocks: int) -> None:
    """Freeze the trunk, then make its top ``n_blocks`` blocks (see ``trunk_blocks``) trainable again."""
    net = _unwrap(model)
    freeze_backbone(net)
    blocks = net.trunk_blocks()
    for block in blocks[len(blocks) - max(0, min(n_blocks, len(blocks))) :]:
        for p in block.parameters():
            p.requires_grad_(True)


def unfreeze_all(model: nn.Module) -> None:
    """Make every parameter trainable (from-scratch training)."""
    for p in _unwrap(model).parameters():
        p.requires_grad_(True)


def _unwrap(model: nn.Module) -> CXRClassifier:
    """The :class:`CXRClassifier` inside a (Distributed)DataParallel wrapper, or the model itself."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, CXRClassifier):
        raise TypeError(f"expected a CXRClassifier, got {type(inner).__name__}")
    return inner


def load_pretrained(model: nn.Module, pretrained: str | Path) -> None:
    """Load starting weights into ``model`` in place.

    ``pretrained``: ``"none"`` (keep the random init), ``"imagenet"`` (torchvision's ImageNet weights;
    downloaded once into the torch hub cache, so it needs internet the first time) or the path of a local
    ``.pth``/``.pt`` file holding either a torchvision state_dict of the same backbone (its classifier
    keys are ignored, every trunk key must match) or a full :class:`CXRClassifier` state_dict.
    Raises :class:`WeightsError` naming the remedies when the weights cannot be had or do not fit.
    """
    net = _unwrap(model)
    choice = str(pretrained)
    if choice == PRETRAINED_NONE:
        return
    if choice == PRETRAINED_IMAGENET:
        _load_trunk(net, _download_imagenet(net.backbone_name), source="torchvision ImageNet weights")
        return
    path = Path(choice)
    if not path.is_file():
        raise WeightsError(
            f"pretrained weights file {path} does not exist; pass 'none', 'imagenet' or the path of a "
            f"{net.backbone_name} .pth state_dict"
        )
    state = _read_state_dict(path)
    if any(key.startswith(("trunk.", "head.")) for key in state):
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{path} does not fit a {net.backbone_name} CXRClassifier: {exc}") from exc
        logger.info("Loaded a full %s classifier from %s", net.backbone_name, path)
        return
    _load_trunk(net, state, source=str(path))


def _download_imagenet(backbone: str) -> Mapping[str, torch.Tensor]:
    weights = torchvision.models.get_weight(_SPECS[backbone].imagenet_weights)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, urllib.error.URLError, RuntimeError) as exc:
        raise WeightsError(
            f"cannot fetch the ImageNet weights for {backbone} ({type(exc).__name__}: {exc}). Either run "
            "once on a machine with internet access (torchvision caches them under $TORCH_HOME/hub/"
            "checkpoints), or download the file elsewhere and set `pretrained: /path/to/weights.pth` "
            "(--pretrained /path/to/weights.pth) to load it from disk; `pretrained: none` trains from scratch"
        ) from exc


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (pickle, zip, RuntimeError) for a bad file
        raise WeightsError(f"{path} is not a PyTorch weights file: {exc}") from exc
    # A checkpoint that wraps the weights (this bundle's checkpoint_epoch=N.pt, common training scripts).
    for wrapper in ("network", "model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors)")
    return obj


def _load_trunk(net: CXRClassifier, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a torchvision state_dict into the trunk: trunk keys must all match, the rest is dropped."""
    kept = set(_SPECS[net.backbone_name].trunk_children)
    trunk_state = {k: v for k, v in state.items() if k.split(".", 1)[0] in kept}
    expected = net.trunk.state_dict().keys()
    missing = sorted(set(expected) - set(trunk_state))
    if missing:
        raise WeightsError(
            f"{source} is not a {net.backbone_name} state_dict: {len(missing)} of {len(expected)} trunk "
            f"keys are missing (e.g. {', '.join(missing[:3])}); its first keys are "
            f"{', '.join(list(state)[:3]) or 'none'}"
        )
    try:
        net.trunk.load_state_dict(trunk_state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{source} does not fit the {net.backbone_name} trunk: {exc}") from exc
    logger.info("Loaded %s trunk weights from %s", net.backbone_name, source)
