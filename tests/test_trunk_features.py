"""Head-only training on cached trunk features (``cache_trunk_features: true`` in the bundle).

On 12 small PNGs the test writes: the cached features equal the eval-mode trunk's pooled output even
while the network is in training mode; the disk cache is reused for the same trunk weights and
pre-processing only; a cached run leaves the ImageNet trunk bit for bit as loaded,
trains the head, and its recorded validation accuracy is what the saved whole network scores through the
ordinary inference chain; ``cxr-monai train --cache-trunk-features`` computes each image's features once
for all folds and the final retraining; options that a cached run cannot honour stop it at
initialisation, and the CLI says so in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from bundle_factory import make_items, write_datalist
from monai.bundle import ConfigWorkflow
from monai.data import Dataset
from typer.testing import CliRunner

from cxr_monai.cli import app
from cxr_monai.errors import BundleError, InvalidImageError
from cxr_monai.networks import build_network, load_pretrained
from cxr_monai.training import TrunkFeaturesd, trunk_feature_chain
from cxr_monai.transforms import inference_transforms_d

CONFIGS = Path(__file__).resolve().parent.parent / "bundles" / "cxr_classifier" / "configs"
SIZE = 64
CACHED = {
    "spatial_size": SIZE,
    "batch_size": 4,
    "num_workers": 0,
    "verbose": False,
    "backbone": "efficientnet_lite0",
    "pretrained": "imagenet",
    "cache_trunk_features": True,
    "max_epochs": 3,
    "freeze_epochs": 3,
    "learning_rate": 1e-2,
}

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_network")


@pytest.fixture(scope="module")
def datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 images (each class its own size and colour mode): folds 0 and 1 of 4 items, 4 test items; the
    folds' images differ in content (the feature cache is keyed by content)."""
    root = tmp_path_factory.mktemp("trunk_features")
    training = make_items(root / "f0", 4, prefix="a", fold=0) + make_items(
        root / "f1", 4, prefix="b", fold=1, seed=1
    )
    return write_datalist(root / "datalist.json", training, make_items(root / "test", 4, prefix="t"))


def _workflow(datalist: Path, out: Path, **overrides: Any) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        **{**CACHED, "datalist": str(datalist), "output_dir": str(out), **overrides},
    )


def test_cached_features_are_the_eval_mode_trunk_pooled(datalist: Path) -> None:
    net = build_network("efficientnet_lite0")
    load_pretrained(net, "imagenet")
    net.train()  # drop-connect active: the cache must not see it
    items = json.loads(datalist.read_text())["training"][:3]
    preprocessing = inference_transforms_d(("image",), SIZE)
    cached = [d["image"] for d in Dataset(items, trunk_feature_chain(net, SIZE))]
    net.eval()
    with torch.no_grad():
        for item, features in zip(items, cached, strict=True):
            image = preprocessing({"image": item["image"]})["image"].as_tensor()
            expected = net.trunk(image.unsqueeze(0)).mean(dim=(2, 3), keepdim=True)[0]
            assert features.shape == (1280, 1, 1)
            torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
            logits = net.head(features.unsqueeze(0))
            torch.testing.assert_close(logits, net(image.unsqueeze(0)), rtol=1e-5, atol=1e-5)


def test_the_disk_cache_is_reused_only_for_the_same_trunk_and_pre_processing(
    datalist: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = build_network("efficientnet_lite0")
    load_pretrained(net, "imagenet")
    items = json.loads(datalist.read_text())["training"][:3]
    first = [d["image"] for d in Dataset(items, trunk_feature_chain(net, SIZE, cache_dir=tmp_path))]
    assert len(list(tmp_path.glob("trunk-*/*/*.npy"))) == 3
    assert not list(tmp_path.rglob(".*"))  # no temporary file left behind

    def no_trunk(*args: Any) -> None:
        raise AssertionError("the trunk ran although every image was cached")

    with monkeypatch.context() as patched:
        patched.setattr(net.trunk, "forward", no_trunk)
        again = [d["image"] for d in Dataset(items, trunk_feature_chain(net, SIZE, cache_dir=tmp_path))]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    labels = [d["label"] for d in Dataset(items, trunk_feature_chain(net, SIZE, cache_dir=tmp_path))]
    assert labels == [i["label"] for i in items]  # the item's other keys pass through a cache hit

    Dataset(items, trunk_feature_chain(net, SIZE, histogram_equalize=True, cache_dir=tmp_path))[0]
    with torch.no_grad():
        net.trunk.features[0].conv.weight.mul_(2.0)
    changed = Dataset(items, trunk_feature_chain(net, SIZE, cache_dir=tmp_path))[0]["image"]
    assert len(list(tmp_path.glob("trunk-*/*/*.npy"))) == 5  # new entries for new options and new weights
    assert not torch.equal(changed, first[0])


def test_a_cached_run_trains_the_head_and_keeps_the_imagenet_trunk(datalist: Path, tmp_path: Path) -> None:
    imagenet = build_network("efficientnet_lite0")
    load_pretrained(imagenet, "imagenet")
    out = tmp_path / "run"
    wf = _workflow(datalist, out)
    wf.initialize()
    assert wf.check_properties() == []
    wf.run()
    wf.finalize()

    state = torch.load(out / "models" / "model.pt", weights_only=True)
    start = imagenet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in start.items() if k.startswith("trunk."))
    assert not all(torch.equal(state[k], v) for k, v in start.items() if k.startswith("head."))
    log = json.loads((out / "logs" / "training_log.json").read_text())
    assert [e["epoch"] for e in log] == [1, 2, 3]
    assert json.loads((out / "configs" / "train.json").read_text())["cache_trunk_features"] is True

    # The best epoch's validation accuracy, recomputed from the saved whole network on the images.
    trained = build_network("efficientnet_lite0")
    trained.load_state_dict(state)
    trained.eval()
    validation = [i for i in json.loads(datalist.read_text())["training"] if i["fold"] == 0]
    preprocessing = inference_transforms_d(("image",), SIZE)
    with torch.no_grad():
        called = [
            int(trained(preprocessing({"image": i["image"]})["image"].as_tensor().unsqueeze(0)).argmax())
            for i in validation
        ]
    accuracy = sum(c == i["label"] for c, i in zip(called, validation, strict=True)) / len(validation)
    assert accuracy == pytest.approx(max(e["val_accuracy"] for e in log))


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"pretrained": "none"}, "pretrained"),
        ({"freeze_epochs": 2}, "freeze_epochs (2) must be at least max_epochs (3)"),
        ({"source_adversarial_weight": 0.5}, "source_adversarial_weight"),
    ],
)
def test_options_a_cached_run_cannot_honour_stop_it_at_initialisation(
    datalist: Path, tmp_path: Path, overrides: dict[str, Any], named: str
) -> None:
    wf = _workflow(datalist, tmp_path / "run", **overrides)
    with pytest.raises(RuntimeError) as info:  # MONAI wraps the expression's error
        wf.initialize()
    assert isinstance(info.value.__cause__, BundleError)
    assert named in str(info.value.__cause__)
    assert not (tmp_path / "run").exists()  # stopped before the output folder was made


