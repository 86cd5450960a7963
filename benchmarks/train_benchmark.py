"""Training benchmark: the cxr_classifier MONAI bundle vs a plain PyTorch loop, model sizes, a real run.

Sub-commands (each writes JSON into benchmarks/results/):

* ``speed``: EfficientNet-B0 from scratch, 224 x 224, batch 16, on the same training images: the bundle
  (``ConfigWorkflow`` on ``train.json``: ``SupervisedTrainer``, metrics, handlers) and a hand-written loop
  (same network, Adam, loss, ``CacheDataset`` + the same augmentation chain and loader, so the difference
  is the engine and its handlers). Arms run as separate processes in the order plain, bundle, bundle,
  plain (ABBA: drift on a shared machine hits both alike); each reports its per-epoch training-loop
  seconds and its peak resident memory. The first epoch of every arm is warm-up and left out.
* ``sizes``: ``models/model.pt``-style state_dict file size of each backbone (paper: 57 / 97 / 21 MB).
* ``real``: the bundle on the real datalist (``fold`` for validation), from scratch, for ``max_epochs``;
  the trained bundle is left in ``--output-dir`` for ``cxr-monai evaluate``.

Reproduce (2 shared CPU cores, one intra-op thread; see ``--threads``)::

    python benchmarks/train_benchmark.py speed --datalist out/prep/datalist.json
    python benchmarks/train_benchmark.py sizes
    python benchmarks/train_benchmark.py real --datalist out/prep/datalist.json --max-epochs 20 \\
        --output-dir out/bench_effb0
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
BUNDLE_CONFIGS = Path(__file__).resolve().parent.parent / "bundles" / "cxr_classifier" / "configs"
RECIPE = {
    "backbone": "efficientnet_b0",
    "pretrained": "none",
    "spatial_size": 224,
    "batch_size": 16,
    "learning_rate": 1e-3,
    "cosine_lr": True,
    "optimizer": "Adam",
    "augmentation": "v1 (rotation +-10 deg, shift +-10 %, horizontal flip)",
    "seed": 0,
}


def _peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _machine(threads: int) -> dict[str, Any]:
    import monai
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
    }


def _subset_datalist(datalist: Path, images: int, fold: int, directory: Path) -> Path:
    """A datalist with the first ``images`` training items outside ``fold`` and 16 of ``fold``."""
    content = json.loads(datalist.read_text())
    train = [it for it in content["training"] if it["fold"] != fold][:images]
    val = [it for it in content["training"] if it["fold"] == fold][:16]
    subset = {**content, "training": train + val}
    path = directory / "speed_datalist.json"
    path.write_text(json.dumps(subset))
    return path


# --- one arm of the speed comparison (runs in its own process) -----------------------------------------


def _arm_bundle(datalist: Path, epochs: int, workdir: Path) -> dict[str, Any]:
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(BUNDLE_CONFIGS / "train.json"),
        logging_file=False,
        workflow_type="train",
        datalist=str(datalist),
        output_dir=str(workdir / "bundle_run"),
        fold=0,
        max_epochs=epochs,
        num_workers=0,
        verbose=False,
        **{
            k: RECIPE[k]
            for k in ("backbone", "pretrained", "spatial_size", "batch_size", "learning_rate", "seed")
        },
    )
    t0 = time.perf_counter()
    workflow.initialize()
    workflow.run()
    total = time.perf_counter() - t0
    log = json.loads((workdir / "bundle_run" / "logs" / "training_log.json").read_text())
    return {
        "epoch_seconds": [e["train_seconds"] for e in log],
        "validation_seconds": [e.get("val_seconds") for e in log],
        "total_seconds_incl_caching_validation_checkpoints": total,
    }


def _arm_plain(datalist: Path, epochs: int) -> dict[str, Any]:
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.utils import set_determinism

    from cxr_monai.networks import build_network
    from cxr_monai.training import fold_items
    from cxr_monai.transforms import train_transforms_d

    set_determinism(seed=RECIPE["seed"])
    items = fold_items(str(datalist), 0, "train")
    transform = train_transforms_d(("image",), RECIPE["spatial_size"], seed=RECIPE["seed"])
    dataset = CacheDataset(items, transform=transform, cache_rate=1.0, num_workers=0, progress=False)
    loader = DataLoader(dataset, batch_size=RECIPE["batch_size"], shuffle=True, num_workers=0)
    network = build_network(RECIPE["backbone"])
    optimizer = torch.optim.Adam(network.parameters(), lr=RECIPE["learning_rate"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    seconds = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        network.train()
        correct, total, loss_sum = 0, 0, 0.0
        for batch in loader:
            images, labels = batch["image"].as_tensor(), batch["label"]
            optimizer.zero_grad()
            logits = network(images)
            loss = loss_fn(logits, labels)
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(1) == labels).sum())
            total += len(labels)
            loss_sum += loss.item()
        seconds.append(time.perf_counter() - t0)
        scheduler.step()
    return {
        "epoch_seconds": seconds,
        "train_accuracy_last_epoch": correct / max(total, 1),
        "train_loss_last_epoch": loss_sum / max(len(loader), 1),
    }


def run_arm(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.arm == "bundle":
            result = _arm_bundle(Path(args.datalist), args.epochs, Path(tmp))
        else:
            result = _arm_plain(Path(args.datalist), args.epochs)
    result["peak_rss_mb"] = _peak_rss_mb()
    _write(Path(args.json_out), result)


# --- sub-commands ---------------------------------------------------------------------------------------


def speed(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subset = _subset_datalist(Path(args.datalist), args.images, 0, Path(tmp))
        arms: list[dict[str, Any]] = []
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for index, arm in enumerate(("plain", "bundle", "bundle", "plain")):
            out = Path(tmp) / f"arm_{index}.json"
            command = [
                sys.executable,
                __file__,
                "_arm",
                "--arm",
                arm,
                "--datalist",
                str(subset),
                "--epochs",
                str(args.epochs),
                "--threads",
                str(args.threads),
                "--json-out",
                str(out),
            ]
            print(f"[speed] arm {index + 1}/4: {arm}", flush=True)
            subprocess.run(command, check=True, env=env)
            arms.append({"arm": arm, **json.loads(out.read_text())})

    def steady(arm: str) -> list[float]:
        return [s for a in arms if a["arm"] == arm for s in a["epoch_seconds"][1:]]

    plain, bundle = steady("plain"), steady("bundle")
    plain_median, bundle_median = statistics.median(plain), statistics.median(bundle)
    result = {
        "what": "training-loop seconds per epoch, EfficientNet-B0 from scratch, same images/batch/augm.",
        "command": "python benchmarks/train_benchmark.py speed " + " ".join(sys.argv[2:]),
        "machine": _machine(args.threads),
        "recipe": RECIPE,
        "images_per_epoch": args.images,
        "epochs_per_arm": args.epochs,
        "arms": arms,
        "steady_epoch_seconds": {"plain": plain, "bundle": bundle},
        "median_epoch_seconds": {"plain": plain_median, "bundle": bundle_median},
        "images_per_second": {"plain": args.images / plain_median, "bundle": args.images / bundle_median},
        "bundle_over_plain_ratio": bundle_median / plain_median,
        "peak_rss_mb": {a["arm"] + f"_{i}": a["peak_rss_mb"] for i, a in enumerate(arms)},
    }
    _write(Path(args.out), result)
    print(
        json.dumps(
            {k: result[k] for k in ("median_epoch_seconds", "images_per_second", "bundle_over_plain_ratio")},
            indent=2,
        )
    )


def sizes(args: argparse.Namespace) -> None:
    import torch

    from cxr_monai.networks import BACKBONES, build_network

    paper = {"vgg16": 57, "resnet50": 97, "efficientnet_b0": 21}  # Lite0 is not in the paper
    rows = {}
    for name in BACKBONES:
        network = build_network(name)
        buffer = io.BytesIO()
        torch.save(network.state_dict(), buffer)
        rows[name] = {
            "parameters_millions": sum(p.numel() for p in network.parameters()) / 1e6,
            "model_pt_mb": len(buffer.getvalue()) / 1e6,
            "paper_mb": paper.get(name),
        }
    result = {"command": "python benchmarks/train_benchmark.py sizes", "sizes": rows}
    _write(Path(args.out), result)
    print(json.dumps(rows, indent=2))


def real(args: argparse.Namespace) -> None:
    import torch
    from monai.bundle import ConfigWorkflow

    torch.set_num_threads(args.threads)
    params = {
        **{
            k: RECIPE[k]
            for k in (
                "pretrained",
                "spatial_size",
                "batch_size",
                "cosine_lr",
                "seed",
            )
        },
        "backbone": args.backbone,
        "learning_rate": args.learning_rate,
        "fold": args.fold,
        "max_epochs": args.max_epochs,
        "num_workers": args.num_workers,
        "verbose": True,
    }
    t0 = time.perf_counter()
    workflow = ConfigWorkflow(
        config_file=str(BUNDLE_CONFIGS / "train.json"),
        workflow_type="train",
        datalist=str(Path(args.datalist).resolve()),
        output_dir=str(Path(args.output_dir).resolve()),
        **params,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    total = time.perf_counter() - t0
    log = json.loads((Path(args.output_dir) / "logs" / "training_log.json").read_text())
    best = max(log, key=lambda e: e["val_accuracy"])
    train_items = len(workflow.train_dataset)
    steady = [e["train_seconds"] for e in log[1:]] or [log[0]["train_seconds"]]
    result = {
        "what": f"{args.backbone} from scratch through the cxr_classifier bundle on the real datalist",
        "command": "python benchmarks/train_benchmark.py real " + " ".join(sys.argv[2:]),
        "machine": _machine(args.threads),
        "recipe": {**RECIPE, **params},
        "trained_bundle": str(Path(args.output_dir).resolve()),
        "train_items": train_items,
        "validation_items": len(workflow.val_dataset),
        "epochs_run": len(log),
        "median_train_epoch_seconds": statistics.median(steady),
        "train_images_per_second": train_items / statistics.median(steady),
        "median_validation_seconds": statistics.median(e["val_seconds"] for e in log),
        "total_seconds": total,
        "peak_rss_mb": _peak_rss_mb(),
        "best_epoch": best["epoch"],
        "best_val_accuracy": best["val_accuracy"],
        "log": log,
    }
    _write(Path(args.out), result)
    print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--datalist", required=True)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "train_speed.json"))
    p = sub.add_parser("sizes")
    p.add_argument("--out", default=str(RESULTS / "train_model_sizes.json"))
    p = sub.add_parser("real")
    p.add_argument("--datalist", required=True)
    p.add_argument("--output-dir", default="out/bench_effb0")
    p.add_argument(
        "--backbone",
        default="efficientnet_b0",
        choices=("vgg16", "resnet50", "efficientnet_b0", "efficientnet_lite0"),
    )
    p.add_argument("--learning-rate", type=float, default=RECIPE["learning_rate"])
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=20)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "train_effb0_real.json"))
    p = sub.add_parser("_arm")
    p.add_argument("--arm", choices=("plain", "bundle"), required=True)
    p.add_argument("--datalist", required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", required=True)
    args = parser.parse_args()
    {"speed": speed, "sizes": sizes, "real": real, "_arm": run_arm}[args.command](args)


if __name__ == "__main__":
    main()
