"""MONAI pre-processing and augmentation for chest X-rays.

The chain builders here are the single source of truth: the bundle configs, the CLI and the gRPC server
all call them, so a file gives the same tensor everywhere.

Inference chain (paper's pre-processing, then what ImageNet backbones expect)::

    path/bytes -> LoadCXR (rows, cols) -> channel first (1, H, W) -> per-image min-max to [0, 255]
    -> resize (stretch, antialiased: :class:`AntialiasedResize`) to S x S -> 3 channels -> [0, 1]
    -> ImageNet mean/std

Training adds augmentation v1 (random rotation, width/height shift, horizontal flip) after the resize,
so ``CacheDataset`` caches the deterministic prefix (decode + resize) once. Against source shortcuts,
three options (off by default): ``crop_borders`` (before the resize), ``histogram_equalize`` (after it;
both also at inference) and ``strong_augmentation`` (training only).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForeground,
    CropForegroundd,
    EnsureChannelFirst,
    EnsureChannelFirstd,
    HistogramNormalize,
    HistogramNormalized,
    MapTransform,
    NormalizeIntensity,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandHistogramShiftd,
    RandZoomd,
    RepeatChannel,
    RepeatChanneld,
    ScaleIntensity,
    ScaleIntensityd,
    ScaleIntensityRange,
    ScaleIntensityRanged,
    Transform,
)
from monai.transforms.utils import scale_affine
from monai.utils import convert_to_tensor, ensure_tuple

from cxr_monai.constants import DEFAULT_SPATIAL_SIZE, IMAGENET_MEAN, IMAGENET_STD
from cxr_monai.errors import BundleError, InvalidImageError
from cxr_monai.io import CXRImage, ImageSource, read_cxr

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)

#: Meta-dict keys LoadCXR adds (besides MONAI's own ``filename_or_obj`` and ``spatial_shape``).
META_ORIGINAL_SHAPE = "cxr_original_shape"
META_SOURCE_FORMAT = "cxr_source_format"
META_COLOR_MODE = "cxr_color_mode"
META_WARNINGS = "cxr_warnings"


class LoadCXR(Transform):
    """Read a chest X-ray as a viewer shows it.

    Input: a path, the file's bytes, or an already decoded :class:`~cxr_monai.io.CXRImage`.
    Output: float32 ``MetaTensor`` of shape (rows, columns) with no channel dimension
    (``original_channel_dim = "no_channel"``), values as read (bright = dense). The meta dict holds
    the original shape, format and colour mode and the reader's warnings joined by ``"; "`` (a
    string, so batches collate). No patient data goes into the meta dict.
    """

    def __call__(self, source: ImageSource | CXRImage) -> MetaTensor:
        image = source if isinstance(source, CXRImage) else read_cxr(source)
        name = "<bytes>" if isinstance(source, (bytes, CXRImage)) else str(source)
        meta: dict[str, Any] = {
            "filename_or_obj": name,
            "original_channel_dim": "no_channel",
            "spatial_shape": np.asarray(image.shape),
            META_ORIGINAL_SHAPE: np.asarray(image.shape),
            META_SOURCE_FORMAT: image.source_format,
            META_COLOR_MODE: image.color_mode,
            META_WARNINGS: "; ".join(image.warnings),
        }
        pixels = torch.from_numpy(np.ascontiguousarray(image.pixels, dtype=np.float32))
        return MetaTensor(pixels, affine=torch.eye(3, dtype=torch.float64), meta=meta)


class LoadCXRd(MapTransform):
    """Dictionary twin of :class:`LoadCXR`: replaces each key's path/bytes with the loaded image."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadCXR()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


_SIZE_FORMS = "expected a positive int or a list of two equal ints"


def square_side(spatial_size: Any) -> int:
    """The side in pixels of the square network input, from ``224``, ``"224"`` or ``[224, 224]``.

    Bundles commonly take ``spatial_size`` as a list; this model's input is square, so a 2-sequence must
    hold two equal sides. Raises BundleError with one line saying which form is expected.
    """
    value = spatial_size
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise BundleError(f"spatial_size {list(value)!r}: {_SIZE_FORMS} (the input is square)")
        value = value[0]
    try:
        side = int(value)
    except (TypeError, ValueError):
        side = 0
    if isinstance(value, bool) or side < 1 or str(side) != str(value).strip():
        raise BundleError(
            f"spatial_size {spatial_size!r}: expected a positive int or a list of two equal ints"
        )
    return side


def _size(spatial_size: Any) -> tuple[int, int]:
    side = square_side(spatial_size)
    return (side, side)


