"""Export to ONNX (with its int8 variant) and TorchScript: files, metadata, agreement with eager, errors."""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from bundle_factory import make_items, make_trained_bundle
from typer.testing import CliRunner

from cxr_monai import export as export_module
from cxr_monai.cli import app
from cxr_monai.errors import BundleError, CXRMonaiError
from cxr_monai.export import (
    DEFAULT_OPSET,
    METADATA_KEY,
    OnnxModel,
    eager_logits,
    export_bundle,
    require_onnx,
    verification_batch,
)
from cxr_monai.networks import build_network
from cxr_monai.predictor import Predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def backbone_bundle(root: Path, backbone: str, spatial_size: int = 64) -> Path:
    """A trained bundle whose network_def builds ``backbone`` (seeded random weights)."""
    torch.manual_seed(0)
    bundle = make_trained_bundle(root, spatial_size=spatial_size, network=build_network(backbone))
    config_file = bundle / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    config["backbone"] = backbone
    config["network_def"] = {"_target_": "cxr_monai.networks.build_network", "backbone": "@backbone"}
    config_file.write_text(json.dumps(config))
    return bundle


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    items = make_items(tmp_path_factory.mktemp("images"), 3)  # one RGB and two grayscale sizes
    return [Path(item["image"]) for item in items]


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite2", "efficientnet_b0"])
def test_onnx_export_equals_eager_with_metadata_and_dynamic_batch(
    tmp_path: Path, images: list[Path], backbone: str
) -> None:
    bundle = backbone_bundle(tmp_path / "bundle", backbone)
    out = tmp_path / "model.onnx"
    report = export_bundle(bundle, "onnx", out, images=images)

    assert report.agreement.inputs == 2 + len(images)
    assert report.agreement.max_abs_logit_diff <= 1e-4
    assert report.agreement.argmax_agreement == 1.0
    proto = onnx.load(str(out))
    assert {o.domain: o.version for o in proto.opset_import}[""] == DEFAULT_OPSET
    inside = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    beside = json.loads(out.with_suffix(".json").read_text())
    assert inside["opset"] == beside["metadata"]["opset"] == DEFAULT_OPSET
    assert (inside["backbone"], inside["spatial_size"]) == (backbone, 64)
    assert inside["class_names"] == ["COVID-19", "Normal", "Pneumonia"]
    assert beside["agreement"]["max_abs_logit_diff"] == report.agreement.max_abs_logit_diff

    # the batch axis is dynamic: a batch of 5 pre-processed films gives eager's logits
    predictor = Predictor.from_bundle(bundle, device="cpu")
    batch = torch.stack([torch.as_tensor(predictor.preprocess(p)) for p in [*images, *images[:2]]])
    session = OnnxModel(out, threads=1)
    session.check_matches(predictor)
    np.testing.assert_allclose(session.logits(batch), eager_logits(predictor, batch), atol=1e-4, rtol=0)

    int8 = Path(report.int8["path"])
    assert int8.is_file() and int8.name == "model.int8.onnx"
    assert report.int8["size_bytes"] < 0.5 * report.size_bytes
    q = report.int8["agreement"]
    # the int8 model against eager on the verification inputs (2 seeded noise images + the 3 films)
    checked = verification_batch(predictor, images)
    int8_probs = torch.softmax(torch.from_numpy(OnnxModel(int8, threads=1).logits(checked)), dim=1)
    eager_probs = torch.softmax(torch.from_numpy(eager_logits(predictor, checked)), dim=1)
    assert q["inputs"] == report.agreement.inputs == len(checked)
    largest = float((int8_probs - eager_probs).abs().max())
    assert q["max_abs_probability_diff"] == pytest.approx(largest, abs=1e-6)


def test_torchscript_export_equals_eager_and_carries_metadata(tmp_path: Path, images: list[Path]) -> None:
    bundle = backbone_bundle(tmp_path / "bundle", "efficientnet_lite0")
    out = tmp_path / "model.pt"
    report = export_bundle(bundle, "torchscript", out, images=images[:1])
    assert report.agreement.max_abs_logit_diff <= 1e-4 and report.int8 == {}
    extra = {f"{METADATA_KEY}.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra[f"{METADATA_KEY}.json"])["backbone"] == "efficientnet_lite0"
    predictor = Predictor.from_bundle(bundle, device="cpu")
    x = torch.as_tensor(predictor.preprocess(images[2])).unsqueeze(0)
    with torch.inference_mode():
        np.testing.assert_allclose(loaded(x).numpy(), eager_logits(predictor, x), atol=1e-4, rtol=0)


@pytest.mark.integration
def test_onnx_equals_eager_on_the_real_dicom_films(tmp_path: Path, shared_data: Path) -> None:
    films = sorted((shared_data / "dicom").glob("*.dcm"))
    assert films, "the real DICOM films are missing from the shared data"
    bundle = backbone_bundle(tmp_path / "bundle", "efficientnet_lite0", spatial_size=224)
    report = export_bundle(bundle, "onnx", tmp_path / "lite0.onnx", images=films, int8=False)
    assert report.verification_images == len(films)
    assert report.agreement.max_abs_logit_diff <= 1e-4


def test_export_that_disagrees_with_eager_fails_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = make_trained_bundle(tmp_path / "bundle", spatial_size=32)
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)  # no export can meet it
    out = tmp_path / "model.onnx"
    with pytest.raises(CXRMonaiError, match="disagrees with the eager network"):
        export_bundle(bundle, "onnx", out)
    assert list(tmp_path.glob("model*")) == []


def test_bad_format_missing_packages_and_a_foreign_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = make_trained_bundle(tmp_path / "bundle", spatial_size=32)
    with pytest.raises(CXRMonaiError, match=r"format 'tflite': expected one of onnx, torchscript"):
        export_bundle(bundle, "tflite", tmp_path / "m.tflite")

    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(b"not a model")
    with pytest.raises(BundleError, match="not a loadable ONNX model"):
        OnnxModel(foreign)

    real_import = builtins.__import__

    def no_onnxruntime(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(CXRMonaiError, match=r"onnxruntime is missing\): pip install 'cxr-monai\[onnx\]'"):
        require_onnx()


def test_onnx_file_of_another_bundle_is_refused(tmp_path: Path) -> None:
    small = make_trained_bundle(tmp_path / "small", spatial_size=32)
    out = tmp_path / "small.onnx"
    export_bundle(small, "onnx", out, int8=False)
    other = Predictor.from_bundle(make_trained_bundle(tmp_path / "large", spatial_size=48), device="cpu")
    with pytest.raises(BundleError, match="exported with spatial_size 32, the bundle has 48"):
        OnnxModel(out).check_matches(other)


def test_cli_export_writes_the_file_and_reports(tmp_path: Path, images: list[Path]) -> None:
    bundle = make_trained_bundle(tmp_path / "bundle", spatial_size=32)
    out = tmp_path / "cli.onnx"
    args = ["export", "--bundle", str(bundle), "--format", "onnx", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--verify-image", str(images[0])])
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "cli.int8.onnx").is_file()
    assert "max |logit - eager|" in result.output and "(1 images)" in result.output
    bad = CliRunner().invoke(app, [*args[:-2], "--out", str(tmp_path / "x"), "--format", "tflite"])
    assert bad.exit_code == 1 and "expected one of onnx, torchscript" in bad.output
