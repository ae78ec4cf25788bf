"""Checkpoints that resume exactly, and the signals that ask a run to stop.

A checkpoint holds everything the rest of the run depends on: the model's variables (the dropout RNG state is one of
them: Keras keeps ``SeedGenerator`` state in ``model.variables``), the optimizer's (its step counter, learning rate
and slots), the losses' own variables, the loss weights, the training trackers (an epoch resumed mid-way logs the
same means), the skipped-step counters, the step and epoch counters, the data position and the History so far.

Data position: numpy input is reshuffled from (seed, epoch), so ``(epoch of the pass, batches taken)`` is enough and
the resumed pass skips that many batches. A ``tf.data.Dataset``'s iterator is saved itself on one replica (tf.data
iterator checkpointing, which also covers shuffle buffers); a distributed iterator cannot be saved, so under a
multi-replica strategy the resumed pass replays the stored number of batches. A fresh epoch starts a fresh iterator
as the original run did. (A ``tf.data`` shuffle's order depends on TensorFlow's global seed and, with
``reshuffle_each_iteration=True``, on how many iterators the process made: for exact resume across epochs shuffle
with a seed and ``reshuffle_each_iteration=False``, and resume with the same global seed; or pass numpy input.)

Writes go through ``tf.train.CheckpointManager``: a checkpoint is written under a temporary name and only then named
in the ``checkpoint`` index, so a process killed mid-save leaves the previous checkpoint as the latest. Reads try
the newest checkpoint the index names, and fall back to older ones with a warning naming the file that failed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf

from trainer.cluster import is_chief

if TYPE_CHECKING:
    from trainer.trainer import Trainer

__all__ = ["Checkpointer", "Position", "Preemption", "TrainingInterrupted"]


class TrainingInterrupted(Exception):
    """fit stopped on SIGTERM/SIGINT after finishing its block of steps (and writing a checkpoint, if configured)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        if checkpoint:
            how = f"checkpoint written to {checkpoint}; call fit again with the same checkpoint_dir to resume."
        else:
            how = "no checkpoint was written (pass checkpoint_dir to fit to make runs resumable)."
        super().__init__(f"Training stopped by {name} after step {step}: {how}")


@dataclass
class Position:
    """Where a run is: ``epoch`` in progress (or next), ``epoch_steps`` done in it, and the data iterator's pass
    (``pass_epoch``: the epoch its dataset was built for, -1 for none; ``pass_position``: batches taken from it)."""

    epoch: int = 0
    epoch_steps: int = 0
    pass_epoch: int = -1
    pass_position: int = 0


