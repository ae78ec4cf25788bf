"""Writers: where logged values go — progress bar, CSV, TensorBoard — behind one small protocol, composed.

A :class:`Writer` gets three calls: ``begin_epoch``, ``write_scalars(step, values)`` after each compiled block
(running epoch means at a global step), and ``write_epoch(epoch, values)`` once per epoch (training and ``val_``
values). :class:`WriterCallback` plugs any writers into ``Trainer.fit(callbacks=[...])``, so a notebook gets the
same files as the command line. Cadence decisions go through :class:`~trainer.cadence.Every`.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from trainer.cadence import Every

__all__ = [
    "CSVWriter",
    "MultiWriter",
    "ProgressWriter",
    "TensorBoardWriter",
    "Writer",
    "WriterCallback",
    "format_value",
    "progress_writers",
    "split_validation",
]


def format_value(value: float) -> str:
    """A logged number as short as it can be while keeping the precision it has: a value that is a float32 (every
    value computed in the graph) is written as the shortest decimal that reads back to that float32 (``0.001``, not
    ``0.0010000000474974513``); any other float in full (``repr``)."""
    value = float(value)
    single = np.float32(value)
    return str(single) if float(single) == value and np.isfinite(single) else repr(value)


def split_validation(scalars: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """An epoch's logs as (training values, validation values with ``val_`` dropped)."""
    train = {key: value for key, value in scalars.items() if not key.startswith("val_")}
    validation = {key[len("val_") :]: value for key, value in scalars.items() if key.startswith("val_")}
    return train, validation


def format_scalars(scalars: Mapping[str, float]) -> str:
    return " - ".join(f"{key}: {value:.4g}" for key, value in scalars.items())


def fit_width(text: str, width: int) -> str:
    """``text`` cut to ``width`` columns at a `` - `` separator, with ``…`` when something was left out."""
    if len(text) <= width:
        return text
    parts, kept = text.split(" - "), ""
    for part in parts:
        candidate = f"{kept} - {part}" if kept else part
        if len(candidate) + 2 > width:
            break
        kept = candidate
    return f"{kept} …" if kept else text[: max(0, width - 1)] + "…"


def wrap_line(text: str, width: int) -> str:
    """``text`` broken at `` - `` separators into lines of at most ``width`` columns (a part longer stays whole)."""
    lines, line = [], ""
    for part in text.split(" - "):
        candidate = f"{line} - {part}" if line else part
        if line and len(candidate) > width:
            lines.append(line)
            candidate = f"  {part}"
        line = candidate
    return "\n".join([*lines, line])


class Writer:
    """The writer protocol; every method is optional (the defaults do nothing)."""

    def begin_epoch(self, epoch: int, epochs: int, steps: int | None) -> None:
        """An epoch (0-based) of ``epochs`` starts; ``steps`` is its length if known."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Running epoch means after global step ``step`` (1-based)."""

    def write_epoch(self, epoch: int, scalars: Mapping[str, float]) -> None:
        """The epoch's final values, validation included."""

    def close(self) -> None:
        """Flush and release; called at the end of every fit, also when training failed (it must be idempotent)."""

    def step_periods(self) -> list[int]:
        """Step periods this writer acts on; training blocks end on their multiples (see trainer/blocks.py)."""
        return []

    def resume(self, history: Mapping[str, list[float]], step: int) -> None:
        """A resumed fit: ``history`` holds the epochs already done, ``step`` is the global step at which the
        resumed epoch began (the next ``write_scalars`` steps count on from it)."""


class MultiWriter(Writer):
    """Several writers as one."""

    def __init__(self, writers: Sequence[Writer]) -> None:
        self.writers = list(writers)

    def begin_epoch(self, epoch: int, epochs: int, steps: int | None) -> None:
        for writer in self.writers:
            writer.begin_epoch(epoch, epochs, steps)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for writer in self.writers:
            writer.write_scalars(step, scalars)

    def write_epoch(self, epoch: int, scalars: Mapping[str, float]) -> None:
        for writer in self.writers:
            writer.write_epoch(epoch, scalars)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    def step_periods(self) -> list[int]:
        return [p for writer in self.writers for p in writer.step_periods()]

    def resume(self, history: Mapping[str, list[float]], step: int) -> None:
        for writer in self.writers:
            writer.resume(history, step)


