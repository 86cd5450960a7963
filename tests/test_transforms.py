"""The MONAI pre-processing chains: shapes, ranges, geometry, determinism, caching boundary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import RandFlipd, Randomizable
from PIL import Image

from cxr_monai.constants import IMAGENET_MEAN, IMAGENET_STD
from cxr_monai.transforms import (
    META_ORIGINAL_SHAPE,
    META_WARNINGS,
    LoadCXR,
    inference_transforms,
    inference_transforms_d,
    train_transforms_d,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    """(3, S, S) network input -> the [0, 1] image before ImageNet normalisation."""
    return torch.as_tensor(x) * STD + MEAN


@pytest.fixture
def corner_png(tmp_path: Path) -> Path:
    """Non-square 8-bit film (rows 60, cols 100): values 40..200, a bright block top-left."""
    arr = np.full((60, 100), 40, dtype=np.uint8)
    arr[:15, :25] = 200
    arr[30:, 50:] = 120
    path = tmp_path / "corner.png"
    Image.fromarray(arr).save(path)
    return path


def test_load_cxr_keeps_viewer_orientation_and_metadata(corner_png: Path) -> None:
    img = LoadCXR()(corner_png)
    assert tuple(img.shape) == (60, 100)
    assert img.dtype == torch.float32
    assert float(img[0, 0]) == 200.0 and float(img[-1, 0]) == 40.0
    assert tuple(img.meta[META_ORIGINAL_SHAPE]) == (60, 100)
    assert img.meta[META_WARNINGS] == ""


def test_inference_chain_shape_range_and_stretch(corner_png: Path) -> None:
    x = inference_transforms(spatial_size=32)(corner_png)
    assert tuple(x.shape) == (3, 32, 32)
    assert x.dtype == torch.float32
    unit = _unnormalise(x)
    # per-image min-max: darkest pixel -> 0, brightest -> 1, all three channels the same film
    assert float(unit.min()) == pytest.approx(0.0, abs=1e-4)
    assert float(unit.max()) == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(unit[0], unit[1], atol=1e-5) and torch.allclose(unit[0], unit[2], atol=1e-5)
    # stretched, not cropped: the top-left block (15/60 rows, 25/100 cols) stays top-left and keeps
    # its relative extent (about 8 x 8 of 32 x 32)
    bright = (unit[0] > 0.95).nonzero()
    assert int(bright[:, 0].max()) < 10 and int(bright[:, 1].max()) < 10
    assert int(bright[:, 0].min()) <= 1 and int(bright[:, 1].min()) <= 1


def test_dictionary_chain_equals_array_chain(corner_png: Path) -> None:
    x = inference_transforms(spatial_size=48)(corner_png)
    d = inference_transforms_d(keys=("image",), spatial_size=48)({"image": str(corner_png), "label": 2})
    assert d["label"] == 2
    assert torch.equal(torch.as_tensor(d["image"]), torch.as_tensor(x))


def test_bytes_and_path_give_identical_tensors(corner_png: Path) -> None:
    chain = inference_transforms(spatial_size=32)
    assert torch.equal(torch.as_tensor(chain(corner_png)), torch.as_tensor(chain(corner_png.read_bytes())))


def test_constant_image_gives_finite_values(tmp_path: Path) -> None:
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((20, 30), 77, dtype=np.uint8)).save(path)
    x = inference_transforms(spatial_size=16)(path)
    assert torch.isfinite(torch.as_tensor(x)).all()


def test_training_chain_is_deterministic_under_a_seed(corner_png: Path) -> None:
    item = {"image": str(corner_png), "label": 0}
    a = [train_transforms_d(spatial_size=32, seed=7)(item)["image"] for _ in range(2)]
    b = train_transforms_d(spatial_size=32, seed=8)(item)["image"]
    assert torch.equal(torch.as_tensor(a[0]), torch.as_tensor(a[1]))
    assert not torch.equal(torch.as_tensor(a[0]), torch.as_tensor(b))


def test_horizontal_flip_only_and_never_vertical_by_default(corner_png: Path) -> None:
    """With rotation and shift off, every augmented image is the original or its mirror image."""
    item = {"image": str(corner_png)}
    plain = torch.as_tensor(inference_transforms_d(spatial_size=32)(item)["image"])
    chain = train_transforms_d(spatial_size=32, rotate_degrees=0.0, shift_fraction=0.0, seed=0)
    seen = set()
    for _ in range(12):
        out = torch.as_tensor(chain(item)["image"])
        if torch.allclose(out, plain, atol=1e-4):
            seen.add("original")
        elif torch.allclose(out, plain.flip(-1), atol=1e-4):
            seen.add("mirrored")
        else:
            pytest.fail("augmentation without rotation/shift changed more than a horizontal flip")
    assert seen == {"original", "mirrored"}
    vflips = [t for t in chain.transforms if isinstance(t, RandFlipd) and t.flipper.spatial_axis == 0]
    assert vflips == []
    with_v = train_transforms_d(spatial_size=32, vertical_flip=True)
    assert any(isinstance(t, RandFlipd) and t.flipper.spatial_axis == 0 for t in with_v.transforms)


def test_rotation_and_shift_change_the_image_within_bounds(corner_png: Path) -> None:
    item = {"image": str(corner_png)}
    plain = _unnormalise(inference_transforms_d(spatial_size=32)(item)["image"])
    chain = train_transforms_d(spatial_size=32, horizontal_flip=False, seed=1)
    out = _unnormalise(chain(item)["image"])
    assert not torch.allclose(out, plain, atol=1e-3)
    # border padding and bilinear interpolation never leave the input's range
    assert float(out.min()) >= -1e-4 and float(out.max()) <= 1 + 1e-4


def test_cache_boundary_is_after_the_resize() -> None:
    """CacheDataset caches up to the first random transform: decoding and resizing happen once."""
    chain = train_transforms_d(spatial_size=32)
    first_random = next(i for i, t in enumerate(chain.transforms) if isinstance(t, Randomizable))
    names = [type(t).__name__ for t in chain.transforms[:first_random]]
    assert names == ["LoadCXRd", "EnsureChannelFirstd", "ScaleIntensityd", "Resized"]
