"""``cxr-monai compare`` on two tiny ``cxr-monai train`` runs (v1, and v2 with a 2-iteration CycleGAN per
fold): every figure written, every number equal to ``cxr-monai evaluate``'s, the paired difference's CI
equal to a bootstrap computed by hand. 32 px, 1 epoch, one thread."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image
from test_augmentation_v2 import write_tiny_datalist
from typer.testing import CliRunner

from cxr_monai.cli import app
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data import load_datalist
from cxr_monai.evaluation.compare import (
    FIGURES,
    TABLE_FIGURES,
    class_accuracy,
    classwise_figure,
    curves_figure,
    difference_sentence,
    paired_accuracy_difference,
)
from cxr_monai.evaluation.metrics import Estimate
from cxr_monai.predictor import Predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BOOT = "40"


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compare")
    datalist = write_tiny_datalist(root, n_folds=2, per_class=3, test_per_class=4)
    common = ["--datalist", str(datalist), "--backbone", "efficientnet_b0", "--max-epochs", "1"]
    common += ["--spatial-size", "32", "--batch-size", "3", "--num-workers", "0", "--threads", "1"]
    common += ["--device", "cpu"]
    invoke("train", *common, "--out", str(root / "v1"))
    invoke(
        "train", *common, "--out", str(root / "v2"), "--augmentation", "v2", "--n-synthetic", "3",
        "--gan-iterations", "2", "--gan-size", "32", "--gan-channels", "4",
    )  # fmt: skip
    out = root / "cmp"
    invoke(
        "compare", str(root / "v1"), str(root / "v2"), "--datalist", str(datalist), "--out", str(out),
        "--bootstrap", BOOT, "--device", "cpu",
    )  # fmt: skip
    return {"root": root, "datalist": datalist, "out": out}


def test_compare_writes_every_figure_and_the_report(compared: dict[str, Path]) -> None:
    out = compared["out"]
    for name in FIGURES.values():
        with Image.open(out / name) as png:
            assert png.format == "PNG" and min(png.size) > 200
    data = json.loads((out / "compare.json").read_text())
    assert sorted(data["figures"]) == sorted(FIGURES.values())
    assert [run["augmentation"] for run in data["runs"]] == ["v1", "v2"]
    # Fig. 7: one test image per class, the same for both runs
    labels = {item["image"]: item["label"] for item in json.loads(compared["datalist"].read_text())["test"]}
    assert sorted(labels[Path(p).name] for p in data["gradcam_examples"]) == [0, 1, 2]
    for run in data["runs"]:
        cost = run["cost"]
        assert cost["parameters"] > 1_000_000 and cost["model_pt_bytes"] > 4 * cost["parameters"]
        assert cost["train_seconds_per_epoch"] > 0 and cost["inference_images_per_second"] > 0
        assert set(run["folds"]) == {"0", "1"} and run["fold_spread"]["n_folds"] == 2
    v2 = data["runs"][1]
    assert [q["fold"] for q in v2["gan_quality"]] == [0, 1]
    assert all(0.0 <= q["real_vs_synthetic_auroc"] <= 1.0 for q in v2["gan_quality"])
    [rate] = data["v1_covid_rate_on_synthetic"]
    # v1's final model on v2's synthetic training images (3 per fold), called here one by one
    augmented = json.loads((compared["root"] / "v2" / "cv_summary.json").read_text())["augmentation"]
    content = load_datalist(augmented["augmented_datalist"])  # resolves relative image paths
    synthetic = [item["image"] for item in content["training"] if item.get("synthetic")]
    predictor = Predictor.from_bundle(compared["root"] / "v1" / "final", device="cpu")
    called = [
        predictor.predict([image])[0].predicted_index == CLASS_NAMES.index("COVID-19") for image in synthetic
    ]
    assert rate["n_synthetic"] == len(synthetic) == 6
    assert rate["covid_rate"] == pytest.approx(sum(called) / len(called))
    [pair] = data["paired_differences"]
    assert pair["n_images"] == 12
    report = (out / "report.md").read_text()
    for heading in ("Table 2", "mean ± sd over folds", "Cost", "Paired differences", "GAN quality"):
        assert heading in report
    assert "shortcut baseline (disease-blind)" in report


def _evaluate(bundle: Path, datalist: Path, out: Path) -> dict[str, Any]:
    invoke("evaluate", "--bundle", str(bundle), "--datalist", str(datalist), "--out", str(out),
           "--bootstrap", BOOT, "--device", "cpu")  # fmt: skip
    return dict(json.loads((out / "metrics.json").read_text()))


def test_compare_numbers_equal_evaluate(compared: dict[str, Path]) -> None:
    data = json.loads((compared["out"] / "compare.json").read_text())
    report = (compared["out"] / "report.md").read_text()
    for run in data["runs"]:
        for bundle, scored in (("final", run["final"]), ("fold_1", run["folds"]["1"])):
            metrics = _evaluate(Path(run["path"]) / bundle, compared["datalist"], compared["root"] / "ev")
            model = metrics["model_metrics"]
            assert scored["accuracy"] == model["accuracy"]
            for name in CLASS_NAMES:
                for fig in TABLE_FIGURES:
                    assert scored["per_class"][name][fig] == model["per_class"][name][fig]
            if bundle == "final":
                row = next(line for line in report.splitlines() if line.startswith(f"| {run['label']} |"))
                assert Estimate(**model["accuracy"]).format() in row
                baseline = metrics["shortcut_check"]["accuracy"]
                assert data["shortcut_baseline"]["accuracy"]["value"] == pytest.approx(baseline["value"])


def _hand_bootstrap(correct_a: np.ndarray, correct_b: np.ndarray, groups: list[str], n_boot: int, seed: int):
    """Patients drawn with replacement (numpy's default_rng, patients in sorted order), both models scored
    on each resample, 2.5 and 97.5 percentiles of the accuracy difference."""
    rng = np.random.default_rng(seed)
    patients = sorted(set(groups))
    members = {p: [i for i, g in enumerate(groups) if g == p] for p in patients}
    replicates = []
    for _ in range(n_boot):
        drawn = [patients[k] for k in rng.integers(0, len(patients), size=len(patients))]
        idx = [i for p in drawn for i in members[p]]
        replicates.append(correct_b[idx].mean() - correct_a[idx].mean())
    return np.quantile(replicates, [0.025, 0.975])


def test_paired_difference_ci_equals_a_hand_computed_bootstrap() -> None:
    rng = np.random.default_rng(3)
    n = 60
    y_true = rng.integers(0, 3, n)
    prob_a = rng.dirichlet(np.ones(3), n)
    prob_b = prob_a.copy()
    flip = rng.random(n) < 0.3  # B = A with 30 % of its rows replaced by the true class
    prob_b[flip] = np.eye(3)[y_true[flip]]
    groups = [f"p{i // 3}" for i in range(n)]
    estimate = paired_accuracy_difference(y_true, prob_a, prob_b, n_boot=500, seed=7, groups=groups)
    correct_a = (prob_a.argmax(1) == y_true).astype(float)
    correct_b = (prob_b.argmax(1) == y_true).astype(float)
    assert estimate.value == pytest.approx(correct_b.mean() - correct_a.mean())
    low, high = _hand_bootstrap(correct_a, correct_b, groups, 500, 7)
    assert (estimate.ci_low, estimate.ci_high) == (pytest.approx(low), pytest.approx(high))
    assert estimate.ci_low > 0  # B only ever fixes A's mistakes
    same = paired_accuracy_difference(y_true, prob_a, prob_a, n_boot=200, seed=0, groups=groups)
    assert (same.value, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0)  # paired: identical models never differ
    assert "is better" in difference_sentence(
        {"a": "A", "b": "B", "n_images": n, "accuracy_b_minus_a": estimate}
    )
    assert "includes 0" in difference_sentence(
        {"a": "A", "b": "B", "n_images": n, "accuracy_b_minus_a": Estimate(0.01, -0.02, 0.04)}
    )


def test_class_accuracy_is_one_vs_rest() -> None:
    cm = np.array([[5, 1, 0], [2, 6, 1], [0, 0, 4]])
    assert class_accuracy(cm, 0) == pytest.approx((5 + 6 + 1 + 0 + 4) / 19)


def test_compare_rejects_a_folder_that_is_not_a_run(compared: dict[str, Path], tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["compare", str(tmp_path), "--datalist", str(compared["datalist"]), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "no cv_summary.json" in result.output


def test_run_figures_share_one_legend_below_the_panels() -> None:
    """Per-panel legends hid the bars of a six-run grid: Figs. 4 and 6 carry one figure legend instead."""
    runs = []
    for n in range(5):
        per_class = {name: {"precision": Estimate(0.5), "recall": Estimate(0.6)} for name in CLASS_NAMES}
        metrics = SimpleNamespace(per_class=per_class, confusion_matrix=np.eye(3, dtype=int) * 5 + 1)
        log = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e} for e in (1, 2)]
        runs.append(SimpleNamespace(label=f"run{n}", final=SimpleNamespace(metrics=metrics), logs=[log]))
    for fig, per_run in ((classwise_figure(runs), 1), (curves_figure(runs), 2)):  # type: ignore[arg-type]
        assert all(ax.get_legend() is None for ax in fig.axes)
        (legend,) = fig.legends
        labels = [text.get_text() for text in legend.get_texts()]
        assert len(labels) == 5 * per_run and all(f"run{n}" in " ".join(labels) for n in range(5))