class AntialiasedResize(Transform):
    """Stretch a channel-first image (C, H, W) to ``spatial_size`` with an antialiased bilinear filter.

    ``torch.nn.functional.interpolate(mode="bilinear", antialias=True)``: when an axis shrinks by a
    factor f the bilinear (triangle) kernel is widened f times, so every input pixel contributes (as
    Pillow's ``BILINEAR`` resize does); an axis that grows is plain bilinear (pixel centres,
    ``align_corners=False``), as MONAI ``Resize`` does. It replaces MONAI ``Resize(anti_aliasing=True)``
    (a Gaussian blur with sigma (f - 1) / 2, then bilinear), which took 130 ms at 1024 x 1024 and 2 s at
    3000 x 3000 on one thread, against about 2 and 10 ms here. The outputs agree to a fraction of a
    grey level inside the image; MONAI's blur pads with zeros, so its outermost row and column were
    darkened (a constant 200 became 179 there), which this one does not do.

    Output: float32, (C, *spatial_size); a ``MetaTensor`` input keeps its meta dict and applied
    operations (the crop record Grad-CAM reads), with the affine scaled like MONAI ``Resize``'s.
    """

    def __init__(self, spatial_size: Any) -> None:
        self.spatial_size = _size(spatial_size)

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        pixels = convert_to_tensor(img, dtype=torch.float32, track_meta=False)
        if pixels.ndim != 3:
            raise InvalidImageError(f"AntialiasedResize expects (C, H, W), got shape {tuple(pixels.shape)}")
        resized = F.interpolate(
            pixels.unsqueeze(0), size=self.spatial_size, mode="bilinear", align_corners=False, antialias=True
        ).squeeze(0)
        if not isinstance(img, MetaTensor):
            return resized
        out = MetaTensor(resized, meta=dict(img.meta), applied_operations=list(img.applied_operations))
        scale = scale_affine(tuple(pixels.shape[1:]), self.spatial_size)
        affine = torch.as_tensor(img.affine, dtype=torch.float64)
        out.affine = affine @ torch.as_tensor(scale, dtype=torch.float64)
        out.meta["spatial_shape"] = np.asarray(self.spatial_size)
        return out


