"""Bundle run parameters in the forms MONAI bundles commonly take them (``--spatial_size "[64,64]"``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bundle_factory import make_items, write_datalist
from monai.bundle import ConfigWorkflow

from cxr_monai.errors import BundleError, CXRMonaiError, DatasetError
from cxr_monai.training.inference_inputs import inference_items
from cxr_monai.transforms import square_side

CONFIGS = Path(__file__).resolve().parent.parent / "bundles" / "cxr_classifier" / "configs"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("given", "side"), [(64, 64), ("64", 64), ([64, 64], 64), ((32, 32), 32)])
def test_square_side_accepts_an_int_or_two_equal_sides(given: object, side: int) -> None:
    assert square_side(given) == side


@pytest.mark.parametrize("given", [[64, 32], [64], [64, 64, 64], 0, -3, "large", 6.5, True, None])
def test_square_side_refuses_other_forms_in_one_line(given: object) -> None:
    with pytest.raises(BundleError, match="spatial_size") as caught:
        square_side(given)
    assert "\n" not in str(caught.value)


def _train(tmp_path: Path, spatial_size: object, **overrides: object) -> Path:
    training = make_items(tmp_path / "img", 6, size_tells_class=False, fold=0) + make_items(
        tmp_path / "img", 6, size_tells_class=False, fold=1, prefix="b", seed=1
    )
    datalist = write_datalist(tmp_path / "datalist.json", training, make_items(tmp_path / "t", 3, prefix="t"))
    out = tmp_path / "run"
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        datalist=str(datalist),
        output_dir=str(out),
        **{
            "spatial_size": spatial_size,
            "batch_size": 4,
            "num_workers": 0,
            "verbose": False,
            "max_epochs": 1,
            **overrides,
        },
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return out


def test_the_list_form_trains_and_the_trained_bundle_records_an_int(tmp_path: Path) -> None:
    out = _train(tmp_path, [64, 64])
    inference = json.loads((out / "configs" / "inference.json").read_text())
    assert inference["spatial_size"] == 64
    metadata = json.loads((out / "configs" / "metadata.json").read_text())
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == [64, 64]


def test_a_non_square_size_stops_at_initialisation_with_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as caught:  # MONAI wraps errors raised inside config expressions
        _train(tmp_path, [64, 32])
    cause = caught.value.__cause__
    assert isinstance(cause, BundleError)
    assert (
        str(cause)
        == "spatial_size [64, 32]: expected a positive int or a list of two equal ints (the input is square)"
    )
    assert not (tmp_path / "run" / "models").exists()


def test_inference_items_from_a_datalist_resolve_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [{"image": "img/a.png"}]}))  # no label: new films
    assert inference_items(str(datalist), "test") == [{"image": str(tmp_path / "img" / "a.png")}]


@pytest.mark.parametrize(
    ("datalist", "input_dir", "message"),
    [("", "", "exactly one of"), ("d.json", "films", "exactly one of"), ("", "missing", "not found")],
)
def test_inference_items_refuse_unclear_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, datalist: str, input_dir: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CXRMonaiError, match=message):
        inference_items(datalist, "test", input_dir)


def test_a_folder_without_images_is_named_in_the_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=str(tmp_path)):
        inference_items("", "test", str(tmp_path))


def test_a_last_training_batch_of_one_image_is_dropped(tmp_path: Path) -> None:
    """6 training images in batches of 5 leave a batch of one; at 32 px EfficientNet-B0's last feature map
    is 1 x 1, where BatchNorm in training mode cannot work on one value per channel."""
    out = _train(tmp_path, 32, backbone="efficientnet_b0", batch_size=5)
    log = json.loads((out / "logs" / "training_log.json").read_text())
    assert [entry["epoch"] for entry in log] == [1]
    assert (out / "models" / "model.pt").is_file()
