"""The readers of a trained bundle's training log and run parameters, for cross-validation and the
evaluation report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_monai.training.layout import (
    TRAINING_LOG,
    default_bundle_root,
    prepare_output_dir,
    read_run_parameters,
    read_training_log,
)


def test_the_log_path_is_relative_to_the_bundle() -> None:
    assert Path("logs") / "training_log.json" == TRAINING_LOG


def test_entries_are_read_and_non_dict_rows_dropped(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    rows = [{"epoch": 1, "val_accuracy": 0.5}, "note", {"epoch": 2, "val_accuracy": 0.75}]
    (tmp_path / TRAINING_LOG).write_text(json.dumps(rows))
    assert read_training_log(tmp_path) == [rows[0], rows[2]]


@pytest.mark.parametrize("content", [None, '[{"epoch": 1', '{"epoch": 1}', "\xff"])
def test_absent_or_unreadable_logs_read_as_empty(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / "logs").mkdir()
        (tmp_path / TRAINING_LOG).write_bytes(content.encode("latin-1"))
    assert read_training_log(tmp_path) == []


def test_run_parameters_read_back_what_the_run_layout_recorded(tmp_path: Path) -> None:
    out = prepare_output_dir(
        default_bundle_root(),
        str(tmp_path / "run"),
        {"backbone": "efficientnet_lite0", "spatial_size": [64, 64], "exclude_sources": ["site:x"]},
    )
    parameters = read_run_parameters(out)
    assert parameters["exclude_sources"] == ["site:x"] and parameters["backbone"] == "efficientnet_lite0"
    assert parameters["spatial_size"] == 64


@pytest.mark.parametrize("content", [None, '{"fold": ', "[1, 2]"])
def test_absent_or_unreadable_run_parameters_read_as_empty(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / "configs").mkdir()
        (tmp_path / "configs" / "train.json").write_text(content)
    assert read_run_parameters(tmp_path) == {}
