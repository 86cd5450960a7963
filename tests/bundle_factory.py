"""Test helper: small trained bundles and synthetic chest-X-ray-like images, made in seconds.

A trained bundle here follows the project's convention (``configs/inference.json`` whose
``network_def`` builds the network, ``configs/metadata.json``, ``models/model.pt`` as a plain
state_dict, ``logs/training_log.json``) with a tiny CNN instead of a torchvision backbone, so unit tests
of everything downstream of training (predictor, evaluate, explain, server) stay fast.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from cxr_monai.constants import CLASS_NAMES, NUM_CLASSES, RESEARCH_USE_NOTICE
from cxr_monai.data.datalist import datalist_document
from cxr_monai.site.calibration import LogitCalibration
from cxr_monai.site.profile import SiteProfile, model_digest, write_profile

#: (rows, columns, Pillow mode) per class for data where the class can be told from image size alone.
SIZE_BY_CLASS: tuple[tuple[int, int, str], ...] = ((96, 96, "RGB"), (128, 112, "L"), (80, 128, "L"))


class TinyCNN(nn.Module):
    """(B, 3, H, W) -> logits (B, num_classes): one strided conv, global average pool, linear head."""

    backbone_name = "tiny_cnn"

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.features[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def inference_config(spatial_size: int, network_target: str = "bundle_factory.TinyCNN") -> dict[str, Any]:
    """An ``inference.json`` shaped like the real bundle's, building ``network_target``."""
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "backbone": "tiny_cnn",
        "spatial_size": spatial_size,
        "network_def": {"_target_": network_target, "num_classes": NUM_CLASSES},
        "preprocessing": {
            "_target_": "cxr_monai.transforms.inference_transforms_d",
            "keys": ["image"],
            "spatial_size": "@spatial_size",
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}],
        },
    }


def make_trained_bundle(
    root: Path,
    *,
    spatial_size: int = 32,
    seed: int = 0,
    training_log: bool = True,
    network: nn.Module | None = None,
) -> Path:
    """Write a trained bundle directory at ``root`` (seeded random TinyCNN weights) and return it."""
    torch.manual_seed(seed)
    model = network if network is not None else TinyCNN()
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    (root / "configs" / "inference.json").write_text(json.dumps(inference_config(spatial_size), indent=2))
    metadata = {
        "name": "Tiny test classifier",
        "version": "0.0.1",
        "intended_use": RESEARCH_USE_NOTICE,
        "network_data_format": {"outputs": {"pred": {"channel_def": dict(enumerate(CLASS_NAMES))}}},
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    torch.save(model.state_dict(), root / "models" / "model.pt")
    if training_log:
        log = [  # the keys cxr_monai.training.TrainingLog writes
            {
                "epoch": e,
                "learning_rate": 1e-3,
                "train_loss": 1.1 - 0.2 * e,
                "train_accuracy": 0.4 + 0.1 * e,
                "train_seconds": 2.0,
                "val_loss": 1.2 - 0.2 * e,
                "val_accuracy": 0.3 + 0.1 * e,
                "val_seconds": 0.5,
            }
            for e in range(1, 4)
        ]
        (root / "logs" / "training_log.json").write_text(json.dumps(log))
    return root


def blob_image(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth X-ray-like uint8 image (rows, cols): one bright Gaussian blob of random place, width and
    brightness over a random background, plus mild noise. Content carries no class information."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    yy, xx = yy / rows, xx / cols
    cy, cx = rng.uniform(0.3, 0.7, 2)
    sigma = rng.uniform(0.15, 0.35)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2)) * rng.uniform(100, 200)
    image = blob + rng.uniform(0, 50) + rng.normal(0, 5, (rows, cols))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_image(path: Path, rows: int, cols: int, mode: str, rng: np.random.Generator) -> Path:
    """Write a :func:`blob_image` as PNG in Pillow ``mode`` (``"L"`` or ``"RGB"``)."""
    Image.fromarray(blob_image(rows, cols, rng), mode="L").convert(mode).save(path)
    return path


def make_items(
    folder: Path,
    n: int,
    *,
    size_tells_class: bool = True,
    seed: int = 0,
    prefix: str = "img",
    patients_per_item: int = 1,
    fold: int | None = None,
) -> list[dict[str, Any]]:
    """Write ``n`` images (classes in turn) under ``folder``; return datalist items.

    With ``size_tells_class`` each class has its own size and colour mode (:data:`SIZE_BY_CLASS`);
    otherwise all images are 100 x 100 grayscale. Every ``patients_per_item`` consecutive items of a
    class share a patient id.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        label = i % NUM_CLASSES
        rows, cols, mode = SIZE_BY_CLASS[label] if size_tells_class else (100, 100, "L")
        path = write_image(folder / f"{prefix}_{i:03d}.png", rows, cols, mode, rng)
        item: dict[str, Any] = {
            "image": str(path),
            "label": label,
            "label_name": CLASS_NAMES[label],
            "patient_id": f"test:{prefix}-{i // (NUM_CLASSES * patients_per_item)}-{label}",
            "source": "synthetic",
        }
        if fold is not None:
            item["fold"] = fold
        items.append(item)
    return items


def write_datalist(path: Path, training: Sequence[dict[str, Any]], test: Sequence[dict[str, Any]]) -> Path:
    """Write a ``cxr-monai prepare``-style datalist (training items carry their ``fold``)."""
    document = datalist_document(
        training, test, folds=1 + max((i["fold"] for i in training), default=0), seed=0, test_fraction=0.0
    )
    path.write_text(json.dumps(document, indent=2))
    return path


def write_site_profile(
    folder: Path, bundle: Path, site: str, class_index: int, digest: str | None = None
) -> Path:
    """A site profile of ``site`` for ``bundle``'s weights (or for ``digest``) with a bias of 40 nats on
    ``class_index``: more than any gap between log-probabilities, so calibrated outputs call that class."""
    bias = np.zeros(NUM_CLASSES)
    bias[class_index] = 40.0
    weights = digest or model_digest(bundle / "models" / "model.pt")
    model = {"name": "Tiny test classifier", "version": "0.0.1", "digest": weights}
    report = {"created": "2026-12-02T10:00:00", "films": {"total": 10}}
    return write_profile(
        folder, SiteProfile(site, model, LogitCalibration("bias", np.ones(NUM_CLASSES), bias), report)
    )
