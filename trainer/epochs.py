"""The epoch loop of ``fit``: epochs over one data source, checkpoints, resume and preemption.

``EpochRunner`` decides which batches an epoch sees, through one of two iterator policies — :class:`FreshPasses`
(every epoch one new pass over the data) or :class:`RunningIterator` (with ``steps_per_epoch``: one iterator runs
on across epochs) — and keeps the :class:`Position` a checkpoint records. ``FitLoop`` runs the epochs: it restores
the latest checkpoint first (``epochs`` is an absolute target), writes checkpoints on their step period, and on
SIGTERM/SIGINT finishes the block, writes a checkpoint and raises :class:`TrainingInterrupted`. Both drive the
compiled blocks through the :class:`~trainer.runner.BlockRunner` alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from trainer.callbacks import CallbackList, History, callback_states, restore_callback_states
from trainer.checkpoints import Checkpointer, Preemption, TrainingInterrupted
from trainer.data import Data
from trainer.errors import DataError
from trainer.inputs import eval_budget, validation_due
from trainer.runner import BlockHooks, BlockRunner
from trainer.step import BlockInfo

__all__ = [
    "INEXACT_AT_EPOCH_ENDS",
    "EpochRunner",
    "FitLoop",
    "FreshPasses",
    "Position",
    "RunningIterator",
    "Validation",
]

ITERATOR = "iterator"  # the checkpoint slot of a dataset's iterator
INEXACT_AT_EPOCH_ENDS = (
    "this training data resumes exactly from mid-epoch checkpoints only: a tf.data dataset of unknown length, or "
    "under several replicas, gets a fresh iterator per epoch, whose shuffle order a new process cannot continue."
)


@dataclass
class Position:
    """Where a run is: ``epoch`` in progress (or next), ``epoch_steps`` done in it, and the data iterator's pass
    (``pass_epoch``: the epoch its dataset was built for, -1 for none; ``pass_position``: batches taken from it)."""

    epoch: int = 0
    epoch_steps: int = 0
    pass_epoch: int = -1
    pass_position: int = 0

    def enter(self, epoch: int) -> None:
        """Epoch ``epoch`` runs (its first step, or the rest of it when it was resumed mid-way)."""
        if self.epoch != epoch:
            self.epoch, self.epoch_steps = epoch, 0

    @property
    def mid_epoch(self) -> bool:
        return self.epoch_steps > 0

    def start_pass(self, epoch: int) -> None:
        self.pass_epoch, self.pass_position = epoch, 0

    def end_pass(self) -> None:
        self.pass_epoch, self.pass_position = -1, 0

    def advance(self, steps: int, batches_per_step: int) -> None:
        """``steps`` training steps ran (a short last step of a pass ends the pass anyway)."""
        self.epoch_steps += steps
        self.pass_position += steps * batches_per_step

    def next_epoch(self) -> None:
        self.epoch, self.epoch_steps = self.epoch + 1, 0


class FreshPasses:
    """Every epoch is one new pass over the data: numpy input (reshuffled from (seed, epoch), so exact at any
    step), and datasets of unknown length or under several replicas (exact mid-epoch only)."""

    repeat = False

    def __init__(self, data: Data, batches_per_step: int) -> None:
        self.steps = None if data.steps is None else -(-data.steps // batches_per_step)  # a short group is a step
        self.exact = data.steps is not None and data.steps % batches_per_step == 0  # the pass holds every step

    def run_epoch(self, epochs: EpochRunner, run) -> None:
        iterator = epochs.iterator or epochs.open_pass()
        budget = None if self.steps is None else self.steps - epochs.position.epoch_steps
        _, ended = run(iterator, budget, self.exact)
        if ended:
            epochs.check_not_empty()
        epochs.close_pass()


class RunningIterator:
    """One iterator runs on across epochs of ``steps`` steps each. Over a dataset of known length (one replica) it
    is an iterator over ``dataset.repeat()``: checkpointed with its shuffle state, it resumes exactly at any step,
    epoch boundaries included. Otherwise a new pass starts when finite data ends."""

    def __init__(self, steps: int, *, repeat: bool) -> None:
        self.steps = steps
        self.repeat = repeat
        self.exact = repeat  # a repeated dataset never ends inside a block

    def run_epoch(self, epochs: EpochRunner, run) -> None:
        while epochs.position.epoch_steps < self.steps:
            iterator = epochs.iterator or epochs.open_pass()
            _, ended = run(iterator, self.steps - epochs.position.epoch_steps, self.exact)
            if not ended:
                return  # the epoch's steps ran, or a callback stopped training
            epochs.check_not_empty()
            epochs.close_pass()


class _Advancing(BlockHooks):
    """The caller's hooks, with the position advanced first after every block."""

    def __init__(self, hooks: BlockHooks, position: Position, batches_per_step: int) -> None:
        self.hooks, self.position, self.batches_per_step = hooks, position, batches_per_step

    def begin(self) -> None:
        self.hooks.begin()

    def end(self, info: BlockInfo) -> None:
        self.position.advance(info.ran, self.batches_per_step)
        self.hooks.end(info)

    def stop_requested(self) -> bool:
        return self.hooks.stop_requested()

    def should_stop(self) -> bool:
        return self.hooks.should_stop()


