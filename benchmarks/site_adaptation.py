"""How many labelled films of its own does a new hospital need before the model reads its films?

Leave-NIH-out is the stand-in for a hospital the public data does not hold: without NIH in training, the
frozen-Lite2 recipe calls NIH's adult Normal films COVID-19 (Normal recall about 0.02) and does not rank
NIH's Pneumonia above its Normal films (AUROC about 0.5). Here k of NIH's training-split films (k/2 per
class, drawn at random, ``--repeats`` draws per k) join the other sources' training-split images, the
paper's head is trained on the frozen features as ``cxr-monai train --cache-trunk-features`` trains it,
and every NIH film not drawn (one film per patient, so no patient is on both sides) is scored: what a site
gets from `cxr-monai prepare --site-csv` with k of its own labelled films.

Features: the ``Lite2 260 px`` file of ``benchmarks/frozen_feature_variants.py`` (same ``--cache-dir``).

Usage::

    python benchmarks/site_adaptation.py --datalist out/prep/datalist.json --cache-dir /tmp/frozen_features \
        --out benchmarks/results/site_adaptation.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _results import command_line, write_results
from frozen_feature_variants import (
    LITE2,
    NIH,
    NORMAL,
    PNEUMONIA,
    load_items,
    pair_auroc,
    paper_head,
    variant_features,
)

from cxr_monai.constants import CLASS_NAMES


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datalist", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "site_adaptation.md")
    parser.add_argument("--sizes", default="0,10,20,40,80,160", help="Numbers k of the site's own films.")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_items(args.datalist)
    y, sources, is_train = data.y, data.sources, data.is_train
    x = variant_features(data.items, ((*LITE2, "l8"),), False, args.cache_dir)
    others = np.flatnonzero(is_train & (sources != NIH))
    site = {
        label: np.flatnonzero(is_train & (sources == NIH) & (y == label)) for label in (NORMAL, PNEUMONIA)
    }
    everything_site = np.flatnonzero(sources == NIH)

    rows = []
    for k in [int(v) for v in args.sizes.split(",")]:
        per_class = min(k // 2, *(len(v) for v in site.values()))
        results = []
        for repeat in range(args.repeats if k else 1):
            rng = np.random.default_rng(repeat)
            drawn = np.concatenate([rng.choice(site[c], per_class, replace=False) for c in site]).astype(int)
            fit = np.concatenate([others, drawn])
            scored = np.setdiff1d(everything_site, drawn)
            prob = paper_head(x[fit], y[fit], x[scored])
            called = prob.argmax(axis=1)
            truth = y[scored]
            results.append(
                [
                    float(np.mean(called[truth == NORMAL] == NORMAL)),
                    float(np.mean(called[truth == PNEUMONIA] == PNEUMONIA)),
                    float(np.mean(called == truth)),
                    float(np.mean(called == CLASS_NAMES.index("COVID-19"))),
                    pair_auroc(prob, truth, sources[scored], NIH, PNEUMONIA, NORMAL),
                    len(scored),
                ]
            )
        table = np.asarray(results)
        mean, sd = (
            table.mean(axis=0),
            table.std(axis=0, ddof=1) if len(table) > 1 else np.zeros(table.shape[1]),
        )
        cells = [
            f"{m:.3f} ± {s:.3f}" if len(table) > 1 else f"{m:.3f}"
            for m, s in zip(mean[:5], sd[:5], strict=True)
        ]
        rows.append(f"| {2 * per_class} | {len(table)} | {int(mean[5])} | " + " | ".join(cells) + " |")
        print(rows[-1])

    write_results(
        args.out,
        [
            "# Site adaptation: a new hospital's own labelled films (leave-NIH-out as the new hospital)",
            "",
            "The frozen EfficientNet-Lite2 ImageNet trunk at 260 px, the paper's head trained on the pooled "
            "features (Adam 1e-3, batch 16, 30 epochs) on the training split of covid-chestxray-dataset "
            "and Kaggle plus k NIH training-split films (half Normal, half Pneumonia, drawn at random); "
            "scored on every NIH film not drawn. Mean ± sd over the draws.",
            "",
            "| k (site films in training) | draws | NIH films scored | NIH Normal called Normal | NIH "
            "Pneumonia called Pneumonia | NIH accuracy | NIH films called COVID-19 | NIH Pneumonia vs Normal "
            "AUROC |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Command: `{command_line()}`",
            "",
        ],
    )


if __name__ == "__main__":
    main()
