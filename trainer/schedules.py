"""Loss-weight schedules: set the loss-weight variables from functions of the epoch or of the global step.

The weights are ``tf.Variable``s read once per compiled block, so a schedule never retraces. ``per="step"`` asks
the Trainer to end blocks on multiples of ``every_n_steps`` (``step_periods``), so a change lands on exact steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import keras

from trainer.errors import names

if TYPE_CHECKING:
    from trainer.trainer import Trainer

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
        trainer: Trainer,
        schedule: Mapping[str, Callable[[int], float]],
        *,
        per: str = "epoch",
        every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        if per not in ("epoch", "step"):
            raise ValueError(f"`per` must be 'epoch' or 'step', got {per!r}.")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be a positive int, got {every_n_steps!r}.")
        bad = [key for key, fn in schedule.items() if not callable(fn)]
        if bad:
            raise TypeError(f"LossWeightSchedule values must be functions; not callable: {names(bad)}.")
        self.trainer = trainer
        self.schedule = dict(schedule)
        self.per = per
        self.every_n_steps = every_n_steps

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
        return [self.every_n_steps] if self.per == "step" else []

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if self.per == "epoch":
            self._set(epoch)

    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        if self.per == "step":
            step = self.trainer.global_step
            self._set(step - step % self.every_n_steps)  # the start of the period this block lies in
