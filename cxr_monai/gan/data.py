"""The two CycleGAN domains from a datalist and their MONAI pre-processing.

Domain A = Normal, domain B = COVID-19, both from the datalist's ``training`` items only (never ``test``;
never earlier ``synthetic`` items). ``fold >= 0`` leaves that fold out, so a cross-validation run can
validate fold K on images the GAN has never seen. Relative image paths resolve against the datalist's
folder, as ``monai.data.load_decathlon_datalist`` resolves them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose, EnsureChannelFirstd, RandFlipd, Resized, ScaleIntensityd
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data import items_for_fold, load_datalist
from cxr_monai.errors import BundleError, DatasetError
from cxr_monai.transforms import LoadCXRd, square_side

NORMAL = CLASS_NAMES.index("Normal")
COVID = CLASS_NAMES.index("COVID-19")


def domain_items(
    datalist: str | Path | dict[str, Any], fold: int = -1
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(Normal items, COVID-19 items) among the real training items outside ``fold`` (all when < 0).

    ``datalist`` is a datalist file (read with :func:`cxr_monai.data.load_datalist`, relative image paths
    resolved against its folder) or its content.
    Each item keeps every datalist key. DatasetError when either domain is empty.
    """
    content = datalist if isinstance(datalist, dict) else load_datalist(datalist)
    train, _ = items_for_fold(content, None if fold < 0 else int(fold))
    real = [item for item in train if not item.get("synthetic")]
    normal = [item for item in real if int(item["label"]) == NORMAL]
    covid = [item for item in real if int(item["label"]) == COVID]
    where = "training items" + (f" outside fold {fold}" if fold >= 0 else "")
    for name, items in (("Normal", normal), ("COVID-19", covid)):
        if not items:
            raise DatasetError(f"the datalist has no {name} {where}; CycleGAN needs both domains")
    return normal, covid


def gan_side(spatial_size: Any) -> int:
    """The square side S from ``128``, ``"128"`` or ``[128, 128]``; BundleError unless S is a multiple of 4
    (two stride-2 down-samplings and back) and at least 32 (the PatchGAN's smallest input)."""
    side = square_side(spatial_size)
    if side < 32 or side % 4:
        raise BundleError(f"spatial_size {spatial_size!r}: expected a multiple of 4, at least 32")
    return side


def gan_transforms(spatial_size: Any, augment: bool = True, seed: int = 0) -> Compose:
    """Path -> float32 (1, S, S) in [-1, 1] (S = :func:`gan_side`): LoadCXRd, channel first, per-image
    min-max to [-1, 1], antialiased resize to S x S, then (``augment``) random horizontal and vertical
    flips, each p = 0.5 (Zhu et al. flip too; the generator must not learn a side)."""
    side = gan_side(spatial_size)
    steps: list[Any] = [
        LoadCXRd("image"),
        EnsureChannelFirstd("image", channel_dim="no_channel"),
        ScaleIntensityd("image", minv=-1.0, maxv=1.0),
        Resized("image", spatial_size=(side, side), mode="bilinear", anti_aliasing=True),
    ]
    if augment:
        steps += [RandFlipd("image", prob=0.5, spatial_axis=1), RandFlipd("image", prob=0.5, spatial_axis=0)]
    chain = Compose(steps)
    chain.set_random_state(seed=seed)
    return chain


class UnpairedDataset(Dataset):
    """Unpaired samples of two domain datasets (CycleGAN's "unaligned" data): sample ``i`` is
    ``{"image_a": domain_a[i % len_a]["image"], "image_b": domain_b[i % len_b]["image"]}`` as plain
    (1, S, S) tensors; length = the larger domain, so one shuffled epoch shows every image of it once and
    repeats the smaller one. Which A meets which B is immaterial: no loss term compares the two."""

    def __init__(self, domain_a: Any, domain_b: Any) -> None:
        self.domain_a, self.domain_b = domain_a, domain_b

    def __len__(self) -> int:
        return max(len(self.domain_a), len(self.domain_b))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        a = self.domain_a[index % len(self.domain_a)]["image"]
        b = self.domain_b[index % len(self.domain_b)]["image"]
        return {
            "image_a": convert_to_tensor(a, track_meta=False),
            "image_b": convert_to_tensor(b, track_meta=False),
        }
