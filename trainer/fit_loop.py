"""The epoch loop of ``fit``: epochs, validation, callbacks, checkpoints, resume and preemption.

``FitLoop`` runs the epochs of one ``fit`` call over an :class:`~trainer.epochs.EpochRunner`: it restores the latest
checkpoint first (``epochs`` is an absolute target), writes checkpoints at every epoch's end and on their step period,
and on SIGTERM/SIGINT finishes the block, writes a checkpoint and raises :class:`TrainingInterrupted`. It drives the
compiled blocks through the :class:`~trainer.runner.BlockRunner` alone, and is itself the hooks of every training
block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trainer.callbacks import CallbackList, History, callback_states, restore_callback_states
from trainer.checkpoints import Checkpointer, Preemption, TrainingInterrupted
from trainer.cluster import check_same_start
from trainer.data import Data
from trainer.epochs import EpochRunner, Position
from trainer.inputs import eval_budget, validation_due
from trainer.runner import BlockHooks, BlockRunner
from trainer.step import BlockInfo

__all__ = ["ITERATOR", "FitLoop", "Validation"]

ITERATOR = "iterator"  # the checkpoint slot of a dataset's iterator


@dataclass
class Validation:
    """What ``fit`` validates on: the data, at most ``steps`` of its batches (None: all), on the epochs
    ``validation_freq`` selects (Keras' meaning: every N epochs, or a list of 1-based epochs)."""

    data: Data
    steps: int | None = None
    freq: int | Sequence[int] = 1

    def due(self, epoch: int) -> bool:
        return validation_due(epoch, self.freq)

    def evaluate(self, runner: BlockRunner, callbacks: CallbackList, epoch: int) -> dict[str, float]:
        """The validation logs; a non-finite value is a warning naming its key (it updates no weight)."""
        steps, exact = eval_budget(self.data, self.steps)
        logs = runner.evaluate(self.data.dataset(), steps, callbacks, exact=exact)
        bad = [key for key, value in logs.items() if not math.isfinite(value)]
        if bad:
            shown = ", ".join(f"val_{key}={logs[key]}" for key in bad)
            warnings.warn(
                f"validation data gave non-finite values at epoch {epoch + 1}: {shown}.", RuntimeWarning, stacklevel=3
            )
        return logs


class FitLoop(BlockHooks):
    """One ``fit`` call's epochs, with optional checkpoints (``checkpoint_dir``) and resume.

    It is also the hooks of every training block: batch callbacks, a checkpoint when due, a pending signal.
    """

    def __init__(
        self,
        runner: BlockRunner,
        epochs: EpochRunner,
        validation: Validation | None,
        callbacks: CallbackList,
        history: History,
        checkpointer: Checkpointer | None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = dict(settings or {})  # what the Trainer was given that a checkpoint's state overrides
        self.runner = runner
        self.epochs = epochs
        self.validation = validation
        self.callbacks = callbacks
        self.history = history
        self.checkpointer = checkpointer
        self.preemption: Preemption | None = None
        self.stop_agreed = False  # some process asked to stop; every worker stops at the same block
        self._saved_step = -1
        self._callback_states: list | None = None  # restored, applied after on_train_begin
        self._info: BlockInfo | None = None  # the epoch's last block (its logs: the trackers' values)

    # -- block hooks ----------------------------------------------------------------------------------------------

    def begin(self) -> None:
        self.callbacks.on_train_batch_begin(self.epochs.position.epoch_steps, None)

    def end(self, info: BlockInfo) -> None:
        self._info = info  # its logs are the epoch's when it is the last block (made only then)
        if info.ran and self.callbacks.listens("on_train_batch_end"):
            self.callbacks.on_train_batch_end(self.epochs.position.epoch_steps - 1, info.logs)
        step = self.runner.global_step
        if self.checkpointer is not None and self.checkpointer.every.due(step - info.ran, step):
            self._save()
        self.stop_agreed = self.stop_agreed or info.stopped
        # Under multi-worker a signal that arrived during this block stops every worker in the next one (agreed).
        self._check_preemption(local=not self.runner.multi_worker)

    def stop_requested(self) -> bool:
        return self.preemption is not None and self.preemption.signum is not None

    def should_stop(self) -> bool:
        return self.callbacks.stop_training

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def _save(self) -> str | None:
        if self.checkpointer is None:
            return None
        step = self.runner.global_step
        if self._saved_step != step or self.checkpointer.last_saved is None:
            meta = {
                "global_step": step,
                "position": dataclasses.asdict(self.epochs.position),
                "steps_per_epoch": self.epochs.steps,
                "history": self.history.history,
                "callbacks": callback_states(self.callbacks.callbacks),
                "settings": self.settings,
            }
            iterator = self.epochs.saved_iterator()
            self.checkpointer.save(step, meta, {} if iterator is None else {ITERATOR: iterator})
            self._saved_step = step
        return self.checkpointer.last_saved

    def _check_preemption(self, *, local: bool = True) -> None:
        """Save and raise when a stop was agreed in a block, or (``local``) when a signal arrived here."""
        signum = None if self.preemption is None else self.preemption.signum
        if self.stop_agreed or (local and signum is not None):
            raise TrainingInterrupted(signum or signal.SIGTERM, self.runner.global_step, self._save())

    def restore(self) -> int | None:
        """Restore the latest checkpoint, if any; returns the first epoch to run (None: nothing restored)."""
        if self.checkpointer is None:
            return None
        restored: dict[str, Any] = {}

        def attach(meta: dict[str, Any], saved: set[str]) -> dict[str, Any]:
            position = Position(**meta["position"])
            iterator = self.epochs.iterator_at(position, restored_by_checkpoint=ITERATOR in saved)
            restored.update(position=position, iterator=iterator)
            return {ITERATOR: iterator} if ITERATOR in saved else {}

        meta = self.checkpointer.restore(attach)
        if meta is None:
            return None
        position = restored["position"]
        saved_steps = meta.get("steps_per_epoch", self.epochs.steps)
        if position.mid_epoch and saved_steps != self.epochs.steps:
            warnings.warn(
                f"The checkpoint was saved after step {position.epoch_steps} of epoch {position.epoch + 1}, of "
                f"{saved_steps} steps per epoch; the data now gives {self.epochs.steps} (another batch size or "
                "data?). Training resumes at that step, but the rest of the epoch is not what the first run would "
                "have trained on.",
                RuntimeWarning,
                stacklevel=4,  # the user's fit call
            )
        self._check_settings(meta.get("settings"))
        self.epochs.resume(position, restored["iterator"])
        self.runner.global_step = self._saved_step = int(meta["global_step"])
        self.history.restore(meta["history"])
        self._callback_states = meta.get("callbacks")
        for callback in self.callbacks.callbacks:
            if hasattr(callback, "on_resume"):
                callback.on_resume(meta["history"], self.runner.global_step, position.epoch_steps)
        return position.epoch

    def _check_settings(self, saved: Mapping[str, Any] | None) -> None:
        """A resume restores the optimizer (its learning rate) and the loss weights: warn when the Trainer was given
        other values than the run that wrote the checkpoint (they would be replaced silently otherwise)."""
        keys = [key for key in self.settings if saved and key in saved and saved[key] != self.settings[key]]
        if not keys:
            return
        given, self.settings = self.settings, {**self.settings, **saved}  # later checkpoints: the state's lineage

        def said(values: Mapping[str, Any]) -> str:
            return " and ".join(f"{key}={values[key]!r}" for key in keys)

        warnings.warn(
            f"The run that wrote the checkpoint was given {said(saved)}; this Trainer was given {said(given)}. "
            "Training continues with the checkpoint's (an exact resume, as Keras' BackupAndRestore restores the "
            "optimizer). "
            "To change them, assign trainer.optimizer.learning_rate or trainer.loss_weights[key] in a callback's "
            "on_train_begin (it runs after the restore), or start a new run in another checkpoint_dir.",
            RuntimeWarning,
            stacklevel=4,  # the user's fit call
        )

    # -- the loop -------------------------------------------------------------------------------------------------

    def run(self, epochs: int, initial_epoch: int = 0) -> dict[str, float]:
        """Train to epoch ``epochs`` (absolute), from ``initial_epoch`` or, when a checkpoint is restored, from
        where it left off; returns the last epoch's logs."""
        runner, callbacks = self.runner, self.callbacks
        callbacks.follow_monitors(runner, validation=self.validation is not None)  # may raise: before any update
        first = self.restore()
        if runner.multi_worker:  # a collective: every worker's fit calls it (with or without checkpoints)
            directory = None if self.checkpointer is None else str(self.checkpointer.directory)
            restored = runner.global_step if first is not None else None
            validated = 0 if self.validation is None else eval_budget(self.validation.data, self.validation.steps)[0]
            check_same_start(
                runner.strategy,
                step=restored,
                epochs=epochs,
                steps=self.epochs.steps,
                validation=validated,
                checkpoint_dir=directory,
            )
        resumed = first is not None  # from checkpoint_dir (exact to the step): it wins over a Keras backup
        if not resumed:
            first = initial_epoch
            self.epochs.position.enter(first)
        position = self.epochs.position
        logs: dict[str, float] = {}
        # A signal reaches workers at different steps: under multi-worker the stop is agreed inside the next training
        # block (an all-reduce of the request), so all stop at the same step and none waits in a collective.
        alone = not runner.multi_worker
        catch = self.checkpointer is not None
        with Preemption() if catch else contextlib.nullcontext() as self.preemption:
            self.stop_agreed = False
            backed_up = callbacks.on_train_begin(None)
            restore_callback_states(callbacks.callbacks, self._callback_states)  # after Keras' own resets
            if backed_up is not None and not resumed:
                first = backed_up  # Keras' BackupAndRestore restored the weights after this many epochs
                position.enter(first)
            for epoch in range(first, epochs):
                if not (epoch == position.epoch and position.mid_epoch):
                    runner.reset("train")  # a resumed epoch keeps its restored trackers
                callbacks.on_epoch_begin(epoch, None)
                self._info = None
                self.epochs.run_epoch(epoch, self)
                logs = runner.logs("train", None if self._info is None else self._info.logs)
                if self.validation is not None and self.validation.due(epoch):
                    val = self.validation.evaluate(runner, callbacks, epoch)
                    logs.update({f"val_{key}": value for key, value in val.items()})
                callbacks.on_epoch_end(epoch, logs)
                position.next_epoch()
                self._save()  # every epoch's end (as Keras' BackupAndRestore): a crash loses one epoch at most
                if callbacks.stop_training:
                    break
                self._check_preemption(local=alone)
            # The checkpoint holds the state training continues from; then, as Model.fit: finalize (an EMA
            # optimizer's averages become the weights), and on_train_end sees the final weights.
            self._save()
            runner.finalize()
            callbacks.on_train_end(logs)
        return logs

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
