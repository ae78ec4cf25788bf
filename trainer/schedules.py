"""Loss-weight schedules: set the loss-weight variables from functions of the epoch or of the global step.

The weights are ``tf.Variable``s read once per compiled block, so a schedule never retraces. ``per="step"`` asks
the block runner to end blocks on multiples of ``every_n_steps`` (``step_periods``, see ``trainer/cadence.py``), so
a change lands on exact steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import keras
import tensorflow as tf

from trainer.cadence import Every
from trainer.errors import names
from trainer.options import choice, positive_int


class Weighted(Protocol):
    """What a schedule needs of the Trainer: its loss weights and its global step."""

    @property
    def loss_weights(self) -> Mapping[str, tf.Variable]: ...

    @property
    def global_step(self) -> int: ...


__all__ = ["LossWeightSchedule"]


class LossWeightSchedule(keras.callbacks.Callback):
    """Set loss weights per epoch or per step: ``LossWeightSchedule(trainer, {"aux": lambda epoch: 0.1 * epoch})``.

    Args:
        trainer: the Trainer whose ``loss_weights`` are set.
        schedule: ``{key: fn}``, key a loss name or component key (as in ``loss_weights``); ``fn(epoch)`` (0-based)
            or, with ``per="step"``, ``fn(step)`` with ``step`` a multiple of ``every_n_steps`` (the steps done):
            its value holds for the steps ``step + 1`` to ``step + every_n_steps`` (blocks end on those multiples).
        per: ``"epoch"`` or ``"step"``.
        every_n_steps: (per step) how often the weights change; blocks of steps end on its multiples, so 1 means
            one step per compiled call — choose the coarsest period that serves.
    """

    def __init__(
        self,
        trainer: Weighted,
        schedule: Mapping[str, Callable[[int], float]],
        *,
        per: str = "epoch",
        every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        self.per = choice("per", per, ("epoch", "step"))
        bad = [key for key, fn in schedule.items() if not callable(fn)]
        if bad:
            raise TypeError(f"LossWeightSchedule values must be functions; not callable: {names(bad)}.")
        self.trainer = trainer
        self.schedule = dict(schedule)
        self.every = Every(positive_int("every_n_steps", every_n_steps))

    def _set(self, when: int) -> None:
        weights = self.trainer.loss_weights
        unknown = sorted(set(self.schedule) - set(weights))
        if unknown:
            raise ValueError(
                f"LossWeightSchedule has keys {names(unknown)} that are not loss weights; they are {names(weights)}."
            )
        for key, fn in self.schedule.items():
            weights[key].assign(float(fn(when)))

    def step_periods(self) -> list[int]:
        return [self.every.n] if self.per == "step" else []

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if self.per == "epoch":
            self._set(epoch)

    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        if self.per == "step":
            self._set(self.every.start(self.trainer.global_step))  # the start of the period this block lies in
