"""The small Python pieces the ``cxr_classifier`` bundle configs call.

* datalist items for a fold (:func:`fold_items`);
* the two-stage fine-tuning schedule (:class:`FineTuneSchedule`, an ignite handler);
* the per-epoch training log that evaluation plots (:class:`TrainingLog`);
* resuming an interrupted run and early stopping, MONAI handlers that need the trainer they are attached
  to (:class:`ResumeFromCheckpoint`, :class:`SaveResumeCheckpoint`, :class:`EarlyStopOnValidation`);
* the trained-bundle layout: configs copied into ``output_dir`` with the run's parameters written in
  (:func:`prepare_output_dir`), the latest resumable checkpoint (:func:`latest_checkpoint`),
  moving a trained bundle (:func:`relocate_trained_bundle`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver, EarlyStopHandler, stopping_fn_from_metric

from cxr_monai.atomic import write_json_atomic
from cxr_monai.data import get_test_items, items_for_fold, load_datalist, num_folds
from cxr_monai.errors import BundleError, DatasetError
from cxr_monai.networks import PRETRAINED_NONE, freeze_backbone, unfreeze_all, unfreeze_top

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
TRAINING_LOG = "training_log.json"
RUN_INFO = "run_info.json"
#: Top-level keys of ``inference.json`` that a trained bundle fixes to the run's values.
INFERENCE_PARAMETERS: tuple[str, ...] = ("backbone", "spatial_size")
_CHECKPOINT_NAME = re.compile(r"^checkpoint_epoch=(\d+)\.pt$")


def default_bundle_root() -> str:
    """Directory of the source bundle ``bundles/cxr_classifier`` next to the installed package (checkout)."""
    root = Path(__file__).resolve().parent.parent / "bundles" / BUNDLE_NAME
    if not (root / "configs" / "train.json").is_file():
        raise BundleError(
            f"the {BUNDLE_NAME} bundle is not next to the cxr_monai package ({root}); "
            "pass --bundle_root /path/to/bundles/cxr_classifier"
        )
    return str(root)


# --- datalist -------------------------------------------------------------------------------------------


def fold_items(datalist: str, fold: int, role: str) -> list[dict[str, Any]]:
    """Items of the datalist written by ``cxr-monai prepare`` for one role of a run.

    ``role``: ``"train"`` = training items outside ``fold`` (all of them when ``fold < 0``),
    ``"validate"`` = real (not ``synthetic``) training items of ``fold`` (none when ``fold < 0``); for
    ``"train"`` with ``fold >= 0`` synthetic items count only when their GAN never saw that fold
    (``gan_fold == fold``), since a GAN trained on fold K's COVID-19 images leaks them into the run,
    ``"test"`` = the held-out test items, ``"training"`` = every training item. Each item is reduced to
    ``{"image": path, "label": index into CLASS_NAMES}``: the other keys vary by source (``offset`` may be
    null, Kaggle items have no ``view``), which batch collation refuses, and patient data has no business
    in a batch.
    Raises DatasetError for a missing/invalid datalist or an empty selection.
    """
    if not datalist:
        raise DatasetError("no datalist given: pass --datalist FILE (made by `cxr-monai prepare`)")
    content = load_datalist(datalist)
    if role in ("train", "validate"):
        train, validate = items_for_fold(content, None if fold < 0 else int(fold))
        # Synthetic (CycleGAN) items may train but never validate: validation measures real images only.
        selected = train if role == "train" else [item for item in validate if not item.get("synthetic")]
        if role == "train" and fold >= 0:
            kept = [i for i in selected if not i.get("synthetic") or i.get("gan_fold", -1) == fold]
            if len(kept) < len(selected):
                logger.warning(
                    "fold %d: %d synthetic items left out of training: their GAN saw this fold's images "
                    "(train the GAN with --fold %d to use them)",
                    fold,
                    len(selected) - len(kept),
                    fold,
                )
            selected = kept
        if role == "validate" and fold < 0:
            return []  # training on every item: nothing is held out
    elif role == "test":
        selected = get_test_items(content)
    elif role == "training":
        selected = list(content["training"])
    else:
        raise DatasetError(f"unknown datalist role {role!r}; expected train, validate, test or training")
    if not selected:
        raise DatasetError(f"datalist {datalist} has no {role} items for fold {fold}")
    return [{"image": item["image"], "label": int(item["label"])} for item in selected]


def datalist_folds(datalist: str) -> list[int]:
    """The cross-validation folds of the datalist: 0..num_folds-1."""
    return list(range(num_folds(load_datalist(datalist))))


# --- ignite handlers ------------------------------------------------------------------------------------


class FineTuneSchedule:
    """The paper's two stages, applied at each ``EPOCH_STARTED`` (so a resumed run lands in the right one).

    With ``pretrained == "none"`` everything trains from the first epoch. Otherwise epochs
    1..``freeze_epochs`` train the head on a frozen trunk (its BatchNorm layers in eval mode), and from
    epoch ``freeze_epochs + 1`` the top ``unfreeze_blocks`` trunk blocks train too, every parameter group's
    learning rate being set to ``finetune_learning_rate`` at that epoch. The optimizer may hold all
    parameters from the start: frozen ones get no gradient, and Adam skips parameters without one.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        pretrained: str,
        freeze_epochs: int,
        unfreeze_blocks: int,
        finetune_learning_rate: float,
    ) -> None:
        self.network = network
        self.optimizer = optimizer
        self.from_scratch = str(pretrained) == PRETRAINED_NONE
        self.freeze_epochs = int(freeze_epochs)
        self.unfreeze_blocks = int(unfreeze_blocks)
        self.finetune_learning_rate = float(finetune_learning_rate)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch  # 1-based inside EPOCH_STARTED
        if self.from_scratch:
            unfreeze_all(self.network)
            return
        if epoch <= self.freeze_epochs:
            freeze_backbone(self.network)
            stage = "head only, trunk frozen"
        else:
            unfreeze_top(self.network, self.unfreeze_blocks)
            stage = f"head + top {self.unfreeze_blocks} trunk blocks"
            if epoch == self.freeze_epochs + 1:
                for group in self.optimizer.param_groups:
                    group["lr"] = self.finetune_learning_rate
        if epoch in (1, self.freeze_epochs + 1):
            logger.info("Epoch %d: fine-tuning stage: %s", epoch, stage)


