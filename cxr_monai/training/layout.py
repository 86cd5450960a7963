"""The trained-bundle layout: configs copied into ``output_dir`` with the run's parameters written in
(:func:`prepare_output_dir`), the latest resumable checkpoint (:func:`latest_checkpoint`), moving a
trained bundle (:func:`relocate_trained_bundle`) and reading its training log."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxr_monai.atomic import write_json_atomic
from cxr_monai.bundles import bundle_dir, bundles_root
from cxr_monai.errors import BundleError
from cxr_monai.transforms import square_side
from cxr_monai.versions import package_versions

logger = logging.getLogger(__name__)

BUNDLE_NAME = "cxr_classifier"
CONFIG_FILES: tuple[str, ...] = (
    "metadata.json",
    "train.json",
    "evaluate.json",
    "inference.json",
    "multi_gpu_train.json",
    "logging.conf",
)
#: A trained bundle's per-epoch log, relative to the bundle directory.
TRAINING_LOG = Path("logs") / "training_log.json"
RUN_INFO = "run_info.json"
#: Top-level keys of ``inference.json`` that a trained bundle fixes to the run's values.
INFERENCE_PARAMETERS: tuple[str, ...] = ("backbone", "spatial_size", "histogram_equalize", "crop_borders")
_CHECKPOINT_NAME = re.compile(r"^checkpoint_epoch=(\d+)\.pt$")


def default_bundle_root() -> str:
    """Directory of the shipped ``cxr_classifier`` bundle (package data of ``cxr_monai.bundles``)."""
    return str(bundle_dir(BUNDLE_NAME))


def latest_checkpoint(ckpt_dir: str) -> str:
    """Path of the newest resumable ``checkpoint_epoch=N.pt`` in ``ckpt_dir``; ``""`` when there is none."""
    found = []
    if os.path.isdir(ckpt_dir):
        for name in os.listdir(ckpt_dir):
            match = _CHECKPOINT_NAME.match(name)
            if match:
                found.append((int(match.group(1)), name))
    return os.path.join(ckpt_dir, max(found)[1]) if found else ""


def prepare_output_dir(bundle_root: str, output_dir: str, run_parameters: Mapping[str, Any]) -> str:
    """Make ``output_dir`` a trained bundle: ``configs/`` (with the run's parameters), ``models/``, ``logs/``.

    ``train.json`` and ``multi_gpu_train.json`` get ``run_parameters`` as their top-level values and
    ``bundle_root`` = ``output_dir`` (so running the copy resumes this run); ``inference.json`` gets
    ``backbone``, ``spatial_size`` and ``bundle_root``; ``metadata.json`` the input spatial shape.
    ``logs/run_info.json`` records the parameters, the time and the package versions.
    Returns ``output_dir`` as an absolute path.
    """
    if not output_dir:
        raise BundleError(
            "no output directory given: pass --output_dir DIR (training never writes into the bundle)"
        )
    out = Path(output_dir).resolve()
    source = Path(bundle_root).resolve() / "configs"
    source_bundles = bundles_root().resolve()
    if out == source_bundles or source_bundles in out.parents:
        raise BundleError(f"output_dir {out} is inside the source bundles; pass --output_dir DIR elsewhere")
    params = dict(run_parameters)
    if "spatial_size" in params:  # a trained bundle records the side as an int, whichever form was given
        params["spatial_size"] = square_side(params["spatial_size"])
    write_run_layout(source, out, CONFIG_FILES, params, _with_run_values)
    return str(out)


def write_run_layout(
    source_configs: Path,
    out: Path,
    config_files: Sequence[str],
    params: dict[str, Any],
    with_run_values: Callable[[str, dict[str, Any], dict[str, Any], Path], dict[str, Any]],
) -> None:
    """The layout a training run writes (the classifier's and the GAN's): ``out/configs`` with each of
    ``config_files`` copied from ``source_configs`` (JSON ones edited by ``with_run_values(name, config,
    params, out)``), ``out/models``, and ``out/logs/run_info.json`` (time, ``params``, package versions).
    BundleError when a config is missing."""
    for sub in ("configs", "models", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for name in config_files:
        src = source_configs / name
        if not src.is_file():
            raise BundleError(f"bundle config {src} is missing")
        dst = out / "configs" / name
        if name.endswith(".json"):
            config = json.loads(src.read_text(encoding="utf-8"))
            write_json_atomic(dst, with_run_values(name, config, params, out))
        elif src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
    write_json_atomic(
        out / "logs" / RUN_INFO,
        {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "parameters": params,
            "versions": package_versions(),
        },
    )


def _with_run_values(name: str, config: dict[str, Any], params: dict[str, Any], out: Path) -> dict[str, Any]:
    if name in ("train.json", "multi_gpu_train.json"):
        for key, value in params.items():
            if key in config or name == "train.json":
                config[key] = value
        if name == "train.json":
            config["bundle_root"] = str(out)
            config["output_dir"] = "@bundle_root"
    elif name == "inference.json":
        for key in INFERENCE_PARAMETERS:
            if key in params:  # runs configured before an option existed leave its default
                config[key] = params[key]
        config["bundle_root"] = str(out)
    elif name == "metadata.json":
        size = int(params["spatial_size"])
        config["network_data_format"]["inputs"]["image"]["spatial_shape"] = [size, size]
        config["backbone"] = params["backbone"]
    return config


def relocate_trained_bundle(source: str | Path, destination: str | Path) -> Path:
    """Copy a trained bundle (without its resumable checkpoint) to ``destination`` and point the
    ``bundle_root`` of its ``train.json`` and ``inference.json`` there."""
    src, dst = Path(source).resolve(), Path(destination).resolve()
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint_epoch=*.pt"))
    for name in ("train.json", "inference.json"):
        path = dst / "configs" / name
        config = json.loads(path.read_text(encoding="utf-8"))
        config["bundle_root"] = str(dst)
        write_json_atomic(path, config)
    return dst


def read_run_parameters(bundle_dir: str | Path) -> dict[str, Any]:
    """The training parameters a trained bundle's ``configs/train.json`` records (:func:`prepare_output_dir`
    writes them there as top-level values); {} when the file is absent or unreadable."""
    try:
        config = json.loads((Path(bundle_dir) / "configs" / "train.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def read_training_log(bundle_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch entries (dicts) of a trained bundle's :data:`TRAINING_LOG`; empty when the file is
    absent, and empty with a warning when it is not a JSON list (a run killed while writing it)."""
    path = Path(bundle_dir) / TRAINING_LOG
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("training log %s is unreadable (%s); treated as empty", path, exc)
        return []
    if not isinstance(entries, list):
        logger.warning("training log %s is not a JSON list; treated as empty", path)
        return []
    return [entry for entry in entries if isinstance(entry, dict)]


def best_epoch(entries: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The entry with the highest ``val_accuracy`` (first of ties, as the best-model checkpoint keeps it)."""
    scored = [e for e in entries if e.get("val_accuracy") is not None]
    return max(scored, key=lambda e: e["val_accuracy"]) if scored else None
