"""The package layout keeps its promises: names that trained bundles' configs call stay importable."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Every ``cxr_monai.training.<name>`` a config names, in the shipped bundles and as written by bundles
#: trained before ``training`` became a subpackage (the same names: configs are copied at training time).
_CONFIG_NAMES = sorted(
    {
        match
        for path in (ROOT / "bundles").rglob("*.json")
        for match in re.findall(r"cxr_monai\.training\.([A-Za-z_]+)", path.read_text(encoding="utf-8"))
    }
)


def test_the_shipped_configs_name_training_objects() -> None:
    assert {"fold_items", "prepare_output_dir", "FineTuneSchedule", "TrainingLog"} <= set(_CONFIG_NAMES)


@pytest.mark.parametrize("name", _CONFIG_NAMES)
def test_names_in_trained_bundle_configs_resolve(name: str) -> None:
    training = importlib.import_module("cxr_monai.training")
    assert callable(getattr(training, name))
