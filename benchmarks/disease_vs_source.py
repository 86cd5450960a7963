"""Does the model see disease or the image's source? Side-by-side training runs on the three sources.

Each run trains the ``cxr_classifier`` bundle on the same fold with the same epochs and input size, then
``cxr-monai evaluate`` scores it on the test split (overall, per source, within source, beside the
disease-blind baseline, with the source probe); the leave-NIH-out run is also scored on every NIH film.
Results: ``benchmarks/results/disease_vs_source.{md,json}``. Runs on the CPU (``--threads``) or on CUDA.

Usage::

    python benchmarks/disease_vs_source.py --data ../shared/data --out out/bench_sources \\
        --epochs 10 --size 160 [--runs b0_scratch,lite0_imagenet,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

NIH = "site:nih-chestxray8"
COVID_SOURCE = "covid-chestxray-dataset"
KAGGLE = "kaggle-chest-xray"

#: name -> (description, extra `cxr-monai train` arguments)
RUNS: dict[str, tuple[str, list[str]]] = {
    "b0_scratch": ("EfficientNet-B0 from scratch, 3 sources", ["--backbone", "efficientnet_b0"]),
    "lite0_imagenet": (
        "EfficientNet-Lite0 ImageNet (offline wheel), 3 sources",
        ["--backbone", "efficientnet_lite0", "--pretrained", "imagenet"],
    ),
    "lite0_imagenet_no_nih": (
        "EfficientNet-Lite0 ImageNet, 2 sources (NIH left out: leave-one-source-out)",
        ["--backbone", "efficientnet_lite0", "--pretrained", "imagenet", "--exclude-source", NIH],
    ),
    "lite0_imagenet_224_long_head": (
        "EfficientNet-Lite0 ImageNet, 3 sources, 224 px, 8 head-only epochs then 4 fine-tuning the top 2 "
        "blocks (the linear probe on frozen 224 px features beat the 160 px fine-tuned run)",
        [
            *("--backbone", "efficientnet_lite0", "--pretrained", "imagenet"),
            # given after the common settings, these win (click keeps an option's last value)
            *("--spatial-size", "224", "--max-epochs", "12", "--freeze-epochs", "8"),
        ],
    ),
    "lite0_imagenet_frozen_224": (
        "EfficientNet-Lite0 ImageNet, 3 sources, 224 px, the trunk frozen throughout: only the paper's head "
        "trains, 15 epochs (a linear probe on frozen features beat every fine-tuned run)",
        [
            *("--backbone", "efficientnet_lite0", "--pretrained", "imagenet"),
            *("--spatial-size", "224", "--max-epochs", "15", "--freeze-epochs", "15"),
        ],
    ),
    "lite2_imagenet_frozen_260": (
        "EfficientNet-Lite2 ImageNet (offline wheel), 3 sources, its native 260 px, the trunk frozen "
        "throughout: only the paper's head trains, 10 epochs",
        [
            *("--backbone", "efficientnet_lite2", "--pretrained", "imagenet"),
            *("--spatial-size", "260", "--max-epochs", "10", "--freeze-epochs", "10"),
        ],
    ),
    "lite0_imagenet_countermeasures": (
        "EfficientNet-Lite0 ImageNet, 3 sources, border crop + histogram equalisation + strong "
        "augmentation + source x class balanced sampling",
        [
            *("--backbone", "efficientnet_lite0", "--pretrained", "imagenet", "--crop-borders"),
            *("--histogram-equalize", "--strong-augmentation", "--source-balanced"),
        ],
    ),
    "lite0_imagenet_adversarial": (
        "EfficientNet-Lite0 ImageNet, 3 sources, source-adversarial head (gradient reversal, weight 0.3)",
        ["--backbone", "efficientnet_lite0", "--pretrained", "imagenet", "--source-adversarial", "0.3"],
    ),
}


def _cli(*args: str) -> None:
    command = [sys.executable, "-c", "from cxr_monai.cli import app; app()", *args]
    print("$ cxr-monai", " ".join(args), flush=True)
    subprocess.run(command, check=True)


def _get(tree: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue's targets name, model and baseline, from one metrics.json."""
    sources = _get(metrics, "by_source", "sources") or {}

    def within(source: str, who: str, cls: str) -> Any:
        return _get(sources, source, who, "within_source", "auroc", cls)

    def pair(source: str, who: str, name: str) -> Any:
        return _get(sources, source, who, "within_source", "pairwise_auroc", name)

    return {
        "accuracy": _get(metrics, "model_metrics", "accuracy"),
        "baseline_accuracy": _get(metrics, "shortcut_check", "accuracy"),
        "covid_dataset_covid_auroc": within(COVID_SOURCE, "model", "COVID-19"),
        "covid_dataset_covid_auroc_baseline": within(COVID_SOURCE, "baseline", "COVID-19"),
        "covid_dataset_covid_vs_pneumonia_auroc": pair(COVID_SOURCE, "model", "COVID-19 vs Pneumonia"),
        "covid_dataset_covid_vs_pneumonia_auroc_baseline": pair(
            COVID_SOURCE, "baseline", "COVID-19 vs Pneumonia"
        ),
        "nih_pneumonia_auroc": within(NIH, "model", "Pneumonia"),
        "nih_pneumonia_auroc_baseline": within(NIH, "baseline", "Pneumonia"),
        "kaggle_pneumonia_auroc": within(KAGGLE, "model", "Pneumonia"),
        "kaggle_pneumonia_auroc_baseline": within(KAGGLE, "baseline", "Pneumonia"),
        "source_probe_accuracy": _get(metrics, "source_probe", "model_features", "accuracy"),
        "source_probe_majority": _get(metrics, "source_probe", "majority_source_rate"),
        "nih_normal_recall": _get(sources, NIH, "model", "recall", "Normal"),
        "verdict": metrics.get("verdict"),
    }


