"""Metrics: observed, never optimised.

Two forms, in one dict: ``{output name: [str | keras.metrics.Metric, ...]}`` (a Keras metric on one output and the
target of the same name, logged as ``output/metric``) and ``{name: callable(outputs, targets)}`` (any function of all
outputs and targets, following the loss protocol; logged as ``name`` or ``name/part``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence

import keras
import tensorflow as tf

from losses import components
from losses.adapters import binary_or_sparse, display_name
from trainer.errors import names
from trainer.structure import KeyedView, call_reader

__all__ = ["MetricSpec"]


def _metric_names() -> list[str]:
    """Every metric name tapeloop accepts (Keras' functions and its own "accuracy"/"acc"), for suggestions."""
    keras_names = {n for n in dir(keras.metrics) if not n.startswith("_") and n.islower() and n != "get"}
    return sorted(keras_names | {"accuracy", "acc"})


def _resolve(identifier: object, y_true: tf.Tensor, y_pred: tf.Tensor, output: str) -> keras.metrics.Metric:
    """A fresh Keras metric object for ``identifier`` on this output/target pair."""
    if isinstance(identifier, keras.metrics.Metric):
        return type(identifier).from_config(identifier.get_config())
    if isinstance(identifier, str):
        if identifier.lower() in ("accuracy", "acc"):
            is_binary, is_sparse = binary_or_sparse(y_true, y_pred)
            cls = (
                keras.metrics.BinaryAccuracy
                if is_binary
                else keras.metrics.SparseCategoricalAccuracy
                if is_sparse
                else keras.metrics.CategoricalAccuracy
            )
            return cls(name=identifier)
        try:
            resolved = keras.metrics.get(identifier)
        except ValueError:
            close = difflib.get_close_matches(identifier, _metric_names(), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"Unknown Keras metric {identifier!r} for output {output!r}.{hint}") from None
        if isinstance(resolved, keras.metrics.Metric):
            resolved.name = identifier
            return resolved
        return keras.metrics.MeanMetricWrapper(resolved, name=identifier)
    return keras.metrics.MeanMetricWrapper(identifier, name=getattr(identifier, "__name__", "metric"))


class MetricSpec:
    """The metrics a Trainer observes; :meth:`build` makes a fresh set of Keras metric objects per mode."""

    def __init__(self, metrics: Mapping[str, object] | Sequence[object] | None) -> None:
        self.per_output: dict[str, list[object]] = {}
        self.callables: dict[str, Callable] = {}
        self._output_of: dict[str, str] = {}
        self._unbound: list[object] | None = None  # a Keras-style list, for the model's single output
        self._plain = False  # keys without the output prefix (the list form)
        if metrics is None:
            return
        if isinstance(metrics, (list, tuple)):
            self._unbound = self._entries("metrics", list(metrics))
            return
        if not isinstance(metrics, Mapping):
            raise TypeError(
                f"`metrics` must be a dict ({{output: [metrics]}} and/or {{name: callable}}) or, for a single-output "
                f"model, a list of Keras metrics; got {type(metrics).__name__}."
            )
        for key, value in metrics.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"metrics keys must be non-empty str; got {key!r}.")
            if isinstance(value, (list, tuple)):
                entries = list(value)
            elif isinstance(value, (str, keras.metrics.Metric)):
                entries = [value]
            elif callable(value):
                self.callables[key] = value
                continue
            else:
                raise TypeError(
                    f"metrics[{key!r}] is a {type(value).__name__}; expected a list of Keras metrics for output "
                    f"{key!r} or a callable metric(outputs, targets)."
                )
            self.per_output[key] = self._entries(f"metrics[{key!r}]", entries)

    @staticmethod
    def _entries(where: str, entries: list[object]) -> list[object]:
        for entry in entries:
            if not (isinstance(entry, (str, keras.metrics.Metric)) or callable(entry)):
                raise TypeError(f"{where} holds {entry!r}; expected a metric name or Metric object.")
        seen = [display_name(e) for e in entries]
        dupes = sorted({n for n in seen if seen.count(n) > 1})
        if dupes:
            raise ValueError(f"{where} names {names(dupes)} more than once.")
        return entries

    def bind_outputs(self, output_names: list[str]) -> None:
        """Bind a Keras-style ``metrics=[...]`` list to the model's single output; logged by metric name alone,
        as Keras logs them (``mae``, ``val_mae``)."""
        if self._unbound is None:
            return
        if len(output_names) != 1:
            raise ValueError(
                f"`metrics` is a list, which applies to a single-output model, but the model has "
                f"{len(output_names)} outputs ({names(output_names)}); give a dict {{output: [metrics]}}."
            )
        self.per_output[output_names[0]] = self._unbound
        self._unbound, self._plain = None, True

    def build(
        self, outputs: Mapping[str, tf.Tensor], targets: Mapping[str, tf.Tensor], output_hint=None
    ) -> dict[str, keras.metrics.Metric]:
        """Fresh Keras metric objects keyed ``output/name``, resolved from the shapes of outputs and targets."""
        built: dict[str, keras.metrics.Metric] = {}
        for output, entries in self.per_output.items():
            reader = f"metrics[{output!r}]"
            y_pred = KeyedView(outputs, kind="output", reader=reader, hint=output_hint)[output]
            y_true = KeyedView(targets, kind="target", reader=reader)[output]
            for entry in entries:
                key = display_name(entry) if self._plain else f"{output}/{display_name(entry)}"
                built[key] = _resolve(entry, y_true, y_pred, output)
                self._output_of[key] = output
        return built

    def update(
        self,
        metric_objects: Mapping[str, keras.metrics.Metric],
        outputs: Mapping[str, tf.Tensor],
        targets: Mapping[str, tf.Tensor],
    ) -> None:
        """Update every Keras metric on its output/target pair (in the compiled step)."""
        for key, metric in metric_objects.items():
            output = self._output_of[key]
            metric.update_state(targets[output], outputs[output])

    def callable_values(
        self, outputs: Mapping[str, tf.Tensor], targets: Mapping[str, tf.Tensor], output_hint=None
    ) -> dict[str, tf.Tensor]:
        """The values of the metric callables, normalised like loss components (``name`` or ``name/part``)."""
        found: dict[str, tf.Tensor] = {}
        for name, fn in self.callables.items():
            value = call_reader(fn, outputs, targets, reader=f"metric {name!r}", hint=output_hint)
            found.update(components(name, value, kind="metric"))
        return found
