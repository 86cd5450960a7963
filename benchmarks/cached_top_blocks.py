"""Fine-tuning Lite2's top blocks on cached maps: does the paper's second stage add disease signal?

The trunk below the top ``--blocks`` blocks stays frozen, so its output (``features[6]``: 208 x 9 x 9 at
260 px) is computed once per image and cached (float16, ``--cache-dir``); the top blocks and the paper's
head then train on it: ``--head-epochs`` with the head alone (Adam 1e-3), then ``--tune-epochs`` with the
top blocks too (Adam ``--lr``), batch 16, no augmentation. Scored like
``benchmarks/frozen_feature_variants.py``: out of fold over the training split, the test split, and
leave-NIH-out. ``--blocks 0`` is the head alone on the same maps (the main job's recipe).

Usage::

    python benchmarks/cached_top_blocks.py --datalist out/prep/datalist.json \
        --cache-dir /tmp/frozen_features --blocks 2 --out benchmarks/results/cached_top_blocks.md
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _results import command_line, write_results
from frozen_feature_variants import NIH, NORMAL, PNEUMONIA, figures, load_items, pair_auroc
from monai.data import DataLoader, Dataset

from cxr_monai.networks import CXRClassifier, build_network, load_pretrained
from cxr_monai.transforms import inference_transforms_d

#: The frozen part ends with ``features[FROZEN_LAST]``; Lite2's ``features[7]`` and ``[8]`` may train.
FROZEN_LAST = 6


def cached_maps(items: list[dict[str, Any]], net: CXRClassifier, size: int, cache: Path) -> np.ndarray:
    """(N, C, S/32, S/32) float16 output of ``features[FROZEN_LAST]`` for every item."""
    if cache.is_file():
        return np.load(cache)
    loader = DataLoader(
        Dataset([{"image": i["image"]} for i in items], inference_transforms_d(("image",), size)),
        batch_size=16,
        num_workers=1,
    )
    maps = []
    with torch.inference_mode():
        for batch in loader:
            x = net.trunk.input_scale(batch["image"].as_tensor())
            for stage in net.trunk.features[: FROZEN_LAST + 1]:
                x = stage(x)
            maps.append(x.half().numpy())
            print(f"\r{sum(len(m) for m in maps)}/{len(items)} images", end="")
    print()
    array = np.concatenate(maps)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, array)
    return array


def train_and_predict(
    base: CXRClassifier, maps: np.ndarray, y: np.ndarray, fit: np.ndarray, score: np.ndarray, args: Any
) -> np.ndarray:
    """(len(score), K) probabilities after the two stages on ``fit``'s maps (seed 0)."""
    torch.manual_seed(0)
    net = copy.deepcopy(base)
    stages = list(net.trunk.features.children())[FROZEN_LAST + 1 :]
    frozen = torch.nn.Sequential(*stages[: len(stages) - args.blocks]).eval()
    top = torch.nn.Sequential(*stages[len(stages) - args.blocks :])
    model = torch.nn.Sequential(top, net.head)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        inputs = frozen(torch.as_tensor(maps[fit], dtype=torch.float32))
        new = frozen(torch.as_tensor(maps[score], dtype=torch.float32))
    labels = torch.as_tensor(y[fit])
    optimizer = torch.optim.Adam(net.head.parameters(), lr=1e-3)
    for epoch in range(args.head_epochs + args.tune_epochs):
        tuning = epoch >= args.head_epochs
        if epoch == args.head_epochs:
            optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        for p in top.parameters():
            p.requires_grad_(tuning)
        top.train(tuning)  # frozen BatchNorm keeps its ImageNet statistics, as in the bundle
        net.head.train()
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), 16):
            batch = order[start : start + 16]
            if len(batch) < 2:  # BatchNorm cannot train on one value per channel
                continue
            loss = torch.nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return torch.softmax(model(new), dim=1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datalist", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "cached_top_blocks.md"
    )
    parser.add_argument("--blocks", type=int, choices=(0, 1, 2), default=2, help="Top blocks fine-tuned.")
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--tune-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the second stage.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_items(args.datalist)
    items, n_train, y, sources, folds = data.items, data.n_train, data.y, data.sources, data.folds
    base = build_network("efficientnet_lite2")
    load_pretrained(base, "imagenet")
    base.eval()
    maps = cached_maps(items, base, 260, args.cache_dir / "maps_l6_260.npy")

    train = np.arange(n_train)
    oof = np.zeros((n_train, 3))
    for fold in np.unique(folds):
        oof[folds == fold] = train_and_predict(
            base, maps, y, train[folds != fold], train[folds == fold], args
        )
    test = train_and_predict(base, maps, y, train, np.arange(n_train, len(items)), args)
    nih = np.flatnonzero(sources == NIH)
    left_out = train_and_predict(base, maps, y, train[sources[:n_train] != NIH], nih, args)
    cv, te = figures(oof, y[:n_train], sources[:n_train]), figures(test, y[n_train:], sources[n_train:])
    normal_called = float(np.mean(left_out.argmax(axis=1)[y[nih] == NORMAL] == NORMAL))
    nih_auroc = pair_auroc(left_out, y[nih], sources[nih], NIH, PNEUMONIA, NORMAL)
    cells = [*cv, te[0], te[1], te[3], normal_called, nih_auroc]
    epochs = f"{args.head_epochs} head + {args.tune_epochs} tuning epochs"
    setting = f"{args.blocks} top block(s), {epochs}, lr {args.lr}"
    row = f"| {setting} | " + " | ".join(f"{v:.3f}" for v in cells) + " |"
    header = (
        "| run | OOF accuracy | OOF COVID-19 vs Pneumonia in covid-dataset | OOF COVID-19 vs Normal in "
        "covid-dataset | OOF NIH | OOF Kaggle | test accuracy | test COVID-19 vs Pneumonia | test NIH | "
        "leave-NIH-out: NIH Normal called Normal | leave-NIH-out: NIH AUROC |"
    )
    previous = args.out.read_text().splitlines() if args.out.is_file() else []
    rows = [line for line in previous if line.startswith("| ") and not line.startswith("| run ")]
    write_results(
        args.out,
        [
            "# Fine-tuning Lite2's top blocks on cached maps (no augmentation)",
            "",
            "See the module docstring of `benchmarks/cached_top_blocks.py`. One row per run (appended).",
            "",
            header,
            "|" + "---|" * 11,
            *[r for r in rows if not r.startswith(f"| {setting} |")],
            row,
            "",
            f"Last command: `{command_line()}`",
            "",
        ],
    )


if __name__ == "__main__":
    main()