class EpochRunner:
    """Training epochs over one data source, with an iterator policy chosen from the data.

    With ``steps_per_epoch``, or for a ``tf.data.Dataset`` of known length on one replica (whose epochs are then
    ``cardinality`` batches of one repeated iterator), :class:`RunningIterator`; otherwise :class:`FreshPasses`.

    Args:
        runner: runs the compiled blocks.
        data: the training data.
        steps_per_epoch: steps per epoch, or None for one pass over the data.
        batches_per_step: ``gradient_accumulation_steps``.
    """

    def __init__(self, runner: BlockRunner, data: Data, steps_per_epoch: int | None, batches_per_step: int) -> None:
        self.runner = runner
        self.data = data
        self.batches_per_step = batches_per_step
        one_replica = runner.strategy.num_replicas_in_sync == 1
        repeat = data.is_dataset and data.steps is not None and one_replica  # its iterator can be checkpointed
        whole_steps = data.steps is not None and data.steps % batches_per_step == 0  # no short group at the end
        if steps_per_epoch is not None:
            self.policy: FreshPasses | RunningIterator = RunningIterator(steps_per_epoch, repeat=repeat)
        elif repeat and whole_steps:
            self.policy = RunningIterator(data.steps // batches_per_step, repeat=True)
        else:
            self.policy = FreshPasses(data, batches_per_step)
        self.iterator: Any = None
        self.position = Position()

    @property
    def exact_at_epoch_ends(self) -> bool:
        """Whether a resume from a checkpoint taken at an epoch's end gives the epochs an uninterrupted run gets."""
        return not self.data.is_dataset or self.policy.repeat

    def _dataset(self, epoch: int, skip_batches: int = 0) -> tf.data.Dataset:
        dataset = self.data.dataset(epoch, skip_batches=skip_batches)
        return dataset.repeat() if self.policy.repeat else dataset

    @property
    def steps(self) -> int | None:
        """Training steps (optimizer updates) per epoch; None when the data's length is unknown."""
        return self.policy.steps

    def open_pass(self) -> Any:
        """A new pass over the data, built for the current epoch."""
        self.position.start_pass(self.position.epoch)
        self.iterator = self.runner.distribute(self._dataset(self.position.epoch))
        return self.iterator

    def close_pass(self) -> None:
        self.iterator = None
        self.position.end_pass()

    def check_not_empty(self) -> None:
        if self.position.pass_position == 0:
            raise DataError("training data is empty: a pass over it yielded no batch.")

    def run_epoch(self, epoch: int, hooks: BlockHooks) -> None:
        """Run epoch ``epoch``'s training steps (the rest of it, when resumed mid-epoch)."""
        self.position.enter(epoch)
        hooks = _Advancing(hooks, self.position, self.batches_per_step)
        self.policy.run_epoch(self, lambda it, budget, exact: self.runner.run("train", it, budget, hooks, exact=exact))

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def resume(self, position: Position, iterator: Any) -> None:
        self.position, self.iterator = position, iterator

    def iterator_at(self, position: Position, restored_by_checkpoint: bool) -> Any:
        """The iterator of a saved position: numpy input skips to it; a dataset's iterator is restored by the
        checkpoint, or — a distributed iterator cannot be checkpointed — replays ``pass_position`` batches."""
        if position.pass_epoch < 0:
            return None
        if not self.data.is_dataset:
            return self.runner.distribute(self._dataset(position.pass_epoch, skip_batches=position.pass_position))
        iterator = self.runner.distribute(self._dataset(position.pass_epoch))
        if not restored_by_checkpoint:
            for _ in range(position.pass_position):  # reads the batches again, computes nothing
                next(iterator)
        return iterator

    def saved_iterator(self) -> Any:
        """What a checkpoint stores of the data: a dataset's iterator when it can be checkpointed (one replica);
        otherwise None, and the position alone is enough (numpy input) or is replayed (a distributed iterator)."""
        trackable = isinstance(self.iterator, tf.__internal__.tracking.Trackable)
        return self.iterator if self.data.is_dataset and trackable else None


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
    ) -> None:
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

    # -- block hooks ----------------------------------------------------------------------------------------------

    def begin(self) -> None:
        self.callbacks.on_train_batch_begin(self.epochs.position.epoch_steps, None)

    def end(self, info: BlockInfo) -> None:
        if info.ran:
            self.callbacks.on_train_batch_end(self.epochs.position.epoch_steps - 1, info.logs)
        step = self.runner.global_step
        if self.checkpointer is not None and self.checkpointer.every.due(step - info.ran, step):
            self._save()
        self.stop_agreed = self.stop_agreed or info.stopped
        self._check_preemption()

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
                "callbacks": callback_states(self.callbacks.callbacks),
            }
            iterator = self.epochs.saved_iterator()
            extra = {} if iterator is None else {ITERATOR: iterator}
            self.checkpointer.save(step, {**meta, "history": self.history.history}, extra)
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
        self.epochs.resume(position, restored["iterator"])
        self.runner.global_step = self._saved_step = int(meta["global_step"])
        self.history.restore(meta["history"])
        self._callback_states = meta.get("callbacks")
        for callback in self.callbacks.callbacks:
            if hasattr(callback, "on_resume"):
                callback.on_resume(meta["history"], self.runner.global_step, position.epoch_steps)
        return position.epoch

    # -- the loop -------------------------------------------------------------------------------------------------

    def run(self, epochs: int, initial_epoch: int = 0) -> dict[str, float]:
        """Train to epoch ``epochs`` (absolute), from ``initial_epoch`` or, when a checkpoint is restored, from
        where it left off; returns the last epoch's logs."""
        runner, callbacks = self.runner, self.callbacks
        first = self.restore()
        if first is None:
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
            callbacks.on_train_begin(None)
            restore_callback_states(callbacks.callbacks, self._callback_states)  # after Keras' own resets
            for epoch in range(first, epochs):
                if not (epoch == position.epoch and position.mid_epoch):
                    runner.reset("train")  # a resumed epoch keeps its restored trackers
                callbacks.on_epoch_begin(epoch, None)
                self.epochs.run_epoch(epoch, self)
                logs = runner.logs("train")
                if self.validation is not None and self.validation.due(epoch):
                    val = self.validation.evaluate(runner, callbacks, epoch)
                    logs.update({f"val_{key}": value for key, value in val.items()})
                callbacks.on_epoch_end(epoch, logs)
                position.next_epoch()
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
