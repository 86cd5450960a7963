"""Counter-measures against source shortcuts: border crop, histogram equalisation, strong augmentation,
the (source, class)-balanced sampler, and a trained bundle that keeps its pre-processing."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_factory import make_items, write_datalist
from monai.bundle import ConfigWorkflow

from cxr_monai.explain.gradcam import crop_of, to_original_grid
from cxr_monai.io import CXRImage
from cxr_monai.predictor import Predictor
from cxr_monai.training import fold_items, source_class_sampler
from cxr_monai.transforms import inference_transforms, inference_transforms_d, train_transforms_d

CONFIGS = Path(__file__).resolve().parent.parent / "bundles" / "cxr_classifier" / "configs"


def _film(rows: int = 120, cols: int = 100, frame: tuple[int, int, int, int] = (12, 8, 10, 6)) -> CXRImage:
    """A textured film inside a black frame of (top, bottom, left, right) pixels."""
    top, bottom, left, right = frame
    pixels = np.zeros((rows, cols), np.float32)
    inner = np.random.default_rng(0).random((rows - top - bottom, cols - left - right)) * 180 + 40
    pixels[top : rows - bottom, left : cols - right] = inner
    return CXRImage(pixels, "png", "L")


@pytest.mark.parametrize("equalise", [False, True])
@pytest.mark.parametrize("crop", [False, True])
def test_array_and_dictionary_chains_agree(equalise: bool, crop: bool) -> None:
    film = _film()
    array = inference_transforms(32, equalise, crop)(film)
    dictionary = inference_transforms_d(("image",), 32, equalise, crop)({"image": film})["image"]
    assert torch.equal(torch.as_tensor(array), torch.as_tensor(dictionary))


def test_border_crop_gives_what_the_frameless_film_gives() -> None:
    framed = _film()
    frameless = CXRImage(framed.pixels[12:-8, 10:-6], "png", "L")
    cropped = inference_transforms(32, crop_borders=True)(framed)
    assert crop_of(cropped) == (12, 8, 10, 6)
    expected = inference_transforms(32)(frameless)
    assert torch.allclose(torch.as_tensor(cropped), torch.as_tensor(expected), atol=1e-5)
    assert crop_of(inference_transforms(32)(framed)) == (0, 0, 0, 0)


def test_an_all_dark_image_is_kept_whole() -> None:
    dark = CXRImage(np.full((40, 30), 3.0, np.float32), "png", "L")
    assert crop_of(inference_transforms(16, crop_borders=True)(dark)) == (0, 0, 0, 0)


def test_histogram_equalisation_flattens_the_histogram() -> None:
    skewed = CXRImage((np.random.default_rng(1).random((64, 64)) ** 2 * 255).astype(np.float32), "png", "L")
    plain = inference_transforms_d(("image",), 64)({"image": skewed})["image"][0]
    flat = inference_transforms_d(("image",), 64, histogram_equalize=True)({"image": skewed})["image"][0]
    plain_hist = np.histogram(np.asarray(plain), bins=4)[0]
    flat_hist = np.histogram(np.asarray(flat), bins=4)[0]
    assert plain_hist.max() > 0.45 * plain.numel()  # half the pixels in the darkest quarter before
    assert flat_hist.max() < 0.35 * flat.numel()  # spread over the range after


def test_strong_augmentation_is_seeded_and_changes_the_image() -> None:
    film = {"image": _film()}
    first = train_transforms_d(("image",), 32, seed=3, strong_augmentation=True)(dict(film))["image"]
    again = train_transforms_d(("image",), 32, seed=3, strong_augmentation=True)(dict(film))["image"]
    v1_only = train_transforms_d(("image",), 32, seed=3)(dict(film))["image"]
    assert torch.equal(torch.as_tensor(first), torch.as_tensor(again))
    assert not torch.allclose(torch.as_tensor(first), torch.as_tensor(v1_only))


def test_the_map_goes_back_inside_the_cropped_frame() -> None:
    heat = np.ones((8, 8), np.float32)
    out = to_original_grid(heat, (50, 40), (5, 3, 4, 2))
    assert out.shape == (50, 40)
    assert out[5:47, 4:38].min() == pytest.approx(1.0)
    assert out[:5].max() == 0 and out[47:].max() == 0 and out[:, :4].max() == 0 and out[:, 38:].max() == 0


def _two_source_datalist(tmp_path: Path) -> Path:
    """A big (24 images) and a small (6) source holding every class, in two folds."""
    training = []
    for source, n in (("big", 24), ("small", 6)):
        for item in make_items(tmp_path / source, n, size_tells_class=False, prefix=source):
            training.append({**item, "source": source, "fold": len(training) % 2})
    test = make_items(tmp_path / "test", 3, size_tells_class=False, prefix="t")
    return write_datalist(tmp_path / "datalist.json", training, test)


def test_the_sampler_draws_every_source_and_class_cell_equally(tmp_path: Path) -> None:
    datalist = _two_source_datalist(tmp_path)
    items = fold_items(str(datalist), 0, "train")
    sampler = source_class_sampler(str(datalist), 0, (), seed=0)
    assert len(list(sampler)) == len(items)
    weights = sampler.weights.numpy()
    source_of = {entry["image"]: entry["source"] for entry in json.loads(datalist.read_text())["training"]}
    cells = [(source_of[item["image"]], item["label"]) for item in items]
    mass = Counter()
    for cell, weight in zip(cells, weights, strict=True):
        mass[cell] += weight
    assert len(mass) == 6  # 2 sources x 3 classes
    assert max(mass.values()) == pytest.approx(min(mass.values()))
    draws = Counter(cells[i] for i in torch.multinomial(sampler.weights, 30000, replacement=True).tolist())
    assert min(draws.values()) > 0.8 * max(draws.values())


@pytest.mark.usefixtures("one_torch_thread")
def test_a_bundle_trained_with_the_options_keeps_its_preprocessing(tmp_path: Path) -> None:
    datalist = _two_source_datalist(tmp_path)
    out = tmp_path / "run"
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        datalist=str(datalist),
        output_dir=str(out),
        spatial_size=32,
        batch_size=4,
        num_workers=0,
        verbose=False,
        max_epochs=1,
        histogram_equalize=True,
        crop_borders=True,
        strong_augmentation=True,
        source_balanced=True,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()
    inference = json.loads((out / "configs" / "inference.json").read_text())
    assert (inference["histogram_equalize"], inference["crop_borders"]) == (True, True)
    predictor = Predictor.from_bundle(out, device="cpu")
    assert predictor.preprocessing_options == {"histogram_equalize": True, "crop_borders": True}
    film = _film()
    assert torch.equal(
        torch.as_tensor(predictor.preprocess(film)),
        torch.as_tensor(inference_transforms(32, True, True)(film)),
    )
