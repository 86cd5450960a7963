"""Ignite handlers of the classifier bundle, on plain ignite engines with scripted validation scores."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver
from torch import nn

from cxr_monai.training.handlers import EarlyStopOnValidation, restore_best_model_tracking


def _engines(scores: list[float], val_interval: int) -> tuple[Engine, Engine, list[int]]:
    """A trainer that runs the validator every ``val_interval`` epochs; the validator computes its score at
    EPOCH_COMPLETED, as ignite metrics do, before handlers attached later."""
    trainer = Engine(lambda engine, batch: None)
    script: Iterator[float] = iter(scores)
    validator = Engine(lambda engine, batch: None)
    validator.add_event_handler(
        Events.EPOCH_COMPLETED, lambda engine: engine.state.metrics.update(val_accuracy=next(script))
    )
    validated: list[int] = []

    def validate(engine: Engine) -> None:
        if engine.state.epoch % val_interval == 0:
            validated.append(engine.state.epoch)
            validator.run([0])

    trainer.add_event_handler(Events.EPOCH_COMPLETED, validate)
    return trainer, validator, validated


def test_patience_counts_validations_not_epochs_when_validating_every_second_epoch() -> None:
    trainer, validator, validated = _engines([0.5, 0.6, 0.55, 0.54, 0.9], val_interval=2)
    EarlyStopOnValidation(validator, patience=2).attach(trainer)
    trainer.run([0], max_epochs=20)
    # validations at epochs 2, 4 (best), 6, 8: two without improvement -> stop after epoch 8
    assert validated == [2, 4, 6, 8]
    assert trainer.state.epoch == 8


def test_patience_zero_never_stops() -> None:
    trainer, validator, validated = _engines([0.5, 0.4, 0.3], val_interval=1)
    EarlyStopOnValidation(validator, patience=0).attach(trainer)
    trainer.run([0], max_epochs=3)
    assert trainer.state.epoch == 3
    assert validated == [1, 2, 3]


def _scripted_validator(tmp_path: Path, scores: list[float]) -> tuple[Engine, CheckpointSaver, nn.Module]:
    """A validator whose val_accuracy follows ``scores`` and a key-metric saver of a one-weight model."""
    network = nn.Linear(1, 1, bias=False)
    script = iter(scores)
    validator = Engine(lambda engine, batch: None)
    validator.add_event_handler(
        Events.EPOCH_COMPLETED, lambda engine: engine.state.metrics.update(val_accuracy=next(script))
    )
    saver = CheckpointSaver(
        save_dir=str(tmp_path),
        save_dict={"model": network},
        save_key_metric=True,
        key_metric_name="val_accuracy",  # a MONAI evaluator names it itself; a plain Engine does not
        key_metric_filename="model.pt",
    )
    saver.attach(validator)
    return validator, saver, network


def test_a_resumed_run_keeps_the_best_model_against_a_worse_epoch(tmp_path: Path) -> None:
    """The best-model saver of a resumed run knows the best score from the training log."""
    first, _, network = _scripted_validator(tmp_path, [0.9])
    torch.nn.init.constant_(network.weight, 1.0)
    first.run([0])  # epoch 1: 0.9 -> model.pt holds weight 1.0
    log = tmp_path / "training_log.json"
    log.write_text(json.dumps([{"epoch": 1, "val_accuracy": 0.9}, {"epoch": 2, "val_accuracy": 0.95}]))

    resumed, saver, network = _scripted_validator(tmp_path, [0.5, 0.93])
    assert restore_best_model_tracking(saver, "model.pt", log, up_to_epoch=1) == 0.9  # epoch 2 not restored
    torch.nn.init.constant_(network.weight, 2.0)
    resumed.run([0])  # 0.5 after the resume: worse, model.pt keeps the 0.9 model
    assert torch.load(tmp_path / "model.pt")["weight"].item() == 1.0
    resumed.run([0])  # 0.93: better than 0.9, saved
    assert torch.load(tmp_path / "model.pt")["weight"].item() == 2.0


def test_without_a_restored_best_a_worse_epoch_overwrites_the_model(tmp_path: Path) -> None:
    """The failure the restore prevents: a fresh saver takes any first score as its best."""
    first, _, network = _scripted_validator(tmp_path, [0.9])
    torch.nn.init.constant_(network.weight, 1.0)
    first.run([0])
    resumed, _, network = _scripted_validator(tmp_path, [0.5])
    torch.nn.init.constant_(network.weight, 2.0)
    resumed.run([0])
    assert torch.load(tmp_path / "model.pt")["weight"].item() == 2.0


def test_nothing_is_restored_without_a_log_or_a_model(tmp_path: Path) -> None:
    _, saver, _ = _scripted_validator(tmp_path, [])
    assert restore_best_model_tracking(saver, "model.pt", tmp_path / "none.json", 3) is None
    (tmp_path / "log.json").write_text(json.dumps([{"epoch": 1, "val_accuracy": 0.8}]))
    assert restore_best_model_tracking(saver, "model.pt", tmp_path / "log.json", 3) is None  # no model.pt