class AntialiasedResized(MapTransform):
    """Dictionary twin of :class:`AntialiasedResize`."""

    def __init__(self, keys: KeysCollection, spatial_size: Any, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.resizer = AntialiasedResize(spatial_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resizer(d[key])
        return d


class AboveBorderLevel:
    """``select_fn`` for MONAI's ``CropForeground``: pixels brighter than ``level`` (of 0..255) are the
    film; the black frame a scan or a screenshot adds around it is not. An image with no such pixel is
    kept whole. (A class, not a lambda, so DataLoader workers can pickle it.)"""

    def __init__(self, level: float = 8.0) -> None:
        self.level = float(level)

    def __call__(self, image: Any) -> Any:
        inside = image > self.level
        return inside if bool(inside.any()) else image >= image.min()


def _crop_and_equalise(crop_borders: bool, histogram_equalize: bool) -> tuple[list[Any], list[Any]]:
    """(array steps before the resize, array steps after it) of the optional shortcut counter-measures.
    The crop is followed by a second min-max stretch, so a framed film gives what the frame-less one does."""
    crop = CropForeground(select_fn=AboveBorderLevel(), margin=0, allow_smaller=True)
    before = [crop, ScaleIntensity(minv=0.0, maxv=255.0)] if crop_borders else []
    after = [HistogramNormalize(num_bins=256, min=0, max=255)] if histogram_equalize else []
    return before, after


def inference_transforms(
    spatial_size: int = DEFAULT_SPATIAL_SIZE, histogram_equalize: bool = False, crop_borders: bool = False
) -> Compose:
    """Array chain: path/bytes/CXRImage -> float32 tensor (3, S, S), ImageNet-normalised.

    ``crop_borders``: crop the dark frame around the film (pixels <= 8 of 255) before resizing;
    ``histogram_equalize``: equalise the resized image's histogram over 0..255 (MONAI
    ``HistogramNormalize``). Both are off by default and recorded in a trained bundle's inference.json.
    """
    before, after = _crop_and_equalise(crop_borders, histogram_equalize)
    return Compose(
        [
            LoadCXR(),
            EnsureChannelFirst(channel_dim="no_channel"),
            ScaleIntensity(minv=0.0, maxv=255.0),
            *before,
            AntialiasedResize(spatial_size),
            *after,
            RepeatChannel(repeats=3),
            ScaleIntensityRange(a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0),
            NormalizeIntensity(subtrahend=_MEAN, divisor=_STD, channel_wise=True),
        ]
    )


def _load_and_resize_d(
    keys: KeysCollection, spatial_size: int, histogram_equalize: bool = False, crop_borders: bool = False
) -> list[Any]:
    """Deterministic prefix: decode, channel first, min-max to [0, 255], [crop], resize to (1, S, S),
    [equalise]."""
    crop = CropForegroundd(keys, _first(keys), select_fn=AboveBorderLevel(), margin=0, allow_smaller=True)
    before = [crop, ScaleIntensityd(keys, minv=0.0, maxv=255.0)] if crop_borders else []
    after = [HistogramNormalized(keys, num_bins=256, min=0, max=255)] if histogram_equalize else []
    return [
        LoadCXRd(keys),
        EnsureChannelFirstd(keys, channel_dim="no_channel"),
        ScaleIntensityd(keys, minv=0.0, maxv=255.0),
        *before,
        AntialiasedResized(keys, spatial_size),
        *after,
    ]


def _first(keys: KeysCollection) -> str:
    return str(ensure_tuple(keys)[0])


def _to_network_input_d(keys: KeysCollection) -> list[Any]:
    """(1, S, S) in [0, 255] -> (3, S, S) ImageNet-normalised."""
    return [
        RepeatChanneld(keys, repeats=3),
        ScaleIntensityRanged(keys, a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0),
        NormalizeIntensityd(keys, subtrahend=_MEAN, divisor=_STD, channel_wise=True),
    ]


def inference_transforms_d(
    keys: KeysCollection = ("image",),
    spatial_size: int = DEFAULT_SPATIAL_SIZE,
    histogram_equalize: bool = False,
    crop_borders: bool = False,
) -> Compose:
    """Dictionary twin of :func:`inference_transforms` (the bundle's ``preprocessing``)."""
    prefix = _load_and_resize_d(keys, spatial_size, histogram_equalize, crop_borders)
    return Compose([*prefix, *_to_network_input_d(keys)])


def augmentation_v1_d(
    keys: KeysCollection = ("image",),
    spatial_size: int = DEFAULT_SPATIAL_SIZE,
    rotate_degrees: float = 10.0,
    shift_fraction: float = 0.1,
    horizontal_flip: bool = True,
    vertical_flip: bool = False,
) -> list[Any]:
    """The paper's augmentation v1 on (1, S, S) images: rotation within +-``rotate_degrees``,
    width/height shift within +-``shift_fraction`` of the side (one interpolation, border padding,
    like Keras' default ``fill_mode="nearest"``), horizontal flip with p = 0.5; vertical flip off by
    default (an upside-down chest is not a plausible input)."""
    shift = float(shift_fraction) * square_side(spatial_size)
    steps: list[Any] = [
        RandAffined(
            keys,
            prob=1.0,
            rotate_range=(math.radians(rotate_degrees),),
            translate_range=(shift, shift),
            padding_mode="border",
            mode="bilinear",
        )
    ]
    if horizontal_flip:
        steps.append(RandFlipd(keys, prob=0.5, spatial_axis=1))
    if vertical_flip:
        steps.append(RandFlipd(keys, prob=0.5, spatial_axis=0))
    return steps


def strong_augmentation_d(keys: KeysCollection = ("image",)) -> list[Any]:
    """Intensity and scale augmentation on (1, S, S) images in [0, 255], against source shortcuts (a
    source's exposure, contrast, noise and framing): histogram shift (p 0.5), gamma 0.7-1.5 (p 0.5),
    zoom 0.9-1.15 (p 0.5), Gaussian noise sd 5 of 255 (p 0.3)."""
    return [
        RandHistogramShiftd(keys, num_control_points=(5, 15), prob=0.5),
        RandAdjustContrastd(keys, prob=0.5, gamma=(0.7, 1.5)),
        RandZoomd(keys, prob=0.5, min_zoom=0.9, max_zoom=1.15, keep_size=True, mode="bilinear"),
        RandGaussianNoised(keys, prob=0.3, mean=0.0, std=5.0),
    ]


def train_transforms_d(
    keys: KeysCollection = ("image",),
    spatial_size: int = DEFAULT_SPATIAL_SIZE,
    rotate_degrees: float = 10.0,
    shift_fraction: float = 0.1,
    horizontal_flip: bool = True,
    vertical_flip: bool = False,
    seed: int | None = 0,
    histogram_equalize: bool = False,
    crop_borders: bool = False,
    strong_augmentation: bool = False,
) -> Compose:
    """Training chain: inference pre-processing (with the same ``histogram_equalize`` / ``crop_borders``)
    and augmentation v1 after the resize, then :func:`strong_augmentation_d` when asked.

    Deterministic for a given ``seed`` (``None`` leaves MONAI's global random state in charge).
    """
    chain = Compose(
        [
            *_load_and_resize_d(keys, spatial_size, histogram_equalize, crop_borders),
            *augmentation_v1_d(
                keys, spatial_size, rotate_degrees, shift_fraction, horizontal_flip, vertical_flip
            ),
            *(strong_augmentation_d(keys) if strong_augmentation else []),
            *_to_network_input_d(keys),
        ]
    )
    if seed is not None:
        chain.set_random_state(seed=seed)
    return chain