class TrainingLog:
    """Keeps ``logs/training_log.json``: a list with one dict per finished epoch.

    Keys: ``epoch``, ``learning_rate`` (during the epoch), ``train_loss``, ``train_accuracy``,
    ``train_seconds`` (the training loop), and, when validating, ``val_loss``, ``val_accuracy``,
    ``val_seconds``. Attach it after the ``ValidationHandler`` (same event, runs later). On a resumed run
    the entries after the restored epoch are dropped. (MONAI's ``MetricsSaver`` keeps only the last
    epoch's values; the loss/accuracy curves need every epoch, hence this handler.)
    """

    def __init__(self, path: str, optimizer: torch.optim.Optimizer, validator: Engine | None = None) -> None:
        self.path = Path(path)
        self.optimizer = optimizer
        self.validator = validator
        self.entries: list[dict[str, Any]] = []
        self._learning_rate = 0.0
        self._epoch_start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _started(self, engine: Engine) -> None:
        self.entries = []
        if engine.state.epoch > 0 and self.path.is_file():
            previous = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries = [e for e in previous if e.get("epoch", 0) <= engine.state.epoch]

    def _epoch_started(self, engine: Engine) -> None:
        self._learning_rate = float(self.optimizer.param_groups[0]["lr"])
        self._epoch_start = time.perf_counter()

    def _epoch_completed(self, engine: Engine) -> None:
        metrics = engine.state.metrics
        entry: dict[str, Any] = {
            "epoch": engine.state.epoch,
            "learning_rate": self._learning_rate,
            "train_loss": _as_float(metrics.get("train_loss")),
            "train_accuracy": _as_float(metrics.get("train_accuracy")),
            "train_seconds": float(engine.state.times.get(Events.EPOCH_COMPLETED.name) or 0.0),
        }
        if self.validator is not None and self.validator.state.epoch > 0:
            val = self.validator.state.metrics
            entry["val_loss"] = _as_float(val.get("val_loss"))
            entry["val_accuracy"] = _as_float(val.get("val_accuracy"))
            entry["val_seconds"] = float(self.validator.state.times.get(Events.COMPLETED.name) or 0.0)
        self.entries.append(entry)
        write_json_atomic(self.path, self.entries)


