"""``cxr-monai evaluate`` end to end on a tiny bundle and datalist, and the report's parts."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import make_items, make_trained_bundle, write_datalist
from PIL import Image
from typer.testing import CliRunner

from cxr_monai.cli import app
from cxr_monai.constants import CLASS_NAMES, RESEARCH_USE_NOTICE
from cxr_monai.data import DataItem
from cxr_monai.errors import DatasetError
from cxr_monai.evaluation import report as evaluation
from cxr_monai.evaluation.metrics import DEFAULT_ECE_BINS, PER_CLASS_FIGURES
from cxr_monai.evaluation.plots import training_curves_figure
from cxr_monai.predictor import Predictor

PNGS = ("confusion_matrix.png", "roc_curves.png", "reliability.png", "sources.png", "training_curves.png")


def with_sources(items: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Items with ``source`` set to ``names[i]`` (and an extra key a newer datalist might carry)."""
    return [{**item, "source": name, "age": 40} for item, name in zip(items, names, strict=True)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bundle + datalist: 30 training items in 2 folds (fold 0 from site-a, fold 1 from site-b) and 12
    test items (the first 6 from site-a, the rest from site-b; each site holds all three classes), image
    size tells the class; test patients have two images each, both from one site."""
    root = tmp_path_factory.mktemp("evaluate")
    training = with_sources(make_items(root / "train0", 15, seed=1, prefix="a", fold=0), ["site-a"] * 15)
    training += with_sources(make_items(root / "train1", 15, seed=2, prefix="b", fold=1), ["site-b"] * 15)
    test = with_sources(
        make_items(root / "test", 12, seed=3, prefix="t", patients_per_item=2),
        ["site-a"] * 6 + ["site-b"] * 6,
    )
    return {
        "root": root,
        "bundle": make_trained_bundle(root / "bundle", spatial_size=32),
        "datalist": write_datalist(root / "datalist.json", training, test),
    }


def _top_label_ece(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int) -> float:
    """Guo et al. 2017: bins (lo, hi] of equal width on the top probability; sum of bin share x
    |accuracy - mean confidence|, written out here independently of cxr_monai.evaluation.metrics."""
    confidence, correct = y_prob.max(axis=1), y_prob.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def run(*args: str) -> Any:
    return CliRunner().invoke(app, ["evaluate", *args])


def test_evaluate_writes_the_report(setup: dict[str, Path]) -> None:
    out = setup["root"] / "out"
    result = run(
        "--bundle", str(setup["bundle"]), "--datalist", str(setup["datalist"]), "--out", str(out),
        "--bootstrap", "30", "--batch-size", "4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "disease-blind baseline reaches" in result.output
    assert "0.93" in result.output and "0.21" in result.output  # the context sentence
    for heading in ("per source", "within source", "source probe", "disease or source?"):
        assert heading in result.output

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["intended_use"] == RESEARCH_USE_NOTICE
    assert metrics["class_names"] == list(CLASS_NAMES)
    assert metrics["model"] == {
        "name": "Tiny test classifier",
        "version": "0.0.1",
        "backbone": "tiny_cnn",
        "spatial_size": 32,
    }
    assert metrics["datalist"] == str(setup["datalist"].resolve())
    assert metrics["split"] == "test"
    model = metrics["model_metrics"]
    assert model["n_per_class"] == {"COVID-19": 4, "Normal": 4, "Pneumonia": 4}
    assert set(model["accuracy"]) == {"value", "ci_low", "ci_high"}
    for name in CLASS_NAMES:
        assert set(model["per_class"][name]) == set(PER_CLASS_FIGURES)
    assert np.asarray(model["confusion_matrix"]["counts"]).sum() == 12
    assert model["bootstrap"]["unit"] == "patient" and model["bootstrap"]["n_resamples"] == 30
    # Accuracy and top-label ECE recomputed from the per-image probabilities in predictions.csv (6 decimals)
    with (out / "predictions.csv").open() as handle:
        scored = list(csv.DictReader(handle))
    y_true = np.array([CLASS_NAMES.index(row["true_class"]) for row in scored])
    y_prob = np.array([[float(row[f"prob_{c}"]) for c in CLASS_NAMES] for row in scored])
    assert model["accuracy"]["value"] == pytest.approx(np.mean(y_prob.argmax(axis=1) == y_true))
    ece = model["expected_calibration_error"]["value"]
    assert ece == pytest.approx(_top_label_ece(y_true, y_prob, DEFAULT_ECE_BINS), abs=1e-5)

    shortcut = metrics["shortcut_check"]
    assert shortcut["accuracy"]["value"] >= 0.9  # image size gives the class away here
    assert shortcut["n_training_items"] == 30 and not shortcut["fitted_on_evaluated_items"]
    assert set(shortcut["recall"]) == set(CLASS_NAMES)
    assert metrics["verdict"][0].startswith("The disease-blind baseline reaches")
    assert any(s.startswith(("Disease signal within", "No clear disease signal")) for s in metrics["verdict"])
    assert metrics["split_scope"] == "the non-synthetic items of the datalist's 'test' list"

    by_source = metrics["by_source"]
    assert set(by_source["definitions"]) >= {"within_source.auroc", "disease_signal"}
    assert by_source["bootstrap"]["unit"] == "patient"
    assert list(by_source["sources"]) == ["site-a", "site-b"]
    for site in by_source["sources"].values():
        assert site["n_images"] == 6 and site["n_patients"] == 3
        assert site["classes_present"] == list(CLASS_NAMES)
        for scorer in ("model", "baseline", "model_minus_baseline"):
            figures = site[scorer]
            assert set(figures) == {"accuracy", "recall", "within_source"}
            assert set(figures["within_source"]["auroc"]) == set(CLASS_NAMES)
        assert site["baseline"]["accuracy"]["value"] >= 0.8  # the size shortcut works in each site
    probe = metrics["source_probe"]
    assert probe["n_per_source"] == {"site-a": 6, "site-b": 6} and probe["majority_source_rate"] == 0.5
    assert probe["cross_validation"] == {"n_splits": 3, "unit": "patient"}
    assert probe["model_features"]["n_features"] == 4  # TinyCNN's pooled trunk width
    assert probe["baseline_features"]["n_features"] == 2 + 2 + 256  # L/RGB one-hot, size, thumbnail
    assert 0.0 <= probe["model_features"]["accuracy"] <= 1.0

    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    assert list(rows[0]) == [
        "image",
        "source",
        "true_class",
        "predicted_class",
        "prob_COVID-19",
        "prob_Normal",
        "prob_Pneumonia",
        "baseline_predicted_class",
    ]
    text = (out / "predictions.csv").read_text()
    assert "patient" not in text and "test:" not in text  # no patient ids, not even as values
    assert [row["source"] for row in rows] == ["site-a"] * 6 + ["site-b"] * 6
    for row in rows:
        probs = [float(row[f"prob_{c}"]) for c in CLASS_NAMES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert row["predicted_class"] == CLASS_NAMES[int(np.argmax(probs))]
    for png in PNGS:
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.size[0] > 300
    assert sorted(metrics["plots"]) == sorted(PNGS)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_missing_bundle_is_a_one_line_error(setup: dict[str, Path]) -> None:
    out = setup["root"] / "out_missing"
    result = run(
        "--bundle", str(setup["root"] / "nope"), "--datalist", str(setup["datalist"]), "--out", str(out)
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "nope" in lines[0]
    assert not out.exists()


def test_unknown_split_and_missing_fold(setup: dict[str, Path]) -> None:
    common = ["--bundle", str(setup["bundle"]), "--datalist", str(setup["datalist"]), "--out", "unused"]
    result = run(*common, "--split", "validation")
    assert result.exit_code == 1 and "unknown split 'validation'" in result.output
    result = run(*common, "--split", "fold:7")
    assert result.exit_code == 1 and "fold:0, fold:1" in result.output
    result = run(*common, "--split", "source:site-c")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1
    assert "source 'site-c' not in the datalist (sources present: site-a, site-b)" in lines[0]


def test_source_split_scores_every_item_of_one_source_against_a_baseline_fitted_without_it(
    setup: dict[str, Path],
) -> None:
    splits = evaluation.load_splits(setup["datalist"])
    items = evaluation.select_split(splits, "source:site-b")
    expected = {i["image"] for i in json.loads(setup["datalist"].read_text())["training"][15:]}
    expected |= {i["image"] for i in json.loads(setup["datalist"].read_text())["test"][6:]}
    assert {item.image for item in items} == expected and len(items) == 21

    out = setup["root"] / "out_source"
    result = run(
        "--bundle", str(setup["bundle"]), "--datalist", str(setup["datalist"]), "--out", str(out),
        "--split", "source:site-b", "--bootstrap", "20",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "source:site-b" and "'site-b'" in metrics["split_scope"]
    assert "training and test alike" in metrics["split_scope"]
    assert metrics["model_metrics"]["n_images"] == 21
    assert list(metrics["by_source"]["sources"]) == ["site-b"]
    assert metrics["shortcut_check"]["n_training_items"] == 15  # site-a's training items only
    assert not metrics["shortcut_check"]["fitted_on_evaluated_items"]
    assert metrics["source_probe"]["model_features"] is None
    assert "only one source" in metrics["source_probe"]["note"]


def test_fold_split_counts_each_image_once_and_fits_the_baseline_on_other_folds(
    setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[str] = []
    real_read = evaluation.read_cxr

    def counting_read(source: Any) -> Any:
        decoded.append(str(source))
        return real_read(source)

    monkeypatch.setattr(evaluation, "read_cxr", counting_read)
    splits = evaluation.load_splits(setup["datalist"])
    predictor = Predictor.from_bundle(setup["bundle"], device="cpu")
    report = evaluation.evaluate(
        predictor, evaluation.select_split(splits, "fold:0"), splits["training"], n_boot=0, batch_size=5
    )
    assert len(report.items) == 15
    assert report.shortcut is not None and report.shortcut.n_training_items == 15  # fold 1 only
    assert sorted(decoded) == sorted(item.image for item in splits["training"])  # each exactly once
    assert report.metrics.bootstrap["unit"] == "patient"  # every item has a patient id
    decoded.clear()
    report = evaluation.evaluate(
        predictor, evaluation.select_split(splits, "training"), splits["training"], n_boot=5, by_patient=False
    )
    assert sorted(decoded) == sorted(item.image for item in splits["training"])
    assert report.shortcut is not None and report.shortcut.fitted_on_evaluated_items
    assert "optimistic" in report.verdict[0]
    assert report.metrics.bootstrap["unit"] == "image"


def test_unreadable_image_is_skipped_and_listed(setup: dict[str, Path], tmp_path: Path) -> None:
    data = json.loads(setup["datalist"].read_text())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    data["test"].append({**data["test"][0], "image": str(broken)})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(data))
    out = tmp_path / "out"
    result = run(
        "--bundle", str(setup["bundle"]), "--datalist", str(datalist), "--out", str(out),
        "--bootstrap", "0", "--no-shortcut",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(s["image"], s["stage"]) for s in metrics["skipped_images"]] == [(str(broken), "evaluate")]
    assert metrics["model_metrics"]["n_images"] == 12
    assert metrics["shortcut_check"] is None
    assert metrics["source_probe"]["baseline_features"] is None
    assert metrics["by_source"]["sources"]["site-a"]["baseline"] is None
    assert "No disease-blind baseline was scored" in " ".join(metrics["verdict"])
    assert metrics["model_metrics"]["accuracy"]["ci_low"] is None
    assert "baseline_predicted_class" not in (out / "predictions.csv").read_text()


def test_without_training_log_the_curves_are_skipped_with_a_note(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    bundle = make_trained_bundle(tmp_path / "bundle", training_log=False)
    out = tmp_path / "out"
    result = run(
        "--bundle", str(bundle), "--datalist", str(setup["datalist"]), "--out", str(out),
        "--bootstrap", "0", "--no-shortcut",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert not (out / "training_curves.png").exists()
    assert "training_log.json" in metrics["notes"][0]


def test_training_curves_figure_plots_numeric_keys_only() -> None:
    assert training_curves_figure([[{"epoch": 1, "note": "x"}]]) is None
    fig = training_curves_figure([[{"epoch": 1, "train_loss": 1.0, "val_accuracy": 0.5, "lr": 1e-4}]])
    assert fig is not None
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy", "learning rate"]
    fig = training_curves_figure([[{"epoch": 1, "val_accuracy": 0.5, "train_seconds": 3.0, "ok": True}]])
    assert fig is not None
    assert [ax.get_title() for ax in fig.axes] == ["accuracy", "seconds"]
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["val_accuracy"]
    fig = training_curves_figure([[{"epoch": 1, "val_loss": 1.0, "grad_norm": 3.0, "f1": 0.4}]])
    assert fig is not None
    assert [ax.get_title() for ax in fig.axes] == ["loss", "f1, grad_norm"]  # says what the panel holds


def test_training_curves_of_several_folds_draw_one_line_per_fold_and_label_once() -> None:
    folds = [[{"epoch": e, "val_accuracy": 0.5 + f / 10 + e / 100} for e in (1, 2, 3)] for f in range(3)]
    folds[2] = [*folds[2][:2], {"epoch": 3, "note": "stopped"}]
    fig = training_curves_figure(folds)
    assert fig is not None
    lines = fig.axes[0].get_lines()
    assert [len(line.get_xdata()) for line in lines] == [3, 3, 2]
    assert list(lines[1].get_ydata()) == pytest.approx([0.61, 0.62, 0.63])
    assert [text.get_text() for text in fig.axes[0].get_legend().get_texts()] == ["val_accuracy (3 runs)"]
    assert len({line.get_color() for line in lines}) == 1


def test_roc_legend_lists_the_classes_and_not_the_chance_line() -> None:
    from cxr_monai.evaluation.plots import roc_figure

    rng = np.random.default_rng(0)
    y_true = np.array([0, 1, 2] * 10)
    y_prob = rng.dirichlet(np.ones(3), size=y_true.size)
    ax = roc_figure(y_true, y_prob).axes[0]
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert len(legend) == 3 and [entry.split(" (")[0] for entry in legend] == list(CLASS_NAMES)
    diagonal = [line for line in ax.get_lines() if list(line.get_xdata()) == [0, 1] == list(line.get_ydata())]
    assert len(diagonal) == 1  # the chance line is still drawn
    assert any("chance" in text.get_text() for text in ax.texts)


def test_datalist_errors_and_relative_paths(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        evaluation.load_splits(tmp_path / "missing.json")
    entry = {"image": "imgs/a.png", "label": 1, "patient_id": "p1"}
    bad = write_datalist(tmp_path / "bad.json", [], [{**entry, "label": 5}])
    with pytest.raises(DatasetError, match=r"test item 0: 'label' must be a class index 0\.\.2"):
        evaluation.load_splits(bad)
    good = write_datalist(tmp_path / "good.json", [], [entry])
    items = evaluation.load_splits(good)["test"]
    assert items == [DataItem(str(tmp_path.resolve() / "imgs" / "a.png"), 1, "p1", "(no source)")]
    with pytest.raises(DatasetError, match="has no items"):
        evaluation.select_split(evaluation.load_splits(good), "training")


def test_synthetic_items_are_never_evaluated(tmp_path: Path) -> None:
    """CycleGAN items (training-only, with their source image's fold) stay out of every split."""
    real = {"image": "real.png", "label": 0, "fold": 0, "patient_id": "covid:1"}
    fake = {
        "image": "fake.png",
        "label": 0,
        "fold": 0,
        "patient_id": "synthetic:kaggle:IM-1",
        "synthetic": True,
    }
    path = tmp_path / "with_synthetic.json"
    write_datalist(path, [real, fake], [{"image": "t.png", "label": 1, "patient_id": "p"}])
    splits = evaluation.load_splits(path)
    for split in ("fold:0", "training", "all"):
        images = [Path(item.image).name for item in evaluation.select_split(splits, split)]
        assert "fake.png" not in images and "real.png" in images


@pytest.mark.integration
def test_evaluate_on_real_images(shared_data: Path, tmp_path: Path) -> None:
    """Real PNG/JPEG files of every class (grayscale, RGB, RGBA, many sizes) through the whole report."""
    folders = [
        shared_data / "covid-chestxray-dataset" / "images",
        shared_data / "chest_xray" / "train" / "NORMAL",
        shared_data / "chest_xray" / "train" / "PNEUMONIA",
    ]
    files = [
        sorted(f for f in folder.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
        for folder in folders
    ]
    items = {
        split: [
            {"image": str(path), "label": label, "patient_id": f"{label}-{n}", "fold": 0}
            for label, paths in enumerate(files)
            for n, path in enumerate(paths[start : start + 4])
        ]
        for split, start in (("training", 0), ("test", 4))
    }
    datalist = write_datalist(tmp_path / "datalist.json", items["training"], items["test"])
    out = tmp_path / "out"
    result = run(
        "--bundle", str(make_trained_bundle(tmp_path / "bundle")), "--datalist", str(datalist),
        "--out", str(out), "--bootstrap", "20",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_metrics"]["n_images"] == 12 and metrics["skipped_images"] == []
    assert metrics["shortcut_check"]["n_training_items"] == 12


def _cross_validation(root: Path, excluded_by_fold_1: list[str]) -> Path:
    """A `cxr-monai train` output: two fold bundles with different weights, a final one, cv_summary.json."""
    cv = root / "cv"
    for fold in (0, 1):
        bundle = make_trained_bundle(cv / f"fold_{fold}", spatial_size=32, seed=10 + fold)
        excluded = excluded_by_fold_1 if fold == 1 else []
        (bundle / "configs" / "train.json").write_text(json.dumps({"exclude_sources": excluded}))
    make_trained_bundle(cv / "final", spatial_size=32, seed=12)
    summary = {"folds": [{"fold": k, "bundle": f"fold_{k}"} for k in (0, 1)], "final": {"bundle": "final"}}
    (cv / "cv_summary.json").write_text(json.dumps(summary))
    return cv


def test_cv_split_scores_each_training_item_with_the_model_that_held_it_out(
    setup: dict[str, Path], tmp_path: Path
) -> None:
    cv = _cross_validation(tmp_path, [])
    out = tmp_path / "eval"
    result = run(
        "--bundle", str(cv), "--datalist", str(setup["datalist"]), "--split", "cv", "--out", str(out),
        "--bootstrap", "20", "--batch-size", "4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    training = json.loads(setup["datalist"].read_text())["training"]
    assert sorted(r["image"] for r in rows) == sorted(i["image"] for i in training)
    fold_of = {i["image"]: i["fold"] for i in training}
    predictors = {k: Predictor.from_bundle(cv / f"fold_{k}") for k in (0, 1)}
    for row in rows:
        own = predictors[fold_of[row["image"]]].predict([row["image"]])[0]
        other = predictors[1 - fold_of[row["image"]]].predict([row["image"]])[0]
        stored = [float(row[f"prob_{name}"]) for name in CLASS_NAMES]
        assert stored == pytest.approx(own.probabilities.tolist(), abs=1e-5)
        assert stored != pytest.approx(other.probabilities.tolist(), abs=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "cv" and "out of fold" in metrics["split_scope"]
    assert sum(metrics["model_metrics"]["n_per_class"].values()) == len(training)
    assert metrics["shortcut_check"]["n_training_items"] == 15  # each fold's baseline: the other fold only
    assert not metrics["shortcut_check"]["fitted_on_evaluated_items"]
    assert "training_curves.png" in metrics["plots"] and metrics["notes"] == []  # both folds' logs


def test_cv_split_leaves_out_the_sources_a_fold_excluded(setup: dict[str, Path], tmp_path: Path) -> None:
    cv = _cross_validation(tmp_path, ["site-b"])  # fold 1 holds site-b only: nothing of it is scored
    splits = evaluation.load_splits(setup["datalist"])
    folds = evaluation.cross_validation_folds(cv, splits)
    assert [(bundle.name, len(items)) for bundle, items in folds] == [("fold_0", 15)]


def test_cv_split_needs_a_cross_validation_folder(setup: dict[str, Path]) -> None:
    result = run(
        "--bundle", str(setup["bundle"]), "--datalist", str(setup["datalist"]), "--split", "cv",
        "--out", str(setup["root"] / "never"),
    )  # fmt: skip
    assert result.exit_code == 1
    assert "cv_summary.json" in result.output and "cxr-monai train" in result.output
    assert not (setup["root"] / "never").exists()


def test_cv_split_lists_an_unreadable_training_image_once(setup: dict[str, Path], tmp_path: Path) -> None:
    document = json.loads(setup["datalist"].read_text())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    document["training"][0]["image"] = str(broken)  # fold 0: skipped there, and by fold 1's baseline
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(document))
    out = tmp_path / "eval"
    result = run(
        "--bundle", str(_cross_validation(tmp_path, [])), "--datalist", str(datalist), "--split", "cv",
        "--out", str(out), "--bootstrap", "0", "--batch-size", "4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    skipped = json.loads((out / "metrics.json").read_text())["skipped_images"]
    assert [entry["image"] for entry in skipped] == [str(broken)]
    assert sum(1 for _ in csv.DictReader((out / "predictions.csv").open())) == len(document["training"]) - 1


def test_cv_split_names_a_damaged_cv_summary(setup: dict[str, Path], tmp_path: Path) -> None:
    cv = _cross_validation(tmp_path, [])
    (cv / "cv_summary.json").write_text('{"folds": [{"bundle": "fold_0"}]')  # truncated, no fold number
    result = run(
        "--bundle", str(cv), "--datalist", str(setup["datalist"]), "--split", "cv",
        "--out", str(tmp_path / "never"),
    )  # fmt: skip
    assert result.exit_code == 1
    assert "cv_summary.json: not a cxr-monai train summary" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "never").exists()
