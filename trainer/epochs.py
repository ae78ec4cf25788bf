"""Which batches an epoch sees: ``EpochRunner`` and its two iterator policies.

:class:`FreshPasses` (every epoch one new pass over the data) or :class:`RunningIterator` (one iterator running on
across epochs: with ``steps_per_epoch``, and for every ``tf.data`` dataset of known length whose iterator can be
checkpointed, as an iterator over ``dataset.repeat()``). The :class:`Position` a checkpoint records advances
itself. The epoch loop of ``fit`` that drives it is ``trainer/fit_loop.py``.
"""

from __future__ import annotations

import os
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from trainer.data import Data
from trainer.errors import DataError
from trainer.runner import BlockHooks, BlockRunner
from trainer.step import BlockInfo

__all__ = [
    "INEXACT_AT_EPOCH_ENDS",
    "EpochRunner",
    "FreshPasses",
    "Position",
    "RunningIterator",
]

INEXACT_AT_EPOCH_ENDS = (
    "this training data resumes exactly from mid-epoch checkpoints only: a tf.data dataset of unknown length, under "
    "several replicas, or with Python state (from_generator, py_function: its iterator cannot be saved; a resume "
    "replays the epoch's batches) gets a fresh iterator per epoch, whose order a new process cannot continue."
)


_SERIALIZABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # dataset -> bool


def serializable(dataset: tf.data.Dataset) -> bool:
    """Whether an iterator over ``dataset`` can go into a checkpoint: not with Python state inside it
    (``from_generator``, ``py_function``), which tf.data refuses to save. Tried once per dataset, on a fresh,
    unstarted iterator, checkpointing or not (the probe makes an iterator: a reshuffling dataset must see the same
    orders either way)."""
    if dataset not in _SERIALIZABLE:
        with tempfile.TemporaryDirectory() as directory:
            try:
                tf.train.Checkpoint(iterator=iter(dataset)).write(os.path.join(directory, "probe"))
                _SERIALIZABLE[dataset] = True
            except (tf.errors.FailedPreconditionError, tf.errors.UnimplementedError):
                _SERIALIZABLE[dataset] = False
    return _SERIALIZABLE[dataset]


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
        saveable: (a dataset) whether its iterator can be checkpointed (:func:`serializable`).
    """

    def __init__(
        self,
        runner: BlockRunner,
        data: Data,
        steps_per_epoch: int | None,
        batches_per_step: int,
        *,
        saveable: bool = True,
    ) -> None:
        self.runner = runner
        self.data = data
        self.batches_per_step = batches_per_step
        one_replica = runner.strategy.num_replicas_in_sync == 1
        # Checkpoints hold a dataset's iterator when it can be saved: one replica, no Python state inside.
        self.saves_iterator = data.is_dataset and one_replica and saveable
        repeat = self.saves_iterator and data.steps is not None
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
        return self.runner.repeated(dataset) if self.policy.repeat else dataset

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
        return self.iterator if self.saves_iterator and self.iterator is not None else None
