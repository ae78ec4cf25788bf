"""How many steps each compiled call runs: a fixed number, or ``"auto"``.

``"auto"`` (tf.keras 2.x had it; Keras 3 dropped it) starts at 1 and doubles the block after every call that took
less than half the target time (~50 ms), so the per-call overhead (Python, callbacks, the host read) becomes
negligible without the user tuning anything. The step count is a tensor, so changing it never retraces. Blocks are
also cut so that they end exactly on the step periods callbacks ask for (checkpoints, TensorBoard; see
``trainer/cadence.py``), and on the end of the epoch: cadences stay exact whatever the block size.
"""

from __future__ import annotations

from trainer.options import AUTO

__all__ = ["BlockSizer"]


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
