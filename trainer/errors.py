"""Errors tapeloop raises on bad input. Each message names what is wrong and lists what exists."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

from losses import LossProtocolError, ShapeMismatchError

__all__ = [
    "OWN_ERRORS",
    "DataError",
    "LossProtocolError",
    "MissingKeyError",
    "NonFiniteLossError",
    "ShapeMismatchError",
    "StepError",
    "UserCodeError",
    "describe_tensors",
    "naming",
]


def names(keys: Iterable[object]) -> str:
    """``a, b, c`` (sorted, quoted) for messages; ``(none)`` when empty."""
    keys = sorted(map(str, keys))
    return ", ".join(repr(k) for k in keys) if keys else "(none)"


class MissingKeyError(KeyError):
    """A loss or metric read an output or target that does not exist."""

    def __init__(self, message: str, key: object) -> None:
        super().__init__(message)
        self.message = message
        self.key = key

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return self.message


class DataError(ValueError):
    """The data cannot be used: empty, wrong structure, arrays of different lengths."""


class NonFiniteLossError(FloatingPointError):
    """A loss component was NaN or infinite; no update was applied for that step.

    With ``nan_policy="skip"`` it is raised after more than ``limit`` non-finite steps in a row (``skipped``).
    """

    def __init__(
        self, keys: Sequence[str], step: int, values: dict[str, float], *, skipped: int = 0, limit: int | None = None
    ) -> None:
        shown = ", ".join(f"{k}={values[k]}" for k in keys)
        if limit is None:
            message = (
                f"Non-finite loss at training step {step}: {shown}. The update of that step was not applied; the "
                f"weights are those after step {step - 1}. All components at that step: {values}."
            )
        else:
            message = (
                f"{skipped} consecutive non-finite training steps, up to step {step} (max_consecutive_skips={limit}); "
                f"at the last one: {shown}. None of their updates was applied. All components at that step: {values}."
            )
        super().__init__(message)
        self.keys = list(keys)
        self.step = step
        self.values = values


def describe_tensors(kind: str, tensors: Mapping[str, object]) -> list[str]:
    """One line per tensor: ``output 'boxes': shape (32, 912, 4), float32`` (symbolic dims print as None)."""
    lines = []
    for key, value in tensors.items():
        shape = getattr(value, "shape", None)
        dtype = getattr(getattr(value, "dtype", None), "name", getattr(value, "dtype", "?"))
        shown = tuple(shape) if shape is not None and getattr(shape, "rank", 1) is not None else "unknown"
        lines.append(f"  {kind} {key!r}: shape {shown}, {dtype}")
    return lines


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_KERAS_CALL = re.compile(r"^Exception encountered when calling ([\w.]+)\(\)\.$")


def first_line(error: BaseException) -> str:
    """The first line of an error's message, without TensorFlow's op dump, graph function name or eager op suffix.

    Two wrappers put the cause further down: TensorFlow's "Graph execution error:" (then where the op was defined)
    and Keras' "Exception encountered when calling Layer.call()." (then the layer's message, in bold).
    """
    lines = [_ANSI.sub("", line) for line in str(error).strip().splitlines()] or [""]
    where = ""
    if keras_call := _KERAS_CALL.match(lines[0].strip()):
        where = f" (in {keras_call.group(1)})"
        lines = [line for line in lines[1:] if line.strip()] or lines
    if lines[0].strip() == "Graph execution error:":
        said = [line for line in lines[1:] if line.strip() and not line.startswith(("  File ", "Detected at node "))]
        lines = said or lines
    first = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", lines[0])  # the graph function's name says nothing
    return re.sub(r"\s*\[Op:\w+\]( name:.*)?$", "", first)[:400] + where


class UserCodeError(Exception):
    """A loss, metric or model raised while tapeloop called it; the message names it and lists, one per line, the
    shapes and dtypes of everything it was given. The original exception is the ``__cause__``."""

    def __init__(self, who: str, error: BaseException, given: Sequence[str], hint: str = "") -> None:
        message = f"{who} raised {type(error).__name__}: {first_line(error)}\nIt was given:\n" + "\n".join(given)
        super().__init__(message + (f"\n{hint}" if hint else ""))
        self.who = who
        self.original = error


class StepError(RuntimeError):
    """An operation failed inside a compiled block, on a batch the first-batch check did not see (a label out of the
    classes' range, a batch of another shape, memory). The message names the steps the block covered and the
    operation's error; the TensorFlow error is the ``__cause__``. A training block's steps before the failing one
    were applied."""

    def __init__(self, mode: str, done: int, count: int, error: BaseException) -> None:
        first = first_line(error)
        what = {"train": "Training", "eval": "Evaluation", "predict": "Prediction"}[mode]
        unit = "step" if mode == "train" else "batch"
        where = f"{unit} {done + 1}" if count == 1 else f"{unit}s {done + 1}-{done + count}"
        message = f"{what} failed at {where} (one compiled block) with {type(error).__name__}: {first}"
        if mode == "train":
            message += (
                "\nThe block's steps before the failing one were applied: the weights are those after the last step "
                "that completed."
            )
        if count > 1:
            message += f"\nsteps_per_execution=1 names the exact {unit}."
        super().__init__(message)
        self.original = error


@contextlib.contextmanager
def naming(what: str) -> Iterator[None]:
    """Prefix a missing-key or shape error raised inside with the data it concerns (``validation data: ...``)."""
    try:
        yield
    except MissingKeyError as err:
        raise MissingKeyError(f"{what}: {err.message}", err.key) from None
    except ShapeMismatchError as err:
        raise ShapeMismatchError(f"{what}: {err}") from None


# Errors tapeloop raises itself: passed through as they are, never wrapped again.
OWN_ERRORS = (LossProtocolError, MissingKeyError, ShapeMismatchError, DataError, UserCodeError)