def test_trunk_features_refuse_a_wrapped_network() -> None:
    with pytest.raises(BundleError, match="multi_gpu_train"):
        TrunkFeaturesd("image", torch.nn.DataParallel(build_network("efficientnet_lite0")), SIZE)


def test_cxr_monai_train_shares_one_feature_file_per_image_across_folds(
    datalist: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cv"
    common = ["--datalist", str(datalist), "--out", str(out), "--backbone", "efficientnet_lite0"]
    options = ["--pretrained", "imagenet", "--cache-trunk-features", "--spatial-size", str(SIZE)]
    epochs = ["--max-epochs", "2", "--freeze-epochs", "2", "--batch-size", "4", "--num-workers", "0"]
    result = CliRunner().invoke(app, ["train", *common, *options, *epochs, "--final", "retrain"])
    assert result.exit_code == 0, result.output
    training = json.loads(datalist.read_text())["training"]
    assert len(list((out / "trunk_features").glob("trunk-*/*/*.npy"))) == len(
        training
    )  # 2 folds + final: once each
    # the baseline's thumbnail of each film, from the same decode
    assert len(list((out / "trunk_features").glob("shortcut-*/*/*.npy"))) == len(training)
    summary = json.loads((out / "cv_summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 1] and summary["final"]["mode"] == "retrain"
    build_network("efficientnet_lite0").load_state_dict(
        torch.load(out / "final" / "models" / "model.pt", weights_only=True)
    )

    # Another run on the same images and trunk reuses the folder instead of filling its own.
    shared = ["--trunk-feature-cache", str(out / "trunk_features"), "--folds", "0"]
    other = [
        "--datalist",
        str(datalist),
        "--out",
        str(tmp_path / "other"),
        "--backbone",
        "efficientnet_lite0",
    ]
    result = CliRunner().invoke(app, ["train", *other, *options, *epochs, *shared, "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "trunk_features").glob("trunk-*/*/*.npy"))) == len(training)
    assert not (tmp_path / "other" / "trunk_features").exists()


def test_cxr_monai_train_reports_a_conflicting_option_in_one_line(datalist: Path, tmp_path: Path) -> None:
    common = ["--datalist", str(datalist), "--out", str(tmp_path / "cv"), "--folds", "0"]
    options = ["--backbone", "efficientnet_lite0", "--pretrained", "imagenet", "--cache-trunk-features"]
    result = CliRunner().invoke(
        app, ["train", *common, *options, "--max-epochs", "3", "--freeze-epochs", "1"]
    )
    assert result.exit_code == 1
    assert "error: cache_trunk_features needs the trunk frozen" in result.output
    assert "freeze_epochs (1) must be at least max_epochs (3)" in result.output
    assert "Traceback" not in result.output


def test_a_missing_image_is_named_by_the_reader_not_the_cache(tmp_path: Path) -> None:
    transform = TrunkFeaturesd("image", build_network("efficientnet_lite0"), SIZE, cache_dir=tmp_path)
    with pytest.raises(RuntimeError) as info:  # MONAI wraps a transform's error
        transform({"image": str(tmp_path / "gone.png")})
    assert isinstance(info.value.__cause__, InvalidImageError)
    assert "gone.png" in str(info.value.__cause__)
    assert not list(tmp_path.iterdir())
