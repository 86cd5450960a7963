"""The two CycleGAN domains from a datalist and their MONAI pre-processing.

Domain A = Normal, domain B = COVID-19, both from the datalist's ``training`` items only (never ``test``;
never earlier ``synthetic`` items). ``fold >= 0`` leaves that fold out, so a cross-validation run can
validate fold K on images the GAN has never seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose, EnsureChannelFirstd, RandFlipd, Resized, ScaleIntensityd
from monai.utils import convert_to_tensor

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data import items_for_fold
from cxr_monai.errors import DatasetError
from cxr_monai.transforms import LoadCXRd

NORMAL = CLASS_NAMES.index("Normal")
COVID = CLASS_NAMES.index("COVID-19")


def domain_items(
    datalist: dict[str, Any], fold: int = -1
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(Normal items, COVID-19 items) among the real training items outside ``fold`` (all when < 0).

    Each item keeps every datalist key. DatasetError when either domain is empty.
    """
    train, _ = items_for_fold(datalist, None if fold < 0 else int(fold))
    real = [item for item in train if not item.get("synthetic")]
    normal = [item for item in real if int(item["label"]) == NORMAL]
    covid = [item for item in real if int(item["label"]) == COVID]
    where = "training items" + (f" outside fold {fold}" if fold >= 0 else "")
    for name, items in (("Normal", normal), ("COVID-19", covid)):
        if not items:
            raise DatasetError(f"the datalist has no {name} {where}; CycleGAN needs both domains")
    return normal, covid


def gan_transforms(spatial_size: int, augment: bool = True, seed: int = 0) -> Compose:
    """Path -> float32 (1, S, S) in [-1, 1]: LoadCXRd, channel first, per-image min-max to [-1, 1],
    antialiased resize to S x S, then (``augment``) random horizontal and vertical flips, each p = 0.5
    (Zhu et al. flip too; the generator must not learn a side)."""
    steps: list[Any] = [
        LoadCXRd("image"),
        EnsureChannelFirstd("image", channel_dim="no_channel"),
        ScaleIntensityd("image", minv=-1.0, maxv=1.0),
        Resized(
            "image", spatial_size=(int(spatial_size), int(spatial_size)), mode="bilinear", anti_aliasing=True
        ),
    ]
    if augment:
        steps += [RandFlipd("image", prob=0.5, spatial_axis=1), RandFlipd("image", prob=0.5, spatial_axis=0)]
    chain = Compose(steps)
    chain.set_random_state(seed=seed)
    return chain


def domain_loader(
    items: list[dict[str, Any]],
    spatial_size: int,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    cache_rate: float = 1.0,
) -> DataLoader:
    """Shuffled MONAI DataLoader over ``items`` (only ``image`` and ``label`` are kept, so batches collate);
    the deterministic prefix (decode + resize) is cached."""
    data = [{"image": item["image"], "label": int(item["label"])} for item in items]
    dataset = CacheDataset(
        data, gan_transforms(spatial_size, seed=seed), cache_rate=cache_rate, num_workers=0, progress=False
    )
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=False,
        num_workers=num_workers,
        generator=generator,
    )


def endless(loader: DataLoader) -> Iterator[torch.Tensor]:
    """Plain-tensor image batches (B, 1, S, S) from ``loader``, epoch after epoch (domains differ in size)."""
    while True:
        for batch in loader:
            yield convert_to_tensor(batch["image"], track_meta=False)