def terminal_width(stream: IO[str]) -> int | None:
    """Columns of the terminal ``stream`` writes to; None when it reports no size (not a terminal, no descriptor)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return None


class ProgressWriter(Writer):
    """A tqdm bar per epoch on a terminal, one plain line per epoch otherwise.

    The bar fits the terminal: its running values are cut at a key (``…`` marks the rest) so the bar keeps its
    width; at the epoch's end every key, validation included, is printed under it, wrapped to the width.

    Args:
        stream: where to write (default stderr).
        bar: force the bar on or off; None: a bar on a terminal, unless it reports fewer than ``MIN_WIDTH``
            columns (a zero-width terminal: tqdm would print blank lines).
    """

    MIN_WIDTH = 40  # narrower (or a zero-width terminal): plain lines
    BAR_COLUMNS = 70  # what tqdm needs besides the values: label, percentage, bar, counts, time, rate

    def __init__(self, stream: IO[str] | None = None, *, bar: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        is_terminal = hasattr(self.stream, "isatty") and self.stream.isatty()
        width = terminal_width(self.stream)
        self.interactive = is_terminal and (width is None or width >= self.MIN_WIDTH) if bar is None else bar
        self._bar: Any = None
        self._epoch_label = ""
        self._start = 0.0
        self._steps_done = 0
        self._epoch_start_step = 0

    def _columns(self) -> int:
        return terminal_width(self.stream) or 100

    def begin_epoch(self, epoch: int, epochs: int, steps: int | None) -> None:
        self._epoch_label = f"Epoch {epoch + 1}/{epochs}"
        self._start = time.perf_counter()
        self._epoch_start_step = self._steps_done
        if self.interactive:
            self._bar = tqdm(total=steps, desc=self._epoch_label, unit="step", file=self.stream, dynamic_ncols=True)

    def resume(self, history: Mapping[str, list[float]], step: int) -> None:
        self._steps_done = step

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._bar is not None:
            self._bar.update(step - self._steps_done)
            budget = self._columns() - self.BAR_COLUMNS
            self._bar.set_postfix_str(fit_width(format_scalars(scalars), budget) if budget > 0 else "", refresh=False)
        self._steps_done = step

    def write_epoch(self, epoch: int, scalars: Mapping[str, float]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            print("  " + wrap_line(format_scalars(scalars), self._columns() - 2), file=self.stream)
            return
        seconds = time.perf_counter() - self._start
        steps = self._steps_done - self._epoch_start_step
        print(f"{self._epoch_label} - {steps} steps - {seconds:.1f}s - {format_scalars(scalars)}", file=self.stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress_writers(verbose: int | str, progress: bool) -> list[Writer]:
    """Keras' ``verbose``: 0 nothing, 1 a progress bar, 2 a line per epoch; ``"auto"`` follows ``progress`` (a bar
    on a terminal, a line per epoch otherwise)."""
    if verbose == "auto":
        return [ProgressWriter()] if progress else []
    return [] if verbose == 0 else [ProgressWriter(bar=verbose == 1)]


class CSVWriter(Writer):
    """``history.csv``: a row per epoch, a column per key (the header is fixed by the first epoch)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._file: IO[str] | None = None
        self._writer: Any = None
        self._keys: list[str] = []
        self._past: Mapping[str, list[float]] = {}

    def resume(self, history: Mapping[str, list[float]], step: int) -> None:
        self._past = history  # rewritten first, so the file holds every epoch of the run

    def write_epoch(self, epoch: int, scalars: Mapping[str, float]) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._file = open(self.path, "w", newline="")  # noqa: SIM115 (closed in close())
            self._keys = list(self._past or scalars)
            self._writer = csv.writer(self._file)
            self._writer.writerow(["epoch", *self._keys])
            for i in range(max(map(len, self._past.values()), default=0)):
                self._writer.writerow([i, *(format_value(self._past[k][i]) for k in self._keys)])
        self._writer.writerow([epoch, *(format_value(scalars[k]) if k in scalars else "" for k in self._keys)])
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardWriter(Writer):
    """TensorBoard scalars laid out as Keras' ``TensorBoard`` callback lays them out, so the curves overlay: two runs
    under ``logdir``, ``train`` and ``validation``; once per epoch the tag ``epoch_<key>`` (a ``val_<key>`` value goes
    to ``validation`` as ``epoch_<key>``, next to the training ``epoch_<key>``); and ``batch_<key>`` in ``train``
    every ``every_n_steps`` steps (at the global step).

    A resumed run repeats the steps after its checkpoint; the steps and epochs already in the event files are not
    written again, so every point appears once.
    """

    def __init__(self, logdir: str | os.PathLike, every_n_steps: int | None = None) -> None:
        self.logdir = os.fspath(logdir)
        self.every = Every(every_n_steps)
        self._writers: dict[str, Any] = {}
        self._last_step = 0
        self._written = {"batch": -1, "epoch": -1}  # the last step / epoch already on disk (resume)

    def _write(self, run: str, kind: str, step: int, scalars: Mapping[str, float]) -> None:
        if step <= self._written[kind] or not scalars:
            return  # written before the run was interrupted (an exact resume recomputes the same values)
        if run not in self._writers:
            self._writers[run] = tf.summary.create_file_writer(os.path.join(self.logdir, run))
        with self._writers[run].as_default(step=step):
            for key, value in scalars.items():
                tf.summary.scalar(f"{kind}_{key}", value)

    def step_periods(self) -> list[int]:
        return [] if self.every.n is None else [self.every.n]

    def resume(self, history: Mapping[str, list[float]], step: int) -> None:
        self._last_step = step
        for path in sorted(Path(self.logdir).glob("*/events.out.tfevents.*")):
            try:
                for event in tf.compat.v1.train.summary_iterator(str(path)):
                    for value in event.summary.value:
                        kind = value.tag.split("_", 1)[0]
                        if kind in self._written:
                            self._written[kind] = max(self._written[kind], event.step)
            except tf.errors.DataLossError:  # a last record cut short by a kill: what was read before counts
                continue

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self.every.due(self._last_step, step):
            self._write("train", "batch", step, scalars)
        self._last_step = step

    def write_epoch(self, epoch: int, scalars: Mapping[str, float]) -> None:
        train, validation = split_validation(scalars)
        self._write("train", "epoch", epoch, train)
        self._write("validation", "epoch", epoch, validation)
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers = {}


