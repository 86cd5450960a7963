"""Per-site calibration of a trained model on a hospital it never saw: which method, how many labelled films?

Leave-one-source-out for each of the three sources: the paper's head (dense 64, ReLU, dropout 0.5, dense 3;
``paper_head`` of ``frozen_feature_variants.py``, trained as ``cxr-monai train --cache-trunk-features``
trains it, seed 0) is trained on the frozen EfficientNet-Lite2 260 px pooled features of the *other* two
sources' training-split films; the left-out source S plays the new hospital, and every one of its films
(training and test split) gets the head's probabilities. That head is fixed for S. Then, for k labelled
films per class of S (``--sizes``; capped so that at least :data:`MIN_LEFT` patients of each class stay
to be scored), ``--draws`` random draws each, k patients per class are drawn (one film each), every method
is fitted on the drawn films and scored on every film of S whose patient was not drawn. Methods:

* ``none``: the head's own probabilities;
* ``em-prior`` (no labels): S's class priors re-estimated by EM (Saerens et al. 2002) from all of S's
  films' probabilities; training priors = the class shares of the head's training films (add-one
  smoothed, so that a class the head never saw, COVID-19 when covid-chestxray-dataset is left out, has
  a prior above 0);
* ``feature-centring`` (no labels): S's pooled features shifted so their mean is the training films'
  mean feature, then the same head;
* ``temperature`` / ``bias`` / ``vector``: one shared scale and a per-class bias (the default of
  ``cxr-monai site calibrate``) / a per-class logit bias / vector scaling (``cxr_monai.site.calibration``)
  on the drawn films;
* ``temperature+threshold``: ``temperature`` then ``with_operating_point`` for the target Normal recall
  >= 0.8 on the drawn films;
* ``centring+bias`` (an extra): ``feature-centring``, then ``bias`` fitted on the drawn films;
* ``head-retrain``: the head retrained on the other sources' films plus the drawn films (today's recipe;
  ``--retrain-draws`` of the draws only, it is the slow one).

The label-free methods are reported at k = 0 (on all of S's films); ``none`` is repeated at every k on
the same scored films as the labelled methods. Figures: recall of each class S holds, accuracy,
within-site AUROC (two classes: one against the other on the renormalised pair, as ``pair_auroc``; three:
macro one-vs-rest), top-label ECE, share of films called COVID-19, mean +- sd over the draws, and the wall
time of one fit.

Features: the ``Lite2 260 px`` file of ``benchmarks/frozen_feature_variants.py`` (same ``--cache-dir``).

Usage::

    python benchmarks/site_calibration.py --datalist out/prep/datalist.json --cache-dir /tmp/frozen_features \
        --out benchmarks/results/site_calibration.md
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _results import command_line, write_results
from frozen_feature_variants import (
    COVID,
    COVID_SOURCE,
    KAGGLE,
    LITE2,
    NIH,
    NORMAL,
    load_items,
    pair_auroc,
    paper_head,
    variant_features,
)
from sklearn.metrics import roc_auc_score

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data.datalist import load_datalist
from cxr_monai.evaluation.metrics import expected_calibration_error
from cxr_monai.site.calibration import (
    FITTERS,
    LOG_SCALE_PRIOR_SD,
    LogitCalibration,
    fit_em_priors,
    with_operating_point,
)

SOURCES = (COVID_SOURCE, KAGGLE, NIH)
LABEL_FREE = ("none", "em-prior", "feature-centring")
LABELLED = ("none", "temperature", "bias", "vector", "temperature+threshold", "centring+bias", "head-retrain")
#: The operating point of ``temperature+threshold``: (class, recall on the drawn films).
TARGET = (NORMAL, 0.8)
TARGET_TEXT = "Normal:recall>=0.8"
#: Patients of each class left to score at the largest k.
MIN_LEFT = 4
#: The issue's targets for leave-NIH-out with 5 labelled NIH films per class.
ISSUE_K = 5


@dataclass(frozen=True)
class Site:
    """The left-out source: its films' features, labels, patient groups, and the fixed head's outputs."""

    name: str
    x: np.ndarray  # (M, F) features of all of S's films
    y: np.ndarray  # (M,) labels
    groups: np.ndarray  # (M,) patient groups
    prob: np.ndarray  # (M, K) the head's probabilities
    prob_centred: np.ndarray  # (M, K) the same head on the centred features
    x_train: np.ndarray  # the head's training films
    y_train: np.ndarray
    head_ms: float

    @property
    def classes(self) -> list[int]:
        return sorted(int(c) for c in np.unique(self.y))


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    value = fn()
    return value, 1000 * (time.perf_counter() - start)


def make_site(name: str, x: np.ndarray, y: np.ndarray, sources: np.ndarray, groups, is_train) -> Site:
    """Train the head on the other sources' training-split films; score S's films raw and centred."""
    train, site = is_train & (sources != name), sources == name
    shift = x[train].mean(axis=0) - x[site].mean(axis=0)
    both, head_ms = timed(lambda: paper_head(x[train], y[train], np.concatenate([x[site], x[site] + shift])))
    m = int(site.sum())
    return Site(name, x[site], y[site], groups[site], both[:m], both[m:], x[train], y[train], head_ms)


def training_priors(y_train: np.ndarray) -> np.ndarray:
    """Add-one smoothed class shares of the head's training films."""
    counts = np.bincount(y_train, minlength=len(CLASS_NAMES)).astype(np.float64)
    return (counts + 1) / (counts.sum() + len(counts))


