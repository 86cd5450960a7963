"""Predictor: loading a trained bundle, batched prediction, precise errors, and the same pre-processing
as the bundle's ``inference.json``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_factory import TinyCNN, make_items, make_trained_bundle

from cxr_monai.errors import BundleError
from cxr_monai.io import read_cxr
from cxr_monai.predictor import Predictor, read_bundle_config

REPO_BUNDLE_CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "cxr_classifier" / "configs"


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_trained_bundle(tmp_path / "bundle", spatial_size=32)


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    return [item["image"] for item in make_items(tmp_path / "images", 3)]  # one RGB, two grayscale


def test_loads_bundle_attributes(bundle: Path) -> None:
    predictor = Predictor.from_bundle(bundle, device="cpu")
    assert isinstance(predictor.model, TinyCNN)
    assert not predictor.model.training
    assert (predictor.backbone, predictor.spatial_size) == ("tiny_cnn", 32)
    assert (predictor.model_name, predictor.model_version) == ("Tiny test classifier", "0.0.1")
    assert predictor.class_names == ("COVID-19", "Normal", "Pneumonia")
    assert predictor.device == torch.device("cpu")
    saved = torch.load(bundle / "models" / "model.pt", weights_only=True)
    for name, tensor in predictor.model.state_dict().items():
        assert torch.equal(tensor, saved[name])


def test_default_device_is_cuda_only_when_available(bundle: Path) -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert Predictor.from_bundle(bundle).device.type == expected


def test_predict_equals_softmax_of_the_network_on_the_preprocessed_image(
    bundle: Path, images: list[str]
) -> None:
    predictor = Predictor.from_bundle(bundle, device="cpu")
    results = predictor.predict(images, batch_size=2)
    assert len(results) == 3
    for path, result in zip(images, results, strict=True):
        with torch.no_grad():
            logits = predictor.model(predictor.preprocess(path)[None])
        expected = torch.softmax(logits, dim=1)[0].numpy()
        np.testing.assert_allclose(result.probabilities, expected, rtol=1e-5, atol=1e-6)
        assert result.probabilities.shape == (3,)
        assert result.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
        assert result.predicted_index == int(np.argmax(expected))
        assert result.predicted_class == predictor.class_names[result.predicted_index]


def test_paths_bytes_and_decoded_images_and_batch_sizes_agree(bundle: Path, images: list[str]) -> None:
    predictor = Predictor.from_bundle(bundle, device="cpu")
    by_path = predictor.predict(images, batch_size=3)
    by_bytes = predictor.predict([Path(p).read_bytes() for p in images], batch_size=1)
    decoded = predictor.predict([read_cxr(p) for p in images], batch_size=2)
    for a, b, c in zip(by_path, by_bytes, decoded, strict=True):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
        np.testing.assert_allclose(a.probabilities, c.probabilities, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        predictor.predict(images, batch_size=0)
    assert predictor.predict([]) == []


def test_missing_model_file_names_the_path(bundle: Path) -> None:
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(BundleError, match=r"models/model\.pt: missing"):
        Predictor.from_bundle(bundle)


def test_missing_bundle_and_missing_config(tmp_path: Path, bundle: Path) -> None:
    with pytest.raises(BundleError, match="no such bundle directory"):
        Predictor.from_bundle(tmp_path / "nowhere")
    (bundle / "configs" / "inference.json").unlink()
    with pytest.raises(BundleError, match=r"configs/inference\.json: missing"):
        Predictor.from_bundle(bundle)


def test_weights_of_another_network_do_not_load(bundle: Path) -> None:
    torch.save(TinyCNN(width=8).state_dict(), bundle / "models" / "model.pt")
    with pytest.raises(BundleError, match=r"model\.pt: does not match the bundle's network_def"):
        Predictor.from_bundle(bundle)


def test_corrupt_weights_and_unbuildable_network(bundle: Path) -> None:
    (bundle / "models" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BundleError, match=r"model\.pt is not a readable PyTorch weights file"):
        Predictor.from_bundle(bundle)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["network_def"]["_target_"] = "bundle_factory.NoSuchNetwork"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="cannot build 'network_def'"):
        Predictor.from_bundle(bundle)


def _bundle_from_repo_configs(root: Path, spatial_size: int) -> Path:
    """A trained bundle with the repository's real configs (EfficientNet-B0, untrained weights)."""
    if not (REPO_BUNDLE_CONFIGS / "inference.json").is_file():
        pytest.skip("bundles/cxr_classifier/configs/inference.json not in this checkout")
    from cxr_monai.networks import build_network

    shutil.copytree(REPO_BUNDLE_CONFIGS, root / "configs")
    config = json.loads((root / "configs" / "inference.json").read_text())
    config["spatial_size"] = spatial_size
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    (root / "models").mkdir()
    torch.save(build_network(config["backbone"]).state_dict(), root / "models" / "model.pt")
    return root


@pytest.mark.parametrize("configs", ["repository bundle", "test bundle"])
def test_bundle_preprocessing_and_predictor_give_identical_tensors(
    tmp_path: Path, images: list[str], configs: str
) -> None:
    if configs == "repository bundle":
        bundle = _bundle_from_repo_configs(tmp_path / "real", spatial_size=64)
    else:
        bundle = make_trained_bundle(tmp_path / "tiny", spatial_size=64)
    predictor = Predictor.from_bundle(bundle, device="cpu")
    bundle_chain = read_bundle_config(bundle).get_parsed_content("preprocessing")
    for path in images:
        from_bundle = bundle_chain({"image": path})["image"]
        from_predictor = predictor.preprocess(path)
        assert from_predictor.shape == (3, 64, 64)
        assert torch.equal(torch.as_tensor(from_bundle), torch.as_tensor(from_predictor))
    result = predictor.predict(images[:1])[0]
    assert result.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
