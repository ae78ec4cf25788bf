"""The epoch loop of ``fit``: epochs over one data source, checkpoints, resume and preemption.

``EpochRunner`` decides which batches an epoch sees (a fresh pass per epoch, or with ``steps_per_epoch`` one iterator
running on) and keeps the data :class:`Position` a checkpoint records. ``FitLoop`` runs the epochs: it restores the
latest checkpoint first (``epochs`` is an absolute target), writes checkpoints on their step period, and on
SIGTERM/SIGINT finishes the block, writes a checkpoint and raises :class:`TrainingInterrupted`. The Trainer's
``_run_blocks`` runs the batches in compiled blocks.
"""

from __future__ import annotations

import contextlib
import signal
from typing import TYPE_CHECKING, Any

import tensorflow as tf

from trainer.callbacks import CallbackList, History
from trainer.checkpoints import Checkpointer, Position, Preemption, TrainingInterrupted
from trainer.cluster import is_multi_worker
from trainer.data import Data
from trainer.errors import DataError

if TYPE_CHECKING:
    from trainer.trainer import Trainer

__all__ = ["EpochRunner", "FitLoop"]


class EpochRunner:
    """Training epochs over one data source: a fresh pass per epoch, or (with steps_per_epoch) one running on."""

    def __init__(self, trainer: Trainer, data: Data, steps_per_epoch: int | None) -> None:
        self.trainer = trainer
        self.data = data
        self.steps_per_epoch = steps_per_epoch
        self.iterator: Any = None
        self.position = Position()

    def make_iterator(self, pass_epoch: int, pass_position: int, restored_by_checkpoint: bool) -> Any:
        """The iterator of a saved position: numpy input skips to it; a dataset's iterator is restored by the
        checkpoint, or — a distributed iterator cannot be checkpointed — replays ``pass_position`` batches."""
        if pass_epoch < 0:
            return None
        if not self.data.is_dataset:
            return self.trainer._distribute(self.data.dataset(pass_epoch, skip_batches=pass_position))
        iterator = self.trainer._distribute(self.data.dataset(pass_epoch))
        if not restored_by_checkpoint:
            for _ in range(pass_position):  # reads the batches again, computes nothing
                next(iterator)
        return iterator

    def resume(self, position: Position, iterator: Any) -> None:
        self.position, self.iterator = position, iterator

    def saved_iterator(self) -> Any:
        """What a checkpoint stores of the data: a dataset's iterator when it can be checkpointed (one replica);
        otherwise the position alone (numpy input; a distributed iterator)."""
        trackable = isinstance(self.iterator, tf.__internal__.tracking.Trackable)
        return self.iterator if self.data.is_dataset and trackable else None

    @property
    def steps(self) -> int | None:
        """Training steps (optimizer updates) per epoch; None when the data's length is unknown."""
        if self.steps_per_epoch is not None or self.data.steps is None:
            return self.steps_per_epoch
        return -(-self.data.steps // self.trainer.gradient_accumulation_steps)  # a short last group is a step

    def epoch(self, epoch: int, cbs: CallbackList, after_block) -> None:
        """Run one epoch's training steps (the rest of it, when resumed mid-epoch)."""
        trainer, pos = self.trainer, self.position
        if pos.epoch != epoch:
            pos.epoch, pos.epoch_steps = epoch, 0
        k = trainer.gradient_accumulation_steps  # batches per step
        limit = self.steps  # None: until the data ends
        per_epoch = self.steps_per_epoch is None
        while limit is None or pos.epoch_steps < limit:
            fresh = self.iterator is None
            if fresh:
                self.iterator = trainer._distribute(self.data.dataset(epoch))
                pos.pass_epoch, pos.pass_position = epoch, 0
            offset = pos.epoch_steps

            def on_block(event: str, index: int, logs: dict[str, float] | None, offset: int = offset) -> None:
                getattr(cbs, f"on_train_batch_{event}")(index + offset, logs)

            def advanced(ran: int) -> None:
                pos.epoch_steps += ran
                pos.pass_position += ran * k  # in batches (a short last step ends its pass anyway)
                after_block()

            budget = None if limit is None else limit - pos.epoch_steps
            # the pass holds exactly `budget` more steps' batches
            known = per_epoch and limit is not None and self.data.steps % k == 0
            _, ended = trainer._run_blocks("train", self.iterator, budget, on_block, advanced, known_length=known)
            if ended or per_epoch:
                if pos.pass_position == 0:
                    raise DataError("training data is empty: a pass over it yielded no batch.")
                if ended:
                    self.iterator = None  # finite data: the next block starts a new pass
            if per_epoch or trainer._stop.stop_training:
                break
        if per_epoch:
            self.iterator = None
            pos.pass_epoch, pos.pass_position = -1, 0

    def next_epoch(self) -> None:
        self.position.epoch += 1
        self.position.epoch_steps = 0


class FitLoop:
    """One ``fit`` call's epochs, with optional checkpoints (``checkpoint_dir``) and resume."""

    def __init__(
        self,
        trainer: Trainer,
        runner: EpochRunner,
        val: Data | None,
        cbs: CallbackList,
        history: History,
        checkpointer: Checkpointer | None,
    ) -> None:
        self.trainer = trainer
        self.runner = runner
        self.val = val
        self.cbs = cbs
        self.history = history
        self.checkpointer = checkpointer
        self.preemption: Preemption | None = None
        self._saved_step = -1

    def _save(self) -> str | None:
        if self.checkpointer is None:
            return None
        if self._saved_step != self.trainer.global_step or self.checkpointer.last_saved is None:
            self.checkpointer.save(self.runner.position, self.history.history, self.runner.saved_iterator())
            self._saved_step = self.trainer.global_step
        return self.checkpointer.last_saved

    def _check_preemption(self, *, local: bool = True) -> None:
        """Save and raise when a stop was agreed in a block, or (``local``) when a signal arrived here."""
        signum = None if self.preemption is None else self.preemption.signum
        if self.trainer._stop_agreed or (local and signum is not None):
            raise TrainingInterrupted(signum or signal.SIGTERM, self.trainer.global_step, self._save())

    def after_block(self) -> None:
        """After each training block and its callbacks: a checkpoint when due, then a pending signal."""
        every = self.checkpointer.every_n_steps if self.checkpointer else None
        step = self.trainer.global_step
        if every and step % every == 0 and step != self._saved_step:
            self._save()
        self._check_preemption()

    def restore(self) -> int:
        """Restore the latest checkpoint, if any; returns the first epoch to run."""
        if self.checkpointer is None:
            return 0
        restored = self.checkpointer.restore(self.runner.make_iterator)
        if restored is None:
            return 0
        position, past, iterator = restored
        self.runner.resume(position, iterator)
        self.history.restore(past)
        self._saved_step = self.trainer.global_step
        for callback in self.cbs.callbacks:
            if hasattr(callback, "on_resume"):
                callback.on_resume(past, self.trainer.global_step, position.epoch_steps)
        return position.epoch

    def run(self, epochs: int) -> dict[str, float]:
        trainer, cbs, runner = self.trainer, self.cbs, self.runner
        first = self.restore()
        logs: dict[str, float] = {}
        # A signal reaches workers at different steps: under multi-worker the stop is agreed inside the next training
        # block (an all-reduce of the request), so all stop at the same step and none waits in a collective.
        alone = not is_multi_worker(trainer.strategy)
        catch = self.checkpointer is not None
        with Preemption() if catch else contextlib.nullcontext() as self.preemption:
            trainer._stop_agreed = False
            trainer._stop_requested = lambda: self.preemption is not None and self.preemption.signum is not None
            cbs.on_train_begin(None)
            for epoch in range(first, epochs):
                if not (epoch == runner.position.epoch and runner.position.epoch_steps > 0):
                    trainer._reset_epoch()  # a resumed epoch keeps its restored trackers
                cbs.on_epoch_begin(epoch, None)
                runner.epoch(epoch, cbs, self.after_block)
                logs = trainer._epoch_logs()
                if self.val is not None:
                    logs.update({f"val_{k}": v for k, v in trainer._evaluate(self.val, cbs).items()})
                cbs.on_epoch_end(epoch, logs)
                runner.next_epoch()
                if trainer._stop.stop_training:
                    break
                self._check_preemption(local=alone)
            cbs.on_train_end(logs)
            self._save()
        return logs

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
