"""The disease-blind baseline learns a size/format shortcut when one exists and nothing when none does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_factory import blob_image, make_items

from cxr_monai.evaluation.metrics import Estimate, classification_metrics
from cxr_monai.evaluation.shortcut import (
    THUMBNAIL_SIDE,
    ShortcutBaseline,
    ShortcutFeatures,
    encode_features,
    score_shortcut,
    shortcut_features,
    verdict,
)
from cxr_monai.io import CXRImage, read_cxr


def _features(items: list[dict]) -> tuple[list[ShortcutFeatures], np.ndarray]:
    return [shortcut_features(read_cxr(i["image"])) for i in items], np.array([i["label"] for i in items])


def _baseline_accuracy(tmp_path: Path, size_tells_class: bool) -> float:
    train = make_items(tmp_path / "train", 30, size_tells_class=size_tells_class, seed=1, prefix="tr")
    test = make_items(tmp_path / "test", 60, size_tells_class=size_tells_class, seed=2, prefix="te")
    x_train, y_train = _features(train)
    x_test, y_test = _features(test)
    predicted = ShortcutBaseline().fit(x_train, y_train).predict(x_test)
    return float((predicted == y_test).mean())


def test_learns_the_shortcut_when_image_size_tells_the_class(tmp_path: Path) -> None:
    assert _baseline_accuracy(tmp_path, size_tells_class=True) >= 0.95


def test_near_chance_when_size_and_format_are_uninformative(tmp_path: Path) -> None:
    assert _baseline_accuracy(tmp_path, size_tells_class=False) < 0.55  # chance is 1/3


def test_features_keep_original_size_and_colour_mode() -> None:
    rng = np.random.default_rng(0)
    image = CXRImage(
        pixels=blob_image(90, 130, rng).astype(np.float32), source_format="png", color_mode="RGB"
    )
    f = shortcut_features(image)
    assert (f.width, f.height, f.color_mode) == (130, 90, "RGB")
    assert f.thumbnail.shape == (THUMBNAIL_SIDE, THUMBNAIL_SIDE)
    # min-max scaled to [0, 1], then each thumbnail pixel the mean of its (fractional) block of the image
    scaled = (image.pixels - image.pixels.min()) / (image.pixels.max() - image.pixels.min())
    expected = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(scaled)[None], THUMBNAIL_SIDE)[0]
    np.testing.assert_allclose(f.thumbnail, expected.numpy(), atol=1e-6)


def test_unknown_colour_mode_at_scoring_time_is_ignored_not_an_error() -> None:
    rng = np.random.default_rng(0)

    def feat(mode: str, rows: int) -> ShortcutFeatures:
        return shortcut_features(
            CXRImage(
                pixels=blob_image(rows, 64, rng).astype(np.float32), source_format="png", color_mode=mode
            )
        )

    model = ShortcutBaseline().fit([feat("L", 64), feat("RGB", 96)] * 3, [0, 1] * 3)
    assert model.predict([feat("MONOCHROME1", 64)]).shape == (1,)


def test_probabilities_agree_with_predictions_and_absent_classes_get_zero(tmp_path: Path) -> None:
    items = [i for i in make_items(tmp_path / "train", 30, seed=1) if i["label"] != 1]  # no Normal
    x, y = _features(items)
    model = ShortcutBaseline().fit(x, y)
    proba = model.predict_proba(x)
    assert proba.shape == (len(items), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert np.all(proba[:, 1] == 0.0)
    np.testing.assert_array_equal(proba.argmax(axis=1), model.predict(x))


def test_encoded_features_one_hot_the_modes_present(tmp_path: Path) -> None:
    x, _ = _features(make_items(tmp_path / "items", 6, seed=1))  # RGB and L images
    encoded = encode_features(x)
    assert encoded.shape == (6, 2 + 2 + THUMBNAIL_SIDE**2) and encoded.dtype == np.float64
    np.testing.assert_array_equal(encoded[:, :2].sum(axis=1), 1.0)
    assert encoded[0, 2:4].tolist() == [x[0].width, x[0].height]


def test_needs_two_classes() -> None:
    f = shortcut_features(CXRImage(pixels=np.eye(8, dtype=np.float32), source_format="png", color_mode="L"))
    with pytest.raises(ValueError, match="two classes"):
        ShortcutBaseline().fit([f, f], [1, 1])


def test_score_is_paired_with_the_model_metrics() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, 60)
    model_pred = np.where(rng.uniform(size=60) < 0.8, y_true, (y_true + 1) % 3)
    groups = [f"p{i // 2}" for i in range(60)]
    result = score_shortcut(
        model_pred, y_true, model_pred, n_training_items=10, n_boot=100, seed=5, groups=groups
    )
    # the same predictions as the model: no gap on any resample
    assert result.accuracy_gap == Estimate(0.0, 0.0, 0.0)
    # same resamples as classification_metrics with the same seed and groups: identical interval
    model = classification_metrics(y_true, np.eye(3)[model_pred], n_boot=100, seed=5, groups=groups)
    assert result.accuracy == model.accuracy
    for name in ("COVID-19", "Normal", "Pneumonia"):
        assert result.recall[name].value == pytest.approx(model.per_class[name]["recall"].value)


def test_verdict_in_plain_words() -> None:
    y_true = np.repeat([0, 1, 2], 20)
    close = score_shortcut(y_true.copy(), y_true, y_true, n_training_items=5, n_boot=50)
    model_acc = Estimate(1.0, 1.0, 1.0)
    text = verdict(model_acc, close, majority_share=1 / 3)
    assert text.startswith(
        "The disease-blind baseline reaches 1.00 [1.00, 1.00] vs the model's 1.00 [1.00, 1.00]"
    )
    assert "image source" in text and "matches or beats the model" in text

    blind = score_shortcut(np.zeros(60, dtype=int), y_true, y_true, n_training_items=5, n_boot=50)
    text = verdict(model_acc, blind, majority_share=1 / 3)
    assert "0.33" in text and "near always guessing the largest class" in text

    somewhat = np.where(np.arange(60) % 4 == 0, (y_true + 1) % 3, y_true)  # 0.75 correct
    text = verdict(model_acc, score_shortcut(somewhat, y_true, y_true, n_training_items=5, n_boot=50), 1 / 3)
    assert "well above always guessing" in text and "part of the model's accuracy" in text
