"""One training step's mathematics: the replicas' forward/backward and the single guarded update.

The distribution convention (``losses/distributed.py``): each replica's loss is the mean over its own ``b`` of the
global batch's ``B`` examples; the replica differentiates ``loss × b/B`` and the gradients are summed over replicas
here, once, in cross-replica context — so the optimizer sees the one-device gradient and ``clipnorm`` clips the sum.
The loss is scaled by the optimizer (``scale_loss``: a ``LossScaleOptimizer`` under ``mixed_float16``) and the
optimizer unscales; a step whose scaled gradients overflow is the loss scaler's business, not ``nan_policy``'s.

Gradient accumulation sums micro-batch gradients weighted by their global example counts and divides by the total,
so k micro-batches of b give exactly the gradient of one batch of k·b for losses that are means over examples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import keras
import tensorflow as tf

from losses import replica_share
from losses.distributed import plain_keras_losses
from trainer.balance import Balance
from trainer.gramian import graph_mark
from trainer.metrics import MetricSpec
from trainer.objective import REGULARIZATION, TOTAL, Objective
from trainer.structure import batch_size_of
from trainer.tracking import Tracker

__all__ = ["Micro", "StepMath"]

SUM = tf.distribute.ReduceOp.SUM


class Micro(NamedTuple):
    """One (micro-)batch over all replicas: flags, global-mean values, summed gradients, example count."""

    finite: tf.Tensor  # (keys,) bool
    values: tf.Tensor  # (keys,) float32: global batch means
    grads: list[tf.Tensor | None]  # per trainable variable: gradient of the global mean (None: not connected)
    examples: tf.Tensor | None  # float32: examples in the global (micro-)batch (None: not counted)
    components: list[list[tf.Tensor]]  # (balancing) per component: its gradient of each shared variable (see Balance)
    tracked: tuple  # (deferred tracking) the batch means to track and the batch's examples; () otherwise


class StepMath:
    """Forward/backward on each replica, reductions across replicas, and the guarded optimizer update.

    Args:
        forward: ``forward(inputs, training) -> {output name: tensor}``.
        regularization: returns ``sum(model.losses)`` or None.
        objective: the built :class:`Objective`.
        metrics: the :class:`MetricSpec`.
        trackers: ``{"train": Tracker, "eval": Tracker}``.
        optimizer: a built Keras optimizer (a ``LossScaleOptimizer`` under ``mixed_float16``).
        variables: the trainable variables.
        strategy: the strategy everything was created under.
        balance: the multi-task balancing (aggregator, loss weighting, per-component statistics), or None.
        output_hint: extra text for a missing output name.
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
        balance: Balance | None = None,
        output_hint: Callable[[str], str] | None = None,
    ) -> None:
        self._forward = forward
        self._regularization = regularization
        self._objective = objective
        self._metrics = metrics
        self.trackers = trackers
        self.optimizer = optimizer
        self.variables = variables
        self.strategy = strategy
        self._replicas = strategy.num_replicas_in_sync
        self._hint = output_hint
        self.balance = balance
        self._jacobian = balance is not None and balance.jacobian
        self.loss_keys = objective.logged_keys()  # order of the flags and values

    # -- on each replica ------------------------------------------------------------------------------------------

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
        factors = None if self.balance is None else self.balance.factors(self._objective.keys)
        weights = weights if factors is None else weights * factors  # a loss weighting's factors (GradNorm, DWA)
        total = self._objective.total(parts, weights)
        return outputs, parts, {**parts, TOTAL: total}, weights

    def _observe(self, mode: str, inputs: Any, targets, outputs, values: dict[str, tf.Tensor], ok=None,
                 defer: bool = False) -> tuple:  # fmt: skip
        """Track one batch; with ``ok`` (training), only when it is True: a skipped step's values may be NaN.

        Batch means are masked (``ok`` False weighs the batch 0), cheaper than a tf.cond and its captured inputs;
        Keras metric objects update their own state, so with them the whole observation goes under a tf.cond.
        ``defer``: return the batch means and the example count instead of adding them (the caller adds them with
        the step's update: the pipelined loop in ``trainer/step.py``); Keras metric objects are still updated here.
        """
        tracker = self.trackers[mode]
        if ok is not None and tracker.metrics and not defer:

            def observe() -> tf.Tensor:
                self._observe(mode, inputs, targets, outputs, values)
                return tf.constant(True)

            tf.cond(ok, observe, lambda: tf.constant(False))
            return ()
        metric_values = self._metrics.callable_values(outputs, targets, self._hint)
        values = {**values, **self._empty_is_zero(inputs, metric_values)}
        if not defer:
            tracker.update_means(values, batch_size_of(inputs), ok)
            self._metrics.update(tracker.metrics, outputs, targets)
            return ()
        if tracker.metrics:

            def update() -> tf.Tensor:
                self._metrics.update(tracker.metrics, outputs, targets)
                return tf.constant(True)

            tf.cond(ok, update, lambda: tf.constant(False))
        return tracker.stack_means(values), batch_size_of(inputs)

    @plain_keras_losses()  # Keras loss objects in the user's losses, metrics and add_loss: the plain mean
    def _train_replica(self, batch: tuple[Any, Mapping[str, tf.Tensor]], weights: tf.Tensor, defer: bool = False):
        inputs, targets = batch
        share = None if self._replicas == 1 else replica_share(batch_size_of(inputs))
        mark = graph_mark() if self._jacobian else None  # where the forward pass's ops begin (factored kernels)
        with tf.GradientTape(persistent=self._jacobian) as tape:
            outputs, parts, values, weights = self._losses(inputs, targets, training=True, weights=weights)
            # The one distribution scaling: loss × b/B, gradients summed over replicas.
            objective = values[TOTAL] if share is None else values[TOTAL] * share
            scaled = self.optimizer.scale_loss(objective)  # identity unless loss scaling is on
            if self._jacobian:  # each weighted component alone, scaled like the total
                weighted = weights if share is None else weights * share
                keys = self._objective.keys
                term = {k: self.optimizer.scale_loss(weighted[i] * parts[k]) for i, k in enumerate(keys)}
        if self._jacobian:
            terms = [term[key] for key in self.balance.keys]
            grads, components = self.balance.replica_gradients(
                tape, terms, term.get(REGULARIZATION), self.variables, mark
            )
        else:
            grads, components = tape.gradient(scaled, self.variables), []
        if all(g is None for g in grads) and not any(components):
            raise ValueError("The total loss does not depend on any trainable variable: there is nothing to train.")
        stacked = tf.stack([values[k] for k in self.loss_keys])  # every value is a scalar: one check for all
        if share is not None:  # the global means, on every replica: a non-finite value anywhere makes its sum so
            stacked = tf.distribute.get_replica_context().all_reduce(SUM, stacked * share)
        finite = tf.math.is_finite(stacked)
        # A step is skipped for all replicas or none: each masks its own tracking with the global flag.
        tracked = self._observe("train", inputs, targets, outputs, values, ok=tf.reduce_all(finite), defer=defer)
        return finite, stacked, grads, batch_size_of(inputs), components, tracked

    @plain_keras_losses()
    def _eval_replica(self, batch: tuple[Any, Mapping[str, tf.Tensor]], weights: tf.Tensor):
        inputs, targets = batch
        outputs, _, values, _ = self._losses(inputs, targets, training=False, weights=weights)
        self._observe("eval", inputs, targets, outputs, values)
        stacked = tf.stack([values[k] for k in self.loss_keys])
        if self._replicas > 1:
            stacked = stacked * replica_share(batch_size_of(inputs))
        return stacked

    # -- over all replicas (cross-replica context) ----------------------------------------------------------------

    def _sum(self, value: Any) -> tf.Tensor:
        return self.strategy.reduce(SUM, value, axis=None)

    def micro(self, batch: Any, weights: tf.Tensor, count: bool = True, defer: bool = False) -> Micro:
        """Forward/backward of one global (micro-)batch; gradients summed over replicas, still scaled.

        ``count``: also sum the examples over replicas (gradient accumulation weighs micro-batches by them; a
        collective is not pruned when unused, so a plain step skips it). ``defer``: (one replica) return the
        batch's tracked means instead of adding them (``Micro.tracked``)."""
        if defer and self._replicas > 1:
            raise ValueError("Deferred tracking needs one replica: each replica adds its own share.")
        finite, values, grads, examples, components, tracked = self.strategy.run(
            self._train_replica, args=(batch, weights), kwargs={"defer": defer}
        )
        local = self.strategy.experimental_local_results  # the flags and means are global on every replica already
        return Micro(
            finite=local(finite)[0],
            values=local(values)[0],
            grads=[None if g is None else self._sum(g) for g in grads],
            examples=self._sum(examples) if count else None,
            components=[[self._sum(g) for g in per_key] for per_key in components],
            tracked=tuple(local(t)[0] for t in tracked),
        )

    def apply(self, grads: list[tf.Tensor | None], components: list[list[tf.Tensor]], values: tf.Tensor,
              finite: tf.Tensor) -> None:  # fmt: skip
        """The one guarded update: nothing changes when a loss component is non-finite (see :meth:`combine` and
        :meth:`update`)."""
        grads, after = self.combine(grads, components, values)

        def update() -> tf.Tensor:
            self.update(grads, after)
            return tf.constant(True)

        tf.cond(tf.reduce_all(finite), update, lambda: tf.constant(False))

    def combine(self, grads: list[tf.Tensor | None], components: list[list[tf.Tensor]], values: tf.Tensor) -> tuple:
        """With balancing, the components' gradients of the shared variables aggregated into ``grads`` (``values``:
        the step's global means in ``loss_keys`` order, for GradNorm). Returns (the gradients, what :meth:`update`
        runs after the update, or None).

        Outside any ``tf.cond`` of the update: inside one, the aggregated gradients would belong to the branch's
        graph and the others to the outer one, which Keras' gradient all-reduce refuses."""
        if self.balance is None:
            return grads, None
        own = tf.gather(values, [self.loss_keys.index(key) for key in self.balance.keys])
        return self.balance.combine(grads, components, own)

    def update(self, grads: list[tf.Tensor | None], after: Callable | None = None) -> None:
        """The optimizer update, unguarded: the caller knows the step is finite (:meth:`apply`, or the pipelined
        loop in ``trainer/step.py``, which ends before a non-finite step's update). ``after``: from :meth:`combine`.
        """
        self.optimizer.apply_gradients([(g, v) for g, v in zip(grads, self.variables) if g is not None])
        if after is not None:  # a LossScaleOptimizer unscaled (and skipped on overflow) above
            after(self.trackers["train"].update_step_means)

    def train(self, batch: Any, weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """One step on one batch: returns (finite flags, values)."""
        micro = self.micro(batch, weights, count=False)
        self.apply(micro.grads, micro.components, micro.values, micro.finite)
        return micro.finite, micro.values

    def evaluate(self, batch: Any, weights: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """One evaluation step: (flags, all True — evaluation never stops on a value —, the global means)."""
        values = self._sum(self.strategy.run(self._eval_replica, args=(batch, weights)))
        return tf.ones([len(self.loss_keys)], tf.bool), values

    def accumulate(self, pull: Callable[[], tuple[tf.Tensor, Callable]], k: int, micro: Callable, weights: tf.Tensor):
        """Up to ``k`` micro-batches then one update, the gradients weighted by the micro-batches' example counts.

        ``pull() -> (has a batch, get)``: ``get()`` returns the batch (called only when there is one); ``micro`` is
        :meth:`micro`, possibly compiled with XLA.

        Returns (at least one micro-batch ran, finite flags, example-weighted mean values).
        """
        connected: list[bool] = []  # filled while the loop body is traced: which variables get a gradient
        n = len(self.loss_keys)
        zero_grads = [tf.zeros_like(v) for v in self.variables]
        # Balancing: each component's gradient is summed over the micro-batches (every variable is carried; only
        # the shared ones, known once the body is traced, are added to) and aggregated once, at the update.
        m = len(self.balance.keys) if self._jacobian else 0
        zero_components = [[tf.zeros_like(v) for v in self.variables] for _ in range(m)]

        def body(j, more, examples, bad, values, grads, components):
            def run(get):
                step = micro(get(), weights)
                if not connected:
                    connected.extend(g is not None for g in step.grads)
                count = step.examples
                summed = [a if g is None else a + g * count for a, g in zip(grads, step.grads)]
                added = [list(per_key) for per_key in components]
                for i, per_key in enumerate(step.components):
                    for slot, g in zip(self.balance.shared, per_key):
                        added[i][slot] = added[i][slot] + g * count
                still_bad = bad + tf.cast(tf.logical_not(step.finite), tf.int32)
                return j + 1, tf.constant(True), examples + count, still_bad, values + step.values * count, \
                    summed, added  # fmt: skip

            has, get = pull()
            return tf.cond(
                has, lambda: run(get), lambda: (j, tf.constant(False), examples, bad, values, grads, components)
            )

        start = (tf.constant(0), tf.constant(True), tf.constant(0.0), tf.zeros([n], tf.int32), tf.zeros([n]))
        j, _, examples, bad, values, grads, components = tf.while_loop(
            lambda j, more, *_: tf.logical_and(j < k, more), body, (*start, zero_grads, zero_components)
        )
        grads = [tf.math.divide_no_nan(g, examples) if c else None for g, c in zip(grads, connected)]
        shared = self.balance.shared if self._jacobian else []
        components = [[tf.math.divide_no_nan(per_key[slot], examples) for slot in shared] for per_key in components]
        finite = tf.equal(bad, 0)
        values = tf.math.divide_no_nan(values, examples)
        self.apply(grads, components, values, tf.logical_and(tf.reduce_all(finite), j > 0))
        return j > 0, finite, values
