"""Checkpoints that resume exactly, and the signals that ask a run to stop.

:class:`Checkpointer` knows nothing of the Trainer: it takes a mapping ``{name: trackable}`` (as detectron2's
checkpointer takes a state dict) plus a JSON-able ``meta`` dict per save. ``Trainer.checkpoint_state()`` gives
everything the rest of a run depends on: the model's variables (the dropout RNG state is one of them: Keras keeps
``SeedGenerator`` state in ``model.variables``), the optimizer's (its step counter, learning rate and slots), the
losses' own variables, the loss weights, the training trackers (an epoch resumed mid-way logs the same means) and
the skipped-step counters; the epoch loop adds the step and epoch counters, the data position and the History so
far as ``meta``, and the data iterator as an ``extra`` trackable when it can be saved.

Data position: numpy input is reshuffled from (seed, epoch), so ``(epoch of the pass, batches taken)`` is enough and
the resumed pass skips that many batches. A ``tf.data.Dataset``'s iterator is saved itself on one replica (tf.data
iterator checkpointing, which also covers shuffle buffers); a distributed iterator cannot be saved, so under a
multi-replica strategy the resumed pass replays the stored number of batches. A fresh epoch starts a fresh iterator
as the original run did. (A ``tf.data`` shuffle's order depends on TensorFlow's global seed and, with
``reshuffle_each_iteration=True``, on how many iterators the process made: for exact resume across epochs shuffle
with a seed and ``reshuffle_each_iteration=False``, and resume with the same global seed; or pass numpy input.)

Writes go through one ``tf.train.CheckpointManager`` for the run: a checkpoint is written under a temporary name
and only then named in the ``checkpoint`` index, so a process killed mid-save leaves the previous checkpoint as the
latest. Reads try the newest checkpoint the index names, and fall back to older ones with a warning naming the file
that failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import tensorflow as tf

from trainer.cadence import Every

__all__ = ["Checkpointer", "Preemption", "TrainingInterrupted", "read_meta"]


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
    """A JSON-able dict saved inside the checkpoint (counters, position, History: not variables, nothing to
    distribute)."""

    def __init__(self) -> None:
        self.value: dict[str, Any] = {}

    def serialize(self) -> str:
        return json.dumps(self.value)

    def deserialize(self, string_value: bytes | str) -> None:
        self.value = json.loads(string_value)


class Checkpointer:
    """Writes resumable checkpoints of a mapping of trackables and restores the newest readable one.

    Args:
        directory: where ``ckpt-<step>`` files and the ``checkpoint`` index go.
        state: ``{name: trackable}`` (variables, lists or dicts of them, modules, optimizers ...): what every
            checkpoint holds. Names ``run`` and those passed as ``extra`` to :meth:`save` are taken.
        every_n_steps: write every this many training steps (blocks end exactly on these steps); None: only when
            the loop asks (at epoch ends, at the end of training and on SIGTERM/SIGINT).
        max_to_keep: how many checkpoints to keep (at least 2, so that a damaged latest one has a fallback).
        chief: whether this process writes into ``directory``. Multi-worker: every worker saves (reading variables
            is a collective), only the chief into ``directory``, the others into a temporary one (see ``close``).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        state: Mapping[str, Any],
        *,
        every_n_steps: int | None = None,
        max_to_keep: int = 3,
        chief: bool = True,
    ) -> None:
        if "run" in state:
            raise ValueError("Checkpointer: the state name 'run' is reserved for the run's meta data.")
        self.directory = Path(directory)  # read by every worker
        self.chief = chief
        self.write_directory = self.directory if chief else Path(tempfile.mkdtemp(prefix="tapeloop-worker-"))
        self.every = Every(every_n_steps)
        self._meta = RunState()
        self._checkpoint = tf.train.Checkpoint(**state, run=self._meta)
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, str(self.write_directory), max_to_keep=max(2, max_to_keep)
        )
        self.last_saved: str | None = None

    def step_periods(self) -> list[int]:
        """Step periods training blocks must end on: ``every_n_steps``."""
        return [] if self.every.n is None else [self.every.n]

    @contextlib.contextmanager
    def _attached(self, extra: Mapping[str, Any]) -> Iterator[tf.train.Checkpoint]:
        """The checkpoint object with ``extra`` trackables attached, for one save or read."""
        for name, trackable in extra.items():
            setattr(self._checkpoint, name, trackable)
        try:
            yield self._checkpoint
        finally:
            for name in extra:
                delattr(self._checkpoint, name)

    # -- writing --------------------------------------------------------------------------------------------------

    def save(self, step: int, meta: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> str:
        """Write checkpoint ``ckpt-<step>`` of the state plus ``extra`` (e.g. a data iterator that exists only
        mid-epoch), with ``meta`` (JSON-able) inside it. Returns its path."""
        self._meta.value = dict(meta)
        with self._attached(extra or {}):
            self.last_saved = self._manager.save(checkpoint_number=step)
        return self.last_saved

    # -- reading --------------------------------------------------------------------------------------------------

    def candidates(self) -> list[str]:
        """Checkpoints named by the index, newest first (a half-written one is never named there). Without a
        readable index, the complete ``ckpt-N`` files present (their ``.index`` is written last), with a warning."""
        state = tf.train.get_checkpoint_state(str(self.directory)) if self.directory.is_dir() else None
        if state is not None:
            return list(reversed(state.all_model_checkpoint_paths))
        pattern = self.directory.glob("ckpt-*.index")
        numbered = [(int(n), p) for p in pattern if (n := p.stem.rsplit("-", 1)[1]).isdigit()]
        paths = [str(p.with_suffix("")) for _, p in sorted(numbered, reverse=True)]
        if paths:
            warnings.warn(
                f"{self.directory / 'checkpoint'} is missing or unreadable; resuming from the checkpoint files found "
                f"there, newest first: {', '.join(Path(p).name for p in paths)}.",
                RuntimeWarning,
                stacklevel=3,
            )
        return paths

    def close(self) -> None:
        """Remove a non-chief worker's temporary directory."""
        if not self.chief:
            shutil.rmtree(self.write_directory, ignore_errors=True)

    def clean_up(self) -> None:
        """Remove what a process killed mid-save left behind (TensorFlow never deletes ``*_temp`` folders)."""
        if self.chief and self.directory.is_dir():
            for leftover in self.directory.glob("*_temp*"):
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)

    def restore(
        self, attach: Callable[[dict[str, Any], set[str]], Mapping[str, Any]] = lambda meta, saved: {}
    ) -> dict[str, Any] | None:
        """Restore the newest readable checkpoint and return its ``meta``; None when there is none.

        ``attach(meta, saved)`` is called first with the checkpoint's meta and the top-level names it holds (the
        state's, ``run``, and any extras it was saved with); it returns the extras to restore into (e.g. a fresh
        data iterator built for the saved position). A checkpoint that cannot be read, or does not match the
        state, is skipped with a warning naming it, and the previous one is tried; a failed read changes nothing.

        Raises:
            RuntimeError: checkpoints exist but none could be restored (the message names them).
        """
        self.clean_up()
        failed: list[str] = []
        for path in self.candidates():
            try:
                meta = RunState()
                tf.train.Checkpoint(run=meta).read(path).expect_partial()
                names = tf.train.load_checkpoint(path).get_variable_to_shape_map()
                saved = {name.split("/")[0] for name in names}
                extra = attach(meta.value, saved)
                with self._attached(extra) as checkpoint:
                    # Every object of the state must be in the file; values the state does not have yet (the
                    # save counter, created at the first save) are expected: no warnings about them.
                    checkpoint.read(path).assert_existing_objects_matched().expect_partial()
            except Exception as err:
                warnings.warn(
                    f"Checkpoint {path} could not be restored ({type(err).__name__}: {str(err)[:200]}); "
                    "falling back to the previous one.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                failed.append(path)
                continue
            return meta.value
        if failed:
            raise RuntimeError(f"No checkpoint in {self.directory} could be restored; tried {', '.join(failed)}.")
        return None


def read_meta(directory: str | os.PathLike) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` whose meta can be read, and that meta; None when there is none.

    For tools that ask where a run stands (the CLI: "resumed from", "nothing to do") without restoring anything.
    """
    state = tf.train.get_checkpoint_state(str(directory)) if (Path(directory) / "checkpoint").exists() else None
    for path in reversed(state.all_model_checkpoint_paths if state else []):
        meta = RunState()
        try:
            tf.train.Checkpoint(run=meta).read(path).expect_partial()
        except Exception:
            continue
        return path, meta.value
    return None