def _fmt(estimate: Any) -> str:
    if isinstance(estimate, (int, float)):
        return f"{estimate:.3f}"
    if not isinstance(estimate, dict) or estimate.get("value") is None:
        return "n/a"
    text = f"{estimate['value']:.3f}"
    if estimate.get("ci_low") is not None:
        text += f" [{estimate['ci_low']:.2f}, {estimate['ci_high']:.2f}]"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("out/bench_sources"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--freeze-epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/disease_vs_source"))
    parser.add_argument(
        "--reuse", action="store_true", help="Keep runs already trained under --out; evaluate them again."
    )
    args = parser.parse_args()
    previous = args.results.with_suffix(".json")
    earlier = json.loads(previous.read_text())["runs"] if args.reuse and previous.is_file() else {}
    datalist = args.out / "prep" / "datalist.json"
    if not datalist.is_file():
        _cli(
            "prepare",
            "--covid-dir", str(args.data / "covid-chestxray-dataset"),
            "--kaggle-dir", str(args.data / "chest_xray"),
            "--site-csv", f"nih-chestxray8={args.data / 'nih-chestxray8' / 'labels.csv'}",
            "--n-normal", "all", "--n-pneumonia", "all",
            "--out", str(args.out / "prep"),
        )  # fmt: skip
    results: dict[str, Any] = {
        "settings": {
            "fold": 0,
            "epochs": args.epochs,
            "freeze_epochs": args.freeze_epochs,
            "spatial_size": args.size,
            "threads": args.threads,
        },
        "runs": dict(earlier),  # with --reuse, runs not named in --runs keep their earlier figures
    }
    for name in args.runs.split(","):
        description, extra = RUNS[name]
        run_dir = args.out / name
        start = time.perf_counter()
        trained = (run_dir / "final" / "models" / "model.pt").is_file()
        if not (args.reuse and trained):
            _cli(
                "train", "--datalist", str(datalist), "--out", str(run_dir),
                "--folds", "0", "--final", "best-fold",
                "--max-epochs", str(args.epochs), "--freeze-epochs", str(args.freeze_epochs),
                "--spatial-size", str(args.size), "--num-workers", "0", "--threads", str(args.threads),
                *extra,
            )  # fmt: skip
            train_seconds = time.perf_counter() - start
            threads = args.threads
        else:
            train_seconds = earlier.get(name, {}).get("train_seconds", float("nan"))
            threads = earlier.get(name, {}).get("train_threads")
        _cli("evaluate", "--bundle", str(run_dir / "final"), "--datalist", str(datalist),
             "--split", "test", "--out", str(run_dir / "eval_test"))  # fmt: skip
        entry = {
            "description": description,
            "train_arguments": extra,
            "train_seconds": None if train_seconds != train_seconds else round(train_seconds),
            "train_threads": threads,
            "test": _summary(json.loads((run_dir / "eval_test" / "metrics.json").read_text())),
        }
        if NIH in extra:  # leave-NIH-out: every NIH film is new to this model
            _cli("evaluate", "--bundle", str(run_dir / "final"), "--datalist", str(datalist),
                 "--split", f"source:{NIH}", "--out", str(run_dir / "eval_nih"))  # fmt: skip
            entry["nih_all"] = _summary(json.loads((run_dir / "eval_nih" / "metrics.json").read_text()))
        results["runs"][name] = entry
        _write(results, args.results)


def _write(results: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    s = results["settings"]
    lines = [
        "# Disease or source? Side-by-side runs on three sources",
        "",
        f"Fold 0 of `cxr-monai prepare` on covid-chestxray-dataset + Kaggle + NIH (site CSV); "
        f"{s['epochs']} epochs ({s['freeze_epochs']} head-only for ImageNet starts), {s['spatial_size']} "
        f"px, CPU (threads per run below). Test split; 95 % patient-cluster bootstrap intervals. AUROCs are "
        "within one source (on that source's images only): one-vs-rest, or for a pair of classes. "
        "Command: `python benchmarks/disease_vs_source.py`.",
        "",
        "| run | accuracy | baseline | COVID-19 vs Pneumonia AUROC in covid-dataset (baseline) | COVID-19 vs "
        "rest AUROC in covid-dataset (baseline) | Pneumonia AUROC in NIH (baseline) | Pneumonia AUROC in "
        "Kaggle (baseline) | source probe (majority) | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in results["runs"].items():
        t = run["test"]
        lines.append(
            f"| {name} | {_fmt(t['accuracy'])} | {_fmt(t['baseline_accuracy'])} | "
            f"{_fmt(t.get('covid_dataset_covid_vs_pneumonia_auroc'))} "
            f"({_fmt(t.get('covid_dataset_covid_vs_pneumonia_auroc_baseline'))}) | "
            f"{_fmt(t['covid_dataset_covid_auroc'])} ({_fmt(t['covid_dataset_covid_auroc_baseline'])}) | "
            f"{_fmt(t['nih_pneumonia_auroc'])} ({_fmt(t['nih_pneumonia_auroc_baseline'])}) | "
            f"{_fmt(t['kaggle_pneumonia_auroc'])} ({_fmt(t['kaggle_pneumonia_auroc_baseline'])}) | "
            f"{_fmt(t['source_probe_accuracy'])} ({_fmt(t['source_probe_majority'])}) | "
            f"{run['train_seconds']} |"
        )
    lines += ["", "Runs (`cxr-monai train` arguments beyond the common ones):", ""]
    for name, run in results["runs"].items():
        threads = f", {run['train_threads']} CPU threads" if run.get("train_threads") else ""
        lines.append(f"- {name}: {run['description']} (`{' '.join(run['train_arguments'])}`{threads})")
    for name, run in results["runs"].items():
        if "nih_all" in run:
            nih = run["nih_all"]
            lines += [
                "",
                f"Leave-NIH-out ({name}), every NIH film: Normal films called Normal "
                f"{_fmt(nih['nih_normal_recall'])}; accuracy {_fmt(nih['accuracy'])}; "
                f"Pneumonia AUROC {_fmt(nih['nih_pneumonia_auroc'])}.",
            ]
    lines += ["", "Verdicts (from `cxr-monai evaluate`):", ""]
    for name, run in results["runs"].items():
        for sentence in run["test"].get("verdict") or []:
            lines.append(f"- {name}: {sentence}")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
