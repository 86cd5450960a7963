"""Ignite handlers of the classifier bundle, on plain ignite engines with scripted validation scores."""

from __future__ import annotations

from collections.abc import Iterator

from ignite.engine import Engine, Events

from cxr_monai.training.handlers import EarlyStopOnValidation


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
