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