def site_auroc(prob: np.ndarray, y: np.ndarray, classes: list[int]) -> float:
    """Two classes: one against the other on the renormalised pair; more: macro one-vs-rest."""
    present = [c for c in classes if (y == c).any()]
    if len(present) < 2:
        return float("nan")
    if len(present) == 2:
        return pair_auroc(prob, y, np.full(len(y), "site"), "site", present[1], present[0])
    return float(np.mean([roc_auc_score(y == c, prob[:, c]) for c in present]))


def figures(prob: np.ndarray, y: np.ndarray, classes: list[int], fit_ms: float) -> dict[str, float]:
    called = prob.argmax(axis=1)
    out = {f"recall {CLASS_NAMES[c]}": float(np.mean(called[y == c] == c)) for c in classes}
    out |= {
        "accuracy": float(np.mean(called == y)),
        "AUROC": site_auroc(prob, y, classes),
        "ECE": expected_calibration_error(y, prob),
        "called COVID-19": float(np.mean(called == COVID)),
        "mean confidence": float(np.mean(prob.max(axis=1))),
        "fit ms": fit_ms,
        "scored": float(len(y)),
    }
    return out


def pure_groups(site: Site, c: int) -> list[str]:
    """The patients all of whose films are of class ``c`` (the only ones drawn, so that drawing a patient
    for one class never takes another class's films out of scoring)."""
    mixed = set(site.groups[site.y != c].tolist())
    return sorted(set(site.groups[site.y == c].tolist()) - mixed)


def per_class_sizes(site: Site, k: int) -> dict[int, int]:
    """k capped per class so that at least MIN_LEFT of the class's patients stay to be scored."""
    return {
        c: max(0, min(k, len(pure_groups(site, c)), len(np.unique(site.groups[site.y == c])) - MIN_LEFT))
        for c in site.classes
    }


