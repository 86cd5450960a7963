"""``cxr-monai evaluate`` reuses what training cached: a film whose trunk and baseline features are
stored is not decoded again, and the figures equal those of a run that decodes everything."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from bundle_factory import make_items, write_datalist
from typer.testing import CliRunner

import cxr_monai.evaluation.report as report
from cxr_monai.cli import app

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_network")
SIZE = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(datalist, a `cxr-monai train --cache-trunk-features` output with 2 folds and a final model)."""
    root = tmp_path_factory.mktemp("evalcache")
    training = make_items(root / "f0", 6, prefix="a", fold=0) + make_items(
        root / "f1", 6, prefix="b", fold=1, seed=1
    )
    datalist = write_datalist(root / "datalist.json", training, make_items(root / "t", 6, prefix="t", seed=2))
    out = root / "cv"
    options = ["--backbone", "efficientnet_lite0", "--pretrained", "imagenet", "--cache-trunk-features"]
    options += ["--spatial-size", str(SIZE), "--max-epochs", "2", "--freeze-epochs", "2", "--batch-size", "4"]
    options += ["--num-workers", "0", "--final", "retrain"]
    result = CliRunner().invoke(app, ["train", "--datalist", str(datalist), "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    return datalist, out


def evaluate(datalist: Path, bundle: Path, out: Path, split: str, *extra: str):
    args = ["evaluate", "--bundle", str(bundle), "--datalist", str(datalist), "--split", split]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--bootstrap", "50", *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "metrics.json").read_text())


def probabilities(folder: Path) -> dict[str, list[float]]:
    with (folder / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return {row["image"]: [float(v) for k, v in row.items() if k.startswith("prob_")] for row in rows}


@pytest.mark.parametrize("split, bundle", [("test", "final"), ("cv", "")])
def test_evaluations_decode_only_what_training_did_not_and_give_the_same_figures(
    trained, tmp_path, monkeypatch, split, bundle
):
    """Training decoded every training film once (trunk features and baseline thumbnail): out of fold
    nothing is decoded again, on the test split only the test films, and a second evaluation nothing."""
    datalist, run = trained
    bundle_dir = run / bundle if bundle else run
    plain = evaluate(datalist, bundle_dir, tmp_path / "plain", split, "--no-feature-cache")
    decoded: list[str] = []
    real_read = report.read_cxr

    def counting_read(source, *args, **kwargs):
        decoded.append(str(source))
        return real_read(source, *args, **kwargs)

    monkeypatch.setattr(report, "read_cxr", counting_read)
    first = evaluate(datalist, bundle_dir, tmp_path / "first", split)
    test_films = {item["image"] for item in json.loads(datalist.read_text())["test"]}
    assert set(decoded) == (test_films if split == "test" else set())
    assert len(decoded) == len(set(decoded))
    decoded.clear()
    again = evaluate(datalist, bundle_dir, tmp_path / "again", split)
    assert decoded == []
    for metrics in (first, again):
        assert metrics["model_metrics"]["accuracy"] == plain["model_metrics"]["accuracy"]
        assert metrics["model_metrics"]["confusion_matrix"] == plain["model_metrics"]["confusion_matrix"]
        assert metrics["shortcut_check"] == plain["shortcut_check"]
    reference = probabilities(tmp_path / "plain")
    for name in ("first", "again"):
        for image, probs in probabilities(tmp_path / name).items():
            assert probs == pytest.approx(reference[image], abs=1e-5)
