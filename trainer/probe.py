"""The first-batch check, and the trackers it implies.

Before any update the Trainer runs the model, every loss and every metric once on the first batch, eagerly and with
``training=False``, inside :func:`structure.preserved` (so the pass changes no state): a missing key, a shape
mismatch or a bad loss return fails here with a clear message. What it finds — the component keys, the metric
callables' keys, the Keras metric objects per mode — decides what each mode's :class:`Tracker` logs.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import keras
import tensorflow as tf

from trainer.errors import names
from trainer.metrics import MetricSpec
from trainer.model import ModelCall
from trainer.objective import Objective
from trainer.structure import preserved
from trainer.tracking import Tracker

__all__ = ["Probe", "make_trackers", "probe"]

MODES = ("train", "eval")


class Probe(NamedTuple):
    """What one checking pass found."""

    parts: dict[str, tf.Tensor]  # the loss components, by key
    metric_values: dict[str, tf.Tensor]  # the metric callables' values, by key
    keras_metrics: dict[str, dict[str, keras.metrics.Metric]]  # {mode: fresh Keras metric objects by key}


def probe(call: ModelCall, objective: Objective, metrics: MetricSpec, batch: Any) -> Probe:
    """Run the model, every loss and every metric once on ``batch`` (see the module's docstring)."""
    inputs, targets = batch
    with preserved([*call.state(), *objective.variables()]):  # the model's state and the losses' variables
        outputs = call(inputs, training=False)
        objective.bind_outputs(list(outputs))
        metrics.bind_outputs(list(outputs))
        parts = objective.components(outputs, targets, call.regularization(), call.hint)
        metric_values = metrics.callable_values(outputs, targets, call.hint)
    per_mode = {mode: metrics.build(outputs, targets, call.hint) for mode in MODES}
    metrics.check(per_mode["train"], outputs, targets)
    return Probe(parts, metric_values, per_mode)


def make_trackers(
    objective: Objective, found: Probe, layer_metrics: dict[str, keras.metrics.Metric], step_keys: list[str]
) -> dict[str, Tracker]:
    """One tracker per mode: the loss total and components and the metric callables as batch means, the Keras
    metrics, the model's layers' own metrics, and (training) ``step_keys`` as means over steps. Keys must not
    collide."""
    mean_keys = objective.logged_keys() + list(found.metric_values)
    keras_keys = set(found.keras_metrics["train"])
    clash = sorted(set(mean_keys) & keras_keys | {k for k in found.metric_values if k in found.parts})
    clash += sorted((set(mean_keys) | keras_keys) & set(layer_metrics))
    if clash or len(set(mean_keys)) != len(mean_keys):
        raise ValueError(f"Metric keys {names(clash)} collide with loss component keys; rename them.")
    return {
        mode: Tracker(mean_keys, found.keras_metrics[mode], step_keys * (mode == "train"), layer_metrics)
        for mode in MODES
    }
