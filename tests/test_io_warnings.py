"""DICOM that reads but looks wrong for a frontal chest X-ray model: read, with a warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr_monai.io import read_cxr
from tests.dicom_factory import gradient, make_dataset, save


def _read(tmp_path: Path, **tags: object) -> tuple[np.ndarray, tuple[str, ...]]:
    image = read_cxr(save(make_dataset(gradient(8), **tags), tmp_path / "a.dcm"))
    return image.pixels, image.warnings


@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_frontal_chest_radiograph_has_no_warning(tmp_path: Path, modality: str) -> None:
    assert _read(tmp_path, Modality=modality, ViewPosition="AP")[1] == ()


def test_ct_modality_warns_but_reads(tmp_path: Path) -> None:
    pixels, warnings = _read(tmp_path, Modality="CT")
    np.testing.assert_array_equal(pixels, gradient(8))
    assert len(warnings) == 1
    assert "Modality is CT" in warnings[0] and "CR or DX" in warnings[0]


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # "lateral " is bad CS, seen in the wild
@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL", "lateral "])
def test_lateral_view_warns(tmp_path: Path, view: str) -> None:
    _, warnings = _read(tmp_path, ViewPosition=view)
    assert len(warnings) == 1
    assert "lateral" in warnings[0] and view.strip().upper() in warnings[0]


def test_body_part_not_chest_warns(tmp_path: Path) -> None:
    _, warnings = _read(tmp_path, BodyPartExamined="KNEE")
    assert warnings == ("BodyPartExamined is KNEE; this model expects CHEST",)


def test_warnings_accumulate(tmp_path: Path) -> None:
    _, warnings = _read(tmp_path, Modality="MR", ViewPosition="LL", BodyPartExamined="HEAD")
    assert len(warnings) == 3


def test_missing_tags_do_not_warn(tmp_path: Path) -> None:
    ds = make_dataset(gradient(8))
    for keyword in ("Modality", "ViewPosition", "BodyPartExamined"):
        delattr(ds, keyword)
    assert read_cxr(save(ds, tmp_path / "a.dcm")).warnings == ()