class WriterCallback(keras.callbacks.Callback):
    """Feeds ``fit``'s logs to writers: ``fit(..., callbacks=[WriterCallback(CSVWriter("h.csv"))])``."""

    def __init__(self, *writers: Writer) -> None:
        super().__init__()
        self.writer = writers[0] if len(writers) == 1 else MultiWriter(writers)
        self._epoch_offset = 0  # global steps before this epoch
        self._step = 0  # the global step after the last block
        self._resumed_epoch_steps = 0  # steps of the resumed epoch done before the checkpoint

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        self._epoch_offset = self._step - self._resumed_epoch_steps
        self._resumed_epoch_steps = 0
        self.writer.begin_epoch(epoch, self.params.get("epochs", epoch + 1), self.params.get("steps"))

    def on_train_batch_end(self, batch: int, logs: Mapping[str, float] | None = None) -> None:
        self._step = self._epoch_offset + batch + 1
        self.writer.write_scalars(self._step, logs or {})

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        self.writer.write_epoch(epoch, logs or {})

    def step_periods(self) -> list[int]:
        return self.writer.step_periods()

    def on_resume(self, history: Mapping[str, list[float]], global_step: int, epoch_steps: int) -> None:
        """Called by ``fit`` after restoring a checkpoint, before ``on_train_begin``. A checkpoint taken at an
        epoch's last step resumes with that epoch complete (``epoch_steps`` = its length, no batch left)."""
        self._step, self._resumed_epoch_steps = global_step, epoch_steps
        self.writer.resume(history, global_step - epoch_steps)

    def teardown(self) -> None:
        self.writer.close()  # writers' close() is idempotent
