"""Ignite handlers the ``cxr_classifier`` bundle attaches: the paper's two-stage fine-tuning, the per-epoch
training log, resuming an interrupted run and early stopping."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver, EarlyStopHandler, stopping_fn_from_metric

from cxr_monai.atomic import write_json_atomic
from cxr_monai.networks import PRETRAINED_NONE, freeze_backbone, unfreeze_all, unfreeze_top
from cxr_monai.training.layout import latest_checkpoint

logger = logging.getLogger(__name__)


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
            logger.info("Epoch %d: training stage: %s", epoch, stage)


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
    trainer's own handler list; the trainer is added here at attach time.)

    With ``best_model_saver`` (the validator's key-metric ``CheckpointSaver``) and ``training_log``, the
    saver also learns the best validation score so far, from the log's entries up to the restored epoch,
    through its public ``load_state_dict``: a worse epoch after the resume does not overwrite the best
    ``model.pt``. (The saver has no public ``state_dict``, so its tracking list is not put in the resume
    checkpoint; the training log already holds what it tracks.)
    """

    def __init__(
        self,
        ckpt_dir: str,
        objects: Mapping[str, Any],
        map_location: Any = None,
        best_model_saver: CheckpointSaver | None = None,
        best_model_filename: str = "model.pt",
        training_log: str | None = None,
        metric: str = "val_accuracy",
    ) -> None:
        self.ckpt_dir = ckpt_dir
        self.objects = dict(objects)
        self.map_location = map_location
        self.best_model_saver = best_model_saver
        self.best_model_filename = best_model_filename
        self.training_log = training_log
        self.metric = metric

    def attach(self, engine: Engine) -> None:
        path = latest_checkpoint(self.ckpt_dir)
        if path:
            logger.info("Resuming from %s", path)
            load = {**self.objects, "trainer": engine}
            CheckpointLoader(load_path=path, load_dict=load, map_location=self.map_location).attach(engine)
            if self.best_model_saver is not None and self.training_log:
                engine.add_event_handler(Events.STARTED, self._restore_best_model_tracking)

    def _restore_best_model_tracking(self, engine: Engine) -> None:
        assert self.best_model_saver is not None and self.training_log is not None
        restore_best_model_tracking(
            self.best_model_saver,
            self.best_model_filename,
            Path(self.training_log),
            engine.state.epoch,
            self.metric,
        )


def restore_best_model_tracking(
    saver: CheckpointSaver,
    filename: str,
    training_log: Path,
    up_to_epoch: int,
    metric: str = "val_accuracy",
) -> float | None:
    """Tell a key-metric ``CheckpointSaver`` (``key_metric_filename=filename``) that its file holds the
    model of the best ``metric`` in ``training_log`` among epochs <= ``up_to_epoch``; returns that score
    (None when there is none or the file is absent, and the saver is left as it is).

    The state given is ignite ``Checkpoint``'s list of ``(priority, filename)`` pairs, under both the
    key its docstring names (``saved``) and the one ignite 0.5 reads (``_saved``); MONAI's key-metric
    priority is the metric's value (``key_metric_negative_sign`` off, as in this bundle).
    """
    if not training_log.is_file() or not (Path(saver.save_dir) / filename).is_file():
        return None
    entries = json.loads(training_log.read_text(encoding="utf-8"))
    scores = [e[metric] for e in entries if e.get("epoch", 0) <= up_to_epoch and e.get(metric) is not None]
    if not scores:
        return None
    best = float(max(scores))
    saved = [(best, filename)]
    saver.load_state_dict({"saved": saved, "_saved": saved})
    return best


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
    """Stop training when ``metric`` of the validator has not improved for ``patience`` validations.

    MONAI's ``EarlyStopHandler`` is attached to the validator (it scores each validation run once, when it
    completes, so ``val_interval > 1`` counts validations, never stale epochs) and stops ``engine``, the
    trainer this handler is attached to. ``patience <= 0`` turns it off. (A wrapper because the config
    cannot name the trainer from the validator's handler list without a reference cycle.)
    """

    def __init__(self, validator: Engine, patience: int, metric: str = "val_accuracy") -> None:
        self.validator = validator
        self.patience = int(patience)
        self.metric = metric

    def attach(self, engine: Engine) -> None:
        if self.patience <= 0:
            return
        EarlyStopHandler(
            patience=self.patience, score_function=stopping_fn_from_metric(self.metric), trainer=engine
        ).attach(self.validator)


def _as_float(value: Any) -> float | None:
    return None if value is None else float(value)
