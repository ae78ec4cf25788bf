"""The compiled step and its in-graph loop — the only code that touches the tape.

``Steps`` builds two functions once and caches them: a training block and an evaluation block. Each runs up to
``num_steps`` steps in one ``tf.while_loop``; ``num_steps`` is a tensor, so any block length reuses one trace.
A block stops early when the data ends or a loss component is non-finite (``nan_policy="raise"``; with ``"skip"``
the bad step's update is skipped and counted, and the block stops only after more than ``max_consecutive_skips``
skips in a row); it returns how many steps ran and the trackers' values, which the host reads once per block.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from losses import LossProtocolError, ShapeMismatchError, replica_share
from trainer.errors import DataError, MissingKeyError
from trainer.metrics import MetricSpec
from trainer.objective import TOTAL, Objective
from trainer.structure import batch_size_of
from trainer.tracking import Tracker

__all__ = ["BlockInfo", "BlockResult", "Steps"]

BlockResult = tf.Tensor  # one float32 vector; Steps.unpack splits it


@dataclass
class BlockInfo:
    """What the host learns from one block."""

    ran: int  # steps run (batches consumed)
    more: bool  # the data did not end
    skipped: int  # (skip policy) non-finite steps skipped this epoch
    consecutive: int  # (skip policy) non-finite steps in a row, up to the block's end
    finite: np.ndarray  # per logged loss key: finite at the last step
    values: np.ndarray  # per logged loss key: value at the last step
    logs: dict[str, float]  # tracker results


OWN_ERRORS = (LossProtocolError, MissingKeyError, ShapeMismatchError, DataError)


def _own_error(err: BaseException) -> BaseException:
    """The tapeloop error inside an error that tracing wrapped (autograph turns errors raised in ``strategy.run``
    into ``StagingError``): the user sees our message and type, not a TensorFlow trace."""
    seen = err
    while seen is not None:
        if isinstance(seen, OWN_ERRORS):
            return seen
        seen = seen.__cause__ or seen.__context__
    return err


def _bad(finite: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.logical_not(finite), tf.int32)


class Steps:
    """Compiled train/eval blocks for one model, objective and optimizer.

    Args:
        forward: ``forward(inputs, training) -> {output name: tensor}``.
        regularization: returns ``sum(model.losses)`` (read after ``forward``, inside the tape) or None.
        objective: the built :class:`Objective`.
        metrics: the :class:`MetricSpec` (Keras metric objects live in the trackers).
        trackers: ``{"train": Tracker, "eval": Tracker}``.
        optimizer: a built Keras optimizer.
        variables: the trainable variables (model and losses).
        strategy: the ``tf.distribute.Strategy`` everything was created under.
        jit_compile: compile each step with XLA.
        run_eagerly: run everything eagerly (for debugging; slow).
        output_hint: extra text for a missing output name (see ``structure.output_hint``).
        nan_policy: ``"raise"`` (stop at a non-finite step) or ``"skip"`` (skip its update, count it).
        max_consecutive_skips: (skip) stop after more than this many non-finite steps in a row.
    """

    def __init__(
        self,
        *,
        forward: Callable[[Any, bool], dict[str, tf.Tensor]],
        regularization: Callable[[], tf.Tensor | None],
        objective: Objective,
        metrics: MetricSpec,
        trackers: Mapping[str, Tracker],
        optimizer: keras.optimizers.Optimizer,
        variables: list[tf.Variable],
        strategy: tf.distribute.Strategy,
        jit_compile: bool,
        run_eagerly: bool,
        output_hint: Callable[[str], str] | None = None,
        nan_policy: str = "raise",
        max_consecutive_skips: int = 10,
    ) -> None:
        self._forward = forward
        self._regularization = regularization
        self._objective = objective
        self._metrics = metrics
        self._trackers = trackers
        self._optimizer = optimizer
        self._variables = variables
        self._strategy = strategy
        self._replicas = strategy.num_replicas_in_sync
        self._hint = output_hint
        self.loss_keys = objective.logged_keys()  # order of the finite flags and values a block returns
        self.traces: Counter[str] = Counter()  # incremented only while tracing: a test counts retraces

        self._run_eagerly = run_eagerly
        self._skip = nan_policy == "skip"
        self._max_skips = max_consecutive_skips
        # Skipped-step counters (skip policy): this epoch's total and the current run of consecutive skips.
        with strategy.scope():
            self.skipped = tf.Variable(0, trainable=False, name="skipped_steps")
            self.consecutive = tf.Variable(0, trainable=False, name="consecutive_skips")

        def compiled(fn: Callable, **kwargs: Any) -> Callable:
            return fn if run_eagerly else tf.function(fn, **kwargs)

        # One step = the replicas' forward/backward (strategy.run) + one guarded update in cross-replica context.
        # XLA compiles the whole step where it can (one replica: the default strategy).
        train_step = compiled(self._step_train, jit_compile=True) if jit_compile else self._step_train
        eval_step = compiled(self._step_eval, jit_compile=True) if jit_compile else self._step_eval

        # Two loops per mode: "exact" when the host knows the data holds num_steps more batches (known cardinality;
        # plain next(), ~15 % faster on small models), "open" otherwise (get_next_as_optional, stops at the end).
        def block(mode: str, step: Callable, exact: bool) -> Callable:
            return compiled(lambda iterator, n: self._block(mode, step, iterator, n, exact))

        self.blocks = {
            (mode, exact): block(mode, step, exact)
            for mode, step in (("train", train_step), ("eval", eval_step))
            for exact in (True, False)
        }

    def block_for(self, mode: str, exact: bool, iterator: Any, count: tf.Tensor) -> Callable:
        """The block to call for one epoch over ``iterator``: its concrete function when compiled.

        Calling the concrete function skips ``tf.function``'s per-call argument matching (about 0.14 ms a call on
        this machine, measured: the main Python cost at ``steps_per_execution=1``); the match runs once here.
        """
        block = self.blocks[mode, exact]
        if self._run_eagerly:
            return block
        try:
            return block.get_concrete_function(iterator, count)
        except Exception as err:
            raise _own_error(err) from None

    # -- one step, run on each replica ----------------------------------------------------------------------------

    def _empty_is_zero(self, inputs: Any, values: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """A replica that got no examples (an uneven last batch) contributes 0, not a mean over nothing (NaN)."""
        if self._replicas == 1:
            return values
        has_examples = batch_size_of(inputs) > 0
        return {key: tf.where(has_examples, value, tf.zeros_like(value)) for key, value in values.items()}

    def _losses(self, inputs: Any, targets: Mapping[str, tf.Tensor], training: bool, weights: tf.Tensor):
        outputs = self._forward(inputs, training)
        parts = self._objective.components(outputs, targets, self._regularization(), self._hint)
        parts = self._empty_is_zero(inputs, parts)
        total = self._objective.total(parts, weights)
        return outputs, {**parts, TOTAL: total}

    def _share(self, inputs: Any) -> tf.Tensor | None:
        """b/B, this replica's part of the global batch (None on one replica: nothing to scale)."""
        return None if self._replicas == 1 else replica_share(batch_size_of(inputs))

    def _observe(self, mode: str, inputs: Any, targets, outputs, values: dict[str, tf.Tensor]) -> None:
        tracker = self._trackers[mode]
        metric_values = self._metrics.callable_values(outputs, targets, self._hint)
        values = {**values, **self._empty_is_zero(inputs, metric_values)}
        tracker.update_means(values, batch_size_of(inputs))
        self._metrics.update(tracker.metrics, outputs, targets)

    def _train_replica(self, batch: tuple[Any, Mapping[str, tf.Tensor]], weights: tf.Tensor):
        """Forward and backward on one replica's share; returns (non-finite flags as 0/1, values × b/B, gradients)."""
        inputs, targets = batch
        share = self._share(inputs)
        with tf.GradientTape() as tape:
            outputs, values = self._losses(inputs, targets, training=True, weights=weights)
            # The one distribution scaling: loss × b/B, gradients summed over replicas (losses/distributed.py).
            objective = values[TOTAL] if share is None else values[TOTAL] * share
        grads = tape.gradient(objective, self._variables)
        if all(g is None for g in grads):
            raise ValueError("The total loss does not depend on any trainable variable: there is nothing to train.")
        stacked = tf.stack([values[k] for k in self.loss_keys])  # every value is a scalar: one check for all
        finite = tf.math.is_finite(stacked)

        def observe() -> tf.Tensor:
            self._observe("train", inputs, targets, outputs, values)
            return tf.constant(True)

        tf.cond(tf.reduce_all(finite), observe, lambda: tf.constant(False))  # a skipped step is not tracked
        return _bad(finite), stacked if share is None else stacked * share, grads

    def _eval_replica(self, batch: tuple[Any, Mapping[str, tf.Tensor]], weights: tf.Tensor):
        inputs, targets = batch
        outputs, values = self._losses(inputs, targets, training=False, weights=weights)
        self._observe("eval", inputs, targets, outputs, values)
        stacked = tf.stack([values[k] for k in self.loss_keys])
        share = self._share(inputs)
        return tf.zeros([len(self.loss_keys)], tf.int32), stacked if share is None else stacked * share

    # -- one step over all replicas (cross-replica context) --------------------------------------------------------

    def _reduce_flags(self, bad: Any, values: Any) -> tuple[tf.Tensor, tf.Tensor]:
        reduce = self._strategy.reduce
        # A component is finite only if it is finite on every replica.
        bad = reduce(tf.distribute.ReduceOp.SUM, bad, axis=None)
        # Each replica's values are already × b/B: their sum is the global batch's mean.
        return tf.equal(bad, 0), reduce(tf.distribute.ReduceOp.SUM, values, axis=None)

    def _step_train(self, batch: Any, weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        bad, values, grads = self._strategy.run(self._train_replica, args=(batch, weights))
        finite, values = self._reduce_flags(bad, values)
        # Gradients are summed over replicas here, once, before the optimizer sees them; in cross-replica context
        # Keras does not all-reduce again, and clipnorm/global_clipnorm act on the sum.
        pairs = [
            (self._strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None), v)
            for g, v in zip(grads, self._variables)
            if g is not None
        ]

        def apply() -> tf.Tensor:
            self._optimizer.apply_gradients(pairs)
            return tf.constant(True)

        # A non-finite step changes no weight: the block stops and the host raises.
        tf.cond(tf.reduce_all(finite), apply, lambda: tf.constant(False))
        return finite, values

    def _step_eval(self, batch: Any, weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return self._reduce_flags(*self._strategy.run(self._eval_replica, args=(batch, weights)))

    # -- the in-graph loop ----------------------------------------------------------------------------------------

    def _block(self, mode: str, step: Callable, iterator: Any, num_steps: tf.Tensor, exact: bool) -> BlockResult:
        """Run up to ``num_steps`` steps; stop early at the end of the data or at a non-finite loss.

        Returns ``[steps run, data left, finite flags..., loss values of the last step..., tracker results...]``.
        """
        self.traces[mode] += 1
        k = len(self.loss_keys)

        def cond(i, more, finite, values, skipped, consecutive):
            go = tf.logical_and(i < num_steps, more)
            return tf.logical_and(go, consecutive <= self._max_skips if self._skip else tf.reduce_all(finite))

        # Loss weights change only between blocks (from the host), so they are read once per block.
        weights = self._objective.weight_vector()

        def run(i, batch, skipped, consecutive):
            ok, last = step(batch, weights)
            good = tf.reduce_all(ok)
            if self._skip:  # a skipped step still consumed its batch: it counts as a step
                bad = 1 - tf.cast(good, tf.int32)
                return i + 1, tf.constant(True), ok, last, skipped + bad, (consecutive + 1) * bad
            return i + tf.cast(good, tf.int32), tf.constant(True), ok, last, skipped, consecutive

        def body(i, more, finite, values, skipped, consecutive):
            if exact:
                return run(i, next(iterator), skipped, consecutive)
            optional = iterator.get_next_as_optional()
            return tf.cond(
                optional.has_value(),
                lambda: run(i, optional.get_value(), skipped, consecutive),
                lambda: (i, tf.constant(False), finite, values, skipped, consecutive),
            )

        start = (tf.constant(0), tf.constant(True), tf.ones([k], tf.bool), tf.zeros([k], tf.float32))
        ran, more, finite, values, skipped, consecutive = tf.while_loop(
            cond, body, (*start, self.skipped.read_value(), self.consecutive.read_value())
        )
        if self._skip and mode == "train":
            self.skipped.assign(skipped)
            self.consecutive.assign(consecutive)
        logs = self._trackers[mode].result()
        # One float vector, so that the host reads everything with a single copy (see ``unpack``).
        head = tf.cast(tf.stack([ran, tf.cast(more, tf.int32), skipped, consecutive]), tf.float32)
        return tf.concat([head, tf.cast(finite, tf.float32), values, tf.stack(list(logs.values()))], axis=0)

    def unpack(self, mode: str, block: np.ndarray) -> BlockInfo:
        """Split a block's vector (see :class:`BlockInfo`)."""
        k = len(self.loss_keys)
        logs = dict(zip(self._trackers[mode].keys, block[4 + 2 * k :].tolist()))
        return BlockInfo(
            ran=int(block[0]),
            more=bool(block[1]),
            skipped=int(block[2]),
            consecutive=int(block[3]),
            finite=block[4 : 4 + k] > 0,
            values=block[4 + k : 4 + 2 * k],
            logs=logs,
        )
