"""Periodic checkpoints: model, optimizer, loss weights and the global step, every N training steps.

``CheckpointCallback`` writes ``ckpt-<step>`` through ``tf.train.CheckpointManager`` (the ``checkpoint`` index file
names the latest; the last 3 are kept). These checkpoints can be restored with ``tf.train.Checkpoint``; automatic
resume of an interrupted ``fit`` (iterator position, trackers, RNG state) is not part of this module yet.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import keras
import tensorflow as tf

from trainer.writers import Every

if TYPE_CHECKING:
    from trainer.trainer import Trainer

__all__ = ["CheckpointCallback"]


class CheckpointCallback(keras.callbacks.Callback):
    """Save a checkpoint whenever a block crosses a multiple of ``every_n_steps`` global steps, and at the end.

    Args:
        trainer: the Trainer whose model, optimizer and loss weights are saved.
        directory: where ``ckpt-<step>`` files and the ``checkpoint`` index go.
        every_n_steps: the period in training steps.
        max_to_keep: how many checkpoints to keep.
    """

    def __init__(self, trainer: Trainer, directory: str | os.PathLike, every_n_steps: int, max_to_keep: int = 3):
        super().__init__()
        self.trainer = trainer
        self.directory = os.fspath(directory)
        self.every = Every(every_n_steps)
        self.max_to_keep = max_to_keep
        self._manager: tf.train.CheckpointManager | None = None
        self._saved_step = -1
        self._last_step = 0

    def _save(self) -> None:
        step = self.trainer.global_step
        if step == self._saved_step:
            return
        if self._manager is None:
            state = tf.train.Checkpoint(
                model=self.trainer.model,
                optimizer=self.trainer.optimizer,
                loss_weights=dict(self.trainer.loss_weights),
            )
            self._manager = tf.train.CheckpointManager(state, self.directory, max_to_keep=self.max_to_keep)
        self._manager.save(checkpoint_number=step)
        self._saved_step = step

    def step_periods(self) -> list[int]:
        """The Trainer ends blocks on these periods, so checkpoints land on exact multiples of ``every_n_steps``."""
        return [self.every.n]

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        step = self.trainer.global_step
        if self.every.due(self._last_step, step):
            self._save()
        self._last_step = step

    def on_train_end(self, logs=None) -> None:
        self._save()
