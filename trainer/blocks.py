"""How many steps each compiled call runs (a fixed number, or ``"auto"``), and the call itself.

``"auto"`` (tf.keras 2.x had it; Keras 3 dropped it) starts at 1 and doubles the block after every call that took
less than half the target time (~50 ms), so the per-call overhead (Python, callbacks, the host read) becomes
negligible without the user tuning anything. The step count is a tensor, so changing it never retraces. Blocks are
also cut so that they end exactly on the step periods callbacks ask for (checkpoints, TensorBoard; see
``trainer/cadence.py``), and on the end of the epoch: cadences stay exact whatever the block size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from trainer.options import AUTO

__all__ = ["BlockSizer", "FlatCall", "flat_call"]


class BlockSizer:
    """The length of the next block.

    Args:
        steps_per_execution: a positive int, or ``"auto"``.
        target_seconds: (auto) how long one call should take.
        max_steps: (auto) the largest block.
    """

    def __init__(self, steps_per_execution: int | str, *, target_seconds: float = 0.05, max_steps: int = 4096):
        self.auto = steps_per_execution == AUTO
        self.size = 1 if self.auto else int(steps_per_execution)
        self.target_seconds = target_seconds
        self.max_steps = max_steps
        self._calls = 0

    @property
    def single(self) -> bool:
        """Every block is one step (``steps_per_execution=1``): the compiled variant without a loop."""
        return not self.auto and self.size == 1

    def next(self, *limits: int | None) -> int:
        """The block length: the current size, cut to every given limit (steps left, steps to a boundary)."""
        return min([self.size, *(limit for limit in limits if limit is not None)])

    def observe(self, planned: int, ran: int, seconds: float) -> None:
        """(auto) Grow after a full block that was fast; the first call (tracing) tells nothing."""
        self._calls += 1
        if not self.auto or self._calls == 1 or ran < planned or planned < self.size:
            return
        if seconds < self.target_seconds / 2:
            self.size = min(self.size * 2, self.max_steps)
        elif seconds > self.target_seconds * 4 and self.size > 1:
            self.size //= 2


class FlatCall:
    """A concrete function of ``(iterator, *tensors)`` called with flat tensors, for one iterator (the blocks of one
    epoch, the batches of one ``predict``).

    A concrete function's own call binds its arguments to the traced signature at every call (the iterator's
    ``TypeSpec`` is cast anew each time): ~0.4 ms a call on this machine, measured, which at one step per call was a
    third of a small model's epoch. The iterator's tensors are flattened once here; each call passes them and the
    other tensors straight to the traced function (what the bound call ends up doing).
    """

    def __init__(self, concrete: Any, iterator: Any, head: list[tf.Tensor]) -> None:
        self.concrete, self.iterator, self._head = concrete, iterator, head

    def __call__(self, iterator: Any, *tensors: tf.Tensor) -> Any:
        if iterator is not self.iterator:  # another iterator: the bound call
            return self.concrete(iterator, *tensors)
        return self.concrete._call_flat([*self._head, *tensors], self.concrete.captured_inputs)


def flat_call(concrete: Any, iterator: Any, *tensors: tf.Tensor) -> Callable:
    """``concrete`` as a :class:`FlatCall` for ``iterator`` (``tensors``: examples of the other arguments), or
    itself where the flat inputs do not match the traced ones (their number and dtypes) or this TensorFlow has no
    flat call."""
    if not hasattr(concrete, "_call_flat"):
        return concrete
    head = tf.nest.flatten(iterator, expand_composites=True)
    flat = [*head, *tensors, *concrete.captured_inputs]
    traced = concrete.inputs
    if len(flat) != len(traced) or any(getattr(a, "dtype", None) != b.dtype for a, b in zip(flat, traced)):
        return concrete
    return FlatCall(concrete, iterator, head)
