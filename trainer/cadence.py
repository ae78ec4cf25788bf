"""Cadence: every "every N steps" decision in one place (CLU's ``PeriodicAction``, Orbit's ``ConditionalAction``).

Training runs in blocks of several steps, so a period is due when one of its multiples lies in the steps a block
ran, ``(previous, step]``. The block runner also cuts blocks so that they end exactly on the multiples of every
period in use (:func:`steps_to_boundary`): checkpoints, TensorBoard steps and step schedules land on exact steps,
whatever the block size.
"""

from __future__ import annotations

from collections.abc import Iterable

from trainer.options import positive_int

__all__ = ["Every", "steps_to_boundary"]


class Every:
    """A period of ``n`` steps; ``Every(None)`` is never due.

    Raises:
        ValueError: ``n`` is not a positive int or None.
    """

    def __init__(self, n: int | None) -> None:
        self.n = None if n is None else positive_int("period (steps)", n)

    def due(self, previous: int, step: int) -> bool:
        """True when a multiple of ``n`` lies in ``(previous, step]`` (a block ran from ``previous`` to ``step``)."""
        return self.n is not None and step // self.n > previous // self.n

    def start(self, step: int) -> int:
        """The latest multiple of ``n`` at or before ``step``: where the period ``step`` lies in began."""
        return step if self.n is None else step - step % self.n

    def steps_to_next(self, step: int) -> int | None:
        """Steps from ``step`` to the next multiple of ``n`` (``n`` when ``step`` is one); None for ``Every(None)``."""
        return None if self.n is None else self.n - step % self.n


def steps_to_boundary(step: int, periods: Iterable[int | Every]) -> int | None:
    """Steps from ``step`` to the next multiple of any period (None when there are none)."""
    gaps = [gap for p in periods if (gap := (p if isinstance(p, Every) else Every(p)).steps_to_next(step)) is not None]
    return min(gaps) if gaps else None