class Preemption:
    """While active, SIGTERM and SIGINT set a flag instead of killing the process; a second signal acts as usual.

    Only the main thread can install handlers; elsewhere this does nothing (the signals keep their handlers).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # the next one is not intercepted

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class RunState(tf.train.experimental.PythonState):
    """The counters and the History, saved inside the checkpoint as JSON (not variables: nothing to distribute)."""

    def __init__(self) -> None:
        self.value: dict[str, Any] = {}

    def serialize(self) -> str:
        return json.dumps(self.value)

    def deserialize(self, string_value: bytes | str) -> None:
        self.value = json.loads(string_value)


class Checkpointer:
    """Writes resumable checkpoints of a Trainer's run and restores the latest readable one.

    Args:
        trainer: the built Trainer.
        directory: where ``ckpt-<global step>`` files and the ``checkpoint`` index go.
        every_n_steps: write every this many training steps (blocks end exactly on these steps); None: only at the
            end of training and on SIGTERM/SIGINT.
        max_to_keep: how many checkpoints to keep (at least 2, so that a damaged latest one has a fallback).
    """

    def __init__(self, trainer: Trainer, directory: str | os.PathLike, every_n_steps: int | None, max_to_keep: int = 3):
        self.trainer = trainer
        self.directory = Path(directory)  # read by every worker
        # Multi-worker: every worker saves (reading variables is a collective), only the chief into `directory`.
        self.chief = is_chief(trainer.strategy)
        self.write_directory = self.directory if self.chief else Path(tempfile.mkdtemp(prefix="tapeloop-worker-"))
        self.every_n_steps = every_n_steps
        self.max_to_keep = max(2, max_to_keep)
        self._run = RunState()
        self.last_saved: str | None = None

    def step_periods(self) -> list[int]:
        return [self.every_n_steps] if self.every_n_steps else []

    def _state(self, iterator: Any = None) -> tf.train.Checkpoint:
        trainer = self.trainer
        state: dict[str, Any] = {
            # Flat lists restore by position, whatever the layers' names; ``model`` also lets a user restore the
            # model alone with ``tf.train.Checkpoint(model=model)``.
            "model_variables": list(getattr(trainer.model, "variables", [])),
            "optimizer": list(trainer.optimizer.variables),
            "losses": trainer._objective.trainable_variables(),
            "loss_weights": dict(trainer._objective.weights),
            "trackers": trainer._trackers["train"].variables(),
            "skips": [trainer._steps.skipped, trainer._steps.consecutive],
            "run": self._run,
        }
        if isinstance(trainer.model, (tf.Module, keras.layers.Layer)):
            state["model"] = trainer.model
        if iterator is not None:
            state["iterator"] = iterator
        return tf.train.Checkpoint(**state)

    # -- writing --------------------------------------------------------------------------------------------------

    def save(self, position: Position, history: dict[str, list[float]], iterator: Any = None) -> str:
        """Write a checkpoint of the current state; ``iterator`` is the dataset iterator in use (None for numpy
        input or between epochs). Returns its path."""
        self._run.value = {
            "global_step": self.trainer.global_step,
            "position": dataclasses.asdict(position),
            "history": history,
        }
        # A manager per save: each checkpoint may or may not hold an iterator. It reads the index it extends.
        manager = tf.train.CheckpointManager(
            self._state(iterator), str(self.write_directory), max_to_keep=self.max_to_keep
        )
        self.last_saved = manager.save(checkpoint_number=self.trainer.global_step)
        return self.last_saved

    # -- reading --------------------------------------------------------------------------------------------------

    def candidates(self) -> list[str]:
        """Checkpoints named by the index, newest first (never found by globbing: a half-written one is not named)."""
        if not (self.directory / "checkpoint").exists():
            return []
        state = tf.train.get_checkpoint_state(str(self.directory))
        return list(reversed(state.all_model_checkpoint_paths)) if state else []

    def close(self) -> None:
        """Remove a non-chief worker's temporary directory."""
        if not self.chief:
            shutil.rmtree(self.write_directory, ignore_errors=True)

    def clean_up(self) -> None:
        """Remove what a process killed mid-save left behind (TensorFlow never deletes ``*_temp`` folders)."""
        if self.chief and self.directory.is_dir():
            for leftover in self.directory.glob("*_temp*"):
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)

    def restore(self, make_iterator) -> tuple[Position, dict[str, list[float]], Any] | None:
        """Restore the newest readable checkpoint; None when there is none.

        ``make_iterator(pass_epoch, pass_position)`` builds the data iterator for a position: for a dataset, a fresh
        iterator that the checkpoint then restores; for numpy input, the skipped pass. Returns (position, History
        so far, iterator or None).
        """
        self.clean_up()
        failed: list[str] = []
        for path in self.candidates():
            try:
                tf.train.Checkpoint(run=self._run).read(path).expect_partial()
                position = Position(**self._run.value["position"])
                names = tf.train.load_checkpoint(path).get_variable_to_shape_map()
                has_iterator = any(name.startswith("iterator/") for name in names)
                iterator = make_iterator(position.pass_epoch, position.pass_position, has_iterator)
                status = self._state(iterator if has_iterator else None).read(path)
                status.assert_existing_objects_matched()
            except Exception as err:
                warnings.warn(
                    f"Checkpoint {path} could not be restored ({type(err).__name__}: {str(err)[:200]}); "
                    "falling back to the previous one.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                failed.append(path)
                continue
            self.trainer.global_step = int(self._run.value["global_step"])
            return position, self._run.value["history"], iterator
        if failed:
            raise RuntimeError(f"No checkpoint in {self.directory} could be restored; tried {', '.join(failed)}.")
        return None
