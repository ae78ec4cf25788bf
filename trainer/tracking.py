"""Tracking: one tracker per logged key, updated inside the compiled step, read by the host once per block.

Batch-weighted means (every loss component, the total, metric callables) share one fused pair of variables —
a vector of ``Σ value·batch_size`` and ``Σ batch_size`` — so 20 components cost one ``assign_add``, not 20 (see
PITFALLS.md, "Tracking cost"). Keras metric objects (accuracy, ...) keep their own state. An epoch's value is the
mean over its batches weighted by batch size, which is Keras' convention.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import tensorflow as tf

__all__ = ["Tracker"]


def _sum_variable(shape: tuple[int, ...], name: str) -> tf.Variable:
    # ON_READ + SUM: each replica accumulates its own share; a read sums them (as Keras metric variables do).
    return tf.Variable(
        tf.zeros(shape, tf.float32),
        trainable=False,
        name=name,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.SUM,
    )


class Tracker:
    """The logged values of one mode (training or evaluation).

    Args:
        mean_keys: keys tracked as batch-weighted means, in logging order (``loss`` first).
        metrics: Keras metric objects keyed ``output/name``.
        step_keys: keys tracked as plain means over optimizer steps, updated in cross-replica context
            (``grad_norm/<key>``).
        layer_metrics: Keras metrics the model's layers update themselves, by name (read and reset here only).
    """

    def __init__(
        self,
        mean_keys: list[str],
        metrics: Mapping[str, keras.metrics.Metric],
        step_keys: list[str] = (),
        layer_metrics: Mapping[str, keras.metrics.Metric] | None = None,
    ) -> None:
        self.mean_keys = list(mean_keys)
        self.metrics = dict(metrics)
        self.step_keys = list(step_keys)
        self.layer_metrics = dict(layer_metrics or {})
        self._sums = _sum_variable((len(self.mean_keys),), "tracker_sums")
        self._count = _sum_variable((), "tracker_count")
        self._step_sums = tf.Variable(tf.zeros([len(self.step_keys)]), trainable=False, name="tracker_step_sums")
        self._steps = tf.Variable(0.0, trainable=False, name="tracker_steps")

    @property
    def keys(self) -> list[str]:
        return self.mean_keys + self.step_keys + list(self.metrics) + list(self.layer_metrics)

    def update_means(self, values: Mapping[str, tf.Tensor], batch_size: tf.Tensor, ok: tf.Tensor | None = None) -> None:
        """Add one batch: ``values`` are the batch means, ``batch_size`` its number of examples; nothing when ``ok``
        is False (a skipped step: its values may be NaN)."""
        stacked = self.stack_means(values)
        if ok is not None:
            stacked = tf.where(ok, stacked, 0.0)
            batch_size = tf.where(ok, batch_size, 0.0)
        self.add_means(stacked, batch_size)

    def stack_means(self, values: Mapping[str, tf.Tensor]) -> tf.Tensor:
        """The batch means of ``mean_keys`` as one vector (what :meth:`add_means` adds)."""
        return tf.stack([tf.cast(values[k], tf.float32) for k in self.mean_keys])

    def add_means(self, stacked: tf.Tensor, batch_size: tf.Tensor) -> None:
        """Add one batch from :meth:`stack_means`' vector and its number of examples."""
        self._sums.assign_add(stacked * batch_size)
        self._count.assign_add(batch_size)

    def update_step_means(self, values: tf.Tensor) -> None:
        """Add one optimizer step's ``step_keys`` values (a vector; cross-replica context)."""
        self._step_sums.assign_add(values)
        self._steps.assign_add(1.0)

    def reset(self) -> None:
        """Start a new epoch (or evaluation)."""
        self._sums.assign(tf.zeros_like(self._sums))
        self._count.assign(0.0)
        self._step_sums.assign(tf.zeros_like(self._step_sums))
        self._steps.assign(0.0)
        for metric in [*self.metrics.values(), *self.layer_metrics.values()]:
            metric.reset_state()

    def result(self) -> dict[str, tf.Tensor]:
        """Current means (as tensors; the caller converts them once per block)."""
        means = tf.math.divide_no_nan(tf.convert_to_tensor(self._sums), tf.convert_to_tensor(self._count))
        out = {key: means[i] for i, key in enumerate(self.mean_keys)}
        step_means = tf.math.divide_no_nan(tf.convert_to_tensor(self._step_sums), tf.convert_to_tensor(self._steps))
        out.update({key: step_means[i] for i, key in enumerate(self.step_keys)})
        for key, metric in {**self.metrics, **self.layer_metrics}.items():
            out[key] = tf.cast(metric.result(), tf.float32)
        return out

    def variables(self) -> list[tf.Variable]:
        """Every state variable (for checkpoints)."""
        found = [self._sums, self._count, self._step_sums, self._steps]
        for metric in [*self.metrics.values(), *self.layer_metrics.values()]:
            found.extend(metric.variables)
        return found
