"""Per-source and within-source figures and the source probe against scikit-learn computed directly on
hand-built predictions; the verdict's branches; the figure; the predictor's pooled features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_factory import make_items, make_trained_bundle
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import recall_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from cxr_monai.errors import BundleError
from cxr_monai.evaluation.metrics import Estimate, bootstrap_interval
from cxr_monai.evaluation.plots import save_png, source_figure
from cxr_monai.evaluation.sources import (
    ProbeResult,
    ScorerFigures,
    SourceMetrics,
    SourceProbe,
    source_metrics,
    source_probe,
    source_verdict,
)
from cxr_monai.predictor import Predictor

COVID, NORMAL, PNEUMONIA = 0, 1, 2


def hand_built(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """Three sources like the real data: "covid" (COVID-19 + Pneumonia, the model separates them fairly
    well), "nih" (Normal + Pneumonia, at chance), "kaggle" (Normal only). The baseline's probabilities
    are noise. Two images per patient."""
    rng = np.random.default_rng(seed)
    labels = [COVID] * 20 + [PNEUMONIA] * 14 + [NORMAL] * 16 + [PNEUMONIA] * 16 + [NORMAL] * 10
    sources = ["covid"] * 34 + ["nih"] * 32 + ["kaggle"] * 10
    y = np.asarray(labels)
    logits = rng.normal(0, 1, (len(y), 3))
    covid = np.arange(34)
    logits[covid, y[covid]] += 2.0  # signal inside "covid" only
    model = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    baseline = rng.dirichlet(np.ones(3), len(y))
    groups = [f"{s}-{i // 2}" for i, s in enumerate(sources)]
    return y, model, baseline, sources, groups


def test_within_source_figures_equal_sklearn_on_the_subset() -> None:
    y, model, baseline, sources, groups = hand_built()
    by_source = {s.source: s for s in source_metrics(y, model, sources, baseline, groups=groups, n_boot=0)}
    assert list(by_source) == ["covid", "kaggle", "nih"]
    for name, classes in (("covid", (COVID, PNEUMONIA)), ("nih", (NORMAL, PNEUMONIA))):
        s = by_source[name]
        rows = np.flatnonzero(np.asarray(sources) == name)
        assert s.classes == tuple(("COVID-19", "Normal", "Pneumonia")[c] for c in classes)
        assert s.n_patients == len(rows) // 2
        for scorer, prob in ((s.model, model), (s.baseline, baseline)):
            assert scorer is not None
            assert scorer.accuracy.value == pytest.approx(np.mean(prob[rows].argmax(1) == y[rows]))
            recall = recall_score(y[rows], prob[rows].argmax(1), labels=list(classes), average=None)
            assert [scorer.recall[n].value for n in s.classes] == pytest.approx(recall)
            # among the source's own classes only: a call of the third class cannot count
            among = np.asarray(classes)[prob[rows][:, classes].argmax(1)]
            assert scorer.within_accuracy is not None
            assert scorer.within_accuracy.value == pytest.approx(np.mean(among == y[rows]))
            for c, cname in zip(classes, s.classes, strict=True):
                # the probability of c renormalised over the source's own classes
                expected = roc_auc_score(y[rows] == c, prob[rows, c] / prob[rows][:, classes].sum(1))
                assert scorer.auroc[cname].value == pytest.approx(expected)
        assert s.gap is not None
        for cname in s.classes:
            assert s.gap.auroc[cname].value == pytest.approx(
                s.model.auroc[cname].value - s.baseline.auroc[cname].value  # type: ignore[union-attr,operator]
            )
    kaggle = by_source["kaggle"]
    assert kaggle.classes == ("Normal",) and kaggle.model.within_accuracy is None and kaggle.model.auroc == {}
    assert kaggle.to_dict()["model"]["within_source"] is None
    assert by_source["covid"].model.auroc["COVID-19"].value > 0.8  # type: ignore[operator]


def test_three_class_source_gets_pairwise_aurocs_equal_to_sklearn_on_each_pair() -> None:
    rng = np.random.default_rng(4)
    y = np.asarray([COVID] * 15 + [NORMAL] * 6 + [PNEUMONIA] * 12 + [NORMAL] * 8 + [PNEUMONIA] * 8)
    sources = ["covid"] * 33 + ["nih"] * 16
    logits = rng.normal(0, 1, (len(y), 3))
    logits[np.arange(len(y)), y] += 1.0
    model = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    baseline = rng.dirichlet(np.ones(3), len(y))
    covid, nih = source_metrics(y, model, sources, baseline, n_boot=50)
    rows = np.arange(33)
    pairs = {"COVID-19 vs Normal": (COVID, NORMAL), "COVID-19 vs Pneumonia": (COVID, PNEUMONIA)}
    pairs["Normal vs Pneumonia"] = (NORMAL, PNEUMONIA)
    assert list(covid.model.pairwise) == list(pairs)
    for name, (a, b) in pairs.items():
        pair = rows[np.isin(y[rows], (a, b))]
        for scorer, prob in ((covid.model, model), (covid.baseline, baseline)):
            assert scorer is not None
            expected = roc_auc_score(y[pair] == a, prob[pair, a] / (prob[pair, a] + prob[pair, b]))
            assert scorer.pairwise[name].value == pytest.approx(expected)
        est = covid.model.pairwise[name]  # with its bootstrap interval around the point estimate
        assert est.ci_low is not None and est.ci_high is not None and est.value is not None
        assert est.ci_low <= est.value <= est.ci_high
    assert covid.to_dict()["model"]["within_source"]["pairwise_auroc"].keys() == pairs.keys()
    assert nih.model.pairwise == {} and nih.to_dict()["model"]["within_source"]["pairwise_auroc"] == {}
    labels = [t.get_text() for t in source_figure([covid, nih]).axes[1].get_yticklabels()]
    assert labels[3:6] == [
        "covid: COVID-19 vs Normal (n=15 vs 6)",
        "covid: COVID-19 vs Pneumonia (n=15 vs 12)",
        "covid: Normal vs Pneumonia (n=6 vs 12)",
    ]


def test_within_source_interval_is_the_shared_patient_bootstrap() -> None:
    y, model, baseline, sources, groups = hand_built(seed=1)
    covid = source_metrics(y, model, sources, baseline, groups=groups, n_boot=200, seed=7)[0]
    rows = np.flatnonzero(np.asarray(sources) == "covid")
    yc, pc, gc = y[rows], model[rows], [groups[i] for i in rows]

    def auroc(idx: np.ndarray) -> np.ndarray:
        positive = yc[idx] == COVID
        ok = 0 < positive.sum() < positive.size
        score = pc[idx, COVID] / pc[idx][:, (COVID, PNEUMONIA)].sum(1)
        return np.array([roc_auc_score(positive, score) if ok else np.nan])

    low, high = bootstrap_interval(auroc, len(rows), n_boot=200, seed=7, groups=gc)
    est = covid.model.auroc["COVID-19"]
    assert (est.ci_low, est.ci_high) == pytest.approx((low[0], high[0]))
    assert est.ci_low < est.value < est.ci_high  # type: ignore[operator]
    # patients resampled whole: much wider than an image bootstrap when each patient's images repeat
    twice = source_metrics(
        np.repeat(yc, 4), np.repeat(pc, 4, axis=0), ["covid"] * 4 * len(rows), n_boot=200, seed=7
    )[0].model.auroc["COVID-19"]
    assert (twice.ci_high - twice.ci_low) < 0.7 * (est.ci_high - est.ci_low)  # type: ignore[operator]


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="expected y_true"):
        source_metrics(np.array([0, 1]), np.ones((2, 3)) / 3, ["a"])
    with pytest.raises(ValueError, match="baseline probabilities"):
        source_metrics(np.array([0, 1]), np.ones((2, 3)) / 3, ["a", "a"], np.ones((3, 3)) / 3)


def test_probe_equals_cross_val_score_and_sees_source_only_when_features_carry_it() -> None:
    rng = np.random.default_rng(0)
    sources = ["a"] * 30 + ["b"] * 20 + ["c"] * 10
    groups = [f"p{i // 2}" for i in range(60)]
    which = np.searchsorted(["a", "b", "c"], sources)
    telling = rng.normal(0, 1, (60, 8)) + 3.0 * np.eye(3, 8)[which]
    noise = rng.normal(0, 1, (60, 8))
    probe = source_probe(telling, sources, noise, groups=groups, seed=3)
    assert probe.n_splits == 5 and probe.unit == "patient"
    assert probe.majority_rate == pytest.approx(0.5)
    assert probe.n_per_source == {"a": 30, "b": 20, "c": 10}
    for features, result in ((telling, probe.model), (noise, probe.baseline)):
        expected = cross_val_score(
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=3)),
            features,
            sources,
            groups=groups,
            cv=StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=3),
        )
        assert result is not None and result.accuracy == pytest.approx(expected.mean())
        assert result.fold_accuracies == pytest.approx(tuple(expected))
    assert probe.model is not None and probe.model.accuracy > 0.9
    assert probe.baseline is not None and probe.baseline.accuracy < 0.65
    assert probe.headroom_share is not None and probe.headroom_share > 0.8
    # five patients in source c (10 images, two each): folds limited by it, not by the default
    assert source_probe(telling, sources, groups=groups, max_splits=9).n_splits == 5


def test_probe_needs_two_sources_with_two_patients() -> None:
    x = np.random.default_rng(0).normal(size=(6, 3))
    one = source_probe(x, ["a"] * 6)
    assert one.model is None and one.note == "only one source among the evaluated images"
    few = source_probe(x, ["a"] * 4 + ["b"] * 2, groups=["p1"] * 4 + ["p2"] * 2)
    assert few.model is None and "fewer than two patients" in (few.note or "")
    assert few.to_dict()["model_features"] is None


def _source(
    name: str,
    classes: dict[str, int],
    model: dict[str, Estimate],
    baseline: dict[str, Estimate] | None = None,
    gap: dict[str, Estimate] | None = None,
    pairwise: tuple[dict[str, Estimate], dict[str, Estimate], dict[str, Estimate]] | None = None,
) -> SourceMetrics:
    """A hand-built source: AUROCs as given (baseline and paired gap optional; pairwise AUROCs of model,
    baseline and gap for a three-class source), other figures 0.7."""

    def figures(auroc: dict[str, Estimate] | None, pairs: dict[str, Estimate]) -> ScorerFigures | None:
        if auroc is None:
            return None
        within = Estimate(0.7) if len(auroc) >= 2 else None
        return ScorerFigures(Estimate(0.7), {c: Estimate(0.7) for c in classes}, within, auroc, pairs)

    model_pairs, baseline_pairs, gap_pairs = pairwise or ({}, {}, {})
    model_figures = figures(model, model_pairs)
    assert model_figures is not None
    counts = {c: classes.get(c, 0) for c in ("COVID-19", "Normal", "Pneumonia")}
    return SourceMetrics(
        name, counts, 10, model_figures, figures(baseline, baseline_pairs), figures(gap, gap_pairs)
    )


def _probe(accuracy: float, majority: float = 0.5) -> SourceProbe:
    return SourceProbe({"a": 5, "b": 5}, majority, 5, "patient", ProbeResult(accuracy, (accuracy,), 8), None)


def test_verdict_branches() -> None:
    two = {"COVID-19": 10, "Pneumonia": 10}
    good = Estimate(0.9, 0.8, 0.97)
    signal = _source(
        "covid",
        two,
        {"COVID-19": good, "Pneumonia": good},
        {"COVID-19": Estimate(0.6, 0.5, 0.7), "Pneumonia": Estimate(0.6, 0.5, 0.7)},
        {"COVID-19": Estimate(0.3, 0.1, 0.4), "Pneumonia": Estimate(0.3, 0.05, 0.45)},
    )
    nih = _source(
        "nih",
        {"Normal": 10, "Pneumonia": 10},
        {"Normal": Estimate(0.62, 0.45, 0.8), "Pneumonia": Estimate(0.7, 0.55, 0.85)},
        {"Normal": Estimate(0.5, 0.4, 0.6), "Pneumonia": Estimate(0.75, 0.6, 0.9)},
        {"Normal": Estimate(0.12, -0.1, 0.3), "Pneumonia": Estimate(-0.05, -0.2, 0.1)},
    )
    # above chance and above the baseline's point estimate, but the paired gap's CI reaches 0
    close = _source(
        "kaggle",
        {"Normal": 10, "Pneumonia": 10},
        {"Normal": Estimate(0.84, 0.68, 0.96), "Pneumonia": Estimate(0.81, 0.63, 0.96)},
        {"Normal": Estimate(0.74), "Pneumonia": Estimate(0.75)},
        {"Normal": Estimate(0.1, -0.07, 0.28), "Pneumonia": Estimate(0.06, -0.1, 0.23)},
    )
    text = source_verdict([signal, nih], _probe(0.6))
    assert text[0].startswith("Disease signal within a source (model AUROC's 95% CI above 0.5 and its lead")
    # a two-class source is one comparison, judged once (both classes' AUROCs are equal in real figures)
    assert "Pneumonia vs COVID-19 in covid: AUROC 0.90 [0.80, 0.97], baseline 0.60 [0.50, 0.70]" in text[0]
    assert "COVID-19 vs Pneumonia in covid" not in " ".join(text)
    assert "Pneumonia vs Normal in nih" in text[1] and "(baseline as good)" in text[1]
    assert "Normal vs Pneumonia in nih" not in text[1]
    assert "little source information" in text[2]
    assert text[3].startswith("Disease signal shows in 1 of 2")

    text = source_verdict([close], _probe(0.6))
    assert text[0].startswith("No clear disease signal") and text[0].count("the gap's CI reaches 0") == 1

    text = source_verdict([nih], _probe(0.95))
    assert not any(t.startswith("Disease signal within") for t in text)
    assert "encodes source almost perfectly" in text[1]
    assert text[-1].startswith("Taken together the representation is mostly source")

    text = source_verdict([nih], _probe(0.75))
    assert "clearly encodes source" in text[1] and text[-1].startswith("No within-source comparison shows")

    text = source_verdict([signal], _probe(0.95))
    assert text[-1].startswith("Every within-source comparison shows disease signal, although")

    single = _source("kaggle", {"Normal": 10}, {}, {}, {})
    text = source_verdict(
        [single], SourceProbe({"kaggle": 10}, 1.0, 0, "patient", None, None, "only one source")
    )
    assert text[0].startswith("No evaluated source holds two or more classes")
    assert text[1] == "Source probe not run: only one source."

    three = {"COVID-19": 10, "Normal": 10, "Pneumonia": 10}
    pairs = {"COVID-19 vs Normal": good, "COVID-19 vs Pneumonia": Estimate(0.9), "Normal vs Pneumonia": good}
    no_baseline = _source("covid", three, {c: good for c in three}, pairwise=(pairs, {}, {}))
    text = source_verdict([no_baseline], None)
    assert text[0].startswith("Disease signal within a source (model AUROC's 95% CI above 0.5):")
    assert "(no CI)" in text[1] and "No disease-blind baseline was scored" in text[2]


def test_source_figure_is_written(tmp_path: Path) -> None:
    y, model, baseline, sources, groups = hand_built()
    by_source = source_metrics(y, model, sources, baseline, groups=groups, n_boot=50)
    fig = source_figure(by_source, "test")
    assert [ax.get_title() for ax in fig.axes] == [
        "per source",
        "within source (one-vs-rest and class pairs, on the source's images)",
    ]
    labels = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    assert labels == [
        "covid: COVID-19 vs rest (n=20)",
        "covid: Pneumonia vs rest (n=14)",
        "nih: Normal vs rest (n=16)",
        "nih: Pneumonia vs rest (n=16)",
    ]
    path = save_png(fig, tmp_path / "sources.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 1000
    single = source_figure(by_source[1:2])  # kaggle only: no within-source panel
    assert not single.axes[1].axison


def test_predictor_features_are_the_heads_pooled_input(tmp_path: Path) -> None:
    bundle = make_trained_bundle(tmp_path / "bundle", spatial_size=32)
    images = [item["image"] for item in make_items(tmp_path / "images", 5)]
    predictor = Predictor.from_bundle(bundle, device="cpu")
    probs, features = predictor.predict_with_features(images, batch_size=2)
    assert probs.shape == (5, 3) and features.shape == (5, 4)
    np.testing.assert_allclose(
        probs, np.stack([p.probabilities for p in predictor.predict(images)]), atol=1e-6
    )
    batch = torch.stack([torch.as_tensor(predictor.preprocess(path)) for path in images])
    with torch.no_grad():
        expected = predictor.model.features(batch).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-6)
    assert not predictor.model.head._forward_pre_hooks  # the hook is removed again

    headless = Predictor(
        nn.Sequential(nn.Flatten(), nn.LazyLinear(3)), backbone="x", spatial_size=32, device="cpu"
    )
    with pytest.raises(BundleError, match="no 'head' module"):
        headless.predict_with_features(images)


def test_verdict_judges_a_three_class_source_pair_by_pair() -> None:
    three = {"COVID-19": 10, "Normal": 4, "Pneumonia": 8}
    rest = {c: Estimate(0.7, 0.55, 0.85) for c in three}
    model = {"COVID-19 vs Normal": Estimate(0.6, 0.4, 0.8), "COVID-19 vs Pneumonia": Estimate(0.9, 0.8, 0.97)}
    model["Normal vs Pneumonia"] = Estimate(0.7, 0.52, 0.88)
    baseline = {pair: Estimate(0.55, 0.4, 0.7) for pair in model}
    gap = {pair: Estimate(0.3, 0.1, 0.5) for pair in model}
    covid = _source("covid", three, rest, rest, rest, (model, baseline, gap))
    text = source_verdict([covid], _probe(0.6))
    assert "COVID-19 vs Pneumonia in covid: AUROC 0.90 [0.80, 0.97], baseline 0.55 [0.40, 0.70]" in text[0]
    assert "COVID-19 vs Normal in covid: AUROC 0.60 [0.40, 0.80]" in text[1]
    assert "CI reaches chance" in text[1]
    assert "Normal vs Pneumonia in covid" in text[0]
    assert " + " not in " ".join(text)  # no one-vs-rest comparison judged in a three-class source
    assert text[-1].startswith("Disease signal shows in 2 of 3")