class ResumeFromCheckpoint:
    """Resume an interrupted run: if ``ckpt_dir`` holds a ``checkpoint_epoch=N.pt`` when the trainer is
    built, MONAI's ``CheckpointLoader`` restores ``objects`` and the trainer's epoch/iteration from it at
    ``STARTED``. Attach it first. (A wrapper because the config cannot name the trainer inside the
    trainer's own handler list; the trainer is added here at attach time.)"""

    def __init__(self, ckpt_dir: str, objects: Mapping[str, Any], map_location: Any = None) -> None:
        self.ckpt_dir = ckpt_dir
        self.objects = dict(objects)
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        path = latest_checkpoint(self.ckpt_dir)
        if path:
            logger.info("Resuming from %s", path)
            load = {**self.objects, "trainer": engine}
            CheckpointLoader(load_path=path, load_dict=load, map_location=self.map_location).attach(engine)


class SaveResumeCheckpoint:
    """Save ``objects`` and the trainer as ``ckpt_dir/checkpoint_epoch=N.pt`` after every epoch (MONAI's
    ``CheckpointSaver``), then delete older ones, also those a resumed run inherited. Attach it after
    validation so the best-model tracking state it saves includes this epoch."""

    def __init__(self, ckpt_dir: str, objects: Mapping[str, Any]) -> None:
        self.ckpt_dir = ckpt_dir
        self.objects = dict(objects)

    def attach(self, engine: Engine) -> None:
        save = {**self.objects, "trainer": engine}
        CheckpointSaver(save_dir=self.ckpt_dir, save_dict=save, save_interval=1, n_saved=1).attach(engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._remove_older)

    def _remove_older(self, engine: Engine) -> None:
        newest = latest_checkpoint(self.ckpt_dir)
        for path in Path(self.ckpt_dir).glob("checkpoint_epoch=*.pt"):
            if str(path) != newest:
                path.unlink(missing_ok=True)


class EarlyStopOnValidation:
    """Stop training when ``metric`` of the validator has not improved for ``patience`` validations
    (MONAI's ``EarlyStopHandler`` on the trainer's ``EPOCH_COMPLETED``; attach it after the
    ``ValidationHandler``). ``patience <= 0`` turns it off."""

    def __init__(self, validator: Engine, patience: int, metric: str = "val_accuracy") -> None:
        self.validator = validator
        self.patience = int(patience)
        self.metric = metric

    def attach(self, engine: Engine) -> None:
        if self.patience <= 0:
            return
        score = stopping_fn_from_metric(self.metric)
        EarlyStopHandler(
            patience=self.patience, score_function=lambda _: score(self.validator), trainer=engine
        ).attach(engine)


def _as_float(value: Any) -> float | None:
    return None if value is None else float(value)


# --- trained bundle layout ------------------------------------------------------------------------------


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
    source_bundles = Path(__file__).resolve().parent.parent / "bundles"
    if out == source_bundles or source_bundles in out.parents:
        raise BundleError(f"output_dir {out} is inside the source bundles; pass --output_dir DIR elsewhere")
    for sub in ("configs", "models", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    params = dict(run_parameters)
    for name in CONFIG_FILES:
        src = source / name
        if not src.is_file():
            raise BundleError(f"bundle config {src} is missing")
        dst = out / "configs" / name
        if name.endswith(".json"):
            config = json.loads(src.read_text(encoding="utf-8"))
            write_json_atomic(dst, _with_run_values(name, config, params, out))
        elif src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
    write_json_atomic(
        out / "logs" / RUN_INFO,
        {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "parameters": params,
            "versions": _package_versions(),
        },
    )
    return str(out)


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
            config[key] = params[key]
        config["bundle_root"] = str(out)
    elif name == "metadata.json":
        size = int(params["spatial_size"])
        config["network_data_format"]["inputs"]["image"]["spatial_shape"] = [size, size]
        config["backbone"] = params["backbone"]
    return config


def _package_versions() -> dict[str, str]:
    import monai
    import numpy
    import torchvision

    return {
        "monai": monai.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
    }


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


def read_training_log(bundle_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch entries of a trained bundle's ``logs/training_log.json`` (empty if absent)."""
    path = Path(bundle_dir) / "logs" / TRAINING_LOG
    if not path.is_file():
        return []
    entries = json.loads(path.read_text(encoding="utf-8"))
    return entries if isinstance(entries, list) else []


def best_epoch(entries: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The entry with the highest ``val_accuracy`` (first of ties, as the best-model checkpoint keeps it)."""
    scored = [e for e in entries if e.get("val_accuracy") is not None]
    return max(scored, key=lambda e: e["val_accuracy"]) if scored else None