def draw(site: Site, sizes: dict[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(drawn film indices, scored film indices): sizes[c] patients per class, one film each; every film
    of a drawn patient is left out of scoring."""
    taken: list[str] = []
    drawn = []
    for c, n in sizes.items():
        for group in rng.choice(pure_groups(site, c), n, replace=False).tolist():
            taken.append(group)
            drawn.append(int(rng.choice(np.flatnonzero(site.groups == group))))
    scored = np.flatnonzero(~np.isin(site.groups, taken))
    return np.asarray(drawn, dtype=int), scored


def label_free(site: Site) -> dict[str, dict[str, float]]:
    """k = 0: the head, EM priors and feature centring on all of S's films."""
    priors = training_priors(site.y_train)
    em, em_ms = timed(lambda: fit_em_priors(site.prob, priors))
    assert isinstance(em, LogitCalibration)
    _, centre_ms = timed(lambda: site.x - site.x.mean(axis=0) + site.x_train.mean(axis=0))
    return {
        "none": figures(site.prob, site.y, site.classes, 0.0),
        "em-prior": figures(em.apply(site.prob), site.y, site.classes, em_ms),
        "feature-centring": figures(site.prob_centred, site.y, site.classes, centre_ms),
    }


def labelled(site: Site, drawn: np.ndarray, scored: np.ndarray, retrain: bool) -> dict[str, dict[str, float]]:
    """One draw: every labelled method fitted on ``drawn`` and scored on ``scored``."""
    p_fit, y_fit, p_new, y_new = site.prob[drawn], site.y[drawn], site.prob[scored], site.y[scored]
    out = {"none": figures(p_new, y_new, site.classes, 0.0)}
    for name in ("temperature", "bias", "vector"):
        cal, ms = timed(lambda name=name: FITTERS[name](p_fit, y_fit))
        assert isinstance(cal, LogitCalibration)
        out[name] = figures(cal.apply(p_new), y_new, site.classes, ms)
        if name == "temperature":
            pointed, extra = timed(lambda cal=cal: with_operating_point(cal, p_fit, y_fit, *TARGET))
            assert isinstance(pointed, LogitCalibration)
            out["temperature+threshold"] = figures(pointed.apply(p_new), y_new, site.classes, ms + extra)
    cal, ms = timed(lambda: FITTERS["bias"](site.prob_centred[drawn], y_fit))
    assert isinstance(cal, LogitCalibration)
    out["centring+bias"] = figures(cal.apply(site.prob_centred[scored]), y_new, site.classes, ms)
    if retrain:
        x_fit = np.concatenate([site.x_train, site.x[drawn]])
        y_all = np.concatenate([site.y_train, y_fit])
        prob, ms = timed(lambda: paper_head(x_fit, y_all, site.x[scored]))
        assert isinstance(prob, np.ndarray)
        out["head-retrain"] = figures(prob, y_new, site.classes, ms)
    return out


def summarise(runs: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and sd (ddof 1; 0 for one run) of each figure over the draws."""
    keys = runs[0].keys()
    table = {key: np.asarray([run[key] for run in runs]) for key in keys}
    return {
        key: (float(np.nanmean(v)), float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0)
        for key, v in table.items()
    }


def cell(mean: float, sd: float, many: bool, digits: int = 3) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if many else f"{mean:.{digits}f}"


def group_bootstrap_auroc(site: Site, n: int = 1000) -> tuple[float, float]:
    """95 % patient-bootstrap interval of the head's own within-site AUROC (k = 0, ``none``)."""
    rng = np.random.default_rng(0)
    names = np.unique(site.groups)
    rows = {g: np.flatnonzero(site.groups == g) for g in names}
    values = []
    for _ in range(n):
        take = np.concatenate([rows[g] for g in rng.choice(names, len(names), replace=True)])
        value = site_auroc(site.prob[take], site.y[take], site.classes)
        if not np.isnan(value):
            values.append(value)
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def source_table(site: Site, results: dict[int, dict], sizes: dict[int, dict[int, int]]) -> list[str]:
    held = [f"recall {CLASS_NAMES[c]}" for c in site.classes]
    keys = [*held, "accuracy", "AUROC", "ECE", "called COVID-19"]
    classes_text = "/".join(CLASS_NAMES[c] for c in site.classes)
    lines = [
        f"| k per class ({classes_text}) | method | draws | films scored | "
        + " | ".join(keys)
        + " | fit ms (median) |",
        "|" + "---|" * (len(keys) + 5),
    ]
    for k, by_method in results.items():
        k_text = "0" if k == 0 else "/".join(str(sizes[k][c]) for c in site.classes)
        for method, runs in by_method.items():
            stats, many = summarise(runs), len(runs) > 1
            values = [cell(*stats[key], many) for key in keys]
            lines.append(
                f"| {k_text} | {method} | {len(runs)} | {stats['scored'][0]:.0f} | "
                + " | ".join(values)
                + f" | {np.median([run['fit ms'] for run in runs]):.1f} |"
            )
    return lines


def issue_targets(results: dict[int, dict]) -> list[str]:
    """Leave-NIH-out, 5 labelled films per class: called COVID-19 <= 0.10, Normal recall >= 0.45,
    ECE <= 0.10."""
    lines = [
        "| method | k | NIH called COVID-19 (≤ 0.10) | NIH Normal recall (≥ 0.45) | ECE at the site (≤ 0.10) "
        "| meets all three |",
        "|---|---|---|---|---|---|",
    ]
    rows = [(0, m, results[0][m]) for m in LABEL_FREE]
    if ISSUE_K in results:
        rows += [(ISSUE_K, m, runs) for m, runs in results[ISSUE_K].items()]
    for k, method, runs in rows:
        stats = summarise(runs)
        covid, normal, ece = (stats[key][0] for key in ("called COVID-19", "recall Normal", "ECE"))
        marks = [covid <= 0.10, normal >= 0.45, ece <= 0.10]
        texts = [
            f"{v:.3f} {'yes' if ok else 'no'}" for v, ok in zip((covid, normal, ece), marks, strict=True)
        ]
        lines.append(f"| {method} | {k} | " + " | ".join(texts) + f" | {'yes' if all(marks) else 'no'} |")
    if ISSUE_K in results:
        labelled_stats = [summarise(runs) for m, runs in results[ISSUE_K].items() if m != "none"]
        confidence = [st["mean confidence"][0] for st in labelled_stats]
        accuracy = [st["accuracy"][0] for st in labelled_stats]
        lines += [
            "",
            f"Confidence against accuracy at k = {ISSUE_K}: the labelled methods' mean top-label "
            f"confidence at NIH is {min(confidence):.2f} to {max(confidence):.2f}, their accuracy "
            f"{min(accuracy):.2f} to {max(accuracy):.2f}. With the site's ranking at chance, a calibrated "
            "model can only answer about 0.5 on every film: a bias cannot make a confident head unsure; "
            f"temperature and vector scaling can shrink its scale (log-scale prior sd {LOG_SCALE_PRIOR_SD}).",
        ]
    return lines


def _finite(value: object) -> object:
    """``value`` with floats rounded to 6 decimals and NaN replaced by None (strict JSON)."""
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float):
        return None if np.isnan(value) else round(value, 6)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datalist", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, required=True, help="Feature files (reused when present).")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "site_calibration.md")
    parser.add_argument("--sizes", default="0,2,5,10,20,50", help="Labelled films per class of the site.")
    parser.add_argument("--draws", type=int, default=20, help="Random draws per k > 0.")
    parser.add_argument(
        "--retrain-draws", type=int, default=None, help="Draws of head-retrain (default: all of --draws)."
    )
    parser.add_argument("--sources", default=",".join(SOURCES), help="Sources to leave out in turn.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    retrain_draws = args.draws if args.retrain_draws is None else args.retrain_draws
    sizes_k = [int(v) for v in args.sizes.split(",")]

    data = load_items(args.datalist)
    datalist = load_datalist(args.datalist)
    groups = np.asarray(
        [str(i.get("group") or i.get("patient_id")) for i in datalist["training"] + datalist["test"]]
    )
    x = variant_features(data.items, ((*LITE2, "l8"),), False, args.cache_dir)

    report: dict[str, dict] = {}
    tables: list[str] = []
    targets: list[str] = []
    for source_index, name in enumerate(args.sources.split(",")):
        site = make_site(name, x, data.y, data.sources, groups, data.is_train)
        results: dict[int, dict[str, list[dict[str, float]]]] = {}
        sizes: dict[int, dict[int, int]] = {}
        for k in sizes_k:
            if k == 0:
                results[0] = {m: [f] for m, f in label_free(site).items()}
                continue
            sizes[k] = per_class_sizes(site, k)
            if any(sizes[k] == sizes[j] for j in sizes if j != k):
                del sizes[k]  # capped to the same draw as a smaller k
                continue
            runs: dict[str, list[dict[str, float]]] = {m: [] for m in LABELLED}
            for d in range(args.draws):
                rng = np.random.default_rng([source_index, k, d])
                drawn, scored = draw(site, sizes[k], rng)
                for method, figs in labelled(site, drawn, scored, d < retrain_draws).items():
                    runs[method].append(figs)
            results[k] = {m: v for m, v in runs.items() if v}
            print(f"{name} k={k}: {time.perf_counter() - started:.0f} s", flush=True)
        low, high = group_bootstrap_auroc(site)
        auroc0 = results[0]["none"][0]["AUROC"]
        report[name] = {
            "classes": [CLASS_NAMES[c] for c in site.classes],
            "films": len(site.y),
            "head_training_films": len(site.y_train),
            "head_training_ms": site.head_ms,
            "training_priors": training_priors(site.y_train).tolist(),
            "auroc_k0_none_95ci": [low, high],
            "sizes_per_class": {str(k): {CLASS_NAMES[c]: n for c, n in s.items()} for k, s in sizes.items()},
            "results": {
                str(k): {m: {"draws": runs, "summary": summarise(runs)} for m, runs in by_m.items()}
                for k, by_m in results.items()
            },
        }
        chance = low <= 0.5 <= high
        tables += [
            f"## Left out: {name} ({len(site.y)} films; classes {', '.join(report[name]['classes'])})",
            "",
            f"Head trained on {len(site.y_train)} training-split films of the other sources "
            f"({site.head_ms / 1000:.1f} s). The head's own within-site AUROC (k = 0, `none`): {auroc0:.3f}, "
            f"95 % patient-bootstrap interval {low:.3f} to {high:.3f}"
            + (
                ": **at chance — calibration cannot fix ranking**; only `vector` and `head-retrain` can "
                "change it, and only `head-retrain` learns anything new."
                if chance
                else "."
            ),
            "",
            *source_table(site, results, sizes),
            "",
        ]
        if name == NIH:
            targets = issue_targets(results)

    elapsed = time.perf_counter() - started
    json_path = args.out.with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(
        json.dumps(
            _finite(
                {
                    "command": command_line(),
                    "seconds": elapsed,
                    "cpu_count": os.cpu_count(),
                    "load_average_start_end": [load_start, os.getloadavg()[0]],
                    "sources": report,
                }
            )
        )
    )
    write_results(
        args.out,
        [
            "# Per-site calibration on a hospital the model never saw (leave-one-source-out)",
            "",
            "The frozen EfficientNet-Lite2 ImageNet trunk at 260 px; the paper's head (dense 64, ReLU, "
            "dropout 0.5, dense 3; Adam 1e-3, batch 16, 30 epochs, seed 0) trained on the pooled features "
            "of the other two sources' training-split films, then fixed. The left-out source is the new "
            "hospital: all its films (training and test split) get the head's probabilities. For k "
            "labelled films per class (k patients, one film each, drawn at random among the patients "
            "whose films all hold that class; capped so that "
            f"{MIN_LEFT} patients of each class stay to be scored; `k per class` gives the drawn counts "
            "in the class order of the header), each method is fitted on the drawn films and scored on "
            "every film whose patient was not drawn. Label-free methods at k = 0 on all the site's films: "
            "`em-prior` (Saerens et al. 2002 EM on all the site's probabilities; training priors = "
            "add-one smoothed class shares of the head's training films), `feature-centring` (the site's "
            "mean feature moved onto the training films' mean, same head). Labelled: `temperature` (one "
            "shared scale and a per-class bias, the default of `cxr-monai site calibrate`), `bias`, `vector` "
            "(vector scaling), `temperature+threshold` (`temperature`, then `with_operating_point` for the "
            "target "
            f"`{TARGET_TEXT}` on the drawn films), `centring+bias` (`feature-centring`, then `bias`), "
            "`head-retrain` (the head retrained with the drawn films "
            f"added; {retrain_draws} of the {args.draws} draws). `none` is repeated at every k on the "
            "same scored films. Mean ± sd over the draws. AUROC within the site: one class against the "
            "other on the renormalised pair (two classes), macro one-vs-rest (three). ECE: top-label, "
            "15 bins. `fit ms`: the median wall time of one fit over the draws (the "
            "`temperature+threshold` time includes its `temperature` fit; `head-retrain` includes "
            "training and scoring).",
            "",
            "## The issue's targets (leave-NIH-out, 5 labelled NIH films per class; means over the draws)",
            "",
            *targets,
            "",
            *tables,
            f"Machine: {os.cpu_count()} CPU cores, torch threads {args.threads}, shared with other jobs "
            f"(1-minute load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end); "
            f"total run time {elapsed / 60:.1f} min (features cached beforehand). All numbers per draw: "
            f"`{json_path.name}`.",
            "",
            f"Command: `{command_line()}`",
            "",
        ],
    )


if __name__ == "__main__":
    main()
