"""The block runner: the one boundary between the Python loops and the compiled blocks.

``BlockRunner`` owns what runs in the graph and what the host learns from it: the compiled :class:`Steps`, the
trackers, the block sizers (``steps_per_execution``), the step periods blocks must end on, the global step and the
cross-worker stop agreement. The epoch loop (``trainer/epochs.py``) and ``Trainer.evaluate`` drive it through its
public methods only — run blocks of a mode over an iterator, reset a mode's trackers, read its logs, evaluate —
and say what happens around each block through a :class:`BlockHooks`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import tensorflow as tf

from trainer.blocks import BlockSizer
from trainer.cadence import Every, steps_to_boundary
from trainer.cluster import check_same_batches, is_multi_worker
from trainer.errors import NonFiniteLossError, StepError
from trainer.options import AUTO
from trainer.step import BlockInfo, Steps, own_function

__all__ = ["MULTI_WORKER_BLOCK", "BlockHooks", "BlockRunner"]

MULTI_WORKER_BLOCK = 16  # what steps_per_execution="auto" means across several workers
MODES = ("train", "eval")


class BlockHooks:
    """What the caller of :meth:`BlockRunner.run` does around each block. Every method is optional."""

    def begin(self) -> None:
        """Before a block."""

    def end(self, info: BlockInfo) -> None:
        """After a block (``global_step`` already counts its steps); ``info.ran`` may be 0."""

    def stop_requested(self) -> bool:
        """This process was asked to stop (a signal). Read before each training block; the request is summed over
        all workers inside the block, which then runs no step and reports ``info.stopped`` on every worker."""
        return False

    def should_stop(self) -> bool:
        """Run no further block (e.g. a callback set ``stop_training``)."""
        return False


class _TestBatchHooks(BlockHooks):
    """Evaluation blocks bracketed by the callbacks' ``on_test_batch_*`` hooks (index of the block's last step)."""

    def __init__(self, callbacks: Any) -> None:
        self.callbacks = callbacks
        self.done = 0
        self.values: dict[str, float] | None = None  # the trackers' values after the last block

    def begin(self) -> None:
        self.callbacks.on_test_batch_begin(self.done, None)

    def end(self, info: BlockInfo) -> None:
        self.done += info.ran
        self.values = info.logs
        if info.ran:
            self.callbacks.on_test_batch_end(self.done - 1, info.logs)


class BlockRunner:
    """Runs compiled blocks of training or evaluation steps and reads the host's values once per block.

    Args:
        steps: the compiled blocks (with their step maths: trackers, optimizer, variables, strategy, nan policy).
        steps_per_execution: a positive int, or ``"auto"`` (a fixed ``MULTI_WORKER_BLOCK`` across workers, whose
            blocks must have equal lengths for their collectives to pair up).
    """

    def __init__(self, steps: Steps, *, steps_per_execution: int | str) -> None:
        self.steps = steps
        self.trackers = dict(steps.trackers)
        self.optimizer = steps.math.optimizer
        self.variables = list(steps.math.variables)
        self.strategy = steps.strategy
        self.multi_worker = is_multi_worker(self.strategy)
        self.nan_policy = steps.nan_policy
        self.max_consecutive_skips = steps.max_consecutive_skips
        fixed = MULTI_WORKER_BLOCK if steps_per_execution == AUTO and self.multi_worker else None
        self.sizers = {mode: BlockSizer(fixed or steps_per_execution) for mode in MODES}
        self.periods: list[Every] = []  # training blocks end on the multiples of these
        self.global_step = 0  # training steps (optimizer updates) applied so far
        self._counts: dict[int, tf.Tensor] = {}
        self._repeated: tuple[tf.data.Dataset, tf.data.Dataset] | None = None
        # Resetting is a handful of assignments: one compiled call instead of several eager ops (traced when first
        # used; its concrete function is called directly, without argument matching).
        self._resets: dict[str, Any] = {}

    # -- what the loops configure and read ------------------------------------------------------------------------

    def set_periods(self, periods: Iterable[int]) -> None:
        """Step periods that training blocks must end on (checkpoints, TensorBoard steps, step schedules)."""
        self.periods = [Every(p) for p in sorted(set(periods))]

    @property
    def block_sizes(self) -> dict[str, int]:
        """The current block length per mode (``"auto"`` grows it while running)."""
        return {mode: sizer.size for mode, sizer in self.sizers.items()}

    def distribute(self, dataset: tf.data.Dataset) -> Any:
        """An iterator over ``dataset`` split across the strategy's replicas."""
        return iter(self.strategy.experimental_distribute_dataset(dataset))

    def repeated(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        """``dataset.repeat()``, the same object again for the same dataset (the last one is kept): tf.data
        prepares a new dataset's first iterator in ~9 ms here, another iterator over it in ~2 ms — a tenth of a short
        epoch, paid at every ``fit`` call of a notebook or a sweep."""
        if self._repeated is None or self._repeated[0] is not dataset:
            self._repeated = (dataset, dataset.repeat())
        return self._repeated[1]

    def reset(self, mode: str) -> None:
        """Start a new epoch (``"train"``: trackers and the epoch's skipped-step count) or evaluation (``"eval"``)."""
        if mode not in self._resets:
            self._resets[mode] = own_function(lambda: self._reset_state(mode)).get_concrete_function()
        self._resets[mode]()

    def _reset_state(self, mode: str) -> None:
        self.trackers[mode].reset()
        if mode == "train":
            self.steps.skipped.assign(0)

    def logs(self, mode: str, values: dict[str, float] | None = None) -> dict[str, float]:
        """A mode's logs so far. Training adds ``lr`` and, with ``nan_policy="skip"``, ``skipped_steps``.

        ``values``: the trackers' values as the mode's last block returned them (``BlockInfo.logs``), when a block
        ran since the reset; the trackers are read (a few eager ops) only without them.
        """
        logs = (
            dict(values)
            if values is not None
            else {key: float(value) for key, value in self.trackers[mode].result().items()}
        )
        if mode == "train":
            # a tensor first: a schedule gives one, and np.array on a variable is deprecated in NumPy 2
            logs["lr"] = float(tf.convert_to_tensor(self.optimizer.learning_rate))  # schedules: current value
            if self.nan_policy == "skip":
                logs["skipped_steps"] = float(self.steps.skipped.numpy())
        return logs

    def log_keys(self, mode: str) -> list[str]:
        """The keys of a mode's logs (:meth:`logs`)."""
        extra = ["lr", *(["skipped_steps"] if self.nan_policy == "skip" else [])] if mode == "train" else []
        return [*self.trackers[mode].keys, *extra]

    def trackables(self) -> dict[str, Any]:
        """What a checkpoint must hold of the runner: the training trackers and the skipped-step counters."""
        return {
            "trackers": self.trackers["train"].variables(),
            "skips": [self.steps.skipped, self.steps.consecutive],
        }

    def finalize(self) -> None:
        """The end of training, as ``Model.fit`` ends it: ``optimizer.finalize_variable_values`` (with
        ``use_ema=True`` the averaged weights replace the trained ones)."""
        with self.strategy.scope():
            self.optimizer.finalize_variable_values(self.variables)

    # -- running --------------------------------------------------------------------------------------------------

    def _count(self, n: int) -> tf.Tensor:
        """Step counts as (cached) tensors: a Python int would retrace the block for every new value."""
        if n not in self._counts:
            self._counts[n] = tf.constant(n, tf.int32)
        return self._counts[n]

    def run(
        self, mode: str, iterator: Any, budget: int | None, hooks: BlockHooks | None = None, *, exact: bool = False
    ) -> tuple[int, bool]:
        """Run compiled blocks until ``budget`` steps ran, the data ended or ``hooks.should_stop()``.

        Args:
            mode: ``"train"`` or ``"eval"``.
            iterator: a (distributed) iterator of batches.
            budget: the most steps to run; None: until the data ends.
            hooks: what to do around each block.
            exact: the iterator holds at least ``budget`` more steps' batches (the faster loop without an
                end-of-data check is safe).

        Returns:
            (steps run, whether the data ended).

        Raises:
            NonFiniteLossError: a training step's loss was non-finite (see ``nan_policy``).
            StepError: an operation failed inside a block (TensorFlow's error is the cause).
        """
        hooks = hooks or BlockHooks()
        train = mode == "train"
        sizer = self.sizers[mode]
        exact = budget is not None and exact
        block = self.steps.block_for(mode, exact, iterator, self._count(1), single=sizer.single)
        done = 0
        while budget is None or done < budget:
            boundary = steps_to_boundary(self.global_step, self.periods) if train else None
            n = sizer.next(None if budget is None else budget - done, boundary)
            hooks.begin()
            start = time.perf_counter()
            stop = self._count(int(train and hooks.stop_requested()))
            # The one host sync per block: everything the outer loop needs comes back in a single vector.
            try:
                result = block(iterator, self._count(n), stop).numpy()
            except tf.errors.OpError as err:  # on a later batch: the first one was checked before any update
                raise StepError(mode, self.global_step if train else done, n, err) from err
            info = self.steps.unpack(mode, result)
            sizer.observe(n, info.ran, time.perf_counter() - start)
            if train:
                self.global_step += info.ran
                self._raise_if_non_finite(info)
            done += info.ran
            hooks.end(info)
            if not info.more:
                return done, True
            if hooks.should_stop():
                break
        return done, False

    def _raise_if_non_finite(self, info: BlockInfo) -> None:
        if info.finite.all() or (self.nan_policy == "skip" and info.consecutive <= self.max_consecutive_skips):
            return
        values = dict(zip(self.steps.loss_keys, info.values.tolist()))
        bad = [key for key, ok in zip(self.steps.loss_keys, info.finite) if not ok]
        if self.nan_policy == "raise" and bad:
            raise NonFiniteLossError(bad, self.global_step + 1, values)
        if self.nan_policy == "skip" and info.consecutive > self.max_consecutive_skips:
            raise NonFiniteLossError(
                bad, self.global_step, values, skipped=info.consecutive, limit=self.max_consecutive_skips
            )

    def evaluate(
        self, dataset: tf.data.Dataset, steps: int | None, callbacks: Any, *, exact: bool | None = None
    ) -> dict[str, float]:
        """``steps`` batches of ``dataset`` (None: all) in evaluation blocks; returns the logs. ``exact``: the
        dataset surely holds ``steps`` batches (default: whenever ``steps`` is given).

        ``callbacks`` (a ``CallbackList``) gets ``on_test_begin``, ``on_test_batch_*`` and ``on_test_end``.
        """
        if self.multi_worker:  # a collective: every worker evaluates together
            check_same_batches(self.strategy, "evaluate", steps)
        self.reset("eval")
        callbacks.on_test_begin(None)
        exact = steps is not None if exact is None else exact
        hooks = _TestBatchHooks(callbacks)
        self.run("eval", self.distribute(dataset), steps, hooks, exact=exact)
        logs = self.logs("eval", hooks.values)
        callbacks.on_test_end(logs)
        return logs
