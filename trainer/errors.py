"""Errors tapeloop raises on bad input. Each message names what is wrong and lists what exists."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from losses import LossProtocolError, ShapeMismatchError

__all__ = [
    "DataError",
    "LossProtocolError",
    "MissingKeyError",
    "NonFiniteLossError",
    "ShapeMismatchError",
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
    """A loss component was NaN or infinite; no update was applied for that step."""

    def __init__(self, keys: Sequence[str], step: int, values: dict[str, float]) -> None:
        shown = ", ".join(f"{k}={values[k]}" for k in keys)
        super().__init__(
            f"Non-finite loss at training step {step}: {shown}. The update of that step was not applied; the "
            f"weights are those after step {step - 1}. All components at that step: {values}."
        )
        self.keys = list(keys)
        self.step = step
        self.values = values
