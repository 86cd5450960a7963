"""``cxr-monai train --augmentation v2`` on tiny PNGs the test writes: one CycleGAN per fold trained without
that fold, synthetic items only in their fold's training, never in validation or test, and the GAN cache
reused by a second backbone. 32 px, 1 epoch, 2 GAN iterations, one thread."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxr_monai.cli import app
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data import load_datalist
from cxr_monai.training import fold_items
from cxr_monai.training.augmentation_v2 import GAN_TRAINING_ITEMS, GanSettings, cache_entry, datalist_hash

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COVID = CLASS_NAMES.index("COVID-19")


def write_tiny_datalist(root: Path, n_folds: int = 3, per_class: int = 2, test_per_class: int = 1) -> Path:
    """``per_class`` images of each class in each of ``n_folds`` folds (brightness tells the class) and
    ``test_per_class`` test images per class; training images are one patient each, test patients have
    two images of one class."""
    rng = np.random.default_rng(0)
    training: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    n = 0
    for fold in [*range(n_folds), -1]:
        for label in range(3):
            for m in range(per_class if fold >= 0 else test_per_class):
                path = root / f"img_{n:03d}.png"
                Image.fromarray((rng.random((40, 36)) * 60 + 60 * label).astype(np.uint8)).save(path)
                item = {"image": path.name, "label": label, "source": f"s{label}"}
                if fold >= 0:
                    training.append({**item, "patient_id": f"p{n}", "fold": fold})
                else:
                    test.append({**item, "patient_id": f"t{label}-{m // 2}"})
                n += 1
    path = root / "datalist.json"
    document = {"class_names": list(CLASS_NAMES), "num_folds": n_folds, "training": training, "test": test}
    path.write_text(json.dumps(document))
    return path


def train_args(datalist: Path, out: Path, backbone: str, cache: Path) -> list[str]:
    return [
        "train", "--datalist", str(datalist), "--out", str(out), "--backbone", backbone, "--folds", "0,1",
        "--max-epochs", "1", "--spatial-size", "32", "--batch-size", "4", "--num-workers", "0",
        "--threads", "1", "--device", "cpu", "--augmentation", "v2", "--n-synthetic", "3",
        "--gan-iterations", "2", "--gan-size", "32", "--gan-channels", "4", "--gan-cache", str(cache),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("v2")
    datalist = write_tiny_datalist(root)
    cache = root / "gan_cache"
    for name, backbone in (("first", "efficientnet_b0"), ("second", "resnet50")):
        result = CliRunner().invoke(app, train_args(datalist, root / name, backbone, cache))
        assert result.exit_code == 0, result.output
    return {"root": root, "datalist": datalist, "first": root / "first", "second": root / "second"}


def test_each_fold_gan_never_trains_on_its_fold(two_runs: dict[str, Path]) -> None:
    summary = json.loads((two_runs["first"] / "cv_summary.json").read_text())
    record = summary["augmentation"]
    assert record["kind"] == "v2" and [f["fold"] for f in record["folds"]] == [0, 1]
    folds_of = {item["image"]: item["fold"] for item in load_datalist(two_runs["datalist"])["training"]}
    for entry in record["folds"]:
        listing = json.loads((Path(entry["gan_dir"]) / "logs" / GAN_TRAINING_ITEMS).read_text())
        trained_on = listing["normal"] + listing["covid"]
        assert listing["fold_left_out"] == entry["fold"]
        assert len(trained_on) == 8  # 2 Normal + 2 COVID-19 in each of the two other folds
        assert {folds_of[image] for image in trained_on} == {0, 1, 2} - {entry["fold"]}
        assert entry["gan_cache_hit"] is False and entry["n_synthetic"] == 3


def test_synthetic_items_train_their_fold_only(two_runs: dict[str, Path]) -> None:
    summary = json.loads((two_runs["first"] / "cv_summary.json").read_text())
    augmented = summary["augmentation"]["augmented_datalist"]
    assert summary["datalist"] == augmented
    content = load_datalist(augmented)
    synthetic = [item for item in content["training"] if item.get("synthetic")]
    assert len(synthetic) == 6 and all(item["label"] == COVID for item in synthetic)
    assert content["test"] == load_datalist(two_runs["datalist"])["test"]
    synthetic_images = {item["image"] for item in synthetic}
    for fold in (0, 1):
        own = {item["image"] for item in synthetic if item["gan_fold"] == fold}
        assert all(item["fold"] != fold for item in synthetic if item["gan_fold"] == fold)
        train = {item["image"] for item in fold_items(augmented, fold, "train")}
        assert train & synthetic_images == own
        assert not {item["image"] for item in fold_items(augmented, fold, "validate")} & synthetic_images
    assert not {item["image"] for item in fold_items(augmented, -1, "test")} & synthetic_images
    trained = json.loads((two_runs["first"] / "fold_0" / "configs" / "train.json").read_text())
    assert trained["datalist"] == augmented


def test_second_backbone_reuses_the_cached_gans(two_runs: dict[str, Path]) -> None:
    first = json.loads((two_runs["first"] / "cv_summary.json").read_text())["augmentation"]
    second = json.loads((two_runs["second"] / "cv_summary.json").read_text())["augmentation"]
    assert [f["gan_cache_hit"] for f in second["folds"]] == [True, True]
    assert [f["gan_dir"] for f in second["folds"]] == [f["gan_dir"] for f in first["folds"]]
    assert [f["quality"] for f in second["folds"]] == [f["quality"] for f in first["folds"]]
    assert (
        json.loads((two_runs["second"] / "cv_summary.json").read_text())["parameters"]["backbone"]
        == "resnet50"
    )


def test_cache_key_follows_data_fold_and_gan_parameters(two_runs: dict[str, Path], tmp_path: Path) -> None:
    data = datalist_hash(two_runs["datalist"])
    base = cache_entry(tmp_path, data, 0, GanSettings(iterations=2))
    assert base == cache_entry(tmp_path, data, 0, GanSettings(iterations=2))
    assert base != cache_entry(tmp_path, data, 1, GanSettings(iterations=2))
    assert base != cache_entry(tmp_path, data, 0, GanSettings(iterations=3))
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "datalist.json").write_text(two_runs["datalist"].read_text())  # same text, other images
    assert datalist_hash(moved / "datalist.json") != data


def test_unknown_augmentation_is_a_one_line_error(two_runs: dict[str, Path]) -> None:
    args = train_args(
        two_runs["datalist"], two_runs["root"] / "bad", "efficientnet_b0", two_runs["root"] / "c"
    )
    args[args.index("v2")] = "v3"
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "--augmentation 'v3'" in result.output
